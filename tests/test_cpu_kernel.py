"""What only the fused C++ CPU kernel has: one code path per instruction set (chosen at run time, forced here with
DYNAMIXER_OPS_CPU_ISA; bfloat16 runs its products on the bf16 dot instruction on avx512bf16 (all of them where C/S is
even) and is staged through float32 elsewhere, float16 is staged everywhere), blocks of sequences and chunked
weight-gradient reductions whose partition depends on the shape only (so results are bitwise identical run to run and
for any thread count), and its own contract checks. The shared grid (test_dynamic_mix.py) covers the default
instruction set against the reference."""
from __future__ import annotations

import os

import pytest
import torch

import dynamixer_ops
from dynamixer_ops import dynamic_mix


from dynamixer_ops.testing import (CPU_ISAS, GRAD_NAMES, assert_close_rel, assert_matches_reference,
                                   cpu_isa_missing, make_inputs, odd_shapes, relative_error, tolerance)

pytestmark = pytest.mark.skipif("cpu" not in dynamixer_ops.available_backends("cpu"),
                                reason="the native CPU backend is not built")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _use_isa(monkeypatch, isa):
    """Force one instruction set; skip where this CPU lacks it, or where DYNAMIXER_OPS_CPU_ISA rehearses a CPU that
    lacks it."""
    missing = cpu_isa_missing(isa)
    if missing:
        pytest.skip(missing)
    monkeypatch.setenv("DYNAMIXER_OPS_CPU_ISA", isa)


def _run(inputs, S, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = dynamic_mix(*leaves, S, backend="cpu")
    return y.detach(), torch.autograd.grad(y, leaves, grad_y)


# dynamixer_ops.testing's "cpu" odd shapes: every vector-width tail on every instruction set.
ISA_SHAPES = odd_shapes("cpu")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=lambda s: s.name)
def test_every_instruction_set_matches_reference(isa, dtype, shape, monkeypatch, seed):
    _use_isa(monkeypatch, isa)
    batch, L, C, S, d = shape.sizes
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu", layout=shape.layout)
    # grad_y with unit channel stride but gaps between rows: the kernel reads it with its strides.
    grad_y = torch.randn(*inputs[0].shape[:-2], L + 1, C + 3, dtype=dtype)[..., 1:, 2:C + 2]
    y, grads = _run(inputs, S, grad_y)
    assert_matches_reference(y, grads, inputs, S, grad_y, tolerance(dtype, "cpu"), prefix=f"{isa} ")


@pytest.mark.parametrize("isa", [None, "avx512"], ids=["best", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [((300,), 14, 48, 2, 2), ((70,), 32, 64, 2, 2), ((1,), 16, 32, 2, 8)],
                         ids=["N300-L14", "N70-L32", "N1-L16"])
def test_bitwise_deterministic_across_runs_and_thread_counts(shape, dtype, isa, seed, monkeypatch):
    """On this CPU's best instruction set (avx512bf16 runs bfloat16 on its dot instruction) and on the staged
    float32 path of another."""
    if isa is not None:
        _use_isa(monkeypatch, isa)
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu")
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
    with pytest.raises(RuntimeError,
                       match="DYNAMIXER_OPS_CPU_ISA must be avx512bf16, avx512, avx2 or generic, got 'sse9'"):
        dynamic_mix(x, wc, bc, wg, bg, 2, backend="cpu")


def test_rehearsing_a_cpu_with_fewer_instruction_sets():
    """DYNAMIXER_OPS_CPU_ISA=<set> as a session starts rehearses a CPU whose best set is that one (the suite and
    .ci/sanitize: DYNAMIXER_OPS_CPU_ISA=avx2 on an AVX-512 CPU shows what an AVX2 CPU will see): the sets above it
    are missing, with the reason the tests skip with and .ci/sanitize prints, and the rest are as on this CPU. A
    fresh process, as a session starts: generic, the set every CPU has."""
    import subprocess
    import sys
    code = ("from dynamixer_ops.testing import CPU_ISAS, REHEARSED_CPU_ISA, cpu_isa_missing\n"
            "print(REHEARSED_CPU_ISA, [cpu_isa_missing(isa) for isa in CPU_ISAS])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                         env={**os.environ, "DYNAMIXER_OPS_CPU_ISA": "generic"})
    assert out.returncode == 0, out.stderr
    expected = [f"no {isa} here: DYNAMIXER_OPS_CPU_ISA=generic rehearses a CPU without it" for isa in CPU_ISAS[:-1]]
    assert out.stdout.strip() == f"generic {expected + [None]}"
    for rehearsed in CPU_ISAS:
        for isa in CPU_ISAS:
            above = CPU_ISAS.index(isa) < CPU_ISAS.index(rehearsed)
            assert cpu_isa_missing(isa, rehearsed) == (
                f"no {isa} here: DYNAMIXER_OPS_CPU_ISA={rehearsed} rehearses a CPU without it" if above
                else cpu_isa_missing(isa, None))
    assert cpu_isa_missing("generic", None) is None
    with pytest.raises(ValueError, match="DYNAMIXER_OPS_CPU_ISA must be one of avx512bf16, avx512, avx2, generic, "
                                         "got 'sse9'"):
        cpu_isa_missing("generic", "sse9")


def test_native_op_checks_its_contract():
    """A direct torch.ops call with a bad buffer fails with a message naming it, not inside the kernel."""
    x, wc, bc, wg, bg = make_inputs((2, 3), 4, 8, 2, 1, dtype=torch.float32, device="cpu")
    ops = torch.ops.dynamixer_ops_C
    with pytest.raises(RuntimeError, match="y must have x's shape"):
        ops.dynamic_mix_out(x, wc, bc, wg, bg, 2, torch.empty(2, 3, 4, 9))
    grads = [torch.empty_like(t) for t in (x, wc, bc, wg, bg)]
    with pytest.raises(RuntimeError, match="grad_y must have unit stride"):
        ops.dynamic_mix_backward_out(torch.randn(2, 3, 4, 16)[..., ::2], x, wc, bc, wg, bg, 2, *grads)
    grads[3] = torch.empty(wg.shape[1], wg.shape[0]).t()
    with pytest.raises(RuntimeError, match="weight gradients must be contiguous"):
        ops.dynamic_mix_backward_out(torch.randn_like(x), x, wc, bc, wg, bg, 2, *grads)


def _forward_with_bf16_operands(x, compress_weight, compress_bias, generate_weight, generate_bias, S):
    """y as the all-dots path computes it: every product in float32 on bf16 operands (x and the weights as given,
    z and e^(G - max) rounded to bf16), the softmax's sums and scale in float32."""
    to32 = lambda t: t.float()                          # noqa: E731
    rounded = lambda t: t.to(torch.bfloat16).float()    # noqa: E731
    N, L, C = x.shape
    d = compress_weight.shape[0] // S
    r = to32(x) @ to32(compress_weight).T
    z = (r + to32(compress_bias)).view(N, L, S, d).permute(0, 2, 1, 3).reshape(N, S, L * d)
    logits = (rounded(z) @ to32(generate_weight).T + to32(generate_bias)).view(N, S, L, L)   # [i][j]
    e = torch.exp(logits - logits.amax(dim=2, keepdim=True))
    inv = 1 / e.sum(dim=2)
    segments = to32(x).view(N, L, S, C // S).permute(0, 2, 1, 3)
    y = torch.einsum("nsij,nsie->nsje", rounded(e), segments) * inv[..., None]
    return y.permute(0, 2, 1, 3).reshape(N, L, C)


@pytest.mark.parametrize("shape", [((37,), 32, 192, 8, 2), ((9,), 7, 24, 1, 3), ((5,), 14, 72, 3, 8)],
                         ids=["s1", "L7-Sd3", "d8"])
def test_bfloat16_dots_round_every_product_operand(shape, monkeypatch, seed):
    """On avx512bf16 every product of bfloat16 inputs with C/S even runs on the bf16 dots: y is, to within a few
    bf16 ulps flipped by float32 summation order, the bf16-operand computation (z and e^(G - max) rounded), while
    the staged float32 path (and a kernel that kept e^(G - max) in float32) sits ~1e-3 from it. Measured: the dots
    0 to 1.3e-4, the staged path 2.3e-3 to 3.1e-3, float32 e^(G - max) 1.2e-3 to 1.5e-3."""
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=torch.bfloat16, device="cpu")
    expected = _forward_with_bf16_operands(*inputs, S).to(torch.bfloat16).float()
    _use_isa(monkeypatch, "avx512bf16")
    dots = dynamic_mix(*inputs, S, backend="cpu").float()
    assert relative_error(dots, expected) < 5e-4
    _use_isa(monkeypatch, "generic")
    assert relative_error(dynamic_mix(*inputs, S, backend="cpu").float(), expected) > 1e-3


def test_bfloat16_paths_differ_only_by_rounding(monkeypatch, seed):
    """The bf16-dot path (every product's operands rounded to bf16) and the staged float32 path compute the same
    function, forward and backward: within the bf16 tolerance of each other, and not bitwise equal where this CPU
    has avx512bf16 (else the forced path would not be the dot path at all)."""
    inputs = make_inputs((37,), 32, 192, 8, 2, dtype=torch.bfloat16, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    results = {}
    for isa in ("avx512bf16", "generic"):
        _use_isa(monkeypatch, isa)
        results[isa] = _run(inputs, 8, grad_y)
    dots, staged = results["avx512bf16"], results["generic"]
    assert not torch.equal(dots[0], staged[0]), "avx512bf16 gave the staged path's bits: the dots did not run"
    for name, a, b in zip(("y",) + GRAD_NAMES, (dots[0], *dots[1]), (staged[0], *staged[1])):
        assert_close_rel(a, b, tolerance(torch.bfloat16, "cpu"), f"{name}: dots against staged")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_auto_and_autocast_run_the_cpu_kernel_on_16_bit_inputs(dtype, seed):
    """backend="auto" resolves to "cpu" for 16-bit CPU inputs, so torch.autocast("cpu", dtype) (which casts the
    inputs) runs the fused kernel: bitwise the explicit backend="cpu" on the cast inputs."""
    assert dynamixer_ops.backends.resolve_backend("auto", "cpu", dtype).name == "cpu"
    inputs = make_inputs((3,), 14, 48, 2, 2, dtype=torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=dtype):
        y = dynamic_mix(*inputs, 2)
    assert y.dtype == dtype
    assert torch.equal(y, dynamic_mix(*(t.to(dtype) for t in inputs), 2, backend="cpu"))


@pytest.mark.parametrize("isa", ["avx512bf16", "generic"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [((37,), 14, 72, 3, 8, "contiguous"), ((3, 4), 7, 48, 2, 4, "transposed")],
                         ids=["d8", "d4-transposed"])
def test_kept_probabilities_give_the_recomputed_results_bitwise(shape, dtype, isa, monkeypatch, seed):
    """From d = 4 the training step keeps P from the forward (dynamixer_ops::dynamic_mix_keep) instead of recomputing
    it in the backward: the same P bit for bit (every matrix's arithmetic is independent of the blocking), so the
    same y and gradients as the recomputing op pair."""
    _use_isa(monkeypatch, isa)
    batch, L, C, S, d, layout = shape
    assert dynamixer_ops.backends.get_backend("cpu").keep_probabilities(L, C, S, d)
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu", layout=layout)
    grad_y = torch.randn_like(inputs[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, grads = _run(inputs, S, grad_y)
    names = {e.name for e in prof.events()}
    assert "dynamixer_ops::dynamic_mix_keep" in names and "dynamixer_ops::dynamic_mix_backward_kept" in names
    x4 = inputs[0].reshape(-1, 1, L, C) if layout == "contiguous" else inputs[0]
    y_plain = torch.ops.dynamixer_ops.dynamic_mix(x4, *inputs[1:], S, "cpu")
    grads_plain = torch.ops.dynamixer_ops.dynamic_mix_backward(grad_y.reshape(x4.shape), x4, *inputs[1:], S, "cpu")
    assert torch.equal(y, y_plain.reshape(y.shape))
    for name, kept, plain in zip(GRAD_NAMES, grads, grads_plain):
        assert torch.equal(kept, plain.reshape(kept.shape)), name


def test_inference_and_small_d_recompute(seed):
    """No P is kept without autograd (inference) nor where d < 4 (recomputing it is cheap there)."""
    backend = dynamixer_ops.backends.get_backend("cpu")
    assert not backend.keep_probabilities(32, 192, 8, 2)
    inputs = make_inputs((3,), 14, 72, 3, 8, dtype=torch.float32, device="cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            dynamic_mix(*inputs, 3, backend="cpu")
        leaves = [t.requires_grad_() for t in make_inputs((3,), 14, 48, 3, 2, dtype=torch.float32, device="cpu")]
        dynamic_mix(*leaves, 3, backend="cpu").sum().backward()
    assert "dynamixer_ops::dynamic_mix_keep" not in {e.name for e in prof.events()}


def test_kept_probabilities_of_the_wrong_shape_or_dtype_are_refused(seed):
    x, wc, bc, wg, bg = make_inputs((1,), 7, 48, 2, 4, dtype=torch.bfloat16, device="cpu")
    x4 = x.unsqueeze(0)
    outs = [torch.empty_like(t) for t in (x4, wc, bc, wg, bg)]
    for probs in (torch.zeros(2, 7, 7), torch.zeros(2, 7, 7, dtype=torch.bfloat16)):   # N*S = 2: right shape
        if probs.dtype == torch.float32:
            probs = torch.zeros(3, 7, 7)                                                # wrong shape
        with pytest.raises(RuntimeError, match=r"probs must be a contiguous \(N\*S, L, L\) = \(2, 7, 7\) Float"):
            torch.ops.dynamixer_ops_C.dynamic_mix_backward_kept_out(x4, x4, probs, wc, bc, wg, bg, 2, *outs)


@pytest.mark.parametrize("isa", [None, "generic"], ids=["best", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_deep_chunks_spill_weight_gradients_to_float64(dtype, isa, monkeypatch, seed):
    """From ~2,000 sequences a chunk sums more blocks than one float32 partial may hold (128 sequences): its partial
    is added to a float64 spill and restarted (mix_backward_impl). 2,100 tiny sequences: 17 blocks of 128 in 16
    chunks, so one chunk spills; the only case of that path in this file (and so in .ci/sanitize)."""
    if isa is not None:
        _use_isa(monkeypatch, isa)
    inputs = make_inputs((3, 700), 2, 4, 2, 1, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = _run(inputs, 2, grad_y)
    assert_matches_reference(y, grads, inputs, 2, grad_y, tolerance(dtype, "cpu"), prefix=f"{isa} ")


def test_python_free_kernels_run_the_cpu_kernel(seed):
    """The library's own kernels of the public ops (csrc/dynamic_mix.cpp: what a process without Python runs; in
    Python the registry's kernels take the CPU key, so call them through their dispatch key) give the CPU backend's
    results bitwise, x transposed included; its fallback of cuda_matmul_allow_tf32 answers torch's default."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    x, *weights = make_inputs((2, 3), 7, 48, 2, 3, dtype=torch.float32, device="cpu", layout="transposed")
    grad_y = torch.randn(*x.shape[:-1], 2 * x.shape[-1])[..., ::2]           # channels 2 apart: copied first
    ops = torch.ops.dynamixer_ops
    y = ops.dynamic_mix.default.redispatch(keys, x, *weights, 2, "cpu")
    grads = ops.dynamic_mix_backward.default.redispatch(keys, grad_y, x, *weights, 2, "auto")
    assert torch.equal(y, ops.dynamic_mix(x, *weights, 2, "cpu"))
    for name, a, b in zip(GRAD_NAMES, grads, ops.dynamic_mix_backward(grad_y.contiguous(), x, *weights, 2, "cpu")):
        assert torch.equal(a, b), name
    assert torch.ops.dynamixer_ops_C.cuda_matmul_allow_tf32.default.redispatch(keys, x) is False
    # An empty batch: no y, and weight gradients of zero (the native backward zeroes them).
    empty = x[:0]
    assert ops.dynamic_mix.default.redispatch(keys, empty, *weights, 2, "cpu").shape == empty.shape
    grads = ops.dynamic_mix_backward.default.redispatch(keys, empty, empty, *weights, 2, "cpu")
    assert grads[0].shape == empty.shape
    for name, g, w in zip(GRAD_NAMES[1:], grads[1:], weights):
        assert g.shape == w.shape and not g.any(), name
