// Callbacks and loggers: early stopping, LR monitor, timer, accumulation schedule,
// lambda callbacks, NaN detection, CSV / JSON-lines logs.
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "../train/regression_fixture.hpp"
#include "kiln/callbacks/early_stopping.hpp"
#include "kiln/callbacks/gradient_accumulation_scheduler.hpp"
#include "kiln/callbacks/lambda_callback.hpp"
#include "kiln/callbacks/learning_rate_monitor.hpp"
#include "kiln/callbacks/model_summary.hpp"
#include "kiln/callbacks/nan_detector.hpp"
#include "kiln/callbacks/timer.hpp"
#include "kiln/loggers/csv.hpp"
#include "kiln/loggers/jsonl.hpp"

namespace test_callbacks {

using namespace kiln;
using namespace kiln::test;
namespace fs = std::filesystem;

namespace {

template <class M, class... C>
using cb_trainer = trainer<M, strategy::single_device<cpu>, precision::fp32, C...>;

// A module whose validation metric is scripted: val/score follows a list.
struct scripted : regressor {
  std::vector<double> scores;
  std::size_t calls = 0;
  void validation_step(auto& ctx, const reg_batch&) {
    ctx.log("val/score", scores.at(std::min(calls, scores.size() - 1)));
  }
  void on_validation_epoch_end(auto&) { ++calls; }
};

std::string read_all(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

fs::path temp_root(const std::string& name) {
  auto p = fs::temp_directory_path() / ("kiln_cb_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p;
}

}  // namespace

TEST_CASE("early_stopping: stops after `patience` checks without improvement") {
  scripted m;
  m.scores = {1.0, 0.8, 0.79, 0.85, 0.81, 0.9, 0.7};
  auto tl = make_loader({2, 2});
  auto vl = make_loader({2}, 9);
  cb_trainer<scripted, callbacks::early_stopping> tr(
      {.max_epochs = 20, .num_sanity_val_steps = 0, .enable_progress_bar = false},
      callbacks::early_stopping({.monitor = "val/score", .min_delta = 0.05, .patience = 3, .verbose = false}));
  auto r = tr.fit(m, tl, vl);
  // Improvements beyond 0.05: 1.0 -> 0.8 (epoch 2). 0.79, 0.85, 0.81 do not improve: stop after epoch 5.
  CHECK(r.epochs == 5);
  CHECK(r.stop_reason.find("early_stopping") != std::string::npos);
  auto& es = tr.callback<callbacks::early_stopping>();
  CHECK(es.best_score == doctest::Approx(0.8));
  CHECK(es.wait_count == 3);
}

TEST_CASE("early_stopping: thresholds, non-finite values, mode max, missing metric") {
  callbacks::early_stopping a({.mode = callbacks::mode::max, .patience = 2, .stopping_threshold = 0.9});
  CHECK(a.evaluate(0.5).empty());
  CHECK(a.evaluate(0.95).find("stopping threshold") != std::string::npos);
  callbacks::early_stopping b({.patience = 5, .divergence_threshold = 10.0});
  CHECK(b.evaluate(3).empty());
  CHECK(b.evaluate(11).find("divergence") != std::string::npos);
  CHECK(b.evaluate(std::nan("")).find("not finite") != std::string::npos);

  scripted m;
  m.scores = {1.0};
  auto tl = make_loader({2});
  auto vl = make_loader({2}, 9);
  cb_trainer<scripted, callbacks::early_stopping> tr(
      {.max_epochs = 2, .num_sanity_val_steps = 0, .enable_progress_bar = false},
      callbacks::early_stopping({.monitor = "val/acc"}));
  CHECK_THROWS_WITH_AS(tr.fit(m, tl, vl), doctest::Contains("'val/acc' was not logged (logged: train/loss, val/score)"),
                       error);
}

TEST_CASE("min_epochs holds an early stop back") {
  scripted m;
  m.scores = {1.0};
  auto tl = make_loader({2});
  auto vl = make_loader({2}, 9);
  cb_trainer<scripted, callbacks::early_stopping> tr(
      {.max_epochs = 20, .min_epochs = 6, .num_sanity_val_steps = 0, .enable_progress_bar = false},
      callbacks::early_stopping({.monitor = "val/score", .patience = 1, .verbose = false}));
  CHECK(tr.fit(m, tl, vl).epochs == 6);
}

namespace {
struct two_group_module : regressor {
  auto configure_optimizers() {
    std::vector<optim::param_group<f64>> groups(2);
    for (auto& np : nn::named_parameters<f64>(*this)) groups[np.param.rank() == 2 ? 0 : 1].params.push_back(np);
    groups[1].lr = 0.5;
    return optim::with_schedule(optim::adamw<f64>(groups, {.lr = 0.1}), optim::exponential{.gamma = 0.5});
  }
};
}  // namespace

TEST_CASE("learning_rate_monitor logs each group's rate as the schedule moves it") {
  two_group_module m;
  auto tl = make_loader({2, 2, 2});
  cb_trainer<two_group_module, callbacks::learning_rate_monitor> tr(
      {.max_epochs = 1, .log_every_n_steps = 1, .enable_progress_bar = false});
  auto r = tr.fit(m, tl);
  // The rate logged at batch start is the one its step uses: 0.1 · 0.5² at the third step.
  CHECK(r.metrics.at("lr-adamw/pg0") == doctest::Approx(0.1 * 0.25));
  CHECK(r.metrics.at("lr-adamw/pg1") == doctest::Approx(0.5 * 0.25));
}

namespace {
struct slow : regressor {
  var<f64> training_step(auto& ctx, const reg_batch& b) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return regressor::training_step(ctx, b);
  }
};

}  // namespace

TEST_CASE("timer and max_time stop a fit that runs out of time") {
  auto tl = make_loader({2, 2, 2, 2});
  slow m;
  cb_trainer<slow, callbacks::timer> a({.max_epochs = 1000, .enable_progress_bar = false},
                                       callbacks::timer(std::chrono::milliseconds(60)));
  // The budget counts from the start of fit; train_seconds from on_train_start, after
  // set-up, so it may be a little under the budget while the fit as a whole is not.
  const auto before = std::chrono::steady_clock::now();
  auto r = a.fit(m, tl);
  const double fit_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - before).count();
  CHECK(r.stop_reason.find("timer") != std::string::npos);
  CHECK(r.micro_batches < 100);
  CHECK(fit_seconds >= 0.06);
  CHECK(a.callback<callbacks::timer>().train_seconds > 0.0);
  CHECK(a.callback<callbacks::timer>().train_seconds <= fit_seconds);
  cb_trainer<slow> b({.max_epochs = 1000, .max_time = std::chrono::milliseconds(60), .enable_progress_bar = false});
  auto rb = b.fit(m, tl);
  CHECK(rb.stop_reason == "max_time reached");
  CHECK(rb.micro_batches < 100);
}

TEST_CASE("gradient_accumulation_scheduler changes the factor by epoch") {
  regressor m;
  auto tl = make_loader({2, 2, 2, 2});
  cb_trainer<regressor, callbacks::gradient_accumulation_scheduler> tr(
      {.max_epochs = 3, .enable_progress_bar = false}, callbacks::gradient_accumulation_scheduler({{1, 2}, {2, 4}}));
  // Epoch 0: 4 steps, epoch 1: 2 steps, epoch 2: 1 step.
  CHECK(tr.fit(m, tl).global_step == 7);
  CHECK_THROWS_WITH_AS(callbacks::gradient_accumulation_scheduler(std::map<std::int64_t, std::int64_t>{{0, 0}}),
                       doctest::Contains("factor 0"), error);
}

TEST_CASE("lambda_callback: functions bound to hooks") {
  int epochs = 0, batches = 0;
  auto cb = callbacks::lambda_callback(callbacks::on<hook::on_train_epoch_end>([&](auto&) { ++epochs; }),
                                       callbacks::on<hook::on_train_batch_end>([&](auto& ctx, const auto&) {
                                         ++batches;
                                         return ctx.global_step() >= 5 ? train::control::stop : train::control::proceed;
                                       }));
  regressor m;
  auto tl = make_loader({2, 2});
  cb_trainer<regressor, decltype(cb)> tr({.max_epochs = 10, .enable_progress_bar = false}, cb);
  auto r = tr.fit(m, tl);
  CHECK(r.global_step == 5);
  CHECK(epochs == 3);
  // The callback was copied into the trainer; the captured counters are shared.
  CHECK(batches == 5);
}

namespace {
struct poison : regressor {
  void on_after_backward(auto& ctx) {
    if (ctx.global_step() == 2) lin.weight.grad().flat(1) = std::numeric_limits<double>::infinity();
  }
};

}  // namespace

TEST_CASE("nan_detector names the first non-finite parameter or gradient") {
  poison m;
  auto tl = make_loader({2, 2, 2, 2});
  cb_trainer<poison, callbacks::nan_detector> tr({.max_epochs = 1, .enable_progress_bar = false});
  CHECK_THROWS_WITH_AS(tr.fit(m, tl),
                       doctest::Contains("gradient of lin.weight is not finite (element 1 = inf) at epoch 0, global "
                                         "step 2"),
                       error);
  regressor ok;
  cb_trainer<regressor, callbacks::nan_detector> tr2({.max_epochs = 1, .enable_progress_bar = false});
  CHECK_NOTHROW(tr2.fit(ok, tl));
}

TEST_CASE("csv and jsonl loggers write metrics and hyperparameters into the run directory") {
  const auto root = temp_root("loggers");
  regressor m;
  auto tl = make_loader({2, 2, 2, 2});
  auto vl = make_loader({2}, 9);
  cb_trainer<regressor, loggers::csv, loggers::jsonl> tr({.max_epochs = 2,
                                                          .num_sanity_val_steps = 0,
                                                          .log_every_n_steps = 2,
                                                          .default_root_dir = root.string(),
                                                          .enable_progress_bar = false});
  tr.fit(m, tl, vl);
  const auto dir = root / "version_0";
  const std::string csv = read_all(dir / "metrics.csv");
  INFO(csv);
  CHECK(csv.rfind("epoch,step,train/loss,val/loss\n", 0) == 0);
  // Steps 2, 4 (epoch 0: 4 batches), 6, 8 log train/loss; each epoch ends with a val row.
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 1 + 4 + 2);
  CHECK(csv.find("\n0,4,,") != std::string::npos);  // the epoch-0 validation row at step 4
  const std::string hp = read_all(dir / "hparams.yaml");
  CHECK(hp.find("trainer: \"max_epochs=2") != std::string::npos);
  const std::string jl = read_all(dir / "metrics.jsonl");
  CHECK(jl.find("{\"step\": 2, \"epoch\": 0, \"train/loss\": ") == 0);
  CHECK(std::count(jl.begin(), jl.end(), '\n') == 6);
  CHECK(fs::exists(dir / "hparams.json"));
  // The same trainer keeps its run directory across stages; a second trainer takes the next one.
  tr.test(m, vl);
  CHECK_FALSE(fs::exists(root / "version_1"));
  cb_trainer<regressor, loggers::csv> tr2(
      {.max_epochs = 1, .log_every_n_steps = 1, .default_root_dir = root.string(), .enable_progress_bar = false});
  tr2.fit(m, tl);
  CHECK(fs::exists(root / "version_1" / "metrics.csv"));
  fs::remove_all(root);
}

TEST_CASE("fast_dev_run writes no log files") {
  const auto root = temp_root("fdr");
  regressor m;
  auto tl = make_loader({2, 2});
  cb_trainer<regressor, loggers::csv> tr(
      {.max_epochs = 3, .fast_dev_run = 1, .default_root_dir = root.string(), .enable_progress_bar = false});
  tr.fit(m, tl);
  CHECK_FALSE(fs::exists(root));
}

TEST_CASE("model_summary: parameter counts in groups of three digits, the sign apart") {
  using callbacks::detail::with_commas;
  CHECK(with_commas(0) == "0");
  CHECK(with_commas(123) == "123");
  CHECK(with_commas(1234) == "1,234");
  CHECK(with_commas(269322) == "269,322");
  CHECK(with_commas(1234567) == "1,234,567");
  CHECK(with_commas(-123) == "-123");
  CHECK(with_commas(-1234) == "-1,234");
}

}  // namespace test_callbacks
