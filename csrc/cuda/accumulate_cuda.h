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

// Bytes of device scratch the launcher needs for these pairs (sum-of-squares partials and the
// completion counters); 0 when sumsq is not requested.
int64_t accumulate_workspace_bytes(const TensorPair* pairs, int64_t count, bool want_sumsq);

// Launches the fused pass on `stream`: one launch per launch table (PyTorch/Apex multi_tensor_apply
// style), i.e. one launch in all for up to 320 tensors and 4096 64K-element chunks (64 and 256 where the
// driver or the GPU cannot take 32 KB of kernel parameters: CUDA < 12.1 or compute capability < 7.0).
cudaError_t launch_accumulate(const TensorPair* pairs, int64_t count, const AccumulateOptions& options,
                              void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedaccum
