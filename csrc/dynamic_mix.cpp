// The native ops' schemas, defined once. Each device registers its implementation in its own file with
// TORCH_LIBRARY_IMPL (csrc/cpu/dynamic_mix_cpu.cpp, csrc/cuda/dynamic_mix_cuda.cu); the autograd formula and
// fake kernels of the public op live in dynamixer_ops/ops.py and are shared by every backend.
#include <Python.h>
#include <torch/library.h>

// Importing dynamixer_ops._C runs the static TORCH_LIBRARY registrations below; it defines no Python API.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(dynamixer_ops_C, m) {
  m.def("mix_forward(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, int num_segments, Tensor(a!) y) -> ()");
  m.def("mix_backward(Tensor grad_y, Tensor x, Tensor compress_weight, Tensor compress_bias, "
        "Tensor generate_weight, Tensor generate_bias, int num_segments, Tensor(a!) grad_x, "
        "Tensor(b!) grad_compress_weight, Tensor(c!) grad_compress_bias, Tensor(d!) grad_generate_weight, "
        "Tensor(e!) grad_generate_bias) -> ()");
}
