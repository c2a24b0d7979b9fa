// The contract every native implementation of the dynamixer_ops_C::dynamic_mix*_out ops relies on.
// dynamixer_ops/ops.py validates the user's arguments with clear messages before any kernel runs; the
// checks here only guard the contract (a direct torch.ops call with bad arguments fails cleanly, not inside a
// kernel).
//
// Every file of the native libraries is written against libtorch's stable C ABI (torch/csrc/stable,
// torch/headeronly): no libtorch C++ symbol is imported, so one binary runs on every torch from the version
// TORCH_TARGET_VERSION names (setup.py sets it) on.
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dynamixer_ops {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// Errors: a std::runtime_error (RuntimeError in Python) carrying exactly the message.
template <class... Args> [[noreturn]] void fail(const Args&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw std::runtime_error(message.str());
}
#define DMX_CHECK(cond, ...)                         \
  do {                                               \
    if (!(cond)) ::dynamixer_ops::fail(__VA_ARGS__); \
  } while (0)

// "(2, 3, 7, 24)": a shape or strides in messages.
inline std::string shape_str(torch::headeronly::IntHeaderOnlyArrayRef values) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < values.size(); ++i) s << (i ? ", " : "") << values[i];
  s << (values.size() == 1 ? ",)" : ")");
  return s.str();
}

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return "a device other than cpu and cuda";
}

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (a.size(i) != b.size(i)) return false;
  return true;
}

// Typed data pointers for every element type the kernels use (the stable Tensor's typed accessors check the dtype
// against a fixed list of C++ types; the callers here have checked it already).
template <class T> T* data_of(const Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }

// ATen ops the stable headers of the oldest supported torch do not wrap, called by name through the dispatcher.
template <size_t N> Tensor call_aten(const char* name, const char* overload, std::array<StableIValue, N> stack) {
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}
// t.view(dtype): the same bytes read as another element type of the same size.
inline Tensor view_as_dtype(const Tensor& t, ScalarType dtype) {
  return call_aten<2>("aten::view", "dtype", {torch::stable::detail::from(t), torch::stable::detail::from(dtype)});
}
inline Tensor narrowed(Tensor t, int64_t dim, int64_t start, int64_t length) {   // a view; t by value: any expression
  return torch::stable::narrow(t, dim, start, length);
}
inline Tensor dense(const Tensor& t) {   // t.contiguous(), without a dispatcher call when t already is
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}
inline Tensor t2(const Tensor& t) { return torch::stable::transpose(t, 0, 1); }   // a 2-D transpose (a view)
inline Tensor zeros(torch::headeronly::IntHeaderOnlyArrayRef size, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_zeros(like, size, dtype);
}
inline Tensor empty(torch::headeronly::IntHeaderOnlyArrayRef size, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_empty(like, size, dtype);
}

struct MixShape {
  int64_t A, B;    // x is (A, B, L, C): two batch dims so that a transposed (B, W, H, C) view needs no copy
  int64_t L, C;    // tokens per sequence, channels
  int64_t S, d;    // segments, reduced values per segment and token
  int64_t e0;      // channels per segment, C / S
  int64_t sequences() const { return A * B; }
};

inline MixShape check_mix_contract(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                                   const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments) {
  DMX_CHECK(x.dim() == 4, "dynamixer_ops: x must be 4-D (A, B, L, C), got ", shape_str(x.sizes()));
  DMX_CHECK(x.stride(3) == 1, "dynamixer_ops: x must have unit stride in its last dim, got strides ",
            shape_str(x.strides()));
  MixShape s;
  s.A = x.size(0); s.B = x.size(1); s.L = x.size(2); s.C = x.size(3);
  s.S = num_segments;
  DMX_CHECK(s.S > 0 && s.C % s.S == 0, "dynamixer_ops: C=", s.C, " is not divisible by num_segments=", s.S);
  DMX_CHECK(compress_weight.dim() == 2 && compress_weight.size(1) == s.C && compress_weight.size(0) % s.S == 0,
            "dynamixer_ops: compress_weight must be (S*d, C), got ", shape_str(compress_weight.sizes()));
  s.d = compress_weight.size(0) / s.S;
  s.e0 = s.C / s.S;
  DMX_CHECK(generate_weight.dim() == 2 && generate_weight.size(0) == s.L * s.L && generate_weight.size(1) == s.L * s.d,
            "dynamixer_ops: generate_weight must be (L*L, L*d) = (", s.L * s.L, ", ", s.L * s.d, "), got ",
            shape_str(generate_weight.sizes()));
  DMX_CHECK(compress_bias.numel() == s.S * s.d && generate_bias.numel() == s.L * s.L,
            "dynamixer_ops: bias shapes must be (S*d,) and (L*L,)");
  for (const Tensor* t : {&compress_weight, &compress_bias, &generate_weight, &generate_bias}) {
    DMX_CHECK(t->is_contiguous(), "dynamixer_ops: weights and biases must be contiguous");
    DMX_CHECK(t->scalar_type() == x.scalar_type(), "dynamixer_ops: all inputs must share x's dtype ",
              x.scalar_type(), ", got ", t->scalar_type());
    DMX_CHECK(same_device(*t, x), "dynamixer_ops: all inputs must be on x's device ", device_str(x));
  }
  return s;
}

// The C++ signatures of the schemas in dynamic_mix.cpp: every device's kernel is cast to these types before
// TORCH_BOX boxes it, so that the devices' kernels of one op cannot drift apart.
using DynamicMixOutFn = void(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                             const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                             Tensor& y);
using DynamicMixBackwardOutFn = void(const Tensor& grad_y, const Tensor& x, const Tensor& compress_weight,
                                     const Tensor& compress_bias, const Tensor& generate_weight,
                                     const Tensor& generate_bias, int64_t num_segments, Tensor& grad_x,
                                     Tensor& grad_compress_weight, Tensor& grad_compress_bias,
                                     Tensor& grad_generate_weight, Tensor& grad_generate_bias);

// The variants that keep the probabilities P (N*S, L, L), in the compute type (float32 for 16-bit inputs), from the
// forward for the backward, which then skips recomputing them (a backend chooses when: dynamixer_ops/backends).
using DynamicMixKeepOutFn = void(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                                 const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                                 Tensor& y, Tensor& probs);
using DynamicMixBackwardKeptOutFn = void(const Tensor& grad_y, const Tensor& x, const Tensor& probs,
                                         const Tensor& compress_weight, const Tensor& compress_bias,
                                         const Tensor& generate_weight, const Tensor& generate_bias,
                                         int64_t num_segments, Tensor& grad_x, Tensor& grad_compress_weight,
                                         Tensor& grad_compress_bias, Tensor& grad_generate_weight,
                                         Tensor& grad_generate_bias);

// The kept probabilities' contract: (A*B*S, L, L), contiguous, in the kernels' compute type, on x's device.
inline void check_probs(const Tensor& probs, const MixShape& s, const Tensor& x) {
  const ScalarType compute = x.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  DMX_CHECK(probs.dim() == 3 && probs.size(0) == s.sequences() * s.S && probs.size(1) == s.L &&
                probs.size(2) == s.L && probs.is_contiguous() && probs.scalar_type() == compute &&
                same_device(probs, x),
            "dynamixer_ops: probs must be a contiguous (N*S, L, L) = (", s.sequences() * s.S, ", ", s.L, ", ", s.L,
            ") ", compute, " tensor on x's device, got ", shape_str(probs.sizes()), " ", probs.scalar_type());
}

inline void check_like(const Tensor& t, const Tensor& x, const char* name) {
  DMX_CHECK(same_sizes(t, x), "dynamixer_ops: ", name, " must have x's shape ", shape_str(x.sizes()), ", got ",
            shape_str(t.sizes()));
  DMX_CHECK(t.stride(3) == 1, "dynamixer_ops: ", name, " must have unit stride in its last dim");
  DMX_CHECK(t.scalar_type() == x.scalar_type() && same_device(t, x),
            "dynamixer_ops: ", name, " must have x's dtype and device");
}

}  // namespace dynamixer_ops
