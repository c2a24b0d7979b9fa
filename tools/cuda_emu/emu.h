// Runs the kernels of csrc/cuda/dynamic_mix_cuda.cu on a CPU, for tests on machines without a GPU.
//
// One std::thread per CUDA thread of a block and one block after another: __syncthreads is a real barrier
// of all the block's threads, __shfl_xor_sync exchanges through a per-warp buffer between two warp barriers,
// and dynamic shared memory is a buffer of exactly the requested size, filled with NaN before every block
// (a read of an element no thread wrote shows up as NaN in the output). What this cannot show: timing,
// memory-model and coalescing effects, and anything ptxas does; it checks the index arithmetic, the
// barriers' placement (a missing one is a data race, which shows as a wrong result only by chance) and
// the math, in the same source the GPU build compiles.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>   // dim3, cudaStream_t (host-only declarations)

#define DMX_EMULATE 1
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static        // the static shared arrays: one copy, used by one block at a time

namespace emu {

struct Index { unsigned x = 0, y = 0, z = 0; };

struct Launch {                  // what the threads of the running launch share
  std::barrier<>* block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;    // [warp][lane]
  char* smem;
};
inline Launch* current = nullptr;

inline void launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body);

}  // namespace emu

inline thread_local emu::Index threadIdx, blockIdx;

inline void __syncthreads() { emu::current->block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask: every caller passes all lanes*/, float v, int lane_mask) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* buf = emu::current->shuffle.data() + 32 * warp;
  buf[lane] = v;
  emu::current->warps[warp]->arrive_and_wait();
  const float out = buf[lane ^ static_cast<unsigned>(lane_mask)];
  emu::current->warps[warp]->arrive_and_wait();
  return out;
}

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }

#define DMX_DYNAMIC_SMEM(name) float* name = reinterpret_cast<float*>(::emu::current->smem)
#define DMX_LAUNCH(kernel, grid, smem, stream, ...) \
  ::emu::launch(dim3(grid), kThreads, (smem), [&] { kernel(__VA_ARGS__); })
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)0)

namespace emu {

inline void launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  std::barrier<> block(threads);
  Launch state;
  state.block = &block;
  for (int w = 0; w < threads / 32; ++w) state.warps.push_back(std::make_unique<std::barrier<>>(32));
  state.shuffle.assign(threads, 0.f);
  std::unique_ptr<char[]> smem(new char[smem_bytes > 0 ? smem_bytes : 1]);
  state.smem = smem.get();
  current = &state;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = Index{static_cast<unsigned>(t), 0, 0};
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = Index{bx, by, 0};
          if (t == 0) std::memset(state.smem, 0xff, smem_bytes);   // 0xffffffff is a NaN
          block.arrive_and_wait();
          body();
          block.arrive_and_wait();
        }
      }
    });
  }
  for (std::thread& th : pool) th.join();
  current = nullptr;
}

}  // namespace emu
