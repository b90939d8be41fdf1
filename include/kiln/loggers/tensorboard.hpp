// kiln/loggers/tensorboard.hpp — TensorBoard event files from the trainer's metrics.
//
// Spec: a callback that writes every flushed record as scalar summaries (tag = metric
// name, step = global_step) and the hyperparameters as a text summary "hparams" (a
// Markdown table), into events.out.tfevents.* under `dir` or the trainer's run directory,
// through kiln::loggers::event_writer (record framing with masked CRC32C; see
// tensorboard_events.hpp). Flushed at each epoch end, validation end and fit end, so
// `tensorboard --logdir runs` shows a live run. Nothing is written under fast_dev_run.
#pragma once

#include <memory>
#include <string>

#include "kiln/loggers/detail.hpp"
#include "kiln/loggers/tensorboard_events.hpp"
#include "kiln/train/hooks.hpp"
#include "kiln/train/metrics.hpp"

namespace kiln::loggers {

struct tensorboard {
  using hooks = hook_list<hook::on_log, hook::on_log_hyperparams, hook::on_train_epoch_end, hook::on_validation_end,
                          hook::on_test_end, hook::on_fit_end>;
  std::string dir;

  void on_log_hyperparams(auto& ctx, const train::hparams& hp) {
    std::string md = "| name | value |\n|---|---|\n";
    for (auto& [k, v] : hp.values) md += "| " + k + " | " + v + " |\n";
    writer(ctx).add_text("hparams", md, 0);
  }
  void on_log(auto& ctx, const train::log_record& r) {
    auto& w = writer(ctx);
    for (auto& [k, v] : r.values) w.add_scalar(k, v, r.step);
  }
  void on_train_epoch_end(auto&) { flush(); }
  void on_validation_end(auto&) { flush(); }
  void on_test_end(auto&) { flush(); }
  void on_fit_end(auto&) { flush(); }

  // The event file written, once something was logged.
  std::filesystem::path path() const { return w_ ? w_->path() : std::filesystem::path(); }
  void flush() {
    if (w_) w_->flush();
  }

 private:
  event_writer& writer(auto& ctx) {
    if (!w_ || ctx_dir_ != ctx.log_dir()) {
      ctx_dir_ = ctx.log_dir();
      w_ = std::make_shared<event_writer>(detail::run_dir(dir, ctx_dir_));
    }
    return *w_;
  }
  std::shared_ptr<event_writer> w_;  // shared: callbacks are copied into the trainer
  std::string ctx_dir_;
};

}  // namespace kiln::loggers
