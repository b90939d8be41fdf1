// A small classification run shared by the multi-rank tests: the same global batch on
// one rank (single_device, batch B) and on W ranks (batch B / W each), so the loss
// trajectories and final weights can be compared.
#pragma once

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "../io/resume_fixture.hpp"
#include "kiln/callbacks/model_checkpoint.hpp"
#include "kiln/comm/mpi.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/kiln.hpp"
#include "kiln/nn/unit.hpp"
#include "kiln/strategy/ddp.hpp"
#include "kiln/strategy/zero.hpp"
#include "kiln/train/trainer.hpp"

namespace kiln::test::dist {

using batch = data::labelled_batch;
constexpr std::int64_t global_batch = 12;  // divisible by 1, 2, 3 and 4 ranks
constexpr std::int64_t samples = 240;

// The resume fixture's synthetic 3-class data (8 features).
using resume::make_data;

// Units = true wraps each layer in an nn::unit (zero<3> gathers them one at a time);
// the parameter names, initial weights and the computation are the same.
template <class T = float, bool Units = false>
struct net {
  using layer = std::conditional_t<Units, nn::unit<nn::linear<T>>, nn::linear<T>>;
  layer fc1{8, 32};
  layer fc2{32, 3};
  // Per forward, between the two layers: whether fc1's and fc2's weights were in memory.
  std::vector<std::pair<bool, bool>> resident_between;
  int stop_rank = -1;  // this rank alone asks the loop to stop at optimizer step stop_at
  std::int64_t stop_at = -1;
  std::vector<double> losses;  // per optimizer step: this rank's mean loss over its batch

  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
  }
  var<float> forward(const tensor<float>& x) {
    if constexpr (Units) {
      static_assert(std::is_same_v<T, float>, "the unit variant is f32");
      auto h = ops::relu(fc1(var<float>(x)));
      resident_between.emplace_back(fc1.weight.value().storage_resident(), fc2.weight.value().storage_resident());
      return fc2(h);
    } else if constexpr (std::is_same_v<T, float>)
      return fc2(ops::relu(fc1(var<float>(x))));
    else
      return ops::cast<float>(fc2(ops::relu(fc1(var<T>(x.template to<T>())))));
  }
  std::vector<std::int64_t> resident_bytes;  // per training_step: parameter bytes in memory as it began
  var<float> training_step(auto& ctx, const batch& b) {
    std::int64_t bytes = 0;
    nn::visit_parameters(*this, [&](const std::string&, auto& p) {
      if (p.value().storage_resident()) bytes += static_cast<std::int64_t>(p.value().storage_bytes());
    });
    resident_bytes.push_back(bytes);
    auto loss = cross_entropy(forward(b.x), b.y);
    losses.push_back(static_cast<double>(loss.value().flat(0)));
    if (ctx.global_rank() == stop_rank && ctx.global_step() == stop_at) ctx.stop("rank-local stop");
    ctx.log("train/loss", loss, {.on_epoch = true, .sync_dist = true});
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) {
    ctx.log("val/loss", cross_entropy(forward(b.x), b.y), {.sync_dist = true});
  }
  auto configure_optimizers() {
    return optim::with_schedule(optim::adamw<T>(*this, {.lr = 2e-2, .weight_decay = 0.01}),
                                optim::warmup<optim::cosine>{.steps = 3, .then = {.total_steps = 60}});
  }
};

struct data_module {
  data::data_loader<data::tensor_dataset> train, val;
  explicit data_module(std::int64_t batch)
      : train(make_data(samples, 11), {.batch_size = batch, .shuffle = true, .seed = 5}),
        val(make_data(48, 12), {.batch_size = 8}) {}
  auto& train_loader() { return train; }
  auto& val_loader() { return val; }
};

inline train::trainer_options options(const std::filesystem::path& root, std::int64_t epochs = 2) {
  return {.max_epochs = epochs,
          .seed = 3,
          .default_root_dir = root.string(),
          .enable_progress_bar = false,
          .enable_model_summary = false};
}

// Every parameter value, flattened in visit order.
template <class M>
std::vector<double> weights(M& m) {
  std::vector<double> out;
  nn::visit_parameters(m, [&](const std::string&, auto& p) {
    for (std::int64_t i = 0; i < p.numel(); ++i) out.push_back(static_cast<double>(p.value().flat(i)));
  });
  return out;
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

// The mean over ranks of each rank's per-step losses: the loss of the global batch.
template <class C>
std::vector<double> global_losses(C& comm, std::vector<double> local) {
  comm.all_reduce(local.data(), static_cast<std::int64_t>(local.size()), comm::op::sum, "test: losses");
  for (auto& v : local) v /= comm.world_size();
  return local;
}

}  // namespace kiln::test::dist
