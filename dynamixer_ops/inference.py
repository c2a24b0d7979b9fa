"""The fastest CPU inference of a DynaMixer network: :func:`optimize`.

``optimize(model)`` turns, in place, every DynaMixer ``VisionBlock`` whose code is one the project implements
(:mod:`dynamixer_ops.known`: the seed repository's or :mod:`dynamixer_ops.upstream`'s; a fork keeps its own forward,
with one warning per class) and whose mixer is a fused :class:`dynamixer_ops.nn.DynaMixerBlock` (the models of
:mod:`dynamixer_ops.models`, or a network after :func:`dynamixer_ops.convert`) into an :class:`InferenceBlock`: a
subclass of the block's own class, with the same submodules, Parameters, hooks and state_dict keys. Its forward runs
the inference path below where that computes what the block's own code would, and the block's own forward
everywhere else (training mode, grad enabled, a non-CPU tensor, a hook, a LoRA-wrapped or quantized Linear, a
non-GELU activation, ``skip_lam != 1``, bfloat16 where oneDNN has no bf16 kernels, forward-mode AD, ...; the checks
are :meth:`InferenceBlock.inference_reason`). TorchScript compiles the block's own forward.

The inference path, per block (under ``torch.no_grad`` / ``inference_mode``, eval mode, float32 or bfloat16 on a
CPU, or float32 weights under ``torch.autocast("cpu", torch.bfloat16)``) is the fused block's own arithmetic
(:func:`dynamixer_ops.nn.block_forward`) on the primitives of :class:`_Packed`:

* every Linear runs with its weight packed once for the product timed fastest for its shape on this machine
  (:func:`dynamixer_ops.linear.packed_linear`: oneDNN prepacked, MKL's packed sgemm, or torch's own). The packed
  copy is keyed by the Parameter object, its ``_version`` and its ``data_ptr()``: an optimizer step,
  ``load_state_dict`` or any in-place write through the Parameter repacks it at the next call. A write that
  bypasses the version counter (``weight.data.copy_(...)``) is not seen: call :func:`release` (or ``optimize``
  again) after one;
* GELU after ``fc1`` and the two residual additions after ``proj`` and ``fc2`` run as oneDNN post-ops where the
  product is oneDNN's (``x + proj(...)`` in one pass over the output);
* the mixing runs the op's own kernel (:func:`dynamixer_ops.ops.forward_kernel`) without its per-call entry.

The arithmetic is the block's: the same operations in the same precision, differing in rounding only (another
GEMM's summation order, the weighted sum of the three branches by ``addcmul``), so the outputs match the upstream
network within the project's tolerances (``tests/test_inference.py``). Training is unchanged: in train mode or with
grad enabled the block runs its own forward, the fused training path included.
"""
from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .backends import resolve_backend
from .known import known_kind, named_like, unknown_reason
from .linear import packed_linear, packed_linear_reason, release
from .nn import DynaMixerBlock, Primitives, block_forward
from .plain import eager_context_reason, has_hooks, linear_reason

__all__ = ["InferenceBlock", "optimize", "optimized_blocks", "release"]

_GELU_ALGORITHM = {"none": "none", "tanh": "tanh"}
# Parts that are the identity in eval mode.
_EVAL_IDENTITY = (nn.Identity, nn.Dropout)


# ---------------------------------------------------------------------------------------------------------------
# The checks

def _linear_ok(layer, dtype: torch.dtype) -> str | None:
    why = linear_reason(layer)
    if why is None and layer.weight.dtype != dtype:
        why = f"has {layer.weight.dtype} weights, the input is {dtype}"
    return why


def _gelu_reason(act) -> str | None:
    if type(act) is not nn.GELU:
        return f"is a {type(act).__name__}, not nn.GELU"
    if act.approximate not in _GELU_ALGORITHM:
        return f"is GELU(approximate={act.approximate!r})"
    if has_hooks(act):
        return "has hooks"
    return None


def _identity_now(part, types) -> bool:
    """``part`` (a dropout, a drop-path) is the identity now: one of ``types`` (or a drop-path whose code we know),
    in eval mode, without hooks (a submodule's own training flag counts, not the block's)."""
    if type(part) not in types and known_kind(part) != "DropPath":
        return False
    return (not part.training or type(part) is nn.Identity) and not has_hooks(part)


def _mlp_reason(mlp, weight_dtype: torch.dtype) -> str | None:
    """An ``Mlp`` (upstream's, timm's or TokenMlp): fc1 -> GELU -> (dropout, identity norm) -> fc2 -> dropout."""
    if has_hooks(mlp):
        return "has hooks"
    for name in ("fc1", "fc2"):
        why = _linear_ok(getattr(mlp, name, None), weight_dtype)
        if why is not None:
            return f"{name} {why}"
    why = _gelu_reason(getattr(mlp, "act", None))
    if why is not None:
        return f"act {why}"
    for name in ("drop", "drop1", "drop2", "norm"):
        part = getattr(mlp, name, None)
        if part is not None and not _identity_now(part, _EVAL_IDENTITY):
            return f"{name} is a {type(part).__name__} in training mode or with hooks, or not a dropout"
    if not {"drop", "drop1"} & set(mlp._modules):
        return "has no dropout layers where an Mlp has them"
    return None


class InferenceBlock(nn.Module):
    """Mixin of the blocks :func:`optimize` made: the inference path where :meth:`inference_reason` is None, the
    block's own forward (the next class in the MRO) everywhere else."""

    @torch.jit.unused
    def inference_reason(self, x: Tensor) -> str | None:
        """Why this call runs the block's own forward, or None when it runs the inference path."""
        if torch.is_grad_enabled() or self.training:
            return "grad enabled or training mode"
        if not isinstance(x, Tensor):
            return "traced by FX"
        why = eager_context_reason((x,))
        if why is not None:
            return why
        if torch.autograd.forward_ad._current_level >= 0:
            return "inside a forward-mode AD level (a Parameter may carry a tangent)"
        if x.device.type != "cpu" or x.dim() != 4:
            return "not a 4-D CPU tensor"
        compute = _compute_dtype(x)
        why = packed_linear_reason(compute)
        if why is not None:
            return f"computes in {compute}: {why}"
        # Under autocast float32 weights are cast (and packed) to the autocast dtype, as autocast casts them.
        weight_dtype = torch.float32 if torch.is_autocast_enabled("cpu") else compute
        if has_hooks(self):
            return "has hooks"
        if self.skip_lam != 1.0:
            return f"skip_lam = {self.skip_lam}"
        if not _identity_now(self.drop_path, _EVAL_IDENTITY):
            return f"drop_path is a {type(self.drop_path).__name__} in training mode or with hooks"
        for name in ("norm1", "norm2"):
            norm = getattr(self, name)
            if type(norm) is not nn.LayerNorm or has_hooks(norm) or len(norm.normalized_shape) != 1:
                return f"{name} is not a plain nn.LayerNorm over the channels"
        attn = self.attn
        if type(attn) is not DynaMixerBlock or has_hooks(attn) or not attn.fuses():
            return "attn is not a fused DynaMixerBlock that fuses"
        if x.shape[1] != attn.resolution or x.shape[2] != attn.resolution:
            return "input is not (B, resolution, resolution, C)"
        for name in ("mlp_c", "proj"):
            why = _linear_ok(getattr(attn, name), weight_dtype)
            if why is not None:
                return f"attn.{name} {why}"
        for op in (attn.mix_h, attn.mix_w):
            why = _linear_ok(op.out, weight_dtype)
            if why is not None:
                return f"attn mixer out {why}"
        if not _identity_now(attn.proj_drop, _EVAL_IDENTITY):
            return "attn.proj_drop is not a Dropout in eval mode without hooks"
        for name, mlp in (("attn.reweight", attn.reweight), ("mlp", self.mlp)):
            why = _mlp_reason(mlp, weight_dtype) if known_kind(mlp) == "Mlp" else unknown_reason(mlp)
            if why is not None:
                return f"{name} {why}"
        return None

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles the block's own forward (own_forward: the class optimize() made keeps it under
            # that name), not the inference path's Python.
            return self.own_forward(x)
        return self.eager_forward(x)

    @torch.jit.unused
    def eager_forward(self, x: Tensor) -> Tensor:
        if self.inference_reason(x) is not None:
            return super().forward(x)
        return _inference_forward(self, x, _compute_dtype(x))

    def __reduce_ex__(self, protocol):
        # Pickled (torch.save of a whole model, deepcopy) as the block's own class, made an inference block again
        # on load: the class optimize() made is not importable by name.
        own = next(c for c in type(self).__mro__ if c is not InferenceBlock and not issubclass(c, InferenceBlock))
        return _restore, (own, self.__getstate__())


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


class _Packed(Primitives):
    """The inference path's primitives: prepacked products in ``dtype`` (GELU and residual additions fused where
    the product can), the op's kernel without its per-call entry, sums in place (no autograd here)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def mix(self, op, x: Tensor) -> Tensor:
        return _mix(op, x, self.dtype)

    def linear(self, layer, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return packed_linear(layer, x, self.dtype, residual=residual)

    def mlp(self, mlp, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """fc1 -> GELU -> fc2 (+ residual): the Mlp in eval mode (its dropouts and norm are identities: checked)."""
        h = packed_linear(mlp.fc1, x, self.dtype, "gelu", _GELU_ALGORITHM[mlp.act.approximate])
        return packed_linear(mlp.fc2, h, self.dtype, residual=residual)

    def branch_sum(self, h: Tensor, w: Tensor, c: Tensor) -> Tensor:
        return torch.add(h, w).add_(c)

    def weighted_sum(self, h: Tensor, w: Tensor, c: Tensor, a: Tensor) -> Tensor:
        return h.mul_(a[0]).addcmul_(w, a[1]).addcmul_(c, a[2])       # in h's memory


_PRIMITIVES: dict[torch.dtype, _Packed] = {}


def _inference_forward(block, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``VisionBlock.forward`` in eval mode (drop-path and dropouts are identities, skip_lam = 1): the fused block
    (:func:`dynamixer_ops.nn.block_forward`) and the Mlp on the packed primitives, each residual addition fused into
    the product before it."""
    p = _PRIMITIVES.get(dtype) or _PRIMITIVES.setdefault(dtype, _Packed(dtype))
    amp = torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", enabled=False):
        # Under autocast LayerNorm runs in float32, as autocast runs it, and its output is cast for the products.
        x = block_forward(block.attn, _layer_norm(block.norm1, x, amp).to(dtype), p, residual=x)
        return p.mlp(block.mlp, _layer_norm(block.norm2, x, amp).to(dtype), residual=x)


def _layer_norm(norm: nn.LayerNorm, x: Tensor, amp: bool) -> Tensor:
    """``norm(x)``; under autocast in float32, as autocast runs layer_norm."""
    if amp:
        x = x.float()
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _mix(op, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``dynamic_mix(x, ...)`` of ``op``'s weights in ``dtype``: the op's own kernel (:func:`ops.forward_kernel`),
    called as the op would call it on the plain CPU tensors that :meth:`InferenceBlock.inference_reason` checked."""
    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)
    weights = [cast(op.compress.weight), cast(op.compress.bias), cast(op.generate.weight), cast(op.generate.bias)]
    L, _, S, _ = ops.check_inputs(x, *weights, op.num_head)
    backend = resolve_backend(op.backend, "cpu", dtype)
    return ops.forward_kernel(x, *ops.dense_weights(*weights, L), S, backend.name)


# ---------------------------------------------------------------------------------------------------------------
# optimize()

_CLASSES: dict[type, type] = {}


def _inference_class(cls: type) -> type:
    if issubclass(cls, InferenceBlock):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (InferenceBlock, cls), {"__module__": cls.__module__,
                                                                   "__qualname__": cls.__qualname__,
                                                                   "own_forward": _renamed(cls.forward, "own_forward")})
    return _CLASSES[cls]


def _renamed(function, name: str):
    """``function`` under another name (TorchScript names a compiled method by its function's ``__name__``)."""
    copy = types.FunctionType(function.__code__, function.__globals__, name, function.__defaults__,
                              function.__closure__)
    copy.__qualname__ = function.__qualname__.rsplit(".", 1)[0] + "." + name
    copy.__kwdefaults__, copy.__doc__ = function.__kwdefaults__, function.__doc__
    return copy


def _restore(cls: type, state: dict) -> nn.Module:
    block = cls.__new__(cls)
    block.__setstate__(state)
    block.__class__ = _inference_class(cls)
    return block


def _is_vision_block(module: nn.Module) -> bool:
    """A DynaMixer ``VisionBlock``: its code (:mod:`dynamixer_ops.known`) and its parts."""
    return (known_kind(module) == "VisionBlock"
            and all(isinstance(getattr(module, a, None), nn.Module) for a in ("norm1", "attn", "norm2", "mlp",
                                                                                "drop_path"))
            and isinstance(getattr(module, "skip_lam", None), (int, float)))


def optimized_blocks(model: nn.Module) -> list[str]:
    """The names of ``model``'s blocks that :func:`optimize` made inference blocks."""
    return [name for name, m in model.named_modules() if isinstance(m, InferenceBlock)]


def optimize(model: nn.Module) -> nn.Module:
    """Fastest CPU inference for a DynaMixer network, in place; returns ``model``.

    Each DynaMixer ``VisionBlock`` (recognised by class name and structure) whose ``attn`` is a fused
    :class:`dynamixer_ops.nn.DynaMixerBlock` becomes an :class:`InferenceBlock` of its own class (same object,
    submodules, Parameters, hooks and state_dict; ``isinstance`` with its old class holds). Upstream layers are not
    converted here: call :func:`dynamixer_ops.convert` first (``optimize(convert(upstream_model))``). Training and
    every case the inference path does not cover run the block's own forward (module docstring). Packed weights are
    built at the first inference call and follow in-place updates of the Parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    kept: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, InferenceBlock):
            continue
        if _is_vision_block(module):
            if isinstance(module.attn, DynaMixerBlock):
                module.__class__ = _inference_class(type(module))
        elif named_like(module, ("VisionBlock",)):
            kept.setdefault(type(module), (name or "model", unknown_reason(module)))
    for cls, (where, why) in kept.items():
        warnings.warn(f"optimize: kept {cls.__name__} blocks as they are (first at {where}): {why}", stacklevel=2)
    return model
