"""Drop-in modules (placeholder)."""


def convert(model, backend="auto"):
    raise NotImplementedError
