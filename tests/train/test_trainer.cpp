// The trainer's loop: hook order, counters, limits, accumulation, stopping, manual
// optimisation, schedules, evaluation entry points.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "regression_fixture.hpp"

namespace test_trainer {

using namespace kiln;
using namespace kiln::test;

namespace {

// Records every hook it sees.
struct recorder {
  using hooks = hook_list<hook::setup, hook::configure_model, hook::on_fit_start, hook::on_sanity_check_start,
                          hook::on_sanity_check_end, hook::on_train_start, hook::on_train_epoch_start,
                          hook::on_train_batch_start, hook::on_before_zero_grad, hook::on_before_backward,
                          hook::on_after_backward, hook::on_before_optimizer_step, hook::on_train_batch_end,
                          hook::on_validation_start, hook::on_validation_epoch_start, hook::on_validation_batch_start,
                          hook::on_validation_batch_end, hook::on_validation_epoch_end, hook::on_validation_end,
                          hook::on_train_epoch_end, hook::on_train_end, hook::on_fit_end, hook::teardown>;
  void setup(auto&, train::stage s) { note(std::string("setup:") + train::stage_name(s)); }
  void teardown(auto&, train::stage s) { note(std::string("teardown:") + train::stage_name(s)); }
  void configure_model(auto&) { note("configure_model"); }
  void on_fit_start(auto&) { note("on_fit_start"); }
  void on_sanity_check_start(auto&) { note("on_sanity_check_start"); }
  void on_sanity_check_end(auto&) { note("on_sanity_check_end"); }
  void on_train_start(auto&) { note("on_train_start"); }
  void on_train_epoch_start(auto&) { note("on_train_epoch_start"); }
  void on_train_batch_start(auto&, const auto&) { note("on_train_batch_start"); }
  void on_before_zero_grad(auto&) { note("on_before_zero_grad"); }
  void on_before_backward(auto&, const auto&) { note("on_before_backward"); }
  void on_after_backward(auto&) { note("on_after_backward"); }
  void on_before_optimizer_step(auto&) { note("on_before_optimizer_step"); }
  void on_train_batch_end(auto&, const auto&) { note("on_train_batch_end"); }
  void on_validation_start(auto&) { note("on_validation_start"); }
  void on_validation_epoch_start(auto&) { note("on_validation_epoch_start"); }
  void on_validation_batch_start(auto&, const auto&) { note("on_validation_batch_start"); }
  void on_validation_batch_end(auto&, const auto&) { note("on_validation_batch_end"); }
  void on_validation_epoch_end(auto&) { note("on_validation_epoch_end"); }
  void on_validation_end(auto&) { note("on_validation_end"); }
  void on_train_epoch_end(auto&) { note("on_train_epoch_end"); }
  void on_train_end(auto&) { note("on_train_end"); }
  void on_fit_end(auto&) { note("on_fit_end"); }
};

// A monitoring callback: fires after the module at epoch end.
struct monitor_probe {
  static constexpr bool monitors = true;
  using hooks = hook_list<hook::on_train_epoch_end, hook::on_validation_end>;
  void on_train_epoch_end(auto&) { note("monitor.on_train_epoch_end"); }
  void on_validation_end(auto& ctx) {
    note("monitor.on_validation_end");
    seen_val_loss = ctx.metric("val/loss").has_value();
  }
  bool seen_val_loss = false;
};

template <class... C>
using reg_trainer = trainer<regressor, strategy::single_device<cpu>, precision::fp32, C...>;

}  // namespace

TEST_CASE("trainer: hook order follows Lightning's lifecycle") {
  manual_seed(1);
  std::vector<std::string> t;
  trace = &t;
  regressor m;
  auto tl = make_loader({4, 4});
  auto vl = make_loader({4}, 100);
  reg_trainer<recorder, monitor_probe> tr({.max_epochs = 1, .num_sanity_val_steps = 1, .enable_progress_bar = false});
  auto r = tr.fit(m, tl, vl);
  trace = nullptr;
  CHECK(r.epochs == 1);
  CHECK(r.global_step == 2);
  const std::vector<std::string> batch = {"on_train_batch_start", "training_step",     "on_before_zero_grad",
                                          "on_before_backward",   "on_after_backward", "on_before_optimizer_step",
                                          "on_train_batch_end"};
  const std::vector<std::string> val = {
      "on_validation_start", "on_validation_epoch_start", "on_validation_batch_start",
      "validation_step",     "on_validation_batch_end",   "on_validation_epoch_end",
      "on_validation_end",   "module.on_validation_end",  "monitor.on_validation_end"};
  std::vector<std::string> expected = {"setup:fit", "configure_model", "on_fit_start", "module.on_fit_start",
                                       "on_sanity_check_start"};
  expected.insert(expected.end(), val.begin(), val.end());
  expected.insert(expected.end(), {"on_sanity_check_end", "on_train_start", "on_train_epoch_start"});
  expected.insert(expected.end(), batch.begin(), batch.end());
  expected.insert(expected.end(), batch.begin(), batch.end());
  expected.insert(expected.end(), val.begin(), val.end());
  expected.insert(expected.end(), {"on_train_epoch_end", "module.on_train_epoch_end", "monitor.on_train_epoch_end",
                                   "on_train_end", "on_fit_end", "teardown:fit"});
  CHECK(t == expected);
  CHECK_FALSE(m.saw_grad_in_eval);
  CHECK(tr.callback<monitor_probe>().seen_val_loss);
}

TEST_CASE("trainer: global_step counts optimizer steps, micro-batches are counted apart") {
  regressor m;
  auto tl = make_loader({2, 2, 2, 2, 2, 2, 2});  // 7 micro-batches
  reg_trainer<> tr({.max_epochs = 2, .accumulate_grad_batches = 3, .enable_progress_bar = false});
  auto r = tr.fit(m, tl);
  CHECK(r.micro_batches == 14);
  CHECK(r.global_step == 6);  // windows 3+3+1 per epoch: the epoch's tail still steps
  CHECK(r.epochs == 2);
  CHECK(r.stop_reason == "max_epochs=2 reached");
}

namespace {
// Captures the (normalised) gradient just before each optimizer step.
struct grad_capture {
  using hooks = hook_list<hook::on_before_optimizer_step>;
  std::vector<std::vector<double>> grads;
  void on_before_optimizer_step(auto& ctx) {
    std::vector<double> g;
    nn::visit_parameters(ctx.model(), [&](const std::string&, auto& p) {
      for (std::int64_t i = 0; i < p.numel(); ++i) g.push_back(p.grad().flat(i));
    });
    grads.push_back(g);
  }
};
}  // namespace

TEST_CASE("trainer: accumulated gradients equal the large-batch gradient, uneven micro-batches included") {
  // One batch of 12 items versus micro-batches of 5, 5 and 2 items accumulated: the mean
  // loss of the 12 items has the same gradient only if each micro-batch is weighed by
  // its item count (dividing by accumulate_grad_batches would weigh the 2-item batch 2.5x).
  const reg_batch big = make_batch(12, 7);
  auto piece = [&](std::int64_t b, std::int64_t e) {
    return reg_batch{big.x.slice(0, b, e).clone(), big.y.slice(0, b, e).clone()};
  };
  vec_loader whole{{big}};
  vec_loader parts{{piece(0, 5), piece(5, 10), piece(10, 12)}};

  manual_seed(3);
  regressor a;
  manual_seed(3);
  regressor b;
  trainer<regressor, strategy::single_device<cpu>, precision::fp32, grad_capture> ta(
      {.max_steps = 1, .enable_progress_bar = false});
  trainer<regressor, strategy::single_device<cpu>, precision::fp32, grad_capture> tb(
      {.max_steps = 1, .accumulate_grad_batches = 3, .enable_progress_bar = false});
  ta.fit(a, whole);
  tb.fit(b, parts);
  const auto& ga = ta.callback<grad_capture>().grads;
  const auto& gb = tb.callback<grad_capture>().grads;
  REQUIRE(ga.size() == 1);
  REQUIRE(gb.size() == 1);
  REQUIRE(ga[0].size() == gb[0].size());
  for (std::size_t i = 0; i < ga[0].size(); ++i) CHECK(gb[0][i] == doctest::Approx(ga[0][i]).epsilon(1e-12));
  // And the updated weights agree.
  CHECK(b.lin.weight.value()(0, 1) == doctest::Approx(a.lin.weight.value()(0, 1)).epsilon(1e-12));
}

TEST_CASE("trainer: limits, max_steps, val_check_interval and check_val_every_n_epoch") {
  SUBCASE("limit_train_batches as a fraction and as a count") {
    regressor m;
    auto tl = make_loader({2, 2, 2, 2, 2, 2, 2, 2});
    reg_trainer<> a({.max_epochs = 1, .limit_train_batches = 0.25, .enable_progress_bar = false});
    CHECK(a.fit(m, tl).global_step == 2);
    reg_trainer<> b({.max_epochs = 1, .limit_train_batches = 3, .enable_progress_bar = false});
    CHECK(b.fit(m, tl).global_step == 3);
  }
  SUBCASE("max_steps stops inside an epoch") {
    regressor m;
    auto tl = make_loader({2, 2, 2, 2});
    reg_trainer<> tr({.max_epochs = 10, .max_steps = 6, .enable_progress_bar = false});
    auto r = tr.fit(m, tl);
    CHECK(r.global_step == 6);
    CHECK(r.stop_reason == "max_steps=6 reached");
  }
  SUBCASE("validation every 2 batches, every second epoch") {
    std::vector<std::string> t;
    trace = &t;
    regressor m;
    auto tl = make_loader({2, 2, 2, 2});
    auto vl = make_loader({2}, 50);
    reg_trainer<> tr({.max_epochs = 4,
                      .val_check_interval = 2,
                      .check_val_every_n_epoch = 2,
                      .num_sanity_val_steps = 0,
                      .enable_progress_bar = false});
    tr.fit(m, tl, vl);
    trace = nullptr;
    CHECK(std::count(t.begin(), t.end(), "validation_step") == 4);  // epochs 2 and 4, twice each
  }
  SUBCASE("fast_dev_run runs one batch of each loop and writes no logs") {
    regressor m;
    auto tl = make_loader({2, 2, 2});
    auto vl = make_loader({2, 2}, 50);
    reg_trainer<> tr({.max_epochs = 5, .fast_dev_run = 1, .enable_progress_bar = false});
    auto r = tr.fit(m, tl, vl);
    CHECK(r.global_step == 1);
    CHECK(r.epochs == 1);
    CHECK_FALSE(tr.state().loggers_enabled);
  }
  SUBCASE("overfit_batches trains and validates on the same fixed batches") {
    regressor m;
    auto tl = make_loader({4, 4, 4, 4});
    auto vl = make_loader({4}, 77);
    reg_trainer<> tr({.max_epochs = 60, .overfit_batches = 1, .enable_progress_bar = false});
    auto r = tr.fit(m, tl, vl);
    CHECK(r.global_step == 60);
    // Validation ran on the training batch, so val/loss tracks the last training loss closely.
    CHECK(r.metrics.at("val/loss") < m.losses.front());
  }
}

namespace {
struct stopper {
  using hooks = hook_list<hook::on_train_batch_end>;
  std::int64_t at = 0;
  train::control on_train_batch_end(auto& ctx, const auto&) {
    return ctx.micro_batches() >= at ? train::control::stop : train::control::proceed;
  }
};
}  // namespace

TEST_CASE("trainer: a hook stops training; min_epochs defers the stop") {
  regressor m;
  auto tl = make_loader({2, 2, 2, 2});
  reg_trainer<stopper> a({.max_epochs = 10, .enable_progress_bar = false}, stopper{3});
  auto r = a.fit(m, tl);
  CHECK(r.micro_batches == 3);
  CHECK(r.stop_reason.find("on_train_batch_end") != std::string::npos);
  reg_trainer<stopper> b({.max_epochs = 10, .min_epochs = 2, .enable_progress_bar = false}, stopper{3});
  CHECK(b.fit(m, tl).epochs == 2);
}

namespace {
// A GAN-style module: two optimizers stepped alternately by hand.
struct alternating {
  static constexpr bool automatic_optimization = false;
  nn::linear<f64> g{3, 1}, d{3, 1};
  int g_steps = 0, d_steps = 0;
  template <class F>
  void for_each_child(F&& f) {
    f("g", g);
    f("d", d);
  }
  void training_step(auto& ctx, const reg_batch& b) {
    if (ctx.micro_batches() % 2 == 0) {
      auto& opt = ctx.template optimizer<0>();
      opt.zero_grad();
      ctx.manual_backward(mse(g(var<f64>(b.x)), var<f64>(b.y)));
      ctx.template optimizer_step<0>();
      ctx.template scheduler_step<0>();
      ++g_steps;
    } else {
      auto& opt = ctx.template optimizer<1>();
      opt.zero_grad();
      ctx.manual_backward(mse(d(var<f64>(b.x)), var<f64>(b.y)));
      ctx.template optimizer_step<1>();
      ++d_steps;
    }
  }
  auto configure_optimizers() {
    std::vector<optim::param_group<f64>> gg{{nn::named_parameters<f64>(g), {}, {}}};
    std::vector<optim::param_group<f64>> dg{{nn::named_parameters<f64>(d), {}, {}}};
    return std::tuple{optim::with_schedule(optim::sgd<f64>(gg, {.lr = 0.1}), optim::step_decay{1, 0.5}),
                      optim::sgd<f64>(dg, {.lr = 0.1})};
  }
};
}  // namespace

TEST_CASE("trainer: manual optimisation with two optimizers and a schedule") {
  alternating m;
  auto tl = make_loader({4, 4, 4, 4});
  trainer<alternating> tr({.max_epochs = 1, .enable_progress_bar = false});
  auto r = tr.fit(m, tl);
  CHECK(m.g_steps == 2);
  CHECK(m.d_steps == 2);
  CHECK(r.global_step == 4);
  CHECK(std::get<0>(tr.optimizers()).optimizer.lr(0) == doctest::Approx(0.1 * 0.25));
  CHECK(std::get<1>(tr.optimizers()).optimizer.lr(0) == doctest::Approx(0.1));
}

TEST_CASE("schedules: warmup then cosine, linear, step, exponential, plateau") {
  optim::warmup<optim::cosine> w{.steps = 10, .then = {.total_steps = 90, .min_factor = 0.1}};
  CHECK(w.factor(0) == 0.0);
  CHECK(w.factor(5) == doctest::Approx(0.5));
  CHECK(w.factor(10) == doctest::Approx(1.0));
  CHECK(w.factor(55) == doctest::Approx(0.1 + 0.9 * 0.5));
  CHECK(w.factor(100) == doctest::Approx(0.1));
  CHECK(w.factor(1000) == doctest::Approx(0.1));
  CHECK(optim::linear{.total_steps = 4, .end_factor = 0.2}.factor(2) == doctest::Approx(0.6));
  CHECK(optim::step_decay{.step_size = 3, .gamma = 0.5}.factor(7) == doctest::Approx(0.25));
  CHECK(optim::exponential{.gamma = 0.9}.factor(2) == doctest::Approx(0.81));
  optim::reduce_on_plateau p{.factor_on_plateau = 0.5, .patience = 1};
  CHECK_FALSE(p.update(1.0));
  CHECK_FALSE(p.update(1.0));  // first bad check
  CHECK(p.update(1.0));        // second bad check > patience: cut
  CHECK(p.factor(0) == 0.5);
  CHECK_FALSE(p.update(0.5));  // improvement resets
}

namespace {
struct scheduled_regressor : regressor {
  auto configure_optimizers() {
    return optim::with_schedule(optim::sgd<f64>(*this, {.lr = 1.0}),
                                optim::warmup<optim::linear>{.steps = 2, .then = {.total_steps = 4}});
  }
};
struct lr_probe {
  using hooks = hook_list<hook::on_before_optimizer_step>;
  std::vector<double> lrs;
  void on_before_optimizer_step(auto& ctx) { lrs.push_back(ctx.template optimizer<0>().lr(0)); }
};
}  // namespace

TEST_CASE("trainer: a per-step schedule sets the rate of every step") {
  scheduled_regressor m;
  auto tl = make_loader({2, 2, 2, 2, 2, 2});
  trainer<scheduled_regressor, strategy::single_device<cpu>, precision::fp32, lr_probe> tr(
      {.max_epochs = 1, .enable_progress_bar = false});
  tr.fit(m, tl);
  const std::vector<double> expect = {0.0, 0.5, 1.0, 0.75, 0.5, 0.25};
  const auto& got = tr.callback<lr_probe>().lrs;
  REQUIRE(got.size() == expect.size());
  for (std::size_t i = 0; i < expect.size(); ++i) CHECK(got[i] == doctest::Approx(expect[i]));
}

namespace {
struct logging_module : regressor {
  var<f64> training_step(auto& ctx, const reg_batch& b) {
    auto loss = mse(lin(var<f64>(b.x)), var<f64>(b.y));
    ctx.log("items", static_cast<double>(b.size()), {.on_step = true, .on_epoch = true});
    ctx.log("biggest", static_cast<double>(b.size()), {.on_epoch = true, .reduction = train::reduce::max});
    return loss;
  }
};
struct sink {
  using hooks = hook_list<hook::on_log>;
  std::vector<train::log_record> records;
  void on_log(auto&, const train::log_record& r) { records.push_back(r); }
};
struct clip_probe {
  using hooks = hook_list<hook::on_before_optimizer_step, hook::on_train_batch_end>;
  double norm_after = 0;
  void on_before_optimizer_step(auto&) {}
  void on_train_batch_end(auto& ctx, const auto&) { norm_after = optim::grad_norm(ctx.model()); }
};
}  // namespace

TEST_CASE("trainer: logged metrics — step values, weighted epoch means, suffixes") {
  logging_module m;
  auto tl = make_loader({1, 3});
  trainer<logging_module, strategy::single_device<cpu>, precision::fp32, sink> tr(
      {.max_epochs = 1, .log_every_n_steps = 1, .enable_progress_bar = false});
  auto r = tr.fit(m, tl);
  // Epoch mean weighted by items: (1·1 + 3·3) / 4 = 2.5, not (1 + 3) / 2.
  CHECK(r.metrics.at("items_epoch") == doctest::Approx(2.5));
  CHECK(r.metrics.at("items_step") == 3);
  CHECK(r.metrics.at("biggest") == 3);
  const auto& recs = tr.callback<sink>().records;
  REQUIRE(recs.size() == 3);  // step 1, step 2, epoch
  CHECK(recs[0].step == 1);
  CHECK(recs[0].values.at(0).first == "items_step");
  CHECK(recs[2].values.size() == 2);
}

TEST_CASE("trainer: validate, test and predict entry points") {
  regressor m;
  auto vl = make_loader({4, 4}, 9);
  reg_trainer<> tr({.enable_progress_bar = false});
  auto v = tr.validate(m, vl);
  CHECK(v.count("val/loss") == 1);
  auto t = tr.test(m, vl);
  CHECK(t.count("test/loss") == 1);
  auto p = tr.predict(m, vl);
  CHECK(p.size() == 2);
  CHECK_FALSE(m.saw_grad_in_eval);
}

TEST_CASE("trainer: gradient clipping by norm bounds the update") {
  regressor m;
  auto tl = make_loader({8});
  trainer<regressor, strategy::single_device<cpu>, precision::fp32, clip_probe> tr(
      {.max_steps = 1, .gradient_clip_val = 1e-3, .enable_progress_bar = false});
  tr.fit(m, tl);
  CHECK(tr.callback<clip_probe>().norm_after <= doctest::Approx(1e-3));
}

TEST_CASE("trainer_options: contradictory settings are rejected naming the field") {
  auto msg = [](train::trainer_options o) {
    try {
      o.validate();
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(msg({.accumulate_grad_batches = 0}).find("accumulate_grad_batches") != std::string::npos);
  CHECK(msg({.limit_train_batches = 1.5}).find("limit_train_batches") != std::string::npos);
  CHECK(msg({.max_epochs = 2, .min_epochs = 3}).find("min_epochs") != std::string::npos);
  CHECK(msg({}).empty());
}

namespace {
struct plateau_regressor : regressor {
  double val = 1.0;
  void validation_step(auto& ctx, const reg_batch&) { ctx.log("val/metric", val); }  // never improves
  auto configure_optimizers() {
    return optim::with_schedule(optim::sgd<f64>(*this, {.lr = 0.8}),
                                optim::reduce_on_plateau{.factor_on_plateau = 0.5, .patience = 1},
                                {.every = optim::interval::epoch, .monitor = "val/metric"});
  }
};
}  // namespace

TEST_CASE("trainer: reduce_on_plateau is fed its monitored metric once per epoch") {
  plateau_regressor m;
  auto tl = make_loader({2, 2});
  auto vl = make_loader({2}, 9);
  trainer<plateau_regressor> tr({.max_epochs = 5, .num_sanity_val_steps = 0, .enable_progress_bar = false});
  tr.fit(m, tl, vl);
  // Epoch 1 sets the best; epochs 2-3 are two bad checks (> patience 1): cut to 0.4;
  // epochs 4-5 two more: 0.2.
  CHECK(std::get<0>(tr.optimizers()).optimizer.lr(0) == doctest::Approx(0.2));
  plateau_regressor unmonitored;
  auto no_val = make_loader({2});
  trainer<plateau_regressor> tr2({.max_epochs = 1, .enable_progress_bar = false});
  CHECK_THROWS_WITH_AS(tr2.fit(unmonitored, no_val),
                       doctest::Contains("monitored metric 'val/metric' was not logged (logged metrics: train/loss)"),
                       error);
}

TEST_CASE("trainer: a seeded run is reproducible bit for bit") {
  auto run = [] {
    auto tl = make_loader({3, 3, 3});
    reg_trainer<> tr({.max_epochs = 3, .deterministic = true, .seed = 1234, .enable_progress_bar = false});
    manual_seed(1234);
    regressor fresh;
    tr.fit(fresh, tl);
    return std::pair{fresh.losses, fresh.lin.weight.value().to_vector()};
  };
  const auto a = run(), b = run();
  CHECK(a.first == b.first);
  CHECK(a.second == b.second);
}

// Archetypes: minimal types that satisfy the concepts (they document what is required).
namespace {
struct archetype_loader {
  struct range {
    const int* begin() const { return nullptr; }
    const int* end() const { return nullptr; }
  };
  std::int64_t size() const { return 0; }
  range epoch(std::int64_t, std::int64_t) const { return {}; }
};
struct archetype_datamodule {
  archetype_loader l;
  archetype_loader& train_loader() { return l; }
};
struct archetype_callback {
  using hooks = hook_list<>;
};
}  // namespace
static_assert(train::loader<archetype_loader>);
static_assert(train::datamodule<archetype_datamodule>);
static_assert(!train::has_val_loader<archetype_datamodule>);
static_assert(callback<archetype_callback>);
static_assert(!callback<int>);
static_assert(train::loader<data::data_loader<data::tensor_dataset>>);

}  // namespace test_trainer
