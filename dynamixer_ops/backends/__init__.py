"""The backend registry: every implementation of ``dynamic_mix`` plugs in here, and nowhere else.

A backend provides two kernels with one contract (the custom ops in :mod:`dynamixer_ops.ops` call them;
nothing else does):

``forward(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, y)``
    writes the mixed tokens into ``y``.
``backward(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments,
grad_x, grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias)``
    writes all five gradients (weight gradients in the weights' dtype, reduced deterministically).

What the kernels may rely on (validated and prepared once, in :mod:`dynamixer_ops.ops`):

* ``x``, ``grad_y``, ``y`` and ``grad_x`` are 4-D ``(A, B, L, C)`` with ``stride(-1) == 1`` and any other
  strides (``y``/``grad_x`` are ``empty_like(x)``: a transposed view of ``(B, H, W, C)`` stays transposed);
* weights and biases are contiguous, biases are present (zeros stand in for ``None``);
* every tensor has one dtype and one device, which the backend said it supports; ``A * B >= 1``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

__all__ = ["Backend", "register_backend", "unregister_backend", "record_load_error", "registered_backends",
           "load_errors", "available_backends", "unavailable_backends", "get_backend", "resolve_backend",
           "BackendUnavailableError", "env_flag", "TRUE_ENV_VALUES"]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs on this machine."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    # Lower runs first when ``backend="auto"``; per device type, so a backend can rank differently.
    priority: dict
    # Returns ``None`` when the backend can run on this machine, else a sentence saying why not.
    unavailable_reason: Callable[[], str | None] = lambda: None
    # Not chosen by "auto" even when available (e.g. the Triton interpreter: exact but slow).
    auto: Callable[[str], bool] = lambda device_type: True
    # Backends that can keep the probabilities P (N*S, L, L) from the forward for the backward: the out-variants
    # ``forward_keep(..., y, probs)`` / ``backward_kept(grad_y, x, probs, ...)`` and when keeping pays,
    # ``keep_probabilities(L, C, S, d) -> bool`` (recomputing P is the default: no memory beyond x and the weights).
    forward_keep: Callable | None = None
    backward_kept: Callable | None = None
    keep_probabilities: Callable[[int, int, int, int], bool] = lambda L, C, S, d: False

    def why_not(self, device_type: str, dtype: torch.dtype) -> str | None:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if device_type not in self.devices:
            return (f"it runs on {'/'.join(self.devices)} tensors, but the inputs are on {device_type}")
        if dtype not in self.dtypes:
            names = ", ".join(str(t).replace("torch.", "") for t in self.dtypes)
            return f"it supports dtypes {names}, but the inputs are {str(dtype).replace('torch.', '')}"
        return None


_REGISTRY: dict[str, Backend] = {}
_LOAD_ERRORS: dict[str, str] = {}   # backends whose module failed to import, and why


def register_backend(backend: Backend) -> Backend:
    if backend.name in ("auto",) or backend.name in _REGISTRY:
        raise ValueError(f"backend name {backend.name!r} is reserved or already registered")
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend` (a no-op for unknown names)."""
    _REGISTRY.pop(name, None)


def record_load_error(name: str, reason: str) -> None:
    """A backend whose module could not be loaded: requesting it by name raises with ``reason``."""
    _LOAD_ERRORS[name] = reason


def registered_backends() -> dict[str, Backend]:
    """Every registered backend by name, in registration order, whether or not it can run here."""
    return dict(_REGISTRY)


def load_errors() -> dict[str, str]:
    """Backends whose module failed to load, and why."""
    return dict(_LOAD_ERRORS)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _LOAD_ERRORS:
            raise BackendUnavailableError(f"backend {name!r} is not available: {_LOAD_ERRORS[name]}") from None
        known = ", ".join(["auto", *_REGISTRY, *_LOAD_ERRORS])
        raise ValueError(f"unknown backend {name!r}; known backends: {known}") from None


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends this machine can run, for ``device`` (default: any device), best first."""
    device_types = [torch.device(device).type] if device is not None else _machine_device_types()
    names = []
    for device_type in device_types:
        ranked = sorted((b for b in _REGISTRY.values() if device_type in b.devices and b.unavailable_reason() is None),
                        key=lambda b: b.priority.get(device_type, 100))
        names += [b.name for b in ranked if b.name not in names]
    return names


def unavailable_backends() -> dict[str, str]:
    """Every known backend this machine cannot run, with the reason."""
    out = {name: reason for name, reason in _LOAD_ERRORS.items()}
    for b in _REGISTRY.values():
        reason = b.unavailable_reason()
        if reason is not None:
            out[b.name] = reason
    return out


def _machine_device_types() -> list[str]:
    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def resolve_backend(name: str, device_type: str, dtype: torch.dtype) -> Backend:
    """The backend that runs inputs of ``device_type``/``dtype``: the requested one, or the best for "auto".

    An explicit request that cannot run raises :class:`BackendUnavailableError` saying why; "auto" falls back
    along the priority list and only raises when no backend at all can run the inputs.
    """
    if name != "auto":
        backend = get_backend(name)
        reason = backend.why_not(device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run these inputs: {reason}")
        return backend
    candidates = sorted(_REGISTRY.values(), key=lambda b: b.priority.get(device_type, 100))
    reasons = []
    for backend in candidates:
        reason = backend.why_not(device_type, dtype)
        if reason is None and backend.auto(device_type):
            return backend
        reasons.append(f"{backend.name}: {reason or 'not chosen automatically'}")
    raise BackendUnavailableError(f"no backend can run {dtype} inputs on {device_type}: " + "; ".join(reasons))


# Triton's own reading of a boolean variable (``getenv_bool``, which decides TRITON_INTERPRET): these values,
# in any case, are on; anything else is off. Every flag of this project is read the same way.
TRUE_ENV_VALUES = ("1", "true", "on", "yes", "y")


def env_flag(name: str, default: bool = False) -> bool:
    """Whether the environment variable ``name`` is on, by :data:`TRUE_ENV_VALUES` (``TRITON_INTERPRET`` too);
    ``default`` where it is not set."""
    value = os.environ.get(name)
    return default if value is None else value.lower() in TRUE_ENV_VALUES
