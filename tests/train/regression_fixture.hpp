// A tiny regression problem for trainer and callback tests: y = x · w + b in f64, batches
// in a vector, a linear module that records what the loop did to it.
#pragma once

#include <string>
#include <vector>

#include "../helpers.hpp"
#include "kiln/train/trainer.hpp"

namespace kiln::test {

// A regression batch: y = x · w_true + noise, in f64 so gradient comparisons can be tight.
struct reg_batch {
  tensor<f64> x, y;
  std::int64_t size() const { return x.size(0); }
};

inline reg_batch make_batch(std::int64_t n, std::uint64_t seed) {
  reg_batch b{rand_tensor<f64>({n, 3}, seed), tensor<f64>({n, 1})};
  for (std::int64_t i = 0; i < n; ++i) b.y(i, 0) = 0.5 * b.x(i, 0) - 1.5 * b.x(i, 1) + 0.25 * b.x(i, 2) + 0.1;
  return b;
}

// A loader over a fixed vector of batches (the trainer only needs size() and epoch()).
struct vec_loader {
  std::vector<reg_batch> batches;
  std::int64_t size() const { return static_cast<std::int64_t>(batches.size()); }
  struct range {
    const std::vector<reg_batch>* v;
    std::int64_t first;
    auto begin() const { return v->begin() + first; }
    auto end() const { return v->end(); }
  };
  range epoch(std::int64_t, std::int64_t first) const { return {&batches, first}; }
};

inline vec_loader make_loader(std::vector<std::int64_t> sizes, std::uint64_t seed = 1) {
  vec_loader l;
  for (std::size_t i = 0; i < sizes.size(); ++i) l.batches.push_back(make_batch(sizes[i], seed + i));
  return l;
}

// The hook trace shared by the recording module and callback.
inline std::vector<std::string>* trace = nullptr;
inline void note(const std::string& s) {
  if (trace) trace->push_back(s);
}

struct regressor {
  nn::linear<f64> lin{3, 1};
  double lr = 0.05;
  std::vector<double> losses;
  bool saw_grad_in_eval = false;

  template <class F>
  void for_each_child(F&& f) {
    f("lin", lin);
  }
  var<f64> training_step(auto& ctx, const reg_batch& b) {
    note("training_step");
    auto loss = mse(lin(var<f64>(b.x)), var<f64>(b.y));
    ctx.log("train/loss", loss, {.prog_bar = true});
    losses.push_back(loss.value().flat(0));
    return loss;
  }
  void validation_step(auto& ctx, const reg_batch& b) {
    note("validation_step");
    saw_grad_in_eval |= autograd::grad_enabled();
    ctx.log("val/loss", mse(lin(var<f64>(b.x)), var<f64>(b.y)));
  }
  void test_step(auto& ctx, const reg_batch& b) { ctx.log("test/loss", mse(lin(var<f64>(b.x)), var<f64>(b.y))); }
  double predict_step(auto&, const reg_batch& b) { return lin(var<f64>(b.x)).value()(0, 0); }
  auto configure_optimizers() { return optim::sgd<f64>(*this, {.lr = lr}); }

  // Module hooks: detected without declaration.
  void on_fit_start(auto&) { note("module.on_fit_start"); }
  void on_train_epoch_end(auto&) { note("module.on_train_epoch_end"); }
  void on_validation_end(auto&) { note("module.on_validation_end"); }
};

}  // namespace kiln::test
