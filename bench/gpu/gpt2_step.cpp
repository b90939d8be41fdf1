// bench/gpu/gpt2_step.cpp — a GPT-2 124M training step on the GPU: tokens/s of
// nn::gpt2<causal, none, f32, cuda> with clipping and the fused AdamW, one JSON line.
// Its peer, bench/gpu/torch_gpt2_step.py, trains the same model in PyTorch (eager, and
// under torch.compile) and prints the ratios against this line; tools/gpu-check.sh runs
// both in one session.
//
// Both sides compute in exact f32 (kiln's f32 GEMMs do not use TF32; the peer turns TF32
// off), attention causal, no dropout, batch 8 x 1024 tokens by default.
// Napkin math: 6 · 124M · 8192 tokens ≈ 6.1 TFLOP for the weights' GEMMs, plus attention's
// 12 layers · 3 (fwd + bwd) · 2·B·T²·C (causal: half of QKᵀ and PV) ≈ 0.46 TFLOP: ~6.6
// TFLOP a step; at the ~60 TFLOP/s of f32 FMA on an H100/H200 that is ~110 ms, ~75k
// tokens/s at best.
//
// Usage: bench_gpu_gpt2_step [--batch B] [--seq T] [--layers L] [--steps N]
// Exits 77 where no GPU is visible.
#include <chrono>
#include <cstdio>
#include <string>

#include "kiln/kiln.hpp"

int main(int argc, char** argv) try {
  std::int64_t B = 8, T = 1024, layers = 12, steps = 10;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    KILN_CHECK(i + 1 < argc, "gpt2_step: flag ", a, " expects a value");
    const std::int64_t v = std::stoll(argv[++i]);
    if (a == "--batch")
      B = v;
    else if (a == "--seq")
      T = v;
    else if (a == "--layers")
      layers = v;
    else if (a == "--steps")
      steps = v;
    else
      throw kiln::error("gpt2_step: unknown flag '" + a + "' (expected --batch, --seq, --layers, --steps)");
  }
  if (kiln::cuda_runtime::device_count() == 0) {
    std::printf("gpt2_step: no GPU visible, skipped\n");
    return 77;
  }
  using dev = kiln::cuda;
  kiln::nn::gpt2_config c;  // GPT-2 small: 50257 x 768, 12 heads, 1024 positions
  c.n_layer = layers;
  c.n_positions = std::max<std::int64_t>(1024, T);
  c.embd_pdrop = c.attn_pdrop = c.resid_pdrop = 0.0f;
  kiln::manual_seed(0);
  kiln::nn::gpt2<kiln::ops::mask::causal, kiln::nn::recompute::none, kiln::f32, dev> model(c);
  kiln::optim::adamw<kiln::f32, dev> opt(model, {.lr = 6e-4, .weight_decay = 0.1});
  const auto params = kiln::nn::count_parameters(model).total;

  // One fixed batch (the step's cost does not depend on the ids).
  kiln::tensor<kiln::i64> ids(kiln::shape{B, T + 1});
  const kiln::philox_stream s{1, 0};
  for (std::int64_t i = 0; i < ids.numel(); ++i)
    ids.data()[i] = static_cast<kiln::i64>(s.bits(static_cast<std::uint64_t>(i)) % c.vocab_size);
  const auto x = kiln::to_device<dev>(ids.slice(1, 0, T).contiguous());
  const auto y = kiln::to_device<dev>(ids.slice(1, 1, T + 1).contiguous().reshape(kiln::shape{B * T}));

  auto step = [&] {
    opt.zero_grad();
    auto logits = model(x);
    auto loss = kiln::cross_entropy(kiln::ops::reshape(logits, kiln::shape{B * T, c.vocab_size}), y);
    loss.backward();
    kiln::optim::clip_grad_norm(model, 1.0);
    opt.step();
    return kiln::item(loss.value());  // waits for the step, as a logged loss does
  };
  const double first = step();
  for (int i = 0; i < 2; ++i) step();  // warm-up: the allocator's cache, cuBLASLt's first calls
  kiln::caching_allocator<dev>::instance().reset_peak();
  const auto t0 = std::chrono::steady_clock::now();
  double last = 0;
  for (std::int64_t i = 0; i < steps; ++i) last = step();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto gpu = kiln::cuda_runtime::info(kiln::cuda_runtime::current_device());
  const double step_ms = 1e3 * secs / static_cast<double>(steps);
  std::printf(
      "{\"bench\": \"gpt2_step\", \"impl\": \"kiln\", \"device\": \"%s\", \"dtype\": \"f32\", \"B\": %lld, \"T\": "
      "%lld, "
      "\"layers\": %lld, \"params\": %lld, \"steps\": %lld, \"step_ms\": %.2f, \"tokens_per_s\": %.0f, "
      "\"peak_gib\": %.2f, \"loss_first\": %.4f, \"loss_last\": %.4f}\n",
      gpu.name.c_str(), static_cast<long long>(B), static_cast<long long>(T), static_cast<long long>(layers),
      static_cast<long long>(params), static_cast<long long>(steps), step_ms,
      static_cast<double>(B * T) / (step_ms / 1e3),
      static_cast<double>(kiln::caching_allocator<dev>::instance().stats().peak_in_use) / (1ull << 30), first, last);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "gpt2_step: %s\n", e.what());
  return 1;
}
