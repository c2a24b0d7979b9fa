"""When a fused path computes exactly what the upstream module code would: the checks, written once.

The fused modules read their Linears' weights instead of calling the Linears, and run kernels that read plain
dense memory. That is exact only while nothing else would have run or changed on the way: a submodule that is a
plain ``nn.Linear`` (not a LoRA wrapper, a quantized or a parametrized Linear), with no hooks of its own and no
global module hooks (pruning is a forward pre-hook), whose parameters are plain tensors (not a quantized or
distributed tensor subclass); and an ``activation`` that is exactly ``nn.Softmax`` over the source-token dimension,
without hooks (the kernels compute that softmax themselves). Where any of that fails, the modules run the upstream
code, module calls included.
Each check is a few attribute reads, so the plain case pays nothing measurable, and all are traceable by
torch.compile without a graph break.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn.modules import module as _module

__all__ = ["eager_context_reason", "has_hooks", "linear_reason", "plain_linear", "plain_tensor", "softmax_reason"]

_PLAIN_TENSORS = (Tensor, nn.Parameter)
# What torch.export and AOTAutograd trace with in place of plain tensors (parameters included).
_TRACING_TENSORS = (FakeTensor, FunctionalTensor)


def plain_tensor(t: Tensor) -> bool:
    """A plain tensor or parameter (or the stand-in that export traces with), not a subclass with semantics of its
    own."""
    return type(t) in _PLAIN_TENSORS or isinstance(t, _TRACING_TENSORS)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook: its own forward / backward (pre-)hooks, or global ones."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def _not_module(layer, want: str) -> str:
    return f"is a {type(layer).__module__}.{type(layer).__qualname__}, not a plain {want}"


def linear_reason(layer) -> str | None:
    """Why ``layer(x)`` may not be exactly ``F.linear(x, layer.weight, layer.bias)`` on plain tensors; None when it
    is."""
    if type(layer) is not nn.Linear:
        return _not_module(layer, "nn.Linear")
    if has_hooks(layer):
        return "has hooks (or global module hooks are registered)"
    # The registered tensors themselves: while torch.fx traces, `layer.weight` is a Proxy standing for them.
    weight, bias = layer._parameters.get("weight"), layer._parameters.get("bias")
    if weight is None:
        return "has no weight Parameter"
    if not (plain_tensor(weight) and (bias is None or plain_tensor(bias))):
        return f"has tensor-subclass parameters ({type(weight).__name__})"
    return None


def plain_linear(layer) -> bool:
    """Whether ``layer(x)`` is exactly ``F.linear(x, layer.weight, layer.bias)`` on plain tensors."""
    return linear_reason(layer) is None


def softmax_reason(layer) -> str | None:
    """Why ``layer(logits)`` on the (B, S, L, L) mixing logits may not be ``logits.softmax(dim=-2)`` (the softmax
    over the source token that the kernels compute); None when it is."""
    if type(layer) is not nn.Softmax:
        return _not_module(layer, "nn.Softmax")
    if layer.dim not in (-2, 2):                     # 2 is -2 on the 4-D logits
        return f"is nn.Softmax(dim={layer.dim}), not over the source token (dim=-2)"
    if has_hooks(layer):
        return "has hooks (or global module hooks are registered)"
    return None


def eager_context_reason(tensors) -> str | None:
    """Why a fast path that calls kernels directly, outside the op's autograd and dispatch (the prepacked Linears,
    the inference blocks, the keep-P training variant), may not run in this context; None where it may. Such a path
    must not run while torch.compile, torch.jit.trace / torch.export or ONNX export records a graph (the graph must
    hold portable ops), under a torch.func transform (it has no transform rules), with an FX Proxy or a tensor
    subclass for an input, or where an input carries a forward-mode AD tangent (it would be dropped). The op itself
    has its own rule for what it decomposes (:func:`dynamixer_ops.ops.decomposition_reason`)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "traced or compiled"
    if torch.onnx.is_in_onnx_export():
        return "ONNX export"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform"
    dual = forward_ad._current_level >= 0
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSORS:
            return f"an input is a {type(t).__name__}, not a plain tensor"
        if dual and forward_ad.unpack_dual(t).tangent is not None:
            return "forward-mode AD"
    return None
