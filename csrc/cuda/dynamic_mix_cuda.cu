// CUDA kernels of dynamixer_ops_C::dynamic_mix_out / dynamic_mix_backward_out (the math: docs/dynamic_mix.md).
//
//   r[n,l,s,k] = x[n,l,:] . Wc[s*d+k,:] + bc[s*d+k]          z[n,s,l*d+k] = r[n,l,s,k]
//   G[n,s,i,j] = z[n,s,:] . Wg[i*L+j,:] + bg[i*L+j]          P[n,s,:,j] = softmax_i(G[n,s,:,j])
//   y[n,j,s*e0+e] = sum_i P[n,s,i,j] x[n,i,s*e0+e]
//
// Two sets of kernels. The tensor-core ones (WMMA, 16x16x16 fp16/bf16 or 16x16x8 tf32 fragments, fp32
// accumulation) run for fp16/bf16 inputs, and for fp32 inputs when torch allows tf32 for matmuls:
// mix_forward_tc_kernel and mix_backward_tc_kernel (a block per ceil(16 / S) sequences x all segments: every
// product of the step on tensor cores, the softmax and dG in fp32), grad_x_tc_kernel and splitk_atb_tc_kernel
// (the weight gradients). The exact SIMT ones (fp32 FMA) run for fp32 inputs otherwise, before sm_80, and where
// the tensor-core tiles do not fit the device's shared memory: one block of kThreads threads per (tile of ts
// sequences, segment s); block b has s = b % S, so the blocks that run together read the same x rows (the reduce
// needs whole rows) from L2. The host code (dynamic_mix_cuda_host.cpp) validates the sizes, picks the kernels
// and tiles so that the shared memory fits, and owns every allocation.
//
// The same source also compiles as plain C++ against tools/cuda_emu/emu.h (DMX_EMULATE), which runs every
// block's threads on the CPU one at a time, in several orders, with real barriers (a missing one changes the
// results: racecheck), and emulates nvcuda::wmma: the only GPU-specific spellings that this needs are the two
// macros below (dynamic shared memory, launch).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifndef DMX_EMULATE
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/csrc/stable/macros.h>          // STD_CUDA_CHECK: libtorch's stable C ABI
#include <torch/headeronly/util/Exception.h>    // STD_TORCH_CHECK
#define DMX_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define DMX_LAUNCH(kernel, grid, smem, stream, ...) kernel<<<(grid), kThreads, (smem), (stream)>>>(__VA_ARGS__)
#endif

#include "dynamic_mix_cuda.h"

namespace dynamixer_ops {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;
// __launch_bounds__ minimum blocks per SM: the register budgets (64 forward, 80 backward) at which ptxas 13.0
// reports no spills for sm_80/sm_90 (benchmarks/RESULTS.md); shared memory allows that many blocks at L <= 32.

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A 4-D (A, B, L, C) tensor with unit last stride (RowsArg with its element type).
template <typename T>
struct Rows {
  T* data;
  int64_t L, B, sA, sB, sL;
  // Offset of token 0 of sequence n.
  __device__ __forceinline__ int64_t seq(int64_t n) const { return (n / B) * sA + (n % B) * sB; }
  // Offset of flat row k = n * L + l.
  __device__ __forceinline__ int64_t row(int64_t k) const { return seq(k / L) + (k % L) * sL; }
};

template <typename T>
Rows<T> typed(RowsArg a) {
  return Rows<T>{static_cast<T*>(const_cast<void*>(a.data)), a.L, a.B, a.sA, a.sB, a.sL};
}

// ---- the steps shared by the forward and the backward (one formula, written once) ----------------------

// zs[t][l*d + k] = r[n0+t, l, s, k] for t < tv. A warp per token row; lanes stride over the C channels
// (coalesced), each lane keeps up to KC partial dot products, then a butterfly sum.
template <typename T>
__device__ void reduce_segment(const MixDims& dm, const Rows<const T>& x, const T* __restrict__ wc,
                               const T* __restrict__ bc, int64_t n0, int tv, int64_t s, float* zs) {
  constexpr int KC = 8;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t row = warp; row < tv * dm.L; row += kWarps) {      // warp-uniform: the shuffles see all lanes
    const int64_t t = row / dm.L, l = row % dm.L;
    const T* xr = x.data + x.seq(n0 + t) + l * x.sL;
    for (int64_t k0 = 0; k0 < dm.d; k0 += KC) {
      float acc[KC];
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) acc[kk] = 0.f;
      for (int64_t c = lane; c < dm.C; c += 32) {
        const float xv = to_f(xr[c]);
#pragma unroll
        for (int kk = 0; kk < KC; ++kk)
          if (k0 + kk < dm.d) acc[kk] += xv * to_f(wc[(s * dm.d + k0 + kk) * dm.C + c]);
      }
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) acc[kk] = warp_sum(acc[kk]);
      if (lane == 0) {
#pragma unroll
        for (int kk = 0; kk < KC; ++kk)
          if (k0 + kk < dm.d) zs[t * dm.Ld + l * dm.d + k0 + kk] = acc[kk] + to_f(bc[s * dm.d + k0 + kk]);
      }
    }
  }
}

// ps[t][i][j] (row stride LP) = G[n0+t, s, i, j]. A thread per logit q = i*L + j; wgT is (L*d, L*L), so the
// threads of a warp read consecutive q (coalesced); zs is a shared-memory broadcast.
template <typename T>
__device__ void generate_logits(const MixDims& dm, const T* __restrict__ wgT, const T* __restrict__ bg, int tv,
                                const float* zs, float* ps) {
  for (int64_t q = threadIdx.x; q < dm.LL; q += kThreads) {
    float acc[kMaxTile];
    const float bias = to_f(bg[q]);
#pragma unroll
    for (int t = 0; t < kMaxTile; ++t) acc[t] = bias;
    for (int64_t m = 0; m < dm.Ld; ++m) {
      const float w = to_f(wgT[m * dm.LL + q]);
#pragma unroll
      for (int t = 0; t < kMaxTile; ++t)
        if (t < tv) acc[t] += zs[t * dm.Ld + m] * w;
    }
    const int64_t i = q / dm.L, j = q % dm.L;
#pragma unroll
    for (int t = 0; t < kMaxTile; ++t)
      if (t < tv) ps[(t * dm.L + i) * dm.LP + j] = acc[t];
  }
}

// p[i * stride] for i < L: logits in, their softmax over i out (fp32, in place).
__device__ __forceinline__ void softmax_column(float* p, int64_t stride, int64_t L) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < L; ++i) mx = fmaxf(mx, p[i * stride]);
  float sum = 0.f;
  for (int64_t i = 0; i < L; ++i) {
    const float e = expf(p[i * stride] - mx);
    p[i * stride] = e;
    sum += e;                                                         // >= 1: the max contributes exp(0)
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < L; ++i) p[i * stride] *= inv;
}

// Softmax over the source token i of every column j, in place. A thread per (t, j) column walks i.
__device__ void softmax_columns(const MixDims& dm, int tv, float* ps) {
  for (int64_t col = threadIdx.x; col < tv * dm.L; col += kThreads)
    softmax_column(ps + (col / dm.L) * dm.L * dm.LP + col % dm.L, dm.LP, dm.L);   // p[i * LP] = G[i][j]
}

// buf[i * stride + e] = src[n, i, s*e0 + e_begin + e] for i < L, e < kChunk (0 past the segment's end).
template <typename T>
__device__ void stage_chunk(const MixDims& dm, const Rows<const T>& src, int64_t n, int64_t s, int64_t e_begin,
                            int64_t ec, int64_t stride, float* buf) {
  const T* base = src.data + src.seq(n) + s * dm.e0 + e_begin;
  for (int64_t idx = threadIdx.x; idx < dm.L * kChunk; idx += kThreads) {
    const int64_t i = idx / kChunk, e = idx % kChunk;
    buf[i * stride + e] = e < ec ? to_f(base[i * src.sL + e]) : 0.f;
  }
}

// ---- forward on tensor cores -------------------------------------------------------------------------------

namespace wmma = nvcuda::wmma;

// The WMMA fragment element and k of a storage type: fp16 / bf16 16x16x16, fp32 as tf32 16x16x8.
template <typename T> struct Wmma { using elem = T; static constexpr int k = 16; };
template <> struct Wmma<float> { using elem = wmma::precision::tf32; static constexpr int k = 8; };
template <typename T, typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, Wmma<T>::k, typename Wmma<T>::elem, Layout>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, Wmma<T>::k, typename Wmma<T>::elem, Layout>;
template <typename T>
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, Wmma<T>::k, float>;

// acc += A (16 x K) B (K x 16), K = ksteps * k: A at a (a_ld, layout LA), B at b (b_ld, layout LB); a and b
// advance along K by a_step / b_step elements per k. fp32 operands are rounded to tf32 (round to nearest).
template <typename T, typename LA, typename LB>
__device__ __forceinline__ void mma_k(FragAcc<T>& acc, const T* a, int64_t a_ld, int64_t a_step, const T* b,
                                      int64_t b_ld, int64_t b_step, int64_t ksteps) {
  for (int64_t kk = 0; kk < ksteps; ++kk) {
    FragA<T, LA> fa;
    FragB<T, LB> fb;
    wmma::load_matrix_sync(fa, a + kk * a_step, static_cast<unsigned>(a_ld));
    wmma::load_matrix_sync(fb, b + kk * b_step, static_cast<unsigned>(b_ld));
    if constexpr (Wmma<T>::k == 8) {
#pragma unroll
      for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
#pragma unroll
      for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// The tensor-core kernels' shared memory (layout and padding: TcDims in dynamic_mix_cuda.h).
template <typename T>
struct TcSmem {
  T* xs;          // [ts][Lp][S][e0p] x tile
  T* dys;         // [ts][Lp][S][e0p] grad_y tile (backward)
  T* zs;          // [rows][Ldp] z, row = t * S + s
  float* gs;      // [16][LLp] logits, then P in fp32; first the reduce's [ts*Lp][SDp]
  T* pb;          // [16][Lp (i)][Lp (j)] P as an operand; in the backward then a row's dG ([L*L])
  float* scratch; // this warp's: [256] an output tile; backward: then [Lp][Lp] dP / dG
  __device__ TcSmem(const TcDims& tc, float* smem) {
    char* base = reinterpret_cast<char*>(smem);
    xs = reinterpret_cast<T*>(base + tc.x_off);
    dys = reinterpret_cast<T*>(base + tc.dy_off);
    zs = reinterpret_cast<T*>(base + tc.z_off);
    gs = reinterpret_cast<float*>(base + tc.g_off);
    pb = reinterpret_cast<T*>(base + tc.p_off);
    scratch = reinterpret_cast<float*>(base + tc.scratch_off) + (threadIdx.x / 32) * tc.scratch;
  }
};

// dst[t][l][s][e] = src[n0 + t, l, s*e0 + e], zero past L, past each segment's e0 channels and past the tv
// valid sequences.
template <typename T>
__device__ void stage_tc_tile(const MixDims& dm, const TcDims& tc, const Rows<const T>& src, int64_t n0, int64_t tv,
                              T* dst) {
  const int64_t XW = dm.S * tc.e0p;
  for (int64_t idx = threadIdx.x; idx < tc.ts * tc.Lp * XW; idx += kThreads) {
    const int64_t c = idx % XW, tl = idx / XW, t = tl / tc.Lp, l = tl % tc.Lp, sg = c / tc.e0p, e = c % tc.e0p;
    dst[idx] = t < tv && l < dm.L && e < dm.e0 ? src.data[src.seq(n0 + t) + l * src.sL + sg * dm.e0 + e]
                                               : from_f<T>(0.f);
  }
}

// reduce: r[t*Lp + l][m] = sum_c xs[t*Lp + l][c] wc_pad[m][c] (B = wc_pad^T: column-major, ldm S*e0p); then
// zs[t*S + s][l*d + k] = r[t*Lp + l][s*d + k] + bc[s*d + k] (zero in the padding), and z_out (fp32, rows
// n*S + s) when given. Ends with a barrier.
template <typename T>
__device__ void tc_reduce(const MixDims& dm, const TcDims& tc, const TcSmem<T>& sm, const T* __restrict__ wc_pad,
                          const T* __restrict__ bc, int64_t n0, int64_t tv, float* __restrict__ z_out) {
  constexpr int KS = Wmma<T>::k;
  const int warp = threadIdx.x / 32;
  const int64_t XW = dm.S * tc.e0p;
  const int64_t tiles_m = tc.ts * tc.Lp / 16, tiles_n = tc.SDp / 16;
  for (int64_t tile = warp; tile < tiles_m * tiles_n; tile += kWarps) {
    const int64_t m0 = tile / tiles_n * 16, q0 = tile % tiles_n * 16;
    FragAcc<T> acc;
    wmma::fill_fragment(acc, 0.f);
    mma_k<T, wmma::row_major, wmma::col_major>(acc, sm.xs + m0 * XW, XW, KS, wc_pad + q0 * XW, XW, KS, XW / KS);
    wmma::store_matrix_sync(sm.gs + m0 * tc.SDp + q0, acc, static_cast<unsigned>(tc.SDp), wmma::mem_row_major);
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < tc.rows * tc.Ldp; idx += kThreads) {
    const int64_t row = idx / tc.Ldp, m = idx % tc.Ldp;
    float v = 0.f;
    if (row < tc.ts * dm.S && m < dm.Ld) {
      const int64_t t = row / dm.S, sg = row % dm.S, l = m / dm.d, k = m % dm.d;
      v = sm.gs[(t * tc.Lp + l) * tc.SDp + sg * dm.d + k] + to_f(bc[sg * dm.d + k]);
      if (z_out != nullptr && t < tv) z_out[((n0 + t) * dm.S + sg) * dm.Ld + m] = v;
    }
    sm.zs[idx] = from_f<T>(v);
  }
  __syncthreads();
}

// Rows g0 .. g0+15 of the block: generate (gs[r][q] = sum_m z[g0 + r][m] wgT_pad[m][q]) and the softmax over the
// source token i of every column (r, j) in fp32: gs[r][i*L + j] = P in fp32, pb[r][i][j] = P as an operand (zero
// for i or j >= L and for rows past valid_rows). Ends with a barrier.
template <typename T>
__device__ void tc_generate_softmax(const MixDims& dm, const TcDims& tc, const TcSmem<T>& sm,
                                    const T* __restrict__ wgT_pad, const T* __restrict__ bg, int64_t g0,
                                    int64_t valid_rows) {
  constexpr int KS = Wmma<T>::k;
  const int warp = threadIdx.x / 32;
  for (int64_t qt = warp; qt < tc.LLp / 16; qt += kWarps) {
    FragAcc<T> acc;
    wmma::fill_fragment(acc, 0.f);
    mma_k<T, wmma::row_major, wmma::row_major>(acc, sm.zs + g0 * tc.Ldp, tc.Ldp, KS, wgT_pad + qt * 16, tc.LLp,
                                                KS * tc.LLp, tc.Ldp / KS);
    wmma::store_matrix_sync(sm.gs + qt * 16, acc, static_cast<unsigned>(tc.LLp), wmma::mem_row_major);
  }
  __syncthreads();
  for (int64_t col = threadIdx.x; col < 16 * tc.Lp; col += kThreads) {
    const int64_t r = col / tc.Lp, j = col % tc.Lp;
    T* p = sm.pb + r * tc.Lp * tc.Lp + j;
    if (j >= dm.L || g0 + r >= valid_rows) {
      for (int64_t i = 0; i < tc.Lp; ++i) p[i * tc.Lp] = from_f<T>(0.f);
      continue;
    }
    float* g = sm.gs + r * tc.LLp + j;                       // logit (i, j) at g[i * L], bias bg[i * L + j]
    for (int64_t i = 0; i < dm.L; ++i) g[i * dm.L] += to_f(bg[i * dm.L + j]);
    softmax_column(g, dm.L, dm.L);
    for (int64_t i = 0; i < tc.Lp; ++i) p[i * tc.Lp] = from_f<T>(i < dm.L ? g[i * dm.L] : 0.f);
  }
  __syncthreads();
}

// A warp's 16 x 16 fp32 tile through its scratch: write(offset, value) for every (r, c) for which
// index(r, c, &offset) is true.
template <typename Acc, typename Out, typename Index>
__device__ __forceinline__ void scatter_tile(const Acc& acc, float* scratch, Index&& index, Out&& write) {
  wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
  __syncwarp();                                               // the tile is read by other lanes than wrote it
  for (int idx = threadIdx.x % 32; idx < 256; idx += 32) {
    int64_t offset;
    if (index(idx / 16, idx % 16, &offset)) write(offset, scratch[idx]);
  }
  __syncwarp();                                               // scratch is overwritten by the next tile
}

// The tensor-core forward. Products on tensor cores with fp32 accumulation; the bias adds and the softmax in
// fp32; z and P rounded to the operand type for the next product (as eager's bf16 chain does). Every loop over
// tiles is warp-uniform (whole warps take a tile).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mix_forward_tc_kernel(
    MixDims dm, TcDims tc, Rows<const T> x, const T* __restrict__ wc_pad, const T* __restrict__ bc,
    const T* __restrict__ wgT_pad, const T* __restrict__ bg, Rows<T> y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();                                         // the host picks this kernel only on sm_80 and newer
#else
  constexpr int KS = Wmma<T>::k;
  DMX_DYNAMIC_SMEM(smem);
  const TcSmem<T> sm(tc, smem);
  const int warp = threadIdx.x / 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * tc.ts;
  const int64_t tv = min(tc.ts, dm.N - n0);                  // valid sequences of this block, >= 1
  const int64_t XW = dm.S * tc.e0p;                          // a staged token row
  const int64_t valid_rows = tv * dm.S;

  stage_tc_tile(dm, tc, x, n0, tv, sm.xs);
  __syncthreads();
  tc_reduce(dm, tc, sm, wc_pad, bc, n0, tv, nullptr);
  for (int64_t g0 = 0; g0 < valid_rows; g0 += 16) {
    tc_generate_softmax(dm, tc, sm, wgT_pad, bg, g0, valid_rows);
    // apply: y[t, j, s*e0 + e] = sum_i P[i][j] x[t, i, s*e0 + e]; A = P^T (pb[r] read column-major), B = x_s.
    const int64_t tiles_j = tc.Lp / 16, tiles_e = tc.e0p / 16;
    for (int64_t task = warp; task < 16 * tiles_j * tiles_e; task += kWarps) {
      const int64_t r = task / (tiles_j * tiles_e), j0 = task / tiles_e % tiles_j * 16, e0b = task % tiles_e * 16;
      const int64_t row = g0 + r;
      if (row >= valid_rows) continue;                          // warp-uniform
      const int64_t t = row / dm.S, sg = row % dm.S;
      FragAcc<T> acc;
      wmma::fill_fragment(acc, 0.f);
      mma_k<T, wmma::col_major, wmma::row_major>(acc, sm.pb + r * tc.Lp * tc.Lp + j0, tc.Lp, KS * tc.Lp,
                                                  sm.xs + t * tc.Lp * XW + sg * tc.e0p + e0b, XW, KS * XW,
                                                  tc.Lp / KS);
      T* yb = y.data + y.seq(n0 + t) + sg * dm.e0;
      scatter_tile(acc, sm.scratch,
                   [&](int jj, int ee, int64_t* off) {
                     *off = (j0 + jj) * y.sL + e0b + ee;
                     return j0 + jj < dm.L && e0b + ee < dm.e0;
                   },
                   [&](int64_t off, float v) { yb[off] = from_f<T>(v); });
    }
    // No barrier: the next rows first write gs (their logits), which nothing since the last barrier reads; pb, which
    // this step reads, is rewritten only after the barrier inside tc_generate_softmax.
  }
#endif
}

// The fused backward on tensor cores: recomputes z and P as the forward does, then per (sequence, segment) row,
// one warp: dP = x_s dy_s^T (tensor cores), dG = P (dP - sum_i P dP) in fp32 (lanes over target columns j),
// dx_mix = P dy_s (tensor cores); per 16 rows dz = dG Wg (tensor cores). Writes z and dr in fp32, dG and dx_mix
// in T, and this block's fp32 sum of dG over its rows (the generate bias's gradient, summed in a fixed order).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mix_backward_tc_kernel(
    MixDims dm, TcDims tc, Rows<const T> dy, Rows<const T> x, const T* __restrict__ wc_pad, const T* __restrict__ bc,
    const T* __restrict__ wgT_pad, const T* __restrict__ bg, const T* __restrict__ wg_pad, float* __restrict__ z_out,
    T* __restrict__ dg_out, float* __restrict__ dr_out, T* __restrict__ dxm_out, float* __restrict__ dbg_partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int KS = Wmma<T>::k;
  DMX_DYNAMIC_SMEM(smem);
  const TcSmem<T> sm(tc, smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * tc.ts;
  const int64_t tv = min(tc.ts, dm.N - n0);
  const int64_t XW = dm.S * tc.e0p;
  const int64_t valid_rows = tv * dm.S;
  float* dps = sm.scratch + 256;                              // [Lp][Lp]: dP, then dG of the warp's row
  const float* scratch0 = sm.scratch - warp * tc.scratch;     // warp 0's scratch
  float* dbg_sum = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + tc.dbg_off);   // [LL]

  stage_tc_tile(dm, tc, x, n0, tv, sm.xs);
  stage_tc_tile(dm, tc, dy, n0, tv, sm.dys);
  for (int64_t q = threadIdx.x; q < dm.LL; q += kThreads) dbg_sum[q] = 0.f;
  __syncthreads();
  tc_reduce(dm, tc, sm, wc_pad, bc, n0, tv, z_out);
  for (int64_t g0 = 0; g0 < valid_rows; g0 += 16) {
    tc_generate_softmax(dm, tc, sm, wgT_pad, bg, g0, valid_rows);
    // Rounds of kWarps rows, a warp per row; after each round the block adds the round's dG to dbg_sum in
    // warp order (deterministic), before the warps' scratch is reused.
    for (int64_t r0 = 0; r0 < 16; r0 += kWarps) {
      const int64_t r = r0 + warp, row = g0 + r;
      if (row < valid_rows) {                                   // warp-uniform; else pb[r] stays zero
        const int64_t t = row / dm.S, sg = row % dm.S;
        const T* xt = sm.xs + t * tc.Lp * XW + sg * tc.e0p;       // x_s: [i][e], ldm XW
        const T* dyt = sm.dys + t * tc.Lp * XW + sg * tc.e0p;     // dy_s: [j][e], ldm XW
        T* pr = sm.pb + r * tc.Lp * tc.Lp;
        // dP[i][j] = sum_e x[i][e] dy[j][e]: B = dy_s^T, column-major.
        for (int64_t i0 = 0; i0 < tc.Lp; i0 += 16) {
          for (int64_t j0 = 0; j0 < tc.Lp; j0 += 16) {
            FragAcc<T> acc;
            wmma::fill_fragment(acc, 0.f);
            mma_k<T, wmma::row_major, wmma::col_major>(acc, xt + i0 * XW, XW, KS, dyt + j0 * XW, XW, KS, tc.e0p / KS);
            wmma::store_matrix_sync(dps + i0 * tc.Lp + j0, acc, static_cast<unsigned>(tc.Lp), wmma::mem_row_major);
          }
        }
        __syncwarp();
        // dG in fp32, a lane per target column j; to dg_out and in place of dP.
        const float* p = sm.gs + r * tc.LLp;                      // P[i][j] at p[i * L + j]
        T* dg_row = dg_out + ((n0 + t) * dm.S + sg) * dm.LL;
        for (int64_t j = lane; j < dm.L; j += 32) {
          float dot = 0.f;
          for (int64_t i = 0; i < dm.L; ++i) dot += p[i * dm.L + j] * dps[i * tc.Lp + j];
          for (int64_t i = 0; i < dm.L; ++i) {
            const float v = p[i * dm.L + j] * (dps[i * tc.Lp + j] - dot);
            dps[i * tc.Lp + j] = v;
            dg_row[i * dm.L + j] = from_f<T>(v);
          }
        }
        // dx_mix[t, i, s*e0 + e] = sum_j P[i][j] dy[j][e]: A = pb[r] ([i][j], row-major), B = dy_s.
        T* dxm = dxm_out + (n0 + t) * dm.L * dm.C + sg * dm.e0;
        for (int64_t i0 = 0; i0 < tc.Lp; i0 += 16) {
          for (int64_t eb = 0; eb < tc.e0p; eb += 16) {
            FragAcc<T> acc;
            wmma::fill_fragment(acc, 0.f);
            mma_k<T, wmma::row_major, wmma::row_major>(acc, pr + i0 * tc.Lp, tc.Lp, KS, dyt + eb, XW, KS * XW,
                                                        tc.Lp / KS);
            scatter_tile(acc, sm.scratch,
                         [&](int ii, int ee, int64_t* off) {
                           *off = (i0 + ii) * dm.C + eb + ee;
                           return i0 + ii < dm.L && eb + ee < dm.e0;
                         },
                         [&](int64_t off, float v) { dxm[off] = from_f<T>(v); });
          }
        }
        // pb[r] = dG as the dz product's operand, [i*L + j] (zero up to LLp), now that dx_mix has read P.
        for (int64_t q = lane; q < tc.LLp; q += 32)
          pr[q] = from_f<T>(q < dm.LL ? dps[(q / dm.L) * tc.Lp + q % dm.L] : 0.f);
      }
      __syncthreads();                                          // the round's dG are in the warps' scratch
      const int64_t round_rows = min(static_cast<int64_t>(kWarps), valid_rows - (g0 + r0));
      for (int64_t q = threadIdx.x; q < dm.LL; q += kThreads) {
        float acc = dbg_sum[q];
        for (int64_t w = 0; w < round_rows; ++w)
          acc += scratch0[w * tc.scratch + 256 + (q / dm.L) * tc.Lp + q % dm.L];   // warp w's dps
        dbg_sum[q] = acc;
      }
      __syncthreads();                                          // dps is overwritten by the warps' next rows
    }
    // dz[g0 + r][m] = sum_q dG[r][q] Wg[q][m]; dr[n, l, s*d + k] = dz[l*d + k].
    for (int64_t mt = warp; mt < tc.Ldp / 16; mt += kWarps) {
      FragAcc<T> acc;
      wmma::fill_fragment(acc, 0.f);
      mma_k<T, wmma::row_major, wmma::row_major>(acc, sm.pb, tc.Lp * tc.Lp, KS, wg_pad + mt * 16, tc.Ldp,
                                                  KS * tc.Ldp, tc.LLp / KS);
      scatter_tile(acc, sm.scratch,
                   [&](int rr, int mm, int64_t* off) {
                     const int64_t row = g0 + rr, m = mt * 16 + mm;
                     if (row >= valid_rows || m >= dm.Ld) return false;
                     const int64_t t = row / dm.S, sg = row % dm.S;
                     *off = ((n0 + t) * dm.L + m / dm.d) * (dm.S * dm.d) + sg * dm.d + m % dm.d;
                     return true;
                   },
                   [&](int64_t off, float v) { dr_out[off] = v; });
    }
    // No barrier: as in the forward, the next rows first write gs, which the dz product does not read; pb is
    // rewritten only after the barrier inside tc_generate_softmax, dbg_sum only after the next round's barrier.
  }
  for (int64_t q = threadIdx.x; q < dm.LL; q += kThreads) dbg_partial[blockIdx.x * dm.LL + q] = dbg_sum[q];
#endif
}

// ---- forward, SIMT (exact fp32) ---------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, 4) mix_forward_kernel(
    MixDims dm, Rows<const T> x, const T* __restrict__ wc, const T* __restrict__ bc, const T* __restrict__ wgT,
    const T* __restrict__ bg, Rows<T> y) {
  DMX_DYNAMIC_SMEM(smem);
  float* zs = smem;                                   // [ts][Ld]
  float* ps = zs + dm.ts * dm.Ld;                     // [ts][L][LP]
  float* xs = ps + dm.ts * dm.L * dm.LP;              // [L][kChunk]
  const int64_t s = blockIdx.x % dm.S;
  const int64_t n0 = (blockIdx.x / dm.S) * dm.ts;
  const int tv = static_cast<int>(min(dm.ts, dm.N - n0));     // valid sequences of this tile, >= 1

  reduce_segment(dm, x, wc, bc, n0, tv, s, zs);
  __syncthreads();
  generate_logits(dm, wgT, bg, tv, zs, ps);
  __syncthreads();
  softmax_columns(dm, tv, ps);
  // No barrier: the first chunk's staging writes only xs, and the barrier after it comes before any read of P.

  // y[n0+t, j, s*e0 + e] = sum_i P[t][i][j] x[n0+t, i, s*e0 + e]: lanes over e, each warp JB targets j.
  constexpr int JB = 4;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int t = 0; t < tv; ++t) {
    const float* p = ps + t * dm.L * dm.LP;
    T* yb = y.data + y.seq(n0 + t) + s * dm.e0;
    for (int64_t eb = 0; eb < dm.e0; eb += kChunk) {
      const int64_t ec = min(static_cast<int64_t>(kChunk), dm.e0 - eb);
      stage_chunk(dm, x, n0 + t, s, eb, ec, kChunk, xs);
      __syncthreads();
      for (int64_t j0 = warp * JB; j0 < dm.L; j0 += kWarps * JB) {
        float acc[JB] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t i = 0; i < dm.L; ++i) {
          const float xv = xs[i * kChunk + lane];
#pragma unroll
          for (int jj = 0; jj < JB; ++jj)
            if (j0 + jj < dm.L) acc[jj] += p[i * dm.LP + j0 + jj] * xv;
        }
        if (lane < ec) {
#pragma unroll
          for (int jj = 0; jj < JB; ++jj)
            if (j0 + jj < dm.L) yb[(j0 + jj) * y.sL + eb + lane] = from_f<T>(acc[jj]);
        }
      }
      __syncthreads();                                  // xs is overwritten by the next chunk
    }
  }
}

// ---- backward, fused part -----------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) mix_backward_kernel(
    MixDims dm, Rows<const T> dy, Rows<const T> x, const T* __restrict__ wc, const T* __restrict__ bc,
    const T* __restrict__ wgT, const T* __restrict__ bg, const T* __restrict__ wg, float* __restrict__ z_out,
    float* __restrict__ dg_out, float* __restrict__ dr_out, float* __restrict__ dxm_out) {
  constexpr int64_t XP = kChunk + 1;                  // odd row stride: the dP loop reads dys[j][e] by j
  DMX_DYNAMIC_SMEM(smem);
  float* zs = smem;                                   // [ts][Ld]
  float* ps = zs + dm.ts * dm.Ld;                     // [ts][L][LP]  P
  float* ds = ps + dm.ts * dm.L * dm.LP;              // [ts][L][LP]  dP, then dG
  float* xs = ds + dm.ts * dm.L * dm.LP;              // [L][XP]
  float* dys = xs + dm.L * XP;                        // [L][XP]
  const int64_t s = blockIdx.x % dm.S;
  const int64_t n0 = (blockIdx.x / dm.S) * dm.ts;
  const int tv = static_cast<int>(min(dm.ts, dm.N - n0));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // Recompute z and P exactly as the forward does.
  reduce_segment(dm, x, wc, bc, n0, tv, s, zs);
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < tv * dm.Ld; idx += kThreads)
    z_out[((n0 + idx / dm.Ld) * dm.S + s) * dm.Ld + idx % dm.Ld] = zs[idx];
  generate_logits(dm, wgT, bg, tv, zs, ps);
  for (int64_t idx = threadIdx.x; idx < tv * dm.L * dm.LP; idx += kThreads) ds[idx] = 0.f;
  __syncthreads();
  softmax_columns(dm, tv, ps);
  // No barrier: the first chunk's staging writes only xs and dys, and the barrier after it comes before any read
  // of P.

  // dP[t][i][j] = sum_e x[i, e] dy[j, e] and dx_mix[t][i, e] = sum_j P[t][i][j] dy[j, e], a channel chunk
  // at a time.
  for (int t = 0; t < tv; ++t) {
    const float* p = ps + t * dm.L * dm.LP;
    float* dp = ds + t * dm.L * dm.LP;
    float* dxm = dxm_out + (n0 + t) * dm.L * dm.C + s * dm.e0;     // row i at dxm[i * C]
    for (int64_t eb = 0; eb < dm.e0; eb += kChunk) {
      const int64_t ec = min(static_cast<int64_t>(kChunk), dm.e0 - eb);
      stage_chunk(dm, x, n0 + t, s, eb, ec, XP, xs);
      stage_chunk(dm, dy, n0 + t, s, eb, ec, XP, dys);
      __syncthreads();
      for (int64_t q = threadIdx.x; q < dm.LL; q += kThreads) {     // each (i, j) owned by one thread
        const int64_t i = q / dm.L, j = q % dm.L;
        float acc = 0.f;
        for (int64_t e = 0; e < ec; ++e) acc += xs[i * XP + e] * dys[j * XP + e];
        dp[i * dm.LP + j] += acc;
      }
      for (int64_t i = warp; i < dm.L; i += kWarps) {
        float acc = 0.f;
        for (int64_t j = 0; j < dm.L; ++j) acc += p[i * dm.LP + j] * dys[j * XP + lane];
        if (lane < ec) dxm[i * dm.C + eb + lane] = acc;
      }
      __syncthreads();
    }
  }

  // dG[i][j] = P[i][j] (dP[i][j] - sum_i' P[i'][j] dP[i'][j]), in place of dP; also to dg_out.
  for (int64_t col = threadIdx.x; col < tv * dm.L; col += kThreads) {
    const int64_t t = col / dm.L, j = col % dm.L;
    const float* p = ps + t * dm.L * dm.LP + j;
    float* g = ds + t * dm.L * dm.LP + j;
    float* out = dg_out + ((n0 + t) * dm.S + s) * dm.LL + j;
    float dot = 0.f;
    for (int64_t i = 0; i < dm.L; ++i) dot += p[i * dm.LP] * g[i * dm.LP];
    for (int64_t i = 0; i < dm.L; ++i) {
      const float v = p[i * dm.LP] * (g[i * dm.LP] - dot);
      g[i * dm.LP] = v;
      out[i * dm.L] = v;
    }
  }
  __syncthreads();

  // dz[t][m] = sum_q dG[t][q] Wg[q, m]; a thread per m (coalesced rows of Wg). dr[n, l, s*d + k] = dz[l*d + k].
  for (int64_t m = threadIdx.x; m < dm.Ld; m += kThreads) {
    float acc[kMaxTile];
#pragma unroll
    for (int t = 0; t < kMaxTile; ++t) acc[t] = 0.f;
    for (int64_t i = 0; i < dm.L; ++i) {
      for (int64_t j = 0; j < dm.L; ++j) {
        const float w = to_f(wg[(i * dm.L + j) * dm.Ld + m]);
#pragma unroll
        for (int t = 0; t < kMaxTile; ++t)
          if (t < tv) acc[t] += ds[(t * dm.L + i) * dm.LP + j] * w;
      }
    }
    const int64_t l = m / dm.d, k = m % dm.d;
#pragma unroll
    for (int t = 0; t < kMaxTile; ++t)
      if (t < tv) dr_out[((n0 + t) * dm.L + l) * (dm.S * dm.d) + s * dm.d + k] = acc[t];
  }
}

// ---- backward, the rest -------------------------------------------------------------------------------

// grad_x[k, c] = dx_mix[k, c] + sum_m dr[k, m] wc[m, c]; kGradXRows flat rows per block, threads along c.

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_x_kernel(
    int64_t rows, int64_t C, int64_t Sd, const float* __restrict__ dxm, const float* __restrict__ dr,
    const T* __restrict__ wc, Rows<T> gx) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGradXRows;
  const int64_t nr = min(static_cast<int64_t>(kGradXRows), rows - r0);
  for (int64_t idx = threadIdx.x; idx < nr * C; idx += kThreads) {
    const int64_t r = r0 + idx / C, c = idx % C;
    float acc = dxm[r * C + c];
    for (int64_t m = 0; m < Sd; ++m) acc += dr[r * Sd + m] * to_f(wc[m * C + c]);
    gx.data[gx.row(r) + c] = from_f<T>(acc);
  }
}

// partial[p][q][c] = sum_{k in split p} a[k][q] b[k][c], 32 x 32 output tiles, 32 rows of k per step.
// Deterministic: a fixed order inside a block, and the host sums the splits with at::sum.
constexpr int kTile = 32;

template <typename TB>
__global__ void __launch_bounds__(kThreads, 4) splitk_atb_kernel(
    const float* __restrict__ a, int64_t K, int64_t Q, Rows<const TB> b, int64_t cols, int64_t rows_per_split,
    float* __restrict__ partial) {
  __shared__ float as[kTile][kTile + 1];
  __shared__ float bs[kTile][kTile + 1];
  __shared__ int64_t boff[kTile];
  const int64_t tiles_c = (cols + kTile - 1) / kTile;
  const int64_t q0 = (blockIdx.x / tiles_c) * kTile, c0 = (blockIdx.x % tiles_c) * kTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t k_end = min(K, k_begin + rows_per_split);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;   // ty in [0, 8): rows ty, ty+8, ty+16, ty+24
  float acc[kTile / kWarps] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
    if (threadIdx.x < kTile) boff[threadIdx.x] = k0 + threadIdx.x < k_end ? b.row(k0 + threadIdx.x) : 0;
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int kk = idx / kTile, jj = idx % kTile;
      const bool k_ok = k0 + kk < k_end;
      as[kk][jj] = k_ok && q0 + jj < Q ? a[(k0 + kk) * Q + q0 + jj] : 0.f;
      bs[kk][jj] = k_ok && c0 + jj < cols ? to_f(b.data[boff[kk] + c0 + jj]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kTile; ++kk) {
      const float bv = bs[kk][tx];
#pragma unroll
      for (int r = 0; r < kTile / kWarps; ++r) acc[r] += as[kk][ty + kWarps * r] * bv;
    }
    // No barrier: the next step writes boff (which this one no longer reads), then as and bs after its first barrier.
  }
  float* out = partial + static_cast<int64_t>(blockIdx.y) * Q * cols;
#pragma unroll
  for (int r = 0; r < kTile / kWarps; ++r) {
    const int64_t q = q0 + ty + kWarps * r, c = c0 + tx;
    if (q < Q && c < cols) out[q * cols + c] = acc[r];
  }
}

// The same product on tensor cores: a block owns a 64 (q) x 32 (c) tile of the output, a warp one 16 x 16 tile
// of it; each step stages 32 rows of k of a and b as operands T (fp32 a rounded), then A = a^T (column-major
// view of the staged [k][q]) and B = b ([k][c]). Deterministic like splitk_atb_kernel.

template <typename TA, typename TB, typename T>
__global__ void __launch_bounds__(kThreads) splitk_atb_tc_kernel(
    const TA* __restrict__ a, int64_t K, int64_t Q, Rows<const TB> b, int64_t cols, int64_t rows_per_split,
    float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int KS = Wmma<T>::k, AP = kAtbQ + 8, BP = kAtbC + 8;   // row strides: 16-byte multiples, 32-byte tiles
  struct alignas(128) Staged {                        // WMMA pointers must be 32-byte aligned
    T a[kAtbK * AP];
    T b[kAtbK * BP];
    float scratch[kWarps * 256];
    int64_t boff[kAtbK];
  };
  __shared__ Staged st;
  T* as = st.a;
  T* bs = st.b;
  int64_t* boff = st.boff;
  const int64_t tiles_c = (cols + kAtbC - 1) / kAtbC;
  const int64_t q0 = (blockIdx.x / tiles_c) * kAtbQ, c0 = (blockIdx.x % tiles_c) * kAtbC;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t k_end = min(K, k_begin + rows_per_split);
  const int warp = threadIdx.x / 32;
  const int64_t wq = (warp / 2) * 16, wc = (warp % 2) * 16;      // this warp's tile inside the block's
  FragAcc<T> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kAtbK) {
    if (threadIdx.x < kAtbK) boff[threadIdx.x] = k0 + threadIdx.x < k_end ? b.row(k0 + threadIdx.x) : 0;
    __syncthreads();
    for (int idx = threadIdx.x; idx < kAtbK * kAtbQ; idx += kThreads) {
      const int kk = idx / kAtbQ, jj = idx % kAtbQ;
      as[kk * AP + jj] = from_f<T>(k0 + kk < k_end && q0 + jj < Q ? to_f(a[(k0 + kk) * Q + q0 + jj]) : 0.f);
    }
    for (int idx = threadIdx.x; idx < kAtbK * kAtbC; idx += kThreads) {
      const int kk = idx / kAtbC, jj = idx % kAtbC;
      bs[kk * BP + jj] = from_f<T>(k0 + kk < k_end && c0 + jj < cols ? to_f(b.data[boff[kk] + c0 + jj]) : 0.f);
    }
    __syncthreads();
    mma_k<T, wmma::col_major, wmma::row_major>(acc, as + wq, AP, KS * AP, bs + wc, BP, KS * BP, kAtbK / KS);
    // No barrier: the next step writes boff (which this one no longer reads), then as and bs after its first barrier.
  }
  float* out = partial + static_cast<int64_t>(blockIdx.y) * Q * cols;
  scatter_tile(acc, st.scratch + warp * 256,
               [&](int r, int c, int64_t* off) {
                 const int64_t q = q0 + wq + r, cc = c0 + wc + c;
                 *off = q * cols + cc;
                 return q < Q && cc < cols;
               },
               [&](int64_t off, float v) { out[off] = v; });
#endif
}

// grad_x on tensor cores: a block owns 64 flat rows x 32 channels of grad_x, a warp a 16 x 16 tile; each step
// stages 32 reduced values of dr (rounded to T) and of Wc. grad_x = dx_mix + dr Wc, added in fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_x_tc_kernel(
    int64_t rows, int64_t C, int64_t Sd, const T* __restrict__ dxm, const float* __restrict__ dr,
    const T* __restrict__ wc, Rows<T> gx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int KS = Wmma<T>::k, AP = kAtbK + 8, BP = kAtbC + 8;
  struct alignas(128) Staged {                        // WMMA pointers must be 32-byte aligned
    T a[kAtbQ * AP];                                  // [row][m]
    T b[kAtbK * BP];                                  // [m][c]
    float scratch[kWarps * 256];
  };
  __shared__ Staged st;
  const int64_t tiles_c = (C + kAtbC - 1) / kAtbC;
  const int64_t r0 = (blockIdx.x / tiles_c) * kAtbQ, c0 = (blockIdx.x % tiles_c) * kAtbC;
  const int warp = threadIdx.x / 32;
  const int64_t wr = (warp / 2) * 16, wc0 = (warp % 2) * 16;
  FragAcc<T> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int64_t m0 = 0; m0 < Sd; m0 += kAtbK) {
    for (int idx = threadIdx.x; idx < kAtbQ * kAtbK; idx += kThreads) {
      const int rr = idx / kAtbK, mm = idx % kAtbK;
      st.a[rr * AP + mm] = from_f<T>(r0 + rr < rows && m0 + mm < Sd ? dr[(r0 + rr) * Sd + m0 + mm] : 0.f);
    }
    for (int idx = threadIdx.x; idx < kAtbK * kAtbC; idx += kThreads) {
      const int mm = idx / kAtbC, cc = idx % kAtbC;
      st.b[mm * BP + cc] = m0 + mm < Sd && c0 + cc < C ? wc[(m0 + mm) * C + c0 + cc] : from_f<T>(0.f);
    }
    __syncthreads();
    mma_k<T, wmma::row_major, wmma::row_major>(acc, st.a + wr * AP, AP, KS, st.b + wc0, BP, KS * BP, kAtbK / KS);
    __syncthreads();                                  // the staged tiles are overwritten next step
  }
  scatter_tile(acc, st.scratch + warp * 256,
               [&](int r, int c, int64_t* off) {
                 const int64_t row = r0 + wr + r, cc = c0 + wc0 + c;
                 *off = row * C + cc;
                 return row < rows && cc < C;
               },
               [&](int64_t off, float v) {
                 const int64_t row = off / C, cc = off % C;
                 gx.data[gx.row(row) + cc] = from_f<T>(v + to_f(dxm[off]));
               });
#endif
}

// ---- launchers ----------------------------------------------------------------------------------------

void set_smem(const void* kernel, size_t smem) {
  STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

int64_t fused_blocks(const MixDims& dm) { return (dm.N + dm.ts - 1) / dm.ts * dm.S; }

template <typename T>
void forward_impl(const MixDims& dm, RowsArg x, const void* wc, const void* bc, const void* wgT, const void* bg,
                  RowsArg y, size_t smem, cudaStream_t stream) {
  set_smem(reinterpret_cast<const void*>(&mix_forward_kernel<T>), smem);
  DMX_LAUNCH(mix_forward_kernel<T>, static_cast<unsigned>(fused_blocks(dm)), smem, stream,
      dm, typed<const T>(x), static_cast<const T*>(wc), static_cast<const T*>(bc), static_cast<const T*>(wgT),
      static_cast<const T*>(bg), typed<T>(y));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward_tc_impl(const MixDims& dm, const TcDims& tc, RowsArg x, const void* wc_pad, const void* bc,
                     const void* wgT_pad, const void* bg, RowsArg y, cudaStream_t stream) {
  set_smem(reinterpret_cast<const void*>(&mix_forward_tc_kernel<T>), tc.bytes);
  DMX_LAUNCH(mix_forward_tc_kernel<T>, static_cast<unsigned>((dm.N + tc.ts - 1) / tc.ts), tc.bytes, stream,
      dm, tc, typed<const T>(x), static_cast<const T*>(wc_pad), static_cast<const T*>(bc),
      static_cast<const T*>(wgT_pad), static_cast<const T*>(bg), typed<T>(y));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void backward_tc_impl(const MixDims& dm, const TcDims& tc, RowsArg dy, RowsArg x, const void* wc_pad, const void* bc,
                      const void* wgT_pad, const void* bg, const void* wg_pad, float* z, void* dg, float* dr,
                      void* dxm, float* dbg_partial, cudaStream_t stream) {
  set_smem(reinterpret_cast<const void*>(&mix_backward_tc_kernel<T>), tc.bytes);
  DMX_LAUNCH(mix_backward_tc_kernel<T>, static_cast<unsigned>((dm.N + tc.ts - 1) / tc.ts), tc.bytes, stream,
      dm, tc, typed<const T>(dy), typed<const T>(x), static_cast<const T*>(wc_pad), static_cast<const T*>(bc),
      static_cast<const T*>(wgT_pad), static_cast<const T*>(bg), static_cast<const T*>(wg_pad), z,
      static_cast<T*>(dg), dr, static_cast<T*>(dxm), dbg_partial);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void backward_impl(const MixDims& dm, RowsArg dy, RowsArg x, const void* wc, const void* bc, const void* wgT,
                   const void* bg, const void* wg, float* z, float* dg, float* dr, float* dxm, size_t smem,
                   cudaStream_t stream) {
  set_smem(reinterpret_cast<const void*>(&mix_backward_kernel<T>), smem);
  DMX_LAUNCH(mix_backward_kernel<T>, static_cast<unsigned>(fused_blocks(dm)), smem, stream,
      dm, typed<const T>(dy), typed<const T>(x), static_cast<const T*>(wc), static_cast<const T*>(bc),
      static_cast<const T*>(wgT), static_cast<const T*>(bg), static_cast<const T*>(wg), z, dg, dr, dxm);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void grad_x_impl(const MixDims& dm, const float* dxm, const float* dr, const void* wc, RowsArg gx,
                 cudaStream_t stream) {
  const int64_t rows = dm.N * dm.L;
  DMX_LAUNCH(grad_x_kernel<T>, static_cast<unsigned>((rows + kGradXRows - 1) / kGradXRows), 0, stream,
      rows, dm.C, dm.S * dm.d, dxm, dr, static_cast<const T*>(wc), typed<T>(gx));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TB>
void splitk_impl(const float* a, int64_t K, int64_t Q, RowsArg b, int64_t cols, int64_t splits,
                 int64_t rows_per_split, float* partial, cudaStream_t stream) {
  const int64_t tiles = (Q + kTile - 1) / kTile * ((cols + kTile - 1) / kTile);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  DMX_LAUNCH(splitk_atb_kernel<TB>, grid, 0, stream, a, K, Q, typed<const TB>(b), cols, rows_per_split, partial);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void grad_x_tc_impl(const MixDims& dm, const void* dxm, const float* dr, const void* wc, RowsArg gx,
                    cudaStream_t stream) {
  const int64_t rows = dm.N * dm.L;
  const int64_t tiles = (rows + kAtbQ - 1) / kAtbQ * ((dm.C + kAtbC - 1) / kAtbC);
  DMX_LAUNCH(grad_x_tc_kernel<T>, static_cast<unsigned>(tiles), 0, stream, rows, dm.C, dm.S * dm.d,
             static_cast<const T*>(dxm), dr, static_cast<const T*>(wc), typed<T>(gx));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TA, typename TB, typename T>
void splitk_tc_impl(const void* a, int64_t K, int64_t Q, RowsArg b, int64_t cols, int64_t splits,
                    int64_t rows_per_split, float* partial, cudaStream_t stream) {
  const int64_t tiles = (Q + kAtbQ - 1) / kAtbQ * ((cols + kAtbC - 1) / kAtbC);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  DMX_LAUNCH((splitk_atb_tc_kernel<TA, TB, T>), grid, 0, stream, static_cast<const TA*>(a), K, Q, typed<const TB>(b),
             cols, rows_per_split, partial);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_grad_x_tc(DType dtype, const MixDims& dm, const void* dxm, const float* dr, const void* wc, RowsArg gx,
                      cudaStream_t stream) {
  switch (dtype) {
    case DType::Float: return grad_x_tc_impl<float>(dm, dxm, dr, wc, gx, stream);
    case DType::Half: return grad_x_tc_impl<__half>(dm, dxm, dr, wc, gx, stream);
    case DType::BFloat16: return grad_x_tc_impl<__nv_bfloat16>(dm, dxm, dr, wc, gx, stream);
  }
}

void launch_splitk_atb_tc(DType operand, DType a_dtype, DType b_dtype, const void* a, int64_t K, int64_t Q, RowsArg b,
                          int64_t cols, int64_t splits, int64_t rows_per_split, float* partial, cudaStream_t stream) {
  // dWg: a = dG (operand type), b = z (fp32); dWc: a = dr (fp32), b = x (operand type); tf32: all fp32.
  STD_TORCH_CHECK((a_dtype == DType::Float || a_dtype == operand) &&
                      (b_dtype == DType::Float || b_dtype == operand),
                  "dynamixer_ops (cuda): split-K operands must be fp32 or of the operand dtype");
  const bool a32 = a_dtype == DType::Float;
  switch (operand) {
    case DType::Float:
      return splitk_tc_impl<float, float, float>(a, K, Q, b, cols, splits, rows_per_split, partial, stream);
    case DType::Half:
      return a32 ? splitk_tc_impl<float, __half, __half>(a, K, Q, b, cols, splits, rows_per_split, partial, stream)
                 : splitk_tc_impl<__half, float, __half>(a, K, Q, b, cols, splits, rows_per_split, partial, stream);
    case DType::BFloat16:
      return a32 ? splitk_tc_impl<float, __nv_bfloat16, __nv_bfloat16>(a, K, Q, b, cols, splits, rows_per_split,
                                                                         partial, stream)
                 : splitk_tc_impl<__nv_bfloat16, float, __nv_bfloat16>(a, K, Q, b, cols, splits, rows_per_split,
                                                                         partial, stream);
  }
}

void launch_forward(DType dtype, const MixDims& dm, RowsArg x, const void* wc, const void* bc, const void* wgT,
                    const void* bg, RowsArg y, size_t smem, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float: return forward_impl<float>(dm, x, wc, bc, wgT, bg, y, smem, stream);
    case DType::Half: return forward_impl<__half>(dm, x, wc, bc, wgT, bg, y, smem, stream);
    case DType::BFloat16: return forward_impl<__nv_bfloat16>(dm, x, wc, bc, wgT, bg, y, smem, stream);
  }
}

void launch_forward_tc(DType dtype, const MixDims& dm, const TcDims& tc, RowsArg x, const void* wc_pad,
                       const void* bc, const void* wgT_pad, const void* bg, RowsArg y, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float: return forward_tc_impl<float>(dm, tc, x, wc_pad, bc, wgT_pad, bg, y, stream);
    case DType::Half: return forward_tc_impl<__half>(dm, tc, x, wc_pad, bc, wgT_pad, bg, y, stream);
    case DType::BFloat16: return forward_tc_impl<__nv_bfloat16>(dm, tc, x, wc_pad, bc, wgT_pad, bg, y, stream);
  }
}

void launch_backward(DType dtype, const MixDims& dm, RowsArg dy, RowsArg x, const void* wc, const void* bc,
                     const void* wgT, const void* bg, const void* wg, float* z, float* dg, float* dr, float* dxm,
                     size_t smem, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float: return backward_impl<float>(dm, dy, x, wc, bc, wgT, bg, wg, z, dg, dr, dxm, smem, stream);
    case DType::Half: return backward_impl<__half>(dm, dy, x, wc, bc, wgT, bg, wg, z, dg, dr, dxm, smem, stream);
    case DType::BFloat16:
      return backward_impl<__nv_bfloat16>(dm, dy, x, wc, bc, wgT, bg, wg, z, dg, dr, dxm, smem, stream);
  }
}

void launch_backward_tc(DType dtype, const MixDims& dm, const TcDims& tc, RowsArg dy, RowsArg x, const void* wc_pad,
                        const void* bc, const void* wgT_pad, const void* bg, const void* wg_pad, float* z, void* dg,
                        float* dr, void* dxm, float* dbg_partial, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float:
      return backward_tc_impl<float>(dm, tc, dy, x, wc_pad, bc, wgT_pad, bg, wg_pad, z, dg, dr, dxm, dbg_partial,
                                     stream);
    case DType::Half:
      return backward_tc_impl<__half>(dm, tc, dy, x, wc_pad, bc, wgT_pad, bg, wg_pad, z, dg, dr, dxm, dbg_partial,
                                      stream);
    case DType::BFloat16:
      return backward_tc_impl<__nv_bfloat16>(dm, tc, dy, x, wc_pad, bc, wgT_pad, bg, wg_pad, z, dg, dr, dxm,
                                             dbg_partial, stream);
  }
}

void launch_grad_x(DType dtype, const MixDims& dm, const float* dxm, const float* dr, const void* wc, RowsArg gx,
                   cudaStream_t stream) {
  switch (dtype) {
    case DType::Float: return grad_x_impl<float>(dm, dxm, dr, wc, gx, stream);
    case DType::Half: return grad_x_impl<__half>(dm, dxm, dr, wc, gx, stream);
    case DType::BFloat16: return grad_x_impl<__nv_bfloat16>(dm, dxm, dr, wc, gx, stream);
  }
}

void launch_splitk_atb(DType b_dtype, const float* a, int64_t K, int64_t Q, RowsArg b, int64_t cols,
                       int64_t splits, int64_t rows_per_split, float* partial, cudaStream_t stream) {
  switch (b_dtype) {
    case DType::Float: return splitk_impl<float>(a, K, Q, b, cols, splits, rows_per_split, partial, stream);
    case DType::Half: return splitk_impl<__half>(a, K, Q, b, cols, splits, rows_per_split, partial, stream);
    case DType::BFloat16:
      return splitk_impl<__nv_bfloat16>(a, K, Q, b, cols, splits, rows_per_split, partial, stream);
  }
}

}  // namespace cuda
}  // namespace dynamixer_ops
