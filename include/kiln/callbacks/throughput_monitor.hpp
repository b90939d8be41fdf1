// kiln/callbacks/throughput_monitor.hpp — training speed as metrics.
//
// Spec: measures wall time from one on_train_batch_end to the next (so data loading,
// the step and every hook are included — what a user waits for) and logs, every
// `window` batches, "throughput/samples_per_sec" over the window and, when batches have
// tokens() (a count), "throughput/tokens_per_sec"; at each training epoch end
// "throughput/epoch_samples_per_sec" over the whole epoch. Items per batch are
// kiln::train::batch_items(batch).
#pragma once

#include <chrono>

#include "kiln/core/error.hpp"
#include "kiln/train/concepts.hpp"
#include "kiln/train/hooks.hpp"
#include "kiln/train/metrics.hpp"

namespace kiln::callbacks {

struct throughput_monitor {
  using hooks = hook_list<hook::on_train_epoch_start, hook::on_train_batch_end, hook::on_train_epoch_end>;
  std::int64_t window = 50;

  explicit throughput_monitor(std::int64_t window_batches = 50) : window(window_batches) {
    KILN_CHECK(window >= 1, "throughput_monitor: window = ", window, " batches, expected >= 1");
  }

  void on_train_epoch_start(auto&) {
    epoch_start_ = window_start_ = clock::now();
    epoch_items_ = window_items_ = window_tokens_ = 0;
    in_window_ = 0;
  }
  void on_train_batch_end(auto& ctx, const auto& b) {
    const double items = train::batch_items(b);
    epoch_items_ += items;
    window_items_ += items;
    if constexpr (requires { b.tokens(); }) window_tokens_ += static_cast<double>(b.tokens());
    if (++in_window_ < window) return;
    const auto now = clock::now();
    const double s = std::chrono::duration<double>(now - window_start_).count();
    if (s > 0) {
      ctx.log("throughput/samples_per_sec", window_items_ / s, {.on_step = true, .on_epoch = false});
      if constexpr (requires { b.tokens(); })
        ctx.log("throughput/tokens_per_sec", window_tokens_ / s, {.on_step = true, .on_epoch = false});
    }
    window_start_ = now;
    window_items_ = window_tokens_ = 0;
    in_window_ = 0;
  }
  void on_train_epoch_end(auto& ctx) {
    const double s = std::chrono::duration<double>(clock::now() - epoch_start_).count();
    if (s > 0 && epoch_items_ > 0) ctx.log("throughput/epoch_samples_per_sec", epoch_items_ / s);
  }

 private:
  using clock = std::chrono::steady_clock;
  clock::time_point epoch_start_{}, window_start_{};
  double epoch_items_ = 0, window_items_ = 0, window_tokens_ = 0;
  std::int64_t in_window_ = 0;
};

}  // namespace kiln::callbacks
