// The interface between the host code (dynamic_mix_cuda_host.cpp: checks, workspaces, TORCH_LIBRARY_IMPL) and the
// kernels (dynamic_mix_cuda.cu). Plain C++ only, so that nvcc never parses the ATen headers (build time).
#pragma once
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

// partial[p, q, c] = sum over rows k of split p of a[k, q] * b[k, c]; a is fp32 contiguous (K, Q), b has
// b_dtype and K flat rows of `cols` columns. Splits cover [p * rows_per_split, (p + 1) * rows_per_split).
void launch_splitk_atb(DType b_dtype, const float* a, int64_t K, int64_t Q, RowsArg b, int64_t cols,
                       int64_t splits, int64_t rows_per_split, float* partial, cudaStream_t stream);

}  // namespace cuda
}  // namespace dynamixer_ops
