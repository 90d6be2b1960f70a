// CPU kernel of fusedaccum::accumulate_kernel_: one parallel pass over every (master, grad) pair.
//
// Arguments arrive validated by fusedaccum/ops.py; the TORCH_CHECKs below only guard memory safety for
// direct torch.ops calls. Work is split into fixed chunks (accumulate_math.h), run by at::parallel_for;
// each chunk returns its own sum-of-squares partial, and the partials are added in chunk order, so the
// result is the same bit for bit whatever the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../accumulate_math.h"
#include "../grad_dtype.h"

namespace fusedaccum {
namespace {

// Below this many elements in a call the kernel runs on the calling thread.
constexpr int64_t kParallelThreshold = 1 << 18;

struct ChunkResult {
  double sumsq = 0.0;
  bool nonfinite = false;
};

struct ChunkArgs {
  float* master;
  void* grad;
  int64_t numel;
  int32_t grad_dtype;
  float scale;
  float post_scale;
  bool overwrite;
  bool zero_grads;
};

// The element loop, written so that GCC vectorises it: independent lanes for the sum of squares (a float
// reduction is not reordered without -ffast-math). `count` is a multiple of kLanes; lane sums stay in float
// over at most kBlock elements and are then added into a double, which keeps the norm's error at a few ulps.
constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;

template <int kDType, bool kOverwrite, bool kZeroGrads>
__attribute__((always_inline)) inline float accumulate_lanes(float* __restrict__ master,
                                                             typename GradStorage<kDType>::type* __restrict__ grad,
                                                             int64_t count, float scale, float post_scale,
                                                             int& nonfinite) {
  using G = typename GradStorage<kDType>::type;
  float lane_sumsq[kLanes] = {};
  for (int64_t j = 0; j < count; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float g = grad_to_float<kDType>(grad[j + l]);
      nonfinite |= is_nonfinite(g);
      const float m = accumulate_value<kOverwrite>(kOverwrite ? 0.0f : master[j + l], g, scale, post_scale);
      master[j + l] = m;
      lane_sumsq[l] += m * m;
      if (kZeroGrads) grad[j + l] = G(0);
    }
  }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += lane_sumsq[l];
  return sum;
}

template <int kDType, bool kOverwrite, bool kZeroGrads>
__attribute__((always_inline)) inline ChunkResult accumulate_chunk(float* __restrict__ master,
                                                                   void* __restrict__ grad_ptr, int64_t n,
                                                                   float scale, float post_scale) {
  using G = typename GradStorage<kDType>::type;
  G* __restrict__ grad = static_cast<G*>(grad_ptr);
  ChunkResult result;
  int nonfinite = 0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    result.sumsq += accumulate_lanes<kDType, kOverwrite, kZeroGrads>(master + i, grad + i, kBlock, scale,
                                                                     post_scale, nonfinite);
  }
  // Small tensors (biases, norms) and tails: still whole lane groups, then at most kLanes - 1 scalars.
  const int64_t groups = (n - i) / kLanes * kLanes;
  result.sumsq += accumulate_lanes<kDType, kOverwrite, kZeroGrads>(master + i, grad + i, groups, scale, post_scale,
                                                                   nonfinite);
  for (i += groups; i < n; ++i) {
    const float g = grad_to_float<kDType>(grad[i]);
    nonfinite |= is_nonfinite(g);
    const float m = accumulate_value<kOverwrite>(kOverwrite ? 0.0f : master[i], g, scale, post_scale);
    master[i] = m;
    result.sumsq += static_cast<double>(m) * m;
    if (kZeroGrads) grad[i] = G(0);
  }
  result.nonfinite = nonfinite != 0;
  return result;
}

template <int kDType>
__attribute__((always_inline)) inline ChunkResult accumulate_chunk_for(const ChunkArgs& a) {
  if (a.overwrite) {
    return a.zero_grads ? accumulate_chunk<kDType, true, true>(a.master, a.grad, a.numel, a.scale, a.post_scale)
                        : accumulate_chunk<kDType, true, false>(a.master, a.grad, a.numel, a.scale, a.post_scale);
  }
  return a.zero_grads ? accumulate_chunk<kDType, false, true>(a.master, a.grad, a.numel, a.scale, a.post_scale)
                      : accumulate_chunk<kDType, false, false>(a.master, a.grad, a.numel, a.scale, a.post_scale);
}

__attribute__((always_inline)) inline ChunkResult accumulate_chunk_dispatch(const ChunkArgs& a) {
  switch (a.grad_dtype) {
    case kGradBFloat16:
      return accumulate_chunk_for<kGradBFloat16>(a);
    case kGradFloat16:
      return accumulate_chunk_for<kGradFloat16>(a);
    default:
      return accumulate_chunk_for<kGradFloat32>(a);
  }
}

ChunkResult accumulate_chunk_baseline(const ChunkArgs& a) { return accumulate_chunk_dispatch(a); }

#if defined(__x86_64__) && defined(__GNUC__)
// The same loop compiled for AVX2 + FMA (x86-64-v3), chosen at run time: without it the baseline
// x86-64 build has no fused multiply-add instruction and std::fma becomes a libm call per element.
__attribute__((target("avx2,fma,f16c"))) ChunkResult accumulate_chunk_avx2(const ChunkArgs& a) {
  return accumulate_chunk_dispatch(a);
}

bool cpu_has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#endif

ChunkResult accumulate_chunk_best(const ChunkArgs& a) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma()) return accumulate_chunk_avx2(a);
#endif
  return accumulate_chunk_baseline(a);
}

float scalar_value(double scale, const std::optional<at::Tensor>& scale_tensor) {
  return scale_tensor.has_value() ? scale_tensor->item<float>() : static_cast<float>(scale);
}

void accumulate_cpu(at::TensorList masters, at::TensorList grads, double scale,
                    const std::optional<at::Tensor>& scale_tensor, bool overwrite, double post_scale,
                    const std::optional<at::Tensor>& post_scale_tensor, bool zero_grads,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sumsq) {
  TORCH_CHECK(masters.size() == grads.size(), "fusedaccum: masters and grads differ in length");
  const float scale_f = scalar_value(scale, scale_tensor);
  const float post_scale_f = scalar_value(post_scale, post_scale_tensor);

  std::vector<ChunkArgs> chunks;
  int64_t total_elements = 0;
  for (size_t t = 0; t < masters.size(); ++t) {
    const at::Tensor& m = masters[t];
    const at::Tensor& g = grads[t];
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && g.is_contiguous() &&
                    m.numel() == g.numel() && m.is_cpu() && g.is_cpu(),
                "fusedaccum: invalid tensor pair at index ", t);
    const int32_t code = grad_dtype_code(g);
    const int64_t numel = m.numel();
    total_elements += numel;
    float* master_ptr = m.data_ptr<float>();
    char* grad_ptr = static_cast<char*>(g.data_ptr());
    for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
      chunks.push_back({master_ptr + begin, grad_ptr + begin * g.element_size(),
                        std::min(kChunkElements, numel - begin), code, scale_f, post_scale_f, overwrite,
                        zero_grads});
    }
  }
  if (chunks.empty()) return;

  std::vector<ChunkResult> results(chunks.size());
  auto run_chunks = [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) results[c] = accumulate_chunk_best(chunks[c]);
  };
  if (total_elements < kParallelThreshold) {
    // Too little work to pay for waking the thread pool (and a busy core makes the wait far worse).
    run_chunks(0, static_cast<int64_t>(chunks.size()));
  } else {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, run_chunks);
  }

  if (found_inf.has_value()) {
    const bool any = std::any_of(results.begin(), results.end(), [](const ChunkResult& r) { return r.nonfinite; });
    if (any) found_inf->data_ptr<float>()[0] = 1.0f;
  }
  if (sumsq.has_value()) {
    double total = 0.0;
    for (const ChunkResult& r : results) total += r.sumsq;  // chunk order: deterministic
    float* out = sumsq->data_ptr<float>();
    out[0] = static_cast<float>(static_cast<double>(out[0]) + total);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum, CPU, m) { m.impl("accumulate_kernel_", &accumulate_cpu); }

}  // namespace fusedaccum
