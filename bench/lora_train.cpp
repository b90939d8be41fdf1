// bench/lora_train.cpp — LoRA fine-tuning throughput and memory on the CPU, kiln's side of
// bench/run_lora_vs_peft.sh (the peer is bench/peft_lora_train.py: transformers' Llama +
// PEFT, the same shapes, adapters, batch and optimizer).
//
// Model: a Llama (GQA, RoPE, SwiGLU, tied head), by default 6 layers × 512 hidden, 8 query
// and 2 key/value heads, intermediate 1536, vocab 32000: ~34 M parameters; LoRA r = 16,
// alpha = 32 on all seven projections of every block (~1.1 M trainable); AdamW on the
// adapters; random token batches, 4 × 256. Napkin math per step (1024 tokens): the frozen
// base costs 4 · 1024 · 34 M ≈ 0.14 TFLOP (forward, and the backward's dx only — no dW),
// the 32000-wide head ≈ 0.1 TFLOP of that; at ~200 GFLOP/s on 2 cores ~0.7 s a step.
// --dtype bf16 runs the model (base and adapters) in bf16; --adapter qlora stores the
// base projections as NF4 (kiln/ops/kernel/nf4.hpp) and reports their bytes against bf16's.
// Output: one JSON line with the same fields as the peer.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "kiln/kiln.hpp"
#include "kiln/nn/llama.hpp"
#include "kiln/nn/lora.hpp"
#include "kiln/optim/adamw.hpp"

using namespace kiln;

namespace {
struct args {
  std::int64_t layers = 6, hidden = 512, heads = 8, kv_heads = 2, intermediate = 1536, vocab = 32000;
  std::int64_t batch = 4, seq = 256, rank = 16, steps = 5, warmup = 2;
  int threads = 2;
  std::string dtype = "f32", adapter = "lora";
};

args parse(int argc, char** argv) {
  args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    KILN_CHECK(i + 1 < argc, "bench_lora_train: flag ", k, " needs a value");
    const std::string v = argv[++i];
    if (k == "--layers")
      a.layers = std::stoll(v);
    else if (k == "--hidden")
      a.hidden = std::stoll(v);
    else if (k == "--heads")
      a.heads = std::stoll(v);
    else if (k == "--kv-heads")
      a.kv_heads = std::stoll(v);
    else if (k == "--intermediate")
      a.intermediate = std::stoll(v);
    else if (k == "--vocab")
      a.vocab = std::stoll(v);
    else if (k == "--batch")
      a.batch = std::stoll(v);
    else if (k == "--seq")
      a.seq = std::stoll(v);
    else if (k == "--rank")
      a.rank = std::stoll(v);
    else if (k == "--steps")
      a.steps = std::stoll(v);
    else if (k == "--warmup")
      a.warmup = std::stoll(v);
    else if (k == "--threads")
      a.threads = std::stoi(v);
    else if (k == "--dtype")
      a.dtype = v;
    else if (k == "--adapter")
      a.adapter = v;
    else
      throw error("bench_lora_train: unknown flag " + k);
  }
  return a;
}

template <class T, class Adapter>
int run(const args& a) {
  manual_seed(0);
  nn::llama_config c;
  c.vocab_size = a.vocab;
  c.hidden_size = a.hidden;
  c.intermediate_size = a.intermediate;
  c.num_hidden_layers = a.layers;
  c.num_attention_heads = a.heads;
  c.num_key_value_heads = a.kv_heads;
  c.max_position_embeddings = a.seq;
  c.tie_word_embeddings = true;
  nn::llama<ops::mask::causal, nn::recompute::none, T, cpu, Adapter> model(c);
  nn::lora_config lc;
  lc.r = a.rank;
  lc.alpha = 2.0 * static_cast<double>(a.rank);
  lc.target_modules = {"all-linear"};
  nn::attach_lora(model, lc);
  const auto counts = nn::count_parameters(model);
  optim::adamw<T> opt(model, {.lr = 1e-4});
  const auto lora = nn::count_lora(model);

  std::vector<double> step_ms;
  double first_loss = 0, last_loss = 0;
  for (std::int64_t s = 0; s < a.warmup + a.steps; ++s) {
    tensor<i64> ids(shape{a.batch, a.seq + 1});
    const philox_stream rs{static_cast<std::uint64_t>(s), 0};
    for (std::int64_t i = 0; i < ids.numel(); ++i)
      ids.data()[i] = static_cast<std::int64_t>(rs.bits(static_cast<std::uint64_t>(i)) % a.vocab);
    auto x = ids.slice(1, 0, a.seq).contiguous(), y = ids.slice(1, 1, a.seq + 1).contiguous();
    const auto t0 = std::chrono::steady_clock::now();
    auto loss = cross_entropy(reshape(model(x), shape{a.batch * a.seq, a.vocab}), y.reshape(shape{a.batch * a.seq}));
    loss.backward();
    opt.step();
    opt.zero_grad();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const double l = static_cast<double>(loss.value().flat(0));
    if (s == 0) first_loss = l;
    last_loss = l;
    std::fprintf(stderr, "step %lld loss %.4f %.1f ms\n", static_cast<long long>(s), l, ms);
    if (s >= a.warmup) step_ms.push_back(ms);
  }
  std::sort(step_ms.begin(), step_ms.end());
  const double median_ms = step_ms[step_ms.size() / 2];
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  // The NF4 bases are no parameters: count them in, and their bytes against bf16's.
  const std::int64_t params = counts.total + lora.quantized_elements;
  std::printf(
      "{\"impl\":\"kiln\",\"dtype\":\"%s\",\"adapter\":\"%s\",\"threads\":%d,\"params\":%lld,\"trainable\":%lld,"
      "\"step_ms\":%.1f,\"tokens_per_s\":%.1f,\"first_loss\":%.4f,\"last_loss\":%.4f,\"peak_rss_mb\":%.1f,"
      "\"nf4_base_bytes\":%lld,\"nf4_base_bf16_bytes\":%lld}\n",
      a.dtype.c_str(), a.adapter.c_str(), a.threads, static_cast<long long>(params),
      static_cast<long long>(counts.trainable), median_ms, double(a.batch * a.seq) / (median_ms / 1000.0), first_loss,
      last_loss, double(ru.ru_maxrss) / 1024.0, static_cast<long long>(lora.quantized_bytes),
      static_cast<long long>(2 * lora.quantized_elements));
  return 0;
}
}  // namespace

int main(int argc, char** argv) try {
  const args a = parse(argc, argv);
  cpu_runtime::set_num_threads(a.threads);
  KILN_CHECK(a.dtype == "f32" || a.dtype == "bf16", "bench_lora_train: --dtype is f32 or bf16, got ", a.dtype);
  KILN_CHECK(a.adapter == "lora" || a.adapter == "qlora", "bench_lora_train: --adapter is lora or qlora, got ",
             a.adapter);
  if (a.adapter == "qlora")
    return a.dtype == "f32" ? run<f32, nn::adapter::qlora>(a) : run<bf16, nn::adapter::qlora>(a);
  return a.dtype == "f32" ? run<f32, nn::adapter::lora>(a) : run<bf16, nn::adapter::lora>(a);
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
