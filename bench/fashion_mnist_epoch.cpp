// bench/fashion_mnist_epoch.cpp — one Fashion-MNIST training epoch: kiln's hand-written
// loop versus kiln's trainer (same model, data, loader and optimizer), and the trainer's
// per-step overhead in isolation.
//
//   --mode hand      the loop written out: forward, cross-entropy, zero_grad, backward, AdamW
//   --mode trainer   the same step as a module's training_step under kiln::trainer,
//                    logging train/loss every step (as a user does), no progress bar
//   --mode overhead  both loops over a trivial model (a 4→1 linear, batch 4) many times:
//                    the difference per step is what the trainer itself costs
// Prints one JSON line: {"impl": "kiln-hand" | "kiln-trainer", "epoch_seconds": [...], ...}
// (run_fashion_mnist_epoch.sh runs it next to the PyTorch and Lightning peers).
//
// Napkin math: ~1.6 MFLOP per sample → ~96 GFLOP per 60,000-sample epoch; at the
// 150-230 GFLOP/s Eigen reaches on 2 cores an epoch is bounded near 0.45 s.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

namespace {

using clock_type = std::chrono::steady_clock;
double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

struct args {
  std::string mode = "trainer", data = kiln::data::fashion_mnist_default_dir;
  int epochs = 3, threads = 2;
  std::int64_t steps = 200000;  // overhead mode
};

struct classifier {
  kiln::nn::mlp<kiln::nn::relu> net{784, {256, 256}, 10};
  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
  kiln::var<float> training_step(auto& ctx, const kiln::data::labelled_batch& b) {
    auto loss = kiln::cross_entropy(net(kiln::var<float>(b.x)), b.y);
    ctx.log("train/loss", loss);
    return loss;
  }
  auto configure_optimizers() { return kiln::optim::adamw<float>(*this, {.lr = 1e-3, .weight_decay = 0.01}); }
};

// Measures each training epoch from on_train_epoch_start to on_train_epoch_end.
struct epoch_timer {
  using hooks = kiln::hook_list<kiln::hook::on_train_epoch_start, kiln::hook::on_train_epoch_end>;
  std::vector<double>* out;
  clock_type::time_point t0{};
  void on_train_epoch_start(auto&) { t0 = clock_type::now(); }
  void on_train_epoch_end(auto&) { out->push_back(since(t0)); }
};

void print(const char* impl, const std::vector<double>& secs, double loss, const args& a, const char* extra = "") {
  std::printf("{\"impl\": \"%s\", \"epoch_seconds\": [", impl);
  for (std::size_t i = 0; i < secs.size(); ++i) std::printf("%s%.6f", i ? ", " : "", secs[i]);
  std::printf("], \"final_loss\": %.6f, \"threads\": %d%s}\n", loss, a.threads, extra);
  std::fflush(stdout);
}

// Trivial model for the overhead measurement.
struct tiny_batch {
  kiln::tensor<float> x, y;
  std::int64_t size() const { return 4; }
};
struct tiny_loader {
  std::vector<tiny_batch> b;
  std::int64_t size() const { return static_cast<std::int64_t>(b.size()); }
  struct range {
    const std::vector<tiny_batch>* v;
    std::int64_t first;
    auto begin() const { return v->begin() + first; }
    auto end() const { return v->end(); }
  };
  range epoch(std::int64_t, std::int64_t first) const { return {&b, first}; }
};
struct tiny {
  kiln::nn::linear<float> lin{4, 1};
  template <class F>
  void for_each_child(F&& f) {
    f("lin", lin);
  }
  kiln::var<float> training_step(auto& ctx, const tiny_batch& b) {
    auto loss = kiln::mse(lin(kiln::var<float>(b.x)), kiln::var<float>(b.y));
    ctx.log("train/loss", loss);
    return loss;
  }
  auto configure_optimizers() { return kiln::optim::adamw<float>(*this, {.lr = 1e-3}); }
};

}  // namespace

int main(int argc, char** argv) try {
  args a;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    auto next = [&]() -> std::string {
      KILN_CHECK(i + 1 < argc, "flag ", f, " expects a value");
      return argv[++i];
    };
    if (f == "--mode")
      a.mode = next();
    else if (f == "--epochs")
      a.epochs = std::stoi(next());
    else if (f == "--threads")
      a.threads = std::stoi(next());
    else if (f == "--data")
      a.data = next();
    else if (f == "--steps")
      a.steps = std::stoll(next());
    else
      throw kiln::error("unknown flag '" + f +
                        "' (expected --mode hand|trainer|overhead, --epochs, --threads, "
                        "--data, --steps)");
  }
  KILN_CHECK(a.mode == "hand" || a.mode == "trainer" || a.mode == "overhead", "--mode ", a.mode,
             ": expected hand, trainer or overhead");
  kiln::cpu_runtime::set_num_threads(a.threads);
  kiln::manual_seed(0);

  if (a.mode == "overhead") {
    tiny_loader l;
    for (int i = 0; i < 1000; ++i)
      l.b.push_back({kiln::tensor<float>::full({4, 4}, 0.1f * float(i % 7)), kiln::tensor<float>::full({4, 1}, 1.f)});
    const std::int64_t epochs = std::max<std::int64_t>(1, a.steps / 1000);
    double hand_best = 1e30, trainer_best = 1e30;
    for (int round = 0; round < 5; ++round) {
      tiny m;
      kiln::optim::adamw<float> opt(m, {.lr = 1e-3});
      auto t0 = clock_type::now();
      double sink = 0;
      for (std::int64_t e = 0; e < epochs; ++e)
        for (auto& b : l.b) {
          auto loss = kiln::mse(m.lin(kiln::var<float>(b.x)), kiln::var<float>(b.y));
          opt.zero_grad();
          loss.backward();
          opt.step();
          sink += loss.value().flat(0);
        }
      hand_best = std::min(hand_best, since(t0));
      tiny mt;
      kiln::trainer<tiny> tr({.max_epochs = epochs,
                              .num_sanity_val_steps = 0,
                              .enable_progress_bar = false,
                              .enable_model_summary = false});
      t0 = clock_type::now();
      tr.fit(mt, l);
      trainer_best = std::min(trainer_best, since(t0));
      if (sink < 0) std::printf("#");
    }
    const double steps = double(epochs) * 1000.0;
    std::printf(
        "{\"impl\": \"kiln-overhead\", \"steps\": %.0f, \"hand_us_per_step\": %.3f, \"trainer_us_per_step\": %.3f, "
        "\"overhead_us_per_step\": %.3f, \"threads\": %d}\n",
        steps, 1e6 * hand_best / steps, 1e6 * trainer_best / steps, 1e6 * (trainer_best - hand_best) / steps,
        a.threads);
    return 0;
  }

  auto train = kiln::data::fashion_mnist(a.data, "train");
  kiln::data::data_loader<kiln::data::tensor_dataset> loader(
      train, {.batch_size = 128, .shuffle = true, .drop_last = true, .seed = 0});
  std::vector<double> secs;
  double final_loss = 0;
  if (a.mode == "hand") {
    classifier m;
    kiln::optim::adamw<float> opt(m, {.lr = 1e-3, .weight_decay = 0.01});
    for (int e = 0; e < a.epochs; ++e) {
      const auto t0 = clock_type::now();
      for (auto&& b : loader.epoch(e)) {
        auto loss = kiln::cross_entropy(m.net(kiln::var<float>(b.x)), b.y);
        opt.zero_grad();
        loss.backward();
        opt.step();
        final_loss = loss.value().flat(0);  // the trainer's logged train/loss is this step value too
      }
      secs.push_back(since(t0));
    }
    print("kiln-hand", secs, final_loss, a);
  } else {
    classifier m;
    kiln::trainer<classifier, kiln::strategy::single_device<kiln::cpu>, kiln::precision::fp32, epoch_timer> tr(
        {.max_epochs = a.epochs,
         .num_sanity_val_steps = 0,
         .enable_progress_bar = false,
         .enable_model_summary = false},
        epoch_timer{&secs});
    auto r = tr.fit(m, loader);
    print("kiln-trainer", secs, r.metrics.count("train/loss") ? r.metrics.at("train/loss") : 0.0, a);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 2;
}
