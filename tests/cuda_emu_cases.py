"""The emulated CUDA kernels' test cases and how one runs (tools/cuda_emu/emu.h), shared by test_cuda_kernel.py
and test_cuda_barriers.py: every forward + backward runs under several thread and block orders (racecheck)."""
from __future__ import annotations

import os

import torch

from dynamixer_ops.testing import assert_matches_reference, make_inputs, odd_shapes, tolerance

H100_SMEM_OPTIN = 232448      # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 (227 KB)

# name -> (batch shape, L, C, S, d): dynamixer_ops.testing's "cuda" odd shapes, the CUDA kernels' own edges.
KERNEL_SHAPES = {shape.name: shape.sizes for shape in odd_shapes("cuda")}

# fp32 twice: exact (SIMT) and with tf32 allowed (tensor cores, tf32 tolerance as on a GPU).
EMU_DTYPES = {"float32": (torch.float32, False), "float32-tf32": (torch.float32, True),
              "float16": (torch.float16, False), "bfloat16": (torch.bfloat16, False)}

# The thread and block orders of every emulated call. The first records the shared memory at every barrier, the
# others must reproduce it and every output bitwise. Ascending and descending put every pair of threads (and of
# blocks) in both orders; the shuffle mixes the warps.
# DYNAMIXER_OPS_TEST_CUDA_EMU_ORDERS=1 keeps the first only (no racecheck): .ci/sanitize's AddressSanitizer run,
# whose question is another.
ALL_SCHEDULES = (("ascending", 0), ("descending", 0), ("shuffled", 1))
SCHEDULES = ALL_SCHEDULES[:int(os.environ.get("DYNAMIXER_OPS_TEST_CUDA_EMU_ORDERS", len(ALL_SCHEDULES)))]

OUTPUT_NAMES = ("y", "grad_x", "grad_compress_weight", "grad_compress_bias", "grad_generate_weight",
                "grad_generate_bias")


def emulated_tolerance(dtype, tf32):
    return tolerance(dtype, "cuda" if tf32 else "cpu")


def expected_path(emu, kernel, x, S, d, smem_limit, tf32):
    """"tensor_cores" where the CUDA build takes them (fp16/bf16, fp32 with tf32 allowed; where the tiles fit)."""
    tc_bytes = emu.smem_bytes(kernel, x.shape[2], x.shape[3], S, d, x.element_size())
    return "tensor_cores" if (x.dtype != torch.float32 or tf32) and tc_bytes <= smem_limit else "simt"


def run_emulator(emu, x, gy, weights, S, smem_limit, tf32):
    """(forward path, backward path, [y, five gradients]) of one emulated forward + backward; outputs start as NaN
    (y and grad_x: full_like keeps a dense x's strides, as ops.py's empty_like does)."""
    y = torch.full_like(x, float("nan"))
    forward_path = emu.forward(x, *weights, S, y, smem_limit, tf32)
    grads = [torch.full_like(x, float("nan"))] + [torch.full_like(w, float("nan")) for w in weights]
    backward_path = emu.backward(gy, x, *weights, S, *grads, smem_limit, tf32)
    return forward_path, backward_path, [y, *grads]


def first_difference(a, b):
    differs = (a != b) & ~(a.isnan() & b.isnan())
    if not differs.any():
        differs = a.isnan() != b.isnan()
    index = tuple(int(i) for i in differs.nonzero()[0])
    return f"first at {index}: {a[index].item()} vs {b[index].item()}"


def run_racechecked(emu, x, gy, weights, S, smem_limit=H100_SMEM_OPTIN, tf32=False):
    """:func:`run_emulator` under every order of SCHEDULES. The first run records the shared memory at every barrier
    of every block, the others compare theirs with it (the emulator raises at the first difference, naming kernel,
    block, barrier line and bytes), and every output must be bitwise identical (a block order that changes an
    output is a race on global memory). Returns the first run's results."""
    results = []
    try:
        for i, (order, seed) in enumerate(SCHEDULES):
            emu.set_schedule(order, seed, "record" if i == 0 else "compare")
            results.append(run_emulator(emu, x, gy, weights, S, smem_limit, tf32))
    finally:
        emu.set_schedule("ascending", 0, "off")
    first = results[0]
    for (order, seed), other in zip(SCHEDULES[1:], results[1:]):
        assert other[:2] == first[:2]
        for name, a, b in zip(OUTPUT_NAMES, first[2], other[2]):
            same = torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
            assert same, (f"racecheck: {name} differs between the thread and block orders {SCHEDULES[0][0]} and "
                          f"{order}({seed}), {first_difference(a, b)}: a race on global memory (two blocks write "
                          f"one element, or one reads what another writes) or on shared memory")
    return first


def emulate(emu, inputs, S, grad_y, smem_limit=H100_SMEM_OPTIN, tf32=False):
    """y and the five gradients from the emulated kernels, racechecked (:func:`run_racechecked`). Asserts that
    forward and backward took the tensor-core path exactly where the CUDA build takes it."""
    x, gy = inputs[0], grad_y
    if x.dim() == 3:
        x, gy = x.unsqueeze(0), gy.unsqueeze(0)
    weights = [t.contiguous() for t in inputs[1:]]
    forward_path, backward_path, (y, *grads) = run_racechecked(emu, x, gy, weights, S, smem_limit, tf32)
    d = inputs[3].shape[1] // x.shape[2]
    assert forward_path == expected_path(emu, "forward_tc", x, S, d, smem_limit, tf32)
    assert backward_path == expected_path(emu, "backward_tc", x, S, d, smem_limit, tf32)
    return y.reshape(inputs[0].shape), [grads[0].reshape(inputs[0].shape), *grads[1:]]


def check_case(emu, shape, dtype_name):
    """One case of the default emulated checks: fresh inputs, racechecked forward + backward, float64 reference."""
    dtype, tf32 = EMU_DTYPES[dtype_name]
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = emulate(emu, inputs, S, grad_y, tf32=tf32)
    assert y.dtype == dtype
    assert_matches_reference(y, grads, inputs, S, grad_y, emulated_tolerance(dtype, tf32), tf32=tf32)
