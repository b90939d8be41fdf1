// A small run that exercises everything a resume must restore: dropout (a module-owned
// RNG stream), AdamW with warmup + cosine (optimizer state, schedule), a shuffled loader
// (sampler position), gradient accumulation over an odd number of batches (an open window
// and a cut-short one), validation twice per epoch, early stopping and model_checkpoint
// state. Shared by the in-process tests and the process that gets SIGKILLed.
#pragma once

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>

#include "kiln/callbacks/early_stopping.hpp"
#include "kiln/callbacks/model_checkpoint.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

namespace kiln::test::resume {

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

struct net {
  nn::linear<float> fc1{8, 32};
  nn::dropout drop{0.2f};
  nn::linear<float> fc2{32, 3};
  std::int64_t total_steps = 100;
  std::map<std::int64_t, float> losses;  // micro-batch index → loss

  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("drop", drop);
    f("fc2", fc2);
  }
  var<float> forward(const tensor<float>& x) { return fc2(drop(ops::relu(fc1(var<float>(x))))); }
  var<float> training_step(auto& ctx, const batch& b) {
    auto loss = cross_entropy(forward(b.x), b.y);
    losses[ctx.micro_batches()] = loss.value().flat(0);
    ctx.log("train/loss", loss, {.on_epoch = true});
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) { ctx.log("val/loss", cross_entropy(forward(b.x), b.y)); }
  auto configure_optimizers() {
    return optim::with_schedule(optim::adamw<float>(*this, {.lr = 3e-2, .weight_decay = 0.01}),
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

using run =
    trainer<net, strategy::single_device<cpu>, precision::fp32, callbacks::early_stopping, callbacks::model_checkpoint>;

inline train::trainer_options options(const std::filesystem::path& root, std::int64_t epochs = 3) {
  train::trainer_options o{.max_epochs = epochs,
                           .seed = 3,
                           .default_root_dir = root.string(),
                           .enable_progress_bar = false,
                           .enable_model_summary = false};
  o.accumulate_grad_batches = 2;  // 15 batches per epoch: every epoch ends with a window of one
  o.val_check_interval = 0.5;     // validate twice per epoch
  return o;
}
inline callbacks::early_stopping stopper() {
  return callbacks::early_stopping(
      {.monitor = "val/loss", .patience = 50, .verbose = false, .restore_best_weights = true});
}
inline callbacks::model_checkpoint saver(const std::filesystem::path& dir) {
  return callbacks::model_checkpoint({.dirpath = dir.string(),
                                      .filename = "{epoch}-{step}-{val/loss:.4f}",
                                      .monitor = "val/loss",
                                      .save_top_k = 2,
                                      .save_last = true,
                                      .every_n_train_steps = 3});
}

// Losses as exact bit patterns, one "index hex" line each.
inline void write_losses(const std::map<std::int64_t, float>& l, const std::filesystem::path& p) {
  std::FILE* f = std::fopen(p.c_str(), "w");
  for (auto& [i, v] : l) {
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    std::fprintf(f, "%lld %08x\n", static_cast<long long>(i), bits);
  }
  std::fclose(f);
}
inline std::map<std::int64_t, std::uint32_t> read_losses(const std::filesystem::path& p) {
  std::map<std::int64_t, std::uint32_t> out;
  std::FILE* f = std::fopen(p.c_str(), "r");
  if (!f) return out;
  long long i;
  unsigned bits;
  while (std::fscanf(f, "%lld %x", &i, &bits) == 2) out[i] = bits;
  std::fclose(f);
  return out;
}

}  // namespace kiln::test::resume
