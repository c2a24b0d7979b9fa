// The CUDA implementations of dynamixer_ops_C::mix_forward / mix_backward: argument checks, shared-memory
// sizing, fp32 workspaces and the deterministic weight-gradient reductions. The kernels are in
// dynamic_mix_cuda.cu; this file is compiled by the host compiler (nvcc never parses the ATen headers).
// With DMX_EMULATE (tools/cuda_emu) only the device-independent core is compiled: run_forward / run_backward.
#include <algorithm>
#include <climits>

#ifndef DMX_EMULATE
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "dynamic_mix.h"
#include "cuda/dynamic_mix_cuda.h"

namespace dynamixer_ops {
namespace {

using cuda::DType;
using cuda::MixDims;
using cuda::RowsArg;

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "dynamixer_ops (cuda): x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return DType::Float;   // unreachable
}

RowsArg rows_of(const at::Tensor& t) {      // t: 4-D (A, B, L, C) with unit last stride
  return RowsArg{t.data_ptr(), t.size(2), t.size(1), t.stride(0), t.stride(1), t.stride(2)};
}

RowsArg rows_of_matrix(const at::Tensor& t) {   // t: contiguous 2-D (K, C)
  return RowsArg{t.data_ptr(), 1, 1, t.size(1), 0, 0};
}

// The sizes of one call plus the tile of sequences per block: the largest (<= kMaxTile) whose shared memory
// fits the device's opt-in limit per block.
MixDims plan(const MixShape& sh, bool backward, int smem_limit, size_t* smem) {
  MixDims dm;
  dm.N = sh.sequences(); dm.L = sh.L; dm.C = sh.C; dm.S = sh.S; dm.d = sh.d; dm.e0 = sh.e0;
  dm.Ld = sh.L * sh.d; dm.LL = sh.L * sh.L; dm.LP = cuda::padded_row(sh.L);
  // Keeps the size arithmetic below far from overflow; the shared-memory check is the real limit.
  TORCH_CHECK(sh.L <= 4096 && sh.d <= (int64_t{1} << 20),
              "dynamixer_ops (cuda): L=", sh.L, " and d=", sh.d, " are far beyond what the kernels support");
  const int64_t limit = smem_limit;
  auto bytes = [&](int64_t ts) {
    return backward ? cuda::backward_smem_bytes(sh.L, sh.d, ts) : cuda::forward_smem_bytes(sh.L, sh.d, ts);
  };
  dm.ts = std::min<int64_t>(cuda::kMaxTile, dm.N);
  while (dm.ts > 1 && bytes(dm.ts) > static_cast<size_t>(limit)) --dm.ts;
  TORCH_CHECK(bytes(dm.ts) <= static_cast<size_t>(limit), "dynamixer_ops (cuda): the ",
              backward ? "backward" : "forward", " kernel needs ", bytes(dm.ts),
              " bytes of shared memory per block for L=", sh.L, " and d=", sh.d, ", but the device allows ",
              limit, "; use a shorter sequence (smaller L or d) or the 'reference' backend");
  const int64_t blocks = (dm.N + dm.ts - 1) / dm.ts * dm.S;
  const int64_t grad_x_blocks = (dm.N * dm.L + cuda::kGradXRows - 1) / cuda::kGradXRows;
  TORCH_CHECK(blocks <= INT_MAX && grad_x_blocks <= INT_MAX, "dynamixer_ops (cuda): ", dm.N, " sequences of ", dm.L,
              " tokens in ", dm.S, " segments need more than 2^31-1 blocks; split the batch");
  *smem = bytes(dm.ts);
  return dm;
}

// Which kernels run: the tensor-core ones for fp16/bf16 inputs, and for fp32 inputs when `tf32` (torch's
// allow_tf32 for CUDA matmuls); the exact SIMT ones for fp32 otherwise, on devices older than sm_80, and where
// the tensor-core tiles do not fit the device's shared memory (e.g. L = 64, or L = 32 with fp32 on an A100: the
// SIMT kernels' tiles are smaller). Forward and backward decide alone (the backward's tiles are larger); the
// backward's weight-gradient reductions follow its fused kernel.
enum class Path { TensorCores, Simt };

Path choose_path(const MixShape& sh, DType dtype, bool backward, bool tf32, bool has_tensor_cores, int smem_limit) {
  if (!has_tensor_cores || (dtype == DType::Float && !tf32)) return Path::Simt;
  const size_t elem = dtype == DType::Float ? 4 : 2;
  const cuda::TcDims tc = cuda::tc_dims(sh.L, sh.C, sh.S, sh.d, elem, backward);
  const int64_t blocks = (sh.sequences() + tc.ts - 1) / tc.ts;
  const int64_t rows = sh.sequences() * sh.L;                 // grad_x_tc_kernel's grid
  const int64_t grad_x_blocks = (rows + cuda::kAtbQ - 1) / cuda::kAtbQ * ((sh.C + cuda::kAtbC - 1) / cuda::kAtbC);
  return tc.bytes <= static_cast<size_t>(smem_limit) && blocks <= INT_MAX && (!backward || grad_x_blocks <= INT_MAX)
             ? Path::TensorCores : Path::Simt;
}

// Zero-padded weights in the tensor-core tiles' layout (tiny: the weights, not the activations).
struct PaddedWeights {
  at::Tensor wc_pad, wgT_pad, wg_pad;   // (SDp, S, e0p), (Ldp, LLp), (LLp, Ldp); wg_pad only for the backward
};

PaddedWeights pad_weights(const MixShape& sh, const cuda::TcDims& tc, const at::Tensor& compress_weight,
                          const at::Tensor& generate_weight, bool backward) {
  PaddedWeights w;
  w.wc_pad = at::zeros({tc.SDp, sh.S, tc.e0p}, compress_weight.options());
  w.wc_pad.narrow(0, 0, sh.S * sh.d).narrow(2, 0, sh.e0).copy_(compress_weight.view({sh.S * sh.d, sh.S, sh.e0}));
  w.wgT_pad = at::zeros({tc.Ldp, tc.LLp}, generate_weight.options());
  w.wgT_pad.narrow(0, 0, sh.L * sh.d).narrow(1, 0, sh.L * sh.L).copy_(generate_weight.t());
  if (backward) {
    w.wg_pad = at::zeros({tc.LLp, tc.Ldp}, generate_weight.options());
    w.wg_pad.narrow(0, 0, sh.L * sh.L).narrow(1, 0, sh.L * sh.d).copy_(generate_weight);
  }
  return w;
}

// out (Q, cols) = (a^T b).to(out's dtype), a: fp32 contiguous (K, Q), b: K flat rows. Per-block fp32
// partial sums over fixed slices of K, then at::sum over the slices: the same bits on every run. On tensor cores
// (operands rounded to `operand`) where `path` says so (the fused backward's path: its intermediates' dtypes
// match), else SIMT in fp32.
void reduce_atb(const at::Tensor& a, DType a_dtype, RowsArg b, DType b_dtype, int64_t cols, at::Tensor& out,
                Path path, DType operand, cudaStream_t stream) {
  const int64_t K = a.size(0), Q = a.size(1);
  const int64_t tiles = (Q + 31) / 32 * ((cols + 31) / 32);
  const int64_t k_steps = (K + 31) / 32;
  // About 1024 blocks in all, every split at least 8 steps of 32 rows, at most 65535 splits (grid.y).
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(1024 / std::max<int64_t>(tiles, 1), k_steps / 8));
  int64_t rows_per_split = (k_steps + splits - 1) / splits * 32;
  while ((K + rows_per_split - 1) / rows_per_split > 65535) rows_per_split *= 2;
  splits = (K + rows_per_split - 1) / rows_per_split;
  TORCH_CHECK(tiles <= INT_MAX, "dynamixer_ops (cuda): weight gradient of ", Q, " x ", cols, " is too large");
  at::Tensor partial = at::empty({splits, Q, cols}, a.options().dtype(at::kFloat));
  if (path == Path::TensorCores) {
    cuda::launch_splitk_atb_tc(operand, a_dtype, b_dtype, a.data_ptr(), K, Q, b, cols, splits, rows_per_split,
                               partial.data_ptr<float>(), stream);
  } else {
    cuda::launch_splitk_atb(b_dtype, a.data_ptr<float>(), K, Q, b, cols, splits, rows_per_split,
                            partial.data_ptr<float>(), stream);
  }
  out.copy_(partial.sum(0));
}

void check_grad(const at::Tensor& g, const at::Tensor& w, const char* name) {
  TORCH_CHECK(g.sizes() == w.sizes() && g.scalar_type() == w.scalar_type() && g.device() == w.device(),
              "dynamixer_ops (cuda): ", name, " must match its weight (", w.sizes(), ", ", w.scalar_type(), ", ",
              w.device(), "), got (", g.sizes(), ", ", g.scalar_type(), ", ", g.device(), ")");
}

// The device-independent core: sizes checked, x.numel() > 0, `stream` on x's device.
Path run_forward(const MixShape& sh, const at::Tensor& x, const at::Tensor& compress_weight,
                 const at::Tensor& compress_bias, const at::Tensor& generate_weight, const at::Tensor& generate_bias,
                 at::Tensor& y, int smem_limit, bool tf32, bool has_tensor_cores, cudaStream_t stream) {
  size_t smem = 0;
  const MixDims dm = plan(sh, /*backward=*/false, smem_limit, &smem);
  const DType dtype = dtype_of(x);
  const Path path = choose_path(sh, dtype, /*backward=*/false, tf32, has_tensor_cores, smem_limit);
  if (path == Path::TensorCores) {
    const cuda::TcDims tc = cuda::tc_dims(sh.L, sh.C, sh.S, sh.d, x.element_size(), /*backward=*/false);
    const PaddedWeights w = pad_weights(sh, tc, compress_weight, generate_weight, /*backward=*/false);
    cuda::launch_forward_tc(dtype, dm, tc, rows_of(x), w.wc_pad.data_ptr(), compress_bias.data_ptr(),
                            w.wgT_pad.data_ptr(), generate_bias.data_ptr(), rows_of(y), stream);
    return path;
  }
  const at::Tensor wgT = generate_weight.t().contiguous();     // (L*d, L*L): coalesced reads by logit
  cuda::launch_forward(dtype, dm, rows_of(x), compress_weight.data_ptr(), compress_bias.data_ptr(),
                       wgT.data_ptr(), generate_bias.data_ptr(), rows_of(y), smem, stream);
  return path;
}

Path run_backward(const MixShape& sh, const at::Tensor& grad_y, const at::Tensor& x,
                  const at::Tensor& compress_weight, const at::Tensor& compress_bias,
                  const at::Tensor& generate_weight, const at::Tensor& generate_bias, at::Tensor& grad_x,
                  at::Tensor& grad_compress_weight, at::Tensor& grad_compress_bias, at::Tensor& grad_generate_weight,
                  at::Tensor& grad_generate_bias, int smem_limit, bool tf32, bool has_tensor_cores,
                  cudaStream_t stream) {
  size_t smem = 0;
  const MixDims dm = plan(sh, /*backward=*/true, smem_limit, &smem);
  const DType dtype = dtype_of(x);
  const Path path = choose_path(sh, dtype, /*backward=*/true, tf32, has_tensor_cores, smem_limit);
  const bool tc_path = path == Path::TensorCores;
  const auto f32 = x.options().dtype(at::kFloat);
  // The tensor-core path keeps dG and dx_mix in x's dtype: the operands of the products that read them next.
  const auto inter = tc_path ? x.options() : f32;
  const DType inter_dtype = tc_path ? dtype : DType::Float;
  at::Tensor z = at::empty({dm.N * dm.S, dm.Ld}, f32);
  at::Tensor dg = at::empty({dm.N * dm.S, dm.LL}, inter);
  at::Tensor dr = at::empty({dm.N * dm.L, dm.S * dm.d}, f32);
  at::Tensor dx_mix = at::empty({dm.N * dm.L, dm.C}, inter);
#ifdef DMX_EMULATE
  for (at::Tensor* t : {&z, &dg, &dr, &dx_mix}) t->fill_(NAN);   // an element the kernels do not write shows
#endif
  if (tc_path) {
    const cuda::TcDims tc = cuda::tc_dims(sh.L, sh.C, sh.S, sh.d, x.element_size(), /*backward=*/true);
    const PaddedWeights w = pad_weights(sh, tc, compress_weight, generate_weight, /*backward=*/true);
    at::Tensor dbg_partial = at::empty({(dm.N + tc.ts - 1) / tc.ts, dm.LL}, f32);
    cuda::launch_backward_tc(dtype, dm, tc, rows_of(grad_y), rows_of(x), w.wc_pad.data_ptr(),
                             compress_bias.data_ptr(), w.wgT_pad.data_ptr(), generate_bias.data_ptr(),
                             w.wg_pad.data_ptr(), z.data_ptr<float>(), dg.data_ptr(), dr.data_ptr<float>(),
                             dx_mix.data_ptr(), dbg_partial.data_ptr<float>(), stream);
    grad_generate_bias.copy_(dbg_partial.sum(0));           // fp32 sums of fp32 dG, not of the rounded copy
  } else {
    const at::Tensor wgT = generate_weight.t().contiguous();
    cuda::launch_backward(dtype, dm, rows_of(grad_y), rows_of(x), compress_weight.data_ptr(),
                          compress_bias.data_ptr(), wgT.data_ptr(), generate_bias.data_ptr(),
                          generate_weight.data_ptr(),
                          z.data_ptr<float>(), dg.data_ptr<float>(), dr.data_ptr<float>(), dx_mix.data_ptr<float>(),
                          smem, stream);
    grad_generate_bias.copy_(dg.sum(0));
  }
  if (tc_path) {
    cuda::launch_grad_x_tc(dtype, dm, dx_mix.data_ptr(), dr.data_ptr<float>(), compress_weight.data_ptr(),
                           rows_of(grad_x), stream);
  } else {
    cuda::launch_grad_x(dtype, dm, dx_mix.data_ptr<float>(), dr.data_ptr<float>(), compress_weight.data_ptr(),
                        rows_of(grad_x), stream);
  }
  reduce_atb(dg, inter_dtype, rows_of_matrix(z), DType::Float, dm.Ld, grad_generate_weight, path, dtype,
             stream);                                                                   // sum dG^T z
  reduce_atb(dr, DType::Float, rows_of(x), dtype, dm.C, grad_compress_weight, path, dtype, stream);   // sum dr^T x
  grad_compress_bias.copy_(dr.sum(0));
  return path;
}

void check_grads(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& compress_weight,
                 const at::Tensor& compress_bias, const at::Tensor& generate_weight, const at::Tensor& generate_bias,
                 const at::Tensor& grad_x, const at::Tensor& grad_compress_weight,
                 const at::Tensor& grad_compress_bias, const at::Tensor& grad_generate_weight,
                 const at::Tensor& grad_generate_bias) {
  check_like(grad_y, x, "grad_y");
  check_like(grad_x, x, "grad_x");
  check_grad(grad_compress_weight, compress_weight, "grad_compress_weight");
  check_grad(grad_compress_bias, compress_bias, "grad_compress_bias");
  check_grad(grad_generate_weight, generate_weight, "grad_generate_weight");
  check_grad(grad_generate_bias, generate_bias, "grad_generate_bias");
}

#ifndef DMX_EMULATE
void check_cuda(const at::Tensor& x) {     // the other tensors' devices: check_mix_contract, check_like
  TORCH_CHECK(x.is_cuda(), "dynamixer_ops (cuda): x must be a CUDA tensor, got one on ", x.device());
}

bool has_tensor_cores(int device) {          // WMMA in bf16 and tf32: sm_80 and newer
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

int smem_limit_of(int device) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}

void mix_forward_cuda(const at::Tensor& x, const at::Tensor& compress_weight, const at::Tensor& compress_bias,
                      const at::Tensor& generate_weight, const at::Tensor& generate_bias, int64_t num_segments,
                      at::Tensor& y) {
  const MixShape sh = check_mix_contract(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                         num_segments);
  check_like(y, x, "y");
  check_cuda(x);
  dtype_of(x);                                 // rejects other dtypes before any work
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  // torch.backends.cuda.matmul.allow_tf32 decides whether fp32 inputs may run on tensor cores as tf32.
  run_forward(sh, x, compress_weight, compress_bias, generate_weight, generate_bias, y, smem_limit_of(x.get_device()),
              at::globalContext().allowTF32CuBLAS(), has_tensor_cores(x.get_device()),
              c10::cuda::getCurrentCUDAStream().stream());
}

void mix_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& compress_weight,
                       const at::Tensor& compress_bias, const at::Tensor& generate_weight,
                       const at::Tensor& generate_bias, int64_t num_segments, at::Tensor& grad_x,
                       at::Tensor& grad_compress_weight, at::Tensor& grad_compress_bias,
                       at::Tensor& grad_generate_weight, at::Tensor& grad_generate_bias) {
  const MixShape sh = check_mix_contract(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                         num_segments);
  check_grads(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, grad_x,
              grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias);
  check_cuda(x);
  dtype_of(x);                                 // rejects other dtypes before any work
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) {                       // an empty batch contributes nothing to the weight gradients
    for (at::Tensor* g : {&grad_compress_weight, &grad_compress_bias, &grad_generate_weight, &grad_generate_bias})
      g->zero_();
    return;
  }
  run_backward(sh, grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, grad_x,
               grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias,
               smem_limit_of(x.get_device()), at::globalContext().allowTF32CuBLAS(), has_tensor_cores(x.get_device()),
               c10::cuda::getCurrentCUDAStream().stream());
}
#endif  // DMX_EMULATE

}  // namespace
}  // namespace dynamixer_ops

#ifndef DMX_EMULATE
TORCH_LIBRARY_IMPL(dynamixer_ops_C, CUDA, m) {
  m.impl("mix_forward", static_cast<dynamixer_ops::MixForwardFn*>(&dynamixer_ops::mix_forward_cuda));
  m.impl("mix_backward", static_cast<dynamixer_ops::MixBackwardFn*>(&dynamixer_ops::mix_backward_cuda));
}
#endif
