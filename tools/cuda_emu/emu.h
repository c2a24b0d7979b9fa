// Runs the kernels of csrc/cuda/dynamic_mix_cuda.cu on a CPU, for tests on machines without a GPU.
//
// One std::thread per CUDA thread of a block and one block after another. Every wait goes through one
// scheduler per launch (emu::Block): __syncthreads is a barrier of all the block's threads; warp-collective
// calls (__shfl_xor_sync and the WMMA API below) rendezvous the 32 lanes of a warp, and the last lane to
// arrive runs the call for the whole warp. When every thread waits and no wait can complete (a collective
// that some lanes of a warp skip, a __syncthreads that some threads skip), or the lanes of a warp meet in
// different collectives or with different warp-uniform arguments, the launch stops with an error that says
// which warp and lanes wait where: the kernel's call raises a RuntimeError instead of hanging.
// Dynamic shared memory is a 128-byte aligned buffer of exactly the requested size, filled with NaN before
// every block (a read of an element no thread wrote shows up as NaN in the output). What this cannot show:
// timing, memory-model and coalescing effects, and anything ptxas does; it checks the index arithmetic, the
// barriers' placement (a missing one is a data race, which shows as a wrong result only by chance) and the
// math, in the same source the GPU build compiles.
//
// nvcuda::wmma: the fragments, fill_fragment, load_matrix_sync, mma_sync and store_matrix_sync of <mma.h>
// for the shapes the kernels use (16x16x16 in __half / __nv_bfloat16, 16x16x8 in precision::tf32, fp32
// accumulators), warp-collective as above, with the real API's num_elements per lane. Which matrix element
// a lane's x[e] holds is unspecified by CUDA; here it is a fixed pseudo-random permutation per fragment type
// (different for every lane), so code that assumes a mapping computes garbage. Where the real fragment
// holds each element twice (__half matrix_a / matrix_b: 16 per lane for 256 elements), mma_sync checks that
// both copies agree. The product is exact in fp32 (a product of two bf16, fp16 or tf32 values fits in an
// fp32 mantissa) and accumulates in fp32 in k order; tf32 operands are truncated to tf32 by mma_sync (the
// hardware reads only their top 19 bits), wmma::__float_to_tf32 rounds to nearest as cvt.rna does.
// Pointers must be 32-byte aligned and ldm a multiple of 16 bytes, as the API requires.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <vector>

#include <cuda_runtime_api.h>   // dim3, cudaStream_t (host-only declarations)
#include <cuda_fp16.h>
#include <cuda_bf16.h>

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

struct Stopped {};               // unwinds a thread of a launch that stopped with an error

// A warp-collective call as one lane makes it. `what` names the function and its template arguments;
// `ptr`, `ldm`, `extra` are the arguments every lane must pass alike; `lane` points at this lane's own
// operands; the last lane to arrive calls `run` with all 32 lanes' `lane` pointers.
struct WarpCall {
  std::string what;
  const void* ptr = nullptr;
  uint64_t ldm = 0, extra = 0;
  void* lane = nullptr;
  void (*run)(void* const* lanes) = nullptr;
};

class Block {
 public:
  explicit Block(int threads) : threads_(threads), warps_(threads / 32), where_(threads, Where::Running) {
    for (Warp& w : warps_) w.calls.resize(32);
  }

  void sync_threads() {
    std::unique_lock<std::mutex> lock(mutex_);
    check_stopped();
    const unsigned t = threadIdx_();
    where_[t] = Where::SyncThreads;
    if (++at_barrier_ + waiting_in_warps_ == threads_ && at_barrier_ != threads_) return deadlock(lock);
    if (at_barrier_ == threads_) {
      at_barrier_ = 0;
      std::fill(where_.begin(), where_.end(), Where::Running);   // only barrier waiters can be left
      barrier_generation_.fetch_add(1);
      barrier_generation_.notify_all();
      return;
    }
    await(lock, barrier_generation_);
  }

  void warp_collective(WarpCall call) {
    std::unique_lock<std::mutex> lock(mutex_);
    check_stopped();
    const unsigned t = threadIdx_(), lane = t % 32;
    Warp& w = warps_[t / 32];
    w.calls[lane] = std::move(call);
    where_[t] = Where::InWarp;
    ++waiting_in_warps_;
    if (++w.arrived == 32) {
      std::string mismatch = check_alike(w);
      if (mismatch.empty()) {
        std::vector<void*> lanes(32);
        for (int l = 0; l < 32; ++l) lanes[l] = w.calls[l].lane;
        try {
          w.calls[0].run(lanes.data());
        } catch (const std::exception& e) {
          mismatch = e.what();
        }
      }
      if (!mismatch.empty()) return stop(lock, "warp " + std::to_string(t / 32) + ": " + mismatch);
      w.arrived = 0;
      waiting_in_warps_ -= 32;
      for (int l = 0; l < 32; ++l) where_[(t / 32) * 32 + l] = Where::Running;
      w.generation.fetch_add(1);
      w.generation.notify_all();
      return;
    }
    if (at_barrier_ + waiting_in_warps_ == threads_) return deadlock(lock);
    await(lock, w.generation);
  }

  // Called by a thread whose kernel code threw: the launch stops with that message.
  void fail(const std::string& message) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!stopped_) stop_locked("thread " + std::to_string(threadIdx_()) + ": " + message);
  }

  const std::string& error() const { return error_; }

 private:
  enum class Where { Running, SyncThreads, InWarp };
  struct Warp {
    int arrived = 0;
    std::atomic<uint64_t> generation{0};
    std::vector<WarpCall> calls;
  };

  static unsigned threadIdx_();

  void check_stopped() const {
    if (stopped_) throw Stopped{};
  }

  // Waits, without the lock, until `generation` moves on (a release, or a stop); the lock is held on entry.
  // Atomic wait/notify rather than a condition variable: 256 woken threads need not queue for the mutex.
  void await(std::unique_lock<std::mutex>& lock, std::atomic<uint64_t>& generation) {
    const uint64_t seen = generation.load();
    lock.unlock();
    while (generation.load() == seen) generation.wait(seen);
    check_stopped();
  }

  std::string check_alike(const Warp& w) const {
    for (int l = 1; l < 32; ++l) {
      const WarpCall& a = w.calls[0];
      const WarpCall& b = w.calls[l];
      if (a.what != b.what || a.ptr != b.ptr || a.ldm != b.ldm || a.extra != b.extra) {
        std::ostringstream out;
        out << "the lanes of one warp-collective call differ (each lane must make the same call with the same "
               "pointer, ldm and value): lane 0 called " << a.what << " (ptr " << a.ptr << ", ldm " << a.ldm
            << ", value bits " << a.extra << "), lane " << l << " called " << b.what << " (ptr " << b.ptr
            << ", ldm " << b.ldm << ", value bits " << b.extra << ")";
        return out.str();
      }
    }
    return {};
  }

  void stop_locked(const std::string& message) {
    error_ = message;
    stopped_ = true;
    barrier_generation_.fetch_add(1);
    barrier_generation_.notify_all();
    for (Warp& w : warps_) {
      w.generation.fetch_add(1);
      w.generation.notify_all();
    }
  }

  [[noreturn]] void stop(std::unique_lock<std::mutex>& lock, const std::string& message) {
    stop_locked(message);
    lock.unlock();
    throw Stopped{};
  }

  // Every thread waits and none can be released: name what each warp's lanes wait in.
  [[noreturn]] void deadlock(std::unique_lock<std::mutex>& lock) {
    std::ostringstream out;
    out << "deadlock: every thread waits and none can go on (a warp-collective call that not all 32 lanes of "
           "a warp make, or a __syncthreads that some threads skip).";
    for (size_t w = 0; w < warps_.size(); ++w) {
      if (warps_[w].arrived == 0) continue;
      out << " Warp " << w << ":";
      int l = 0;
      while (l < 32) {
        const unsigned t = static_cast<unsigned>(w * 32 + l);
        const bool in_warp = where_[t] == Where::InWarp;
        const std::string what = in_warp ? warps_[w].calls[l].what : std::string("__syncthreads");
        int end = l + 1;
        while (end < 32) {
          const unsigned u = static_cast<unsigned>(w * 32 + end);
          const bool same = (where_[u] == Where::InWarp) == in_warp &&
                            (!in_warp || warps_[w].calls[end].what == what);
          if (!same) break;
          ++end;
        }
        out << " lanes " << l << "-" << end - 1 << " wait in " << what << ";";
        l = end;
      }
    }
    stop(lock, out.str());
  }

  const int threads_;
  std::mutex mutex_;
  int at_barrier_ = 0, waiting_in_warps_ = 0;
  std::atomic<uint64_t> barrier_generation_{0};
  std::vector<Warp> warps_;
  std::vector<Where> where_;
  std::atomic<bool> stopped_{false};
  std::string error_;
};

struct Launch {                  // what the threads of the running launch share
  Block* block;
  char* smem;
};
inline Launch* current = nullptr;

inline void launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body);

}  // namespace emu

inline thread_local emu::Index threadIdx, blockIdx;

inline unsigned emu::Block::threadIdx_() { return ::threadIdx.x; }

inline void __syncthreads() { emu::current->block->sync_threads(); }

namespace emu {
struct ShuffleLane { float in; int lane_mask; float out; };
inline void run_shuffle(void* const* lanes) {
  float in[32];
  for (int l = 0; l < 32; ++l) in[l] = static_cast<ShuffleLane*>(lanes[l])->in;
  for (int l = 0; l < 32; ++l) {
    auto* me = static_cast<ShuffleLane*>(lanes[l]);
    me->out = in[(l ^ me->lane_mask) & 31];
  }
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) throw std::logic_error("__shfl_xor_sync: the emulator supports only a full-warp mask");
  emu::ShuffleLane me{v, lane_mask, 0.f};
  emu::WarpCall call;
  call.what = "__shfl_xor_sync";
  call.lane = &me;
  call.run = emu::run_shuffle;
  emu::current->block->warp_collective(std::move(call));
  return me.out;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) throw std::logic_error("__syncwarp: the emulator supports only a full-warp mask");
  emu::WarpCall call;
  call.what = "__syncwarp";
  call.run = [](void* const*) {};
  emu::current->block->warp_collective(std::move(call));
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
  Block block(threads);
  Launch state;
  state.block = &block;
  constexpr std::align_val_t kAlign{128};
  struct Free { void operator()(char* p) const { ::operator delete[](p, std::align_val_t{128}); } };
  std::unique_ptr<char[], Free> smem(static_cast<char*>(::operator new[](smem_bytes > 0 ? smem_bytes : 1, kAlign)));
  state.smem = smem.get();
  Launch* outer = current;
  current = &state;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = Index{static_cast<unsigned>(t), 0, 0};
      try {
        for (unsigned by = 0; by < grid.y; ++by) {
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = Index{bx, by, 0};
            if (t == 0) std::memset(state.smem, 0xff, smem_bytes);   // 0xffffffff is a NaN
            block.sync_threads();
            body();
            block.sync_threads();
          }
        }
      } catch (const Stopped&) {
      } catch (const std::exception& e) {
        block.fail(e.what());
      }
    });
  }
  for (std::thread& th : pool) th.join();
  current = outer;
  if (!block.error().empty()) throw std::runtime_error("CUDA emulator: " + block.error());
}

}  // namespace emu

#include "emu_wmma.h"
