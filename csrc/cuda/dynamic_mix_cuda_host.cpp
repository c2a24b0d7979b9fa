// The CUDA implementations of dynamixer_ops_C::dynamic_mix_out / dynamic_mix_backward_out: argument checks,
// shared-memory sizing, fp32 workspaces and the deterministic weight-gradient reductions. The kernels are in
// dynamic_mix_cuda.cu; this file is compiled by the host compiler (nvcc never parses the torch headers). It is
// built into the library _C_cuda, on libtorch's stable ABI like _C.
// With DMX_EMULATE (tools/cuda_emu) only the device-independent core is compiled: run_forward / run_backward.
#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <vector>

#ifndef DMX_EMULATE
#include <torch/csrc/inductor/aoti_torch/c/shim.h>   // aoti_torch_get_current_cuda_stream (with USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>
#endif

#include "dynamic_mix.h"
#include "cuda/dynamic_mix_cuda.h"

namespace dynamixer_ops {
namespace {

using cuda::DType;
using cuda::MixDims;
using cuda::RowsArg;

DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case ScalarType::Float: return DType::Float;
    case ScalarType::Half: return DType::Half;
    case ScalarType::BFloat16: return DType::BFloat16;
    default:
      fail("dynamixer_ops (cuda): x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

RowsArg rows_of(const Tensor& t) {      // t: 4-D (A, B, L, C) with unit last stride
  return RowsArg{t.mutable_data_ptr(), t.size(2), t.size(1), t.stride(0), t.stride(1), t.stride(2)};
}

RowsArg rows_of_matrix(const Tensor& t) {   // t: contiguous 2-D (K, C)
  return RowsArg{t.mutable_data_ptr(), 1, 1, t.size(1), 0, 0};
}

// out.copy_(t.sum(0))
void copy_sum0(Tensor& out, const Tensor& t) {
  torch::stable::copy_(out, torch::stable::sum(t, std::vector<int64_t>{0}));
}

// The sizes of one call plus the tile of sequences per block: the largest (<= kMaxTile) whose shared memory
// fits the device's opt-in limit per block.
MixDims plan(const MixShape& sh, bool backward, int smem_limit, size_t* smem) {
  MixDims dm;
  dm.N = sh.sequences(); dm.L = sh.L; dm.C = sh.C; dm.S = sh.S; dm.d = sh.d; dm.e0 = sh.e0;
  dm.Ld = sh.L * sh.d; dm.LL = sh.L * sh.L; dm.LP = cuda::padded_row(sh.L);
  // Keeps the size arithmetic below far from overflow; the shared-memory check is the real limit.
  DMX_CHECK(sh.L <= 4096 && sh.d <= (int64_t{1} << 20),
            "dynamixer_ops (cuda): L=", sh.L, " and d=", sh.d, " are far beyond what the kernels support");
  const int64_t limit = smem_limit;
  auto bytes = [&](int64_t ts) {
    return backward ? cuda::backward_smem_bytes(sh.L, sh.d, ts) : cuda::forward_smem_bytes(sh.L, sh.d, ts);
  };
  dm.ts = std::min<int64_t>(cuda::kMaxTile, dm.N);
  while (dm.ts > 1 && bytes(dm.ts) > static_cast<size_t>(limit)) --dm.ts;
  DMX_CHECK(bytes(dm.ts) <= static_cast<size_t>(limit), "dynamixer_ops (cuda): the ",
            backward ? "backward" : "forward", " kernel needs ", bytes(dm.ts),
            " bytes of shared memory per block for L=", sh.L, " and d=", sh.d, ", but the device allows ",
            limit, "; use a shorter sequence (smaller L or d) or the 'reference' backend");
  const int64_t blocks = (dm.N + dm.ts - 1) / dm.ts * dm.S;
  const int64_t grad_x_blocks = (dm.N * dm.L + cuda::kGradXRows - 1) / cuda::kGradXRows;
  DMX_CHECK(blocks <= INT_MAX && grad_x_blocks <= INT_MAX, "dynamixer_ops (cuda): ", dm.N, " sequences of ", dm.L,
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
  Tensor wc_pad, wgT_pad, wg_pad;   // (SDp, S, e0p), (Ldp, LLp), (LLp, Ldp); wg_pad only for the backward
};

PaddedWeights pad_weights(const MixShape& sh, const cuda::TcDims& tc, const Tensor& compress_weight,
                          const Tensor& generate_weight, bool backward) {
  PaddedWeights w;
  w.wc_pad = zeros({tc.SDp, sh.S, tc.e0p}, compress_weight.scalar_type(), compress_weight);
  Tensor wc_part = narrowed(narrowed(w.wc_pad, 0, 0, sh.S * sh.d), 2, 0, sh.e0);
  torch::stable::copy_(wc_part, torch::stable::view(compress_weight, {sh.S * sh.d, sh.S, sh.e0}));
  w.wgT_pad = zeros({tc.Ldp, tc.LLp}, generate_weight.scalar_type(), generate_weight);
  Tensor wgT_part = narrowed(narrowed(w.wgT_pad, 0, 0, sh.L * sh.d), 1, 0, sh.L * sh.L);
  torch::stable::copy_(wgT_part, t2(generate_weight));
  if (backward) {
    w.wg_pad = zeros({tc.LLp, tc.Ldp}, generate_weight.scalar_type(), generate_weight);
    Tensor wg_part = narrowed(narrowed(w.wg_pad, 0, 0, sh.L * sh.L), 1, 0, sh.L * sh.d);
    torch::stable::copy_(wg_part, generate_weight);
  }
  return w;
}

// out (Q, cols) = (a^T b).to(out's dtype), a: fp32 contiguous (K, Q), b: K flat rows. Per-block fp32
// partial sums over fixed slices of K, then torch's sum over the slices: the same bits on every run. On tensor cores
// (operands rounded to `operand`) where `path` says so (the fused backward's path: its intermediates' dtypes
// match), else SIMT in fp32.
void reduce_atb(const Tensor& a, DType a_dtype, RowsArg b, DType b_dtype, int64_t cols, Tensor& out,
                Path path, DType operand, cudaStream_t stream) {
  const int64_t K = a.size(0), Q = a.size(1);
  const int64_t tiles = (Q + 31) / 32 * ((cols + 31) / 32);
  const int64_t k_steps = (K + 31) / 32;
  // About 1024 blocks in all, every split at least 8 steps of 32 rows, at most 65535 splits (grid.y).
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(1024 / std::max<int64_t>(tiles, 1), k_steps / 8));
  int64_t rows_per_split = (k_steps + splits - 1) / splits * 32;
  while ((K + rows_per_split - 1) / rows_per_split > 65535) rows_per_split *= 2;
  splits = (K + rows_per_split - 1) / rows_per_split;
  DMX_CHECK(tiles <= INT_MAX, "dynamixer_ops (cuda): weight gradient of ", Q, " x ", cols, " is too large");
  Tensor partial = empty({splits, Q, cols}, ScalarType::Float, a);
#ifdef DMX_EMULATE
  torch::stable::fill_(partial, NAN);   // shows an element no split writes
#endif
  if (path == Path::TensorCores) {
    cuda::launch_splitk_atb_tc(operand, a_dtype, b_dtype, a.mutable_data_ptr(), K, Q, b, cols, splits, rows_per_split,
                               data_of<float>(partial), stream);
  } else {
    cuda::launch_splitk_atb(b_dtype, data_of<float>(a), K, Q, b, cols, splits, rows_per_split,
                            data_of<float>(partial), stream);
  }
  copy_sum0(out, partial);
}

void check_grad(const Tensor& g, const Tensor& w, const char* name) {
  DMX_CHECK(same_sizes(g, w) && g.scalar_type() == w.scalar_type() && same_device(g, w),
            "dynamixer_ops (cuda): ", name, " must match its weight (", shape_str(w.sizes()), ", ", w.scalar_type(),
            ", ", device_str(w), "), got (", shape_str(g.sizes()), ", ", g.scalar_type(), ", ", device_str(g), ")");
}

// The device-independent core: sizes checked, x.numel() > 0, `stream` on x's device.
Path run_forward(const MixShape& sh, const Tensor& x, const Tensor& compress_weight,
                 const Tensor& compress_bias, const Tensor& generate_weight, const Tensor& generate_bias,
                 Tensor& y, int smem_limit, bool tf32, bool has_tensor_cores, cudaStream_t stream) {
  size_t smem = 0;
  const MixDims dm = plan(sh, /*backward=*/false, smem_limit, &smem);
  const DType dtype = dtype_of(x);
  const Path path = choose_path(sh, dtype, /*backward=*/false, tf32, has_tensor_cores, smem_limit);
  if (path == Path::TensorCores) {
    const cuda::TcDims tc = cuda::tc_dims(sh.L, sh.C, sh.S, sh.d, x.element_size(), /*backward=*/false);
    const PaddedWeights w = pad_weights(sh, tc, compress_weight, generate_weight, /*backward=*/false);
    cuda::launch_forward_tc(dtype, dm, tc, rows_of(x), w.wc_pad.mutable_data_ptr(), compress_bias.mutable_data_ptr(),
                            w.wgT_pad.mutable_data_ptr(), generate_bias.mutable_data_ptr(), rows_of(y), stream);
    return path;
  }
  const Tensor wgT = torch::stable::contiguous(t2(generate_weight));   // (L*d, L*L): coalesced reads by logit
  cuda::launch_forward(dtype, dm, rows_of(x), compress_weight.mutable_data_ptr(), compress_bias.mutable_data_ptr(),
                       wgT.mutable_data_ptr(), generate_bias.mutable_data_ptr(), rows_of(y), smem, stream);
  return path;
}

Path run_backward(const MixShape& sh, const Tensor& grad_y, const Tensor& x,
                  const Tensor& compress_weight, const Tensor& compress_bias,
                  const Tensor& generate_weight, const Tensor& generate_bias, Tensor& grad_x,
                  Tensor& grad_compress_weight, Tensor& grad_compress_bias, Tensor& grad_generate_weight,
                  Tensor& grad_generate_bias, int smem_limit, bool tf32, bool has_tensor_cores,
                  cudaStream_t stream) {
  size_t smem = 0;
  const MixDims dm = plan(sh, /*backward=*/true, smem_limit, &smem);
  const DType dtype = dtype_of(x);
  const Path path = choose_path(sh, dtype, /*backward=*/true, tf32, has_tensor_cores, smem_limit);
  const bool tc_path = path == Path::TensorCores;
  const ScalarType f32 = ScalarType::Float;
  // The tensor-core path keeps dG and dx_mix in x's dtype: the operands of the products that read them next.
  const ScalarType inter = tc_path ? x.scalar_type() : f32;
  const DType inter_dtype = tc_path ? dtype : DType::Float;
  Tensor z = empty({dm.N * dm.S, dm.Ld}, f32, x);
  Tensor dg = empty({dm.N * dm.S, dm.LL}, inter, x);
  Tensor dr = empty({dm.N * dm.L, dm.S * dm.d}, f32, x);
  Tensor dx_mix = empty({dm.N * dm.L, dm.C}, inter, x);
#ifdef DMX_EMULATE
  for (Tensor* t : {&z, &dg, &dr, &dx_mix}) torch::stable::fill_(*t, NAN);   // shows an element the kernels skip
#endif
  if (tc_path) {
    const cuda::TcDims tc = cuda::tc_dims(sh.L, sh.C, sh.S, sh.d, x.element_size(), /*backward=*/true);
    const PaddedWeights w = pad_weights(sh, tc, compress_weight, generate_weight, /*backward=*/true);
    Tensor dbg_partial = empty({(dm.N + tc.ts - 1) / tc.ts, dm.LL}, f32, x);
#ifdef DMX_EMULATE
    torch::stable::fill_(dbg_partial, NAN);
#endif
    cuda::launch_backward_tc(dtype, dm, tc, rows_of(grad_y), rows_of(x), w.wc_pad.mutable_data_ptr(),
                             compress_bias.mutable_data_ptr(), w.wgT_pad.mutable_data_ptr(),
                             generate_bias.mutable_data_ptr(), w.wg_pad.mutable_data_ptr(), data_of<float>(z), dg.mutable_data_ptr(), data_of<float>(dr),
                             dx_mix.mutable_data_ptr(), data_of<float>(dbg_partial), stream);
    copy_sum0(grad_generate_bias, dbg_partial);             // fp32 sums of fp32 dG, not of the rounded copy
  } else {
    const Tensor wgT = torch::stable::contiguous(t2(generate_weight));
    cuda::launch_backward(dtype, dm, rows_of(grad_y), rows_of(x), compress_weight.mutable_data_ptr(),
                          compress_bias.mutable_data_ptr(), wgT.mutable_data_ptr(), generate_bias.mutable_data_ptr(),
                          generate_weight.mutable_data_ptr(),
                          data_of<float>(z), data_of<float>(dg), data_of<float>(dr), data_of<float>(dx_mix),
                          smem, stream);
    copy_sum0(grad_generate_bias, dg);
  }
  if (tc_path) {
    cuda::launch_grad_x_tc(dtype, dm, dx_mix.mutable_data_ptr(), data_of<float>(dr), compress_weight.mutable_data_ptr(),
                           rows_of(grad_x), stream);
  } else {
    cuda::launch_grad_x(dtype, dm, data_of<float>(dx_mix), data_of<float>(dr), compress_weight.mutable_data_ptr(),
                        rows_of(grad_x), stream);
  }
  reduce_atb(dg, inter_dtype, rows_of_matrix(z), DType::Float, dm.Ld, grad_generate_weight, path, dtype,
             stream);                                                                   // sum dG^T z
  reduce_atb(dr, DType::Float, rows_of(x), dtype, dm.C, grad_compress_weight, path, dtype, stream);   // sum dr^T x
  copy_sum0(grad_compress_bias, dr);
  return path;
}

void check_grads(const Tensor& grad_y, const Tensor& x, const Tensor& compress_weight,
                 const Tensor& compress_bias, const Tensor& generate_weight, const Tensor& generate_bias,
                 const Tensor& grad_x, const Tensor& grad_compress_weight,
                 const Tensor& grad_compress_bias, const Tensor& grad_generate_weight,
                 const Tensor& grad_generate_bias) {
  check_like(grad_y, x, "grad_y");
  check_like(grad_x, x, "grad_x");
  check_grad(grad_compress_weight, compress_weight, "grad_compress_weight");
  check_grad(grad_compress_bias, compress_bias, "grad_compress_bias");
  check_grad(grad_generate_weight, generate_weight, "grad_generate_weight");
  check_grad(grad_generate_bias, generate_bias, "grad_generate_bias");
}

#ifndef DMX_EMULATE
void check_cuda(const Tensor& x) {     // the other tensors' devices: check_mix_contract, check_like
  DMX_CHECK(x.is_cuda(), "dynamixer_ops (cuda): x must be a CUDA tensor, got one on ", device_str(x));
}

// torch.backends.cuda.matmul.allow_tf32 decides whether fp32 inputs may run on tensor cores as tf32: asked through
// the op dynamixer_ops_C::cuda_matmul_allow_tf32 (see csrc/dynamic_mix.cpp). Only fp32 inputs ask.
bool allow_tf32(const Tensor& x) {
  if (x.scalar_type() != ScalarType::Float) return false;
  std::array<StableIValue, 1> stack{torch::stable::detail::from(x)};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("dynamixer_ops_C::cuda_matmul_allow_tf32", "", stack.data(),
                                               TORCH_ABI_VERSION));
  return torch::stable::detail::to<bool>(stack[0]);
}

cudaStream_t current_stream(const Tensor& x) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(x.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

bool has_tensor_cores(int device) {          // WMMA in bf16 and tf32: sm_80 and newer
  int major = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

int smem_limit_of(int device) {
  int limit = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}

void dynamic_mix_out_cuda(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                          const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                          Tensor& y) {
  const MixShape sh = check_mix_contract(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                         num_segments);
  check_like(y, x, "y");
  check_cuda(x);
  dtype_of(x);                                 // rejects other dtypes before any work
  if (x.numel() == 0) return;
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const int device = x.get_device_index();
  run_forward(sh, x, compress_weight, compress_bias, generate_weight, generate_bias, y, smem_limit_of(device),
              allow_tf32(x), has_tensor_cores(device), current_stream(x));
}

void dynamic_mix_backward_out_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& compress_weight,
                                   const Tensor& compress_bias, const Tensor& generate_weight,
                                   const Tensor& generate_bias, int64_t num_segments, Tensor& grad_x,
                                   Tensor& grad_compress_weight, Tensor& grad_compress_bias,
                                   Tensor& grad_generate_weight, Tensor& grad_generate_bias) {
  const MixShape sh = check_mix_contract(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                         num_segments);
  check_grads(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, grad_x,
              grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias);
  check_cuda(x);
  dtype_of(x);                                 // rejects other dtypes before any work
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  if (x.numel() == 0) {                       // an empty batch contributes nothing to the weight gradients
    for (Tensor* g : {&grad_compress_weight, &grad_compress_bias, &grad_generate_weight, &grad_generate_bias})
      torch::stable::zero_(*g);
    return;
  }
  run_backward(sh, grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, grad_x,
               grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias,
               smem_limit_of(x.get_device_index()), allow_tf32(x), has_tensor_cores(x.get_device_index()),
               current_stream(x));
}
#endif  // DMX_EMULATE

}  // namespace
}  // namespace dynamixer_ops

#ifndef DMX_EMULATE
STABLE_TORCH_LIBRARY_IMPL(dynamixer_ops_C, CUDA, m) {
  m.impl("dynamic_mix_out",
         TORCH_BOX(static_cast<dynamixer_ops::DynamicMixOutFn*>(&dynamixer_ops::dynamic_mix_out_cuda)));
  m.impl("dynamic_mix_backward_out",
         TORCH_BOX(static_cast<dynamixer_ops::DynamicMixBackwardOutFn*>(
             &dynamixer_ops::dynamic_mix_backward_out_cuda)));
}
#endif
