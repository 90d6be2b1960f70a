// Interface between the CUDA registration (accumulate_cuda.cpp, which sees torch) and the kernel
// (accumulate_kernel.cu, which sees only CUDA headers, so it compiles in seconds).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedaccum {
namespace cuda {

struct TensorPair {
  float* master;
  void* grad;
  int64_t numel;
  int32_t grad_dtype;  // GradDType
};

struct AccumulateOptions {
  float scale;
  const float* scale_ptr;  // device scalar overriding scale, or nullptr
  float post_scale;
  const float* post_scale_ptr;
  bool overwrite;
  bool zero_grads;
  float* found_inf;  // nullptr: not requested
  float* sumsq;      // nullptr: not requested
};

// Device scratch for the sum of squares (per-block partials and per-launch completion counters): asked for at most
// once per launch_accumulate, after the launch tables are planned, and only when sumsq is requested. Returns memory
// that stays valid for the launches enqueued on the stream (PyTorch's stream-ordered caching allocator gives that),
// or nullptr, which fails the call with cudaErrorMemoryAllocation; it may also throw.
struct WorkspaceAllocator {
  void* (*allocate)(int64_t bytes, void* context);
  void* context;
};

// Plans the launch tables once, then launches the fused pass on `stream`: one launch per launch table
// (PyTorch/Apex multi_tensor_apply style), i.e. one launch in all for up to 320 tensors and 4096 64K-element
// chunks (64 and 256 where the driver or the GPU cannot take 32 KB of kernel parameters: CUDA < 12.1 or compute
// capability < 7.0).
cudaError_t launch_accumulate(const TensorPair* pairs, int64_t count, const AccumulateOptions& options,
                              const WorkspaceAllocator& workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedaccum
