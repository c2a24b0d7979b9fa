"""The Linear products of the fused paths on the CPU: :func:`linear` (the fused layers', with autograd: oneDNN's
GEMM where it is exact and faster here) and :func:`packed_linear` (the inference path's, weights prepacked, the
product chosen per shape by timing; section "Prepacked products" below), with one capability rule
(:func:`onednn_dtype_reason`).

torch runs a float32 ``nn.Linear`` on the CPU with MKL's sgemm. On the AMD EPYC (Zen 5) machines this project is
measured on that reaches ~180-210 GFLOP/s on two cores, while oneDNN's float32 kernel behind
``torch.ops.mkldnn._linear_pointwise`` (the one Inductor lowers frozen CPU Linears to) reaches ~400 on the same
shapes (benchmarks/RESULTS.md). The fused modules call their own Linears through :func:`linear`, which takes that
kernel only where it computes exactly what calling the layer would (a plain ``nn.Linear`` without hooks, see
:mod:`dynamixer_ops.plain`; float32 CPU tensors; no autocast, no torch.func transform, no forward-mode AD; not
under torch.compile, export or tracing) and calls the layer everywhere else. The layers stay ``nn.Linear``: nothing
changes their class, so quantization, LoRA, hooks and torch.func see exactly the layers they would upstream.

MKL picks its fast code paths by CPU vendor: on Intel CPUs it is tuned (this project's Xeon box: 394 GFLOP/s sgemm),
and on AVX2-only AMD EPYC (Zen 3) MKL is ahead of oneDNN as well, so by default oneDNN is used only where it was
timed faster than MKL on this machine (once per process and thread count, never on Intel CPUs).
``DYNAMIXER_OPS_ONEDNN_LINEAR=1`` / ``=0`` forces it on / off (read at every call).
"""
from __future__ import annotations

import functools
import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import env_flag
from .plain import eager_context_reason, plain_linear

__all__ = ["linear", "onednn_linear_enabled", "onednn_dtype_reason", "packed_linear", "packed_linear_reason", "release",
           "product_candidates", "product_choices", "PRODUCTS"]


def _probe() -> tuple[bool, bool]:
    exists = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    try:
        with open("/proc/cpuinfo") as f:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        intel = False
    return exists, intel


# Read once at import: a constant, so that torch.compile never traces the probe.
_KERNEL_EXISTS, _INTEL_CPU = _probe()


# oneDNN's instruction-set caps below its bf16 kernels (which need AVX512-BW/VL/DQ or AVX-NE-CONVERT).
_ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")


@functools.lru_cache(maxsize=None)
def _onednn_packs(dtype: torch.dtype) -> str | None:
    if not (_KERNEL_EXISTS and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "this torch has no oneDNN linear kernels"
    # oneDNN itself is asked (its answer follows the CPU and ONEDNN_MAX_CPU_ISA); then one small packing, in case
    # a torch build answers the first question and fails the second.
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if dtype == torch.bfloat16 and cap in _ONEDNN_CAPS_WITHOUT_BF16:
        return f"oneDNN is capped at {cap} (ONEDNN_MAX_CPU_ISA), which has no bfloat16 kernels"
    asks = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if dtype == torch.bfloat16 and asks is not None and not asks():
        return "oneDNN has no bfloat16 kernels on this CPU (they need AVX512-BW/VL/DQ or AVX-NE-CONVERT)"
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), None)
    except RuntimeError as exc:
        return f"oneDNN cannot pack {dtype} weights here ({str(exc).splitlines()[0]})"
    return None


def onednn_dtype_reason(dtype: torch.dtype) -> str | None:
    """Why oneDNN's prepacked Linear cannot run in ``dtype`` on this CPU, or None where it can (asked once)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's prepacked Linear does not compute in {dtype}"
    return _onednn_packs(dtype)


def _quickest(calls: dict) -> str:
    """The key of the fastest of ``calls`` (name -> callable): each timed three times after two warm-up rounds, the
    calls interleaved (a load that comes and goes slows all alike), the shortest time counting."""
    best = dict.fromkeys(calls, float("inf"))
    with torch.no_grad():
        for i in range(5):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if i >= 2:
                    best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


@functools.lru_cache(maxsize=None)
def _onednn_faster(threads: int) -> bool:
    """Whether oneDNN's float32 product (weights as they are, not prepacked) beats torch's own (MKL's) on this CPU
    at ``threads``: timed once on two of the networks' shapes. MKL is tuned for Intel CPUs and, on AVX2-only AMD
    ones, ahead of oneDNN too; on AVX-512 AMD ones oneDNN is ~2x ahead."""
    if _INTEL_CPU:
        return False
    g = torch.Generator().manual_seed(0)       # the user's random stream is not touched
    x = torch.randn(2048, 384, generator=g)
    weights = [torch.randn(n, 384, generator=g) for n in (384, 1152)]
    return _quickest({"onednn": lambda: [_onednn(x, w, None) for w in weights],
                      "mkl": lambda: [F.linear(x, w) for w in weights]}) == "onednn"


def onednn_linear_enabled() -> bool:
    """Whether :func:`linear` runs float32 CPU products on oneDNN now: the kernel exists in this torch build, and
    ``DYNAMIXER_OPS_ONEDNN_LINEAR`` says so (read as every flag is, :func:`dynamixer_ops.backends.env_flag`) or,
    unset, oneDNN's product was timed faster than MKL's here (once per thread count)."""
    if not _KERNEL_EXISTS:
        return False
    forced = os.environ.get("DYNAMIXER_OPS_ONEDNN_LINEAR")
    if forced is not None:
        return env_flag("DYNAMIXER_OPS_ONEDNN_LINEAR")
    return _onednn_faster(torch.get_num_threads())


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_applies(layer: nn.Module, x: Tensor) -> bool:
    # Traced graphs must hold portable ATen ops (Inductor picks its own kernels); the autograd.Function below has
    # neither a vmap nor a jvp rule (eager_context_reason).
    if not isinstance(x, Tensor) or eager_context_reason((x,)) is not None:
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 2 or x.numel() == 0:
        return False
    if not plain_linear(layer) or layer.weight.dtype != torch.float32 or not onednn_linear_enabled():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return eager_context_reason((layer.weight, layer.bias)) is None


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


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``, with a plain float32 ``nn.Linear``'s products on oneDNN where that is exact (module docstring)."""
    if not _onednn_applies(layer, x):
        return layer(x)
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad
                                    or (layer.bias is not None and layer.bias.requires_grad)):
        return _OneDnnLinear.apply(x, layer.weight, layer.bias)
    return _onednn(x, layer.weight, layer.bias)


# ---------------------------------------------------------------------------------------------------------------
# Prepacked products for inference (dynamixer_ops.optimize): each Linear's weight reordered once for the product
# that is fastest for its shape on this machine, the packed copy kept valid by the Parameter's version counter.
#
# The candidates compute the same F.linear in the same precision and differ only in rounding: oneDNN's prepacked
# kernel (with GELU or the residual addition as post-ops), MKL's packed sgemm (what Inductor's freezing uses for
# float32; bit-identical to torch's own MKL product) and torch's own product. Which is fastest depends on the CPU
# (oneDNN ~2x MKL on AVX-512 AMD EPYC; MKL ahead on AVX2-only ones) and on the shape, so it is timed once per
# (rows, in, out, dtype, post-op, threads) at the first call that needs it. DYNAMIXER_OPS_PRODUCT=onednn|mkl|aten
# fixes the choice where that candidate can run.

_MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
PRODUCTS = ("onednn", "mkl", "aten")
_PACKED: weakref.WeakKeyDictionary[nn.Linear, dict] = weakref.WeakKeyDictionary()
_CHOICES: dict[tuple, str] = {}


def product_candidates(dtype: torch.dtype) -> list[str]:
    """The products :func:`packed_linear` can run in ``dtype`` on this machine (:data:`PRODUCTS`)."""
    found = ["onednn"] if onednn_dtype_reason(dtype) is None else []
    if dtype == torch.float32:
        found += ["mkl", "aten"] if _MKL_PACKED else ["aten"]
    return found


def packed_linear_reason(dtype: torch.dtype) -> str | None:
    """Why :func:`packed_linear` cannot compute in ``dtype`` here, or None where it can."""
    return None if product_candidates(dtype) else onednn_dtype_reason(dtype)


def _pack(kind: str, w: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    w = w.detach().to(dtype).contiguous()
    if kind == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(w, None)
    if kind == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return w


def _run(kind: str, x: Tensor, packed: Tensor, w: Tensor, b: Tensor | None, rows: int, act: str, algorithm: str,
         residual: Tensor | None) -> Tensor:
    """``residual + act(x @ w.T + b)`` on product ``kind`` (``act``: "none" or "gelu" with ``algorithm``)."""
    if kind == "onednn":
        if residual is not None and residual.dtype == x.dtype and act == "none":
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, b, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, act, [], algorithm)
    else:
        y = torch.ops.mkl._mkl_linear(x, packed, w, b, rows) if kind == "mkl" else F.linear(x, packed, b)
        if act == "gelu":
            y = F.gelu(y, approximate=algorithm)
    return y if residual is None else residual + y


def _fastest(candidates: list[str], rows: int, k: int, n: int, dtype: torch.dtype, act: str, residual: bool) -> str:
    """The fastest of ``candidates`` for this shape and post-op, on random operands (:func:`_quickest`)."""
    g = torch.Generator().manual_seed(0)       # the user's random stream is not touched
    x, w, b = (torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g) / k ** 0.5,
               torch.randn(n, generator=g).to(dtype))
    res = torch.randn(rows, n, generator=g).to(dtype) if residual else None
    packed = {kind: _pack(kind, w, dtype, rows) for kind in candidates}
    return _quickest({kind: functools.partial(_run, kind, x, packed[kind], w, b, rows, act, "none", res)
                      for kind in candidates})


def _product(rows: int, k: int, n: int, dtype: torch.dtype, act: str, residual: bool, product: str | None) -> str:
    """The product to run: ``product`` or DYNAMIXER_OPS_PRODUCT where given (and it can run here), else the one
    timed fastest for this key (timed at its first call)."""
    forced = product or os.environ.get("DYNAMIXER_OPS_PRODUCT")
    key = (rows, k, n, dtype, act, residual, torch.get_num_threads())
    choice = _CHOICES.get(key)
    if forced is None and choice is not None:
        return choice
    candidates = product_candidates(dtype)
    if forced in candidates:
        return forced
    if product is not None:
        raise ValueError(f"packed_linear: product {product!r} cannot run {dtype} here; candidates: {candidates}")
    if choice is None:
        choice = _CHOICES[key] = _fastest(candidates, rows, k, n, dtype, act, residual)
    return choice


def product_choices() -> dict[tuple, str]:
    """The products chosen so far: ``(rows, in, out, dtype, post-op, residual, threads) -> "onednn" | "mkl" |
    "aten"`` (what :func:`packed_linear` runs for each shape it has seen)."""
    return dict(_CHOICES)


def _stamp(w: Tensor, b: Tensor | None) -> tuple:
    return (w._version, w.data_ptr()) + ((-1, 0) if b is None else (b._version, b.data_ptr()))


def _packed(layer: nn.Linear, kind: str, dtype: torch.dtype, rows: int) -> tuple[Tensor, Tensor | None]:
    """``layer``'s weight packed for ``kind`` and its bias in ``dtype``, rebuilt where the Parameters changed."""
    w, b = layer.weight, layer.bias
    cache = _PACKED.get(layer)
    if cache is None:
        cache = _PACKED[layer] = {}
    key = (kind, dtype, rows if kind == "mkl" else 0)
    entry = cache.get(key)
    stamp = _stamp(w, b)
    if entry is not None and entry[0] is w and entry[1] is b and entry[2] == stamp:
        return entry[3], entry[4]
    with torch.no_grad():
        packed = _pack(kind, w, dtype, rows)
        bias = None if b is None else b.detach().to(dtype).contiguous()
    cache[key] = (w, b, stamp, packed, bias)
    return packed, bias


def release(model: nn.Module) -> None:
    """Drop the packed weights of ``model``'s Linears (they are rebuilt at the next inference call)."""
    for m in model.modules():
        _PACKED.pop(m, None)


def packed_linear(layer: nn.Linear, x: Tensor, dtype: torch.dtype, act: str = "none", algorithm: str = "none",
                  residual: Tensor | None = None, product: str | None = None) -> Tensor:
    """``residual + act(layer(x))`` in ``dtype`` with ``layer``'s weight prepacked, on the product fastest for this
    shape here (or ``product``, one of :func:`product_candidates`). For callers that checked that the layer is a
    plain ``nn.Linear`` (:func:`plain_linear`) of ``dtype`` weights and that ``x`` is a plain CPU tensor under
    no_grad (:mod:`dynamixer_ops.inference`)."""
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    kind = _product(rows, k, layer.out_features, dtype, act, residual is not None, product)
    packed, bias = _packed(layer, kind, dtype, rows)
    return _run(kind, x, packed, layer.weight, bias, rows, act, algorithm, residual)
