// kiln/callbacks/timer.hpp — stop after a wall-clock budget, and report where time went.
//
// Spec (Lightning's Timer): checks after every training batch (interval step) or every
// epoch (interval epoch) whether `duration` has elapsed since fit started and stops the
// fit gracefully if so. Records the seconds spent in each stage's loops
// (train / validation / test), readable through time_elapsed(). Setting
// trainer_options::max_time gives the same stop without the bookkeeping.
#pragma once

#include <chrono>
#include <string>

#include "kiln/train/context.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

struct timer {
  using hooks = hook_list<hook::on_train_batch_end, hook::on_train_epoch_end, hook::on_train_start, hook::on_train_end,
                          hook::on_validation_start, hook::on_validation_end, hook::on_test_start, hook::on_test_end>;
  std::chrono::duration<double> duration{0};  // 0: no limit, only measure
  enum class interval { step, epoch } check = interval::step;

  double train_seconds = 0, validation_seconds = 0, test_seconds = 0;

  timer() = default;
  explicit timer(std::chrono::duration<double> d, interval i = interval::step) : duration(d), check(i) {}

  double time_elapsed(train::loop_kind k) const {
    switch (k) {
      case train::loop_kind::train:
        return train_seconds;
      case train::loop_kind::validation:
        return validation_seconds;
      case train::loop_kind::test:
        return test_seconds;
      default:
        return 0;
    }
  }

  void on_train_start(auto&) { t_train_ = now(); }
  void on_train_end(auto&) { train_seconds += since(t_train_); }
  void on_validation_start(auto&) { t_eval_ = now(); }
  void on_validation_end(auto&) { validation_seconds += since(t_eval_); }
  void on_test_start(auto&) { t_eval_ = now(); }
  void on_test_end(auto&) { test_seconds += since(t_eval_); }
  void on_train_batch_end(auto& ctx, const auto&) {
    if (check == interval::step) maybe_stop(ctx);
  }
  void on_train_epoch_end(auto& ctx) {
    if (check == interval::epoch) maybe_stop(ctx);
  }

 private:
  using clock = std::chrono::steady_clock;
  static clock::time_point now() { return clock::now(); }
  static double since(clock::time_point t) { return std::chrono::duration<double>(now() - t).count(); }
  void maybe_stop(auto& ctx) {
    if (duration.count() > 0 && ctx.elapsed_seconds() >= duration.count())
      ctx.stop("timer: " + std::to_string(duration.count()) + " s elapsed");
  }
  clock::time_point t_train_{}, t_eval_{};
};

}  // namespace kiln::callbacks
