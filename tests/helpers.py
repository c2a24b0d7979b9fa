"""Shared test helpers: random inputs in every layout the op accepts, and an honest comparison."""
from __future__ import annotations

import math

import torch

import dynamixer_ops
from dynamixer_ops.reference import mix_forward
from dynamixer_ops.backends import get_backend

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def backend_device_pairs():
    """Every (backend, device) this machine can run: the grid's first axis."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(name, dev) for dev in devices for name in dynamixer_ops.available_backends(dev)]


def supported_dtypes(backend: str, device: str):
    return [t for t in DTYPES if get_backend(backend).why_not(device, t) is None]


def tolerance(dtype: torch.dtype, device: str) -> float:
    """||out - ref|| / ||ref|| bounds from DYNAMIC_MIX.md (bf16 also covers the interpreter's truncating stores)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5 if device == "cpu" else 2e-3     # GPU dots may run in tf32
    return 1e-2


def make_inputs(num_seq_shape, L, C, S, d, *, dtype, device, layout="contiguous", bias=True, logit_scale=2.0):
    """Random inputs (never zeros). ``layout``:

    * "contiguous": x is (*num_seq_shape, L, C), contiguous;
    * "transposed": x is a (B, H=L, W, C) tensor viewed as (B, W, L, C) (mixing along H, no copy);
    * "sliced": x is a channel- and token-sliced view with a gap between rows.
    """
    if layout == "contiguous":
        x = torch.randn(*num_seq_shape, L, C, dtype=dtype, device=device)
    elif layout == "transposed":
        B, W = num_seq_shape
        x = torch.randn(B, L, W, C, dtype=dtype, device=device).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(*num_seq_shape, L + 2, C + 5, dtype=dtype, device=device)[..., 1:L + 1, 3:C + 3]
    else:
        raise ValueError(layout)
    # Scales chosen so that the logits are O(logit_scale): a softmax that is neither uniform nor one-hot.
    compress_weight = torch.randn(S * d, C, dtype=dtype, device=device) / math.sqrt(C)
    generate_weight = torch.randn(L * L, L * d, dtype=dtype, device=device) * (logit_scale / math.sqrt(L * d))
    compress_bias = torch.randn(S * d, dtype=dtype, device=device) * 0.5 if bias else None
    generate_bias = torch.randn(L * L, dtype=dtype, device=device) * 0.5 if bias else None
    return x, compress_weight, compress_bias, generate_weight, generate_bias


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return math.inf          # NaN (e.g. an unwritten, poisoned element) never passes
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Pass when ||out - ref|| / ||ref|| <= tol; otherwise say where and by how much the values differ."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    err = relative_error(out, ref)
    if err <= tol:
        return
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out64 - ref64).abs().nan_to_num(math.inf)
    worst = diff.flatten().argmax().item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape))
    nonfinite = (~torch.isfinite(out64)).sum().item()
    raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}; worst at {index}: got "
                         f"{out64[index].item():.6g}, expected {ref64[index].item():.6g}; "
                         f"{nonfinite} non-finite element(s) of {out.numel()}")


def assert_all_close(y, grads, ref_y, ref_grads, tol: float, names=None, prefix: str = "") -> None:
    """``y`` and every gradient within ``tol`` of the reference (:func:`assert_close_rel`), each gradient in
    ``y``'s dtype. ``names`` label the gradients (default: all five, in the op's argument order)."""
    names = GRAD_NAMES if names is None else names
    assert len(grads) == len(ref_grads) == len(names), f"{len(grads)} gradients, {len(ref_grads)} expected"
    assert_close_rel(y, ref_y, tol, prefix + "y")
    for name, g, ref in zip(names, grads, ref_grads):
        assert g.dtype == y.dtype, f"{prefix}{name}: dtype {g.dtype}, expected {y.dtype}"
        assert_close_rel(g, ref, tol, prefix + name)


def assert_matches_reference(y, grads, inputs, num_segments, grad_y, tol: float, prefix: str = "") -> None:
    """``y`` (in x's dtype) and the gradients of the inputs that are not None against the float64 reference on
    the same inputs and ``grad_y``."""
    assert y.dtype == inputs[0].dtype, f"{prefix}y: dtype {y.dtype}, expected x's {inputs[0].dtype}"
    ref_y, ref_grads = reference_outputs(inputs, num_segments, grad_y)
    names = [name for name, t in zip(GRAD_NAMES, inputs) if t is not None]
    assert_all_close(y, grads, ref_y, ref_grads, tol, names, prefix)


def reference_outputs(inputs, num_segments, grad_y):
    """Forward and the five gradients, by autograd of the reference math in float64 on the CPU."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in inputs]
    y = mix_forward(*leaves, num_segments)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, grad_y.double().cpu())
    return y.detach(), grads


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


def assert_close_floor(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, floor: float) -> None:
    """``||out - ref|| <= tol * max(||ref||, floor)``: for values that are zero in exact arithmetic (their reference
    is rounding noise), ``floor`` is the norm the same quantity has at generic inputs of the same magnitudes."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: {(~torch.isfinite(out64)).sum().item()} non-finite element(s)"
    err = (out64 - ref64).norm().item()
    bound = tol * max(ref64.norm().item(), floor)
    assert err <= bound, f"{what}: ||out - ref|| = {err:.3e} > {bound:.3e} (||ref|| = {ref64.norm().item():.3e}, floor {floor:.3e})"


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
