"""Triton-specific cases the backend grid does not reach: forced tile sizes (multi-step loops over channels,
target blocks, partitions and ragged tiles), the tl.dot path, the GPU launch table run through the
interpreter, launches split into chunks, masks next to NaN memory, and the backend's registration."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from dynamixer_ops.testing import (MODEL_SHAPES, assert_close_rel, assert_matches_reference, make_inputs,
                                   reference_outputs, tolerance)

from dynamixer_ops.backends import env_flag

kernels = pytest.importorskip("dynamixer_triton.dynamic_mix", reason="triton is not installed")
MixConfig = kernels.MixConfig

pytestmark = pytest.mark.skipif(not (kernels.INTERPRET or torch.cuda.is_available()),
                                reason="needs a CUDA device or TRITON_INTERPRET=1")
DEVICE = "cpu" if kernels.INTERPRET else "cuda"


def _run(inputs, S, config, dtype):
    """Both launchers on NaN-poisoned outputs; returns y and the five gradients, and grad_y."""
    x = inputs[0]
    y = torch.full_like(x, float("nan"))
    kernels.launch_forward(*inputs, S, y, config=config)
    grad_y = torch.randn(x.shape, dtype=dtype, device=x.device)
    grads = [torch.full_like(t, float("nan")) for t in inputs]
    kernels.launch_backward(grad_y, *inputs, S, *grads, config=config)
    return [y, *grads], grad_y


def _check(batch, L, E, S, d, config, *, dtype=torch.float32, layout="contiguous", tol=None, x=None):
    inputs = list(make_inputs(batch, L, E * S, S, d, dtype=dtype, device=DEVICE, layout=layout))
    if x is not None:
        inputs[0] = x
    outs, grad_y = _run(inputs, S, config, dtype)
    tol = tol or tolerance(dtype, DEVICE)
    assert_matches_reference(outs[0], outs[1:], inputs, S, grad_y, tol)


# Small tiles: every loop runs several times and every mask cuts a tile (block_n does not divide N, the last
# partition gets fewer tiles than the others, C is not a multiple of block_c, L not of block_j).
def _cfg(block_n, block_j, block_jw, block_c, partitions, dot=False):
    return MixConfig(block_n=block_n, block_j=block_j, block_jw=block_jw, block_c=block_c, dot=dot,
                     partitions=partitions)


SMALL = {   # batch, L, E, S, d, config
    "L7-e24-d1": ((1, 5), 7, 24, 2, 1, _cfg(block_n=2, block_j=2, block_jw=4, block_c=16, partitions=2)),
    "L14-e24-d2": ((2, 3), 14, 24, 3, 2, _cfg(block_n=4, block_j=4, block_jw=2, block_c=32, partitions=2)),
    "L16-e32-d8": ((1, 3), 16, 32, 1, 8, _cfg(block_n=2, block_j=8, block_jw=8, block_c=16, partitions=3)),
    "L32-e24-d2": ((1, 3), 32, 24, 2, 2, _cfg(block_n=2, block_j=16, block_jw=8, block_c=64, partitions=2)),
}


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("case", list(SMALL))
def test_small_tiles_multi_step_loops(case, layout, seed):
    batch, L, E, S, d, config = SMALL[case]
    _check(batch, L, E, S, d, config, layout=layout)


# tl.dot wherever all dims reach 16 (block_n = 16; 18 sequences: a full tile and a mostly masked one).
@pytest.mark.parametrize("L, E, S, d, block_j", [(16, 24, 2, 2, 16), (32, 32, 2, 8, 16), (14, 24, 2, 8, 16),
                                                  (7, 24, 2, 2, 8)])
def test_dot_path(L, E, S, d, block_j, seed):
    config = _cfg(block_n=16, block_j=block_j, block_jw=block_j, block_c=32, partitions=2, dot=True)
    plan = kernels._Plan(torch.empty(1, 1, L, E * S), torch.empty(S * d, E * S), S, config)
    assert plan.dots(GEN=(plan.BN, plan.BL * plan.BD, plan.BL * plan.BJ))["DOT_GEN"]   # the dot branch runs
    _check((2, 9), L, E, S, d, config)


# The GPU launch table for the model shapes (L = 32/16, C/S = 24/32, d = 2/8), run through the interpreter:
# its static_asserts (tl.dot dims >= 16) hold and the tiles compute the right thing.
# Each dtype has its own table (float32 tiles are smaller: its bytes per tile are twice a half type's).
@pytest.mark.parametrize("table", [torch.bfloat16, torch.float32], ids=["half-table", "float32-table"])
@pytest.mark.parametrize("L, E, d", [(L, C // S, d) for L, C, S, d in MODEL_SHAPES.values()], ids=list(MODEL_SHAPES))
def test_gpu_launch_table(L, E, d, table, seed):
    S = 2
    config = kernels.gpu_config(4096, L, E * S, S, d, table)
    assert config.dot and config.block_n >= 16
    _check((1, 20), L, E, S, d, dataclasses.replace(config, partitions=2))


def test_a_launch_that_does_not_fit_the_gpu_is_a_clear_error(monkeypatch):
    """Triton's OutOfResources (tiles past the GPU's shared memory) names the shape and what to do instead."""
    def no_room(grid):
        def launch(*args, **kwargs):
            raise kernels.OutOfResources(300000, 232448, "shared memory")
        return launch

    monkeypatch.setattr(kernels, "_forward_kernel", type("Kernel", (), {"__getitem__": staticmethod(no_room)})())
    inputs = make_inputs((1, 2), 7, 24, 2, 2, dtype=torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"the kernels for L=7, C/S=12, d=2 in float32 do not fit this GPU .*"
                                           r"Required: 300000.*use backend='cuda'"):
        kernels.launch_forward(*inputs, 2, torch.empty_like(inputs[0]))


@pytest.mark.slow
def test_kernels_compile_for_sm90_within_its_shared_memory():
    """tools/triton_resource_usage.py: every kernel of the GPU launch table, at every model shape and dtype, compiled
    for sm_90 by Triton's compiler and ptxas (no GPU needed, nothing run); fails where a kernel does not compile
    or needs more shared memory than an H100 block may have (as d = 8 did before its table was cut)."""
    if not env_flag("DYNAMIXER_OPS_TEST_TRITON_COMPILE", default=True):
        pytest.skip("DYNAMIXER_OPS_TEST_TRITON_COMPILE is off")
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001  (no NVIDIA backend or ptxas in this triton)
        pytest.skip(f"triton cannot compile for NVIDIA GPUs here: {exc}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(root, "tools", "triton_resource_usage.py")
    # float32 twice: ieee dots (torch's default) and tf32 (allow_tf32 = True), whose dWg dots once failed to compile
    for args in (["--dtype", "bfloat16", "float16", "float32"], ["--dtype", "float32", "--tf32"]):
        result = subprocess.run([sys.executable, script, "--arch", "90", *args], capture_output=True, text=True,
                                env=env, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "every kernel compiled within the limits" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_small_tiles(dtype, seed):
    batch, L, E, S, d, config = SMALL["L14-e24-d2"]
    _check(batch, L, E, S, d, config, dtype=dtype)


def test_launch_split_into_chunks(monkeypatch, seed):
    """More programs than MAX_GRID: the launchers split the sequences, each launch starting at seq0 > 0."""
    monkeypatch.setattr(kernels, "MAX_GRID", 5)     # S = 2 programs per tile -> 2 tiles per launch
    config = _cfg(block_n=2, block_j=8, block_jw=8, block_c=32, partitions=2)
    _check((1, 11), 7, 24, 2, 2, config)


def test_masks_never_read_or_write_past_the_view(seed):
    """x is a view inside a NaN-filled buffer (padded tokens and channels of every tile would read NaN), and
    a layout where the sequence stride is not a multiple of anything."""
    L, E, S, d = 7, 24, 2, 2
    C = E * S
    buffer = torch.full((3, 2, L + 3, C + 5), float("nan"), device=DEVICE)
    x = buffer[:, :, 1:L + 1, 2:C + 2]
    x.copy_(torch.randn(x.shape))
    config = _cfg(block_n=4, block_j=8, block_jw=8, block_c=32, partitions=2)
    _check((3, 2), L, E, S, d, config, x=x)


def test_weight_gradients_do_not_depend_on_the_run(seed):
    inputs = list(make_inputs((1, 9), 14, 48, 2, 2, dtype=torch.float32, device=DEVICE))
    config = _cfg(block_n=2, block_j=8, block_jw=8, block_c=32, partitions=3)
    torch.manual_seed(seed)
    first, _ = _run(inputs, 2, config, torch.float32)
    torch.manual_seed(seed)
    second, _ = _run(inputs, 2, config, torch.float32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_interpreter_backend_is_never_chosen_automatically():
    from dynamixer_ops.backends import get_backend, resolve_backend
    backend = get_backend("triton")
    if kernels.INTERPRET:
        assert not backend.auto("cpu") and not backend.auto("cuda")
        assert resolve_backend("auto", "cpu", torch.float32).name != "triton"
    assert backend.dtypes == (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a visible GPU makes the backend available")
def test_unavailable_without_interpreter_says_how_to_enable_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import dynamixer_ops; r = dynamixer_ops.unavailable_backends().get('triton'); "
            "assert 'triton' not in dynamixer_ops.available_backends(); print(r)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "no CUDA device" in out.stdout


@pytest.mark.skipif(not kernels.INTERPRET, reason="uses the interpreter's int32 overflow checks")
def test_sequence_indices_past_int32(monkeypatch, seed):
    """Sequences numbered across 2**31 (x and y expanded with batch stride 0, so all alias one sequence): with
    the interpreter's overflow checks on, int32 index math on them raises; the result is still right."""
    import triton.runtime.interpreter as interpreter
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    last_chunk = kernels._Plan.chunks

    def only_the_last_sequences(plan):
        *_, (seq0, seq1, grid) = last_chunk(plan)
        seq0 = seq1 - 5
        yield seq0, seq1, (-(-(seq1 - seq0) // plan.BN) * plan.S,)

    monkeypatch.setattr(kernels._Plan, "chunks", only_the_last_sequences)
    L, E, S, d, N = 7, 24, 2, 2, 2**31 + 1    # seq0 = 2**31 - 4 fits int32, the indices do not
    x1, wc, bc, wg, bg = make_inputs((1, 1), L, E * S, S, d, dtype=torch.float32, device=DEVICE)
    y1 = torch.full_like(x1, float("nan"))
    kernels.launch_forward(x1.expand(1, N, L, E * S), wc, bc, wg, bg, S, y1.expand(1, N, L, E * S),
                        config=_cfg(block_n=4, block_j=8, block_jw=8, block_c=32, partitions=1))
    ref_y, _ = reference_outputs((x1, wc, bc, wg, bg), S, torch.ones_like(x1))
    assert_close_rel(y1, ref_y, 1e-5, "y")
