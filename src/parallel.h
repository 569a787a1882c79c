// A minimal parallel-for on std::thread. lutmm avoids OpenMP: its runtime (libgomp) clashes with the
// copy that PyTorch bundles when both are loaded into one Python process (segfault seen on the H100
// machine, 2026-11-25).
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lutmm {

inline int num_threads() {
  static const int n = [] {
    const unsigned hw = std::thread::hardware_concurrency();
    return int(std::max(1u, std::min(hw, 64u)));
  }();
  return n;
}

// Calls fn(i) for i in [begin, end) over up to num_threads() threads in contiguous chunks; the
// first exception thrown by any fn is rethrown on the caller's thread.
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, Fn&& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int t = int(std::min<int64_t>(num_threads(), n));
  if (t == 1) {
    for (int64_t i = begin; i < end; ++i) fn(i);
    return;
  }
  std::exception_ptr err;
  std::mutex mu;
  std::vector<std::thread> pool;
  for (int w = 0; w < t; ++w) {
    const int64_t lo = begin + n * w / t, hi = begin + n * (w + 1) / t;
    pool.emplace_back([&, lo, hi] {
      try {
        for (int64_t i = lo; i < hi; ++i) fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!err) err = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  if (err) std::rethrow_exception(err);
}

}  // namespace lutmm
