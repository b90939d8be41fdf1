// kiln/callbacks/progress_bar.hpp — where the run is, how fast, and its metrics.
//
// Spec: on a terminal (isatty of the stream, or force_tty) one line redrawn with '\r' at
// most every refresh_seconds and at the end of each loop:
//   "epoch 3/5 train [#########-----------]  312/430  387 it/s  ETA 0:00:03  train/loss=0.412 val/acc=0.87"
// and a newline after each training epoch so its final line stays, as Lightning's bar
// does. Otherwise (a log file, CI) plain lines: one per training epoch, one per
// validation, test or predict run. Metrics shown are those logged with prog_bar = true.
// Does nothing when trainer_options::enable_progress_bar is false, or in fast loops
// between redraws beyond one clock read.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

#include "kiln/train/context.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

struct progress_bar_options {
  double refresh_seconds = 0.1;
  std::FILE* stream = nullptr;  // nullptr: stdout
  int force_tty = -1;           // -1: detect; 0: plain lines; 1: live bar
  int width = 20;               // bar cells
};

struct progress_bar {
  using hooks = hook_list<hook::on_train_epoch_start, hook::on_train_batch_end, hook::on_train_epoch_end,
                          hook::on_validation_start, hook::on_validation_batch_end, hook::on_validation_end,
                          hook::on_test_start, hook::on_test_batch_end, hook::on_test_end, hook::on_predict_start,
                          hook::on_predict_batch_end, hook::on_predict_end>;
  progress_bar_options options;

  progress_bar() = default;
  explicit progress_bar(progress_bar_options o) : options(o) {}

  void on_train_epoch_start(auto& ctx) { start_loop(ctx); }
  void on_train_batch_end(auto& ctx, const auto&) { tick(ctx); }
  void on_train_epoch_end(auto& ctx) { end_loop(ctx, true); }
  void on_validation_start(auto& ctx) { start_loop(ctx); }
  void on_validation_batch_end(auto& ctx, const auto&) { tick(ctx); }
  void on_validation_end(auto& ctx) { end_loop(ctx, ctx.current_stage() != train::stage::fit || !tty()); }
  void on_test_start(auto& ctx) { start_loop(ctx); }
  void on_test_batch_end(auto& ctx, const auto&) { tick(ctx); }
  void on_test_end(auto& ctx) { end_loop(ctx, true); }
  void on_predict_start(auto& ctx) { start_loop(ctx); }
  void on_predict_batch_end(auto& ctx, const auto&) { tick(ctx); }
  void on_predict_end(auto& ctx) { end_loop(ctx, true); }

 private:
  using clock = std::chrono::steady_clock;
  std::FILE* out() const { return options.stream ? options.stream : stdout; }
  bool tty() const { return options.force_tty >= 0 ? options.force_tty == 1 : ::isatty(::fileno(out())) != 0; }

  // Only global rank 0 draws (every rank would print the same bar).
  static bool shown(auto& ctx) { return ctx.options().enable_progress_bar && ctx.is_global_zero(); }
  void start_loop(auto& ctx) {
    if (!shown(ctx)) return;
    (ctx.loop() == train::loop_kind::train ? t_train_ : t_eval_) = last_ = clock::now();
  }
  void tick(auto& ctx) {
    if (!shown(ctx) || !tty()) return;
    const auto now = clock::now();
    if (std::chrono::duration<double>(now - last_).count() < options.refresh_seconds) return;
    last_ = now;
    draw(ctx, ctx.batch_idx() + 1);
  }
  void end_loop(auto& ctx, bool newline) {
    if (!shown(ctx)) return;
    const std::int64_t done = ctx.loop() == train::loop_kind::train ? ctx.batch_idx() : ctx.loop_batches();
    if (tty()) {
      draw(ctx, std::max<std::int64_t>(done, ctx.batch_idx()));
      if (newline) std::fputc('\n', out());
    } else {
      std::fprintf(out(), "%s\n", line(ctx, std::max<std::int64_t>(done, ctx.batch_idx()), false).c_str());
    }
    std::fflush(out());
  }
  void draw(auto& ctx, std::int64_t done) {
    std::fprintf(out(), "\r%s\x1b[K", line(ctx, done, true).c_str());
    std::fflush(out());
  }

  static std::string hms(double s) {
    if (!std::isfinite(s) || s < 0) return "?";
    const long t = static_cast<long>(s + 0.5);
    char b[32];
    std::snprintf(b, sizeof b, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    return b;
  }
  std::string line(auto& ctx, std::int64_t done, bool live) const {
    const auto t0 = ctx.loop() == train::loop_kind::train ? t_train_ : t_eval_;
    const double secs = std::chrono::duration<double>(clock::now() - t0).count();
    const std::int64_t total = ctx.loop_batches();
    const double rate = secs > 0 ? double(done) / secs : 0;
    char buf[160];
    std::string s;
    const std::int64_t max_epochs = ctx.options().effective_max_epochs();
    if (ctx.current_stage() == train::stage::fit) {
      const std::string me = max_epochs >= 0 ? std::to_string(max_epochs) : std::string("?");
      std::snprintf(buf, sizeof buf, "epoch %lld/%s ", static_cast<long long>(ctx.epoch() + 1), me.c_str());
      s += buf;
    }
    s += train::loop_name(ctx.loop());
    if (live) {
      const int w = options.width;
      const int filled = total > 0 ? static_cast<int>(double(w) * double(std::min(done, total)) / double(total)) : 0;
      s += " [" + std::string(static_cast<std::size_t>(filled), '#') +
           std::string(static_cast<std::size_t>(w - filled), '-') + "]";
      std::snprintf(buf, sizeof buf, " %lld/%lld  %.0f it/s  ETA %s", static_cast<long long>(done),
                    static_cast<long long>(total), rate, hms(rate > 0 ? double(total - done) / rate : NAN).c_str());
    } else {
      std::snprintf(buf, sizeof buf, ": %lld batches in %.2f s (%.0f it/s)", static_cast<long long>(done), secs, rate);
    }
    s += buf;
    for (auto& [k, v] : ctx.progress_bar_metrics()) {
      std::snprintf(buf, sizeof buf, " %s=%.4g", k.c_str(), v);
      s += buf;
    }
    return s;
  }

  clock::time_point t_train_{}, t_eval_{}, last_{};
};

}  // namespace kiln::callbacks
