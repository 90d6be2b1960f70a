// CUDA kernel of fusedaccum::accumulate_kernel_. Includes CUDA headers only (see accumulate_cuda.h).
//
// Multi-tensor launch in the style of PyTorch/Apex multi_tensor_apply: a launch table passed by value
// maps each block to (tensor, 64K-element chunk). Each thread moves 16 bytes of grads per step (8 bf16 or
// fp16, or 2x4 fp32) with vector loads when both base pointers are 16-byte aligned, and a scalar tail.
// The sum of squares is reduced without float atomics: every block writes its partial, and the last block
// to finish (an integer completion counter) adds the partials in block order, so the norm is the same bit
// for bit on every run.
#include <cuda_runtime.h>

#include "../accumulate_math.h"
#include "accumulate_cuda.h"

// Seams for the CPU emulation of the CUDA execution model used by the tests (tests/simt/simt.h), which
// defines these macros before including this file. In a CUDA build they expand to exactly the plain
// launch, declarations and block size (checked: identical SASS with and without them).
#ifndef FUSEDACCUM_LAUNCH
#define FUSEDACCUM_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif
#ifndef FUSEDACCUM_SHARED
#define FUSEDACCUM_SHARED(type, name, extent) __shared__ type name extent
#endif
#ifndef FUSEDACCUM_THREADS_PER_BLOCK
#define FUSEDACCUM_THREADS_PER_BLOCK 512
#endif

namespace fusedaccum {
namespace cuda {
namespace {

constexpr int kMaxTensorsPerLaunch = 64;
constexpr int kMaxBlocksPerLaunch = 256;
constexpr int kThreads = FUSEDACCUM_THREADS_PER_BLOCK;
constexpr int kVec = 8;

// Passed by value as a kernel parameter: it must stay under the classic 4 KiB parameter limit.
struct LaunchTable {
  float* masters[kMaxTensorsPerLaunch];
  void* grads[kMaxTensorsPerLaunch];
  int64_t numels[kMaxTensorsPerLaunch];
  int8_t grad_dtypes[kMaxTensorsPerLaunch];
  uint8_t block_tensor[kMaxBlocksPerLaunch];
  int32_t block_chunk[kMaxBlocksPerLaunch];
};
static_assert(sizeof(LaunchTable) + sizeof(AccumulateOptions) + 2 * sizeof(void*) <= 4096,
              "launch table exceeds the kernel parameter limit");

template <typename T>
struct alignas(16) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  Pack<T> pack;
  const uint4* src = reinterpret_cast<const uint4*>(p);
  uint4* dst = reinterpret_cast<uint4*>(&pack);
#pragma unroll
  for (int k = 0; k < int(sizeof(Pack<T>) / 16); ++k) dst[k] = src[k];
  return pack;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  uint4* dst = reinterpret_cast<uint4*>(p);
  const uint4* src = reinterpret_cast<const uint4*>(&pack);
#pragma unroll
  for (int k = 0; k < int(sizeof(Pack<T>) / 16); ++k) dst[k] = src[k];
}

template <int kDType, bool kOverwrite>
__device__ __forceinline__ void accumulate_chunk(float* __restrict__ master, void* grad_ptr, int64_t n,
                                                 float scale, float post_scale, bool zero_grads, float& sumsq,
                                                 bool& nonfinite) {
  using G = typename GradStorage<kDType>::type;
  G* __restrict__ grad = static_cast<G*>(grad_ptr);
  const bool aligned = ((reinterpret_cast<uintptr_t>(master) | reinterpret_cast<uintptr_t>(grad)) % 16) == 0;
  const int64_t vec_end = aligned ? (n / kVec) * kVec : 0;
  for (int64_t i = int64_t(threadIdx.x) * kVec; i < vec_end; i += int64_t(blockDim.x) * kVec) {
    const Pack<G> g = load_pack(grad + i);
    Pack<float> m;
    if (!kOverwrite) m = load_pack(master + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float gf = grad_to_float<kDType>(g.v[k]);
      nonfinite |= is_nonfinite(gf);
      m.v[k] = accumulate_value<kOverwrite>(kOverwrite ? 0.0f : m.v[k], gf, scale, post_scale);
      sumsq = fused_multiply_add(m.v[k], m.v[k], sumsq);
    }
    store_pack(master + i, m);
    if (zero_grads) store_pack(grad + i, Pack<G>{});
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += blockDim.x) {
    const float gf = grad_to_float<kDType>(grad[i]);
    nonfinite |= is_nonfinite(gf);
    const float m = accumulate_value<kOverwrite>(kOverwrite ? 0.0f : master[i], gf, scale, post_scale);
    master[i] = m;
    sumsq = fused_multiply_add(m, m, sumsq);
    if (zero_grads) grad[i] = G(0);
  }
}

template <typename T>
__device__ __forceinline__ T block_sum(T value, T* shared) {
  // Fixed shape of reduction (warp shuffles, then warp 0 over the warp sums): deterministic.
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = (threadIdx.x < blockDim.x / 32) ? shared[lane] : T(0);
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(LaunchTable table, AccumulateOptions options, float* partials, unsigned int* counter) {
  const int tensor = table.block_tensor[blockIdx.x];
  float* master = table.masters[tensor];
  char* grad = static_cast<char*>(table.grads[tensor]);
  const int dtype = table.grad_dtypes[tensor];
  const int64_t begin = int64_t(table.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t n = min(kChunkElements, table.numels[tensor] - begin);
  const float scale = options.scale_ptr != nullptr ? *options.scale_ptr : options.scale;
  const float post_scale = options.post_scale_ptr != nullptr ? *options.post_scale_ptr : options.post_scale;
  const int64_t grad_bytes = dtype == kGradFloat32 ? 4 : 2;

  float sumsq = 0.0f;
  bool nonfinite = false;
#define FUSEDACCUM_CHUNK(DTYPE)                                                                            \
  (options.overwrite ? accumulate_chunk<DTYPE, true>(master + begin, grad + begin * grad_bytes, n, scale, \
                                                     post_scale, options.zero_grads, sumsq, nonfinite)    \
                     : accumulate_chunk<DTYPE, false>(master + begin, grad + begin * grad_bytes, n, scale, \
                                                      post_scale, options.zero_grads, sumsq, nonfinite))
  switch (dtype) {
    case kGradBFloat16:
      FUSEDACCUM_CHUNK(kGradBFloat16);
      break;
    case kGradFloat16:
      FUSEDACCUM_CHUNK(kGradFloat16);
      break;
    default:
      FUSEDACCUM_CHUNK(kGradFloat32);
  }
#undef FUSEDACCUM_CHUNK

  // No early exit on inf/nan: the flag is a plain store of 1.0 (every writer writes the same value).
  if (__syncthreads_or(nonfinite) && threadIdx.x == 0 && options.found_inf != nullptr) *options.found_inf = 1.0f;

  if (options.sumsq == nullptr) return;
  FUSEDACCUM_SHARED(float, warp_sums, [kThreads / 32]);
  FUSEDACCUM_SHARED(double, warp_sums_double, [kThreads / 32]);
  FUSEDACCUM_SHARED(bool, is_last_block, );
  const float block_total = block_sum(sumsq, warp_sums);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = block_total;
    __threadfence();  // publish the partial before counting this block as done
    is_last_block = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  double total = 0.0;
  for (int b = threadIdx.x; b < int(gridDim.x); b += blockDim.x) total += double(__ldcg(partials + b));
  total = block_sum(total, warp_sums_double);
  if (threadIdx.x == 0) *options.sumsq = float(double(*options.sumsq) + total);
}

// Packs the pairs into launch tables and calls on_launch(table, blocks) for each full or final table.
template <typename OnLaunch>
void pack_launches(const TensorPair* pairs, int64_t count, OnLaunch&& on_launch) {
  LaunchTable table;
  int tensors = 0;
  int blocks = 0;
  auto put_tensor = [&](int slot, const TensorPair& pair) {
    table.masters[slot] = pair.master;
    table.grads[slot] = pair.grad;
    table.numels[slot] = pair.numel;
    table.grad_dtypes[slot] = static_cast<int8_t>(pair.grad_dtype);
  };
  auto flush = [&]() {
    on_launch(table, blocks);
    tensors = 0;
    blocks = 0;
  };
  for (int64_t t = 0; t < count; ++t) {
    const TensorPair& pair = pairs[t];
    if (pair.numel == 0) continue;
    if (tensors == kMaxTensorsPerLaunch) flush();
    put_tensor(tensors, pair);
    const int64_t chunks = (pair.numel + kChunkElements - 1) / kChunkElements;
    for (int64_t c = 0; c < chunks; ++c) {
      if (blocks == kMaxBlocksPerLaunch) {
        flush();  // the tensor goes on in the next table, in slot 0
        put_tensor(0, pair);
      }
      table.block_tensor[blocks] = static_cast<uint8_t>(tensors);
      table.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
    }
    ++tensors;
  }
  if (blocks > 0) flush();
}

struct Plan {
  int64_t blocks = 0;
  int64_t launches = 0;
};

Plan plan_launches(const TensorPair* pairs, int64_t count) {
  Plan plan;
  pack_launches(pairs, count, [&](const LaunchTable&, int blocks) {
    plan.blocks += blocks;
    ++plan.launches;
  });
  return plan;
}

}  // namespace

int64_t accumulate_workspace_bytes(const TensorPair* pairs, int64_t count, bool want_sumsq) {
  if (!want_sumsq) return 0;
  const Plan plan = plan_launches(pairs, count);
  return plan.blocks * int64_t(sizeof(float)) + plan.launches * int64_t(sizeof(unsigned int));
}

cudaError_t launch_accumulate(const TensorPair* pairs, int64_t count, const AccumulateOptions& options,
                              void* workspace, cudaStream_t stream) {
  float* partials = nullptr;
  unsigned int* counters = nullptr;
  if (options.sumsq != nullptr) {
    const Plan plan = plan_launches(pairs, count);
    // Only empty tensors: nothing to launch, and no memset (of a null workspace) either.
    if (plan.launches == 0) return cudaSuccess;
    partials = static_cast<float*>(workspace);
    counters = reinterpret_cast<unsigned int*>(partials + plan.blocks);
    const cudaError_t status = cudaMemsetAsync(counters, 0, plan.launches * sizeof(unsigned int), stream);
    if (status != cudaSuccess) return status;
  }
  cudaError_t status = cudaSuccess;
  pack_launches(pairs, count, [&](const LaunchTable& table, int blocks) {
    if (status != cudaSuccess) return;
    FUSEDACCUM_LAUNCH(accumulate_kernel, blocks, kThreads, stream, table, options, partials, counters);
    status = cudaGetLastError();
    if (partials != nullptr) {
      partials += blocks;
      ++counters;
    }
  });
  return status;
}

}  // namespace cuda
}  // namespace fusedaccum
