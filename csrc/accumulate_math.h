// Per-element maths of fusedaccum, shared by the C++ CPU kernel and the CUDA kernel.
//
// This header includes no torch header, so the light .cu files can include it. Everything here is
// __host__ __device__ under nvcc: the CPU kernel, which the test suite runs on every machine, executes the
// same arithmetic as the CUDA kernel. The update is one fused multiply-add (one rounding) followed by one
// multiply, on both sides, so the two produce bit-identical masters.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define FUSEDACCUM_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define FUSEDACCUM_HD inline
#endif

namespace fusedaccum {

// Gradient element types, as stored in the launch tables. Masters are always float32.
enum GradDType : int32_t { kGradFloat32 = 0, kGradBFloat16 = 1, kGradFloat16 = 2 };

template <int kDType>
struct GradStorage {
  using type = float;
};
template <>
struct GradStorage<kGradBFloat16> {
  using type = uint16_t;
};
template <>
struct GradStorage<kGradFloat16> {
  using type = uint16_t;
};

FUSEDACCUM_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

FUSEDACCUM_HD float bfloat16_to_float(uint16_t bits) { return float_from_bits(static_cast<uint32_t>(bits) << 16); }

// Exact IEEE binary16 -> binary32 without branches, so the CPU loop still vectorises
// (the construction used by the FP16 library and c10::detail::fp16_ieee_to_fp32_value).
FUSEDACCUM_HD float float16_to_float(uint16_t bits) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(bits));
#else
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  float magnitude = two_w < (1u << 27) ? denormalized : normalized;
  uint32_t magnitude_bits;
  std::memcpy(&magnitude_bits, &magnitude, sizeof(magnitude_bits));
  return float_from_bits(sign | magnitude_bits);
#endif
}

template <int kDType>
FUSEDACCUM_HD float grad_to_float(typename GradStorage<kDType>::type g) {
  if constexpr (kDType == kGradBFloat16) {
    return bfloat16_to_float(g);
  } else if constexpr (kDType == kGradFloat16) {
    return float16_to_float(g);
  } else {
    return g;
  }
}

FUSEDACCUM_HD float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// True for +-inf and nan. A comparison rather than std::isfinite: it vectorises on the CPU.
FUSEDACCUM_HD bool is_nonfinite(float x) {
#if defined(__CUDA_ARCH__)
  return !(fabsf(x) <= 3.402823466e+38f);
#else
  return !(std::fabs(x) <= 3.402823466e+38f);
#endif
}

// m' = ((overwrite ? 0 : m) + g * scale) * post_scale, with the add fused (one rounding).
// The overwrite form never reads the old master: on a window's first micro-step it is not loaded.
template <bool kOverwrite>
FUSEDACCUM_HD float accumulate_value(float master, float grad, float scale, float post_scale) {
  const float sum = kOverwrite ? grad * scale : fused_multiply_add(grad, scale, master);
  return sum * post_scale;
}

// Work split shared by the CPU and CUDA kernels: each tensor is cut into chunks of this many elements;
// a chunk is one CUDA block or one CPU task and owns one sum-of-squares partial, so the reduction order
// (and with it the norm, bit for bit) does not depend on thread counts or timing.
constexpr int64_t kChunkElements = 65536;

}  // namespace fusedaccum
