// Runs an AOTInductor package of a model that uses dynamixer_ops::dynamic_mix, in a process without Python.
//
//   aoti_runner LIBRARY PACKAGE INPUT OUTPUT [INPUT OUTPUT ...]
//
// LIBRARY  the native library, dynamixer_ops.deploy.native_library_path(): loading it registers the op
// PACKAGE  a .pt2 from torch._inductor.aoti_compile_and_package
// INPUT    one float32 CPU tensor per file; the model runs once per INPUT and writes OUTPUT
//          file format: int64 ndim, int64 sizes[ndim], then the float32 values in C order
//
// Build (tests/test_export.py does this; paths from torch.utils.cpp_extension.include_paths() / library_paths()):
//   g++ -std=c++20 aoti_runner.cpp -I<include>... -L<lib> -Wl,-rpath,<lib> -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -ldl
// (--no-as-needed: the package's compiled model needs libtorch.so in the process, though this file calls nothing
// in it; C++20 for torch >= 2.12's headers, C++17 is enough for 2.11.)
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

at::Tensor read_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  int64_t ndim = 0;
  in.read(reinterpret_cast<char*>(&ndim), sizeof ndim);
  std::vector<int64_t> sizes(ndim);
  in.read(reinterpret_cast<char*>(sizes.data()), ndim * sizeof(int64_t));
  at::Tensor t = at::empty(sizes, at::kFloat);
  in.read(reinterpret_cast<char*>(t.data_ptr<float>()), t.numel() * sizeof(float));
  if (!in) throw std::runtime_error(path + " is shorter than its header says");
  return t;
}

void write_tensor(const std::string& path, const at::Tensor& value) {
  const at::Tensor t = value.to(at::kCPU, at::kFloat).contiguous();
  std::ofstream out(path, std::ios::binary);
  const int64_t ndim = t.dim();
  out.write(reinterpret_cast<const char*>(&ndim), sizeof ndim);
  out.write(reinterpret_cast<const char*>(t.sizes().data()), ndim * sizeof(int64_t));
  out.write(reinterpret_cast<const char*>(t.data_ptr<float>()), t.numel() * sizeof(float));
  if (!out) throw std::runtime_error("cannot write " + path);
}

bool python_is_loaded() {   // the point of this program: no libpython anywhere in the process
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);)
    if (line.find("libpython") != std::string::npos) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc % 2 == 0) {
    std::cerr << "usage: " << argv[0] << " LIBRARY PACKAGE INPUT OUTPUT [INPUT OUTPUT ...]\n";
    return 2;
  }
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 1;
  }
  if (!c10::Dispatcher::singleton().findSchema({"dynamixer_ops::dynamic_mix", ""})) {
    std::cerr << argv[1] << " did not register dynamixer_ops::dynamic_mix\n";
    return 1;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    for (int i = 3; i < argc; i += 2) {
      const std::vector<at::Tensor> outputs = loader.run({read_tensor(argv[i])});
      write_tensor(argv[i + 1], outputs.at(0));
    }
  } catch (const std::exception& e) {
    std::cerr << "aoti_runner: " << e.what() << "\n";
    return 1;
  }
  if (python_is_loaded()) {
    std::cerr << "aoti_runner: libpython was loaded into the process\n";
    return 3;
  }
  std::cout << "ok: ran " << (argc - 3) / 2 << " input(s) without Python\n";
  return 0;
}
