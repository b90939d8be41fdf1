// kiln/callbacks/learning_rate_monitor.hpp — logs every optimizer group's learning rate.
//
// Spec (Lightning's LearningRateMonitor): logs "lr-<optimizer>" for a single-group
// optimizer and "lr-<optimizer>/pg<i>" for each group of a multi-group one, where
// <optimizer> is the optimizer's kind (adamw, sgd) suffixed with "-<index>" when the
// module has several optimizers. logging_interval step logs at every optimizer step
// (when the trainer flushes step metrics), epoch logs once per training epoch.
#pragma once

#include <string>

#include "kiln/optim/schedule.hpp"
#include "kiln/train/hooks.hpp"
#include "kiln/train/metrics.hpp"

namespace kiln::callbacks {

struct learning_rate_monitor {
  using hooks = hook_list<hook::on_train_batch_start, hook::on_train_epoch_start>;
  optim::interval logging_interval = optim::interval::step;

  void on_train_batch_start(auto& ctx, const auto&) {
    if (logging_interval == optim::interval::step) log_all(ctx, train::log_options{.on_step = true, .on_epoch = false});
  }
  void on_train_epoch_start(auto& ctx) {
    if (logging_interval == optim::interval::epoch) log_all(ctx, train::log_options{});
  }

 private:
  template <class O>
  static std::string kind() {
    if constexpr (requires { O::kind; })
      return std::string(O::kind);
    else
      return "optimizer";
  }
  void log_all(auto& ctx, const train::log_options& o) {
    const std::size_t n = ctx.num_optimizers();
    ctx.for_each_optimizer([&](std::size_t i, auto& opt) {
      std::string base = "lr-" + kind<std::remove_cvref_t<decltype(opt)>>();
      if (n > 1) base += "-" + std::to_string(i);
      if (opt.num_groups() == 1) {
        ctx.log(base, opt.lr(0), o);
      } else {
        for (std::size_t g = 0; g < opt.num_groups(); ++g) ctx.log(base + "/pg" + std::to_string(g), opt.lr(g), o);
      }
    });
  }
};

}  // namespace kiln::callbacks
