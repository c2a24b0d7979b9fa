// The ops' schemas, defined once, and the public op's Python-free kernels.
//
// This library has no Python module and no Python symbols: Python loads it with torch.ops.load_library, and a C++
// program (an AOTInductor runner) can dlopen it alongside libtorch, so that a packaged model's calls to
// dynamixer_ops::dynamic_mix resolve without any Python.
//
// dynamixer_ops::dynamic_mix / dynamic_mix_backward (the public ops): their CompositeExplicitAutograd kernels
// here run the native kernels and nothing else (backend "cpu" on CPU tensors, "cuda" on CUDA tensors). In a
// Python process dynamixer_ops/ops.py registers, for the CPU and CUDA keys (which the dispatcher prefers), the
// kernel that runs every backend of the registry, plus the one fake kernel and the one autograd formula; the
// kernels here then only serve processes without Python.
//
// dynamixer_ops_C::mix_forward / mix_backward (the native kernels, out-variants): each device registers its
// implementation in its own file (csrc/cpu/dynamic_mix_cpu.cpp, csrc/cuda/dynamic_mix_cuda_host.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "dynamic_mix.h"

TORCH_LIBRARY(dynamixer_ops, m) {
  // Must equal the schemas torch.library infers from the Python kernels' annotations in dynamixer_ops/ops.py
  // (tests/test_export.py checks): without this library, ops.py defines the ops from those annotations.
  m.def("dynamic_mix(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, SymInt num_segments, str backend) -> Tensor");
  m.def("dynamic_mix_backward(Tensor grad_y, Tensor x, Tensor compress_weight, Tensor compress_bias, "
        "Tensor generate_weight, Tensor generate_bias, SymInt num_segments, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY(dynamixer_ops_C, m) {
  m.def("mix_forward(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, int num_segments, Tensor(a!) y) -> ()");
  m.def("mix_backward(Tensor grad_y, Tensor x, Tensor compress_weight, Tensor compress_bias, "
        "Tensor generate_weight, Tensor generate_bias, int num_segments, Tensor(a!) grad_x, "
        "Tensor(b!) grad_compress_weight, Tensor(c!) grad_compress_bias, Tensor(d!) grad_generate_weight, "
        "Tensor(e!) grad_generate_bias) -> ()");
  // The same, keeping P from the forward for the backward (backends that implement them: CPU).
  m.def("mix_forward_keep(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, int num_segments, Tensor(a!) y, Tensor(b!) probs) -> ()");
  m.def("mix_backward_kept(Tensor grad_y, Tensor x, Tensor probs, Tensor compress_weight, Tensor compress_bias, "
        "Tensor generate_weight, Tensor generate_bias, int num_segments, Tensor(a!) grad_x, "
        "Tensor(b!) grad_compress_weight, Tensor(c!) grad_compress_bias, Tensor(d!) grad_generate_weight, "
        "Tensor(e!) grad_generate_bias) -> ()");
}

namespace dynamixer_ops {
namespace {

// The backends this library can run on x's device ("auto", which Python resolves before calling the op, is
// accepted for C++ callers). A graph exported with another backend ("reference", "triton") needs the Python
// package: say so instead of silently running a different implementation.
void check_native_backend(c10::string_view backend, const at::Tensor& x) {
  const std::string name(backend.data(), backend.size());
  const std::string native = x.is_cuda() ? "cuda" : "cpu";
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "dynamixer_ops::dynamic_mix: the native kernels run on CPU and CUDA "
              "tensors, got a tensor on ", x.device());
  TORCH_CHECK(name == native || name == "auto", "dynamixer_ops::dynamic_mix: backend '", name, "' is implemented "
              "in Python (the dynamixer_ops package); without Python this library runs the native backend '", native,
              "' for ", x.device().type(), " tensors. Export the model with backend='auto' or '", native, "'.");
}

at::Tensor unit_last_stride(const at::Tensor& t) {   // the kernels' contract: rows of C channels are dense
  return t.stride(-1) == 1 ? t : t.contiguous();
}

at::Tensor dynamic_mix_native(const at::Tensor& x, const at::Tensor& compress_weight, const at::Tensor& compress_bias,
                              const at::Tensor& generate_weight, const at::Tensor& generate_bias, int64_t num_segments,
                              c10::string_view backend) {
  check_native_backend(backend, x);
  static const auto forward = c10::Dispatcher::singleton()
      .findSchemaOrThrow("dynamixer_ops_C::mix_forward", "").typed<MixForwardFn>();
  const at::Tensor xs = unit_last_stride(x);
  at::Tensor y = at::empty_like(xs);     // keeps x's strides: a transposed x gives a transposed y, as in Python
  if (y.numel())
    forward.call(xs, compress_weight.contiguous(), compress_bias.contiguous(), generate_weight.contiguous(),
                 generate_bias.contiguous(), num_segments, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_mix_backward_native(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& compress_weight,
    const at::Tensor& compress_bias, const at::Tensor& generate_weight, const at::Tensor& generate_bias,
    int64_t num_segments, c10::string_view backend) {
  check_native_backend(backend, x);
  static const auto backward = c10::Dispatcher::singleton()
      .findSchemaOrThrow("dynamixer_ops_C::mix_backward", "").typed<MixBackwardFn>();
  const at::Tensor xs = unit_last_stride(x), dys = unit_last_stride(grad_y);
  const at::Tensor wc = compress_weight.contiguous(), bc = compress_bias.contiguous();
  const at::Tensor wg = generate_weight.contiguous(), bg = generate_bias.contiguous();
  at::Tensor dx = at::empty_like(xs), dwc = at::empty_like(wc), dbc = at::empty_like(bc);
  at::Tensor dwg = at::empty_like(wg), dbg = at::empty_like(bg);
  backward.call(dys, xs, wc, bc, wg, bg, num_segments, dx, dwc, dbc, dwg, dbg);   // zeroes them for an empty batch
  return {dx, dwc, dbc, dwg, dbg};
}

}  // namespace
}  // namespace dynamixer_ops

TORCH_LIBRARY_IMPL(dynamixer_ops, CompositeExplicitAutograd, m) {
  m.impl("dynamic_mix", &dynamixer_ops::dynamic_mix_native);
  m.impl("dynamic_mix_backward", &dynamixer_ops::dynamic_mix_backward_native);
}
