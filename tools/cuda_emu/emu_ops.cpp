// torch.ops.dynamixer_cuda_emu.{forward, backward}: the CUDA backend's kernels and host core
// (csrc/cuda/dynamic_mix_cuda.cu and dynamic_mix_cuda_host.cpp, unchanged) run on CPU tensors through
// emu.h. Built on demand by tests/test_cuda_kernel.py; `smem_limit` stands in for the device's limit
// (a small one forces small tiles of sequences).
// Written, like the library, against libtorch's stable ABI.
#include "dynamic_mix.h"

#include "emu.h"      // after the torch headers: its macros and ::min are meant for the kernels only

// The kernels' launch checks, which in the library call into torch's stable shim: no-ops on the emulator.
#undef STD_CUDA_CHECK
#undef STD_CUDA_KERNEL_LAUNCH_CHECK
#define STD_CUDA_CHECK(expr) ((void)0)
#define STD_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

#include "cuda/dynamic_mix_cuda.cu"
#include "cuda/dynamic_mix_cuda_host.cpp"
#include "wmma_selftest.inc"

namespace {

using dynamixer_ops::Tensor;

// Returns which kernels ran: "tensor_cores" or "simt". tf32 stands in for torch's allow_tf32.
std::string emu_forward(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                        const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                        Tensor& y, int64_t smem_limit, bool tf32) {
  const auto sh = dynamixer_ops::check_mix_contract(x, compress_weight, compress_bias, generate_weight,
                                                    generate_bias, num_segments);
  dynamixer_ops::check_like(y, x, "y");
  const auto path = dynamixer_ops::run_forward(sh, x, compress_weight, compress_bias, generate_weight,
                                               generate_bias, y, static_cast<int>(smem_limit), tf32,
                                               /*has_tensor_cores=*/true, nullptr);
  return path == dynamixer_ops::Path::TensorCores ? "tensor_cores" : "simt";
}

std::string emu_backward(const Tensor& grad_y, const Tensor& x, const Tensor& compress_weight,
                  const Tensor& compress_bias, const Tensor& generate_weight, const Tensor& generate_bias,
                  int64_t num_segments, Tensor& grad_x, Tensor& grad_compress_weight,
                  Tensor& grad_compress_bias, Tensor& grad_generate_weight, Tensor& grad_generate_bias,
                  int64_t smem_limit, bool tf32) {
  const auto sh = dynamixer_ops::check_mix_contract(x, compress_weight, compress_bias, generate_weight,
                                                    generate_bias, num_segments);
  dynamixer_ops::check_grads(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, grad_x,
                             grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias);
  const auto path = dynamixer_ops::run_backward(sh, grad_y, x, compress_weight, compress_bias, generate_weight,
                                                generate_bias, grad_x,
                              grad_compress_weight, grad_compress_bias, grad_generate_weight, grad_generate_bias,
                              static_cast<int>(smem_limit), tf32, /*has_tensor_cores=*/true, nullptr);
  return path == dynamixer_ops::Path::TensorCores ? "tensor_cores" : "simt";
}

// Shared memory (bytes) of a kernel as dynamic_mix_cuda.h defines it: "forward" / "backward" (SIMT, a tile
// of `tile` sequences) or "forward_tc" / "backward_tc" (`tile` = bytes of an operand element: 2, or 4 for tf32).
int64_t emu_smem_bytes(const std::string& kernel, int64_t L, int64_t C, int64_t S, int64_t d, int64_t tile) {
  namespace cu = dynamixer_ops::cuda;
  if (kernel == "forward") return static_cast<int64_t>(cu::forward_smem_bytes(L, d, tile));
  if (kernel == "backward") return static_cast<int64_t>(cu::backward_smem_bytes(L, d, tile));
  DMX_CHECK(kernel == "forward_tc" || kernel == "backward_tc",
            "kernel must be forward, backward, forward_tc or backward_tc, got ", kernel);
  return static_cast<int64_t>(cu::tc_dims(L, C, S, d, static_cast<size_t>(tile), kernel == "backward_tc").bytes);
}

// The thread and block order of the launches that follow (emu.h) and racecheck's part in them: "record" the
// shared memory at every barrier, "compare" it with the last record (the same launches in the same sequence), or
// "off".
void emu_set_schedule(const std::string& order, int64_t seed, const std::string& racecheck) {
  emu::schedule = emu::Schedule{order, static_cast<uint64_t>(seed)};
  (void)emu::ordered(1, 0);                                    // checks the order's name
  emu::race_log.launches = 0;
  if (racecheck == "record") {
    emu::race_log.mode = emu::RaceLog::Record;
    emu::race_log.snapshots.clear();
    emu::race_log.recorded_by = emu::schedule.name();
  } else if (racecheck == "compare") {
    STD_TORCH_CHECK(!emu::race_log.recorded_by.empty(), "set_schedule: nothing recorded to compare with");
    emu::race_log.mode = emu::RaceLog::Compare;
  } else {
    STD_TORCH_CHECK(racecheck == "off", "racecheck must be record, compare or off, got ", racecheck);
    emu::race_log.mode = emu::RaceLog::Off;
  }
}

// Mutation testing: the __syncthreads on `line` of dynamic_mix_cuda.cu becomes a no-op (0: none). Returns the
// lines whose __syncthreads ran since the last call, sorted.
std::vector<int64_t> emu_skip_barrier(int64_t line) {
  emu::skip_barrier_line = static_cast<int>(line);
  std::vector<int64_t> hit(emu::barrier_lines_hit.begin(), emu::barrier_lines_hit.end());
  std::sort(hit.begin(), hit.end());
  emu::barrier_lines_hit.clear();
  return hit;
}

}  // namespace

STABLE_TORCH_LIBRARY(dynamixer_cuda_emu, m) {
  m.def("forward(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, int num_segments, Tensor(a!) y, int smem_limit, bool tf32=False) -> str");
  m.def("backward(Tensor grad_y, Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
        "Tensor generate_bias, int num_segments, Tensor(a!) grad_x, Tensor(b!) grad_compress_weight, "
        "Tensor(c!) grad_compress_bias, Tensor(d!) grad_generate_weight, Tensor(e!) grad_generate_bias, "
        "int smem_limit, bool tf32=False) -> str");
  m.def("set_schedule(str order, int seed, str racecheck) -> ()");
  m.def("skip_barrier(int line) -> int[]");
  m.def("smem_bytes(str kernel, int L, int C, int S, int d, int tile) -> int");
  m.def("wmma_matmul(Tensor a, Tensor b, Tensor(a!) c, str kind, bool a_col_major, bool b_col_major, "
        "bool round_tf32) -> ()");
  m.def("wmma_misuse(str what, Tensor a, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(dynamixer_cuda_emu, CompositeExplicitAutograd, m) {
  m.impl("forward", TORCH_BOX(&emu_forward));
  m.impl("backward", TORCH_BOX(&emu_backward));
  m.impl("set_schedule", TORCH_BOX(&emu_set_schedule));
  m.impl("skip_barrier", TORCH_BOX(&emu_skip_barrier));
  m.impl("smem_bytes", TORCH_BOX(&emu_smem_bytes));
  m.impl("wmma_matmul", TORCH_BOX(&wmma_selftest::wmma_matmul));
  m.impl("wmma_misuse", TORCH_BOX(&wmma_selftest::wmma_misuse));
}
