// The CPU's bandwidth limit for the fused accumulate pass's own memory pattern (benchmarks/common.py,
// same_pattern_limit): the same streams, element sizes, directions and thread count as the C++ CPU kernel on
// bf16 grads, and no arithmetic worth the name. A plain copy is not that limit: ATen's copy_ moves 12 bytes an
// element but counts 8 (the destination is read before it is written), and it has one read and one write
// stream where the fused pass has two of each.
//
// Built by the benchmark with g++ -O3 -march=native and loaded with ctypes; no torch headers.
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// A window's later micro-steps: read the 2-byte grads and the 4-byte masters, write both (12 B/element).
void read_both_write_both(float* __restrict__ m, uint16_t* __restrict__ g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(g[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    m[i] += f;
    g[i] = 0;
  }
}

// A window's first micro-step: read the grads, write both; the masters are not read (8 B/element).
void read_grads_write_both(float* __restrict__ m, uint16_t* __restrict__ g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(g[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    m[i] = f;
    g[i] = 0;
  }
}

}  // namespace

// pattern 0: read both, write both; 1: read grads, write both. `threads` contiguous slices, one per thread
// (the calling thread takes the first), as at::parallel_for splits the CPU kernel's chunks.
extern "C" void stream_pass(int pattern, float* m, uint16_t* g, int64_t n, int threads) {
  if (threads < 1) threads = 1;
  auto run = [=](int t) {
    // Slice bounds on 64-element (a cache line of grads, four of masters) boundaries.
    const int64_t begin = n / 64 * t / threads * 64;
    const int64_t end = t == threads - 1 ? n : n / 64 * (t + 1) / threads * 64;
    if (pattern == 0) {
      read_both_write_both(m + begin, g + begin, end - begin);
    } else {
      read_grads_write_both(m + begin, g + begin, end - begin);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& thread : pool) thread.join();
}
