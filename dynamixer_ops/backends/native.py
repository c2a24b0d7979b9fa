"""The ``cpu`` and ``cuda`` backends: the C++ kernels of the native library ``dynamixer_ops/_C*.so`` and the CUDA
kernels of ``dynamixer_ops/_C_cuda*.so``.

Both are implementations (CPU and CUDA dispatch keys) of the native out-variant ops
``dynamixer_ops_C::dynamic_mix_out`` and ``dynamixer_ops_C::dynamic_mix_backward_out``; the ``cpu`` backend also of
``dynamic_mix_keep_out`` and ``dynamic_mix_backward_kept_out`` (schemas in ``csrc/dynamic_mix.cpp``).
"""
from __future__ import annotations

import torch

from .._library import CUDA_LOAD_ERROR, LOAD_ERROR as _BUILD_ERROR
from . import Backend, record_load_error, register_backend


def _has_kernel(dispatch_key: str) -> bool:
    return _KERNEL_REGISTERED.get(dispatch_key, False)


# Looked up once: the kernels are registered when _C loads, and torch.compile cannot trace the lookup itself.
_KERNEL_REGISTERED = {} if _BUILD_ERROR else {
    key: torch._C._dispatch_has_kernel_for_dispatch_key("dynamixer_ops_C::dynamic_mix_out", key)
    for key in ("CPU", "CUDA")}


def _cuda_unavailable_reason() -> str | None:
    if _BUILD_ERROR:
        return _BUILD_ERROR
    if CUDA_LOAD_ERROR:
        return CUDA_LOAD_ERROR
    if not _has_kernel("CUDA"):
        return "dynamixer_ops/_C_cuda registered no CUDA kernel"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


if _BUILD_ERROR:
    record_load_error("cpu", _BUILD_ERROR)
    record_load_error("cuda", _BUILD_ERROR)
else:
    _ops = torch.ops.dynamixer_ops_C
    if not CUDA_LOAD_ERROR:
        # The CUDA kernels ask this op, at each fp32 call, whether torch allows tf32 for CUDA matmuls (libtorch's
        # stable ABI does not expose the flag; the library's own kernel answers false, for processes without Python).
        torch.library.impl("dynamixer_ops_C::cuda_matmul_allow_tf32", "CUDA")(
            lambda x: torch.backends.cuda.matmul.allow_tf32)
    register_backend(Backend(
        name="cpu", forward=_ops.dynamic_mix_out, backward=_ops.dynamic_mix_backward_out, devices=("cpu",),
        # bf16/fp16 sum in float32; bf16's products run on AVX512-BF16 dots where the CPU has them, and are staged
        # through float32 elsewhere. fp16
        # has no dot instruction here; it is registered because the staged fused kernel beats `reference`.
        dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), priority={"cpu": 0},
        unavailable_reason=lambda: None if _has_kernel("CPU") else "dynamixer_ops._C has no CPU kernel",
        # From d = 4 on the generate GEMM (L*d deep) dominates the backward's recompute of P: keeping P (N*S*L*L
        # values of the compute type) is worth its memory. Measured at DynaMixer-L stage 1 (d = 8):
        # benchmarks/RESULTS.md.
        forward_keep=_ops.dynamic_mix_keep_out, backward_kept=_ops.dynamic_mix_backward_kept_out,
        keep_probabilities=lambda L, C, S, d: d >= 4,
    ))
    register_backend(Backend(
        name="cuda", forward=_ops.dynamic_mix_out, backward=_ops.dynamic_mix_backward_out, devices=("cuda",),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        # First on CUDA until a GPU measurement says otherwise (README, "What has run where"). By
        # design (benchmarks/RESULTS.md, "CUDA tensor-core kernels: a prediction"): every product runs on tensor
        # cores (WMMA; HMMA seen in the sm_80/sm_90 SASS), and the forward reads x once per block for all segments
        # and Wg once per 16 (sequence, segment) rows, so at the model shapes it predicts the copy floor (x read
        # once, y written once) except DynaMixer-L stage 1; Triton's forward has the same DRAM bytes but re-reads x
        # from L2 once per segment. Triton's backward writes no dG (it recomputes the generate product twice more
        # instead): fewer bytes, more FLOPs. No design reason to swap the order before a measurement.
        priority={"cuda": 10},
        unavailable_reason=_cuda_unavailable_reason,
    ))
