// 03 — The same Fashion-MNIST classifier under each precision policy, one type per run.
//
// Why: the precision of a run is a slot of its trainer type. The module is written once
// over its element type T; `classifier<kiln::precision::param_t<P>>` instantiates it for
// policy P: f32 for fp32, bf16 for bf16_mixed and bf16_true, f16 for f16_mixed. The mixed
// policies compute in 16 bits and step f32 master weights; f16_mixed scales the loss
// (DeepSpeed's dynamic loss scaling) so f16 gradients do not underflow; bf16_true keeps
// no master copy at all. Before training, trainer.plan() prints the bytes each run will
// hold; afterwards the example prints each policy's test accuracy and its gap to fp32.
//
// Napkin math: 269,322 parameters. Model states with AdamW: fp32 16 B/param (4.3 MB),
// bf16_mixed 20 B/param (bf16 value and gradient, f32 master, f32 master gradient, two
// f32 moments: 5.4 MB), bf16_true 8 B/param (2.2 MB). Activations of a batch of 128 halve
// in 16 bits. On this CPU the 16-bit GEMMs widen their operands to f32 (the products and
// sums run in f32, as on tensor cores), so the 16-bit runs are slower here, not faster:
// the point on a CPU is numerics and memory; speed comes with the CUDA kernels.
//
// Usage: 03_mixed_precision [--epochs N] [--batch B] [--lr X] [--threads N] [--seed S]
//                           [--data DIR] [--out DIR] [--limit-batches N] [--max-gap P]
//                           [--policies fp32,bf16_mixed,f16_mixed,bf16_true] [--json]
//        (exit 1 if a mixed policy's test accuracy is more than P points below fp32's).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <sstream>
#include <string>

#include "kiln/data/data_loader.hpp"
#include "kiln/data/fashion_mnist.hpp"
#include "kiln/kiln.hpp"
#include "kiln/loggers/csv.hpp"
#include "kiln/train/trainer.hpp"

namespace {

struct options {
  std::int64_t epochs = 5;
  std::int64_t batch = 128;
  double lr = 2e-3;
  int threads = 2;
  std::uint64_t seed = 42;
  std::string data = kiln::data::fashion_mnist_default_dir;
  std::string out = "runs/03_mixed_precision";
  std::int64_t limit_batches = -1;
  double max_gap = -1;  // points; < 0: no check
  std::string policies = "fp32,bf16_mixed,f16_mixed,bf16_true";
  bool json = false;  // also print one JSON line per policy (bench/run_precision_vs_torch.sh reads them)
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      KILN_CHECK(i + 1 < argc, "flag ", a, " expects a value");
      return argv[++i];
    };
    if (a == "--epochs")
      o.epochs = std::stoll(next());
    else if (a == "--batch")
      o.batch = std::stoll(next());
    else if (a == "--lr")
      o.lr = std::stod(next());
    else if (a == "--threads")
      o.threads = std::stoi(next());
    else if (a == "--seed")
      o.seed = std::stoull(next());
    else if (a == "--data")
      o.data = next();
    else if (a == "--out")
      o.out = next();
    else if (a == "--limit-batches")
      o.limit_batches = std::stoll(next());
    else if (a == "--max-gap")
      o.max_gap = std::stod(next());
    else if (a == "--policies")
      o.policies = next();
    else if (a == "--json")
      o.json = true;
    else
      throw kiln::error("unknown flag '" + a +
                        "' (expected --epochs, --batch, --lr, --threads, --seed, --data, --out, --limit-batches, "
                        "--max-gap, --policies, --json)");
  }
  return o;
}

using batch = kiln::data::labelled_batch;

// The module, once, over its element type. Logits are cast to f32 for the loss (softmax
// and its log in f32, as autocast does; under f16_mixed the scaled loss would not fit f16).
template <kiln::floating_element T>
struct classifier {
  kiln::nn::mlp<kiln::nn::relu, T> net{784, {256, 256}, 10};
  double lr = 2e-3;
  std::int64_t total_steps = 1;

  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
  kiln::var<float> logits(const batch& b) { return kiln::ops::cast<float>(net(kiln::var<T>(b.x.template to<T>()))); }
  kiln::var<float> training_step(auto& ctx, const batch& b) {
    auto loss = kiln::cross_entropy(logits(b), b.y);
    ctx.log("train/loss", loss);
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) {
    auto l = logits(b);
    ctx.log("val/loss", kiln::cross_entropy(l, b.y));
    ctx.log("val/acc", kiln::accuracy(l, b.y));
  }
  void test_step(auto& ctx, const batch& b) {
    auto l = logits(b);
    ctx.log("test/acc", kiln::accuracy(l, b.y));
  }
  auto configure_optimizers() {
    const std::int64_t warm = std::max<std::int64_t>(1, total_steps * 3 / 100);
    return kiln::optim::with_schedule(
        kiln::optim::adamw<T>(*this, {.lr = lr, .weight_decay = 0.01}),
        kiln::optim::warmup<kiln::optim::cosine>{.steps = warm,
                                                 .then = {.total_steps = total_steps - warm, .min_factor = 0.05}});
  }
};

struct fashion_mnist_data {
  options opt;
  using dataset = kiln::data::tensor_dataset;
  std::optional<kiln::data::data_loader<kiln::data::subset<dataset>>> train, val;
  std::optional<kiln::data::data_loader<dataset>> test;
  void setup(kiln::train::stage s) {
    if (s == kiln::train::stage::fit && !train) {
      auto parts = kiln::data::random_split(kiln::data::fashion_mnist(opt.data, "train"),
                                            std::vector<std::int64_t>{55000, 5000}, opt.seed);
      train.emplace(parts[0], kiln::data::loader_options{
                                  .batch_size = opt.batch, .shuffle = true, .drop_last = true, .seed = opt.seed});
      val.emplace(parts[1], kiln::data::loader_options{.batch_size = 1000});
    }
    if (s == kiln::train::stage::test && !test)
      test.emplace(kiln::data::fashion_mnist(opt.data, "test"), kiln::data::loader_options{.batch_size = 1000});
  }
  auto& train_loader() { return *train; }
  auto& val_loader() { return *val; }
  auto& test_loader() { return *test; }
};

struct outcome {
  double accuracy = 0, seconds = 0;
  std::int64_t skipped = 0;
  double final_scale = 1;
};

// One run under policy P.
template <class P>
outcome train_under(const options& opt, fashion_mnist_data& data) {
  using T = kiln::precision::param_t<P>;
  using run = kiln::trainer<classifier<T>, kiln::strategy::single_device<kiln::cpu>, P, kiln::loggers::csv>;
  kiln::manual_seed(opt.seed);
  classifier<T> model;
  model.lr = opt.lr;
  const std::int64_t per_epoch =
      opt.limit_batches > 0 ? std::min(opt.limit_batches, data.train->size()) : data.train->size();
  model.total_steps = per_epoch * opt.epochs;
  kiln::train::trainer_options to{.max_epochs = opt.epochs,
                                  .seed = opt.seed,
                                  .log_every_n_steps = 50,
                                  .default_root_dir = (std::filesystem::path(opt.out) / P::name).string(),
                                  .enable_progress_bar = false,
                                  .enable_model_summary = false};
  if (opt.limit_batches > 0) to.limit_train_batches = opt.limit_batches;
  run trainer(to);
  const auto plan = trainer.plan(model, data);
  std::printf("\n== %s ==\n%s", P::name, plan.str().c_str());
  const auto fit = trainer.fit(model, data);
  outcome o;
  o.seconds = fit.seconds;
  o.accuracy = trainer.test(model, data).at("test/acc");
  if constexpr (requires { trainer.precision().scaler.skipped_steps(); }) {
    o.skipped = trainer.precision().scaler.skipped_steps();
    o.final_scale = trainer.precision().scale();
  }
  std::printf("%s: test accuracy %.2f%%, %.2f s for %lld epochs (%s)", P::name, 100 * o.accuracy, o.seconds,
              static_cast<long long>(fit.epochs), fit.stop_reason.c_str());
  if constexpr (requires { trainer.precision().scaler.skipped_steps(); })
    std::printf(", %lld steps skipped on overflow, final loss scale %g", static_cast<long long>(o.skipped),
                o.final_scale);
  std::printf("\nlogs: %s\n", std::filesystem::absolute(trainer.state().log_dir).string().c_str());
  if (opt.json)
    std::printf(
        "{\"impl\": \"kiln\", \"policy\": \"%s\", \"seconds\": %.4f, \"test_acc\": %.6f, \"epochs\": %lld, "
        "\"skipped_steps\": %lld, \"plan_total_bytes\": %lld, \"threads\": %d}\n",
        P::name, o.seconds, o.accuracy, static_cast<long long>(fit.epochs), static_cast<long long>(o.skipped),
        static_cast<long long>(plan.devices.at(0).total()), opt.threads);
  return o;
}

}  // namespace

int main(int argc, char** argv) try {
  const options opt = parse(argc, argv);
  kiln::cpu_runtime::set_num_threads(opt.threads);
  fashion_mnist_data data{opt};
  data.setup(kiln::train::stage::fit);

  std::map<std::string, outcome> results;
  std::stringstream list(opt.policies);
  for (std::string p; std::getline(list, p, ',');) {
    if (p == "fp32")
      results[p] = train_under<kiln::precision::fp32>(opt, data);
    else if (p == "bf16_mixed")
      results[p] = train_under<kiln::precision::bf16_mixed>(opt, data);
    else if (p == "f16_mixed")
      results[p] = train_under<kiln::precision::f16_mixed<>>(opt, data);
    else if (p == "bf16_true")
      results[p] = train_under<kiln::precision::bf16_true>(opt, data);
    else if (p == "f16_true")
      results[p] = train_under<kiln::precision::f16_true>(opt, data);
    else
      throw kiln::error("--policies: unknown policy '" + p +
                        "' (compiled into this binary: fp32, bf16_mixed, f16_mixed, bf16_true, f16_true)");
  }

  std::printf("\n%-12s %10s %10s %8s\n", "policy", "accuracy", "vs fp32", "seconds");
  int status = 0;
  for (auto& [name, o] : results) {
    const bool has_ref = results.count("fp32") > 0;
    const double gap = has_ref ? 100 * (o.accuracy - results.at("fp32").accuracy) : 0.0;
    std::printf("%-12s %9.2f%% %+9.2f %8.2f\n", name.c_str(), 100 * o.accuracy, gap, o.seconds);
    if (opt.max_gap >= 0 && has_ref && name.find("mixed") != std::string::npos && gap < -opt.max_gap) {
      std::fprintf(stderr, "%s: test accuracy %.2f points below fp32, more than --max-gap %.2f\n", name.c_str(), -gap,
                   opt.max_gap);
      status = 1;
    }
  }
  return status;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 2;
}
