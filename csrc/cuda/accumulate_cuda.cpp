// CUDA implementation of fusedaccum::accumulate_kernel_: builds the (master, grad) table, takes scratch
// from PyTorch's caching allocator and launches accumulate_kernel.cu on the current stream under a device
// guard (kernels on the default stream would break CUDA-graph capture and stream-ordered callers).
//
// Arguments arrive validated by fusedaccum/ops.py; the TORCH_CHECKs below only guard memory safety for
// direct torch.ops calls.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../accumulate_math.h"
#include "../grad_dtype.h"
#include "accumulate_cuda.h"

namespace fusedaccum {
namespace cuda {
namespace {

const float* device_scalar(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

float* optional_output(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void accumulate_cuda(at::TensorList masters, at::TensorList grads, double scale,
                     const std::optional<at::Tensor>& scale_tensor, bool overwrite, double post_scale,
                     const std::optional<at::Tensor>& post_scale_tensor, bool zero_grads,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sumsq) {
  TORCH_CHECK(masters.size() == grads.size(), "fusedaccum: masters and grads differ in length");
  if (masters.empty()) return;
  const at::Device device = masters[0].device();
  std::vector<TensorPair> pairs;
  pairs.reserve(masters.size());
  for (size_t t = 0; t < masters.size(); ++t) {
    const at::Tensor& m = masters[t];
    const at::Tensor& g = grads[t];
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && g.is_contiguous() &&
                    m.numel() == g.numel() && m.device() == device && g.device() == device,
                "fusedaccum: invalid tensor pair at index ", t);
    pairs.push_back({m.data_ptr<float>(), g.data_ptr(), m.numel(), grad_dtype_code(g)});
  }

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const AccumulateOptions options{static_cast<float>(scale), device_scalar(scale_tensor),
                                  static_cast<float>(post_scale), device_scalar(post_scale_tensor),
                                  overwrite, zero_grads, optional_output(found_inf), optional_output(sumsq)};
  // The scratch is freed when this frame ends, after the launches are enqueued: the caching allocator hands it out
  // again only to later work on this stream.
  struct Scratch {
    at::Tensor tensor;
    at::TensorOptions options;
  } scratch{at::Tensor(), masters[0].options().dtype(at::kByte)};
  const WorkspaceAllocator workspace{[](int64_t bytes, void* context) -> void* {
                                       auto* s = static_cast<Scratch*>(context);
                                       s->tensor = at::empty({bytes}, s->options);
                                       return s->tensor.data_ptr();
                                     },
                                     &scratch};
  const cudaError_t status =
      launch_accumulate(pairs.data(), static_cast<int64_t>(pairs.size()), options, workspace, stream);
  TORCH_CHECK(status == cudaSuccess, "fusedaccum: CUDA launch failed: ", cudaGetErrorString(status));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum, CUDA, m) { m.impl("accumulate_kernel_", &accumulate_cuda); }

}  // namespace cuda
}  // namespace fusedaccum
