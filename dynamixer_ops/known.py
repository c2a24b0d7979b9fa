"""Which module code dynamixer_ops implements: :func:`dynamixer_ops.convert` and :func:`dynamixer_ops.optimize`
replace or speed up a module only when the code its forward runs is code this project computes exactly.

Research code forks the seed's classes and keeps their names and submodules while changing a forward (a temperature
on the mixing logits, a layer scale, a post-norm block). A class name or a set of attributes says nothing about
that, so a module is recognised by its code: every method its forward runs (``forward``, and for this project's
own classes the methods ``forward`` calls) must compile to the same bytecode, names, constants and defaults as one
of the implementations below. A verbatim copy under another module path (the seed repository vendored into a
research project) is recognised; any other change of a method, or a ``forward`` set on the instance, is not.

The implementations, per kind:

* the seed repository's classes (https://github.com/ziyuwwang/DynaMixer, MIT License, Copyright (c) 2022
  ziyuwwang): their forwards are kept below verbatim, compiled by the running Python;
* :mod:`dynamixer_ops.upstream`'s restatement and :mod:`dynamixer_ops.models`' ``TokenMlp``;
* timm's ``Mlp`` and ``DropPath`` (looked up only where timm is already imported: a module of timm's classes
  cannot exist otherwise, and importing timm here would cost every user of the op seconds).
"""
from __future__ import annotations

import sys
import types
from functools import lru_cache

from torch import nn

from . import upstream

__all__ = ["KINDS", "known_kind", "named_like", "unknown_reason"]

# The seed repository's forwards, verbatim (models/dynamixer.py, models/vision_model.py, models/utils.py).
_SEED_SOURCE = '''
class DynaMixerOp:
    def forward(self, x):
        B, L, C = x.shape
        weights = self.compress(x).reshape(B, L, self.num_head, self.reduced_dim).permute(0, 2, 1, 3).reshape(B, self.num_head, -1)
        weights = self.generate(weights).reshape(B, self.num_head, L, L)
        weights = self.activation(weights)
        x = x.reshape(B, L, self.num_head, C//self.num_head).permute(0, 2, 3, 1)
        x = torch.matmul(x, weights)
        x = x.permute(0, 3, 1, 2).reshape(B, L, C)
        x = self.out(x)
        return x


class DynaMixerBlock:
    def forward(self, x):
        B, H, W, C = x.shape
        h = self.mix_h(x.permute(0, 2, 1, 3).reshape(-1, H, C)).reshape(B, W, H, C).permute(0, 2, 1, 3)
        w = self.mix_w(x.reshape(-1, W, C)).reshape(B, H, W, C)
        c = self.mlp_c(x)

        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)

        x = h * a[0] + w * a[1] + c * a[2]

        x = self.proj(x)
        x = self.proj_drop(x)

        return x


class VisionBlock:
    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        return x


class Mlp:
    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x
'''  # noqa: E501  (verbatim)

# The kinds of module the project replaces or runs its own path for.
KINDS = ("DynaMixerOp", "DynaMixerBlock", "VisionBlock", "Mlp", "DropPath")


def _code_key(code: types.CodeType) -> tuple:
    """What a code object computes, without where it was written (file, line numbers, qualified name)."""
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else (type(c).__name__, repr(c))
                   for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_argcount,
            code.co_posonlyargcount, code.co_kwonlyargcount, consts)


def _function_key(function) -> tuple | None:
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    return (_code_key(code), repr(function.__defaults__), repr(function.__kwdefaults__))


# CPython compiles `torch.matmul(...)` differently where `torch` is bound by an import statement in the same file:
# the seed's own files import torch, a copy pasted elsewhere might not.
_SEED_PREAMBLES = ("import torch\n", "")


@lru_cache(maxsize=None)
def _seed_keys() -> dict[str, list[tuple]]:
    keys: dict[str, list[tuple]] = {}
    for preamble in _SEED_PREAMBLES:
        namespace: dict = {}
        exec(compile(preamble + _SEED_SOURCE, "<dynamixer seed>", "exec", dont_inherit=True), namespace)
        for kind in ("DynaMixerOp", "DynaMixerBlock", "VisionBlock", "Mlp"):
            keys.setdefault(kind, []).append(_function_key(namespace[kind].forward))
    return keys


def _own_classes(kind: str) -> list[type]:
    """The project's classes of ``kind`` and, where their modules are already imported, timm's."""
    own = {"DynaMixerOp": [upstream.DynaMixerOp], "DynaMixerBlock": [upstream.DynaMixerBlock],
           "VisionBlock": [upstream.VisionBlock], "Mlp": [upstream.Mlp], "DropPath": [upstream.DropPath]}[kind]
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is not None and kind in ("Mlp", "DropPath"):
        own.append(getattr(timm_layers, kind))
    models = sys.modules.get("dynamixer_ops.models")
    if models is not None and kind == "Mlp":
        own.append(models.TokenMlp)
    return own


# The methods whose code decides what a module of each kind computes: forward, and what the project's own forwards
# call on self (a fork that overrides `mix` changes the layer as surely as one that overrides `forward`).
_METHODS = {"DynaMixerOp": ("forward", "mix", "mixing_matrices"), "DynaMixerBlock": ("forward", "upstream_forward"),
            "VisionBlock": ("forward",), "Mlp": ("forward",), "DropPath": ("forward",)}


def _implementations(kind: str) -> list[dict[str, tuple]]:
    """Each implementation of ``kind``: the key of every method that matters, by name."""
    found = [{"forward": key} for key in _seed_keys().get(kind, ())]
    for cls in _own_classes(kind):
        found.append({name: _function_key(getattr(cls, name)) for name in _METHODS[kind] if hasattr(cls, name)})
    return found


def _matches(cls: type, implementation: dict[str, tuple]) -> bool:
    return all(_function_key(getattr(cls, name, None)) == key for name, key in implementation.items())


@lru_cache(maxsize=None)
def _class_kind(cls: type, timm_loaded: bool, models_loaded: bool) -> str | None:
    # The flags key the cache: timm's entries join the implementations once timm is imported.
    if cls.__call__ is not nn.Module.__call__ or getattr(cls, "_call_impl", None) is not nn.Module._call_impl:
        return None
    for kind in KINDS:
        if any(_matches(cls, implementation) for implementation in _implementations(kind)):
            return kind
    return None


def known_kind(module) -> str | None:
    """The kind (one of :data:`KINDS`) whose code ``module`` runs, or None when its code is none this project
    implements. Looked up once per class."""
    if not isinstance(module, nn.Module) or "forward" in module.__dict__:
        return None
    return _class_kind(type(module), "timm.layers" in sys.modules, "dynamixer_ops.models" in sys.modules)


def named_like(module, kinds: tuple[str, ...]) -> bool:
    """Whether ``module``'s class or one of its bases is named like one of ``kinds``: a fork a user would expect to
    be converted, and is told about when it is not."""
    return any(c.__name__ in kinds for c in type(module).__mro__)


def unknown_reason(module) -> str:
    """Why :func:`known_kind` is None for ``module``, for a warning."""
    cls = type(module)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(module, nn.Module) and "forward" in module.__dict__:
        return f"{where} has a forward set on the instance"
    return (f"{where}'s forward is not code dynamixer_ops implements (the seed repository's, "
            f"dynamixer_ops.upstream's or timm's): its own forward runs")
