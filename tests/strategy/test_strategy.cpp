// The policy slots as concepts: archetypes that satisfy exactly the required members (so
// the concepts are satisfiable and not over-constrained), the capabilities every real
// policy declares, the strategies over comm::local against single_device, and the trainer
// calling a capability's members exactly when the policy declares it. Builds without MPI.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "../helpers.hpp"
#include "../io/resume_fixture.hpp"
#include "kiln/callbacks/early_stopping.hpp"
#include "kiln/callbacks/model_checkpoint.hpp"
#include "kiln/callbacks/progress_bar.hpp"
#include "kiln/comm/communicator.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/strategy/compatibility.hpp"
#include "kiln/strategy/ddp.hpp"
#include "kiln/strategy/zero.hpp"
#include "kiln/train/trainer.hpp"

namespace test_strategy {

using namespace kiln;

namespace {

// ---- archetypes: exactly the required members of each slot ----

// One process, one device: the members every strategy has, and nothing else.
struct archetype_strategy {
  using device_type = cpu;
  int rank() const { return 0; }
  int world_size() const { return 1; }
  bool is_global_zero() const { return true; }
  template <class M>
  void setup(M&) {}
  template <class M>
  void reduce_gradients(M&) {}
  double reduce(double v, train::reduce) { return v; }
  void barrier() {}
};

// f32 throughout: the members every precision policy has, and nothing else.
struct archetype_precision {
  static constexpr const char* name = "archetype";
  using param_type = f32;
  template <class M>
  static constexpr void check_module() {}
  template <class O>
  using optimizer_t = O;
  template <class M>
  void setup(M&) {}
  template <class O>
  O adapt(O&& o) {
    return std::move(o);
  }
  template <class T, class D, class M>
  void backward(var<T, D> loss, double weight, M&) {
    if (weight == 1.0)
      loss.backward();
    else
      loss.backward(tensor<T, D>::full(loss.shape(), static_cast<T>(weight)));
  }
  template <class M>
  void unscale(M& model, double factor) {
    if (factor != 1.0) optim::scale_gradients(model, factor);
  }
  template <class M>
  M& master_parameters(M& model) {
    return model;
  }
  template <class O, class M>
  bool step(O& optimizer, M&) {
    optimizer.step();
    return true;
  }
  bool overflowed() const { return false; }
};

// The rate halves every 4 scheduler steps.
struct archetype_schedule {
  double factor(std::int64_t t) const { return std::pow(0.5, double(t / 4)); }
};

// The concepts hold for the archetypes, and each required member is required.
static_assert(strategy::policy<archetype_strategy> && strategy::check<archetype_strategy>());
static_assert(precision::policy<archetype_precision> && precision::check<archetype_precision>());
static_assert(optim::schedule<archetype_schedule> && optim::check_schedule<archetype_schedule>());
struct no_barrier : archetype_strategy {
  void barrier() = delete;
};
struct no_device {
  int rank() const { return 0; }
  int world_size() const { return 1; }
  bool is_global_zero() const { return true; }
  template <class M>
  void setup(M&) {}
  template <class M>
  void reduce_gradients(M&) {}
  double reduce(double v, train::reduce) { return v; }
  void barrier() {}
};
static_assert(!strategy::policy<no_barrier> && !strategy::policy<no_device> && !strategy::policy<int>);
struct no_overflowed : archetype_precision {
  bool overflowed() const = delete;
};
static_assert(!precision::policy<no_overflowed> && !precision::policy<strategy::single_device<cpu>>);
static_assert(!optim::schedule<int> && !optim::schedule<optim::adamw<float>>);
// Nothing declared: every capability reads false.
static_assert(!strategy::traits<archetype_strategy>::coordinates_ranks &&
              !strategy::traits<archetype_strategy>::overlaps_backward &&
              !strategy::traits<archetype_strategy>::shards_gradients &&
              !strategy::traits<archetype_strategy>::shards_parameters &&
              !strategy::traits<archetype_strategy>::adapts_optimizers &&
              !strategy::traits<archetype_strategy>::plans_memory &&
              !strategy::traits<archetype_strategy>::offloads_optimizer &&
              !strategy::traits<archetype_strategy>::checkpoints_state);
static_assert(!precision::traits<archetype_precision>::keeps_masters &&
              !precision::traits<archetype_precision>::scaled &&
              !precision::traits<archetype_precision>::flags_non_finite &&
              !precision::traits<archetype_precision>::keeps_device_state &&
              !precision::traits<archetype_precision>::checkpoints_state);
static_assert(!optim::schedule_traits<archetype_schedule>::monitored &&
              !optim::schedule_traits<archetype_schedule>::checkpoints_state);

// ---- the real policies: their concept, and the capabilities they declare ----

template <class S>
constexpr bool strategy_is(bool ranks, bool overlap, bool grads, bool params, bool adapts, bool plans, bool offload) {
  using T = strategy::traits<S>;
  return strategy::policy<S> && strategy::check<S>() && T::coordinates_ranks == ranks &&
         T::overlaps_backward == overlap && T::shards_gradients == grads && T::shards_parameters == params &&
         T::adapts_optimizers == adapts && T::plans_memory == plans && T::offloads_optimizer == offload &&
         !T::checkpoints_state;
}
using local = comm::local;
//                                          ranks  overlap grads  params adapts plans  offload
static_assert(strategy_is<strategy::single_device<cpu>>(false, false, false, false, false, false, false));
static_assert(strategy_is<strategy::ddp<local>>(true, true, false, false, false, true, false));
static_assert(strategy_is<strategy::zero<1, local>>(true, true, false, false, true, true, false));
static_assert(strategy_is<strategy::zero<2, local>>(true, false, true, false, true, true, false));
static_assert(strategy_is<strategy::zero<2, local, strategy::offload::cpu>>(true, false, true, false, true, true,
                                                                            true));
static_assert(strategy_is<strategy::zero<3, local>>(true, false, true, true, true, true, false));

template <class P>
constexpr bool precision_is(bool masters, bool scaled, bool non_finite, bool device_state, bool state) {
  using T = precision::traits<P>;
  return precision::policy<P> && precision::check<P>() && T::keeps_masters == masters && T::scaled == scaled &&
         T::flags_non_finite == non_finite && T::keeps_device_state == device_state && T::checkpoints_state == state;
}
//                                                 masters scaled non_finite device state
static_assert(precision_is<precision::fp32>(false, false, false, false, false));
static_assert(precision_is<precision::bf16_true>(false, false, false, false, false));
static_assert(precision_is<precision::f16_true>(false, false, false, false, false));
static_assert(precision_is<precision::bf16_mixed>(true, false, true, true, true));
static_assert(precision_is<precision::f16_mixed<>>(true, true, true, true, true));
static_assert(precision_is<precision::bf16_mixed_on<cuda>>(true, false, true, true, true));

template <class S>
constexpr bool plain_schedule() {
  return optim::schedule<S> && optim::check_schedule<S>() && !optim::schedule_traits<S>::monitored &&
         !optim::schedule_traits<S>::checkpoints_state;
}
static_assert(plain_schedule<optim::constant>() && plain_schedule<optim::linear>() && plain_schedule<optim::cosine>() &&
              plain_schedule<optim::step_decay>() && plain_schedule<optim::exponential>() &&
              plain_schedule<optim::warmup<optim::cosine>>());
static_assert(optim::schedule<optim::reduce_on_plateau> && optim::check_schedule<optim::reduce_on_plateau>() &&
              optim::schedule_traits<optim::reduce_on_plateau>::monitored &&
              optim::schedule_traits<optim::reduce_on_plateau>::checkpoints_state);

static_assert(check_callback<callbacks::early_stopping>() && callback_traits<callbacks::early_stopping>::monitors &&
              !callback_traits<callbacks::early_stopping>::tracks_checkpoints &&
              callback_traits<callbacks::early_stopping>::state_key == "early_stopping");
static_assert(check_callback<callbacks::model_checkpoint>() && callback_traits<callbacks::model_checkpoint>::monitors &&
              callback_traits<callbacks::model_checkpoint>::tracks_checkpoints);
static_assert(check_callback<callbacks::progress_bar>() && !callback_traits<callbacks::progress_bar>::monitors &&
              callback_traits<callbacks::progress_bar>::state_key.empty());

// The strategy × precision rules, in capabilities.
static_assert(!strategy::compatibility<strategy::zero<2, local>, precision::f16_mixed<>>::value);
static_assert(!strategy::compatibility<strategy::zero<3, local>, precision::bf16_mixed>::value);
static_assert(strategy::compatibility<strategy::zero<3, local>, precision::bf16_true>::value);
static_assert(strategy::compatibility<strategy::zero<1, local>, precision::f16_mixed<>>::value);
static_assert(strategy::compatibility<strategy::zero<2, local>, precision::bf16_mixed>::value);
static_assert(strategy::compatibility<archetype_strategy, archetype_precision>::value);

// ---- a small classification run ----

using batch = data::labelled_batch;

using kiln::test::resume::make_data;  // the resume fixture's 8-feature, 3-class data

template <class Sched>
Sched default_schedule() {
  if constexpr (std::is_same_v<Sched, optim::warmup<optim::cosine>>)
    return {.steps = 3, .then = {.total_steps = 40}};
  else
    return {};
}

// Sched: the schedule configure_optimizers pairs AdamW with.
template <class Sched = optim::warmup<optim::cosine>>
struct net {
  nn::linear<float> fc1{8, 16};
  nn::linear<float> fc2{16, 3};
  std::vector<double> losses;  // per micro-batch
  Sched schedule = default_schedule<Sched>();
  optim::schedule_options schedule_options{};

  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
  }
  var<float> forward(const tensor<float>& x) { return fc2(ops::relu(fc1(var<float>(x)))); }
  var<float> training_step(auto& ctx, const batch& b) {
    auto loss = cross_entropy(forward(b.x), b.y);
    losses.push_back(static_cast<double>(loss.value().flat(0)));
    ctx.log("train/loss", loss, {.on_epoch = true});
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) { ctx.log("val/loss", cross_entropy(forward(b.x), b.y)); }
  auto configure_optimizers() {
    return optim::with_schedule(optim::adamw<float>(*this, {.lr = 2e-2, .weight_decay = 0.01}), schedule,
                                schedule_options);
  }
};
struct data_module {
  data::data_loader<data::tensor_dataset> train{make_data(96, 11), {.batch_size = 12, .shuffle = true, .seed = 5}};
  data::data_loader<data::tensor_dataset> val{make_data(24, 12), {.batch_size = 12}};
  auto& train_loader() { return train; }
  auto& val_loader() { return val; }
};

std::filesystem::path scratch(const std::string& name) { return test::temp_dir("strategy", name); }

train::trainer_options options(const std::string& name, std::int64_t epochs = 2) {
  return {.max_epochs = epochs,
          .seed = 3,
          .default_root_dir = scratch(name).string(),
          .enable_progress_bar = false,
          .enable_model_summary = false};
}

struct outcome {
  std::vector<double> losses;
  std::map<std::string, std::vector<float>> weights;
  std::int64_t steps = 0;
  double lr = 0;  // the rate after the last step
};

template <class Strategy, class Precision = precision::fp32, class Sched = optim::warmup<optim::cosine>>
outcome run(train::trainer_options o) {
  trainer<net<Sched>, Strategy, Precision> t(std::move(o));
  manual_seed(7);
  net<Sched> m;
  data_module dm;
  outcome r;
  r.steps = t.fit(m, dm).global_step;
  r.lr = std::get<0>(t.optimizers()).optimizer.lr(0);
  r.losses = m.losses;
  r.weights = test::weights(m);
  return r;
}

double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}
double max_diff(const std::map<std::string, std::vector<float>>& a,
                const std::map<std::string, std::vector<float>>& b) {
  if (a.size() != b.size()) return INFINITY;
  double d = 0;
  for (auto& [k, v] : a) {
    const auto it = b.find(k);
    if (it == b.end() || it->second.size() != v.size()) return INFINITY;
    for (std::size_t i = 0; i < v.size(); ++i) d = std::max(d, double(std::abs(v[i] - it->second[i])));
  }
  return d;
}

// ---- archetype strategies that declare one capability each ----

// Declares overlaps_backward, so the trainer calls listen_for_backward before the forward
// of every window's last micro-batch.
struct listening_strategy : archetype_strategy {
  static constexpr bool overlaps_backward = true;
  int listens = 0;
  template <class M>
  void listen_for_backward(M&) {
    ++listens;
  }
};

// The same member without the declaration: never called.
struct undeclared_listener : archetype_strategy {
  int listens = 0;
  template <class M>
  void listen_for_backward(M&) {
    ++listens;
  }
};

// Declares shards_gradients: clipping by norm asks the strategy for the global norm.
struct clipping_strategy : archetype_strategy {
  static constexpr bool shards_gradients = true;
  int clips = 0;
  template <class M>
  double clip_grad_norm(M& parameters, double max_norm) {
    ++clips;
    return optim::clip_grad_norm(parameters, max_norm);
  }
};

// Declares plans_memory: trainer.plan() takes its sharding and its buffers.
struct planning_strategy : archetype_strategy {
  static constexpr bool plans_memory = true;
  train::memory_sharding memory_sharding() const { return {1, false, false, false, false}; }
  template <class M>
  train::communication_bytes communication_plan(M&, bool) const {
    return {4096, 0};
  }
};

// A monitored schedule that checkpoints its state: fed val/loss before each of its steps,
// it halves the rate whenever the metric did not improve.
struct halve_on_stall {
  static constexpr bool monitored = true;
  static constexpr bool checkpoints_state = true;
  double current = 1.0, best = INFINITY;
  std::int64_t fed = 0;

  double factor(std::int64_t) const { return current; }
  void update(double metric) {
    ++fed;
    if (metric < best)
      best = metric;
    else
      current *= 0.5;
  }
  void save_state(io::json& j) const {
    j.set("current", current);
    j.set("fed", fed);
  }
  void load_state(const io::json& j) {
    const double c = j.at("current").as_double();
    const std::int64_t f = j.at("fed").as_int();
    current = c;
    fed = f;
  }
};
static_assert(optim::check_schedule<halve_on_stall>());

}  // namespace

TEST_CASE("archetypes: a minimal strategy, precision policy and schedule train like the real ones") {
  const auto ref = run<strategy::single_device<cpu>>(options("ref"));
  const auto s = run<archetype_strategy>(options("arch_strategy"));
  const auto p = run<strategy::single_device<cpu>, archetype_precision>(options("arch_precision"));
  REQUIRE(ref.steps == 16);
  CHECK(s.losses == ref.losses);
  CHECK(test::same_bits(s.weights, ref.weights));
  CHECK(p.losses == ref.losses);
  CHECK(test::same_bits(p.weights, ref.weights));
  const auto sched = run<archetype_strategy, archetype_precision, archetype_schedule>(options("arch_all"));
  CHECK(sched.steps == 16);
  CHECK(sched.lr == doctest::Approx(2e-2 * std::pow(0.5, 4)));  // 16 steps: halved 4 times
}

TEST_CASE("strategies over comm::local follow single_device's trajectory") {
  auto clipped = [](std::string name) {
    auto o = options(std::move(name));
    o.gradient_clip_val = 0.5;  // by norm: zero<2|3> take the global norm over their shards
    return o;
  };
  for (bool clip : {false, true}) {
    CAPTURE(clip);
    auto opts = [&](const std::string& n) { return clip ? clipped(n) : options(n); };
    const auto ref = run<strategy::single_device<cpu>>(opts("ref"));
    const auto ddp = run<strategy::ddp<comm::local>>(opts("ddp"));
    const auto z1 = run<strategy::zero<1, comm::local>>(opts("zero1"));
    const auto z2 = run<strategy::zero<2, comm::local>>(opts("zero2"));
    const auto z2o = run<strategy::zero<2, comm::local, strategy::offload::cpu>>(opts("zero2o"));
    const auto z3 = run<strategy::zero<3, comm::local>>(opts("zero3"));
    REQUIRE(ref.losses.size() == 16);
    // One rank: nothing is reduced, and each strategy steps the same elements the same way.
    for (const auto* r : {&ddp, &z1, &z2, &z2o, &z3}) {
      CHECK(r->steps == ref.steps);
      CHECK(max_diff(r->losses, ref.losses) <= 1e-6);
      CHECK(max_diff(r->weights, ref.weights) <= 1e-6);
    }
  }
}

TEST_CASE("capabilities: the trainer calls a capability's members exactly when the strategy declares it") {
  {
    trainer<net<>, listening_strategy, precision::fp32> t(options("listen"));
    net<> m;
    data_module dm;
    const auto r = t.fit(m, dm);
    CHECK(t.strategy().listens == r.global_step);
    CHECK(r.global_step == 16);
  }
  {
    auto o = options("listen_accumulate");
    o.accumulate_grad_batches = 4;  // one listen per window, before its last micro-batch
    trainer<net<>, listening_strategy, precision::fp32> t(o);
    net<> m;
    data_module dm;
    const auto r = t.fit(m, dm);
    CHECK(r.global_step == 4);
    CHECK(t.strategy().listens == 4);
  }
  {
    trainer<net<>, undeclared_listener, precision::fp32> t(options("undeclared"));
    net<> m;
    data_module dm;
    t.fit(m, dm);
    CHECK(t.strategy().listens == 0);
  }
  {
    auto o = options("clip");
    o.gradient_clip_val = 0.5;
    trainer<net<>, clipping_strategy, precision::fp32> t(o);
    manual_seed(7);
    net<> m;
    data_module dm;
    const auto r = t.fit(m, dm);
    CHECK(t.strategy().clips == r.global_step);
    // The strategy's clip is optim::clip_grad_norm here: the same bits as the trainer's own.
    const auto ref = run<archetype_strategy>(o);
    CHECK(test::same_bits(test::weights(m), ref.weights));
  }
  {
    trainer<net<>, planning_strategy, precision::fp32> t(options("plan"));
    net<> m;
    data_module dm;
    const auto plan = t.plan(m, dm);
    REQUIRE(!plan.devices.empty());
    CHECK(plan.devices[0].communication == 4096);
  }
}

TEST_CASE("capabilities: a monitored schedule is fed its metric, and its state is checkpointed") {
  net<halve_on_stall> m;
  m.schedule_options = {.every = optim::interval::epoch, .monitor = "val/loss"};
  data_module dm;
  auto o = options("monitored", 3);
  o.num_sanity_val_steps = 0;
  trainer<net<halve_on_stall>, strategy::single_device<cpu>, precision::fp32> t(o);
  t.fit(m, dm);
  auto& so = std::get<0>(t.optimizers());
  CHECK(so.schedule.fed == 3);  // once per epoch, after the epoch's validation
  const auto path = scratch("monitored_ckpt") / "state.ckpt";
  t.save_checkpoint(path);
  const auto r = io::checkpoint_reader::open(path);
  const io::json& s = r.state().at("optimizers").as_array().at(0).at("schedule");
  CHECK(s.at("fed").as_int() == 3);
  CHECK(s.at("current").as_double() == so.schedule.current);

  // A monitored schedule whose metric was never logged: an error naming it.
  net<halve_on_stall> m2;
  m2.schedule_options = {.every = optim::interval::epoch, .monitor = "val/nope"};
  trainer<net<halve_on_stall>, strategy::single_device<cpu>, precision::fp32> t2(options("monitored_missing"));
  data_module dm2;
  CHECK_THROWS_WITH_AS(t2.fit(m2, dm2), doctest::Contains("halve_on_stall: monitored metric 'val/nope' was not logged"),
                       error);
}

}  // namespace test_strategy
