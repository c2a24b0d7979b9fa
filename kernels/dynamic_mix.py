r"""Triton kernels of ``dynamic_mix``: the fused forward, the backward, and one launcher per direction.

For every sequence ``n`` (x is ``(A, B, L, C)``, ``n = a*B + b``), segment ``s`` (``S`` segments of
``E = C/S`` channels) and ``d`` reduced values per segment and token::

    r[n,l,s,k]    = sum_c x[n,l,c] Wc[s*d+k, c] + bc[s*d+k]                 (reduce)
    z[n,s,l*d+k]  = r[n,l,s,k]
    G[n,s,i,j]    = sum_m z[n,s,m] Wg[i*L+j, m] + bg[i*L+j]                 (generate)
    P[n,s,i,j]    = exp(G[n,s,i,j]) / sum_i' exp(G[n,s,i',j])               (softmax over the SOURCE i)
    y[n,j,s*E+e]  = sum_i P[n,s,i,j] x[n,i,s*E+e]                           (apply)

and, given ``dy``::

    dP[i,j]  = sum_e x[i,s*E+e] dy[j,s*E+e]          dxm[i,s*E+e] = sum_j P[i,j] dy[j,s*E+e]
    dG[i,j]  = P[i,j] (dP[i,j] - sum_i' P[i',j] dP[i',j])
    dWg      = sum_{n,s} dG^T z      dbg = sum_{n,s} dG      dz = dG Wg      dr[n,l,s,k] = dz[n,s,l*d+k]
    dWc      = sum_{n,l} dr^T x      dbc = sum_{n,l} dr      dx = dxm + dr Wc

Kernels (fp32 accumulation everywhere; inputs fp32/fp16/bf16 are upcast right after ``tl.load``):

* ``_forward_kernel``: one program per (tile of ``BLOCK_N`` sequences, segment, block of ``BLOCK_J`` targets):
  reduce -> generate -> column softmax -> apply, writing only ``y`` (no ``(N, S, L, L)`` tensor in memory).
* ``_backward_dx_kernel``: one program per (tile, segment), all targets: recomputes ``P``, writes ``dxm``
  and ``dr`` (fp32, ``(N, L, S*d)``, the size of ``S*d/C`` of x).
* ``_backward_dwg_kernel``: one program per (block of targets, partition of the tiles): recomputes ``P`` and
  ``dG`` for its target columns (the softmax is per column, so columns split cleanly) and sums
  ``dG^T z`` and ``dG`` over its tiles and all segments in registers, then writes one fp32 partial.
* ``_backward_dwc_kernel``: one program per (block of channels, partition of the tiles): ``dx = dxm + dr Wc``
  and the partials of ``dr^T x`` and ``dr``.

Weight gradients are deterministic: every program writes its own fp32 partial into a ``(partitions, ...)``
buffer in a fixed order of tiles, and ``torch.sum(dim=0)`` reduces the buffer (no atomics). The number of
partitions depends on the shapes and the config only, not on the device, so results repeat bit for bit.

Padding: ``tl.arange`` needs powers of two, so L, d, E and the channel chunk are padded and masked. Padded
source tokens get logit ``-inf`` before the column max, hence probability exactly 0; padded targets, tokens,
channels and sequences are never stored; padded weight rows/columns load as 0 so they add nothing.

Index math: sequence indices and every offset into x, y, dy, dx and dr are int64 (sequence ``n`` times a
batch stride overflows int32 long before memory runs out); weight offsets are < (L*L)*(L*d) and stay int32.

GPU status: **compiled and run only under the Triton interpreter (TRITON_INTERPRET=1) on a CPU; never run on
a GPU.** The ``tl.dot`` paths carry ``tl.static_assert``s for the GPU's ``M, N, K >= 16``; every masked load
has ``other=``; ``tl.exp`` sees fp32. The GPU launch table in :func:`default_config` is a guess from the
shapes (register and shared-memory arithmetic), not a measurement.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

__all__ = ["MixConfig", "default_config", "mix_forward", "mix_backward", "INTERPRET"]

# Triton decides at decoration time whether @triton.jit kernels are interpreted; read the flag the same way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# CUDA's limit on grid dim 0; a launch over more programs is split into chunks of sequences.
MAX_GRID = 2**31 - 1


# ----------------------------------------------------------------------------------------------------------------
# Matrix products: tl.dot where the GPU allows it (every dim >= 16), else broadcasting + tl.sum.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``a (M, K) @ b (K, N)`` in fp32."""
    if USE_DOT:
        tl.static_assert(a.shape[0] >= 16 and a.shape[1] >= 16 and b.shape[1] >= 16, "tl.dot needs M, N, K >= 16")
        if DOT_DTYPE == tl.float32:
            out = tl.dot(a, b, input_precision=PRECISION)
        else:
            out = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


@triton.jit
def _bmm(a, b, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Batched ``a (Q, M, K) @ b (Q, K, N)`` in fp32."""
    if USE_DOT:
        tl.static_assert(a.shape[1] >= 16 and a.shape[2] >= 16 and b.shape[2] >= 16, "tl.dot needs M, N, K >= 16")
        if DOT_DTYPE == tl.float32:
            out = tl.dot(a, b, input_precision=PRECISION)
        else:
            out = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
    else:
        out = tl.sum(a[:, :, :, None] * b[:, None, :, :], axis=2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces of the kernels.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _tile(pid_tile, seq0, N, B, BLOCK_N: tl.constexpr):
    """Sequence indices (int64) of tile ``pid_tile`` and whether each exists; ``n = a*B + b``."""
    n = seq0 + pid_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    return n, n < N, n // B, n % B


@triton.jit
def _load_tokens(ptr, seq_off, stride_l, n_ok, ch0, tok0, L, E,
                 BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """fp32 ``t[n, tok0 + l, ch0 + e]`` as ``(BLOCK_N, BLOCK_T, BLOCK_E)``; 0 outside ``l < L``, ``e < E``."""
    tok = tok0 + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    off = seq_off[:, None, None] + tok.to(tl.int64)[None, :, None] * stride_l + (ch0 + e)[None, None, :]
    ok = n_ok[:, None, None] & (tok < L)[None, :, None] & (e < E)[None, None, :]
    return tl.load(ptr + off, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _store_tokens(ptr, val, seq_off, stride_l, n_ok, ch0, tok0, L, E,
                  BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    tok = tok0 + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    off = seq_off[:, None, None] + tok.to(tl.int64)[None, :, None] * stride_l + (ch0 + e)[None, None, :]
    ok = n_ok[:, None, None] & (tok < L)[None, :, None] & (e < E)[None, None, :]
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _probs(x_ptr, x_seq, sx_l, n_ok, s, j0, wc_ptr, bc_ptr, wg_ptr, bg_ptr,
           L: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
           BLOCK_C: tl.constexpr, DOT_REDUCE: tl.constexpr, DOT_GEN: tl.constexpr,
           DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute, for a tile of sequences and segment ``s``, the targets ``j0 .. j0+BLOCK_J-1``:

    ``z`` (BLOCK_N, BLOCK_L*BLOCK_D) with ``z[n, l*BLOCK_D + k] = r[n,l,s,k]``, the probabilities
    ``P`` (BLOCK_N, BLOCK_L, BLOCK_J) (``P[n, i, jj]`` for target ``j0+jj``; padded sources exactly 0) and the
    generate weights ``wg`` (BLOCK_L*BLOCK_D, BLOCK_L*BLOCK_J) with ``wg[l*BLOCK_D+k, i*BLOCK_J+jj] =
    Wg[i*L + j0+jj, l*D+k]`` (0 where padded).
    """
    l = tl.arange(0, BLOCK_L)
    k = tl.arange(0, BLOCK_D)
    l_ok = l < L
    k_ok = k < D
    # reduce, chunked over all C channels: r[(n, l), k] = sum_c x[n, l, c] Wc[s*D + k, c]
    r = tl.zeros((BLOCK_N * BLOCK_L, BLOCK_D), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        xt = _load_tokens(x_ptr, x_seq, sx_l, n_ok, c0, 0, L, C - c0, BLOCK_N, BLOCK_L, BLOCK_C)
        c = c0 + tl.arange(0, BLOCK_C)
        wt = tl.load(wc_ptr + (s * D + k)[None, :] * C + c[:, None], mask=k_ok[None, :] & (c < C)[:, None],
                     other=0.0).to(tl.float32)                                        # (BLOCK_C, BLOCK_D)
        r += _mm(tl.reshape(xt, (BLOCK_N * BLOCK_L, BLOCK_C)), wt, DOT_REDUCE, DOT_DTYPE, PRECISION)
    r += tl.load(bc_ptr + s * D + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    z = tl.reshape(r, (BLOCK_N, BLOCK_L * BLOCK_D))
    # generate: G[n, (i, jj)] = sum_m z[n, m] Wg[i*L + j, m]; padded l/k columns of Wg load as 0
    j = j0 + tl.arange(0, BLOCK_J)
    g_row = l[:, None] * L + j[None, :]                                                # (i, jj) -> i*L + j
    g_ok = l_ok[:, None] & (j < L)[None, :]
    m = l[:, None] * D + k[None, :]
    m_ok = l_ok[:, None] & k_ok[None, :]
    wg = tl.load(wg_ptr + g_row[None, None, :, :] * (L * D) + m[:, :, None, None],
                 mask=m_ok[:, :, None, None] & g_ok[None, None, :, :], other=0.0).to(tl.float32)
    wg = tl.reshape(wg, (BLOCK_L * BLOCK_D, BLOCK_L * BLOCK_J))
    logits = tl.reshape(_mm(z, wg, DOT_GEN, DOT_DTYPE, PRECISION), (BLOCK_N, BLOCK_L, BLOCK_J))
    logits += tl.load(bg_ptr + g_row, mask=g_ok, other=0.0).to(tl.float32)[None, :, :]
    # softmax over the source token i (axis 1); padded sources -> -inf -> probability exactly 0
    logits = tl.where(l_ok[None, :, None], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None, :])
    return z, p / tl.sum(p, axis=1)[:, None, :], wg


@triton.jit
def _softmax_grad(P, xs, dys_t, DOT_DP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``dG = P * (dP - sum_i P dP)`` with ``dP = xs @ dys_t`` (``xs`` (N, L, E), ``dys_t`` (N, E, J))."""
    dP = _bmm(xs, dys_t, DOT_DP, DOT_DTYPE, PRECISION)
    return P * (dP - tl.sum(P * dP, axis=1)[:, None, :])


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Arguments: pointers; `seq0, N, B` (first sequence of this launch, sequences, x.shape[1]); the
# strides of dims 0, 1, 2 of each 4-D tensor (dim 3 has stride 1); the shape L, C, S, D (= d), E (= C/S);
# BLOCK_* tile sizes (powers of two); DOT_* whether each product uses tl.dot; DOT_DTYPE / PRECISION its operands.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(x_ptr, y_ptr, wc_ptr, bc_ptr, wg_ptr, bg_ptr, seq0, N, B,
                    sx_a, sx_b, sx_l, sy_a, sy_b, sy_l,
                    L: tl.constexpr, C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, DOT_REDUCE: tl.constexpr,
                    DOT_GEN: tl.constexpr, DOT_APPLY: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """``y[n, j, s*E+e] = sum_i P[n,s,i,j] x[n, i, s*E+e]`` for a tile x segment x target block."""
    # segment and target block vary fastest, so the programs that read one tile of x run together (L2 reuse)
    pid = tl.program_id(0).to(tl.int64)
    J_BLOCKS: tl.constexpr = (L + BLOCK_J - 1) // BLOCK_J
    jb = pid % J_BLOCKS
    s = (pid // J_BLOCKS) % S
    n, n_ok, a, b = _tile(pid // (J_BLOCKS * S), seq0, N, B, BLOCK_N)
    x_seq = a * sx_a + b * sx_b
    _, P, _ = _probs(x_ptr, x_seq, sx_l, n_ok, s, jb * BLOCK_J, wc_ptr, bc_ptr, wg_ptr, bg_ptr, L, C, D,
                     BLOCK_N, BLOCK_L, BLOCK_J, BLOCK_D, BLOCK_C, DOT_REDUCE, DOT_GEN, DOT_DTYPE, PRECISION)
    xs = _load_tokens(x_ptr, x_seq, sx_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
    y = _bmm(tl.permute(P, (0, 2, 1)), xs, DOT_APPLY, DOT_DTYPE, PRECISION)           # (N, J, E)
    _store_tokens(y_ptr, y, a * sy_a + b * sy_b, sy_l, n_ok, s * E, jb * BLOCK_J, L, E,
                  BLOCK_N, BLOCK_J, BLOCK_E)


@triton.jit
def _backward_dx_kernel(x_ptr, dy_ptr, dxm_ptr, dr_ptr, wc_ptr, bc_ptr, wg_ptr, bg_ptr, seq0, N, B,
                        sx_a, sx_b, sx_l, sdy_a, sdy_b, sdy_l, sdx_a, sdx_b, sdx_l,
                        L: tl.constexpr, C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, DOT_REDUCE: tl.constexpr,
                        DOT_GEN: tl.constexpr, DOT_APPLY: tl.constexpr, DOT_BACK: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``dxm[n, i, s*E+e] = sum_j P[i,j] dy[n, j, s*E+e]`` and ``dr[n, l, s*D+k] = (dG Wg)[l*D+k]``."""
    pid = tl.program_id(0).to(tl.int64)
    s = pid % S
    n, n_ok, a, b = _tile(pid // S, seq0, N, B, BLOCK_N)
    x_seq = a * sx_a + b * sx_b
    _, P, wg = _probs(x_ptr, x_seq, sx_l, n_ok, s, 0, wc_ptr, bc_ptr, wg_ptr, bg_ptr, L, C, D,
                      BLOCK_N, BLOCK_L, BLOCK_L, BLOCK_D, BLOCK_C, DOT_REDUCE, DOT_GEN, DOT_DTYPE, PRECISION)
    xs = _load_tokens(x_ptr, x_seq, sx_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
    dys = _load_tokens(dy_ptr, a * sdy_a + b * sdy_b, sdy_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
    dxm = _bmm(P, dys, DOT_APPLY, DOT_DTYPE, PRECISION)                                # (N, L_i, E)
    _store_tokens(dxm_ptr, dxm, a * sdx_a + b * sdx_b, sdx_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
    dG = _softmax_grad(P, xs, tl.permute(dys, (0, 2, 1)), DOT_APPLY, DOT_DTYPE, PRECISION)
    dz = _mm(tl.reshape(dG, (BLOCK_N, BLOCK_L * BLOCK_L)), tl.trans(wg), DOT_BACK, DOT_DTYPE, PRECISION)
    # dr is a contiguous fp32 (N, L, S*D) scratch
    dz = tl.reshape(dz, (BLOCK_N, BLOCK_L, BLOCK_D))
    l = tl.arange(0, BLOCK_L)
    k = tl.arange(0, BLOCK_D)
    off = (n * (L * S * D))[:, None, None] + (l * (S * D))[None, :, None] + (s * D + k)[None, None, :]
    ok = n_ok[:, None, None] & (l < L)[None, :, None] & (k < D)[None, None, :]
    tl.store(dr_ptr + off, dz, mask=ok)


@triton.jit
def _backward_dwg_kernel(x_ptr, dy_ptr, wc_ptr, bc_ptr, wg_ptr, bg_ptr, dwg_part_ptr, dbg_part_ptr,
                         N, B, ITERS, PARTS, sx_a, sx_b, sx_l, sdy_a, sdy_b, sdy_l,
                         L: tl.constexpr, C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
                         DOT_REDUCE: tl.constexpr, DOT_GEN: tl.constexpr, DOT_DP: tl.constexpr,
                         DOT_WG: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Partial ``dWg[i*L+j, m] = sum_{n,s} dG[n,s,i,j] z[n,s,m]`` and ``dbg`` over tiles ``part + it*PARTS``."""
    pid = tl.program_id(0)
    J_BLOCKS: tl.constexpr = (L + BLOCK_J - 1) // BLOCK_J
    jb = pid % J_BLOCKS
    part = pid // J_BLOCKS
    j0 = jb * BLOCK_J
    acc = tl.zeros((BLOCK_L * BLOCK_D, BLOCK_L * BLOCK_J), tl.float32)     # acc[m, i*BLOCK_J + jj]
    acc_b = tl.zeros((BLOCK_L, BLOCK_J), tl.float32)
    for it in range(0, ITERS):
        # tiles past the end load nothing (n_ok all false) and add exactly 0
        n, n_ok, a, b = _tile(part + it * PARTS, 0, N, B, BLOCK_N)
        x_seq = a * sx_a + b * sx_b
        dy_seq = a * sdy_a + b * sdy_b
        for s in range(0, S):
            z, P, _ = _probs(x_ptr, x_seq, sx_l, n_ok, s, j0, wc_ptr, bc_ptr, wg_ptr, bg_ptr, L, C, D,
                             BLOCK_N, BLOCK_L, BLOCK_J, BLOCK_D, BLOCK_C, DOT_REDUCE, DOT_GEN, DOT_DTYPE,
                             PRECISION)
            xs = _load_tokens(x_ptr, x_seq, sx_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
            dys = _load_tokens(dy_ptr, dy_seq, sdy_l, n_ok, s * E, j0, L, E, BLOCK_N, BLOCK_J, BLOCK_E)
            dG = _softmax_grad(P, xs, tl.permute(dys, (0, 2, 1)), DOT_DP, DOT_DTYPE, PRECISION)
            acc += _mm(tl.trans(z), tl.reshape(dG, (BLOCK_N, BLOCK_L * BLOCK_J)), DOT_WG, DOT_DTYPE, PRECISION)
            acc_b += tl.sum(dG, axis=0)
    l = tl.arange(0, BLOCK_L)
    k = tl.arange(0, BLOCK_D)
    j = j0 + tl.arange(0, BLOCK_J)
    g_row = l[:, None] * L + j[None, :]
    g_ok = (l < L)[:, None] & (j < L)[None, :]
    m = l[:, None] * D + k[None, :]
    m_ok = (l < L)[:, None] & (k < D)[None, :]
    base = part.to(tl.int64) * (L * L * L * D)
    tl.store(dwg_part_ptr + base + g_row[None, None, :, :] * (L * D) + m[:, :, None, None],
             tl.reshape(acc, (BLOCK_L, BLOCK_D, BLOCK_L, BLOCK_J)),
             mask=m_ok[:, :, None, None] & g_ok[None, None, :, :])
    tl.store(dbg_part_ptr + part.to(tl.int64) * (L * L) + g_row, acc_b, mask=g_ok)


@triton.jit
def _backward_dwc_kernel(x_ptr, dxm_ptr, dx_ptr, dr_ptr, wc_ptr, dwc_part_ptr, dbc_part_ptr,
                         N, B, ITERS, PARTS, sx_a, sx_b, sx_l, sdxm_a, sdxm_b, sdxm_l, sdx_a, sdx_b, sdx_l,
                         L: tl.constexpr, C: tl.constexpr, SD: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_SD: tl.constexpr,
                         BLOCK_C: tl.constexpr, DOT_DWC: tl.constexpr, DOT_DX: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``dx = dxm + dr @ Wc`` on a block of channels, and partial ``dWc = sum dr^T x``, ``dbc = sum dr``."""
    pid = tl.program_id(0)
    C_BLOCKS: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    cb = pid % C_BLOCKS
    part = pid // C_BLOCKS
    c0 = cb * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    q = tl.arange(0, BLOCK_SD)
    l = tl.arange(0, BLOCK_L)
    wc = tl.load(wc_ptr + q[:, None] * C + c[None, :], mask=(q < SD)[:, None] & (c < C)[None, :],
                 other=0.0).to(tl.float32)                                              # (SD, BLOCK_C)
    acc = tl.zeros((BLOCK_SD, BLOCK_C), tl.float32)
    acc_b = tl.zeros((BLOCK_SD,), tl.float32)
    R: tl.constexpr = BLOCK_N * BLOCK_L
    for it in range(0, ITERS):
        n, n_ok, a, b = _tile(part + it * PARTS, 0, N, B, BLOCK_N)
        dr_off = (n * (L * SD))[:, None, None] + (l * SD)[None, :, None] + q[None, None, :]
        dr_ok = n_ok[:, None, None] & (l < L)[None, :, None] & (q < SD)[None, None, :]
        dr = tl.reshape(tl.load(dr_ptr + dr_off, mask=dr_ok, other=0.0), (R, BLOCK_SD))
        xt = tl.reshape(_load_tokens(x_ptr, a * sx_a + b * sx_b, sx_l, n_ok, c0, 0, L, C - c0,
                                     BLOCK_N, BLOCK_L, BLOCK_C), (R, BLOCK_C))
        acc += _mm(tl.trans(dr), xt, DOT_DWC, DOT_DTYPE, PRECISION)
        acc_b += tl.sum(dr, axis=0)
        dxm = _load_tokens(dxm_ptr, a * sdxm_a + b * sdxm_b, sdxm_l, n_ok, c0, 0, L, C - c0,
                           BLOCK_N, BLOCK_L, BLOCK_C)
        dx = dxm + tl.reshape(_mm(dr, wc, DOT_DX, DOT_DTYPE, PRECISION), (BLOCK_N, BLOCK_L, BLOCK_C))
        _store_tokens(dx_ptr, dx, a * sdx_a + b * sdx_b, sdx_l, n_ok, c0, 0, L, C - c0,
                      BLOCK_N, BLOCK_L, BLOCK_C)
    base = part.to(tl.int64) * (SD * C)
    tl.store(dwc_part_ptr + base + q[:, None] * C + c[None, :], acc, mask=(q < SD)[:, None] & (c < C)[None, :])
    tl.store(dbc_part_ptr + part.to(tl.int64) * SD + q, acc_b, mask=(q < SD) & (cb == 0))


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Tile sizes of one launch (powers of two; anything larger than the shape is masked).

    block_n: sequences per program; block_j: target tokens per forward program and per dWg program
    (>= L gives one block); block_c: channels per step of the reduce loop and per dWc program;
    dot: use ``tl.dot`` for each product whose dims are all >= 16 (broadcast + ``tl.sum`` otherwise);
    partitions: programs per target block (dWg) / channel block (dWc), each summing a strided share of the
    tiles into its own fp32 partial; num_warps: per program (ignored by the interpreter).
    """
    block_n: int
    block_j: int
    block_c: int
    dot: bool
    partitions: int
    num_warps: int = 4


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def default_config(N: int, L: int, C: int, S: int, d: int, device_type: str) -> MixConfig:
    """The launch table. Under the interpreter: one small config (interpreter time grows with tile size;
    autotuning with several configs fails there). On a GPU: chosen from the model shapes (L = 32/16,
    C/S = 24/32, d = 2/8) by register and shared-memory arithmetic -- NOT MEASURED on a GPU."""
    BL = _pow2(L)
    if INTERPRET or device_type != "cuda":
        return MixConfig(block_n=4, block_j=min(BL, 8), block_c=min(_pow2(C), 32), dot=False,
                         partitions=max(1, min(4, triton.cdiv(N, 4))))
    # GPU: 16 sequences per tile so that the generate GEMM (tile x L*d by L*d x L*block_j) runs on tensor
    # cores; the Wg block (L*d x L*block_j) must fit shared memory in bf16: L = 32, d = 2 -> 64 x 512 (64 KB);
    # d = 8 -> 256 x 256 with block_j = 8 (128 KB).
    if BL <= 16:
        block_j, warps = BL, 4
    elif _pow2(d) <= 2:
        block_j, warps = 16, 8
    else:
        block_j, warps = 8, 8
    tiles = triton.cdiv(N, 16)
    # ~2 waves of 132 SMs in the weight-gradient kernels; depends on the shape only (determinism across GPUs)
    partitions = max(1, min(tiles, 264 // triton.cdiv(L, block_j)))
    return MixConfig(block_n=16, block_j=block_j, block_c=32, dot=True, partitions=partitions, num_warps=warps)


def _dot_operands(dtype: torch.dtype):
    """tl.dot operand dtype and fp32 precision: half inputs feed the tensor cores in their own dtype; fp32 uses
    tf32 only when torch allows it for matmuls. The interpreter keeps fp32 (it reads bf16 as raw bits)."""
    if INTERPRET or dtype == torch.float32:
        return tl.float32, "tf32" if (not INTERPRET and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "ieee"


def _shape(x, compress_weight, num_segments):
    A, B, L, C = x.shape
    S = num_segments
    d = compress_weight.shape[0] // S
    return A * B, B, L, C, S, d, C // S


def _chunks(N: int, block_n: int, programs_per_tile: int):
    """(first sequence, sequences) of each launch, so that no launch has more than MAX_GRID programs."""
    tiles_per_launch = max(1, MAX_GRID // programs_per_tile)
    step = tiles_per_launch * block_n
    for seq0 in range(0, N, step):
        yield seq0, min(N, seq0 + step)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _dots(cfg: MixConfig, **dims):
    """Per product, whether it uses tl.dot: ``dims`` maps a name to its (M, K, N)."""
    return {name: cfg.dot and min(mkn) >= 16 for name, mkn in dims.items()}


# ----------------------------------------------------------------------------------------------------------------
# Launchers (the backend contract of dynamixer_ops.backends).
# ----------------------------------------------------------------------------------------------------------------

def mix_forward(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, y,
                config: MixConfig | None = None):
    """Write ``dynamic_mix(x, ...)`` into ``y``. ``x``, ``y``: ``(A, B, L, C)``, unit last stride, any other
    strides; weights contiguous; one dtype (fp32/fp16/bf16) and device."""
    N, B, L, C, S, d, E = _shape(x, compress_weight, num_segments)
    cfg = config or default_config(N, L, C, S, d, x.device.type)
    BL, BD, BE, BJ = _pow2(L), _pow2(d), _pow2(E), min(_pow2(cfg.block_j), _pow2(L))
    dot_dtype, precision = _dot_operands(x.dtype)
    dots = _dots(cfg, REDUCE=(cfg.block_n * BL, cfg.block_c, BD), GEN=(cfg.block_n, BL * BD, BL * BJ),
                 APPLY=(BJ, BL, BE))
    programs_per_tile = S * triton.cdiv(L, BJ)
    for seq0, seq1 in _chunks(N, cfg.block_n, programs_per_tile):
        grid = (triton.cdiv(seq1 - seq0, cfg.block_n) * programs_per_tile,)
        _forward_kernel[grid](
            x, y, compress_weight, compress_bias, generate_weight, generate_bias, seq0, seq1, B,
            *_strides(x), *_strides(y), L, C, S, d, E,
            BLOCK_N=cfg.block_n, BLOCK_L=BL, BLOCK_J=BJ, BLOCK_D=BD, BLOCK_C=cfg.block_c, BLOCK_E=BE,
            DOT_REDUCE=dots["REDUCE"], DOT_GEN=dots["GEN"], DOT_APPLY=dots["APPLY"],
            DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=cfg.num_warps)


def mix_backward(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments,
                 grad_x, grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias,
                 config: MixConfig | None = None):
    """Write the five gradients of ``dynamic_mix``. Three launches: dxm and dr (per tile and segment), the dWg
    partials (per target block and partition), then dx and the dWc partials (per channel block and partition);
    the partials are reduced with ``torch.sum(dim=0)`` (fixed order, deterministic)."""
    N, B, L, C, S, d, E = _shape(x, compress_weight, num_segments)
    cfg = config or default_config(N, L, C, S, d, x.device.type)
    BL, BD, BE, BJ = _pow2(L), _pow2(d), _pow2(E), min(_pow2(cfg.block_j), _pow2(L))
    BN, BC, SD = cfg.block_n, cfg.block_c, S * d
    dot_dtype, precision = _dot_operands(x.dtype)
    common = dict(DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=cfg.num_warps)
    f32 = dict(device=x.device, dtype=torch.float32)
    reduce_dims = (BN * BL, BC, BD)

    # 1. dxm (into grad_x directly when fp32: the last kernel adds dr @ Wc in place) and dr.
    dxm = grad_x if x.dtype == torch.float32 else torch.empty(x.shape, **f32)
    dr = torch.empty((N, L, SD), **f32)
    dots = _dots(cfg, REDUCE=reduce_dims, GEN=(BN, BL * BD, BL * BL), APPLY=(BL, BL, BE),
                 BACK=(BN, BL * BL, BL * BD))
    for seq0, seq1 in _chunks(N, BN, S):
        grid = (triton.cdiv(seq1 - seq0, BN) * S,)
        _backward_dx_kernel[grid](
            x, grad_y, dxm, dr, compress_weight, compress_bias, generate_weight, generate_bias, seq0, seq1, B,
            *_strides(x), *_strides(grad_y), *_strides(dxm), L, C, S, d, E,
            BLOCK_N=BN, BLOCK_L=BL, BLOCK_D=BD, BLOCK_C=BC, BLOCK_E=BE,
            DOT_REDUCE=dots["REDUCE"], DOT_GEN=dots["GEN"], DOT_APPLY=dots["APPLY"], DOT_BACK=dots["BACK"],
            **common)

    # 2. dWg, dbg: partitions x target blocks programs, each looping over its share of the tiles.
    tiles = triton.cdiv(N, BN)
    parts = max(1, min(cfg.partitions, tiles))
    iters = triton.cdiv(tiles, parts)
    dwg_part = torch.empty((parts, L * L, L * d), **f32)
    dbg_part = torch.empty((parts, L * L), **f32)
    dots = _dots(cfg, REDUCE=reduce_dims, GEN=(BN, BL * BD, BL * BJ), DP=(BL, BE, BJ),
                 WG=(BL * BD, BN, BL * BJ))
    _backward_dwg_kernel[(parts * triton.cdiv(L, BJ),)](
        x, grad_y, compress_weight, compress_bias, generate_weight, generate_bias, dwg_part, dbg_part,
        N, B, iters, parts, *_strides(x), *_strides(grad_y), L, C, S, d, E,
        BLOCK_N=BN, BLOCK_L=BL, BLOCK_J=BJ, BLOCK_D=BD, BLOCK_C=BC, BLOCK_E=BE,
        DOT_REDUCE=dots["REDUCE"], DOT_GEN=dots["GEN"], DOT_DP=dots["DP"], DOT_WG=dots["WG"], **common)

    # 3. dx = dxm + dr @ Wc; dWc, dbc partials.
    BSD = _pow2(SD)
    dwc_part = torch.empty((parts, SD, C), **f32)
    dbc_part = torch.empty((parts, SD), **f32)
    dots = _dots(cfg, DWC=(BSD, BN * BL, BC), DX=(BN * BL, BSD, BC))
    _backward_dwc_kernel[(parts * triton.cdiv(C, BC),)](
        x, dxm, grad_x, dr, compress_weight, dwc_part, dbc_part, N, B, iters, parts,
        *_strides(x), *_strides(dxm), *_strides(grad_x), L, C, SD,
        BLOCK_N=BN, BLOCK_L=BL, BLOCK_SD=BSD, BLOCK_C=BC, DOT_DWC=dots["DWC"], DOT_DX=dots["DX"], **common)

    for out, part in ((grad_generate_weight, dwg_part), (grad_generate_bias, dbg_part),
                      (grad_compress_weight, dwc_part), (grad_compress_bias, dbc_part)):
        out.copy_(part.sum(0))
