// bench/mlp_step.cpp — one training step of a 784-256-256-10 ReLU MLP, batch 128, f32.
//
// Napkin math: forward, dX and dW GEMMs cost 6·B·Σ(in·out) = 6·128·268,800 ≈ 206 MFLOP
// per step (1.6 MFLOP per sample); at this machine's ~150-230 GFLOP/s that bounds the
// step at ~0.9-1.4 ms. Everything else (bias, ReLU, loss, AdamW over 269k parameters,
// tape bookkeeping) should stay a small fraction. Prints medians of fwd+bwd+AdamW and of
// fwd+bwd alone, with GFLOP/s and the fraction of the n=1024 GEMM peak measured in the
// same process. Usage: bench_mlp_step [threads]
#include <cstdio>
#include <cstdlib>

#include "common.hpp"
#include "kiln/kiln.hpp"

int main(int argc, char** argv) {
  using namespace kiln;
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  cpu_runtime::set_num_threads(threads);
  manual_seed(0);
  constexpr std::int64_t batch = 128;
  nn::mlp<nn::relu> net(784, {256, 256}, 10);
  optim::adamw<float> opt(net, {.lr = 1e-3, .weight_decay = 0.01});

  // A few synthetic batches, cycled.
  std::vector<tensor<float>> xs;
  std::vector<tensor<i64>> ys;
  const philox_stream s{1, 0};
  for (int b = 0; b < 4; ++b) {
    tensor<float> x({batch, 784});
    tensor<i64> y({batch});
    for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = s.uniform(b * 200000 + i);
    for (std::int64_t i = 0; i < batch; ++i) y.data()[i] = s.bits(b * 1000 + 900000 + i) % 10;
    xs.push_back(x);
    ys.push_back(y);
  }
  int k = 0;
  auto fwd_bwd = [&] {
    auto loss = cross_entropy(net(var<float>(xs[k % 4])), ys[k % 4]);
    opt.zero_grad();
    loss.backward();
    ++k;
  };
  auto full = [&] {
    fwd_bwd();
    opt.step();
  };
  const double flop = 6.0 * batch * (784 * 256 + 256 * 256 + 256 * 10);

  // Peak reference: square GEMM n=1024 in this process.
  const std::int64_t n = 1024;
  auto a = tensor<float>::full({n, n}, 0.5f), b = tensor<float>::full({n, n}, 0.25f);
  tensor<float> c({n, n});
  const double peak_s = bench::median_seconds(
      [&] {
        ops::cpu::gemm<float>(false, false, n, n, n, a.data(), n, b.data(), n, c.data(), n, grad_write::overwrite);
      },
      3, 7, 3);
  const double peak = 2.0 * n * n * n / peak_s / 1e9;

  const auto t_full = bench::time_calls(full, 50, 21, 50);
  const auto t_fb = bench::time_calls(fwd_bwd, 50, 21, 50);
  for (auto [name, t] : {std::pair{"fwd_bwd_adamw", t_full}, std::pair{"fwd_bwd", t_fb}}) {
    const double gf = flop / t.best / 1e9;
    std::printf(
        "kiln mlp_step %s median_ms=%.4f best_ms=%.4f samples_per_s=%.0f best_samples_per_s=%.0f best_gflops=%.1f "
        "fraction_of_peak=%.2f peak_gflops=%.1f\n",
        name, t.median * 1e3, t.best * 1e3, batch / t.median, batch / t.best, gf, gf / peak, peak);
  }
}
