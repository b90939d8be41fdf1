// bench/common.hpp — timing helpers shared by the kiln benchmarks.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace kiln::bench {

struct timing {
  double median, best;  // seconds per call
};

// Median and best (minimum) seconds per call of f over `reps` rounds of `inner` calls,
// after `warmup` calls. On a shared machine the best round is the figure least
// disturbed by other tenants; both are reported.
template <class F>
timing time_calls(F&& f, int warmup, int reps, int inner) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / inner);
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front()};
}
template <class F>
double median_seconds(F&& f, int warmup, int reps, int inner) {
  return time_calls(f, warmup, reps, inner).median;
}

}  // namespace kiln::bench
