// simt.h: a CPU emulation of the CUDA execution model, for tests only. It lets a .cu kernel (here
// csrc/cuda/accumulate_kernel.cu) compile as host C++ with __CUDA_ARCH__ and __CUDACC__ undefined, and run
// on CPU tensors: tests/simt/include/cuda_runtime.h includes this header, and the kernel's launch and
// __shared__ declarations go through the seams it defines (FUSEDACCUM_LAUNCH, FUSEDACCUM_SHARED).
//
// What it does
// - Every thread of a block is a fiber (its own stack; a context switch in assembly on x86-64, ucontext
//   elsewhere). A fiber runs until it blocks at a __syncthreads*, a __shfl_*_sync / __syncwarp, or exits;
//   then another runnable fiber of the block runs. The order of runnable fibers is shuffled (seeded), so
//   every thread really runs up to its next barrier before any thread passes it, in varying orders.
// - __syncthreads/_or/_and/_count are barriers over the block; __shfl_{down,up,xor,}_sync and __syncwarp
//   are barriers over the lanes named in the mask, within warps of 32 (lane = linear thread index % 32).
// - Fails loudly (simt::EmulationError from the launch, with the threads and source lines involved) on: a
//   divergent barrier (threads of one block waiting at different __syncthreads, or a thread exiting while
//   others wait at one, or a barrier after some threads exited); a shuffle whose mask leaves out the
//   calling lane, names a lane that does not exist, exits or waits elsewhere, or differs between lanes;
//   a shuffle reading a lane outside its mask; a deadlock; more static shared memory than 48 KiB; kernel
//   parameters larger than the emulated driver allows (4 KiB before CUDA 12.1, 32764 bytes from 12.1 on
//   for compute capability >= 7.0); an empty or oversized grid or block.
// - __shared__ (via FUSEDACCUM_SHARED) is per block and poisoned with 0xFF bytes (float NaN) at block start.
// - Blocks run in a shuffled (seeded) order, dealt round-robin to `workers` OS threads that run them
//   concurrently; atomics are real (relaxed) atomics on the shared host memory, __threadfence a seq_cst fence.
// - Under ThreadSanitizer, __threadfence is modelled as PTX's fence.sc (each fence synchronizes with every
//   later fence), relaxed atomics create no happens-before, and fiber switches within a worker synchronize,
//   so TSan sees races between blocks on different workers (e.g. a missing __threadfence), not between the
//   threads of one block (those show up as wrong values: poisoned shared memory, shuffled thread order).
//   Every other atomic read-modify-write first sleeps 2 ms under TSan, so other blocks run in the window
//   between a thread's fence and its atomic: a fence missing on the reading side is then seen too (in the
//   mutation check: 5 runs of 5).
//   TSan tracks a limited number of threads: build the TSan variant with fewer threads per block
//   (FUSEDACCUM_THREADS_PER_BLOCK=64). Under AddressSanitizer the fiber stacks are annotated.
//
// What it cannot show (the limits)
// - The real memory model and caches: memory is the host's (x86: TSO), so reorderings a GPU may do (weak
//   loads/stores, L1 staleness, __ldcg vs plain loads) never happen; a missing fence is only seen by TSan,
//   and only between blocks that ran on different workers.
// - Alignment faults: a misaligned 16-byte vector load works on the CPU; the kernel's alignment checks are
//   exercised (misaligned inputs take the scalar path), but a wrong check would not fault here.
// - Occupancy, timing, register/shared-memory limits other than the 48 KiB static one, launch bounds,
//   performance: nothing here measures or limits them.
// - Warp-synchronous code without _sync: lanes run independently between sync points (one legal schedule
//   of independent thread scheduling); implicit lockstep is never emulated and only a few of all
//   interleavings are tried.
// - Device arithmetic: the kernel compiles as host code, so __CUDA_ARCH__ branches (intrinsics such as
//   __fmaf_rn, __half2float) are not the ones run; the host branches of accumulate_math.h run instead.
// - Streams, graphs and asynchrony: launches run synchronously on the calling thread plus workers.
// - Host C++ rules: build with -fno-strict-aliasing. The kernel copies 16-byte packs through uint4 pointers
//   (load_pack/store_pack), which host C++'s aliasing rules allow g++ to drop (g++ -O2 warns "pack is used
//   uninitialized" without the flag); nvcc does not exploit this, but it is formally undefined there too.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#if defined(__SANITIZE_THREAD__)
#define SIMT_TSAN 1
#include <sanitizer/tsan_interface.h>
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIMT_TSAN 1
#include <sanitizer/tsan_interface.h>
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ------------------------------------------------------------------------------------ CUDA keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define CUDART_VERSION 13000

// ------------------------------------------------------------------------------------ vector types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// ------------------------------------------------------------------------------------ runtime API
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr : int { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };

namespace simt {

struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Settings of the emulation; the tests change them between launches.
struct Config {
  uint64_t seed = 1;          // block order, block-to-worker deal, thread order between barriers
  int workers = 2;            // OS threads running blocks concurrently
  bool shuffle_threads = true;
  int driver_version = 13000;  // what cudaDriverGetVersion reports (12010+: 32764-byte kernel parameters)
  int compute_major = 9;       // what cudaDeviceGetAttribute reports (sm_90)
  int compute_minor = 0;
};
inline Config& config() {
  static Config c;
  return c;
}

// Counters the tests read (launch shapes, memsets).
struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t memsets = 0;
  int64_t max_param_bytes = 0;
  int64_t max_grid = 0;
};
inline Stats& stats() {
  static Stats s;
  return s;
}

inline thread_local cudaError_t last_error = cudaSuccess;

inline int max_param_bytes() {
  return config().driver_version >= 12010 && config().compute_major >= 7 ? 32764 : 4096;
}

// ------------------------------------------------------------------------------------ contexts
#if defined(__x86_64__)
extern "C" void simt_switch_context(void** save_sp, void* load_sp);
extern "C" void simt_fiber_start();
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack
// pointer in *save_sp, and resumes the context whose stack pointer is load_sp. A new context starts at
// simt_fiber_start, which calls r13(r12).
asm(R"(
  .text
  .weak simt_switch_context
  .type simt_switch_context,@function
simt_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch_context,.-simt_switch_context
  .weak simt_fiber_start
  .type simt_fiber_start,@function
simt_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size simt_fiber_start,.-simt_fiber_start
)");

struct Context {
  void* sp = nullptr;
  void make(char* stack, size_t size, void (*fn)(void*), void* arg) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    auto* frame = reinterpret_cast<uint64_t*>(top - 64);
    frame[0] = 0x1F80ull | (0x037Full << 32);  // MXCSR default | x87 control word default
    frame[1] = 0;                              // r15
    frame[2] = 0;                              // r14
    frame[3] = reinterpret_cast<uint64_t>(fn);   // r13
    frame[4] = reinterpret_cast<uint64_t>(arg);  // r12
    frame[5] = 0;                                // rbx
    frame[6] = 0;                                // rbp
    frame[7] = reinterpret_cast<uint64_t>(&simt_fiber_start);
    sp = frame;
  }
};
inline void switch_context(Context& from, Context& to) { simt_switch_context(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
  void make(char* stack, size_t size, void (*fn)(void*), void* arg) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = size;
    uc.uc_link = nullptr;
    const auto bits = reinterpret_cast<uintptr_t>(arg);
    makecontext(&uc, reinterpret_cast<void (*)()>(+[](unsigned hi, unsigned lo, void (*f)(void*)) {
                  f(reinterpret_cast<void*>((uintptr_t(hi) << 32) | lo));
                }),
                3, unsigned(bits >> 32), unsigned(bits), fn);
  }
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------------------------ launch state
struct LaunchBase {
  dim3 grid, block;
  virtual void run_thread() = 0;
  virtual ~LaunchBase() = default;
};

template <class Kernel, class... Args>
struct Launch final : LaunchBase {
  Kernel kernel;
  std::tuple<Args...> args;
  Launch(Kernel k, Args... a) : kernel(k), args(a...) {}
  // Each thread gets its own copy of the by-value parameters, as the kernel's signature says.
  void run_thread() override { std::apply(kernel, args); }
};

enum class Wait { kRunnable, kBarrier, kWarp, kDone, kFailed };

struct Block;

struct Fiber {
  Context context;
  char* stack = nullptr;
  size_t stack_size = 0;
#if defined(SIMT_ASAN)
  void* fake_stack = nullptr;
#endif
#if defined(SIMT_TSAN)
  void* tsan = nullptr;
#endif
  Block* block = nullptr;
  uint3 thread_idx{};
  int linear = 0;
  Wait wait = Wait::kRunnable;
  const char* site_file = nullptr;  // where it waits
  int site_line = 0;
  int barrier_result = 0;
  unsigned mask = 0;
  uint64_t shuffle_value = 0;
  int shuffle_source = 0;  // lane to read, or -1 for its own value
  uint64_t shuffle_out = 0;
};

struct WarpState {
  unsigned arrived = 0;
  unsigned mask = 0;
  const char* file = nullptr;
  int line = 0;
};

constexpr size_t kSharedBytes = 48 * 1024;
constexpr size_t kStackBytes = 512 * 1024;

struct Block {
  LaunchBase* launch = nullptr;
  uint3 block_idx{};
  int threads = 0;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<int> queue;
  size_t head = 0;
  int done = 0;
  // block barrier
  int at_barrier = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  int barrier_count = 0;  // predicates that were true
  std::vector<WarpState> warps;
  alignas(64) unsigned char shared[kSharedBytes];
  size_t shared_used = 0;
  std::vector<std::pair<const void*, size_t>> shared_sites;
  std::string error;
  std::mt19937_64 rng;
  Context scheduler;
#if defined(SIMT_ASAN)
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
#endif
#if defined(SIMT_TSAN)
  void* scheduler_tsan = nullptr;
#endif
};

inline thread_local Block* tl_block = nullptr;
inline thread_local Fiber* tl_fiber = nullptr;

inline Fiber& self() { return *tl_fiber; }

inline std::string where(const char* file, int line) {
  const char* slash = file ? std::strrchr(file, '/') : nullptr;
  return std::string(slash ? slash + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}

inline std::string thread_name(const Block& b, const Fiber& f) {
  return "block (" + std::to_string(b.block_idx.x) + "," + std::to_string(b.block_idx.y) + "," +
         std::to_string(b.block_idx.z) + ") thread " + std::to_string(f.linear);
}

// Fiber -> scheduler. `finished`: the fiber never runs again.
inline void yield_to_scheduler(bool finished) {
  Fiber& f = self();
  Block& b = *f.block;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, b.scheduler_stack, b.scheduler_stack_size);
#endif
#if defined(SIMT_TSAN)
  __tsan_switch_to_fiber(b.scheduler_tsan, 0);
#endif
  switch_context(f.context, b.scheduler);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  (void)finished;
}

inline void fail(Block& b, const std::string& message) {
  if (b.error.empty()) b.error = message;
}

// Reports the error and leaves this fiber parked forever (the scheduler stops the block).
[[noreturn]] inline void fail_here(const std::string& message) {
  Fiber& f = self();
  fail(*f.block, thread_name(*f.block, f) + ": " + message);
  f.wait = Wait::kFailed;
  yield_to_scheduler(true);
  std::abort();  // never resumed
}

inline void make_runnable_shuffled(Block& b, std::vector<int>& ids) {
  if (config().shuffle_threads) std::shuffle(ids.begin(), ids.end(), b.rng);
  for (int id : ids) b.queue.push_back(id);
}

inline void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &f.block->scheduler_stack, &f.block->scheduler_stack_size);
#endif
  Block& b = *f.block;
  b.launch->run_thread();
  f.wait = Wait::kDone;
  ++b.done;
  if (b.at_barrier > 0) {
    fail(b, thread_name(b, f) + " exited while " + std::to_string(b.at_barrier) + " threads wait at __syncthreads (" +
                where(b.barrier_file, b.barrier_line) + "): divergent barrier");
  }
  const WarpState& w = b.warps[f.linear / 32];
  if (w.arrived != 0 && (w.mask >> (f.linear % 32) & 1u)) {
    fail(b, thread_name(b, f) + " exited while its warp waits for it at a shuffle/__syncwarp (" +
                where(w.file, w.line) + ", mask 0x" + [&] {
                  char s[16];
                  std::snprintf(s, sizeof s, "%08x", w.mask);
                  return std::string(s);
                }() + ")");
  }
  yield_to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

// ------------------------------------------------------------------------------------ block barriers
enum class BarrierKind { kPlain, kOr, kAnd, kCount };

inline int block_barrier(BarrierKind kind, int predicate, const char* file, int line) {
  Fiber& f = self();
  Block& b = *f.block;
  if (b.done > 0) {
    fail_here("reached __syncthreads (" + where(file, line) + ") after " + std::to_string(b.done) +
              " threads of the block exited: divergent barrier");
  }
  if (b.at_barrier == 0) {
    b.barrier_file = file;
    b.barrier_line = line;
    b.barrier_count = 0;
  } else if (b.barrier_line != line || std::strcmp(b.barrier_file, file) != 0) {
    fail_here("waits at __syncthreads " + where(file, line) + " while other threads wait at " +
              where(b.barrier_file, b.barrier_line) + ": divergent barrier");
  }
  b.barrier_count += predicate != 0;
  ++b.at_barrier;
  f.wait = Wait::kBarrier;
  f.site_file = file;
  f.site_line = line;
  if (b.at_barrier == b.threads) {
    const int count = b.barrier_count;
    const int result = kind == BarrierKind::kOr ? count > 0
                       : kind == BarrierKind::kAnd ? count == b.threads
                                                   : count;
    std::vector<int> ids;
    ids.reserve(b.threads);
    for (Fiber& g : *b.fibers) {
      if (g.wait == Wait::kBarrier) {
        g.wait = Wait::kRunnable;
        g.barrier_result = result;
        ids.push_back(g.linear);
      }
    }
    b.at_barrier = 0;
    make_runnable_shuffled(b, ids);
  }
  yield_to_scheduler(false);  // even the last to arrive lets the others run first, in shuffled order
  return f.barrier_result;
}

// ------------------------------------------------------------------------------------ warp exchanges
inline std::string hex(unsigned v) {
  char s[16];
  std::snprintf(s, sizeof s, "0x%08x", v);
  return s;
}

// Lane exchange among the lanes of `mask`: deposits `value`, waits for every lane of the mask, returns the
// value of lane `source` (or its own value when source < 0).
inline uint64_t warp_exchange(unsigned mask, uint64_t value, int source, const char* file, int line) {
  Fiber& f = self();
  Block& b = *f.block;
  const int lane = f.linear % 32;
  const int warp = f.linear / 32;
  if (!(mask >> lane & 1u)) fail_here("calls a _sync warp op (" + where(file, line) + ") with mask " + hex(mask) +
                                      ", which leaves out its own lane " + std::to_string(lane));
  const int lanes_in_warp = std::min(32, b.threads - warp * 32);
  const unsigned existing = lanes_in_warp == 32 ? 0xffffffffu : ((1u << lanes_in_warp) - 1);
  if (mask & ~existing) fail_here("a _sync warp op (" + where(file, line) + ") names lanes that do not exist: mask " +
                                  hex(mask) + ", lanes " + hex(existing));
  WarpState& w = b.warps[warp];
  if (w.arrived == 0) {
    w.mask = mask;
    w.file = file;
    w.line = line;
  } else if (w.mask != mask || w.line != line || std::strcmp(w.file, file) != 0) {
    fail_here("lane " + std::to_string(lane) + " is at a _sync warp op " + where(file, line) + " with mask " +
              hex(mask) + " while other lanes of its warp wait at " + where(w.file, w.line) + " with mask " +
              hex(w.mask) + ": divergent or mismatched shuffle");
  }
  if (source >= 0 && !(mask >> source & 1u)) {
    fail_here("a shuffle (" + where(file, line) + ") reads lane " + std::to_string(source) +
              ", which is not in the mask " + hex(mask));
  }
  f.shuffle_value = value;
  f.shuffle_source = source;
  f.mask = mask;
  f.wait = Wait::kWarp;
  f.site_file = file;
  f.site_line = line;
  w.arrived |= 1u << lane;
  if (w.arrived == mask) {
    std::vector<int> ids;
    Fiber* lanes = &(*b.fibers)[warp * 32];
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& g = lanes[l];
      g.shuffle_out = g.shuffle_source < 0 ? g.shuffle_value : lanes[g.shuffle_source].shuffle_value;
      g.wait = Wait::kRunnable;
      ids.push_back(g.linear);
    }
    w.arrived = 0;
    make_runnable_shuffled(b, ids);
  }
  yield_to_scheduler(false);
  return f.shuffle_out;
}

template <class T>
inline T shuffle(unsigned mask, T value, int source, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const uint64_t out = warp_exchange(mask, bits, source, file, line);
  T result;
  std::memcpy(&result, &out, sizeof(T));
  return result;
}

inline int lane_id() { return self().linear % 32; }

// ------------------------------------------------------------------------------------ shared memory
template <class T, int kLine>
struct SharedSite {
  static inline const char key = 0;
};

template <class T, int kLine>
inline T& shared_variable() {
  Block& b = *self().block;
  const void* key = &SharedSite<T, kLine>::key;
  for (const auto& [site, offset] : b.shared_sites) {
    if (site == key) return *reinterpret_cast<T*>(b.shared + offset);
  }
  const size_t offset = (b.shared_used + alignof(T) - 1) / alignof(T) * alignof(T);
  if (offset + sizeof(T) > kSharedBytes) fail_here("more than 48 KiB of static __shared__ memory");
  b.shared_used = offset + sizeof(T);
  b.shared_sites.emplace_back(key, offset);
  return *reinterpret_cast<T*>(b.shared + offset);
}

// ------------------------------------------------------------------------------------ workers
struct Worker {
  std::vector<Fiber> fibers;
  std::unique_ptr<Block> block = std::make_unique<Block>();
  ~Worker() {
    for (Fiber& f : fibers) {
      if (f.stack) munmap(f.stack, f.stack_size);
#if defined(SIMT_TSAN)
      if (f.tsan) __tsan_destroy_fiber(f.tsan);
#endif
    }
  }
  void ensure(int threads) {
    while (int(fibers.size()) < threads) {
      fibers.emplace_back();
    }
    for (Fiber& f : fibers) {
      if (f.stack) continue;
      void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
      if (stack == MAP_FAILED) throw EmulationError("simt: cannot map a fiber stack");
      mprotect(stack, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
      f.stack = static_cast<char*>(stack);
      f.stack_size = kStackBytes;
#if defined(SIMT_TSAN)
      f.tsan = __tsan_create_fiber(0);
#endif
    }
  }
};

inline void run_block(LaunchBase& launch, Worker& worker, uint3 block_idx, uint64_t seed) {
  const int threads = int(launch.block.x * launch.block.y * launch.block.z);
  worker.ensure(threads);
  Block& b = *worker.block;
  b.launch = &launch;
  b.block_idx = block_idx;
  b.threads = threads;
  b.fibers = &worker.fibers;
  b.queue.clear();
  b.head = 0;
  b.done = 0;
  b.at_barrier = 0;
  b.warps.assign((threads + 31) / 32, WarpState{});
  std::memset(b.shared, 0xFF, sizeof b.shared);
  b.shared_used = 0;
  b.shared_sites.clear();
  b.error.clear();
  b.rng.seed(seed);
#if defined(SIMT_TSAN)
  b.scheduler_tsan = __tsan_get_current_fiber();
#endif
  std::vector<int> order(threads);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = worker.fibers[i];
    f.block = &b;
    f.linear = i;
    f.thread_idx = {unsigned(i) % launch.block.x, unsigned(i) / launch.block.x % launch.block.y,
                    unsigned(i) / (launch.block.x * launch.block.y)};
#if defined(SIMT_ASAN)
    // A fiber that finished left only fiber_main's frame (at the top) poisoned; one abandoned after an error,
    // any of its frames.
    const size_t poisoned = f.wait == Wait::kDone ? 16384 : f.stack_size - 4096;
    __asan_unpoison_memory_region(f.stack + f.stack_size - poisoned, poisoned);
    f.fake_stack = nullptr;
#endif
    f.wait = Wait::kRunnable;
    f.context.make(f.stack + 4096, f.stack_size - 4096, &fiber_main, &f);
    order[i] = i;
  }
  make_runnable_shuffled(b, order);
  Block* const outer_block = tl_block;
  Fiber* const outer_fiber = tl_fiber;
  tl_block = &b;
  while (b.error.empty()) {
    if (b.head == b.queue.size()) {
      if (b.done == threads) break;
      // Nobody can run and not everyone finished: say who waits where.
      std::string message = "deadlock in block (" + std::to_string(block_idx.x) + "): ";
      for (size_t w = 0; w < b.warps.size(); ++w) {
        const WarpState& ws = b.warps[w];
        if (ws.arrived == 0) continue;
        const unsigned missing = ws.mask & ~ws.arrived;
        message += "warp " + std::to_string(w) + " waits at " + where(ws.file, ws.line) + " (mask " + hex(ws.mask) +
                   ") for lanes " + hex(missing) + ", which ";
        for (int l = 0; l < 32; ++l) {
          if (!(missing >> l & 1u)) continue;
          const Fiber& g = worker.fibers[w * 32 + l];
          message += "[lane " + std::to_string(l) + ": " +
                     (g.wait == Wait::kDone      ? std::string("exited")
                      : g.wait == Wait::kBarrier ? "at __syncthreads " + where(g.site_file, g.site_line)
                                                 : "at " + where(g.site_file, g.site_line)) +
                     "] ";
          break;  // the first one is enough
        }
        message += "(bad shuffle mask or divergent warp op); ";
      }
      if (b.at_barrier > 0) {
        message += std::to_string(b.at_barrier) + " of " + std::to_string(threads - b.done) +
                   " threads wait at __syncthreads " + where(b.barrier_file, b.barrier_line);
      }
      b.error = message;
      break;
    }
    const int id = b.queue[b.head++];
    if (b.head > 4096 && b.head * 2 > b.queue.size()) {
      b.queue.erase(b.queue.begin(), b.queue.begin() + std::ptrdiff_t(b.head));
      b.head = 0;
    }
    Fiber& f = worker.fibers[id];
    tl_fiber = &f;
#if defined(SIMT_ASAN)
    void* scheduler_fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&scheduler_fake_stack, f.stack + 4096, f.stack_size - 4096);
#endif
#if defined(SIMT_TSAN)
    __tsan_switch_to_fiber(f.tsan, 0);
#endif
    switch_context(b.scheduler, f.context);
#if defined(SIMT_ASAN)
    __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
  }
  tl_block = outer_block;
  tl_fiber = outer_fiber;
  if (!b.error.empty()) throw EmulationError("simt: " + b.error);
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline std::vector<std::unique_ptr<Worker>>& worker_pool() {
  static std::vector<std::unique_ptr<Worker>> pool;
  return pool;
}

// Runs every block of the launch; throws EmulationError on a detected bug.
inline void run_launch(LaunchBase& launch) {
  const uint64_t blocks = uint64_t(launch.grid.x) * launch.grid.y * launch.grid.z;
  std::vector<uint3> order;
  order.reserve(blocks);
  for (unsigned z = 0; z < launch.grid.z; ++z)
    for (unsigned y = 0; y < launch.grid.y; ++y)
      for (unsigned x = 0; x < launch.grid.x; ++x) order.push_back({x, y, z});
  std::mt19937_64 rng(config().seed * 0x9E3779B97F4A7C15ull + uint64_t(stats().launches));
  std::shuffle(order.begin(), order.end(), rng);
  const int workers = int(std::max<uint64_t>(1, std::min<uint64_t>(blocks, uint64_t(std::max(1, config().workers)))));
  auto& pool = worker_pool();
  while (int(pool.size()) < workers) pool.push_back(std::make_unique<Worker>());
  std::vector<std::string> errors(workers);
  std::vector<uint64_t> seeds(order.size());
  for (auto& s : seeds) s = rng();
  auto work = [&](int w) {
    try {
      for (size_t i = size_t(w); i < order.size(); i += size_t(workers)) run_block(launch, *pool[w], order[i], seeds[i]);
    } catch (const std::exception& e) {
      errors[w] = e.what();
    }
  };
  std::vector<std::thread> threads;
  for (int w = 1; w < workers; ++w) threads.emplace_back(work, w);
  work(0);
  for (auto& t : threads) t.join();
  for (const auto& e : errors) {
    if (!e.empty()) throw EmulationError(e);
  }
}

template <class Kernel, class... Args>
inline cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, cudaStream_t, Args... args) {
  const std::lock_guard<std::mutex> lock(launch_mutex());
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const int64_t param_bytes = int64_t((sizeof(Args) + ... + 0));
  Stats& s = stats();
  s.max_param_bytes = std::max(s.max_param_bytes, param_bytes);
  if (blocks == 0 || threads == 0 || threads > 1024 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    return last_error = cudaErrorInvalidConfiguration;
  }
  if (param_bytes > max_param_bytes()) return last_error = cudaErrorInvalidValue;
  Launch<Kernel, Args...> state(kernel, args...);
  state.grid = grid;
  state.block = block;
  run_launch(state);
  ++s.launches;
  s.blocks += int64_t(blocks);
  s.max_grid = std::max(s.max_grid, int64_t(blocks));
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------ atomics, fences
#if defined(SIMT_TSAN)
inline char sc_fence_object;
#endif

inline void fence_sc() {
#if defined(SIMT_TSAN)
  // PTX fence.sc: every fence synchronizes with the fences after it in one total order (here: real time).
  __tsan_release(&sc_fence_object);
  __tsan_acquire(&sc_fence_object);
#endif
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

}  // namespace simt

#define threadIdx (::simt::self().thread_idx)
#define blockIdx (::simt::self().block->block_idx)
#define blockDim (::simt::self().block->launch->block)
#define gridDim (::simt::self().block->launch->grid)
#define warpSize 32

#define __syncthreads() ::simt::block_barrier(::simt::BarrierKind::kPlain, 1, __FILE__, __LINE__)
#define __syncthreads_or(p) ::simt::block_barrier(::simt::BarrierKind::kOr, int(bool(p)), __FILE__, __LINE__)
#define __syncthreads_and(p) ::simt::block_barrier(::simt::BarrierKind::kAnd, int(bool(p)), __FILE__, __LINE__)
#define __syncthreads_count(p) ::simt::block_barrier(::simt::BarrierKind::kCount, int(bool(p)), __FILE__, __LINE__)
#define __syncwarp(...) ((void)::simt::warp_exchange(::simt::syncwarp_mask(__VA_ARGS__), 0, -1, __FILE__, __LINE__))

namespace simt {
inline unsigned syncwarp_mask(unsigned mask = 0xffffffffu) { return mask; }

inline int segment_source(int lane, int target, int width, bool clamp_up, bool clamp_down) {
  const int base = lane / width * width;
  if (clamp_down && target >= base + width) return -1;
  if (clamp_up && target < base) return -1;
  return target;
}
}  // namespace simt

#define __shfl_sync(mask, var, src, ...) \
  ::simt::shfl_sync_impl(mask, var, src, ::simt::shuffle_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, delta, ...) \
  ::simt::shfl_down_impl(mask, var, delta, ::simt::shuffle_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::simt::shfl_up_impl(mask, var, delta, ::simt::shuffle_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::simt::shfl_xor_impl(mask, var, lane_mask, ::simt::shuffle_width(__VA_ARGS__), __FILE__, __LINE__)

namespace simt {
inline int shuffle_width(int width = 32) { return width; }

template <class T>
inline T shfl_sync_impl(unsigned mask, T var, int src, int width, const char* file, int line) {
  const int lane = lane_id();
  return shuffle(mask, var, lane / width * width + src % width, file, line);
}
template <class T>
inline T shfl_down_impl(unsigned mask, T var, unsigned delta, int width, const char* file, int line) {
  const int lane = lane_id();
  return shuffle(mask, var, segment_source(lane, lane + int(delta), width, false, true), file, line);
}
template <class T>
inline T shfl_up_impl(unsigned mask, T var, unsigned delta, int width, const char* file, int line) {
  const int lane = lane_id();
  return shuffle(mask, var, segment_source(lane, lane - int(delta), width, true, false), file, line);
}
template <class T>
inline T shfl_xor_impl(unsigned mask, T var, int lane_mask, int width, const char* file, int line) {
  const int lane = lane_id();
  return shuffle(mask, var, segment_source(lane, lane ^ lane_mask, width, true, true), file, line);
}
}  // namespace simt

namespace simt {
// Under TSan, every other atomic read-modify-write first sleeps 2 ms, so other blocks (on other workers) run
// between this thread's earlier operations (e.g. a fence) and the atomic: the interleavings in which a fence
// that is missing on the other side of the atomic matters actually happen.
inline void widen_race_window() {
#if defined(SIMT_TSAN)
  thread_local std::mt19937 rng(std::random_device{}());
  if (rng() % 2 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
#endif
}
}  // namespace simt

// Relaxed, device-scope atomics, as CUDA's atomic* are.
#define SIMT_ATOMIC_RMW(NAME, BUILTIN)                                                                    \
  inline int NAME(int* a, int v) {                                                                    \
    ::simt::widen_race_window();                                                                      \
    return BUILTIN(a, v, __ATOMIC_RELAXED);                                                           \
  }                                                                                                   \
  inline unsigned NAME(unsigned* a, unsigned v) {                                                     \
    ::simt::widen_race_window();                                                                      \
    return BUILTIN(a, v, __ATOMIC_RELAXED);                                                           \
  }                                                                                                   \
  inline unsigned long long NAME(unsigned long long* a, unsigned long long v) {                       \
    ::simt::widen_race_window();                                                                      \
    return BUILTIN(a, v, __ATOMIC_RELAXED);                                                           \
  }
SIMT_ATOMIC_RMW(atomicAdd, __atomic_fetch_add)
SIMT_ATOMIC_RMW(atomicSub, __atomic_fetch_sub)
SIMT_ATOMIC_RMW(atomicOr, __atomic_fetch_or)
SIMT_ATOMIC_RMW(atomicAnd, __atomic_fetch_and)
SIMT_ATOMIC_RMW(atomicXor, __atomic_fetch_xor)
SIMT_ATOMIC_RMW(atomicExch, __atomic_exchange_n)
#undef SIMT_ATOMIC_RMW

template <class T>
inline T atomicCAS(T* a, T compare, T value) {
  __atomic_compare_exchange_n(a, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
template <class T>
inline T atomicMax(T* a, T v) {
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T>
inline T atomicMin(T* a, T v) {
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline float atomicExch(float* a, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t old = __atomic_exchange_n(reinterpret_cast<uint32_t*>(a), bits, __ATOMIC_RELAXED);
  float result;
  std::memcpy(&result, &old, 4);
  return result;
}
inline float atomicAdd(float* a, float v) {
  auto* p = reinterpret_cast<uint32_t*>(a);
  uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    float f;
    std::memcpy(&f, &old, 4);
    f += v;
    uint32_t next;
    std::memcpy(&next, &f, 4);
    if (__atomic_compare_exchange_n(p, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
      std::memcpy(&f, &old, 4);
      return f;
    }
  }
}

inline void __threadfence() { ::simt::fence_sc(); }
inline void __threadfence_block() { ::simt::fence_sc(); }
inline void __threadfence_system() { ::simt::fence_sc(); }

// Cache hints change nothing here (limits: no caches).
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}

// ------------------------------------------------------------------------------------ runtime API
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::simt::last_error;
  ::simt::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::simt::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "unspecified launch failure";
  }
}
// Host memory stands for device memory. A null pointer is refused even for 0 bytes (the launcher must not
// ask for a memset when there is nothing to launch).
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  ++::simt::stats().memsets;
  if (p == nullptr) return cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = ::simt::config().driver_version;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  if (attr == cudaDevAttrComputeCapabilityMajor) {
    *value = ::simt::config().compute_major;
  } else if (attr == cudaDevAttrComputeCapabilityMinor) {
    *value = ::simt::config().compute_minor;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------ the kernel's seams
#define FUSEDACCUM_LAUNCH(kernel, blocks, threads, stream, ...) \
  ::simt::launch(kernel, ::dim3(blocks), ::dim3(threads), stream, __VA_ARGS__)
#define FUSEDACCUM_SHARED(type, name, extent) type(&name) extent = ::simt::shared_variable<type extent, __LINE__>()
