"""float32 Linear layers on the CPU with oneDNN's GEMM, for the fused modules.

torch runs a float32 ``nn.Linear`` on the CPU with MKL's sgemm. On the AMD EPYC (Zen 5) machines this project is
measured on that reaches ~180-210 GFLOP/s on two cores, while oneDNN's float32 kernel behind
``torch.ops.mkldnn._linear_pointwise`` (the one Inductor lowers frozen CPU Linears to) reaches ~400 on the same
shapes (benchmarks/RESULTS.md). Outside the mixing op, a DynaMixer block is mostly Linears, so the fused modules run
theirs here: :class:`Linear` is an ``nn.Linear`` (same parameters, state_dict keys, hooks, ``isinstance``) whose
forward and input gradient take that kernel where it computes exactly ``F.linear`` (float32 CPU tensors, no
autocast, not under torch.compile / export / tracing) and ``F.linear`` everywhere else; the weight gradient runs there too.

MKL picks its fast code paths by CPU vendor: on Intel CPUs it is tuned (this project's Xeon box: 394 GFLOP/s sgemm),
so by default oneDNN is used on other vendors' CPUs only; an Intel CPU is not measured with oneDNN here. ``DYNAMIXER_OPS_ONEDNN_LINEAR=1`` / ``=0`` forces it
on / off (read at every call).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "use_onednn_linears", "onednn_linear_enabled"]


@functools.cache
def _kernel_exists() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def onednn_linear_enabled() -> bool:
    """Whether :class:`Linear` runs float32 CPU products on oneDNN now: the kernel exists in this torch build, and
    ``DYNAMIXER_OPS_ONEDNN_LINEAR`` says so (``1`` / ``0``) or, unset, the CPU is not an Intel one."""
    if not _kernel_exists():
        return False
    flag = os.environ.get("DYNAMIXER_OPS_ONEDNN_LINEAR", "")
    if flag:
        return flag.lower() not in ("0", "false", "no")
    return not _intel_cpu()


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0 or not onednn_linear_enabled():
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return False
    # Traced graphs must hold portable ATen ops (Inductor picks its own kernels); autocast casts inside F.linear.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return not torch.is_autocast_enabled("cpu")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias):
        return _onednn(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        # Under create_graph (grad mode on here) differentiable ops keep double backward working.
        differentiable = torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(grad, weight.t()) if differentiable else _onednn(grad, weight.t().contiguous(), None)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            # dW = grad^T x, as a Linear of grad^T with "weight" x^T (transposed views: oneDNN reads them as they
            # are). Measured on the Zen 5 box, 2 threads, (rows, out, in): 8192x192x192 2.75 vs MKL mm's 3.19 ms,
            # 8192x576x192 8.48 vs 9.53, 8192x192x576 5.40 vs 9.54, 2048x384x384 1.60 vs 2.94.
            x_rows = x.reshape(-1, x.shape[-1])
            grad_weight = rows.t() @ x_rows if differentiable else _onednn(rows.t(), x_rows.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 CPU products run on oneDNN (see the module docstring); same parameters."""

    def forward(self, x: Tensor) -> Tensor:
        if not _applies(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return _OneDnnLinear.apply(x, self.weight, self.bias)
        return _onednn(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` in ``module`` (exactly that class, not subclasses) a :class:`Linear`, in place:
    the objects, their parameters and hooks are kept, only their class changes. Returns ``module``."""
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = Linear
    return module
