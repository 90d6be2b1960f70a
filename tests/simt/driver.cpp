// A reduced op matrix for the emulated CUDA kernel, without Python or torch, for the sanitizer builds and the
// mutation check (make check-cuda-emulated): links tests/simt/emulated_kernel.cpp (the real launcher and
// kernel of csrc/cuda/accumulate_kernel.cu under tests/simt/simt.h) and checks every case against the
// per-element maths of csrc/accumulate_math.h: masters and grads bit for bit, found_inf exactly, the sum of
// squares against a float64 sum within the derived bound and bit for bit across block orders, worker counts
// and pointer alignment. Every buffer has random guard bytes on both sides, checked after each call.
//
// Exit status 0: every case passed; 1: a check failed (printed); 2: the emulation reported a kernel bug.
// Usage: driver [--quick]   (--quick: the TSan-sized matrix: smaller lists, no 257-block table split)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define GUARD_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define GUARD_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define GUARD_POISON(p, n) ((void)(p), (void)(n))
#define GUARD_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include "../../csrc/accumulate_math.h"
#include "../../csrc/cuda/accumulate_cuda.h"

using fusedaccum::cuda::AccumulateOptions;
using fusedaccum::cuda::TensorPair;

extern "C" {
const char* simt_last_error();
void simt_configure(uint64_t seed, int workers, int shuffle_threads, int driver_version, int compute_major);
void simt_stats(int64_t* out);
void simt_reset_stats();
int fa_launch(const TensorPair* pairs, int64_t count, const AccumulateOptions* options,
              void* (*allocate)(int64_t bytes, void* context), void* context);
}

namespace {

constexpr int64_t kChunk = fusedaccum::kChunkElements;
constexpr size_t kGuard = 64;
int g_failures = 0;

#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      ++g_failures;                                             \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
      return false;                                             \
    }                                                           \
  } while (0)

// Bytes with random guards on both sides, starting `misalign` bytes past a 16-byte boundary. Under
// AddressSanitizer the guards are also poisoned, so an out-of-bounds read is reported too.
struct Buffer {
  std::vector<unsigned char> raw;
  std::vector<unsigned char> guard_copy;
  size_t offset = 0;
  size_t bytes = 0;
  Buffer() = default;
  Buffer(size_t n, size_t misalign, std::mt19937_64& rng) : bytes(n) {
    raw.resize(n + 2 * kGuard + 32);
    for (auto& b : raw) b = static_cast<unsigned char>(rng());
    const auto base = reinterpret_cast<uintptr_t>(raw.data()) + kGuard;
    offset = kGuard + ((16 - base % 16) + misalign) % 16;
    guard_copy = raw;
  }
  unsigned char* data() { return raw.data() + offset; }
  void poison_guards() {
    GUARD_POISON(raw.data(), offset);
    GUARD_POISON(raw.data() + offset + bytes, raw.size() - offset - bytes);
  }
  bool guards_intact() {
    GUARD_UNPOISON(raw.data(), raw.size());
    return std::memcmp(raw.data(), guard_copy.data(), offset) == 0 &&
           std::memcmp(raw.data() + offset + bytes, guard_copy.data() + offset + bytes,
                       raw.size() - offset - bytes) == 0;
  }
};

// The launcher's scratch, served as accumulate_cuda.cpp serves it (a fresh allocation per request): uninitialised
// device memory (random bytes) between guards. The launcher must ask at most once per call (it plans once).
struct Workspace {
  std::mt19937_64* rng;
  Buffer buffer;
  int requests = 0;
  static void* allocate(int64_t bytes, void* context) {
    auto* w = static_cast<Workspace*>(context);
    ++w->requests;
    w->buffer = Buffer(size_t(bytes), 0, *w->rng);
    w->buffer.poison_guards();
    return w->buffer.data();
  }
};

size_t grad_size(int dtype) { return dtype == fusedaccum::kGradFloat32 ? 4 : 2; }

float grad_value(int dtype, const unsigned char* p) {
  uint16_t h;
  float f;
  switch (dtype) {
    case fusedaccum::kGradBFloat16:
      std::memcpy(&h, p, 2);
      return fusedaccum::grad_to_float<fusedaccum::kGradBFloat16>(h);
    case fusedaccum::kGradFloat16:
      std::memcpy(&h, p, 2);
      return fusedaccum::grad_to_float<fusedaccum::kGradFloat16>(h);
    default:
      std::memcpy(&f, p, 4);
      return f;
  }
}

// Finite random grads over several binades; float16 from its own bit patterns (normals and subnormals).
void fill_grad(int dtype, unsigned char* p, std::mt19937_64& rng, int exponent_shift) {
  std::normal_distribution<float> normal;
  const float f = std::ldexp(normal(rng), exponent_shift);
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (dtype == fusedaccum::kGradBFloat16) {
    const uint16_t h = static_cast<uint16_t>(bits >> 16);
    std::memcpy(p, &h, 2);
  } else if (dtype == fusedaccum::kGradFloat16) {
    const uint16_t h = static_cast<uint16_t>((rng() & 0x8000u) | ((rng() % 30) << 10) | (rng() & 0x3FFu));
    std::memcpy(p, &h, 2);
  } else {
    std::memcpy(p, &f, 4);
  }
}

struct Case {
  std::string name;
  std::vector<int64_t> sizes;
  std::vector<int> dtypes;  // cycled over the tensors
  bool overwrite = false;
  bool zero_grads = true;
  bool scale_ptr = false;
  bool post_scale_ptr = false;
  bool want_found_inf = true;
  bool want_sumsq = true;
  int nonfinite = 0;  // 0: none; 1: +inf, 2: nan, in one element of each grad
};

struct Result {
  std::vector<std::vector<unsigned char>> masters, grads;
  float sumsq = 0;
  float found_inf = 0;
  int64_t launches = 0;
};

// Runs the case once (values from `value_seed`, buffers misaligned by the given bytes) and checks it.
bool run_case(const Case& c, uint64_t value_seed, size_t master_misalign, size_t grad_misalign, Result& out) {
  std::mt19937_64 rng(value_seed);
  const size_t count = c.sizes.size();
  std::vector<Buffer> masters(count), grads(count);
  std::vector<std::vector<unsigned char>> m0(count), g0(count);
  std::vector<int> dtypes(count);
  std::vector<TensorPair> pairs(count);
  for (size_t t = 0; t < count; ++t) {
    const int64_t n = c.sizes[t];
    dtypes[t] = c.dtypes[t % c.dtypes.size()];
    masters[t] = Buffer(size_t(n) * 4, master_misalign % 4 == 0 ? master_misalign : 0, rng);
    grads[t] = Buffer(size_t(n) * grad_size(dtypes[t]), grad_misalign % grad_size(dtypes[t]) == 0 ? grad_misalign : 0,
                      rng);
    const int shift = int(rng() % 13) - 6;
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < n; ++i) {
      const float m = c.overwrite ? NAN : std::ldexp(normal(rng), shift);
      std::memcpy(masters[t].data() + 4 * i, &m, 4);
      fill_grad(dtypes[t], grads[t].data() + grad_size(dtypes[t]) * i, rng, shift);
    }
    pairs[t] = {reinterpret_cast<float*>(masters[t].data()), grads[t].data(), n, dtypes[t]};
  }
  if (c.nonfinite) {
    for (size_t t = 0; t < count; ++t) {
      if (c.sizes[t] == 0) continue;
      const size_t i = rng() % size_t(c.sizes[t]);
      unsigned char* p = grads[t].data() + grad_size(dtypes[t]) * i;
      const bool nan = c.nonfinite == 2;
      if (dtypes[t] == fusedaccum::kGradFloat32) {
        const float v = nan ? NAN : INFINITY;
        std::memcpy(p, &v, 4);
      } else {
        const uint16_t v = dtypes[t] == fusedaccum::kGradBFloat16 ? (nan ? 0x7FC0 : 0x7F80) : (nan ? 0x7E00 : 0x7C00);
        std::memcpy(p, &v, 2);
      }
      // Every tensor gets one, so several blocks set the flag at once (a racy store would show under TSan).
    }
  }
  for (size_t t = 0; t < count; ++t) {
    m0[t].assign(masters[t].data(), masters[t].data() + masters[t].bytes);
    g0[t].assign(grads[t].data(), grads[t].data() + grads[t].bytes);
  }
  std::uniform_real_distribution<float> uniform(0.1f, 1.1f);
  const float scale = uniform(rng);
  const float post_scale = 1.0f / float(1 + rng() % 8);
  const float sumsq_start = uniform(rng);
  Buffer scale_buf(4, 0, rng), post_buf(4, 0, rng), found_buf(4, 0, rng), sumsq_buf(4, 0, rng);
  std::memcpy(scale_buf.data(), &scale, 4);
  std::memcpy(post_buf.data(), &post_scale, 4);
  const float zero = 0.0f;
  std::memcpy(found_buf.data(), &zero, 4);
  std::memcpy(sumsq_buf.data(), &sumsq_start, 4);
  AccumulateOptions options{c.scale_ptr ? 123.0f : scale,
                            c.scale_ptr ? reinterpret_cast<const float*>(scale_buf.data()) : nullptr,
                            c.post_scale_ptr ? -7.0f : post_scale,
                            c.post_scale_ptr ? reinterpret_cast<const float*>(post_buf.data()) : nullptr,
                            c.overwrite,
                            c.zero_grads,
                            c.want_found_inf ? reinterpret_cast<float*>(found_buf.data()) : nullptr,
                            c.want_sumsq ? reinterpret_cast<float*>(sumsq_buf.data()) : nullptr};
  Workspace workspace{&rng, Buffer(), 0};
  for (size_t t = 0; t < count; ++t) {
    masters[t].poison_guards();
    grads[t].poison_guards();
  }
  for (Buffer* b : {&scale_buf, &post_buf, &found_buf, &sumsq_buf}) b->poison_guards();
  int64_t before[6], after[6];
  simt_stats(before);
  const int status = fa_launch(pairs.data(), int64_t(count), &options, &Workspace::allocate, &workspace);
  if (status == -1) {
    std::fprintf(stderr, "EMULATION ERROR in %s: %s\n", c.name.c_str(), simt_last_error());
    std::exit(2);
  }
  CHECK(status == 0, "%s: launch_accumulate returned cudaError %d", c.name.c_str(), status);
  simt_stats(after);
  out.launches = after[0] - before[0];

  // Guards first: an out-of-bounds write makes everything else moot.
  for (size_t t = 0; t < count; ++t) {
    CHECK(masters[t].guards_intact(), "%s: write outside masters[%zu] (%lld elements)", c.name.c_str(), t,
          (long long)c.sizes[t]);
    CHECK(grads[t].guards_intact(), "%s: write outside grads[%zu]", c.name.c_str(), t);
  }
  const bool any_elements = std::any_of(c.sizes.begin(), c.sizes.end(), [](int64_t n) { return n > 0; });
  CHECK(workspace.requests == (c.want_sumsq && any_elements ? 1 : 0), "%s: the launcher asked for scratch %d times",
        c.name.c_str(), workspace.requests);
  for (Buffer* b : {&scale_buf, &post_buf, &found_buf, &sumsq_buf}) {
    CHECK(b->guards_intact(), "%s: write outside a scalar", c.name.c_str());
  }
  CHECK(workspace.requests == 0 || workspace.buffer.guards_intact(), "%s: write outside the workspace",
        c.name.c_str());

  // Per element: the shared maths, bit for bit.
  bool any_nonfinite = false;
  double want_sumsq = sumsq_start;
  int64_t total = 0;
  out.masters.assign(count, {});
  out.grads.assign(count, {});
  for (size_t t = 0; t < count; ++t) {
    const size_t gs = grad_size(dtypes[t]);
    for (int64_t i = 0; i < c.sizes[t]; ++i) {
      const float g = grad_value(dtypes[t], g0[t].data() + gs * i);
      any_nonfinite |= fusedaccum::is_nonfinite(g);
      float m_old;
      std::memcpy(&m_old, m0[t].data() + 4 * i, 4);
      const float m = c.overwrite ? fusedaccum::accumulate_value<true>(0.0f, g, scale, post_scale)
                                  : fusedaccum::accumulate_value<false>(m_old, g, scale, post_scale);
      float got;
      std::memcpy(&got, masters[t].data() + 4 * i, 4);
      CHECK(std::memcmp(&got, &m, 4) == 0 || (std::isnan(got) && std::isnan(m)),
            "%s: masters[%zu][%lld] = %.9g, want %.9g", c.name.c_str(), t, (long long)i, got, m);
      want_sumsq += double(m) * m;
      const unsigned char* gp = grads[t].data() + gs * i;
      if (c.zero_grads) {
        static const unsigned char zeros[4] = {};
        CHECK(std::memcmp(gp, zeros, gs) == 0, "%s: grads[%zu][%lld] not zeroed", c.name.c_str(), t, (long long)i);
      } else {
        CHECK(std::memcmp(gp, g0[t].data() + gs * i, gs) == 0, "%s: grads[%zu][%lld] changed", c.name.c_str(), t,
              (long long)i);
      }
    }
    total += c.sizes[t];
    out.masters[t].assign(masters[t].data(), masters[t].data() + masters[t].bytes);
    out.grads[t].assign(grads[t].data(), grads[t].data() + grads[t].bytes);
  }
  std::memcpy(&out.found_inf, found_buf.data(), 4);
  std::memcpy(&out.sumsq, sumsq_buf.data(), 4);
  if (c.want_found_inf) {
    CHECK(out.found_inf == (any_nonfinite ? 1.0f : 0.0f), "%s: found_inf %g, want %d", c.name.c_str(), out.found_inf,
          int(any_nonfinite));
  }
  if (c.want_sumsq && !any_nonfinite) {
    const double tolerance = (128 + std::log2(double(total) + 2) + 8) * std::ldexp(1.0, -24) * want_sumsq;
    CHECK(std::fabs(double(out.sumsq) - want_sumsq) <= tolerance, "%s: sumsq %.9g, want %.9g (tolerance %.3g)",
          c.name.c_str(), out.sumsq, want_sumsq, tolerance);
  }
  return true;
}

// The case under several block orders, worker counts and alignments: the same bits every time.
bool check_case(const Case& c, uint64_t seed, bool quick) {
  struct Variant {
    uint64_t block_seed;
    int workers;
    size_t master_misalign, grad_misalign;
  };
  std::vector<Variant> variants = {{seed, 2, 0, 0}, {seed + 1, 3, 4, 2}};
  if (!quick) variants.push_back({seed + 2, 1, 12, 6});
  Result first;
  for (size_t v = 0; v < variants.size(); ++v) {
    simt_configure(variants[v].block_seed, variants[v].workers, 1, 13000, 9);
    Result r;
    if (!run_case(c, seed, variants[v].master_misalign, variants[v].grad_misalign, r)) return false;
    if (v == 0) {
      first = r;
      continue;
    }
    uint32_t a, b;
    std::memcpy(&a, &first.sumsq, 4);
    std::memcpy(&b, &r.sumsq, 4);
    CHECK(!c.want_sumsq || a == b || (std::isnan(first.sumsq) && std::isnan(r.sumsq)),
          "%s: sumsq bits differ across block order/workers/alignment: %.9g vs %.9g", c.name.c_str(), first.sumsq,
          r.sumsq);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  using fusedaccum::kGradBFloat16;
  using fusedaccum::kGradFloat16;
  using fusedaccum::kGradFloat32;
  const std::vector<std::pair<std::string, std::vector<int>>> dtype_sets = {
      {"fp32", {kGradFloat32}}, {"bf16", {kGradBFloat16}}, {"fp16", {kGradFloat16}},
      {"mixed", {kGradBFloat16, kGradFloat32, kGradFloat16}}};
  std::vector<std::pair<std::string, std::vector<int64_t>>> size_sets = {
      {"one", {1}}, {"97", {97}}, {"4097+7", {4097, 7}}, {"two_chunks", {2 * kChunk + 3}}, {"empty", {0, 0}}};
  std::mt19937_64 sizes_rng(7);
  std::vector<int64_t> many;  // more tensors than a large table holds (320), empty ones among them
  for (int i = 0; i < (quick ? 330 : 700); ++i) many.push_back(int64_t(sizes_rng() % 40));
  many[3] = 3 * kChunk + 1;
  size_sets.push_back({"many", many});

  std::vector<Case> cases;
  for (const auto& [dname, dtypes] : dtype_sets) {
    for (const auto& [sname, sizes] : size_sets) {
      Case c;
      c.name = dname + "/" + sname;
      c.sizes = sizes;
      c.dtypes = dtypes;
      cases.push_back(c);
    }
  }
  for (int bits = 0; bits < 16; ++bits) {
    Case c;
    c.name = "options" + std::to_string(bits);
    c.sizes = {5, 4097, 130, kChunk + 9};
    c.dtypes = {kGradBFloat16, kGradFloat32, kGradFloat16};
    c.overwrite = bits & 1;
    c.zero_grads = bits & 2;
    c.scale_ptr = bits & 4;
    c.post_scale_ptr = bits & 8;
    c.want_found_inf = bits % 3 != 0;
    c.want_sumsq = bits % 5 != 0;
    cases.push_back(c);
  }
  for (const auto& [dname, dtypes] : dtype_sets) {
    for (int kind = 1; kind <= 2; ++kind) {
      Case c;
      c.name = dname + (kind == 1 ? "/inf" : "/nan");
      c.sizes = {300, kChunk + 10, 7};
      c.dtypes = dtypes;
      c.nonfinite = kind;
      cases.push_back(c);
    }
  }
  uint64_t seed = 1000;
  int run = 0;
  for (const Case& c : cases) {
    run += check_case(c, seed++, quick) ? 1 : 0;
  }

  // The classic 4 KiB table (an older driver): more tensors than it holds (64) and, unless quick, more blocks
  // (256) with one tensor split across two launches.
  {
    Case c;
    c.name = "classic-table";
    c.sizes.assign(many.begin(), many.begin() + 150);
    if (!quick) c.sizes.insert(c.sizes.begin() + 70, {200 * kChunk + 3, 60 * kChunk});
    c.dtypes = {kGradBFloat16, kGradFloat32};
    simt_configure(seed, 2, 1, 12000, 9);
    Result r;
    if (run_case(c, seed, 0, 0, r)) {
      ++run;
      int64_t tensors = 0;
      for (int64_t n : c.sizes) tensors += n > 0;
      if (r.launches < (tensors + 63) / 64) {
        ++g_failures;
        std::fprintf(stderr, "FAIL classic-table: %lld launches for %lld tensors\n", (long long)r.launches,
                     (long long)tensors);
      }
    }
  }
  std::printf("emulated CUDA kernel (%s): %d of %zu cases passed, %d failures\n", quick ? "quick" : "full", run,
              cases.size() + 1, g_failures);
  return g_failures == 0 ? 0 : 1;
}
