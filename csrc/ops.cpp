// Schemas of the compiled kernels, and the Python module fusedaccum._C that loads them.
//
// These are the kernel entry points that fusedaccum/ops.py calls after validating the arguments once for
// every backend; the CPU implementation is in cpu/accumulate_cpu.cpp, the CUDA one in
// cuda/accumulate_cuda.cpp (+ the light cuda/accumulate_kernel.cu). Mutated arguments are marked (a!).
#include <torch/extension.h>
#include <torch/library.h>

#include "accumulate_math.h"
#include "argument_checks.h"

TORCH_LIBRARY_FRAGMENT(fusedaccum, m) {
  m.def(
      "accumulate_kernel_(Tensor(a!)[] masters, Tensor(b!)[] grads, float scale, Tensor? scale_tensor, "
      "bool overwrite, float post_scale, Tensor? post_scale_tensor, bool zero_grads, Tensor(c!)? found_inf, "
      "Tensor(d!)? sumsq) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fusedaccum compiled kernels (registered as torch.ops.fusedaccum.accumulate_kernel_)";
  module.def(
      "accumulate_args_valid",
      [](const std::vector<at::Tensor>& masters, const std::vector<at::Tensor>& grads,
         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& post_scale,
         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sumsq) {
        return fusedaccum::pairs_valid(masters, grads, false, true, {scale, post_scale}, {found_inf, sumsq});
      },
      "True if fusedaccum.ops.accumulate_ would accept these tensors (a fast pre-check; ops.py names errors)");
  module.def(
      "copy_args_valid",
      [](const std::vector<at::Tensor>& dsts, const std::vector<at::Tensor>& srcs) {
        return fusedaccum::pairs_valid(dsts, srcs, true, false, {}, {});
      },
      "True if fusedaccum.ops.copy_ would accept these tensors");
  // The kernels' work split (accumulate_math.h), for the Triton kernel and the tests to agree with.
  module.attr("chunk_elements") = fusedaccum::kChunkElements;
#ifdef FUSEDACCUM_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
}
