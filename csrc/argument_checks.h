// A fast yes/no check of the ops' arguments, for the hot path.
//
// fusedaccum/ops.py owns the rules and the error messages (one place for every backend); checking hundreds of
// tensors attribute by attribute in Python costs about 2 us per tensor pair (measured on the 2-core AMD EPYC
// CI machine: 310 us for the 150 pairs of a GPT-2-sized list), so when this extension is loaded ops.py first
// asks this predicate, and only walks its own checks, to name what is wrong, when the answer is no.
// The tests assert that the two agree on every bad input they know.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>

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

inline std::pair<uintptr_t, uintptr_t> span_of(const at::Tensor& t) {
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {start, start + static_cast<uintptr_t>(t.numel() * t.element_size())};
}

inline void add_span(std::vector<std::pair<uintptr_t, uintptr_t>>& spans, const at::Tensor& t) {
  if (t.numel() == 0) return;
  spans.push_back(span_of(t));
}

// Whether the kernels may write t in place as torch itself would allow: not a tensor that requires grad, and
// not an inference tensor outside inference mode. Conservative for the grads (written only with zero_grads,
// which this check does not see): a "no" only sends the call through ops.py's own checks.
inline bool writable(const at::Tensor& t) {
  return !t.requires_grad() && (!t.is_inference() || c10::InferenceMode::is_enabled());
}

// dsts[i] / srcs[i]: same shape, one device, contiguous, dense; dst dtype float32 (or any grad dtype when
// dst_any_float), src dtype float32/bf16/fp16; the optional one-element float32 scalars on that device; and
// every tensor writable (accumulate_: check_writable; copy_ leaves that to torch's own copy); no two tensors sharing memory (scalars_read may share memory with each other, being
// only read, but not with anything written).
inline bool pairs_valid(const std::vector<at::Tensor>& dsts, const std::vector<at::Tensor>& srcs, bool dst_any_float,
                        bool check_writable,
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
    if (check_writable && (!writable(d) || !writable(s))) return false;
    add_span(spans, d);
    add_span(spans, s);
  }
  for (const auto* list : {&scalars_read, &scalars_written}) {
    for (const auto& t : *list) {
      if (!t.has_value()) continue;
      if (t->layout() != at::kStrided || t->scalar_type() != at::kFloat || t->numel() != 1 || t->device() != device) {
        return false;
      }
      if (list == &scalars_written) {
        if (check_writable && !writable(*t)) return false;
        add_span(spans, *t);
      }
    }
  }
  if (!no_overlap(spans)) return false;  // sorts spans
  for (const auto& t : scalars_read) {
    if (!t.has_value() || t->numel() == 0) continue;
    const auto read = span_of(*t);
    // The first written span ending after the scalar starts; it overlaps the scalar if it starts before its end.
    auto it = std::upper_bound(spans.begin(), spans.end(), read.first,
                               [](uintptr_t start, const auto& span) { return start < span.second; });
    if (it != spans.end() && it->first < read.second) return false;
  }
  return true;
}

}  // namespace fusedaccum
