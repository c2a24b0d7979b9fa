"""When a fused path computes exactly what the upstream module code would: the checks, written once.

The fused modules read their Linears' weights instead of calling the Linears, and run kernels that read plain
dense memory. That is exact only while nothing else would have run or changed on the way: a submodule that is a
plain ``nn.Linear`` (not a LoRA wrapper, a quantized or a parametrized Linear), with no hooks of its own and no
global module hooks (pruning is a forward pre-hook), whose parameters are plain tensors (not a quantized or
distributed tensor subclass). Where any of that fails, the modules run the upstream code, module calls included.
Each check is a few attribute reads, so the plain case pays nothing measurable, and all are traceable by
torch.compile without a graph break.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn.modules import module as _module

__all__ = ["has_hooks", "plain_linear", "plain_tensor"]

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


def plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer(x)`` is exactly ``F.linear(x, layer.weight, layer.bias)`` on plain tensors."""
    if type(layer) is not nn.Linear or has_hooks(layer):
        return False
    return plain_tensor(layer.weight) and (layer.bias is None or plain_tensor(layer.bias))
