// A fast yes/no check of the ops' arguments, for the hot path.
//
// fusedaccum/ops.py owns the rules and the error messages (one place for every backend); checking hundreds of
// tensors attribute by attribute in Python costs about 2 us per tensor pair (measured on the 2-core AMD EPYC
// CI machine: 310 us for the 150 pairs of a GPT-2-sized list), so when this extension is loaded ops.py first
// asks this predicate, and only walks its own checks, to name what is wrong, when the answer is no.
// The tests assert that the two agree on every bad input they know.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

namespace fusedaccum {

inline bool is_grad_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Memory spans of the non-empty tensors; true if no two intersect.
inline bool no_overlap(std::vector<std::pair<uintptr_t, uintptr_t>>& spans) {
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) return false;
  }
  return true;
}

inline void add_span(std::vector<std::pair<uintptr_t, uintptr_t>>& spans, const at::Tensor& t) {
  if (t.numel() == 0) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  spans.emplace_back(start, start + static_cast<uintptr_t>(t.numel() * t.element_size()));
}

// dsts[i] / srcs[i]: same shape, one device, contiguous, dense; dst dtype float32 (or any grad dtype when
// dst_any_float), src dtype float32/bf16/fp16; the optional one-element float32 scalars on that device; and
// no two tensors sharing memory (scalars_read are exempt: they are only read).
inline bool pairs_valid(const std::vector<at::Tensor>& dsts, const std::vector<at::Tensor>& srcs, bool dst_any_float,
                        const std::vector<std::optional<at::Tensor>>& scalars_read,
                        const std::vector<std::optional<at::Tensor>>& scalars_written) {
  if (dsts.size() != srcs.size()) return false;
  if (dsts.empty()) return true;
  const at::Device device = dsts[0].device();
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(2 * dsts.size() + scalars_written.size());
  for (size_t i = 0; i < dsts.size(); ++i) {
    const at::Tensor& d = dsts[i];
    const at::Tensor& s = srcs[i];
    if (d.layout() != at::kStrided || s.layout() != at::kStrided) return false;
    if (dst_any_float ? !is_grad_dtype(d.scalar_type()) : d.scalar_type() != at::kFloat) return false;
    if (!is_grad_dtype(s.scalar_type())) return false;
    if (d.sizes() != s.sizes() || d.device() != device || s.device() != device) return false;
    if (!d.is_contiguous() || !s.is_contiguous()) return false;
    add_span(spans, d);
    add_span(spans, s);
  }
  for (const auto* list : {&scalars_read, &scalars_written}) {
    for (const auto& t : *list) {
      if (!t.has_value()) continue;
      if (t->layout() != at::kStrided || t->scalar_type() != at::kFloat || t->numel() != 1 || t->device() != device) {
        return false;
      }
      if (list == &scalars_written) add_span(spans, *t);
    }
  }
  return no_overlap(spans);
}

}  // namespace fusedaccum
