// The CUDA kernel and launcher of csrc/cuda/accumulate_kernel.cu, compiled as host C++ against the SIMT
// emulation (simt.h), behind a small C interface: tests/simt/emulated.py loads it with ctypes and runs the
// op test matrix through it; tests/simt/driver.cpp links it for the sanitizer builds. Test-only.
//
// Build: g++ -std=c++17 -I tests/simt/include -fPIC -shared tests/simt/emulated_kernel.cpp
//        [-DFUSEDACCUM_KERNEL_SOURCE='"/path/to/a/copy.cu"'] [-DFUSEDACCUM_THREADS_PER_BLOCK=64]
#include <cuda_runtime.h>  // tests/simt/include: the emulation

#ifndef FUSEDACCUM_KERNEL_SOURCE
#define FUSEDACCUM_KERNEL_SOURCE "../../csrc/cuda/accumulate_kernel.cu"
#endif
#include FUSEDACCUM_KERNEL_SOURCE

namespace {

thread_local std::string g_error;

template <class F>
int guarded(F&& f) {
  try {
    g_error.clear();
    return f();
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

// Self-test kernels: each has one classic bug the emulation must report (tests/test_cuda_emulated.py).
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void half_warp_mask_kernel(int* out) {
  // Every lane of the warp shuffles, but the mask names only the lower half.
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, int(threadIdx.x), 1);
}

__global__ void missing_lane_kernel(int* out) {
  // The mask names the whole warp, but lane 31 never comes.
  int v = int(threadIdx.x);
  if (threadIdx.x % 32 != 31) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void missing_barrier_kernel(int* out) {
  // Reads a neighbour's shared slot without a barrier: the value read is the poison, not the neighbour's.
  FUSEDACCUM_SHARED(int, slots, [64]);
  slots[threadIdx.x] = int(threadIdx.x);
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

__global__ void correct_reduction_kernel(int* out) {
  FUSEDACCUM_SHARED(int, slots, [64]);
  slots[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  int v = slots[(threadIdx.x + 1) % blockDim.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int any = __syncthreads_or(threadIdx.x == 5);
  const int count = __syncthreads_count(threadIdx.x % 2 == 0);
  if (threadIdx.x % 32 == 0) atomicAdd(reinterpret_cast<unsigned*>(out + 64), unsigned(v));
  out[threadIdx.x] = any * 1000 + count;
}

__global__ void shuffle_variants_kernel(int* out) {
  // One warp of 32: the other shuffles and __syncthreads_and, with values the test knows.
  const int lane = int(threadIdx.x % 32);
  const int up = __shfl_up_sync(0xffffffffu, lane, 3);
  const int flipped = __shfl_xor_sync(0xffffffffu, lane, 5);
  const int broadcast = __shfl_sync(0xffffffffu, lane * 10, 7);
  const int segment = __shfl_down_sync(0xffffffffu, lane, 4, 8);
  const int all = __syncthreads_and(lane < 32);
  const int not_all = __syncthreads_and(lane != 5);
  out[lane] = up;
  out[32 + lane] = flipped;
  out[64 + lane] = broadcast;
  out[96 + lane] = segment * 10 + all * 2 + not_all;
}

}  // namespace

extern "C" {

using fusedaccum::cuda::AccumulateOptions;
using fusedaccum::cuda::TensorPair;

const char* simt_last_error() { return g_error.c_str(); }

void simt_configure(uint64_t seed, int workers, int shuffle_threads, int driver_version, int compute_major) {
  simt::Config& c = simt::config();
  c.seed = seed;
  c.workers = workers;
  c.shuffle_threads = shuffle_threads != 0;
  c.driver_version = driver_version;
  c.compute_major = compute_major;
}

// launches, blocks, memsets, max_param_bytes, max_grid, threads per block of the kernel
void simt_stats(int64_t* out) {
  const simt::Stats& s = simt::stats();
  out[0] = s.launches;
  out[1] = s.blocks;
  out[2] = s.memsets;
  out[3] = s.max_param_bytes;
  out[4] = s.max_grid;
  out[5] = fusedaccum::cuda::kThreads;
}

void simt_reset_stats() { simt::stats() = simt::Stats{}; }

// cudaError_t of the launcher, or -1 when the emulation found a bug (simt_last_error says which). The launcher asks
// `allocate` for its scratch, as accumulate_cuda.cpp serves it from the caching allocator.
int fa_launch(const TensorPair* pairs, int64_t count, const AccumulateOptions* options,
              void* (*allocate)(int64_t bytes, void* context), void* context) {
  const fusedaccum::cuda::WorkspaceAllocator workspace{allocate, context};
  return guarded([&] { return int(fusedaccum::cuda::launch_accumulate(pairs, count, *options, workspace, nullptr)); });
}

// 0: the kernel ran without a reported error; -1: the emulation reported one (simt_last_error).
int simt_selftest(const char* name, int threads, int* out) {
  return guarded([&] {
    const std::string n = name;
    auto run = [&](auto kernel) { return int(simt::launch(kernel, dim3(1), dim3(unsigned(threads)), nullptr, out)); };
    if (n == "divergent_barrier") return run(divergent_barrier_kernel);
    if (n == "exit_before_barrier") return run(exit_before_barrier_kernel);
    if (n == "half_warp_mask") return run(half_warp_mask_kernel);
    if (n == "missing_lane") return run(missing_lane_kernel);
    if (n == "missing_barrier") return run(missing_barrier_kernel);
    if (n == "correct_reduction") return run(correct_reduction_kernel);
    if (n == "shuffle_variants") return run(shuffle_variants_kernel);
    throw std::runtime_error("no self-test " + n);
  });
}

}  // extern "C"
