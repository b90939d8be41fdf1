// A small classifier written once over its element type, trained under every precision
// policy: dropout (a module-owned RNG stream), AdamW with warmup + cosine, a shuffled
// loader, accumulation over 2 micro-batches with a window of one at each epoch's end,
// logits cast to f32 for the loss (as autocast does), and loss overflows injected at
// chosen optimizer steps (f16_mixed must skip them).
#pragma once

#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>

#include "../helpers.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/train/trainer.hpp"

namespace kiln::test::prec {

using batch = data::labelled_batch;

inline data::tensor_dataset make_data(std::int64_t n, std::uint64_t seed) {
  tensor<float> x({n, 8});
  tensor<i64> y({n});
  const philox_stream st{seed, 0};
  for (std::int64_t i = 0; i < n; ++i) {
    float s = 0;
    for (int j = 0; j < 8; ++j) {
      const float v = st.uniform(static_cast<std::uint64_t>(i * 8 + j)) * 2 - 1;
      x(i, j) = v;
      s += v * float(j % 3 - 1);
    }
    y(i) = s > 0.3f ? 2 : s < -0.3f ? 0 : 1;
  }
  return {x, y};
}

template <floating_element T>
struct clf {
  nn::linear<T> fc1{8, 32};
  nn::dropout drop{0.1f};
  nn::linear<T> fc2{32, 3};
  double lr = 2e-2;
  std::int64_t total_steps = 60;
  std::map<std::int64_t, float> losses;  // micro-batch → loss
  std::set<std::int64_t> overflow_at;    // optimizer steps whose loss is made infinite

  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("drop", drop);
    f("fc2", fc2);
  }
  var<float> logits(const tensor<float>& x) {
    return ops::cast<float>(fc2(drop(ops::relu(fc1(var<T>(x.template to<T>()))))));
  }
  var<float> training_step(auto& ctx, const batch& b) {
    auto loss = cross_entropy(logits(b.x), b.y);
    if (overflow_at.count(ctx.global_step())) loss = ops::scale(loss, std::numeric_limits<double>::infinity());
    losses[ctx.micro_batches()] = loss.value().flat(0);
    ctx.log("train/loss", loss, {.on_epoch = true});
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) { ctx.log("val/loss", cross_entropy(logits(b.x), b.y)); }
  auto configure_optimizers() {
    return optim::with_schedule(optim::adamw<T>(*this, {.lr = lr, .weight_decay = 0.01}),
                                optim::warmup<optim::cosine>{.steps = 3, .then = {.total_steps = total_steps}});
  }
};

struct data_module {
  data::data_loader<data::tensor_dataset> train{make_data(240, 11),
                                                {.batch_size = 16, .shuffle = true, .seed = 5, .num_workers = 1}};
  data::data_loader<data::tensor_dataset> val{make_data(64, 12), {.batch_size = 32}};
  auto& train_loader() { return train; }
  auto& val_loader() { return val; }
};

inline train::trainer_options options(const std::filesystem::path& root, std::int64_t epochs = 2) {
  train::trainer_options o{.max_epochs = epochs,
                           .seed = 3,
                           .default_root_dir = root.string(),
                           .enable_progress_bar = false,
                           .enable_model_summary = false};
  o.accumulate_grad_batches = 2;  // 15 batches per epoch: every epoch ends with a window of one
  o.val_check_interval = 0.5;
  o.num_sanity_val_steps = 0;
  return o;
}

// Every parameter's bits, by name (for bit-exact comparisons across dtypes).
template <class M>
std::map<std::string, std::vector<std::uint8_t>> weight_bits(M& m) {
  std::map<std::string, std::vector<std::uint8_t>> out;
  nn::visit_parameters(m, [&](const std::string& name, auto& p) {
    const auto c = p.value().contiguous();
    const auto* d = reinterpret_cast<const std::uint8_t*>(c.data());
    out[name].assign(d, d + c.numel() * static_cast<std::int64_t>(sizeof(*c.data())));
  });
  return out;
}

inline std::uint32_t bits_of(float v) {
  std::uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

}  // namespace kiln::test::prec
