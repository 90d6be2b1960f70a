// CUDA kernel of fusedaccum::accumulate_kernel_. Includes CUDA headers only (see accumulate_cuda.h).
//
// Multi-tensor launch in the style of PyTorch/Apex multi_tensor_apply: a launch table passed by value
// maps each block to (tensor, 64K-element chunk); 320 tensors and 4096 blocks per launch where the driver
// takes 32 KB of kernel parameters (CUDA >= 12.1), else 64 and 256 as in PyTorch. Each thread moves 16 bytes
// of grads per step (8 bf16 or fp16, or 2x4 fp32) with vector loads when both base pointers are 16-byte
// aligned, scalar loads otherwise, over the same elements in the same order. The sum of squares is reduced
// without float atomics: every block writes its partial, and the last block to finish (an integer
// completion counter) adds the partials in block order, so the norm is the same bit for bit on every run,
// whatever the block order and the pointers' alignment (for a given table size and block size).
//
// Tested on every CI run without a GPU: tests/simt runs this file on the CPU under an emulation of the
// CUDA execution model (tests/test_cuda_emulated.py, make check-cuda-emulated).
#include <cuda_runtime.h>

#include <type_traits>
#include <vector>

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

constexpr int kThreads = FUSEDACCUM_THREADS_PER_BLOCK;
constexpr int kVec = 8;

// The launch table is passed by value as a kernel parameter. Kernel parameters are limited to 4 KiB, or to
// 32764 bytes with CUDA >= 12.1 (toolkit and driver) on compute capability >= 7.0.
template <int kTensors, int kBlocks, int kParameterLimit>
struct LaunchTable {
  static constexpr int kMaxTensors = kTensors;
  static constexpr int kMaxBlocks = kBlocks;
  static constexpr int kMaxParameterBytes = kParameterLimit;
  using TensorIndex = std::conditional_t<(kTensors <= 256), uint8_t, uint16_t>;
  float* masters[kTensors];
  void* grads[kTensors];
  int64_t numels[kTensors];
  int8_t grad_dtypes[kTensors];
  TensorIndex block_tensor[kBlocks];
  int32_t block_chunk[kBlocks];
};
// PyTorch's multi_tensor_apply sizes: 256 blocks of 512 threads, about 48% of an H200's resident block slots
// (132 SMs x 4), so a 1B-parameter model takes ~60 launches, each with a tail.
using ClassicTable = LaunchTable<64, 256, 4096>;
// 4096 blocks (~8 waves of 528 on an H200; a 1B-parameter model in 4 launches) and 320 tensors in 32,576 bytes.
using LargeTable = LaunchTable<320, 4096, 32764>;

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
  auto element = [&](int64_t i) {
    const float gf = grad_to_float<kDType>(grad[i]);
    nonfinite |= is_nonfinite(gf);
    const float m = accumulate_value<kOverwrite>(kOverwrite ? 0.0f : master[i], gf, scale, post_scale);
    master[i] = m;
    sumsq = fused_multiply_add(m, m, sumsq);
    if (zero_grads) grad[i] = G(0);
  };
  // Element i belongs to pack i / kVec and pack p to thread p % blockDim.x; every thread visits its packs in
  // order and a pack's elements in order, with 16-byte vector accesses when both base pointers are 16-byte
  // aligned and scalar ones otherwise. So a thread adds the same squares in the same order either way, and
  // the sum of squares has the same bits whatever the alignment.
  const bool aligned = ((reinterpret_cast<uintptr_t>(master) | reinterpret_cast<uintptr_t>(grad)) % 16) == 0;
  const int64_t full_packs = n / kVec;
  const int64_t vec_end = full_packs * kVec;
  if (aligned) {
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
  } else {
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < vec_end; i += int64_t(blockDim.x) * kVec) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) element(i + k);
    }
  }
  // The last, partial pack (n % kVec elements) goes to its owner, after that thread's full packs.
  if (int64_t(threadIdx.x) == full_packs % blockDim.x) {
    for (int64_t i = vec_end; i < n; ++i) element(i);
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

template <class Table>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(Table table, AccumulateOptions options, float* partials, unsigned int* counter) {
  static_assert(sizeof(Table) + sizeof(AccumulateOptions) + 2 * sizeof(void*) <= Table::kMaxParameterBytes,
                "launch table exceeds the kernel parameter limit");
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

  // No early exit on inf/nan. Several blocks may set the flag: an atomic store (atomicExch, old value unused)
  // rather than plain stores of the same 1.0, which would formally be a data race.
  if (__syncthreads_or(nonfinite) && threadIdx.x == 0 && options.found_inf != nullptr) {
    atomicExch(options.found_inf, 1.0f);
  }

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
template <class Table, typename OnLaunch>
void pack_launches(const TensorPair* pairs, int64_t count, OnLaunch&& on_launch) {
  Table table;
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
    if (tensors == Table::kMaxTensors) flush();
    put_tensor(tensors, pair);
    const int64_t chunks = (pair.numel + kChunkElements - 1) / kChunkElements;
    for (int64_t c = 0; c < chunks; ++c) {
      if (blocks == Table::kMaxBlocks) {
        flush();  // the tensor goes on in the next table, in slot 0
        put_tensor(0, pair);
      }
      table.block_tensor[blocks] = static_cast<typename Table::TensorIndex>(tensors);
      table.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
    }
    ++tensors;
  }
  if (blocks > 0) flush();
}

template <class Table>
struct Launch {
  Table table;
  int blocks;
};

template <class Table>
cudaError_t launch(const TensorPair* pairs, int64_t count, const AccumulateOptions& options,
                   const WorkspaceAllocator& workspace, cudaStream_t stream) {
  float* partials = nullptr;
  unsigned int* counters = nullptr;
  cudaError_t status = cudaSuccess;
  auto launch_table = [&](const Table& table, int blocks) {
    if (status != cudaSuccess) return;
    FUSEDACCUM_LAUNCH(accumulate_kernel<Table>, blocks, kThreads, stream, table, options, partials, counters);
    status = cudaGetLastError();
    if (partials != nullptr) {
      partials += blocks;
      ++counters;
    }
  };
  if (options.sumsq == nullptr) {
    // Every micro-step but a window's last: no scratch to size, so each table is launched as it is packed (no
    // copy of the tables, up to 32 KB each, and no heap allocation).
    pack_launches<Table>(pairs, count, launch_table);
    return status;
  }
  // The sum of squares needs its scratch before the first launch: the tables are packed once and kept, so the
  // scratch is sized from the very tables that are launched.
  std::vector<Launch<Table>> launches;
  int64_t total_blocks = 0;
  pack_launches<Table>(pairs, count, [&](const Table& table, int blocks) {
    launches.push_back(Launch<Table>{table, blocks});
    total_blocks += blocks;
  });
  // Only empty tensors: nothing to launch, and no scratch or memset either.
  if (launches.empty()) return cudaSuccess;
  const int64_t launch_count = static_cast<int64_t>(launches.size());
  void* scratch = workspace.allocate(
      total_blocks * int64_t(sizeof(float)) + launch_count * int64_t(sizeof(unsigned int)), workspace.context);
  if (scratch == nullptr) return cudaErrorMemoryAllocation;
  partials = static_cast<float*>(scratch);
  counters = reinterpret_cast<unsigned int*>(partials + total_blocks);
  status = cudaMemsetAsync(counters, 0, launch_count * sizeof(unsigned int), stream);
  for (const Launch<Table>& one : launches) launch_table(one.table, one.blocks);
  return status;
}

// Large tables need CUDA >= 12.1 at build time and in the driver, and compute capability >= 7.0 (a few host-side
// queries per call).
bool large_tables_supported() {
#if CUDART_VERSION >= 12010
  int device = 0;
  int driver = 0;
  int major = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDriverGetVersion(&driver) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return driver >= 12010 && major >= 7;
#else
  return false;
#endif
}

}  // namespace

cudaError_t launch_accumulate(const TensorPair* pairs, int64_t count, const AccumulateOptions& options,
                              const WorkspaceAllocator& workspace, cudaStream_t stream) {
#if CUDART_VERSION >= 12010
  if (large_tables_supported()) return launch<LargeTable>(pairs, count, options, workspace, stream);
#endif
  return launch<ClassicTable>(pairs, count, options, workspace, stream);
}

}  // namespace cuda
}  // namespace fusedaccum
