// kiln/train/metrics.hpp — what ctx.log() records, and how values become logged rows.
//
// Spec: ctx.log(name, value, options) records a scalar under `name`.
//   - on_step: the value is emitted as it is, at the current global_step (training only),
//     every log_every_n_steps optimizer steps.
//   - on_epoch: the values of an epoch are reduced — mean (weighted by the batch's item
//     count, as Lightning weights by batch size), sum, max or min — and emitted once at
//     the end of the training epoch or of the evaluation loop.
//   - defaults follow Lightning: inside training, on_step = true, on_epoch = false; inside
//     validation/test, on_step = false, on_epoch = true; in epoch-end hooks the value is
//     taken as an epoch value directly. When both are set the names get "_step" and
//     "_epoch" suffixes, as in Lightning.
//   - prog_bar shows the value in the progress bar; logger = false keeps it out of loggers.
// callback_metrics() holds the latest value of every metric (what early_stopping and
// model_checkpoint monitor), progress_bar_metrics() the prog_bar subset.
// Ensures: names are stable, emission order is deterministic (insertion order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kiln/core/error.hpp"
#include "kiln/strategy/reduce.hpp"

namespace kiln::train {

// How an epoch's values, and sync_dist values across ranks, combine (kiln/strategy/reduce.hpp).
using reduce = strategy::reduce;

struct log_options {
  std::optional<bool> on_step;   // default from where log() is called
  std::optional<bool> on_epoch;  // default from where log() is called
  reduce reduction = reduce::mean;
  bool prog_bar = false;
  bool logger = true;
  std::optional<double> batch_size;  // weight for the epoch mean; default: the batch's item count
  bool sync_dist = false;            // reduce across ranks (a no-op on single_device)
};

// One row handed to loggers: values at a step.
struct log_record {
  std::int64_t step = 0;
  std::int64_t epoch = 0;
  std::vector<std::pair<std::string, double>> values;
};

// Hyperparameters as printable key/value pairs (trainer options, module's hparams()).
struct hparams {
  std::vector<std::pair<std::string, std::string>> values;
};

// Where log() is being called from; decides the on_step/on_epoch defaults.
enum class log_phase { train_step, eval_step, epoch_end, other };

// The latest value of every metric, shared by the training and evaluation stores.
struct metric_board {
  std::map<std::string, double> latest;
  std::vector<std::pair<std::string, double>> bar;  // prog_bar subset, in first-logged order
  void set(const std::string& n, double v, bool prog_bar) {
    latest[n] = v;
    if (!prog_bar) return;
    for (auto& [k, x] : bar)
      if (k == n) {
        x = v;
        return;
      }
    bar.emplace_back(n, v);
  }
  void clear() {
    latest.clear();
    bar.clear();
  }
};

class metric_store {
 public:
  explicit metric_store(metric_board& board) : board_(&board) {}

  struct entry {
    std::string name;
    reduce reduction = reduce::mean;
    bool on_step = false, on_epoch = false, prog_bar = false, logger = true;
    double step_value = 0;
    bool step_pending = false;
    double acc = 0, weight = 0;
    bool has_epoch_value = false;
  };

  void log(const std::string& name, double value, const log_options& o, log_phase phase, double default_weight) {
    KILN_CHECK(!name.empty(), "log: metric name must not be empty");
    const bool in_train = phase == log_phase::train_step;
    const bool in_eval = phase == log_phase::eval_step;
    const bool on_step = o.on_step.value_or(in_train) && in_train;
    const bool on_epoch = phase == log_phase::epoch_end || phase == log_phase::other || o.on_epoch.value_or(in_eval);
    KILN_CHECK(on_step || on_epoch, "log('", name, "'): on_step and on_epoch are both false; nothing would be logged");
    entry& e = find_or_add(name);
    if (e.weight == 0 && !e.step_pending) {
      e.reduction = o.reduction;
      e.on_step = on_step;
      e.on_epoch = on_epoch;
      e.prog_bar = o.prog_bar;
      e.logger = o.logger;
    } else {
      KILN_CHECK(e.reduction == o.reduction, "log('", name, "'): logged with two different reductions in one epoch");
    }
    const bool both = on_step && on_epoch;
    if (on_step) {
      e.step_value = value;
      e.step_pending = true;
      set_latest(both ? name + "_step" : name, value, e.prog_bar);
    }
    if (on_epoch) {
      if (phase == log_phase::epoch_end || phase == log_phase::other) {
        // An epoch value given directly: replace.
        e.acc = value;
        e.weight = 1;
        e.reduction = reduce::mean;
        set_latest(name, value, e.prog_bar);  // visible at once to the hooks that follow
      } else {
        const double w = o.batch_size.value_or(default_weight);
        switch (e.reduction) {
          case reduce::mean:
            e.acc += value * w;
            e.weight += w;
            break;
          case reduce::sum:
            e.acc += value;
            e.weight = 1;
            break;
          case reduce::max:
            e.acc = e.weight == 0 ? value : std::max(e.acc, value);
            e.weight = 1;
            break;
          case reduce::min:
            e.acc = e.weight == 0 ? value : std::min(e.acc, value);
            e.weight = 1;
            break;
        }
      }
    }
  }

  // The step values logged since the last call (for loggers), and clears them.
  std::vector<std::pair<std::string, double>> take_step_values() {
    std::vector<std::pair<std::string, double>> out;
    for (auto& e : entries_)
      if (e.step_pending) {
        if (e.logger) out.emplace_back(e.on_epoch ? e.name + "_step" : e.name, e.step_value);
        e.step_pending = false;
      }
    return out;
  }
  void drop_step_values() {
    for (auto& e : entries_) e.step_pending = false;
  }

  // Reduces the epoch accumulators into callback metrics, returns the loggable values,
  // and resets the accumulators.
  std::vector<std::pair<std::string, double>> close_epoch() {
    std::vector<std::pair<std::string, double>> out;
    for (auto& e : entries_) {
      if (!e.on_epoch || e.weight == 0) continue;
      const double v = e.reduction == reduce::mean ? e.acc / e.weight : e.acc;
      const std::string n = e.on_step ? e.name + "_epoch" : e.name;
      set_latest(n, v, e.prog_bar);
      if (e.on_step) set_latest(e.name, v, false);
      if (e.logger) out.emplace_back(n, v);
      e.acc = 0;
      e.weight = 0;
    }
    return out;
  }

  // Every accumulator, for checkpoints; restore() puts them back (a resumed epoch's means
  // include the batches before the checkpoint).
  const std::vector<entry>& entries() const { return entries_; }
  void restore(std::vector<entry> entries) { entries_ = std::move(entries); }

  // Removes every accumulator (entries are re-created by the next log()).
  void reset_entries() { entries_.clear(); }

  bool has_pending_epoch_values() const {
    for (auto& e : entries_)
      if (e.on_epoch && e.weight != 0) return true;
    return false;
  }

 private:
  entry& find_or_add(const std::string& name) {
    for (auto& e : entries_)
      if (e.name == name) return e;
    entries_.push_back({});
    entries_.back().name = name;
    return entries_.back();
  }
  void set_latest(const std::string& n, double v, bool prog_bar) { board_->set(n, v, prog_bar); }

  metric_board* board_;
  std::vector<entry> entries_;
};

}  // namespace kiln::train
