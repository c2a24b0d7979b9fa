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
// dynamixer_ops_C::dynamic_mix_out / dynamic_mix_backward_out (the native kernels, out-variants; the _keep_out /
// _backward_kept_out pair likewise): each device registers its
// implementation in its own file (csrc/cpu/dynamic_mix_cpu.cpp; csrc/cuda/dynamic_mix_cuda_host.cpp, built into a
// second library, _C_cuda, that loads after this one where a CUDA torch runs).
#include <string>
#include <string_view>
#include <tuple>

#include "dynamic_mix.h"

STABLE_TORCH_LIBRARY(dynamixer_ops, m) {
  // Must equal the schemas torch.library infers from the Python kernels' annotations in dynamixer_ops/ops.py
  // (tests/test_export.py checks): without this library, ops.py defines the ops from those annotations.
  m.def("dynamic_mix(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, SymInt num_segments, str backend) -> Tensor");
  m.def("dynamic_mix_backward(Tensor grad_y, Tensor x, Tensor compress_weight, Tensor compress_bias, "
        "Tensor generate_weight, Tensor generate_bias, SymInt num_segments, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY(dynamixer_ops_C, m) {
  m.def("dynamic_mix_out(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, int num_segments, Tensor(a!) y) -> ()");
  m.def("dynamic_mix_backward_out(Tensor grad_y, Tensor x, Tensor compress_weight, Tensor compress_bias, "
        "Tensor generate_weight, Tensor generate_bias, int num_segments, Tensor(a!) grad_x, "
        "Tensor(b!) grad_compress_weight, Tensor(c!) grad_compress_bias, Tensor(d!) grad_generate_weight, "
        "Tensor(e!) grad_generate_bias) -> ()");
  // The same, keeping P from the forward for the backward (backends that implement them: CPU).
  m.def("dynamic_mix_keep_out(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, int num_segments, Tensor(a!) y, Tensor(b!) probs) -> ()");
  m.def("dynamic_mix_backward_kept_out(Tensor grad_y, Tensor x, Tensor probs, Tensor compress_weight, "
        "Tensor compress_bias, Tensor generate_weight, Tensor generate_bias, int num_segments, Tensor(a!) grad_x, "
        "Tensor(b!) grad_compress_weight, Tensor(c!) grad_compress_bias, Tensor(d!) grad_generate_weight, "
        "Tensor(e!) grad_generate_bias) -> ()");
  // Whether CUDA matmuls may run fp32 products as tf32 (torch.backends.cuda.matmul.allow_tf32), asked by the CUDA
  // kernels at each fp32 call (x: their input, which selects the CUDA kernel). libtorch's stable ABI does not
  // expose the flag: dynamixer_ops/backends/native.py implements the CUDA kernel in Python; without Python the
  // kernel below answers torch's default, false (the kernels then run exact fp32).
  m.def("cuda_matmul_allow_tf32(Tensor x) -> bool");
}

namespace dynamixer_ops {
namespace {

using torch::stable::detail::from;

// The backends this library can run on x's device ("auto", which Python resolves before calling the op, is
// accepted for C++ callers). A graph exported with another backend ("reference", "triton") needs the Python
// package: say so instead of silently running a different implementation.
void check_native_backend(std::string_view backend, const Tensor& x) {
  const std::string name(backend);
  const std::string native = x.is_cuda() ? "cuda" : "cpu";
  DMX_CHECK(x.is_cpu() || x.is_cuda(), "dynamixer_ops::dynamic_mix: the native kernels run on CPU and CUDA "
            "tensors, got a tensor on ", device_str(x));
  DMX_CHECK(name == native || name == "auto", "dynamixer_ops::dynamic_mix: backend '", name, "' is implemented "
            "in Python (the dynamixer_ops package); without Python this library runs the native backend '", native,
            "' for ", native, " tensors. Export the model with backend='auto' or '", native, "'.");
}

Tensor unit_last_stride(const Tensor& t) {   // the kernels' contract: rows of C channels are dense
  return t.stride(-1) == 1 ? t : torch::stable::contiguous(t);
}

// Calls a native op (its device's kernel) through the dispatcher; the ops return nothing.
template <class... Args> void call_native(const char* op, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{from(args)...};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, "", stack.data(), TORCH_ABI_VERSION));
}

Tensor dynamic_mix_native(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                          const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                          std::string_view backend) {
  check_native_backend(backend, x);
  const Tensor xs = unit_last_stride(x);
  Tensor y = torch::stable::empty_like(xs);   // keeps x's strides: a transposed x gives a transposed y, as in Python
  if (y.numel())
    call_native("dynamixer_ops_C::dynamic_mix_out", xs, dense(compress_weight), dense(compress_bias),
                dense(generate_weight), dense(generate_bias), num_segments, y);
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dynamic_mix_backward_native(
    const Tensor& grad_y, const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
    const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments, std::string_view backend) {
  check_native_backend(backend, x);
  const Tensor xs = unit_last_stride(x), dys = unit_last_stride(grad_y);
  const Tensor wc = dense(compress_weight), bc = dense(compress_bias);
  const Tensor wg = dense(generate_weight), bg = dense(generate_bias);
  Tensor dx = torch::stable::empty_like(xs), dwc = torch::stable::empty_like(wc);
  Tensor dbc = torch::stable::empty_like(bc), dwg = torch::stable::empty_like(wg);
  Tensor dbg = torch::stable::empty_like(bg);
  // zeroes the weight gradients for an empty batch
  call_native("dynamixer_ops_C::dynamic_mix_backward_out", dys, xs, wc, bc, wg, bg, num_segments, dx, dwc, dbc, dwg,
              dbg);
  return {dx, dwc, dbc, dwg, dbg};
}

bool cuda_matmul_allow_tf32_default(const Tensor&) { return false; }

}  // namespace
}  // namespace dynamixer_ops

STABLE_TORCH_LIBRARY_IMPL(dynamixer_ops_C, CompositeExplicitAutograd, m) {
  m.impl("cuda_matmul_allow_tf32", TORCH_BOX(&dynamixer_ops::cuda_matmul_allow_tf32_default));
}

STABLE_TORCH_LIBRARY_IMPL(dynamixer_ops, CompositeExplicitAutograd, m) {
  m.impl("dynamic_mix", TORCH_BOX(&dynamixer_ops::dynamic_mix_native));
  m.impl("dynamic_mix_backward", TORCH_BOX(&dynamixer_ops::dynamic_mix_backward_native));
}
