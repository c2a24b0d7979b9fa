// Runs the kernels of csrc/cuda/dynamic_mix_cuda.cu on a CPU, for tests on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) of the calling thread, and exactly one runs at a time: a
// thread runs until it waits (__syncthreads, or a warp-collective call), then the scheduler resumes the ready
// thread that comes first in the launch's thread order. The order (emu::schedule) is ascending thread index,
// descending, or a seeded shuffle, and the blocks run one after another in the same kind of order, so a launch
// is deterministic for a given schedule. __syncthreads is a barrier of all the block's threads; the threads of
// a block must meet at the same __syncthreads (its source line), or the launch stops naming both lines
// (synccheck). Warp-collective calls (__shfl_xor_sync, __syncwarp and the WMMA API below) rendezvous the 32 lanes
// of a warp, and the last lane to arrive runs the call for the whole warp. When no thread can go on (a
// collective that some lanes of a warp skip, a __syncthreads that some threads skip), or the lanes of a warp meet
// in different collectives or with different warp-uniform arguments, the launch stops with an error that says
// which warp and lanes wait where: the kernel's call raises a RuntimeError instead of hanging.
//
// racecheck: a missing barrier lets a thread read shared memory that another thread of the block writes in the
// same barrier interval (or write what another reads or writes); run under two thread orders such a kernel
// computes different values, deterministically. emu::race_log records, for every barrier of every block of every
// launch, a digest of each 64-byte chunk of the dynamic shared memory (and the results land in the outputs);
// a later run of the same launches under another order compares them and stops at the first barrier where the
// shared memory differs, naming the kernel, the block, the barrier's source line and the first differing
// chunk. Races on global memory (two blocks writing one output element, a block reading what another writes)
// show as outputs that differ between block orders (the tests compare every output bitwise).
//
// Dynamic shared memory is a 128-byte aligned buffer of exactly the requested size, filled with NaN before
// every block (a read of an element no thread wrote shows up as NaN in the output). What this cannot show:
// timing, memory-model and coalescing effects, and anything ptxas does; it checks the index arithmetic, the
// barriers' placement and the math, in the same source the GPU build compiles. Mutation testing: with
// emu::skip_barrier_line set, the __syncthreads on that line of dynamic_mix_cuda.cu does nothing.
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
#include <map>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

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

// The thread and block order of the launches that follow: "ascending", "descending" or "shuffled" (by seed).
struct Schedule {
  std::string order = "ascending";
  uint64_t seed = 0;
  std::string name() const { return order == "shuffled" ? order + "(" + std::to_string(seed) + ")" : order; }
};
inline Schedule schedule;

// A permutation of 0 .. n-1 in the schedule's order.
inline std::vector<unsigned> ordered(size_t n, uint64_t salt) {
  std::vector<unsigned> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<unsigned>(i);
  if (schedule.order == "descending") {
    std::reverse(v.begin(), v.end());
  } else if (schedule.order == "shuffled") {
    std::mt19937_64 rng(schedule.seed * 0x9e3779b97f4a7c15ull + salt);
    std::shuffle(v.begin(), v.end(), rng);
  } else if (schedule.order != "ascending") {
    throw std::invalid_argument("emu::schedule.order must be ascending, descending or shuffled, got " +
                                schedule.order);
  }
  return v;
}

// racecheck's record of the shared memory at every barrier (see the top of this file).
struct RaceLog {
  enum Mode { Off, Record, Compare } mode = Off;
  std::string recorded_by;       // the schedule whose run was recorded
  uint64_t launches = 0;         // launches since the record began: a launch's key
  struct Snapshot {
    int line = 0;
    std::vector<uint64_t> chunks;
  };
  std::map<std::tuple<uint64_t, unsigned, unsigned, unsigned>, Snapshot> snapshots;   // launch, block y, x, barrier
};
inline RaceLog race_log;

inline int skip_barrier_line = 0;          // > 0: that __syncthreads of dynamic_mix_cuda.cu is a no-op (mutants)
inline std::vector<int> barrier_lines_hit; // the lines of dynamic_mix_cuda.cu whose __syncthreads ran

inline constexpr int kChunkBytes = 64;
inline std::vector<uint64_t> chunk_digests(const char* p, size_t bytes) {
  std::vector<uint64_t> out((bytes + kChunkBytes - 1) / kChunkBytes);
  for (size_t c = 0; c < out.size(); ++c) {
    uint64_t h = 0xcbf29ce484222325ull;
    const size_t end = std::min(bytes, (c + 1) * kChunkBytes);
    for (size_t i = c * kChunkBytes; i < end; ++i) h = (h ^ static_cast<unsigned char>(p[i])) * 0x100000001b3ull;
    out[c] = h;
  }
  return out;
}

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

// Fiber stacks, kept for the next launch. 256 KiB each (AddressSanitizer's frames are large), a guard page below.
class Stacks {
 public:
  static constexpr size_t kBytes = 256 * 1024, kGuard = 4096;
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      void* p = mmap(nullptr, kBytes + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      mprotect(p, kGuard, PROT_NONE);
      stacks_.push_back(static_cast<char*>(p) + kGuard);
    }
    return stacks_[i];
  }
 private:
  std::vector<char*> stacks_;
};
inline Stacks stacks;

class Block;
struct Launch {                  // what the threads of the running launch share
  Block* block;
  char* smem;
  size_t smem_bytes;
  const char* kernel;
};
inline Launch* current = nullptr;

class Block {
 public:
  Block(int threads, const std::function<void(unsigned)>& thread_main)
      : threads_(threads), warps_(threads / 32), fibers_(threads), thread_main_(thread_main) {
    for (Warp& w : warps_) w.calls.resize(32);
    order_ = ordered(threads, 1);
  }

  // Runs every thread to its end, one at a time in the schedule's order.
  void run();

  // line: the __syncthreads' source line (negative: of another file than dynamic_mix_cuda.cu), or one of the
  // launch's own barriers that frame each block.
  static constexpr int kBlockStart = 0, kBlockEnd = -(1 << 30);
  void sync_threads(int line);
  void warp_collective(WarpCall call);

  // Called by a thread whose kernel code threw: the launch stops with that message.
  void fail(const std::string& message) {
    if (!stopped_) stop_quietly("thread " + std::to_string(running_) + ": " + message);
  }

  const std::string& error() const { return error_; }

 private:
  enum class State { Ready, AtBarrier, InWarp, Done };
  struct Fiber {
    ucontext_t context;
    State state = State::Ready;
    int line = 0;                // the barrier it waits at
    Index block_idx;
  };
  struct Warp {
    int arrived = 0;
    std::vector<WarpCall> calls;
  };

  static void entry();
  void switch_to_scheduler();

  // Waits: back to the scheduler until released; then throws Stopped if the launch stopped meanwhile.
  void wait(State state) {
    fibers_[running_].state = state;
    switch_to_scheduler();
    check_stopped();
  }

  void check_stopped() const {
    if (stopped_) throw Stopped{};
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

  // Ends the launch: every waiting thread is resumed and unwinds (Stopped).
  void stop_quietly(const std::string& message) {
    if (stopped_) return;
    error_ = message;
    stopped_ = true;
    for (Fiber& f : fibers_)
      if (f.state != State::Done) f.state = State::Ready;
  }

  [[noreturn]] void stop(const std::string& message) {
    stop_quietly(message);
    throw Stopped{};
  }

  void racecheck(int line);
  std::string deadlock_message() const;

  const int threads_;
  std::vector<Warp> warps_;
  std::vector<Fiber> fibers_;
  std::vector<unsigned> order_;
  const std::function<void(unsigned)>& thread_main_;
  ucontext_t scheduler_;
  const void* scheduler_stack_ = nullptr;
  size_t scheduler_stack_size_ = 0;
  unsigned running_ = 0;
  int at_barrier_ = 0;
  unsigned barrier_count_ = 0;   // barriers of the kernel passed in this block
  bool stopped_ = false;
  std::string error_;
};

inline void switch_context(ucontext_t* from, ucontext_t* to, const void* to_stack, size_t to_size) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, to_stack, to_size);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)to_stack;
  (void)to_size;
  swapcontext(from, to);
#endif
}

}  // namespace emu

inline thread_local emu::Index threadIdx, blockIdx;

namespace emu {

inline void Block::switch_to_scheduler() {
  fibers_[running_].block_idx = ::blockIdx;
  switch_context(&fibers_[running_].context, &scheduler_, scheduler_stack_, scheduler_stack_size_);
}

inline void Block::entry() {
  Block& b = *current->block;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_, &b.scheduler_stack_size_);
#endif
  const unsigned t = b.running_;
  try {
    b.thread_main_(t);
  } catch (const Stopped&) {
  } catch (const std::exception& e) {
    b.fail(e.what());
  } catch (...) {
    b.fail("an exception that is not a std::exception");
  }
  b.fibers_[t].state = State::Done;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(nullptr, b.scheduler_stack_, b.scheduler_stack_size_);
#endif
  setcontext(&b.scheduler_);
}

inline void Block::run() {
  for (int t = 0; t < threads_; ++t) {
    Fiber& f = fibers_[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks.get(t);
    f.context.uc_stack.ss_size = Stacks::kBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, &Block::entry, 0);
  }
  const Index outer_thread = ::threadIdx, outer_block = ::blockIdx;
  while (true) {
    int next = -1;
    for (unsigned t : order_) {
      if (fibers_[t].state == State::Ready) {
        next = static_cast<int>(t);
        break;
      }
    }
    if (next < 0) {
      bool done = true;
      for (const Fiber& f : fibers_) done = done && f.state == State::Done;
      if (done) break;
      stop_quietly(deadlock_message());
      continue;
    }
    running_ = static_cast<unsigned>(next);
    ::threadIdx = Index{running_, 0, 0};
    ::blockIdx = fibers_[next].block_idx;
    switch_context(&scheduler_, &fibers_[next].context, stacks.get(next), Stacks::kBytes);
  }
  ::threadIdx = outer_thread;
  ::blockIdx = outer_block;
}

inline std::string describe_barrier(int line) {
  if (line == Block::kBlockStart) return "the start of the block";
  if (line == Block::kBlockEnd) return "the end of the block";
  if (line < 0) return "the __syncthreads on line " + std::to_string(-line) + " of another file";
  return "the __syncthreads on line " + std::to_string(line) + " of dynamic_mix_cuda.cu";
}

inline void Block::sync_threads(int line) {
  check_stopped();
  const unsigned t = running_;
  fibers_[t].line = line;
  if (++at_barrier_ < threads_) return wait(State::AtBarrier);
  // The last thread to arrive: every thread must wait at this same barrier.
  for (const Fiber& f : fibers_) {
    if (f.state == State::AtBarrier && f.line != line) {
      std::ostringstream out;
      out << "synccheck: the threads of block (" << ::blockIdx.x << ", " << ::blockIdx.y << ") of " << current->kernel
          << " wait at different barriers: thread " << (&f - fibers_.data()) << " at " << describe_barrier(f.line)
          << ", thread " << t << " at " << describe_barrier(line);
      stop(out.str());
    }
  }
  at_barrier_ = 0;
  if (line == kBlockStart) {
    barrier_count_ = 0;
  } else {
    ++barrier_count_;
    racecheck(line);
  }
  for (Fiber& f : fibers_)
    if (f.state == State::AtBarrier) f.state = State::Ready;
  wait(State::Ready);           // the schedule's first thread goes on first
}

inline void Block::racecheck(int line) {
  if (race_log.mode == RaceLog::Off || current->smem_bytes == 0) return;
  const auto key = std::make_tuple(race_log.launches, ::blockIdx.y, ::blockIdx.x, barrier_count_);
  std::vector<uint64_t> chunks = chunk_digests(current->smem, current->smem_bytes);
  if (race_log.mode == RaceLog::Record) {
    race_log.snapshots[key] = RaceLog::Snapshot{line, std::move(chunks)};
    return;
  }
  const auto found = race_log.snapshots.find(key);
  std::ostringstream out;
  out << "racecheck: " << current->kernel << ", block (" << ::blockIdx.x << ", " << ::blockIdx.y << "): ";
  const std::string at = describe_barrier(line);
  if (found == race_log.snapshots.end() || found->second.line != line) {
    out << "under thread order " << schedule.name() << " the block reaches " << at << " as its barrier "
        << barrier_count_ << ", which under " << race_log.recorded_by << " it did not";
    stop(out.str());
  }
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (chunks[c] != found->second.chunks[c]) {
      out << "the dynamic shared memory at " << at << " (barrier " << barrier_count_ << " of the block) differs "
          << "between thread orders " << race_log.recorded_by << " and " << schedule.name() << ", first in bytes "
          << c * kChunkBytes << ".." << std::min(current->smem_bytes, (c + 1) * kChunkBytes) - 1
          << ": since the barrier before, a thread read or wrote shared memory that another thread of the block "
             "wrote (or wrote what another read): a missing __syncthreads";
      stop(out.str());
    }
  }
}

inline void Block::warp_collective(WarpCall call) {
  check_stopped();
  const unsigned t = running_, lane = t % 32;
  Warp& w = warps_[t / 32];
  w.calls[lane] = std::move(call);
  if (++w.arrived < 32) return wait(State::InWarp);
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
  if (!mismatch.empty()) stop("warp " + std::to_string(t / 32) + ": " + mismatch);
  w.arrived = 0;
  for (int l = 0; l < 32; ++l) fibers_[(t / 32) * 32 + l].state = State::Ready;
  wait(State::Ready);
}

// Every thread waits and none can be released: name what each warp's lanes wait in.
inline std::string Block::deadlock_message() const {
  std::ostringstream out;
  out << "deadlock: every thread waits and none can go on (a warp-collective call that not all 32 lanes of "
         "a warp make, or a __syncthreads that some threads skip).";
  for (size_t w = 0; w < warps_.size(); ++w) {
    if (warps_[w].arrived == 0) continue;
    out << " Warp " << w << ":";
    int l = 0;
    auto what_at = [&](int lane) {
      const Fiber& f = fibers_[w * 32 + lane];
      if (f.state == State::InWarp) return warps_[w].calls[lane].what;
      if (f.state == State::Done) return std::string("(returned)");
      return std::string("__syncthreads");
    };
    while (l < 32) {
      const std::string what = what_at(l);
      int end = l + 1;
      while (end < 32 && what_at(end) == what) ++end;
      out << " lanes " << l << "-" << end - 1 << " wait in " << what << ";";
      l = end;
    }
  }
  return out.str();
}

inline void launch(const char* kernel, dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body);
inline void launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  launch("a kernel", grid, threads, smem_bytes, body);
}

}  // namespace emu

inline void syncthreads_at(const char* file, int line) {
  static constexpr char kSource[] = "dynamic_mix_cuda.cu";
  const size_t n = std::strlen(file), k = sizeof(kSource) - 1;
  const bool ours = n >= k && std::strcmp(file + n - k, kSource) == 0;
  if (!ours) line = -line;                 // another file's barrier: never skipped, never counted
  if (ours && line == emu::skip_barrier_line) return;
  if (ours && ::threadIdx.x == 0 &&
      std::find(emu::barrier_lines_hit.begin(), emu::barrier_lines_hit.end(), line) == emu::barrier_lines_hit.end())
    emu::barrier_lines_hit.push_back(line);
  emu::current->block->sync_threads(line);
}
#define __syncthreads() ::syncthreads_at(__FILE__, __LINE__)

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
  ::emu::launch(#kernel, dim3(grid), kThreads, (smem), [&] { kernel(__VA_ARGS__); })
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)0)

namespace emu {

inline void launch(const char* kernel, dim3 grid, int threads, size_t smem_bytes,
                   const std::function<void()>& body) {
  if (current != nullptr) throw std::logic_error("emu::launch: a launch inside a launch");
  constexpr std::align_val_t kAlign{128};
  struct Free { void operator()(char* p) const { ::operator delete[](p, std::align_val_t{128}); } };
  std::unique_ptr<char[], Free> smem(static_cast<char*>(::operator new[](smem_bytes > 0 ? smem_bytes : 1, kAlign)));
  std::vector<Index> blocks;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) blocks.push_back(Index{bx, by, 0});
  const std::vector<unsigned> block_order = ordered(blocks.size(), 2);
  Block* block_ptr = nullptr;
  // Each thread runs every block in turn; the launch's own barriers (line 0) frame each block.
  const std::function<void(unsigned)> thread_main = [&](unsigned t) {
    for (unsigned b : block_order) {
      ::blockIdx = blocks[b];
      if (t == 0) std::memset(smem.get(), 0xff, smem_bytes);   // 0xffffffff is a NaN
      block_ptr->sync_threads(Block::kBlockStart);
      body();
      block_ptr->sync_threads(Block::kBlockEnd);
    }
  };
  Block block(threads, thread_main);
  block_ptr = &block;
  Launch state{&block, smem.get(), smem_bytes, kernel};
  current = &state;
  try {
    block.run();
  } catch (...) {
    current = nullptr;
    throw;
  }
  current = nullptr;
  ++race_log.launches;
  if (!block.error().empty()) throw std::runtime_error("CUDA emulator: " + block.error());
}

}  // namespace emu

#include "emu_wmma.h"
