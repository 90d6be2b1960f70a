// Maps a grad tensor's dtype to the GradDType code the kernels switch on (torch-side; not for .cu files).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "accumulate_math.h"

namespace fusedaccum {

inline int32_t grad_dtype_code(const at::Tensor& grad) {
  switch (grad.scalar_type()) {
    case at::kFloat:
      return kGradFloat32;
    case at::kBFloat16:
      return kGradBFloat16;
    case at::kHalf:
      return kGradFloat16;
    default:
      TORCH_CHECK(false, "fusedaccum: unsupported grad dtype ", grad.scalar_type());
  }
}

}  // namespace fusedaccum
