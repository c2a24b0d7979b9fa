// The contract every native implementation of dynamixer_ops_C::mix_forward / mix_backward relies on.
// dynamixer_ops/ops.py validates the user's arguments with clear messages before any kernel runs; the
// checks here only guard the contract (a direct torch.ops call with bad arguments fails cleanly, not inside a
// kernel).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

namespace dynamixer_ops {

struct MixShape {
  int64_t A, B;    // x is (A, B, L, C): two batch dims so that a transposed (B, W, H, C) view needs no copy
  int64_t L, C;    // tokens per sequence, channels
  int64_t S, d;    // segments, reduced values per segment and token
  int64_t e0;      // channels per segment, C / S
  int64_t sequences() const { return A * B; }
};

inline MixShape check_mix_contract(const at::Tensor& x, const at::Tensor& compress_weight,
                                   const at::Tensor& compress_bias, const at::Tensor& generate_weight,
                                   const at::Tensor& generate_bias, int64_t num_segments) {
  TORCH_CHECK(x.dim() == 4, "dynamixer_ops: x must be 4-D (A, B, L, C), got ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1, "dynamixer_ops: x must have unit stride in its last dim, got strides ", x.strides());
  MixShape s;
  s.A = x.size(0); s.B = x.size(1); s.L = x.size(2); s.C = x.size(3);
  s.S = num_segments;
  TORCH_CHECK(s.S > 0 && s.C % s.S == 0, "dynamixer_ops: C=", s.C, " is not divisible by num_segments=", s.S);
  TORCH_CHECK(compress_weight.dim() == 2 && compress_weight.size(1) == s.C && compress_weight.size(0) % s.S == 0,
              "dynamixer_ops: compress_weight must be (S*d, C), got ", compress_weight.sizes());
  s.d = compress_weight.size(0) / s.S;
  s.e0 = s.C / s.S;
  TORCH_CHECK(generate_weight.dim() == 2 && generate_weight.size(0) == s.L * s.L && generate_weight.size(1) == s.L * s.d,
              "dynamixer_ops: generate_weight must be (L*L, L*d) = (", s.L * s.L, ", ", s.L * s.d, "), got ",
              generate_weight.sizes());
  TORCH_CHECK(compress_bias.numel() == s.S * s.d && generate_bias.numel() == s.L * s.L,
              "dynamixer_ops: bias shapes must be (S*d,) and (L*L,)");
  for (const at::Tensor* t : {&compress_weight, &compress_bias, &generate_weight, &generate_bias}) {
    TORCH_CHECK(t->is_contiguous(), "dynamixer_ops: weights and biases must be contiguous");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "dynamixer_ops: all inputs must share x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "dynamixer_ops: all inputs must be on x's device ", x.device());
  }
  return s;
}

// The C++ signatures of the schemas in dynamic_mix.cpp. The dispatcher aborts at import when two devices
// register kernels of one op with different C++ signatures (even const-ness of an output): every
// TORCH_LIBRARY_IMPL casts its kernel to these types, so a mismatch fails the build instead.
using MixForwardFn = void(const at::Tensor& x, const at::Tensor& compress_weight, const at::Tensor& compress_bias,
                          const at::Tensor& generate_weight, const at::Tensor& generate_bias, int64_t num_segments,
                          at::Tensor& y);
using MixBackwardFn = void(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& compress_weight,
                           const at::Tensor& compress_bias, const at::Tensor& generate_weight,
                           const at::Tensor& generate_bias, int64_t num_segments, at::Tensor& grad_x,
                           at::Tensor& grad_compress_weight, at::Tensor& grad_compress_bias,
                           at::Tensor& grad_generate_weight, at::Tensor& grad_generate_bias);

// The variants that keep the probabilities P (N*S, L, L), in the compute type (float32 for 16-bit inputs), from the
// forward for the backward, which then skips recomputing them (a backend chooses when: dynamixer_ops/backends).
using MixForwardKeepFn = void(const at::Tensor& x, const at::Tensor& compress_weight, const at::Tensor& compress_bias,
                              const at::Tensor& generate_weight, const at::Tensor& generate_bias, int64_t num_segments,
                              at::Tensor& y, at::Tensor& probs);
using MixBackwardKeptFn = void(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& probs,
                               const at::Tensor& compress_weight, const at::Tensor& compress_bias,
                               const at::Tensor& generate_weight, const at::Tensor& generate_bias,
                               int64_t num_segments, at::Tensor& grad_x, at::Tensor& grad_compress_weight,
                               at::Tensor& grad_compress_bias, at::Tensor& grad_generate_weight,
                               at::Tensor& grad_generate_bias);

// The kept probabilities' contract: (A*B*S, L, L), contiguous, in the kernels' compute type, on x's device.
inline void check_probs(const at::Tensor& probs, const MixShape& s, const at::Tensor& x) {
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(probs.dim() == 3 && probs.size(0) == s.sequences() * s.S && probs.size(1) == s.L &&
                  probs.size(2) == s.L && probs.is_contiguous() && probs.scalar_type() == compute &&
                  probs.device() == x.device(),
              "dynamixer_ops: probs must be a contiguous (N*S, L, L) = (", s.sequences() * s.S, ", ", s.L, ", ", s.L,
              ") ", compute, " tensor on x's device, got ", probs.sizes(), " ", probs.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "dynamixer_ops: ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, "dynamixer_ops: ", name, " must have unit stride in its last dim");
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "dynamixer_ops: ", name, " must have x's dtype and device");
}

}  // namespace dynamixer_ops
