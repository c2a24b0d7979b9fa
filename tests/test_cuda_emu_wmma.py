"""The CPU emulator's nvcuda::wmma (tools/cuda_emu/emu_wmma.h) against a plain matmul, and its refusal of
misuse: a warp-collective call that not every lane makes is an error (not a hang, not a silent run), and a
kernel that assumes which matrix element a fragment slot holds computes garbage, as CUDA leaves it unspecified."""
from __future__ import annotations

import pytest
import torch

from cuda_emu_build import load_cuda_emulator


@pytest.fixture(scope="module")
def emu():
    return load_cuda_emulator()


def _tf32_round(t):
    """Round to nearest tf32 (10 mantissa bits), ties away from zero: cvt.rna.tf32.f32."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_truncate(t):
    return (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


KINDS = {"half": (torch.float16, 16), "bfloat16": (torch.bfloat16, 16), "tf32": (torch.float32, 8)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("a_col,b_col", [(False, False), (False, True), (True, False), (True, True)])
def test_wmma_matmul_matches_a_plain_matmul(emu, kind, a_col, b_col, seed):
    dtype, ks = KINDS[kind]
    M, N, K = 32, 48, 4 * ks
    a = torch.randn(M, K).to(dtype)
    b = torch.randn(K, N).to(dtype)
    c = torch.full((M, N), float("nan"))
    emu.wmma_matmul(a.t().contiguous() if a_col else a, b.t().contiguous() if b_col else b, c, kind, a_col, b_col,
                    True)
    ra, rb = (_tf32_round(a), _tf32_round(b)) if kind == "tf32" else (a, b)
    ref = ra.double() @ rb.double()
    # The products are exact in fp32; only the fp32 sum over K rounds.
    assert (c.double() - ref).abs().max() <= 1e-6 * (ra.double().abs() @ rb.double().abs()).max()


def test_wmma_tf32_operands_are_rounded_not_full_fp32(emu, seed):
    """tf32 keeps 10 mantissa bits: with __float_to_tf32 the result is the rounded operands' product, without it
    mma_sync truncates; neither equals the full-fp32 product."""
    a, b = torch.randn(16, 8), torch.randn(8, 16)
    rounded, truncated = torch.empty(16, 16), torch.empty(16, 16)
    emu.wmma_matmul(a, b, rounded, "tf32", False, False, True)
    emu.wmma_matmul(a, b, truncated, "tf32", False, False, False)
    for out, op in ((rounded, _tf32_round), (truncated, _tf32_truncate)):
        ref = op(a).double() @ op(b).double()
        assert (out.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    full = a.double() @ b.double()
    assert (rounded.double() - full).abs().max() > 1e-5 * full.abs().max()


@pytest.mark.parametrize("what,message", [
    ("divergent_load",
     r"deadlock.*Warp 0: lanes 0-15 wait in wmma::load_matrix_sync.*lanes 16-31 wait in __syncthreads"),
    ("divergent_then_sync", r"deadlock.*Warp 0: lanes 0-15 wait in wmma::fill_fragment"),
    ("different_pointers", r"lanes of one warp-collective call differ"),
    ("misaligned", r"not 32-byte \(256-bit\) aligned"),
    ("bad_ldm", r"ldm 12 is not a multiple of 16 bytes"),
])
def test_wmma_misuse_is_an_error(emu, what, message):
    a = torch.randn(64, 16).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=message):
        emu.wmma_misuse(what, a, torch.empty(16, 16))


def test_wmma_mapping_assuming_code_fails_and_elementwise_code_passes(emu, seed):
    a = torch.randn(16, 16).to(torch.bfloat16)
    ref = a.double() @ a.double().t()
    outs = {}
    for what in ("plain", "elementwise_scale", "assumed_mapping"):
        outs[what] = torch.full((16, 16), float("nan"))
        emu.wmma_misuse(what, a, outs[what])
    tol = 1e-5 * ref.abs().max()
    assert (outs["plain"].double() - ref).abs().max() <= tol
    assert (outs["elementwise_scale"].double() - 2 * ref).abs().max() <= 2 * tol
    intended = ref + torch.arange(16, dtype=torch.float64)        # what the mapping-assuming kernel meant
    assert (outs["assumed_mapping"].double() - intended).abs().max() > 1.0
