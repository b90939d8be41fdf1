// The memory planner: trainer.plan() before the first step against the caching
// allocator's measured peak while fit() runs, within 10%, for an MLP and a GPT under the
// precision policies; plus the formulas on a known model.
#include <cmath>

#include "../helpers.hpp"
#include "kiln/callbacks/model_summary.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/data/on_device.hpp"
#include "kiln/data/text.hpp"
#include "kiln/nn/gpt2.hpp"
#include "kiln/train/trainer.hpp"

namespace test_memory_plan {

using namespace kiln;

namespace {

using data::labelled_batch;

data::tensor_dataset images(std::int64_t n) {
  tensor<float> x({n, 784});
  tensor<i64> y({n});
  const philox_stream st{7, 0};
  for (std::int64_t i = 0; i < n * 784; ++i) x.data()[i] = st.uniform(static_cast<std::uint64_t>(i));
  for (std::int64_t i = 0; i < n; ++i) y(i) = i % 10;
  return {x, y};
}

template <floating_element T>
struct mlp_clf {
  nn::mlp<nn::relu, T> net{784, {256, 256}, 10};
  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
  var<float> training_step(auto& ctx, const auto& b) {  // labelled_batch, or labelled_batch_on<cpu>
    auto loss = cross_entropy(ops::cast<float>(net(var<T>(b.x.template to<T>()))), b.y);
    ctx.log("train/loss", loss);
    return loss;
  }
  auto configure_optimizers() { return optim::adamw<T>(*this, {.lr = 1e-3}); }
};

template <class R, floating_element T>
struct tiny_gpt {
  nn::gpt2<ops::mask::causal, R, T> net;
  tiny_gpt() : net(nn::gpt2_config{.vocab_size = 256, .n_positions = 64, .n_embd = 64, .n_layer = 2, .n_head = 4}) {}
  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
  var<float> training_step(auto&, const data::lm_batch& b) {
    const std::int64_t n = b.x.numel();
    auto logits = ops::cast<float>(net(b.x));
    return cross_entropy(reshape(logits, shape{n, 256}), b.y.reshape(shape{n}));
  }
  auto configure_optimizers() { return optim::adamw<T>(*this, {.lr = 1e-3}); }
};

struct lm_loader {
  std::vector<data::lm_batch> batches;
  lm_loader() {
    for (int i = 0; i < 4; ++i) {
      data::lm_batch b{tensor<i64>({8, 64}), tensor<i64>({8, 64})};
      for (std::int64_t j = 0; j < b.x.numel(); ++j) {
        b.x.data()[j] = (j * 7 + i) % 256;
        b.y.data()[j] = (j * 7 + i + 1) % 256;
      }
      batches.push_back(b);
    }
  }
  std::int64_t size() const { return 4; }
  const std::vector<data::lm_batch>& epoch(std::int64_t, std::int64_t) const { return batches; }
};

// Plans, then fits a few steps and measures the allocator's peak above what existed
// before (minus the parameters, which the plan counts and which existed already).
template <class Trainer, class M, class L>
void check_plan(const char* what, M& model, L& loader) {
  auto& alloc = caching_allocator<cpu>::instance();
  const std::int64_t before = static_cast<std::int64_t>(alloc.stats().in_use);
  Trainer t(train::trainer_options{.max_epochs = 1,
                                   .max_steps = 3,
                                   .default_root_dir = test::temp_dir("plan", what).string(),
                                   .enable_progress_bar = false,
                                   .enable_model_summary = false});
  const train::memory_plan plan = t.plan(model, loader);
  REQUIRE(plan.devices.size() == 1);
  const auto& d = plan.devices[0];
  alloc.reset_peak();
  t.fit(model, loader);
  const std::int64_t peak = static_cast<std::int64_t>(alloc.stats().peak_in_use);
  const std::int64_t measured = peak - (before - d.parameters);
  const double ratio = double(d.total()) / double(measured);
  MESSAGE(std::string(what), ": plan ", d.total(), " B (params ", d.parameters, ", grads ", d.gradients, ", masters ",
          d.master_weights, ", optimizer ", d.optimizer_state, ", activations ", d.activations, ", batches ", d.batches,
          ") vs measured peak ", measured, " B: ratio ", ratio);
  CHECK(std::abs(ratio - 1.0) <= 0.10);
}

}  // namespace

TEST_CASE("memory plan: the formulas on a 784-256-256-10 MLP under each precision policy") {
  auto states = [](auto tag) {
    using P = decltype(tag);
    using T = precision::param_t<P>;
    manual_seed(1);
    mlp_clf<T> m;
    data::data_loader<data::tensor_dataset> l(images(256), {.batch_size = 128});
    trainer<mlp_clf<T>, strategy::single_device<cpu>, P> t(
        {.default_root_dir = test::temp_dir("plan", "formula").string(), .enable_progress_bar = false});
    auto plan = t.plan(m, l);
    return plan.devices.at(0);
  };
  // 269,322 parameters in 6 tensors; block(n) rounds to 512 B below 1 MiB and to quarter
  // powers of two above, so per-tensor sums are what the allocator hands out.
  const std::int64_t sizes[] = {256 * 784, 256, 256 * 256, 256, 10 * 256, 10};
  auto blocks = [&](std::int64_t elem) {
    std::int64_t s = 0;
    for (auto n : sizes) s += train::detail::block_bytes(n * elem);
    return s;
  };
  const auto f = states(precision::fp32{});
  CHECK(f.parameters == blocks(4));
  CHECK(f.gradients == blocks(4));
  CHECK(f.master_weights == 0);
  CHECK(f.optimizer_state == 2 * blocks(4));
  const auto b = states(precision::bf16_mixed{});
  CHECK(b.parameters == blocks(2));
  CHECK(b.gradients == blocks(2));
  CHECK(b.master_weights == 2 * blocks(4));
  CHECK(b.optimizer_state == 2 * blocks(4));  // moments in f32, on the masters
  const auto t16 = states(precision::bf16_true{});
  CHECK(t16.master_weights == 0);
  CHECK(t16.optimizer_state == 2 * blocks(2));
  // Batches: 128 × 784 f32 images + 128 i64 labels, one resident (no workers).
  CHECK(f.batches == train::detail::block_bytes(128 * 784 * 4) + train::detail::block_bytes(128 * 8));
  // Through data::on_device<cpu> with its lookahead: the inner loader's resident batches
  // (1 + 2 workers × prefetch 2) plus the one built ahead.
  {
    manual_seed(1);
    mlp_clf<float> m;
    data::data_loader<data::tensor_dataset> l(images(256), {.batch_size = 128, .num_workers = 2});
    auto on = data::on_device<cpu>(l, data::move_fields{}, {.ahead = 1});
    trainer<mlp_clf<float>, strategy::single_device<cpu>, precision::fp32> t(
        {.default_root_dir = test::temp_dir("plan", "on_device").string(), .enable_progress_bar = false});
    CHECK(t.plan(m, on).devices.at(0).batches == 6 * f.batches);
  }
  CHECK(f.activations > 0);
  CHECK(b.activations < f.activations);  // bf16 activations are half the size
  // model_summary prints the live model states during fit.
  char* buf = nullptr;
  std::size_t len = 0;
  std::FILE* mem = open_memstream(&buf, &len);
  {
    manual_seed(1);
    mlp_clf<bf16> m;
    data::data_loader<data::tensor_dataset> l(images(256), {.batch_size = 128});
    trainer<mlp_clf<bf16>, strategy::single_device<cpu>, precision::bf16_mixed, callbacks::model_summary> t(
        {.max_steps = 1, .default_root_dir = test::temp_dir("plan", "summary").string(), .enable_progress_bar = false},
        callbacks::model_summary{.stream = mem});
    t.fit(m, l);
  }
  std::fclose(mem);
  const std::string out(buf, len);
  std::free(buf);
  CHECK_MESSAGE(out.find("model states (MiB, bf16_mixed): parameters 0.5") != std::string::npos, out);
}

TEST_CASE("memory plan: the dry run changes nothing — same losses and weights as a run without it") {
  auto run = [](bool with_plan) {
    manual_seed(1);
    mlp_clf<f32> m;
    data::data_loader<data::tensor_dataset> l(images(512), {.batch_size = 128, .shuffle = true, .seed = 3});
    trainer<mlp_clf<f32>, strategy::single_device<cpu>, precision::fp32> t(
        {.max_steps = 4, .default_root_dir = test::temp_dir("plan", "same").string(), .enable_progress_bar = false});
    if (with_plan) (void)t.plan(m, l);
    auto r = t.fit(m, l);
    std::vector<float> w(m.net.layers[0].weight.value().data(), m.net.layers[0].weight.value().data() + 784 * 256);
    return std::make_pair(r.metrics.at("train/loss"), w);
  };
  const auto a = run(false), b = run(true);
  CHECK(a.first == b.first);
  CHECK(a.second == b.second);
}

TEST_CASE("memory plan vs the allocator's measured peak during fit: within 10%") {
  data::data_loader<data::tensor_dataset> l(images(512), {.batch_size = 128});
  {
    manual_seed(1);
    mlp_clf<f32> m;
    check_plan<trainer<mlp_clf<f32>, strategy::single_device<cpu>, precision::fp32>>("mlp fp32", m, l);
  }
  {
    manual_seed(1);
    mlp_clf<bf16> m;
    check_plan<trainer<mlp_clf<bf16>, strategy::single_device<cpu>, precision::bf16_mixed>>("mlp bf16_mixed", m, l);
  }
  {
    manual_seed(1);
    mlp_clf<f16> m;
    check_plan<trainer<mlp_clf<f16>, strategy::single_device<cpu>, precision::f16_mixed<>>>("mlp f16_mixed", m, l);
  }
  {
    manual_seed(1);
    mlp_clf<bf16> m;
    check_plan<trainer<mlp_clf<bf16>, strategy::single_device<cpu>, precision::bf16_true>>("mlp bf16_true", m, l);
  }
  lm_loader lm;
  {
    manual_seed(1);
    tiny_gpt<nn::recompute::none, f32> m;
    check_plan<trainer<tiny_gpt<nn::recompute::none, f32>, strategy::single_device<cpu>, precision::fp32>>("gpt fp32",
                                                                                                           m, lm);
  }
  {
    manual_seed(1);
    tiny_gpt<nn::recompute::none, bf16> m;
    check_plan<trainer<tiny_gpt<nn::recompute::none, bf16>, strategy::single_device<cpu>, precision::bf16_mixed>>(
        "gpt bf16_mixed", m, lm);
  }
}

}  // namespace test_memory_plan
