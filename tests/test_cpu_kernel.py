"""What only the fused C++ CPU kernel has: one code path per instruction set (chosen at run time, forced here with
DYNAMIXER_OPS_CPU_ISA), blocks of sequences and chunked weight-gradient reductions whose partition depends on the
shape only (so results are bitwise identical run to run and for any thread count), and its own contract checks.
The shared grid (test_dynamic_mix.py) covers the default instruction set against the reference."""
from __future__ import annotations

import pytest
import torch

import dynamixer_ops
from dynamixer_ops import dynamic_mix

from helpers import GRAD_NAMES, assert_matches_reference, make_inputs, tolerance

pytestmark = pytest.mark.skipif("cpu" not in dynamixer_ops.available_backends("cpu"),
                                reason="the native CPU backend is not built")

ISAS = ("avx512", "avx2", "generic")


def _use_isa(monkeypatch, isa):
    """Force one instruction set; skip where this CPU lacks it."""
    monkeypatch.setenv("DYNAMIXER_OPS_CPU_ISA", isa)
    x, wc, bc, wg, bg = make_inputs((1,), 2, 2, 1, 1, dtype=torch.float32, device="cpu")
    try:
        dynamic_mix(x, wc, bc, wg, bg, 1, backend="cpu")
    except RuntimeError as exc:
        if "only supports a lower instruction set" in str(exc):
            pytest.skip(f"this CPU has no {isa}")
        raise


def _run(inputs, S, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = dynamic_mix(*leaves, S, backend="cpu")
    return y.detach(), torch.autograd.grad(y, leaves, grad_y)


# (batch shape, L, C, S, d, layout): every vector-width tail (L and C/S of 1..40, not multiples of 16 or 8),
# d = 1..8, and batches that are not a multiple of the block size, nor of the chunk count.
ISA_SHAPES = [
    ((1,), 7, 24, 1, 1, "contiguous"),
    ((5,), 14, 72, 3, 8, "contiguous"),
    ((37,), 32, 192, 8, 2, "contiguous"),
    ((70,), 32, 64, 2, 2, "contiguous"),      # 18 blocks in 16 chunks: chunks of one and two blocks
    ((3, 4), 28, 96, 4, 2, "transposed"),
    ((4,), 5, 3, 3, 1, "sliced"),
    ((2,), 40, 80, 2, 3, "contiguous"),
    ((3,), 1, 8, 8, 2, "contiguous"),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=lambda s: f"N{s[0]}-L{s[1]}-C{s[2]}-S{s[3]}-d{s[4]}-{s[5]}")
def test_every_instruction_set_matches_reference(isa, dtype, shape, monkeypatch, seed):
    _use_isa(monkeypatch, isa)
    batch, L, C, S, d, layout = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu", layout=layout)
    # grad_y with unit channel stride but gaps between rows: the kernel reads it with its strides.
    grad_y = torch.randn(*inputs[0].shape[:-2], L + 1, C + 3, dtype=dtype)[..., 1:, 2:C + 2]
    y, grads = _run(inputs, S, grad_y)
    assert_matches_reference(y, grads, inputs, S, grad_y, tolerance(dtype, "cpu"), prefix=f"{isa} ")


@pytest.mark.parametrize("shape", [((300,), 14, 48, 2, 2), ((70,), 32, 64, 2, 2), ((1,), 16, 32, 2, 8)],
                         ids=["N300-L14", "N70-L32", "N1-L16"])
def test_bitwise_deterministic_across_runs_and_thread_counts(shape, seed):
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=torch.float32, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _run(inputs, S, grad_y), _run(inputs, S, grad_y)
        torch.set_num_threads(1)
        single = _run(inputs, S, grad_y)
    finally:
        torch.set_num_threads(threads)
    for other, what in ((second, "a second run"), (single, "one thread")):
        assert torch.equal(first[0], other[0]), f"y differs bitwise with {what}"
        for name, a, b in zip(GRAD_NAMES, first[1], other[1]):
            assert torch.equal(a, b), f"{name} differs bitwise with {what}"


def test_gradcheck_float64(seed):
    inputs = make_inputs((2,), 5, 6, 2, 2, dtype=torch.float64, device="cpu")
    leaves = [t.detach().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: dynamic_mix(*t, 2, backend="cpu"), leaves)


def test_rejects_unknown_instruction_set(monkeypatch):
    monkeypatch.setenv("DYNAMIXER_OPS_CPU_ISA", "sse9")
    x, wc, bc, wg, bg = make_inputs((1,), 3, 4, 2, 1, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="DYNAMIXER_OPS_CPU_ISA must be avx512, avx2 or generic, got 'sse9'"):
        dynamic_mix(x, wc, bc, wg, bg, 2, backend="cpu")


def test_native_op_checks_its_contract():
    """A direct torch.ops call with a bad buffer fails with a message naming it, not inside the kernel."""
    x, wc, bc, wg, bg = make_inputs((2, 3), 4, 8, 2, 1, dtype=torch.float32, device="cpu")
    ops = torch.ops.dynamixer_ops_C
    with pytest.raises(RuntimeError, match="y must have x's shape"):
        ops.mix_forward(x, wc, bc, wg, bg, 2, torch.empty(2, 3, 4, 9))
    grads = [torch.empty_like(t) for t in (x, wc, bc, wg, bg)]
    with pytest.raises(RuntimeError, match="grad_y must have unit stride"):
        ops.mix_backward(torch.randn(2, 3, 4, 16)[..., ::2], x, wc, bc, wg, bg, 2, *grads)
    grads[3] = torch.empty(wg.shape[1], wg.shape[0]).t()
    with pytest.raises(RuntimeError, match="weight gradients must be contiguous"):
        ops.mix_backward(torch.randn_like(x), x, wc, bc, wg, bg, 2, *grads)


@pytest.mark.skipif(not torch.__config__.parallel_info().count("OpenMP") or not __import__("sys").platform.startswith(
    "linux"), reason="torch's ATen parallel backend is not OpenMP here")
def test_extension_is_built_with_openmp():
    """at::parallel_for is a header template: an extension compiled without -fopenmp runs it on one thread, with
    no error and only a 2x slowdown on two cores to show for it. The built module must link libgomp."""
    from dynamixer_ops.deploy import native_library_path
    with open(native_library_path(), "rb") as f:
        assert b"libgomp.so" in f.read(), f"{native_library_path()} was built without -fopenmp"
