// bench/gemm.cpp — kiln's CPU GEMM (Eigen underneath) in GFLOP/s.
//
// Prints GFLOP/s (2·M·N·K per call) for square sizes and for the GEMMs of the
// 784-256-256-10 MLP step at batch 128, and each one's fraction of this run's peak
// (the best square-1024 figure). Usage: bench_gemm [threads]
#include <cstdio>
#include <cstdlib>

#include "common.hpp"
#include "kiln/kiln.hpp"

namespace {
struct gemm_case {
  const char* name;
  bool ta, tb;
  std::int64_t m, n, k;
};

double gflops(const gemm_case& c) {
  using namespace kiln;
  auto a = tensor<float>::full({c.ta ? c.k : c.m, c.ta ? c.m : c.k}, 0.5f);
  auto b = tensor<float>::full({c.tb ? c.n : c.k, c.tb ? c.k : c.n}, 0.25f);
  tensor<float> out({c.m, c.n});
  const std::int64_t lda = c.ta ? c.m : c.k, ldb = c.tb ? c.k : c.n;
  const double flop = 2.0 * double(c.m) * double(c.n) * double(c.k);
  const int inner = std::max(1, static_cast<int>(2e9 / flop / 10));
  const double s = kiln::bench::median_seconds(
      [&] {
        ops::cpu::gemm<float>(c.ta, c.tb, c.m, c.n, c.k, a.data(), lda, b.data(), ldb, out.data(), c.n,
                              grad_write::overwrite);
      },
      inner, 7, inner);
  return flop / s / 1e9;
}
}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  kiln::cpu_runtime::set_num_threads(threads);
  const gemm_case peak_case{"square 1024", false, false, 1024, 1024, 1024};
  double peak = 0;
  for (int i = 0; i < 3; ++i) peak = std::max(peak, gflops(peak_case));
  std::printf("kiln gemm threads=%d peak_gflops=%.1f (best of 3, n=1024)\n", threads, peak);
  const gemm_case cases[] = {
      {"square 256", false, false, 256, 256, 256},
      {"square 512", false, false, 512, 512, 512},
      {"mlp fwd  128x784 . 784x256^T", false, true, 128, 256, 784},
      {"mlp dW   256x128^T . 128x784", true, false, 256, 784, 128},
      {"mlp fwd  128x256 . 256x256^T", false, true, 128, 256, 256},
      {"mlp dX   128x256 . 256x256", false, false, 128, 256, 256},
  };
  for (const auto& c : cases) {
    const double g = gflops(c);
    std::printf("kiln gemm %-32s gflops=%7.1f fraction_of_peak=%.2f\n", c.name, g, g / peak);
  }
}
