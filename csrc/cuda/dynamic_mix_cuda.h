// The interface between the host code (dynamic_mix_cuda_host.cpp: checks, workspaces, TORCH_LIBRARY_IMPL) and the
// kernels (dynamic_mix_cuda.cu). Plain C++ only, so that nvcc never parses the ATen headers (build time).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace dynamixer_ops {
namespace cuda {

enum class DType { Float, Half, BFloat16 };

constexpr int kThreads = 256;   // threads per block, every kernel
constexpr int kMaxTile = 8;     // most sequences per block in the fused kernels (register arrays are this long)
constexpr int kChunk = 32;      // channels of one segment staged at a time (one per lane)
constexpr int kGradXRows = 8;   // flat rows of grad_x per block
// Tiles of the tensor-core split-K and grad_x kernels: kAtbQ x kAtbC outputs per block, kAtbK deep per step.
constexpr int kAtbQ = 64, kAtbC = 32, kAtbK = 32;

// Flat row k = n * L + l of a 4-D (A, B, L, C) tensor with unit last stride, n = a * B + b.
// A 2-D contiguous (K, C) buffer is the case L = 1, B = 1, sA = C.
struct RowsArg {
  const void* data;
  int64_t L, B;          // sizes of dims 2 and 1
  int64_t sA, sB, sL;    // strides of dims 0, 1, 2 (elements)
};

// Sizes of one call (see docs/dynamic_mix.md). Ld = L * d, LL = L * L, LP = padded row length of the L x L tiles.
struct MixDims {
  int64_t N, L, C, S, d, e0;
  int64_t Ld, LL, LP;
  int64_t ts;            // sequences per block, 1..kMaxTile
};

inline int64_t padded_row(int64_t L) { return L | 1; }   // odd: a column walk over i hits distinct banks

// Dynamic shared memory (bytes) of the fused kernels for a tile of ts sequences.
inline size_t forward_smem_bytes(int64_t L, int64_t d, int64_t ts) {
  const int64_t LP = padded_row(L);
  return sizeof(float) * static_cast<size_t>(ts * L * d + ts * L * LP + L * kChunk);
}
inline size_t backward_smem_bytes(int64_t L, int64_t d, int64_t ts) {
  const int64_t LP = padded_row(L);
  return sizeof(float) * static_cast<size_t>(ts * L * d + 2 * ts * L * LP + 2 * L * (kChunk + 1));
}

// ---- the tensor-core kernels (WMMA: 16x16x16 tiles in fp16/bf16, 16x16x8 in tf32; fp32 accumulators) --------
//
// A block takes ts sequences and all S segments: the reduce is one product (ts*Lp token rows) x (S*e0p channels)
// x (SDp reduced values); the generate one per 16 (sequence, segment) rows, (16 x Ldp) x (Ldp x LLp); the apply
// per row, P^T (Lp x Lp) x x_s (Lp x e0p); the backward's dP = x_s dy_s^T and dx_mix = P dy_s per row, and
// dz = dG Wg per 16 rows. Every size is padded to 16 with zeros (the padded weights come from the host); padded
// source tokens get P = 0, padded targets and channels are not stored.
inline int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

struct TcDims {
  int64_t Lp, e0p, SDp, Ldp, LLp;   // L, C/S, S*d, L*d, L*L rounded up to 16
  int64_t ts;                       // sequences per block: ceil(16 / S), so a block's rows fill one 16-row tile
  int64_t rows;                     // ts * S rounded up to 16: rows of z
  int64_t scratch;                  // floats of scratch per warp
  // Byte offsets of the shared-memory regions (each 128-byte aligned; dy and the generate-bias gradient's
  // fp32 sums only in the backward) and the total.
  size_t x_off, dy_off, z_off, g_off, p_off, scratch_off, dbg_off, bytes;
};

inline size_t align128(size_t v) { return (v + 127) / 128 * 128; }

// The one definition of the tensor-core kernels' sizes and shared memory (elem: bytes of an operand element,
// 2 for fp16/bf16, 4 for tf32 from fp32). tools/cuda_resource_usage.py and the tests read it (a compiled host
// program; tools/cuda_emu's smem_bytes), not a copy of the formula.
inline TcDims tc_dims(int64_t L, int64_t C, int64_t S, int64_t d, size_t elem, bool backward) {
  TcDims tc;
  tc.Lp = round16(L); tc.e0p = round16(C / S); tc.SDp = round16(S * d); tc.Ldp = round16(L * d);
  tc.LLp = round16(L * L);
  tc.ts = (16 + S - 1) / S;
  tc.rows = round16(tc.ts * S);
  // Forward: a 16 x 16 fp32 output tile per warp. Backward: also one row's dP / dG (Lp x Lp fp32).
  tc.scratch = 256 + (backward ? tc.Lp * tc.Lp : 0);
  const size_t x_bytes = elem * static_cast<size_t>(tc.ts * tc.Lp * S * tc.e0p);
  const size_t z_bytes = elem * static_cast<size_t>(tc.rows * tc.Ldp);
  // The logits (then P) of 16 rows in fp32; before them the reduce's fp32 output, ts*Lp rows of SDp.
  const size_t g_bytes = sizeof(float) * static_cast<size_t>(std::max(16 * tc.LLp, tc.ts * tc.Lp * tc.SDp));
  // P of 16 rows as operands, Lp x Lp each (the backward then puts a row's dG there, L*L <= Lp*Lp).
  const size_t p_bytes = elem * static_cast<size_t>(16 * tc.Lp * tc.Lp);
  const size_t scratch_bytes = sizeof(float) * static_cast<size_t>(tc.scratch * (kThreads / 32));
  tc.x_off = 0;
  tc.dy_off = align128(tc.x_off + x_bytes);
  tc.z_off = align128(tc.dy_off + (backward ? x_bytes : 0));
  tc.g_off = align128(tc.z_off + z_bytes);
  tc.p_off = align128(tc.g_off + g_bytes);
  tc.scratch_off = align128(tc.p_off + p_bytes);
  tc.dbg_off = align128(tc.scratch_off + scratch_bytes);
  tc.bytes = tc.dbg_off + (backward ? sizeof(float) * static_cast<size_t>(tc.LLp) : 0);
  return tc;
}

// y = mix(x) on tensor cores. wc_pad: (SDp, S*e0p), wc_pad[m][s*e0p + e] = Wc[m][s*e0 + e], zero elsewhere;
// wgT_pad: (Ldp, LLp), Wg transposed, zero elsewhere; both in x's dtype. bc, bg as given.
void launch_forward_tc(DType dtype, const MixDims& dm, const TcDims& tc, RowsArg x, const void* wc_pad,
                       const void* bc, const void* wgT_pad, const void* bg, RowsArg y, cudaStream_t stream);

// The fused part of the backward on tensor cores: launch_backward's outputs, but dG and dx_mix in x's dtype (the
// operands of the products that read them next: half the bytes of fp32 for fp16/bf16), and the generate bias's
// gradient summed in fp32 per block: dbg_partial (blocks, L*L). wg_pad: (LLp, Ldp), Wg zero-padded, x's dtype.
void launch_backward_tc(DType dtype, const MixDims& dm, const TcDims& tc, RowsArg grad_y, RowsArg x,
                        const void* wc_pad, const void* bc, const void* wgT_pad, const void* bg, const void* wg_pad,
                        float* z, void* dg, float* dr, void* dx_mix, float* dbg_partial, cudaStream_t stream);

// y = mix(x). wgT is generate_weight transposed, contiguous (L*d, L*L). y is written through `y.data`.
void launch_forward(DType dtype, const MixDims& dm, RowsArg x, const void* wc, const void* bc, const void* wgT,
                    const void* bg, RowsArg y, size_t smem, cudaStream_t stream);

// The fused part of the backward. Writes, all in fp32: z (N*S, L*d), dG (N*S, L*L), dr (N*L, S*d) and
// dx_mix (N*L, C); rows of z and dG are n * S + s.
void launch_backward(DType dtype, const MixDims& dm, RowsArg grad_y, RowsArg x, const void* wc, const void* bc,
                     const void* wgT, const void* bg, const void* wg, float* z, float* dg, float* dr, float* dx_mix,
                     size_t smem, cudaStream_t stream);

// grad_x[k, c] = dx_mix[k, c] + sum_m dr[k, m] wc[m, c], for the N*L flat rows k of grad_x.
void launch_grad_x(DType dtype, const MixDims& dm, const float* dx_mix, const float* dr, const void* wc,
                   RowsArg grad_x, cudaStream_t stream);

// The same on tensor cores, for the tensor-core backward: dx_mix of x's dtype, dr and wc rounded to it (tf32 for
// fp32), fp32 accumulation; 64 x 32 tiles of grad_x per block.
void launch_grad_x_tc(DType dtype, const MixDims& dm, const void* dx_mix, const float* dr, const void* wc,
                      RowsArg grad_x, cudaStream_t stream);

// partial[p, q, c] = sum over rows k of split p of a[k, q] * b[k, c]; a is fp32 contiguous (K, Q), b has
// b_dtype and K flat rows of `cols` columns. Splits cover [p * rows_per_split, (p + 1) * rows_per_split).
void launch_splitk_atb(DType b_dtype, const float* a, int64_t K, int64_t Q, RowsArg b, int64_t cols,
                       int64_t splits, int64_t rows_per_split, float* partial, cudaStream_t stream);

// The same product on tensor cores: a and b rounded to `operand` (fp16 / bf16, or tf32 for Float), fp32
// accumulation; 64 x 32 output tiles, 32 rows of k per step. rows_per_split must be a multiple of 32. a has
// a_dtype (fp32, or the operand type); one of a and b is fp32 and the other has the operand type.
void launch_splitk_atb_tc(DType operand, DType a_dtype, DType b_dtype, const void* a, int64_t K, int64_t Q, RowsArg b,
                          int64_t cols, int64_t splits, int64_t rows_per_split, float* partial, cudaStream_t stream);

}  // namespace cuda
}  // namespace dynamixer_ops
