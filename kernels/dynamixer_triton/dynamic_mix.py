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

* ``_forward_kernel``: one program per (tile of ``BLOCK_N`` sequences, segment): reduce once, then per block
  of ``BLOCK_J`` targets generate -> column softmax -> apply, writing only ``y`` (no ``(N, S, L, L)`` tensor
  in memory; the softmax normalises each target column j on its own, so target blocks are independent).
* ``_backward_dx_kernel``: one program per (tile, segment): recomputes ``P`` block of targets by block,
  summing ``dxm`` and ``dz`` in registers; writes ``dxm``, and ``dr`` and ``z`` (fp32 ``(N, L, S*d)``
  scratch, each ``S*d/C`` of x's size).
* ``_backward_dwg_kernel``: one program per (block of targets, partition of the tiles): reads ``z`` (written by
  the dx kernel), recomputes ``P`` and ``dG`` for its target columns (the softmax is per column, so columns
  split cleanly) and sums ``dG^T z`` and ``dG`` over its tiles and all segments in registers, then writes one
  fp32 partial.
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

Where these kernels have run: README.md, "What has run where". ``tools/triton_resource_usage.py`` compiles them
for sm_90 at every model shape (Triton's own compiler and ptxas, no GPU needed; a test runs it): the GPU launch
table (:func:`gpu_config`) fits shared memory there, and its registers and spills are printed. The ``tl.dot`` paths
carry ``tl.static_assert``s for the GPU's ``M, N, K >= 16``; every masked load has ``other=``; ``tl.exp`` sees fp32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

__all__ = ["MixConfig", "default_config", "gpu_config", "interpreter_config", "launch_forward", "launch_backward",
           "INTERPRET", "STATIC_LOOP_BOUNDS", "interpreter_needs_static_loop_bounds"]

# Triton decides at decoration time whether @triton.jit kernels are interpreted: take its own reading of
# TRITON_INTERPRET (dynamixer_ops.backends.env_flag reads every flag by the same rule).
INTERPRET = triton.knobs.runtime.interpret

# CUDA's limit on grid dim 0; a launch over more programs is split into chunks of sequences.
MAX_GRID = 2**31 - 1


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


def interpreter_needs_static_loop_bounds(triton_version: str, numpy_version: str) -> bool:
    """Whether the interpreter fails on a loop bound passed at run time (``range(0, ITERS)``).

    The interpreter passes a run-time scalar as a one-element array and converts it for ``range`` with
    ``int(array)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars");
    Triton 3.8's interpreter squeezes the array first, 3.6's does not (both seen; 3.7 not tried, taken as 3.6).
    Compiled kernels are unaffected."""
    return _release(triton_version) < (3, 8) and _release(numpy_version) >= (2, 4)


# Under such an interpreter the tile loops of the weight-gradient kernels get their trip count as a constexpr
# (the interpreter compiles nothing, so a new value costs nothing); compiled kernels take it at run time, so one
# compile serves every batch size.
STATIC_LOOP_BOUNDS = INTERPRET and interpreter_needs_static_loop_bounds(
    triton.__version__, __import__("numpy").__version__)     # numpy: the interpreter's dependency, not ours


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
    """Store ``val`` (fp32) into ``t[n, tok0 + l, ch0 + e]`` in ``t``'s dtype, only where ``l < L``, ``e < E``."""
    tok = tok0 + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    off = seq_off[:, None, None] + tok.to(tl.int64)[None, :, None] * stride_l + (ch0 + e)[None, None, :]
    ok = n_ok[:, None, None] & (tok < L)[None, :, None] & (e < E)[None, None, :]
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scratch(n, n_ok, s, L: tl.constexpr, S: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """Offsets and mask of ``t[n, l, s*D + k]`` in a contiguous fp32 ``(N, L, S*D)`` scratch (z and dr)."""
    l = tl.arange(0, BLOCK_L)
    k = tl.arange(0, BLOCK_D)
    off = (n * (L * S * D))[:, None, None] + (l * (S * D))[None, :, None] + (s * D + k)[None, None, :]
    return off, n_ok[:, None, None] & (l < L)[None, :, None] & (k < D)[None, None, :]


@triton.jit
def _reduce(x_ptr, x_seq, sx_l, n_ok, s, wc_ptr, bc_ptr, L: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_C: tl.constexpr, DOT_REDUCE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``z`` (BLOCK_N, BLOCK_L*BLOCK_D), ``z[n, l*BLOCK_D + k] = sum_c x[n,l,c] Wc[s*D+k, c] + bc[s*D+k]``
    for a tile of sequences and segment ``s`` (chunked over all C channels). Padded k are 0; padded l hold
    the bias and meet only zero columns of Wg.

    ``BLOCK_K >= BLOCK_D`` columns of Wc are multiplied (the ones past D load as 0): 16 lets the product run on
    tl.dot at d < 16; the zero columns are then folded away by summing groups of BLOCK_D columns.
    """
    k = tl.arange(0, BLOCK_K)
    k_ok = k < D
    r = tl.zeros((BLOCK_N * BLOCK_L, BLOCK_K), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        xt = _load_tokens(x_ptr, x_seq, sx_l, n_ok, c0, 0, L, C - c0, BLOCK_N, BLOCK_L, BLOCK_C)
        c = c0 + tl.arange(0, BLOCK_C)
        wt = tl.load(wc_ptr + (s * D + k)[None, :] * C + c[:, None], mask=k_ok[None, :] & (c < C)[:, None],
                     other=0.0).to(tl.float32)                                        # (BLOCK_C, BLOCK_K)
        r += _mm(tl.reshape(xt, (BLOCK_N * BLOCK_L, BLOCK_C)), wt, DOT_REDUCE, DOT_DTYPE, PRECISION)
    if BLOCK_K > BLOCK_D:   # columns >= D are exactly 0: r[:, k] = sum over groups of r[:, g*BLOCK_D + k]
        r = tl.sum(tl.reshape(r, (BLOCK_N * BLOCK_L, BLOCK_K // BLOCK_D, BLOCK_D)), axis=1)
    kd = tl.arange(0, BLOCK_D)
    r += tl.load(bc_ptr + s * D + kd, mask=kd < D, other=0.0).to(tl.float32)[None, :]
    return tl.reshape(r, (BLOCK_N, BLOCK_L * BLOCK_D))


@triton.jit
def _probs(z, j0, wg_ptr, bg_ptr, L: tl.constexpr, D: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
           DOT_GEN: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Columns ``j0 .. j0+BLOCK_J-1`` of the mixing matrices (the softmax normalises each column on its own):

    ``P`` (BLOCK_N, BLOCK_L, BLOCK_J), ``P[n, i, jj] = softmax_i(G[n, :, j0+jj])`` (padded sources exactly 0),
    and the generate weights ``wg`` (BLOCK_L*BLOCK_D, BLOCK_L*BLOCK_J),
    ``wg[l*BLOCK_D+k, i*BLOCK_J+jj] = Wg[i*L + j0+jj, l*D+k]`` (0 where padded).
    """
    l = tl.arange(0, BLOCK_L)
    k = tl.arange(0, BLOCK_D)
    l_ok = l < L
    j = j0 + tl.arange(0, BLOCK_J)
    g_row = l[:, None] * L + j[None, :]                                                # (i, jj) -> i*L + j
    g_ok = l_ok[:, None] & (j < L)[None, :]
    m = l[:, None] * D + k[None, :]
    m_ok = l_ok[:, None] & (k < D)[None, :]
    wg = tl.load(wg_ptr + g_row[None, None, :, :] * (L * D) + m[:, :, None, None],
                 mask=m_ok[:, :, None, None] & g_ok[None, None, :, :], other=0.0).to(tl.float32)
    wg = tl.reshape(wg, (BLOCK_L * BLOCK_D, BLOCK_L * BLOCK_J))
    logits = tl.reshape(_mm(z, wg, DOT_GEN, DOT_DTYPE, PRECISION), (BLOCK_N, BLOCK_L, BLOCK_J))
    logits += tl.load(bg_ptr + g_row, mask=g_ok, other=0.0).to(tl.float32)[None, :, :]
    # softmax over the source token i (axis 1); padded sources -> -inf -> probability exactly 0
    logits = tl.where(l_ok[None, :, None], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None, :])
    return p / tl.sum(p, axis=1)[:, None, :], wg


@triton.jit
def _softmax_grad(P, xs, dys_t, DOT_DP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``dG = P * (dP - sum_i P dP)`` with ``dP = xs @ dys_t`` (``xs`` (N, L, E), ``dys_t`` (N, E, J))."""
    dP = _bmm(xs, dys_t, DOT_DP, DOT_DTYPE, PRECISION)
    return P * (dP - tl.sum(P * dP, axis=1)[:, None, :])


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Arguments: pointers; `seq0, N, B` (first sequence of this launch, end of its sequences, x.shape[1]);
# the strides of dims 0, 1, 2 of each 4-D tensor (dim 3 has stride 1); the shape L, C, S, D (= d), E (= C/S);
# BLOCK_* tile sizes (powers of two); DOT_* whether each product uses tl.dot; DOT_DTYPE / PRECISION its operands.
# ITERS / STATIC_ITERS: tiles per partition, at run time / as a constexpr (0 = use ITERS; see STATIC_LOOP_BOUNDS).
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(x_ptr, y_ptr, wc_ptr, bc_ptr, wg_ptr, bg_ptr, seq0, N, B,
                    sx_a, sx_b, sx_l, sy_a, sy_b, sy_l,
                    L: tl.constexpr, C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, DOT_REDUCE: tl.constexpr,
                    DOT_GEN: tl.constexpr, DOT_APPLY: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """``y[n, j, s*E+e] = sum_i P[n,s,i,j] x[n, i, s*E+e]`` for a tile x segment, looping over target blocks."""
    # the segment varies fastest, so the S programs that read one tile of x run together (L2 reuse)
    pid = tl.program_id(0).to(tl.int64)
    s = pid % S
    n, n_ok, a, b = _tile(pid // S, seq0, N, B, BLOCK_N)
    x_seq = a * sx_a + b * sx_b
    z = _reduce(x_ptr, x_seq, sx_l, n_ok, s, wc_ptr, bc_ptr, L, C, D, BLOCK_N, BLOCK_L, BLOCK_D, BLOCK_K,
                BLOCK_C, DOT_REDUCE, DOT_DTYPE, PRECISION)
    xs = _load_tokens(x_ptr, x_seq, sx_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
    for j0 in range(0, L, BLOCK_J):
        P, _ = _probs(z, j0, wg_ptr, bg_ptr, L, D, BLOCK_N, BLOCK_L, BLOCK_J, BLOCK_D, DOT_GEN, DOT_DTYPE,
                      PRECISION)
        y = _bmm(tl.permute(P, (0, 2, 1)), xs, DOT_APPLY, DOT_DTYPE, PRECISION)       # (N, J, E)
        _store_tokens(y_ptr, y, a * sy_a + b * sy_b, sy_l, n_ok, s * E, j0, L, E, BLOCK_N, BLOCK_J, BLOCK_E)


@triton.jit
def _backward_dx_kernel(x_ptr, dy_ptr, dxm_ptr, dr_ptr, z_ptr, wc_ptr, bc_ptr, wg_ptr, bg_ptr, seq0, N, B,
                        sx_a, sx_b, sx_l, sdy_a, sdy_b, sdy_l, sdx_a, sdx_b, sdx_l,
                        L: tl.constexpr, C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
                        DOT_REDUCE: tl.constexpr, DOT_GEN: tl.constexpr, DOT_APPLY: tl.constexpr,
                        DOT_DP: tl.constexpr, DOT_BACK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        PRECISION: tl.constexpr):
    """``dxm[n, i, s*E+e] = sum_j P[i,j] dy[n, j, s*E+e]`` and ``dr[n, l, s*D+k] = (dG Wg)[l*D+k]``, both summed
    over target blocks in registers; also writes ``z`` for the dWg kernel."""
    pid = tl.program_id(0).to(tl.int64)
    s = pid % S
    n, n_ok, a, b = _tile(pid // S, seq0, N, B, BLOCK_N)
    x_seq = a * sx_a + b * sx_b
    dy_seq = a * sdy_a + b * sdy_b
    z = _reduce(x_ptr, x_seq, sx_l, n_ok, s, wc_ptr, bc_ptr, L, C, D, BLOCK_N, BLOCK_L, BLOCK_D, BLOCK_K,
                BLOCK_C, DOT_REDUCE, DOT_DTYPE, PRECISION)
    xs = _load_tokens(x_ptr, x_seq, sx_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
    dxm = tl.zeros((BLOCK_N, BLOCK_L, BLOCK_E), tl.float32)
    dz = tl.zeros((BLOCK_N, BLOCK_L * BLOCK_D), tl.float32)
    for j0 in range(0, L, BLOCK_J):
        P, wg = _probs(z, j0, wg_ptr, bg_ptr, L, D, BLOCK_N, BLOCK_L, BLOCK_J, BLOCK_D, DOT_GEN, DOT_DTYPE,
                       PRECISION)
        dys = _load_tokens(dy_ptr, dy_seq, sdy_l, n_ok, s * E, j0, L, E, BLOCK_N, BLOCK_J, BLOCK_E)
        dxm += _bmm(P, dys, DOT_APPLY, DOT_DTYPE, PRECISION)                           # (N, L_i, E)
        dG = _softmax_grad(P, xs, tl.permute(dys, (0, 2, 1)), DOT_DP, DOT_DTYPE, PRECISION)
        dz += _mm(tl.reshape(dG, (BLOCK_N, BLOCK_L * BLOCK_J)), tl.trans(wg), DOT_BACK, DOT_DTYPE, PRECISION)
    _store_tokens(dxm_ptr, dxm, a * sdx_a + b * sdx_b, sdx_l, n_ok, s * E, 0, L, E, BLOCK_N, BLOCK_L, BLOCK_E)
    off, ok = _scratch(n, n_ok, s, L, S, D, BLOCK_L, BLOCK_D)
    tl.store(dr_ptr + off, tl.reshape(dz, (BLOCK_N, BLOCK_L, BLOCK_D)), mask=ok)
    tl.store(z_ptr + off, tl.reshape(z, (BLOCK_N, BLOCK_L, BLOCK_D)), mask=ok)


@triton.jit
def _backward_dwg_kernel(x_ptr, dy_ptr, z_ptr, wg_ptr, bg_ptr, dwg_part_ptr, dbg_part_ptr,
                         N, B, ITERS, PARTS, sx_a, sx_b, sx_l, sdy_a, sdy_b, sdy_l,
                         L: tl.constexpr, S: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                         STATIC_ITERS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                         BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DOT_GEN: tl.constexpr,
                         DOT_DP: tl.constexpr, DOT_WG: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Partial ``dWg[i*L+j, m] = sum_{n,s} dG[n,s,i,j] z[n,s,m]`` and ``dbg`` for one block of targets, over the
    tiles ``part + it*PARTS`` and all segments, accumulated in registers and written once. ``z`` comes from the
    dx kernel's scratch: recomputing it here would read all C channels of x once per target block."""
    pid = tl.program_id(0)
    J_BLOCKS: tl.constexpr = (L + BLOCK_J - 1) // BLOCK_J
    jb = pid % J_BLOCKS
    part = pid // J_BLOCKS
    j0 = jb * BLOCK_J
    acc = tl.zeros((BLOCK_L * BLOCK_D, BLOCK_L * BLOCK_J), tl.float32)     # acc[m, i*BLOCK_J + jj]
    acc_b = tl.zeros((BLOCK_L, BLOCK_J), tl.float32)
    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else ITERS):
        # tiles past the end load nothing (n_ok all false) and add exactly 0
        n, n_ok, a, b = _tile(part + it * PARTS, 0, N, B, BLOCK_N)
        x_seq = a * sx_a + b * sx_b
        dy_seq = a * sdy_a + b * sdy_b
        for s in range(0, S):
            off, ok = _scratch(n, n_ok, s, L, S, D, BLOCK_L, BLOCK_D)
            z = tl.reshape(tl.load(z_ptr + off, mask=ok, other=0.0), (BLOCK_N, BLOCK_L * BLOCK_D))
            P, _ = _probs(z, j0, wg_ptr, bg_ptr, L, D, BLOCK_N, BLOCK_L, BLOCK_J, BLOCK_D, DOT_GEN, DOT_DTYPE,
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
                         L: tl.constexpr, C: tl.constexpr, SD: tl.constexpr, STATIC_ITERS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_SD: tl.constexpr,
                         BLOCK_C: tl.constexpr, DOT_DWC: tl.constexpr, DOT_DX: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``dx = dxm + dr @ Wc`` on a block of channels, and partial ``dWc = sum dr^T x``, ``dbc = sum dr``.
    ``dxm`` may be ``dx`` itself (fp32): each element is read and then written by the same program."""
    pid = tl.program_id(0)
    C_BLOCKS: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    cb = pid % C_BLOCKS
    part = pid // C_BLOCKS
    c0 = cb * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    q = tl.arange(0, BLOCK_SD)
    wc = tl.load(wc_ptr + q[:, None] * C + c[None, :], mask=(q < SD)[:, None] & (c < C)[None, :],
                 other=0.0).to(tl.float32)                                              # (SD, BLOCK_C)
    acc = tl.zeros((BLOCK_SD, BLOCK_C), tl.float32)
    acc_b = tl.zeros((BLOCK_SD,), tl.float32)
    R: tl.constexpr = BLOCK_N * BLOCK_L
    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else ITERS):
        n, n_ok, a, b = _tile(part + it * PARTS, 0, N, B, BLOCK_N)
        dr_off, dr_ok = _scratch(n, n_ok, 0, L, 1, SD, BLOCK_L, BLOCK_SD)      # all S*d columns of dr
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

    block_n: sequences per program; block_j: target tokens per step of the forward / dx target loop;
    block_jw: target tokens per dWg program (its fp32 accumulator is L*d x L*block_jw); block_c: channels per
    step of the reduce loop and per dWc program; dot: use ``tl.dot`` for each product whose dims are all
    >= 16 (broadcast + ``tl.sum`` otherwise); partitions: programs per target block (dWg) / channel block
    (dWc), each summing a strided share of the tiles into its own fp32 partial; num_warps: per program;
    num_stages: software-pipelining depth of the loops (None: Triton's default); both ignored by the interpreter.
    """
    block_n: int
    block_j: int
    block_jw: int
    block_c: int
    dot: bool
    partitions: int
    num_warps: int = 4
    num_stages: int | None = None


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _largest_tile(block_n, L, C, S, d, block_j, block_jw, block_c):
    """Elements of the largest intermediate any kernel builds (broadcast products are 3-D/4-D)."""
    BL, BD, BE = _pow2(L), _pow2(d), _pow2(C // S)
    rows = block_n * BL
    return max(rows * block_c * BD, block_n * BL * BD * BL * max(block_j, block_jw), block_n * block_j * BL * BE,
               block_n * BL * block_jw * BE, _pow2(S * d) * rows * block_c)


def default_config(N: int, L: int, C: int, S: int, d: int, device_type: str,
                   dtype: torch.dtype = torch.bfloat16) -> MixConfig:
    """The launch table: one config per shape (autotuning over several configs fails under the interpreter)."""
    if INTERPRET or device_type != "cuda":
        return interpreter_config(N, L, C, S, d)
    return gpu_config(N, L, C, S, d, dtype)


def interpreter_config(N: int, L: int, C: int, S: int, d: int) -> MixConfig:
    """The interpreter's cost is Python overhead per operation per program, so tiles grow (up to 32 sequences)
    while the largest broadcast intermediate stays under 2**19 elements."""
    block_j = block_jw = min(_pow2(L), 8)
    block_c = min(_pow2(C), 64)
    block_n = 1
    while (block_n < min(32, _pow2(N))
           and _largest_tile(2 * block_n, L, C, S, d, block_j, block_jw, block_c) <= 2**19):
        block_n *= 2
    return MixConfig(block_n=block_n, block_j=block_j, block_jw=block_jw, block_c=block_c, dot=False,
                     partitions=max(1, min(4, triton.cdiv(N, block_n))))


def gpu_config(N: int, L: int, C: int, S: int, d: int, dtype: torch.dtype = torch.bfloat16) -> MixConfig:
    """Chosen for the model shapes (L = 32/16, C/S = 24/32, d = 2/8) from Triton's own compile for sm_90 under
    Triton 3.6 (the GPU run's tested stack) and 3.8 (``tools/triton_resource_usage.py``: shared memory, registers,
    spills; tables in benchmarks/RESULTS.md), NOT MEASURED on a GPU: run only through the interpreter, where
    tests/test_triton.py checks it. Every entry must fit both compilers: they lay out shared memory differently.

    16 sequences per tile, so that the generate GEMM (16 x L*d by L*d x L*block_j) and the apply
    (block_j x L by L x C/S, per sequence) run on tensor cores (every dim >= 16). At L*d = 256 (DynaMixer-L
    stage 1) block_j = 1 in every dtype: with 4, Triton 3.6 compiled the dx kernel to 410,112 bytes of shared
    memory in bf16 (352,768 with 2 in fp32), past the 232,448 an H100/H200 block may have (3.8: 156,160), and
    spilled 4.7 KB per thread; with 1 it needs 68,608 bytes in bf16 and spills nothing (the generate GEMM is still
    16 x 256 by 256 x 32; 32 target steps instead of 8). The dWg accumulator (L*d x L*block_jw fp32, in
    registers) covers every target where that is at most 8K elements (L = 16, d = 2: 48 bytes of spill, against
    2 KB with half the targets), else is kept at 4K elements: at 16K (L = 32, d = 2, block_jw = 8) that kernel
    spilled 11 KB per thread, at 4K 116 bytes. 8 warps at every shape: at L = 16 the weight-gradient kernels
    spilled up to 7 KB per thread with 4 (L = 16, d = 8: dWc 7,212 bytes with 4 warps, 1,540 with 8; d = 2: dWg
    280 and 0), and 16 warps cap a thread at 128 registers, which spilled as much at L = 32. Partitions: about
    two waves of 132 SMs, from the shape only (results repeat across GPUs).

    float32 (fp32 dots, not tf32, unless torch allows tf32) keeps twice the bytes per tile: with the half-type
    table its forward and dx kernels need up to 568 KB of shared memory at L = 32 and its dWc kernel up to
    584 KB. block_j = 2 at L = 32 (1 at L*d = 256) and block_c = 16 (8 where L*d >= 128) fit every model shape,
    with register spills of many KB per thread at d = 8 (block_c = 8 leaves the dWc kernel's products below
    tl.dot's 16: broadcasts of 512 x 64 x 8 elements), ieee or tf32 alike: it launches, and it will be slow there.
    """
    BL = _pow2(L)
    Ld = BL * _pow2(d)
    block_j = 1 if Ld > 128 else min(BL, 16)
    block_jw = BL if Ld * BL * BL <= 8192 else max(1, min(BL, 16, 4096 // (Ld * BL)))
    block_c = 32
    if dtype == torch.float32:
        block_j = min(block_j, 2) if BL >= 32 else block_j
        block_c = 16 if Ld < 128 else 8
    tiles = triton.cdiv(N, 16)
    partitions = max(1, min(tiles, 264 // triton.cdiv(L, block_jw)))
    return MixConfig(block_n=16, block_j=block_j, block_jw=block_jw, block_c=block_c, dot=True,
                     partitions=partitions, num_warps=8)


def _dot_operands(dtype: torch.dtype):
    """tl.dot operand dtype and fp32 precision: half inputs feed the tensor cores in their own dtype; fp32 uses
    tf32 only when torch allows it for matmuls. The interpreter keeps fp32 (it reads bf16 as raw bits)."""
    if INTERPRET or dtype == torch.float32:
        return tl.float32, "tf32" if (not INTERPRET and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "ieee"


class _Plan:
    """Shape, padded block sizes and config of one call."""

    def __init__(self, x, compress_weight, num_segments, config):
        A, self.B, self.L, self.C = x.shape
        self.N, self.S = A * self.B, num_segments
        self.d = compress_weight.shape[0] // self.S
        self.E = self.C // self.S
        self.cfg = cfg = config or default_config(self.N, self.L, self.C, self.S, self.d, x.device.type, x.dtype)
        self.BN, self.BC = cfg.block_n, cfg.block_c
        self.BL, self.BD, self.BE = _pow2(self.L), _pow2(self.d), _pow2(self.E)
        self.BJ, self.BJW = min(_pow2(cfg.block_j), self.BL), min(_pow2(cfg.block_jw), self.BL)
        # Wc columns per reduce step: padded to 16 for tl.dot where the tile's other dims allow it
        self.BK = max(self.BD, 16) if cfg.dot and min(self.BN * self.BL, self.BC) >= 16 else self.BD
        dot_dtype, precision = _dot_operands(x.dtype)
        self.common = dict(DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=cfg.num_warps)
        if cfg.num_stages is not None:
            self.common["num_stages"] = cfg.num_stages

    def dots(self, **dims):
        """Per product, whether it uses tl.dot: ``dims`` maps a name to its (M, K, N)."""
        return {f"DOT_{name}": self.cfg.dot and min(mkn) >= 16 for name, mkn in dims.items()}

    def chunks(self):
        """(first sequence, end, grid) of each launch over (tile, segment) programs, so that no launch has more
        than MAX_GRID programs."""
        step = max(1, MAX_GRID // self.S) * self.BN
        for seq0 in range(0, self.N, step):
            seq1 = min(self.N, seq0 + step)
            yield seq0, seq1, (triton.cdiv(seq1 - seq0, self.BN) * self.S,)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


@contextlib.contextmanager
def _explain_resource_errors(p: _Plan, dtype: torch.dtype):
    """A launch whose tiles do not fit the GPU says which shape and config, and what to do instead."""
    try:
        yield
    except OutOfResources as exc:
        raise RuntimeError(
            f"dynamixer_ops (triton): the kernels for L={p.L}, C/S={p.E}, d={p.d} in {str(dtype)[6:]} do not fit "
            f"this GPU with {p.cfg} ({exc}); use backend='cuda', half-precision inputs, or pass a smaller "
            f"MixConfig (tools/triton_resource_usage.py prints what each kernel needs)") from exc


# ----------------------------------------------------------------------------------------------------------------
# Launchers (the backend contract of dynamixer_ops.backends).
# ----------------------------------------------------------------------------------------------------------------

def launch_forward(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, y,
                config: MixConfig | None = None):
    """Write ``dynamic_mix(x, ...)`` into ``y``. ``x``, ``y``: ``(A, B, L, C)``, unit last stride, any other
    strides; weights contiguous; one dtype (fp32/fp16/bf16) and device. One program per (tile, segment)."""
    p = _Plan(x, compress_weight, num_segments, config)
    dots = p.dots(REDUCE=(p.BN * p.BL, p.BC, p.BK), GEN=(p.BN, p.BL * p.BD, p.BL * p.BJ), APPLY=(p.BJ, p.BL, p.BE))
    with _explain_resource_errors(p, x.dtype):
        for seq0, seq1, grid in p.chunks():
            _forward_kernel[grid](
                x, y, compress_weight, compress_bias, generate_weight, generate_bias, seq0, seq1, p.B,
                *_strides(x), *_strides(y), p.L, p.C, p.S, p.d, p.E,
                BLOCK_N=p.BN, BLOCK_L=p.BL, BLOCK_J=p.BJ, BLOCK_D=p.BD, BLOCK_K=p.BK, BLOCK_C=p.BC, BLOCK_E=p.BE,
                **dots, **p.common)


def launch_backward(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments,
                 grad_x, grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias,
                 config: MixConfig | None = None):
    """Write the five gradients of ``dynamic_mix``. Three launches: dxm and dr (per tile and segment), the dWg
    partials (per target block and partition), then dx and the dWc partials (per channel block and partition);
    the partials are reduced with ``torch.sum(dim=0)`` (fixed order, deterministic)."""
    p = _Plan(x, compress_weight, num_segments, config)
    with _explain_resource_errors(p, x.dtype):
        N, L, C, S, d, SD = p.N, p.L, p.C, p.S, p.d, p.S * p.d
        f32 = dict(device=x.device, dtype=torch.float32)
        reduce_dims = (p.BN * p.BL, p.BC, p.BK)

        # 1. dxm (into grad_x directly when fp32: step 3 adds dr @ Wc in place), dr and z (fp32 scratch, each S*d/C
        #    of x's size).
        dxm = grad_x if x.dtype == torch.float32 else torch.empty(x.shape, **f32)
        dr = torch.empty((N, L, SD), **f32)
        z = torch.empty((N, L, SD), **f32)
        dots = p.dots(REDUCE=reduce_dims, GEN=(p.BN, p.BL * p.BD, p.BL * p.BJ), APPLY=(p.BL, p.BJ, p.BE),
                      DP=(p.BL, p.BE, p.BJ), BACK=(p.BN, p.BL * p.BJ, p.BL * p.BD))
        for seq0, seq1, grid in p.chunks():
            _backward_dx_kernel[grid](
                x, grad_y, dxm, dr, z, compress_weight, compress_bias, generate_weight, generate_bias, seq0, seq1, p.B,
                *_strides(x), *_strides(grad_y), *_strides(dxm), L, C, S, d, p.E,
                BLOCK_N=p.BN, BLOCK_L=p.BL, BLOCK_J=p.BJ, BLOCK_D=p.BD, BLOCK_K=p.BK, BLOCK_C=p.BC, BLOCK_E=p.BE,
                **dots, **p.common)

        # 2. dWg, dbg: partitions x target blocks programs, each looping over its share of the tiles.
        tiles = triton.cdiv(N, p.BN)
        parts = max(1, min(p.cfg.partitions, tiles))
        iters = triton.cdiv(tiles, parts)
        static_iters = iters if STATIC_LOOP_BOUNDS else 0
        dwg_part = torch.empty((parts, L * L, L * d), **f32)
        dbg_part = torch.empty((parts, L * L), **f32)
        dots = p.dots(GEN=(p.BN, p.BL * p.BD, p.BL * p.BJW), DP=(p.BL, p.BE, p.BJW),
                      WG=(p.BL * p.BD, p.BN, p.BL * p.BJW))
        # tf32 dots in this kernel fail Triton 3.8's compile for sm_90 (its TritonGPUOptimizeDotOperands pass) at
        # the shapes where block_jw < L; ieee fp32 dots compile (tools/triton_resource_usage.py --tf32).
        common = dict(p.common, PRECISION="ieee") if p.common["PRECISION"] == "tf32" else p.common
        _backward_dwg_kernel[(parts * triton.cdiv(L, p.BJW),)](
            x, grad_y, z, generate_weight, generate_bias, dwg_part, dbg_part,
            N, p.B, iters, parts, *_strides(x), *_strides(grad_y), L, S, d, p.E, static_iters,
            BLOCK_N=p.BN, BLOCK_L=p.BL, BLOCK_J=p.BJW, BLOCK_D=p.BD, BLOCK_E=p.BE, **dots, **common)

        # 3. dx = dxm + dr @ Wc; dWc, dbc partials.
        BSD = _pow2(SD)
        dwc_part = torch.empty((parts, SD, C), **f32)
        dbc_part = torch.empty((parts, SD), **f32)
        dots = p.dots(DWC=(BSD, p.BN * p.BL, p.BC), DX=(p.BN * p.BL, BSD, p.BC))
        _backward_dwc_kernel[(parts * triton.cdiv(C, p.BC),)](
            x, dxm, grad_x, dr, compress_weight, dwc_part, dbc_part, N, p.B, iters, parts,
            *_strides(x), *_strides(dxm), *_strides(grad_x), L, C, SD, static_iters,
            BLOCK_N=p.BN, BLOCK_L=p.BL, BLOCK_SD=BSD, BLOCK_C=p.BC, **dots, **p.common)

    for out, part in ((grad_generate_weight, dwg_part), (grad_generate_bias, dbg_part),
                      (grad_compress_weight, dwc_part), (grad_compress_bias, dbc_part)):
        out.copy_(part.sum(0))
