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
#include "../io/resume_fixture.hpp"

namespace kiln::test::prec {

using resume::batch;

// The data, loaders and loop options of the resume fixture (tests/io/resume_fixture.hpp).
using resume::data_module;

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

inline train::trainer_options options(const std::filesystem::path& root, std::int64_t epochs = 2) {
  auto o = resume::options(root, epochs);  // accumulation over 2 of 15 batches, validation twice per epoch
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
