// bench/gemm.cpp — kiln's CPU GEMM (oneDNN's sgemm when built with it, else Eigen) in
// GFLOP/s, beside Eigen's product on the same buffers in the same run.
//
// Prints GFLOP/s (2·M·N·K per call) for square sizes, the GEMMs of the 784-256-256-10
// MLP step at batch 128 and those of the small GPT (bench/gpt_train.cpp: 2048 tokens,
// n_embd 128), each one's fraction of this run's peak (the best square-1024 figure), and
// kiln / Eigen; then the same shapes in bf16: kiln's gemm<bf16> (oneDNN's matmul where
// the CPU has bf16 instructions) beside the widening path (f32 GEMM between a widening and
// a narrowing pass) in the same run. Usage: bench_gemm [threads]
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

// GFLOP/s of run(a, lda, b, ldb, out) on T operands of the case's shape (median of 7).
template <class T, class Run>
double rate(const gemm_case& c, Run run) {
  using namespace kiln;
  auto a = tensor<T>::full({c.ta ? c.k : c.m, c.ta ? c.m : c.k}, T(0.5f));
  auto b = tensor<T>::full({c.tb ? c.n : c.k, c.tb ? c.k : c.n}, T(0.25f));
  tensor<T> out({c.m, c.n});
  const std::int64_t lda = c.ta ? c.m : c.k, ldb = c.tb ? c.k : c.n;
  const double flop = 2.0 * double(c.m) * double(c.n) * double(c.k);
  const int inner = std::max(1, static_cast<int>(2e9 / flop / 10));
  const double s = kiln::bench::median_seconds([&] { run(a.data(), lda, b.data(), ldb, out.data()); }, inner, 7, inner);
  return flop / s / 1e9;
}

double gflops(const gemm_case& c, bool eigen = false) {
  using namespace kiln;
  return rate<float>(c, [&](const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* out) {
    if (!eigen) {
      ops::cpu::gemm<float>(c.ta, c.tb, c.m, c.n, c.k, a, lda, b, ldb, out, c.n, grad_write::overwrite);
      return;
    }
    ops::cpu::cmap<float> A(a, c.ta ? c.k : c.m, c.ta ? c.m : c.k, Eigen::OuterStride<>(lda));
    ops::cpu::cmap<float> B(b, c.tb ? c.n : c.k, c.tb ? c.k : c.n, Eigen::OuterStride<>(ldb));
    ops::cpu::mmap<float> C(out, c.m, c.n, Eigen::OuterStride<>(c.n));
    if (!c.ta && !c.tb) C.noalias() = A * B;
    if (!c.ta && c.tb) C.noalias() = A * B.transpose();
    if (c.ta && !c.tb) C.noalias() = A.transpose() * B;
    if (c.ta && c.tb) C.noalias() = A.transpose() * B.transpose();
  });
}

// bf16 operands: kiln's gemm<bf16> or, with widened = true, the widening path alone.
double gflops_bf16(const gemm_case& c, bool widened) {
  using namespace kiln;
  return rate<bf16>(c, [&](const bf16* a, std::int64_t lda, const bf16* b, std::int64_t ldb, bf16* out) {
    if (widened)
      ops::cpu::gemm_half_widened<bf16>(c.ta, c.tb, c.m, c.n, c.k, a, lda, b, ldb, out, c.n, grad_write::overwrite);
    else
      ops::cpu::gemm<bf16>(c.ta, c.tb, c.m, c.n, c.k, a, lda, b, ldb, out, c.n, grad_write::overwrite);
  });
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
      {"gpt qkv  2048x128 . 128x384^T", false, true, 2048, 384, 128},
      {"gpt fc   2048x128 . 128x512^T", false, true, 2048, 512, 128},
      {"gpt proj 2048x512 . 512x128^T", false, true, 2048, 128, 512},
      {"gpt dX   2048x512 . 512x128", false, false, 2048, 128, 512},
      {"gpt dW   512x2048^T . 2048x128", true, false, 512, 128, 2048},
  };
  for (const auto& c : cases) {
    const double g = gflops(c), e = gflops(c, true);
    std::printf("kiln gemm %-32s gflops=%7.1f fraction_of_peak=%.2f eigen_gflops=%7.1f kiln/eigen=%.2fx\n", c.name, g,
                g / peak, e, g / e);
  }
#if defined(KILN_HAVE_DNNL)
  const char* path = kiln::ops::cpu::detail::native_bf16_gemm() ? "oneDNN matmul" : "widened";
#else
  const char* path = "widened";
#endif
  std::printf("bf16 gemm path: %s\n", path);
  for (const auto& c : cases) {
    const double g = gflops_bf16(c, false), w = gflops_bf16(c, true), f = gflops(c);
    std::printf(
        "kiln gemm bf16 %-32s gflops=%7.1f widened_gflops=%7.1f f32_gflops=%7.1f bf16/widened=%.2fx "
        "bf16/f32=%.2fx\n",
        c.name, g, w, f, g / w, g / f);
  }
}
