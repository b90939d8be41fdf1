// bench/gpt_train.cpp — training throughput of a small GPT on CPU (f32), kiln's side of
// bench/run_gpt_vs_torch.sh (the PyTorch eager peer is bench/torch_gpt_train.py, same
// model, shapes, batch, optimizer and data).
//
// Model: GPT-2 blocks, vocab 256 (bytes), block 128, 4 layers, 4 heads, n_embd 128, tied
// head: ~0.84 M parameters. Napkin math per step (batch 16 × 128 tokens = 2048 tokens):
// the linear layers cost 6 · 2048 · (12·128² · 4 + 128 · 256) ≈ 10.1 GFLOP
// (forward + backward), attention 4 · 16 · 4 · 128² · 32 · 3.5 ≈ 0.47 GFLOP (less under
// the causal mask's skipped tiles): ~10.5 GFLOP per step. oneDNN's sgemm runs these
// shapes at ~390 GFLOP/s on 2 cores, so the GEMMs alone bound a step at ~27 ms
// (~76k tokens/s); the rest of the step is memory-bound passes over [2048, 512]
// activations (4 MB each, past L2). Output: one JSON line with the same fields as the peer.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "kiln/kiln.hpp"
#include "kiln/nn/gpt2.hpp"

using namespace kiln;

namespace {
struct args {
  std::int64_t vocab = 256, block = 128, n_layer = 4, n_head = 4, n_embd = 128, batch = 16, steps = 30, warmup = 5;
  int threads = 2;
  int replicas = 1;  // > 1: the batch split across this many threads (nn::thread_replicas)
  int chunks = 1;    // > 1: each replica's rows in this many sequential pieces (accumulated)
  std::uint64_t seed = 0;
  double lr = 3e-4;
  std::string data = "/usr/share/games/fortunes";
  std::string recompute = "none";
};

args parse(int argc, char** argv) {
  args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      KILN_CHECK(i + 1 < argc, "flag ", k, " needs a value");
      return argv[++i];
    };
    if (k == "--vocab")
      a.vocab = std::stoll(next());
    else if (k == "--block")
      a.block = std::stoll(next());
    else if (k == "--n-layer")
      a.n_layer = std::stoll(next());
    else if (k == "--n-head")
      a.n_head = std::stoll(next());
    else if (k == "--n-embd")
      a.n_embd = std::stoll(next());
    else if (k == "--batch")
      a.batch = std::stoll(next());
    else if (k == "--steps")
      a.steps = std::stoll(next());
    else if (k == "--warmup")
      a.warmup = std::stoll(next());
    else if (k == "--threads")
      a.threads = std::stoi(next());
    else if (k == "--replicas")
      a.replicas = std::stoi(next());
    else if (k == "--chunks")
      a.chunks = std::stoi(next());
    else if (k == "--seed")
      a.seed = std::stoull(next());
    else if (k == "--lr")
      a.lr = std::stod(next());
    else if (k == "--data")
      a.data = next();
    else if (k == "--recompute")
      a.recompute = next();
    else
      KILN_CHECK(false, "unknown flag ", k);
  }
  return a;
}

// Every regular, non-.dat file under `root` (sorted), as bytes — the peer reads the same.
std::vector<std::uint8_t> read_corpus(const std::filesystem::path& root) {
  std::vector<std::filesystem::path> files;
  if (std::filesystem::is_regular_file(root))
    files.push_back(root);
  else
    for (auto& e : std::filesystem::directory_iterator(root))
      if (e.is_regular_file() && !e.is_symlink() && e.path().extension() != ".dat") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::vector<std::uint8_t> bytes;
  for (auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    bytes.insert(bytes.end(), std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  KILN_CHECK(bytes.size() > 1000, root.string(), ": corpus too small");
  return bytes;
}

template <class Model>
int run(const args& a, const std::vector<std::uint8_t>& corpus) {
  manual_seed(a.seed);
  nn::gpt2_config c;
  c.vocab_size = a.vocab;
  c.n_positions = a.block;
  c.n_embd = a.n_embd;
  c.n_layer = a.n_layer;
  c.n_head = a.n_head;
  Model model(c);
  // Weight decay on every parameter, as the peer's AdamW(model.parameters()).
  optim::adamw<f32> opt({optim::param_group<f32>{nn::named_parameters<f32>(model)}},
                        {.lr = a.lr, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1});
  nn::thread_replicas<Model> reps(model, a.replicas, c);
  const auto params = nn::count_parameters(model).total;
  const std::int64_t B = a.batch, T = a.block, N = static_cast<std::int64_t>(corpus.size());
  tensor<i64> x(shape{B, T}), y(shape{B * T});
  philox_stream offsets{a.seed ^ 0x9e3779b97f4a7c15ULL, 0};
  std::vector<double> step_ms;
  double first_loss = 0, last_loss = 0;
  const auto total = a.warmup + a.steps;
  std::chrono::steady_clock::time_point t0;
  for (std::int64_t s = 0; s < total; ++s) {
    if (s == a.warmup) t0 = std::chrono::steady_clock::now();
    const auto ts = std::chrono::steady_clock::now();
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t o = offsets.bits(static_cast<std::uint64_t>(s * B + b)) % (N - T - 1);
      for (std::int64_t t = 0; t < T; ++t) {
        x.data()[b * T + t] = corpus[static_cast<std::size_t>(o + t)];
        y.data()[b * T + t] = corpus[static_cast<std::size_t>(o + t + 1)];
      }
    }
    opt.zero_grad();
    // Each replica takes a contiguous share of the rows (in `chunks` pieces) and weights
    // each piece's mean loss by its share of the batch.
    std::vector<double> losses(static_cast<std::size_t>(reps.size()));
    reps.run_split(B, a.chunks, [&](Model& m, nn::shard_range r, int k) {
      auto xs = x.slice(0, r.begin, r.end).contiguous();
      auto ys = y.slice(0, r.begin * T, r.end * T).contiguous();
      auto loss = cross_entropy(reshape(m(xs), shape{r.size() * T, a.vocab}), ys) * (double(r.size()) / double(B));
      losses[static_cast<std::size_t>(k)] += loss.value().flat(0);
      loss.backward();
    });
    optim::clip_grad_norm(model, 1.0);
    opt.step();
    double l = 0;
    for (double v : losses) l += v;
    if (s == 0) first_loss = l;
    last_loss = l;
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - ts).count();
    if (s >= a.warmup) step_ms.push_back(ms);
    std::fprintf(stderr, "step %lld loss %.4f %.1f ms\n", static_cast<long long>(s), l, ms);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::sort(step_ms.begin(), step_ms.end());
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::printf(
      "{\"impl\":\"kiln\",\"recompute\":\"%s\",\"threads\":%d,\"replicas\":%d,\"chunks\":%d,\"params\":%lld,\"tokens_"
      "per_step\":%lld,\"steps_timed\":"
      "%lld,"
      "\"seconds\":%.4f,\"tokens_per_s\":%.1f,\"step_ms_median\":%.3f,\"first_loss\":%.4f,\"final_loss\":%.4f,"
      "\"peak_rss_mb\":%.1f,\"peak_tensor_mb\":%.1f}\n",
      a.recompute.c_str(), a.threads, a.replicas, a.chunks, static_cast<long long>(params),
      static_cast<long long>(B * T), static_cast<long long>(a.steps), secs, double(B * T * a.steps) / secs,
      step_ms[step_ms.size() / 2], first_loss, last_loss, double(ru.ru_maxrss) / 1024.0,
      double(caching_allocator<cpu>::instance().stats().peak_in_use) / 1048576.0);
  return 0;
}
}  // namespace

int main(int argc, char** argv) try {
  const args a = parse(argc, argv);
  cpu_runtime::set_num_threads(a.threads);
  const auto corpus = read_corpus(a.data);
  if (a.recompute == "none") return run<nn::gpt2<ops::mask::causal, nn::recompute::none>>(a, corpus);
  if (a.recompute == "selective") return run<nn::gpt2<ops::mask::causal, nn::recompute::selective>>(a, corpus);
  if (a.recompute == "full") return run<nn::gpt2<ops::mask::causal, nn::recompute::full>>(a, corpus);
  KILN_CHECK(false, "--recompute must be none, selective or full, got ", a.recompute);
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
