"""Every ``__syncthreads()`` of the CUDA kernels is needed, shown by mutation: with one barrier removed, the
default emulated checks (cuda_emu_cases.check_case: racechecked forward + backward against the float64 reference,
over KERNEL_SHAPES x EMU_DTYPES) must fail. One emulator build serves every mutant: its ``skip_barrier(line)`` turns
the ``__syncthreads`` on that line of csrc/cuda/dynamic_mix_cuda.cu into a no-op (tools/cuda_emu/emu.h).

A barrier whose removal nothing detects is a gap in the test shapes (add the shape that needs it) or redundant
(remove it). Every barrier, every run: racecheck catches each removal in the first or second case, a second or two
per barrier (one that nothing catches costs every case, a few minutes). ``-s`` prints what caught each."""
from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from cuda_emu_build import load_cuda_emulator
from cuda_emu_cases import EMU_DTYPES, H100_SMEM_OPTIN, KERNEL_SHAPES, check_case, run_emulator
from dynamixer_ops.testing import make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "dynamic_mix_cuda.cu")   # the file the emulator's mutants edit


def barrier_lines(path):
    """{line number: text} of every ``__syncthreads()`` call outside a // comment."""
    with open(path) as f:
        return {n: text.strip() for n, text in enumerate(f, 1) if "__syncthreads()" in text.split("//")[0]}


BARRIERS = barrier_lines(SOURCE)

# The cases in the order a mutant meets them: small shapes that reach every kernel and loop first (S * d = 40: two
# grad_x steps; 18 rows: two tensor-core row tiles; N = 11: several SIMT tiles and split-K steps).
_FIRST = ["L7-S5-e8-d8-N3", "L7-S3-e24-d2-N7", "L7-S2-e40-d2-N11"]
CASES = [(shape, dtype) for shape in _FIRST + [s for s in KERNEL_SHAPES if s not in _FIRST] for dtype in EMU_DTYPES]


@pytest.fixture(scope="module")
def emu():
    return load_cuda_emulator()


def test_only_the_mutated_file_has_barriers():
    """The emulator's mutants edit dynamic_mix_cuda.cu only: a barrier in another CUDA file would go unchecked."""
    others = [p for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*"))
              if os.path.abspath(p) != SOURCE and barrier_lines(p)]
    assert not others, f"__syncthreads() outside {SOURCE}: {others}"
    assert BARRIERS


def _first_failure(emu, line):
    """'case: message' of the first case that fails with the barrier on `line` removed, or None."""
    emu.skip_barrier(line)
    try:
        for shape, dtype_name in CASES:
            try:
                check_case(emu, KERNEL_SHAPES[shape], dtype_name)
            except (AssertionError, RuntimeError) as exc:
                return f"{shape}-{dtype_name}: {str(exc).splitlines()[0][:400]}"
        return None
    finally:
        emu.skip_barrier(0)


def _check_barrier(emu, line):
    caught = _first_failure(emu, line)
    print(f"\nline {line} ({BARRIERS[line]}): " + (f"caught by {caught}" if caught else "NOT caught"))
    assert caught, (f"removing the __syncthreads on line {line} of csrc/cuda/dynamic_mix_cuda.cu "
                    f"({BARRIERS[line]}) fails none of the emulated checks: the test shapes miss what it "
                    f"guards (add one that needs it), or it is redundant (remove it)")


@pytest.mark.parametrize("line", sorted(BARRIERS), ids=lambda n: f"line{n}")
def test_removing_any_barrier_fails_the_emulated_checks(emu, line, seed):
    _check_barrier(emu, line)


def test_every_barrier_runs_in_the_emulated_checks(emu):
    """A barrier that no case reaches cannot be shown necessary: the cases' shapes must reach every one."""
    emu.skip_barrier(0)
    for batch, L, C, S, d in KERNEL_SHAPES.values():
        for dtype in (torch.float32, torch.bfloat16):   # the SIMT kernels, the tensor-core ones (same lines in tf32)
            x, *weights = make_inputs((math.prod(batch),), L, C, S, d, dtype=dtype, device="cpu")
            run_emulator(emu, x.unsqueeze(0), torch.randn_like(x).unsqueeze(0), weights, S, H100_SMEM_OPTIN, False)
    hit = set(emu.skip_barrier(0))
    missed = sorted(set(BARRIERS) - hit)
    assert not missed, f"no emulated case reaches the __syncthreads on lines {missed} of {SOURCE}"
