// Precision policies: half GEMMs, stochastic rounding, master weights, the trainer under
// bf16_mixed / f16_mixed / bf16_true / f16_true, overflow skip + backoff + regrowth,
// non-finite errors that name the parameter, and bit-exact resume with scaler state.
#include <cmath>

#include "../helpers.hpp"
#include "kiln/precision/precision.hpp"
#include "precision_fixture.hpp"

namespace test_precision {

using namespace kiln;
using namespace kiln::test::prec;

namespace {

struct watch_row {
  std::int64_t step;
  double scale, lr;
  std::int64_t skipped, adam_steps;
  std::map<std::string, std::vector<std::uint8_t>> w;
};

// One callback for every probe the tests need (one trainer type per policy keeps this
// file's compile time down): the norm of the gradients the optimizer will step, a row of
// loop state after each batch, a checkpoint after micro-batch `save_at`.
struct probe {
  using hooks = hook_list<hook::on_before_optimizer_step, hook::on_train_batch_end>;
  std::vector<double>* norms = nullptr;
  std::vector<watch_row>* rows = nullptr;
  std::int64_t save_at = -1;
  std::filesystem::path path;
  void on_before_optimizer_step(auto& ctx) {
    if (norms) norms->push_back(optim::grad_norm(ctx.master_parameters()));
  }
  void on_train_batch_end(auto& ctx, const auto&) {
    if (ctx.micro_batches() == save_at) ctx.save_checkpoint(path);  // micro_batches counts this one already
    if (!rows) return;
    auto& p = ctx.precision();
    std::int64_t skipped = 0;
    double scale = 1;
    if constexpr (requires { p.scaler.skipped_steps(); }) {
      skipped = p.scaler.skipped_steps();
      scale = p.scale();
    }
    rows->push_back({ctx.global_step(), scale, ctx.optimizer().lr(0), skipped, ctx.optimizer().step_count(0),
                     weight_bits(ctx.model())});
  }
};

template <class P>
using run = trainer<clf<precision::param_t<P>>, strategy::single_device<cpu>, P, probe>;

template <class T>
double max_abs_diff(const tensor<T>& a, const tensor<f64>& ref, double rel, double abs, std::int64_t* bad) {
  double worst = 0;
  for (std::int64_t i = 0; i < ref.numel(); ++i) {
    const double d = std::abs(static_cast<double>(a.data()[i]) - ref.data()[i]);
    worst = std::max(worst, d);
    if (d > rel * std::abs(ref.data()[i]) + abs) ++*bad;
  }
  return worst;
}

struct ones {
  var<bf16> w{tensor<bf16>::full({4096}, bf16(1.0f)), true};
  template <class F>
  void for_each_child(F&& f) {
    f("w", w);
  }
};

struct blowup {
  var<float> a{tensor<float>::full({3}, 1.0f), true}, b{tensor<float>::full({2}, 1.0f), true};
  template <class F>
  void for_each_child(F&& f) {
    f("a", a);
    f("b", b);
  }
  // The identity whose backward overflows: what a bad custom op or an f32 overflow deep in
  // a backward produces while the loss itself stays finite.
  static var<float> faulty(const var<float>& x) {
    return autograd::record(
        x.value().clone(),
        [x](const tensor<float>&) {
          x.begin_grad_write();
          for (std::int64_t i = 0; i < x.numel(); ++i) x.grad().data()[i] = i == 1 ? INFINITY : 0.5f;
        },
        x);
  }
  var<float> training_step(auto&, const batch&) { return ops::add(ops::sum(a), ops::sum(faulty(b))); }
  auto configure_optimizers() { return optim::sgd<float>(*this, {.lr = 0.1}); }
};

}  // namespace

TEST_CASE("half GEMMs accumulate in f32 and round once (bf16, f16)") {
  const std::int64_t m = 48, k = 784, n = 40;
  auto a32 = test::rand_tensor<float>({m, k}, 1), b32 = test::rand_tensor<float>({k, n}, 2);
  auto check = [&]<class H>(H, double ulp) {
    const tensor<H> a = a32.to<H>(), b = b32.to<H>();
    tensor<f64> ref({m, n});
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (std::int64_t p = 0; p < k; ++p) s += double(float(a(i, p))) * double(float(b(p, j)));
        ref(i, j) = s;
      }
    auto y = ops::matmul(var<H>(a), var<H>(b)).value();
    std::int64_t bad = 0;
    // One rounding of an f32-accumulated sum: half an ulp of the result plus f32's own error.
    const double worst = max_abs_diff(y, ref, ulp / 2, 1e-3, &bad);
    CHECK_MESSAGE(bad == 0, "elements beyond half an ulp: ", bad, " (worst abs error ", worst, ")");
    // accumulate mode: C += A·B rounds (C + A·B) once.
    tensor<H> c = y.clone();
    ops::cpu::gemm<H>(false, false, m, n, k, a.data(), k, b.data(), n, c.data(), n, grad_write::accumulate);
    tensor<f64> ref2({m, n});
    for (std::int64_t i = 0; i < m * n; ++i) ref2.data()[i] = double(float(y.data()[i])) + ref.data()[i];
    bad = 0;
    max_abs_diff(c, ref2, ulp / 2, 2e-3, &bad);
    CHECK(bad == 0);
  };
  check(bf16{}, std::ldexp(1.0, -7));
  check(f16{}, std::ldexp(1.0, -10));
}

TEST_CASE("stochastic rounding to bf16 is unbiased, exact on bf16 values, and passes inf/NaN through") {
  const philox_stream rs{42, 0};
  // 1 + 0.3 ulp: rounds up with probability 0.3.
  const float ulp = std::ldexp(1.0f, -7);
  const float x = 1.0f + 0.3f * ulp;
  double sum = 0;
  int ups = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const float r = float(Eigen::numext::bit_cast<bf16>(ops::fn::bf16_bits_stochastic(x, rs.bits(i))));
    CHECK((r == 1.0f || r == 1.0f + ulp));
    ups += r != 1.0f;
    sum += r;
  }
  CHECK(std::abs(double(ups) / n - 0.3) < 0.015);
  CHECK(std::abs(sum / n - double(x)) < 2e-4 * ulp * 100);
  for (float v : {1.0f, -2.5f, 0.0f, 3.140625f})
    for (std::uint32_t r : {0u, 0xFFFFu, 0x1234u})
      CHECK(float(Eigen::numext::bit_cast<bf16>(ops::fn::bf16_bits_stochastic(v, r))) == v);
  CHECK(std::isinf(float(
      Eigen::numext::bit_cast<bf16>(ops::fn::bf16_bits_stochastic(std::numeric_limits<float>::infinity(), 0xFFFFu)))));
  CHECK(std::isnan(float(
      Eigen::numext::bit_cast<bf16>(ops::fn::bf16_bits_stochastic(std::numeric_limits<float>::quiet_NaN(), 0u)))));
  // The largest finite bf16 never rounds up to infinity.
  const float big = float(Eigen::numext::bit_cast<bf16>(std::uint16_t{0x7F7F}));
  CHECK(std::isfinite(float(Eigen::numext::bit_cast<bf16>(ops::fn::bf16_bits_stochastic(big * 1.0039f, 0xFFFFu)))));
}

TEST_CASE(
    "updates below half a bf16 ulp: lost by bf16_true, kept by bf16_mixed's master, unbiased under stochastic "
    "rounding") {
  // AdamW with no decay moves each weight by ~lr per step: 200 steps of 1e-4 from 1.0,
  // where a bf16 ulp is 2^-7 = 0.0078, so round-to-nearest undoes every single update.
  auto train = [](auto& policy, ones& m) {
    policy.setup(m);
    auto opt = policy.adapt(optim::adamw<bf16>(m, {.lr = 1e-4, .weight_decay = 0}));
    for (int s = 0; s < 200; ++s) {
      opt.zero_grad();
      auto loss = ops::sum(ops::cast<float>(m.w));  // dL/dw = 1 everywhere
      policy.backward(loss, 1.0, m);
      policy.unscale(m, 1.0);
      policy.step(opt, m);
    }
    double mean = 0;
    for (std::int64_t i = 0; i < 4096; ++i) mean += double(float(m.w.value().data()[i]));
    return mean / 4096;
  };
  {
    ones m;
    precision::bf16_true p;
    CHECK(train(p, m) == 1.0);  // every update lost
  }
  {
    ones m;
    precision::bf16_true p;
    p.stochastic_rounding = true;
    CHECK(std::abs(train(p, m) - 0.98) < 1e-3);
  }
  {
    ones m;
    precision::bf16_mixed p;
    const double mean = train(p, m);
    CHECK(std::abs(mean - 0.98) < 4e-3);  // the master moved by 0.02; bf16 spacing at 0.98 is 2^-8
    CHECK(std::abs(double(p.masters().links()[0].master.value().data()[0]) - 0.98) < 1e-5);
  }
}

template <class T, class D = cpu>
struct elem_dev {};
template <class D, class T>
struct dev_elem {};
template <class T, class U>
struct two_types {};
TEST_CASE("a module's element type is read from a template over it, alone or with a device") {
  using precision::module_element_t;
  static_assert(std::is_same_v<module_element_t<clf<bf16>>, bf16>);
  static_assert(std::is_same_v<module_element_t<elem_dev<bf16>>, bf16>);
  static_assert(std::is_same_v<module_element_t<elem_dev<f16, cuda>>, f16>);
  static_assert(std::is_same_v<module_element_t<dev_elem<cuda, bf16>>, bf16>);
  static_assert(std::is_void_v<module_element_t<two_types<f32, f16>>>);  // which one? it does not say
}

// Two layers, the first larger than one AdamW chunk (65536 elements), so the write-back
// crosses a chunk boundary inside a tensor.
template <floating_element H>
struct wide {
  nn::linear<H> a{300, 300};
  nn::linear<H> b{300, 7};
  template <class F>
  void for_each_child(F&& f) {
    f("a", a);
    f("b", b);
  }
};

TEST_CASE_TEMPLATE("the write-back fused into adamw's step equals the separate publish pass, bit for bit", H, bf16,
                   f16) {
  // Masters stepped by AdamW for 4 steps of made-up gradients; the Half model written back
  // either by step(compute_copies) or by step() then publish(): the same bits, rounded to
  // nearest and (bf16) stochastically, whose draws must then differ from nearest.
  auto run_ = [](bool fused, bool stochastic) {
    manual_seed(4);
    wide<H> m;
    precision::master_weights<H> mw;
    mw.bind(m, "test");
    auto opt = optim::adamw<H>(m, {.lr = 1e-3, .weight_decay = 0.1})
                   .template rebind<f32, cpu>(
                       [&](const nn::named_parameter<H>& np) { return mw.master_of(np.param, "test"); });
    const optim::param_rounding r{stochastic, 77};
    for (std::uint64_t step = 0; step < 4; ++step) {
      opt.zero_grad();
      std::uint64_t k = 0;
      nn::visit_parameters(m, [&](const std::string&, auto& p) {
        p.begin_grad_write();
        const philox_stream g{step, ++k};
        for (std::int64_t i = 0; i < p.numel(); ++i)
          p.grad().data()[i] = H(g.uniform(static_cast<std::uint64_t>(i)) - 0.5f);
      });
      mw.fold();
      if (fused) {
        opt.step(mw.copies(r, step));
      } else {
        opt.step();
        mw.publish(r, step);
      }
    }
    return weight_bits(m);
  };
  const auto nearest = run_(true, false);
  CHECK(nearest == run_(false, false));
  if constexpr (std::is_same_v<H, bf16>) {
    const auto stochastic = run_(true, true);
    CHECK(stochastic == run_(false, true));
    CHECK(stochastic != nearest);
  }
}

TEST_CASE("bf16_mixed and f16_mixed track fp32's loss trajectory; bf16_true and f16_true train") {
  auto fit = [](auto tag, double* final_loss) {
    using P = decltype(tag);
    const auto root = test::temp_dir("prec", std::string("track_") + P::name);
    manual_seed(3);
    clf<precision::param_t<P>> model;
    data_module dm;
    run<P> t(options(root, 3));
    if constexpr (P::name == std::string_view("f16_mixed")) {
      // The default 2^16 overflows this model's f16 gradients in its first steps, which are
      // skipped (as DeepSpeed and torch's GradScaler do): start where nothing is skipped, so
      // the two trajectories see the same steps.
      t.precision().scaler = precision::dynamic_loss_scaler({.initial_scale_power = 8});
    }
    auto r = t.fit(model, dm);
    if constexpr (P::name == std::string_view("f16_mixed")) CHECK(t.precision().scaler.skipped_steps() == 0);
    *final_loss = r.metrics.at("val/loss");
    return model.losses;
  };
  double l32, lb, lf, ltb, ltf;
  const auto ref = fit(precision::fp32{}, &l32);
  const auto b = fit(precision::bf16_mixed{}, &lb);
  const auto f = fit(precision::f16_mixed<>{}, &lf);
  const auto tb = fit(precision::bf16_true{}, &ltb);
  const auto tf = fit(precision::f16_true{}, &ltf);
  REQUIRE(ref.size() == b.size());
  REQUIRE(ref.size() == f.size());
  double worst_b = 0, worst_f = 0;
  for (auto& [i, v] : ref) {
    worst_b = std::max(worst_b, double(std::abs(b.at(i) - v)));
    worst_f = std::max(worst_f, double(std::abs(f.at(i) - v)));
  }
  MESSAGE("largest per-batch loss gap to fp32 over 45 batches: bf16_mixed ", worst_b, ", f16_mixed ", worst_f,
          "; final val/loss fp32 ", l32, " bf16_mixed ", lb, " f16_mixed ", lf, " bf16_true ", ltb, " f16_true ", ltf);
  CHECK(worst_b < 0.01);   // bf16 keeps 8 bits: ~0.4% per rounding of the logits
  CHECK(worst_f < 0.002);  // f16 keeps 11
  CHECK(std::abs(lb - l32) < 0.005);
  CHECK(std::abs(lf - l32) < 0.001);
  const double first = ref.begin()->second;
  CHECK(ltb < first * 0.8);  // the 16-bit-only policies still learn
  CHECK(ltf < first * 0.8);
}

TEST_CASE("gradients are unscaled before on_before_optimizer_step: f16_mixed's masters see fp32's gradients") {
  auto norms = [](auto tag) {
    using P = decltype(tag);
    const auto root = test::temp_dir("prec", std::string("unscale_") + P::name);
    manual_seed(3);
    clf<precision::param_t<P>> model;
    data_module dm;
    std::vector<double> out;
    run<P> t(
        [&] {
          auto o = options(root, 1);
          o.max_steps = 3;
          return o;
        }(),
        probe{.norms = &out});
    if constexpr (P::name == std::string_view("f16_mixed"))
      t.precision().scaler = precision::dynamic_loss_scaler({.initial_scale_power = 10});  // 1024: no overflow here
    t.fit(model, dm);
    if constexpr (P::name == std::string_view("f16_mixed")) CHECK(t.precision().scaler.skipped_steps() == 0);
    return out;
  };
  const auto a = norms(precision::fp32{}), b = norms(precision::f16_mixed<>{}), c = norms(precision::bf16_mixed{});
  REQUIRE(a.size() == 3);
  REQUIRE(b.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(b[i] == doctest::Approx(a[i]).epsilon(0.01));  // not 65536 times larger
    CHECK(c[i] == doctest::Approx(a[i]).epsilon(0.05));
  }
}

TEST_CASE("f16_mixed: injected overflows skip their steps, back the scale off, and it regrows after the window") {
  const auto root = test::temp_dir("prec", "overflow");
  manual_seed(3);
  clf<f16> model;
  model.overflow_at = {2, 3, 9};
  data_module dm;
  std::vector<watch_row> rows;
  using P = precision::f16_mixed<>;
  run<P> t(
      [&] {
        auto o = options(root, 1);
        o.accumulate_grad_batches = 1;
        o.max_steps = 14;
        return o;
      }(),
      probe{.rows = &rows});
  t.precision().scaler = precision::dynamic_loss_scaler({.initial_scale_power = 10, .window = 4, .hysteresis = 2});
  t.fit(model, dm);
  REQUIRE(rows.size() == 14);
  // rows[s] is after optimizer step s (global_step s + 1).
  // Step 2: first overflow, absorbed by hysteresis (scale kept); step 3: backoff to 512.
  CHECK(rows[1].scale == 1024.0);
  CHECK(rows[2].scale == 1024.0);
  CHECK(rows[3].scale == 512.0);
  // Regrowth: 4 clean steps after the last overflow (step 3) → at iteration 7.
  CHECK(rows[6].scale == 512.0);
  CHECK(rows[7].scale == 1024.0);
  // Step 9 overflows again: the restored allowance absorbs it.
  CHECK(rows[9].scale == 1024.0);
  CHECK(rows[13].scale == 2048.0);  // 4 clean steps after step 9
  CHECK(rows[13].skipped == 3);
  for (std::int64_t s : {2, 3, 9}) {
    CHECK(rows[s].w == rows[s - 1].w);                    // skipped: the weights did not move
    CHECK(rows[s].adam_steps == rows[s - 1].adam_steps);  // nor did AdamW's step count
    CHECK(rows[s].lr == rows[s - 1].lr);                  // nor the schedule
  }
  CHECK(rows[4].w != rows[3].w);
  CHECK(rows[13].adam_steps == 11);
  CHECK(rows[13].step == 14);  // skipped steps still count as optimizer steps (DeepSpeed's global_steps)
}

TEST_CASE("a non-finite loss or gradient under fp32 and bf16 names the first offending parameter") {
  {  // a NaN weight: the loss is NaN and the error names the weight
    const auto root = test::temp_dir("prec", "nan_weight");
    manual_seed(3);
    clf<bf16> model;
    model.fc2.weight.value().data()[5] = bf16(std::numeric_limits<float>::quiet_NaN());
    data_module dm;
    run<precision::bf16_mixed> t(options(root, 1));
    std::string what;
    try {
      t.fit(model, dm);
    } catch (const error& e) {
      what = e.what();
    }
    CHECK(what.find("bf16_mixed: the training loss is nan") != std::string::npos);
    CHECK(what.find("parameter 'fc2.weight' (element 5 = nan)") != std::string::npos);
    CHECK(what.find("at epoch 0, global step 0, batch 0") != std::string::npos);
  }
  {  // a finite loss whose backward overflows in one parameter only
    const auto root = test::temp_dir("prec", "inf_grad");
    blowup model;
    data_module dm;
    trainer<blowup, strategy::single_device<cpu>, precision::fp32> t(options(root, 1));
    std::string what;
    try {
      t.fit(model, dm);
    } catch (const error& e) {
      what = e.what();
    }
    CHECK(what.find("fp32: non-finite gradient in parameter 'b'") != std::string::npos);
    CHECK(what.find("at epoch 0, global step 0") != std::string::npos);
    // check_finite = false lets it run.
    blowup m2;
    trainer<blowup, strategy::single_device<cpu>, precision::fp32> t2(options(root / "2", 1));
    t2.precision().check_finite = false;
    CHECK_NOTHROW(t2.fit(m2, dm));
  }
}

TEST_CASE("resume under f16_mixed and bf16_mixed (stochastic rounding) is bit-exact, loss-scaler state included") {
  auto check = [](auto tag, std::int64_t at, std::set<std::int64_t> overflows) {
    using P = decltype(tag);
    using T = precision::param_t<P>;
    const auto root = test::temp_dir("prec", std::string("resume_") + P::name + std::to_string(at));
    const auto ck = root / "mid.ckpt";
    auto configure = [](auto& t) {
      if constexpr (std::is_same_v<P, precision::bf16_mixed>) {
        t.precision().stochastic_rounding = true;
      } else {
        t.precision().scaler =
            precision::dynamic_loss_scaler({.initial_scale_power = 12, .window = 5, .hysteresis = 2});
      }
    };
    // Uninterrupted, saving on the way.
    manual_seed(3);
    clf<T> a;
    a.overflow_at = overflows;
    data_module dm;
    run<P> ta(options(root / "a", 3), probe{.save_at = at, .path = ck});
    configure(ta);
    ta.fit(a, dm);
    // Resumed in a fresh model and trainer (different initial weights: the checkpoint must set them).
    manual_seed(99);
    clf<T> b;
    b.overflow_at = overflows;
    data_module dm2;
    run<P> tb(options(root / "b", 3));
    configure(tb);
    tb.fit(b, dm2, ck.string());
    std::int64_t compared = 0;
    for (auto& [i, v] : b.losses) {
      REQUIRE(a.losses.count(i));
      CHECK_MESSAGE(bits_of(a.losses.at(i)) == bits_of(v), P::name, " micro-batch ", i);
      ++compared;
    }
    CHECK(compared == 45 - at);
    CHECK(weight_bits(a) == weight_bits(b));
    CHECK(weight_bits(ta.precision().master_parameters(a)) == weight_bits(tb.precision().master_parameters(b)));
    if constexpr (!std::is_same_v<P, precision::bf16_mixed>) {
      CHECK(ta.precision().scaler.state_json().dump() == tb.precision().scaler.state_json().dump());
      CHECK(ta.precision().scaler.skipped_steps() == std::int64_t(overflows.size()));
    }
  };
  // Inside an accumulation window (micro-batch 7 of 15: odd) and at a window's end.
  check(precision::f16_mixed<>{}, 7, {1, 2, 10});
  check(precision::f16_mixed<>{}, 8, {1, 2, 10});
  check(precision::bf16_mixed{}, 7, {});
  check(precision::bf16_mixed{}, 30, {});
}

TEST_CASE("a bf16_mixed checkpoint (f32 optimizer state) is refused by a bf16_true trainer, naming file and tensor") {
  const auto root = test::temp_dir("prec", "policy_mismatch");
  manual_seed(3);
  clf<bf16> a;
  data_module dm;
  run<precision::bf16_mixed> ta(options(root / "a", 1), probe{.save_at = 4, .path = root / "m.ckpt"});
  ta.fit(a, dm);
  // bf16_true has the same parameter dtype but keeps no masters: the optimizer state is bf16.
  clf<bf16> b;
  run<precision::bf16_true> tb(options(root / "b", 1));
  std::string what;
  try {
    tb.fit(b, dm, (root / "m.ckpt").string());
  } catch (const error& e) {
    what = e.what();
  }
  CHECK_MESSAGE(what.find("m.ckpt") != std::string::npos, what);
  CHECK_MESSAGE(what.find("tensor 'optimizer.0/fc1.weight.exp_avg' has dtype F32, expected BF16") != std::string::npos,
                what);
}

namespace {
// The fixture's classifier stepped by hand (manual optimisation) under a mixed policy.
struct manual_clf : clf<bf16> {
  static constexpr bool automatic_optimization = false;
  void training_step(auto& ctx, const batch& b) {
    auto& opt = ctx.optimizer();
    opt.zero_grad();
    auto loss = cross_entropy(logits(b.x), b.y);
    losses[ctx.micro_batches()] = loss.value().flat(0);
    ctx.manual_backward(loss);
    ctx.optimizer_step();
    ctx.scheduler_step();
  }
};
}  // namespace

TEST_CASE("bf16_mixed under manual optimisation steps exactly as under automatic optimisation") {
  const auto root = test::temp_dir("prec", "manual");
  auto opts = [&](const char* sub) {
    auto o = options(root / sub, 1);
    o.accumulate_grad_batches = 1;
    return o;
  };
  manual_seed(3);
  clf<bf16> a;
  data_module da;
  run<precision::bf16_mixed>(opts("a")).fit(a, da);
  manual_seed(3);
  manual_clf m;
  data_module dm;
  trainer<manual_clf, strategy::single_device<cpu>, precision::bf16_mixed> tm(opts("m"));
  tm.fit(m, dm);
  REQUIRE(a.losses.size() == 15);
  CHECK(a.losses == m.losses);
  CHECK(weight_bits(a) == weight_bits(m));
}

}  // namespace test_precision
