"""Test-only glue: the grid's axes and small runners. The facts that benchmarks share (shapes, inputs, the
float64 reference and the pass rule: relative error, tolerances, rounding floors, the asserts that apply them)
live in :mod:`dynamixer_ops.testing`; the tests import them from there."""
from __future__ import annotations

import torch

import dynamixer_ops
from dynamixer_ops.backends import env_flag, get_backend
from dynamixer_ops.testing import assert_close_rel

# Every dtype the op accepts: the grid's dtype axis, cut per backend by supported_dtypes.
GRID_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def backend_device_pairs():
    """Every (backend, device) this machine can run: the grid's first axis."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(name, dev) for dev in devices for name in dynamixer_ops.available_backends(dev)]


def supported_dtypes(backend: str, device: str):
    return [t for t in GRID_DTYPES if get_backend(backend).why_not(device, t) is None]


def is_interpreted(backend: str, device: str) -> bool:
    """True where the backend's kernels run in the Triton interpreter (every program executed in Python)."""
    return backend == "triton" and device == "cpu" and env_flag("TRITON_INTERPRET")


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


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Wrap ``owner.<name>`` (for the test's duration) so that its calls are counted in the returned ``[n]``."""
    count = [0]
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counting)
    return count
