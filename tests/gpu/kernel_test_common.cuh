// tests/gpu/kernel_test_common.cuh — what the three files of the test_kernels program
// share (test_kernels.cu with main, test_kernels_optim.cu, test_kernels_ops.cu): the check
// counters and their reports, device buffers, per-dtype tolerances, seeded random inputs,
// and the entry points main() calls in the other two.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "kiln/core/philox.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/cuda/kernels.hpp"

using namespace kiln;
namespace ck = kiln::cuda_kernels;

namespace kernel_test {

// Every part counts into the same totals, which main() reports.
inline int failures = 0, checks = 0;

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "test_kernels: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// A device copy of a host vector, freed at scope end.
template <class T>
struct dbuf {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dbuf(std::size_t count) : n(count) {
    cuda_ok(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)), "malloc");
  }
  explicit dbuf(const std::vector<T>& h) : dbuf(h.size()) {
    cuda_ok(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "copy in");
  }
  ~dbuf() { cudaFree(p); }
  dbuf(const dbuf&) = delete;
  std::vector<T> host() const {
    std::vector<T> h(n);
    cuda_ok(cudaDeviceSynchronize(), "sync");
    cuda_ok(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "copy out");
    return h;
  }
};

template <class T>
double tol() {
  if constexpr (std::is_same_v<T, f32>)
    return 2e-5;
  else if constexpr (std::is_same_v<T, f16>)
    return 4e-3;
  else
    return 3e-2;
}
template <class T>
const char* tname() {
  return std::is_same_v<T, f32> ? "f32" : std::is_same_v<T, f16> ? "f16" : "bf16";
}

// |a − b| <= tol · (1 + |b|), element by element; prints the worst.
template <class A, class B>
void expect_close(const std::string& what, const std::vector<A>& got, const std::vector<B>& want, double t) {
  ++checks;
  double worst = 0;
  std::size_t at = 0;
  bool sizes = got.size() == want.size();
  for (std::size_t i = 0; sizes && i < got.size(); ++i) {
    const double g = static_cast<double>(static_cast<float>(got[i])),
                 w = static_cast<double>(static_cast<float>(want[i]));
    const double e = std::abs(g - w) / (1.0 + std::abs(w));
    if (!(e <= worst)) worst = e, at = i;  // NaN counts as the worst
  }
  const bool ok = sizes && worst <= t;
  if (!ok) ++failures;
  std::printf("%s %-44s max rel err %.3g (tolerance %.1g)%s\n", ok ? "ok  " : "FAIL", what.c_str(), worst, t,
              sizes ? "" : " — sizes differ");
  (void)at;
}

// max |a − b| <= tol · max |b|: for gradients, whose elements are small next to 1, so
// expect_close's (1 + |b|) would make the tolerance absolute (a zero gradient would pass).
template <class A, class B>
void expect_close_scaled(const std::string& what, const std::vector<A>& got, const std::vector<B>& want, double t) {
  ++checks;
  double worst = 0, scale = 0;
  const bool sizes = got.size() == want.size();
  for (std::size_t i = 0; sizes && i < got.size(); ++i) {
    const double g = static_cast<float>(got[i]), w = static_cast<float>(want[i]);
    const double e = std::abs(g - w);
    if (!(e <= worst)) worst = e;  // NaN counts as the worst
    scale = std::max(scale, std::abs(w));
  }
  const double rel = scale > 0 ? worst / scale : worst;
  const bool ok = sizes && scale > 0 && rel <= t;
  if (!ok) ++failures;
  std::printf("%s %-44s max err / max |want| %.3g (tolerance %.1g)%s\n", ok ? "ok  " : "FAIL", what.c_str(), rel, t,
              !sizes      ? " — sizes differ"
              : scale > 0 ? ""
                          : " — the reference is all zeros");
}

template <class T>
std::vector<T> random(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  philox_stream s{seed, 0};
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = T(scale * (2.0f * s.uniform(i) - 1.0f));
  return v;
}
template <class T>
tensor<T> as_tensor(const std::vector<T>& v, shape s) {
  tensor<T> t(s);
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

inline void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) ++failures;
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

// The other parts' checks, which main() (test_kernels.cu) runs among its own.
void adamw_optimizer_tests();  // test_kernels_optim.cu: optim::adamw<T, cuda> against the CPU's
void clipping_tests();         // test_kernels_optim.cu: gradient clipping on cuda parameters
void adamw_kernel_tests();     // test_kernels_optim.cu: the fused AdamW and fold kernels
void ops_graph_tests();        // test_kernels_ops.cu: graphs of kiln's ops on cuda tensors
void attention_tests();        // test_kernels_ops.cu: attention, also run alone

}  // namespace kernel_test

using namespace kernel_test;
