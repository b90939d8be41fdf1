// Training on the GPU against the CPU (suite gpu; tests/gpu/run_gpu.sh skips it where no
// GPU is visible). The same modules, built from the same seed on both devices (weights are
// drawn on the host, so both start from identical bits), trained on the same batches:
//   - a GPT (dropout in attention, residuals and embeddings) tracks the CPU's losses;
//   - the trainer on cuda resumes from a mid-run checkpoint bit for bit, and its
//     checkpoint resumes a CPU run that tracks the GPU's (checkpoints cross devices).
// KILN_GPU_TEST_DEVICE=kiln::cpu builds the same bodies with the CPU on both sides: how
// the test itself is checked on a machine without a GPU.
#include <cmath>
#include <cstring>
#include <map>

#include "../helpers.hpp"
#include "../io/resume_fixture.hpp"
#include "kiln/callbacks/model_checkpoint.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/data/on_device.hpp"
#include "kiln/nn/generate.hpp"
#include "kiln/nn/llama.hpp"
#include "kiln/nn/lora.hpp"
#include "kiln/train/trainer.hpp"

#ifndef KILN_GPU_TEST_DEVICE
#define KILN_GPU_TEST_DEVICE kiln::cuda
#endif

using namespace kiln;
namespace fs = std::filesystem;
using gpu = KILN_GPU_TEST_DEVICE;
using test::same_bits;
using test::weights;
using test::resume::make_data;  // the resume tests' three-class data

namespace {

// The largest |a - b| over every parameter, relative to max(1, |b|).
double max_rel_diff(const std::map<std::string, std::vector<float>>& a,
                    const std::map<std::string, std::vector<float>>& b) {
  double worst = 0;
  for (auto& [k, v] : a)
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double w = b.at(k)[i];
      worst = std::max(worst, std::abs(double(v[i]) - w) / std::max(1.0, std::abs(w)));
    }
  return worst;
}

// ---- a GPT on both devices ---------------------------------------------------------------

nn::gpt2_config tiny_gpt() {
  nn::gpt2_config c;
  c.vocab_size = 96;
  c.n_positions = 32;
  c.n_embd = 64;
  c.n_layer = 2;
  c.n_head = 2;  // head dim 32
  c.embd_pdrop = c.attn_pdrop = c.resid_pdrop = 0.1f;
  return c;
}

template <class Dev>
struct gpt_run {
  nn::gpt2<ops::mask::causal, nn::recompute::none, f32, Dev> model;
  optim::adamw<f32, Dev> opt;
  explicit gpt_run(std::uint64_t seed)
      : model((manual_seed(seed), tiny_gpt())), opt(model, {.lr = 3e-3, .weight_decay = 0.01}) {}

  // One step on ids [B, T + 1]: predict positions 1..T from 0..T-1.
  float step(const tensor<i64>& ids) {
    const std::int64_t B = ids.size(0), Tn = ids.size(1) - 1;
    const auto x = to_device<Dev>(ids.slice(1, 0, Tn).contiguous());
    const auto y = to_device<Dev>(ids.slice(1, 1, Tn + 1).contiguous().reshape(shape{B * Tn}));
    opt.zero_grad();
    auto logits = model(x);
    auto loss = cross_entropy(ops::reshape(logits, shape{B * Tn, model.vocab_size()}), y);
    loss.backward();
    optim::clip_grad_norm(model, 1.0);
    opt.step();
    return static_cast<float>(item(loss.value()));
  }
};

// ---- the trainer on both devices ---------------------------------------------------------

using batch = data::labelled_batch;

template <class Dev>
struct net {
  nn::linear<float, Dev> fc1{8, 32};
  nn::dropout drop{0.2f};
  nn::linear<float, Dev> fc2{32, 3};
  std::map<std::int64_t, float> losses;  // micro-batch index → loss

  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("drop", drop);
    f("fc2", fc2);
  }
  var<float, Dev> forward(const tensor<float>& x) {
    return fc2(drop(ops::relu(fc1(var<float, Dev>(to_device<Dev>(x))))));
  }
  var<float, Dev> training_step(auto& ctx, const batch& b) {
    auto loss = cross_entropy(forward(b.x), to_device<Dev>(b.y));
    losses[ctx.micro_batches()] = static_cast<float>(item(loss.value()));
    ctx.log("train/loss", loss, {.on_epoch = true});
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) {
    auto logits = forward(b.x);
    const auto y = to_device<Dev>(b.y);
    ctx.log("val/loss", cross_entropy(logits, y));
    ctx.log("val/acc", accuracy(logits, y));
  }
  auto configure_optimizers() {
    return optim::with_schedule(optim::adamw<float, Dev>(*this, {.lr = 3e-2, .weight_decay = 0.01}),
                                optim::warmup<optim::cosine>{.steps = 3, .then = {.total_steps = 60}});
  }
};

struct data_module {
  data::data_loader<data::tensor_dataset> train{make_data(240, 11),
                                                {.batch_size = 16, .shuffle = true, .seed = 5, .num_workers = 1}};
  data::data_loader<data::tensor_dataset> val{make_data(64, 12), {.batch_size = 32}};
  auto& train_loader() { return train; }
  auto& val_loader() { return val; }
};

// Saves a checkpoint after every training micro-batch, named by the micro-batch count.
struct every_batch {
  using hooks = hook_list<hook::on_train_batch_end>;
  fs::path dir;
  void on_train_batch_end(auto& ctx, const auto&) {
    ctx.save_checkpoint(dir / ("mb-" + std::to_string(ctx.micro_batches()) + ".ckpt"));
  }
};

template <class Dev>
using run = trainer<net<Dev>, strategy::single_device<Dev>, precision::fp32, every_batch>;

train::trainer_options options(const fs::path& root) {
  train::trainer_options o{.max_epochs = 3,
                           .seed = 3,
                           .default_root_dir = root.string(),
                           .enable_progress_bar = false,
                           .enable_model_summary = false};
  o.accumulate_grad_batches = 2;  // 15 batches per epoch: windows cut short at epoch ends
  o.val_check_interval = 0.5;
  return o;
}

// The same classifier with 16-bit parameters and activations (bf16_true, bf16_mixed,
// f16_mixed): the batch is converted on the device, the logits cast to f32 for the loss.
template <class Dev, class H = bf16>
struct half_net {
  using element_type = H;
  nn::linear<H, Dev> fc1{8, 32};
  nn::linear<H, Dev> fc2{32, 3};
  std::map<std::int64_t, float> losses;
  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
  }
  var<float, Dev> training_step(auto& ctx, const batch& b) {
    var<H, Dev> x(to_device<Dev>(b.x).template to<H>());
    auto loss = cross_entropy(ops::cast<float>(fc2(ops::relu(fc1(x)))), to_device<Dev>(b.y));
    losses[ctx.micro_batches()] = static_cast<float>(item(loss.value()));
    return loss;
  }
  auto configure_optimizers() { return optim::adamw<H, Dev>(*this, {.lr = 1e-2, .weight_decay = 0.01}); }
};

struct outcome {
  std::map<std::int64_t, float> losses;
  std::map<std::string, std::vector<float>> weights;
  train::fit_result result;
};

template <class Dev>
outcome fit(const fs::path& root, const std::string& ckpt = {}, std::uint64_t seed = 3) {
  manual_seed(seed);
  net<Dev> model;
  data_module dm;
  run<Dev> t(options(root / "runs"), every_batch{root / "all"});
  outcome o;
  o.result = t.fit(model, dm, ckpt);
  o.losses = model.losses;
  o.weights = weights(model);
  return o;
}

}  // namespace

TEST_CASE("a GPT trained on the GPU tracks the CPU run step by step (dropout, clipping, AdamW)") {
  gpt_run<cpu> host(7);
  gpt_run<gpu> dev(7);
  REQUIRE(same_bits(weights(host.model), weights(dev.model)));  // drawn on the host from one seed
  const auto c = tiny_gpt();
  float first = 0, last = 0;
  for (int s = 0; s < 40; ++s) {
    CAPTURE(s);
    const auto ids = test::random_ids(4, c.n_positions + 1, c.vocab_size / 3, 1000 + static_cast<std::uint64_t>(s));
    const float lh = host.step(ids), ld = dev.step(ids);
    // f32 on both; the GPU sums in other orders (cuBLASLt, block reductions), so the
    // trajectories drift apart slowly: 1e-3 relative per step over 40 steps.
    CHECK(std::abs(ld - lh) <= 1e-3f * std::max(1.0f, std::abs(lh)));
    if (s == 0) first = lh;
    last = lh;
  }
  CHECK(last < first - 0.5f);  // it learned (ids drawn from a third of the vocabulary)
  CHECK(max_rel_diff(weights(dev.model), weights(host.model)) < 1e-2);
}

// LoRA on both devices: the fused node (ops::lora_linear) with cuBLASLt's GEMMs against
// the host's, the same adapters drawn on the host from one seed.
template <class Dev>
struct lora_run {
  using model_t = nn::llama<ops::mask::causal, nn::recompute::none, f32, Dev, nn::adapter::lora>;
  model_t model;
  std::optional<optim::adamw<f32, Dev>> opt;
  static nn::llama_config config() {
    nn::llama_config c;
    c.vocab_size = 64;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;  // head dim 32
    c.num_key_value_heads = 1;
    c.max_position_embeddings = 32;
    return c;
  }
  explicit lora_run(std::uint64_t seed) {
    manual_seed(seed);
    model = model_t(config());
    nn::lora_config lc;
    lc.r = 8;
    lc.alpha = 16;
    lc.target_modules = {"all-linear"};
    nn::attach_lora(model, lc);
    opt.emplace(model, optim::adamw_options{.lr = 1e-2});
  }
  float step(const tensor<i64>& ids) {
    const std::int64_t B = ids.size(0), T = ids.size(1) - 1, V = config().vocab_size;
    auto x = to_device<Dev>(ids.slice(1, 0, T).contiguous()), y = to_device<Dev>(ids.slice(1, 1, T + 1).contiguous());
    auto loss = cross_entropy(reshape(model(x), shape{B * T, V}), y.reshape(shape{B * T}));
    loss.backward();
    opt->step();
    opt->zero_grad();
    return static_cast<float>(to_host(loss.value()).flat(0));
  }
};

TEST_CASE("LoRA adapters train on the GPU as on the CPU, and only the adapters move") {
  lora_run<cpu> host(11);
  lora_run<gpu> dev(11);
  REQUIRE(same_bits(weights(host.model), weights(dev.model)));
  const auto base = weights(dev.model);
  for (int s = 0; s < 10; ++s) {
    CAPTURE(s);
    const auto ids = test::random_ids(2, 17, 64, 500 + static_cast<std::uint64_t>(s));
    const float lh = host.step(ids), ld = dev.step(ids);
    CHECK(std::abs(ld - lh) <= 1e-3f * std::max(1.0f, std::abs(lh)));
  }
  CHECK(max_rel_diff(weights(dev.model), weights(host.model)) < 1e-2);
  const auto now = weights(dev.model);
  for (auto& [name, v] : base)
    if (name.find(".lora_") == std::string::npos) CHECK_MESSAGE(now.at(name) == v, name);
}

TEST_CASE("a GPT decodes on the GPU (KV cache on the device) as the same GPT does on the CPU") {
  gpt_run<cpu> host(11);
  gpt_run<gpu> dev(11);
  const auto c = tiny_gpt();
  for (int s = 0; s < 15; ++s) {  // trained a little, so its choices are not noise
    const auto ids = test::random_ids(4, c.n_positions + 1, c.vocab_size / 3, 2000 + static_cast<std::uint64_t>(s));
    host.step(ids);
    dev.step(ids);
  }
  const std::vector<std::int64_t> prompt{5, 17, 3, 29};
  nn::generation_options greedy{.max_new_tokens = 24, .greedy = true};
  const auto h = nn::generate(host.model, prompt, greedy);
  const auto d = nn::generate(dev.model, prompt, greedy);
  REQUIRE(h.tokens.size() == 24);  // 4 + 24 = 28 of 32 positions: stops on the count
  CHECK(d.tokens == h.tokens);
  CHECK(d.reason == h.reason);
  // Sampling draws from the seed's stream on the host, from the device's logits.
  nn::generation_options sampled{.max_new_tokens = 40, .temperature = 0.8f, .top_k = 20, .seed = 9};
  const auto hs = nn::generate(host.model, prompt, sampled);
  const auto ds = nn::generate(dev.model, prompt, sampled);
  CHECK(ds.reason == nn::stop_reason::context_full);
  CHECK(ds.tokens.size() == 29);  // 4 + 28 fill the 32 positions; the 29th is chosen from the last
  CHECK(ds.tokens == hs.tokens);
}

TEST_CASE("the trainer on the GPU resumes bit for bit, and its checkpoints resume a CPU run") {
  const auto root = test::temp_dir("gpu_training", "resume");
  const outcome ref = fit<gpu>(root / "ref");
  REQUIRE(ref.result.epochs == 3);
  REQUIRE(ref.losses.size() == 45);
  CHECK(ref.result.metrics.at("val/acc") > 0.6);

  // The GPU run against the CPU run from the same seed: the same trajectory within f32 drift.
  const outcome host = fit<cpu>(root / "host");
  REQUIRE(host.losses.size() == 45);
  for (auto& [i, v] : host.losses) {
    CAPTURE(i);
    CHECK(std::abs(ref.losses.at(i) - v) <= 1e-3f * std::max(1.0f, std::abs(v)));
  }

  for (std::int64_t mb : {7, 16, 31}) {
    CAPTURE(mb);
    const auto ckpt = root / "ref" / "all" / ("mb-" + std::to_string(mb) + ".ckpt");
    REQUIRE(fs::exists(ckpt));
    // Resumed on the GPU, from other initial weights and RNG: identical to the uninterrupted run.
    const outcome r = fit<gpu>(root / ("gpu-" + std::to_string(mb)), ckpt.string(), 99);
    CHECK(r.result.resumed_from == ckpt.string());
    CHECK(r.losses.size() == static_cast<std::size_t>(45 - mb));
    bool same = !r.losses.empty();
    for (auto& [i, v] : r.losses) same = same && std::memcmp(&v, &ref.losses.at(i), 4) == 0;
    CHECK(same);
    CHECK(same_bits(r.weights, ref.weights));
    // Resumed on the CPU from the GPU's checkpoint: the run continues, within f32 drift.
    const outcome h = fit<cpu>(root / ("cpu-" + std::to_string(mb)), ckpt.string(), 99);
    CHECK(h.result.global_step == ref.result.global_step);
    REQUIRE(h.losses.size() == r.losses.size());
    for (auto& [i, v] : h.losses) CHECK(std::abs(ref.losses.at(i) - v) <= 1e-3f * std::max(1.0f, std::abs(v)));
    CHECK(max_rel_diff(h.weights, ref.weights) < 1e-2);
  }
}

TEST_CASE("element conversions on the device round as the host's static_cast does") {
  // Values at bf16 and f16 rounding ties, f16 overflow, infinities. (Not subnormals, which
  // the host may flush with DAZ set, nor NaN, whose bits differ: checked apart.)
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          1.00390625f,
                          1.01171875f,
                          -1.00390625f,
                          65504.0f,
                          65520.0f,
                          3.0e38f,
                          -3.0e38f,
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()};
  const auto more = test::rand_tensor<float>(shape{1000}, 5, -70000.0, 70000.0);
  for (auto x : more.to_vector()) v.push_back(x);
  tensor<float> h(shape{static_cast<std::int64_t>(v.size())});
  std::memcpy(h.data(), v.data(), v.size() * 4);
  const auto d = to_device<gpu>(h);
  auto bits_equal = [](const auto& a, const auto& b) {
    const auto x = a.contiguous().to_vector(), y = b.contiguous().to_vector();
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0;
  };
  CHECK(bits_equal(to_host(d.to<bf16>()), h.to<bf16>()));
  CHECK(bits_equal(to_host(d.to<f16>()), h.to<f16>()));
  CHECK(bits_equal(to_host(d.to<f64>()), h.to<f64>()));
  CHECK(bits_equal(to_host(d.to<bf16>().to<f32>()), h.to<bf16>().to<f32>()));
  CHECK(bits_equal(to_host(d.to<f64>().to<f16>()), h.to<f64>().to<f16>()));
  const std::int64_t n = h.numel();
  CHECK(bits_equal(to_host(d.slice(0, 1, n, 3).to<bf16>()), h.slice(0, 1, n, 3).to<bf16>()));  // a strided view
  const auto nan = to_device<gpu>(tensor<float>::full(shape{3}, std::numeric_limits<float>::quiet_NaN()));
  for (auto x : to_host(nan.to<bf16>().to<f32>()).to_vector()) CHECK(std::isnan(x));
  for (auto x : to_host(nan.to<f16>().to<f64>()).to_vector()) CHECK(std::isnan(x));
  // The differentiable cast: its gradient converted back, overwriting (the f16 path runs
  // first in backward) then accumulating into x's gradient; the same bits on both sides.
  auto grad_of = [](auto x) {
    auto y = ops::add(ops::sum(ops::cast<float>(ops::cast<bf16>(ops::mul(x, x)))),
                      ops::scale(ops::sum(ops::cast<float>(ops::cast<f16>(x))), 0.5));
    y.backward();
    return to_host(x.grad());
  };
  const auto small = test::rand_tensor<float>(shape{64}, 6, -3.0, 3.0);
  CHECK(bits_equal(grad_of(var<float, gpu>(to_device<gpu>(small), true)), grad_of(var<float>(small, true))));
}

TEST_CASE("bf16_true on the GPU tracks bf16_true on the CPU") {
  auto fit_half = [](auto dev_tag, const fs::path& root) {
    using Dev = decltype(dev_tag);
    manual_seed(3);
    half_net<Dev> model;
    data_module dm;
    train::trainer_options o{.max_epochs = 2,
                             .seed = 3,
                             .default_root_dir = root.string(),
                             .enable_progress_bar = false,
                             .enable_model_summary = false};
    trainer<half_net<Dev>, strategy::single_device<Dev>, precision::bf16_true> t(o);
    t.fit(model, dm);
    return model.losses;
  };
  const auto root = test::temp_dir("gpu_training", "bf16");
  const auto d = fit_half(gpu{}, root / "gpu");
  const auto h = fit_half(cpu{}, root / "cpu");
  REQUIRE(d.size() == 30);
  REQUIRE(h.size() == d.size());
  for (auto& [i, v] : h) {
    CAPTURE(i);
    // bf16 keeps 8 bits: sums in another order move a loss by a few bf16 ulps.
    CHECK(std::abs(d.at(i) - v) <= 3e-2f * std::max(1.0f, std::abs(v)));
  }
  CHECK(h.rbegin()->second < h.begin()->second - 0.2f);  // it learned
}

// bf16_mixed and f16_mixed keep f32 masters beside the 16-bit model on the device: the fold
// kernel accumulates each micro-batch's gradients into them, and AdamW writes the stepped
// masters back into the model in its own pass (stochastically rounded under bf16_mixed,
// from the same counter streams as the CPU). Two micro-batches per step, a clip and a
// checkpoint after every micro-batch; the loss-scaled f16 run's loss scale grows.
template <class Policy, class H>
struct mixed_run {
  std::map<std::int64_t, float> losses;
  std::map<std::string, std::vector<float>> weights;
  train::fit_result result;
  double scale = 0;
  std::int64_t skipped = 0;
};

template <class Policy, class H, class Dev>
mixed_run<Policy, H> fit_mixed(const fs::path& root, const std::string& ckpt = {}, std::uint64_t seed = 3) {
  manual_seed(seed);
  half_net<Dev, H> model;
  data_module dm;
  train::trainer_options o{.max_epochs = 2,
                           .seed = 3,
                           .default_root_dir = (root / "runs").string(),
                           .enable_progress_bar = false,
                           .enable_model_summary = false};
  o.accumulate_grad_batches = 2;
  o.gradient_clip_val = 1.0;
  trainer<half_net<Dev, H>, strategy::single_device<Dev>, Policy, every_batch> t(o, every_batch{root / "all"});
  if constexpr (requires { t.precision().stochastic_rounding; }) t.precision().stochastic_rounding = true;
  if constexpr (Policy::scaled)  // starts too high: 5 of the 15 steps overflow, skip and halve it
    t.precision().scaler = precision::dynamic_loss_scaler({.initial_scale_power = 17, .window = 4, .hysteresis = 1});
  mixed_run<Policy, H> r;
  r.result = t.fit(model, dm, ckpt);
  r.losses = model.losses;
  r.weights = weights(t.precision().master_parameters(model));
  r.scale = t.precision().scale();
  if constexpr (Policy::scaled) r.skipped = t.precision().scaler.skipped_steps();
  return r;
}

TEST_CASE_TEMPLATE("bf16_mixed and f16_mixed on the GPU track the CPU, and resume bit for bit", P,
                   std::pair<precision::bf16_mixed, bf16>, std::pair<precision::f16_mixed<>, f16>) {
  using Policy = typename P::first_type;
  using H = typename P::second_type;
  const auto root = test::temp_dir("gpu_training", std::string("mixed_") + Policy::name);
  const auto d = fit_mixed<Policy, H, gpu>(root / "gpu");
  const auto h = fit_mixed<Policy, H, cpu>(root / "cpu");
  REQUIRE(d.losses.size() == 30);
  REQUIRE(h.losses.size() == d.losses.size());
  CHECK(d.result.global_step == h.result.global_step);
  for (auto& [i, v] : h.losses) {
    CAPTURE(i);
    // 16-bit activations: sums in another order move a loss by a few ulps of H.
    CHECK(std::abs(d.losses.at(i) - v) <= 3e-2f * std::max(1.0f, std::abs(v)));
  }
  CHECK(h.losses.rbegin()->second < h.losses.begin()->second - 0.2f);  // it learned
  CHECK(max_rel_diff(d.weights, h.weights) < 3e-2);                    // the f32 masters
  MESSAGE(std::string(Policy::name), ": ", h.skipped, " steps skipped on overflow, final scale ", h.scale);
  CHECK(d.scale == h.scale);  // f16: the same overflow history; bf16: 1
  CHECK(d.skipped == h.skipped);
  if constexpr (Policy::scaled) CHECK(h.skipped >= 2);  // the overflow path ran
  for (std::int64_t mb : {5, 18}) {
    CAPTURE(mb);
    const auto ckpt = root / "gpu" / "all" / ("mb-" + std::to_string(mb) + ".ckpt");
    REQUIRE(fs::exists(ckpt));
    const auto r = fit_mixed<Policy, H, gpu>(root / ("gpu-" + std::to_string(mb)), ckpt.string(), 99);
    CHECK(r.losses.size() == static_cast<std::size_t>(30 - mb));
    bool same = !r.losses.empty();
    for (auto& [i, v] : r.losses) same = same && std::memcmp(&v, &d.losses.at(i), 4) == 0;
    CHECK(same);
    CHECK(same_bits(r.weights, d.weights));
    CHECK(r.scale == d.scale);
    CHECK(r.skipped == d.skipped);
  }
}

TEST_CASE("the memory plan of a GPU run: model states and activations on the device, batches on the host") {
  manual_seed(3);
  half_net<gpu, bf16> model;
  data_module dm;
  trainer<half_net<gpu, bf16>, strategy::single_device<gpu>, precision::bf16_mixed> t(
      {.max_epochs = 1,
       .max_steps = 3,
       .default_root_dir = test::temp_dir("gpu_training", "plan").string(),
       .enable_progress_bar = false,
       .enable_model_summary = false});
  auto& alloc = caching_allocator<gpu>::instance();
  const auto before = static_cast<std::int64_t>(alloc.stats().in_use);
  const train::memory_plan plan = t.plan(model, dm);
  MESSAGE(plan.str());
  const std::int64_t params = 8 * 32 + 32 + 32 * 3 + 3;
  const auto& d = plan.devices.at(0);
  CHECK(d.device == std::string(gpu::name));
  CHECK(d.parameters >= params * 2);      // bf16
  CHECK(d.master_weights >= params * 8);  // f32 master + its gradient, on the device
  CHECK(d.optimizer_state >= params * 8);
  CHECK(d.activations > 0);
  std::int64_t host_batches = d.batches;
  if constexpr (!gpu::is_host) {
    REQUIRE(plan.devices.size() == 2);
    CHECK(d.batches == 0);
    CHECK(plan.devices[1].device == "cpu");
    host_batches = plan.devices[1].batches;
  } else {
    CHECK(plan.devices.size() == 1);
  }
  // x [16, 8] f32 and y [16] i64, in allocator blocks; 1 + 1 worker · prefetch 2 batches held.
  CHECK(host_batches == 3 * (train::detail::block_bytes(16 * 8 * 4) + train::detail::block_bytes(16 * 8)));
  // Against the device allocator's peak over a few steps (informational until a GPU run
  // calibrates it: the multi-tensor kernels' chunk tables are not in the plan).
  alloc.reset_peak();
  t.fit(model, dm);
  const auto measured = static_cast<std::int64_t>(alloc.stats().peak_in_use) - (before - d.parameters);
  MESSAGE("planned ", d.total(), " B on ", gpu::name, ", measured peak ", measured, " B");
  CHECK(measured > 0);
}

TEST_CASE("data::on_device delivers the loader's batches on the GPU, one ahead, from any first batch") {
  const std::int64_t n = 203;
  tensor<float> x({n, 3});
  tensor<i64> y({n});
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t c = 0; c < 3; ++c) x(i, c) = float(i) + 0.25f * float(c);
    y.data()[i] = i;
  }
  data::data_loader<data::tensor_dataset> l(data::tensor_dataset{x, y},
                                            {.batch_size = 16, .shuffle = true, .seed = 5, .num_workers = 2});
  auto on_gpu = data::on_device<gpu>(l, data::move_fields{}, {.ahead = 1});
  // What the memory plan counts: on the GPU the batch in use and the one ahead, plus a pinned
  // host copy of each; on the CPU the inner loader's 1 + 2 workers × 2 batches and the one ahead.
  CHECK(on_gpu.batches_on_device() == (gpu::is_host ? 6 : 2));
  CHECK(on_gpu.pinned_batches() == (gpu::is_host ? 0 : 2));
  for (std::int64_t first : {0, 3}) {
    CAPTURE(first);
    std::vector<std::vector<i64>> want;
    for (auto&& b : l.epoch(1, first)) want.emplace_back(b.y.data(), b.y.data() + b.size());
    std::size_t k = 0;
    for (auto&& b : on_gpu.epoch(1, first)) {
      static_assert(std::is_same_v<std::remove_cvref_t<decltype(b)>, data::labelled_batch_on<gpu>>);
      REQUIRE(k < want.size());
      const auto hy = to_host(b.y);
      const auto hx = to_host(b.x);
      CHECK(std::vector<i64>(hy.data(), hy.data() + hy.numel()) == want[k]);
      for (std::int64_t r = 0; r < hy.numel(); ++r) CHECK(hx(r, 2) == float(hy.data()[r]) + 0.5f);
      ++k;
    }
    CHECK(k == want.size());
  }
  std::int64_t seen = 0;
  for (auto&& b : on_gpu.epoch(0, 0)) {  // leaving early drops the batch in flight
    CHECK(b.size() == 16);
    if (++seen == 3) break;
  }
}
