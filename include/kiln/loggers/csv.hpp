// kiln/loggers/csv.hpp — metrics.csv and hparams.yaml, as Lightning's CSVLogger writes them.
//
// Spec: a callback receiving the trainer's flushed metrics (hook on_log). Each record
// becomes one row "epoch,step,<metric columns...>" with empty cells for metrics the record
// does not carry; columns appear in first-logged order. The file is rewritten atomically
// (temp file, fsync, rename) at every epoch end, validation end and fit end, so a crash
// leaves the previous complete file. hparams.yaml holds the run's hyperparameters.
// Writes into `dir`, or the trainer's run directory (<default_root_dir>/version_<n>);
// writes nothing under fast_dev_run.
#pragma once

#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kiln/loggers/detail.hpp"
#include "kiln/train/hooks.hpp"
#include "kiln/train/metrics.hpp"

namespace kiln::loggers {

struct csv {
  using hooks = hook_list<hook::on_log, hook::on_log_hyperparams, hook::on_train_epoch_end, hook::on_validation_end,
                          hook::on_test_end, hook::on_fit_end>;
  std::string dir;  // empty: the trainer's run directory

  void on_log_hyperparams(auto& ctx, const train::hparams& hp) {
    std::ostringstream os;
    for (auto& [k, v] : hp.values) os << k << ": " << detail::json_string(v) << "\n";
    detail::write_atomically(where(ctx) / "hparams.yaml", os.str());
  }
  void on_log(auto& ctx, const train::log_record& r) {
    (void)where(ctx);
    row rw{r.epoch, r.step, {}};
    for (auto& [k, v] : r.values) {
      std::size_t c = column(k);
      if (rw.cells.size() <= c) rw.cells.resize(c + 1);
      rw.cells[c] = v;
    }
    rows_.push_back(std::move(rw));
  }
  void on_train_epoch_end(auto&) { flush(); }
  void on_validation_end(auto&) { flush(); }
  void on_test_end(auto&) { flush(); }
  void on_fit_end(auto&) { flush(); }

  // The file written, once something was logged.
  std::filesystem::path path() const { return path_; }

  void flush() {
    if (path_.empty() || rows_.empty()) return;
    std::ostringstream os;
    os.precision(9);
    os << "epoch,step";
    for (auto& c : columns_) os << ',' << detail::csv_field(c);
    os << '\n';
    for (auto& r : rows_) {
      os << r.epoch << ',' << r.step;
      for (std::size_t c = 0; c < columns_.size(); ++c) {
        os << ',';
        if (c < r.cells.size() && r.cells[c]) os << *r.cells[c];
      }
      os << '\n';
    }
    detail::write_atomically(path_, os.str());
  }

 private:
  struct row {
    std::int64_t epoch, step;
    std::vector<std::optional<double>> cells;
  };
  std::filesystem::path where(auto& ctx) {
    if (dir_.empty() || ctx_dir_ != ctx.log_dir()) {
      ctx_dir_ = ctx.log_dir();
      dir_ = detail::run_dir(dir, ctx_dir_);
      path_ = dir_ / "metrics.csv";
    }
    return dir_;
  }
  std::size_t column(const std::string& k) {
    for (std::size_t i = 0; i < columns_.size(); ++i)
      if (columns_[i] == k) return i;
    columns_.push_back(k);
    return columns_.size() - 1;
  }
  std::vector<std::string> columns_;
  std::vector<row> rows_;
  std::string ctx_dir_;
  std::filesystem::path dir_, path_;
};

}  // namespace kiln::loggers
