// Schemas of the compiled kernels, and the Python module fusedaccum._C that loads them.
//
// These are the kernel entry points that fusedaccum/ops.py calls after validating the arguments once for
// every backend; the CPU implementation is in cpu/accumulate_cpu.cpp, the CUDA one in
// cuda/accumulate_cuda.cpp (+ the light cuda/accumulate_kernel.cu). Mutated arguments are marked (a!).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fusedaccum, m) {
  m.def(
      "accumulate_kernel_(Tensor(a!)[] masters, Tensor(b!)[] grads, float scale, Tensor? scale_tensor, "
      "bool overwrite, float post_scale, Tensor? post_scale_tensor, bool zero_grads, Tensor(c!)? found_inf, "
      "Tensor(d!)? sumsq) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fusedaccum compiled kernels (registered as torch.ops.fusedaccum.accumulate_kernel_)";
#ifdef FUSEDACCUM_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
}
