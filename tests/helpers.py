"""Test-only glue: the grid's axes, comparisons that say where values differ, and small runners. The facts that
benchmarks share (shapes, inputs, the float64 reference, relative error, tolerances) live in
:mod:`dynamixer_ops.testing` and are re-exported here for the tests."""
from __future__ import annotations

import math

import torch

import dynamixer_ops
from dynamixer_ops.backends import get_backend
from dynamixer_ops.reference import backward_terms, segments, unsegment
from dynamixer_ops.testing import make_inputs, reference_outputs, relative_error, tolerance  # noqa: F401  (re-exported)

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def backend_device_pairs():
    """Every (backend, device) this machine can run: the grid's first axis."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(name, dev) for dev in devices for name in dynamixer_ops.available_backends(dev)]


def supported_dtypes(backend: str, device: str):
    return [t for t in DTYPES if get_backend(backend).why_not(device, t) is None]


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    """Pass when ||out - ref|| / max(||ref||, floor) <= tol; otherwise say where and by how much the values differ.
    ``floor``: for values whose exact result cancels (see :func:`rounding_scales`), the norm that float rounding
    error scales with."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    err = relative_error(out, ref, floor)
    if err <= tol:
        return
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out64 - ref64).abs().nan_to_num(math.inf)
    worst = diff.flatten().argmax().item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape))
    nonfinite = (~torch.isfinite(out64)).sum().item()
    relative_to = f" (relative to the floor {floor:.3e} > ||ref||)" if floor > ref64.norm().item() else ""
    raise AssertionError(f"{what}: relative error{relative_to} {err:.3e} > {tol:.1e}; worst at {index}: got "
                         f"{out64[index].item():.6g}, expected {ref64[index].item():.6g}; "
                         f"{nonfinite} non-finite element(s) of {out.numel()}")


def assert_all_close(y, grads, ref_y, ref_grads, tol: float, names=None, prefix: str = "", floors=None) -> None:
    """``y`` and every gradient within ``tol`` of the reference (:func:`assert_close_rel`), each gradient in
    ``y``'s dtype. ``names`` label the gradients (default: all five, in the op's argument order); ``floors``:
    one per output, ``y`` first (default: none)."""
    names = GRAD_NAMES if names is None else names
    floors = [0.0] * (1 + len(grads)) if floors is None else floors
    assert len(grads) == len(ref_grads) == len(names), f"{len(grads)} gradients, {len(ref_grads)} expected"
    assert_close_rel(y, ref_y, tol, prefix + "y", floors[0])
    for name, g, ref, floor in zip(names, grads, ref_grads, floors[1:]):
        assert g.dtype == y.dtype, f"{prefix}{name}: dtype {g.dtype}, expected {y.dtype}"
        assert_close_rel(g, ref, tol, prefix + name, floor)


# Floors are this fraction of the rounding scales: an output whose exact result cancels by less than 10x is held to
# tol * ||ref|| exactly as before; only heavier cancellation is measured against the scale its rounding has.
CANCELLATION_FLOOR = 0.1
# Where the kernels round the operands of their products (bf16/fp16 inputs: the CPU's bf16 dots, tensor cores; fp32
# with tf32 dots), the gradients come out of a chain of such products (G, dP, dG -> dz, the sums), so their error is
# a few units of that rounding times the whole scale, not a tenth of it: held to the tolerance relative to the
# whole scale. Seen: dbc of a 1 x 1 bf16 problem 1.8e-3 of its scale on the avx512bf16 path (seed 3019233647), and
# dbc 2.0e-4 of it with tf32 operands (seed 2306332305), each past tol x 0.1 x scale.
ROUNDED_OPERANDS_FLOOR = 1.0


def cancellation_floor(dtype: torch.dtype, tf32: bool = False) -> float:
    return ROUNDED_OPERANDS_FLOOR if tf32 or dtype in (torch.float16, torch.bfloat16) else CANCELLATION_FLOOR


def rounding_scales(inputs, num_segments, grad_y):
    """Per output (y, then the five gradients), the norm its float rounding error scales with: the same last
    product or sum with every term made positive (float64, from the reference's intermediates). Where an exact
    result cancels (a weight gradient of one element summed over 37 tokens, say), ``||ref||`` is far below that
    scale and any summation order misses it by more than ``tol * ||ref||``: seen at 1.2e-5 for a 1 x 1 dWc."""
    x, wc, bc, wg, bg = [t.detach().double().cpu() if t is not None else None for t in inputs]
    S, L = num_segments, x.shape[-2]
    z, P, dG, dr, dys = backward_terms(grad_y.detach().double().cpu(), x, wc, bc, wg, bg, S)
    dG_rows, z_rows = dG.reshape(-1, L * L).abs(), z.reshape(-1, z.shape[-1]).abs()
    dr_rows, x_rows = dr.reshape(-1, dr.shape[-1]).abs(), x.reshape(-1, x.shape[-1]).abs()
    y_abs = unsegment(P.transpose(-1, -2) @ segments(x.abs(), S))               # P >= 0
    dx_abs = unsegment(P @ dys.abs()) + dr.abs() @ wc.abs()
    scales = (y_abs, dx_abs, dr_rows.T @ x_rows, dr_rows.sum(0), dG_rows.T @ z_rows, dG_rows.sum(0))
    return [s.norm().item() for s in scales]


def assert_matches_reference(y, grads, inputs, num_segments, grad_y, tol: float, prefix: str = "",
                             tf32: bool = False) -> None:
    """``y`` (in x's dtype) and the gradients of the inputs that are not None against the float64 reference on
    the same inputs and ``grad_y``, each relative to max(its reference's norm, :func:`cancellation_floor` times its
    :func:`rounding_scales`). ``tf32``: the kernels ran float32 products on tf32 operands."""
    assert y.dtype == inputs[0].dtype, f"{prefix}y: dtype {y.dtype}, expected x's {inputs[0].dtype}"
    ref_y, ref_grads = reference_outputs(inputs, num_segments, grad_y)
    present = [True] + [t is not None for t in inputs]
    names = [name for name, there in zip(GRAD_NAMES, present[1:]) if there]
    fraction = cancellation_floor(inputs[0].dtype, tf32)
    floors = [fraction * f for f, there in zip(rounding_scales(inputs, num_segments, grad_y), present)
              if there]
    assert_all_close(y, grads, ref_y, ref_grads, tol, names, prefix, floors)


# ---- Additions for the reliability tests (properties, extremes, misuse, determinism) ----

GRAD_NAMES = ("dx", "d compress_weight", "d compress_bias", "d generate_weight", "d generate_bias")


def is_interpreted(backend: str, device: str) -> bool:
    """True where the backend's kernels run in the Triton interpreter (every program executed in Python)."""
    import os
    return backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_dtype_triples():
    """Every (backend, device, dtype) this machine can run, as pytest ids ``backend-device-dtype``."""
    return [(b, dev, t) for b, dev in backend_device_pairs() for t in supported_dtypes(b, dev)]


def triple_id(triple) -> str:
    backend, device, dtype = triple
    return f"{backend}-{device}-{str(dtype).replace('torch.', '')}"


def op_outputs(inputs, num_segments, grad_y, backend):
    """``y`` and the gradients of every input that is not None, through the public op."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    y = dynamixer_ops.dynamic_mix(*leaves, num_segments, backend=backend)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)
    return y.detach(), grads


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """NaN/Inf propagate as in the reference: ``out`` is non-finite exactly where ``ref`` is, and the finite
    elements agree with the reference (relative error over the finite elements)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    bad_out, bad_ref = ~torch.isfinite(out64), ~torch.isfinite(ref64)
    if not torch.equal(bad_out, bad_ref):
        extra = (bad_out & ~bad_ref).nonzero()
        missing = (bad_ref & ~bad_out).nonzero()
        raise AssertionError(f"{what}: non-finite pattern differs from the reference: {len(extra)} element(s) "
                             f"non-finite only in the output (first {extra[:3].tolist()}), {len(missing)} only in "
                             f"the reference (first {missing[:3].tolist()})")
    finite = ~bad_ref
    if finite.any():
        assert_close_rel(out64[finite], ref64[finite], tol, f"{what} (finite elements)")


class torch_threads:
    """``with torch_threads(n):`` runs with ``n`` intra-op threads and restores the previous count afterwards.

    On a 2-core machine that other jobs keep busy, two OpenMP threads make each small op wait at barriers (measured
    here: 100x slower per call), so the reliability tests run single-threaded except where threads are the subject.
    """

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)
        return False
