// kiln/callbacks/early_stopping.hpp — stop when a monitored metric stops improving.
//
// Spec (PyTorch Lightning's EarlyStopping): after each validation (on_validation_end),
// or at each training epoch end when check_on_train_epoch_end is set, reads `monitor`
// from ctx.callback_metrics(). An improvement is a change beyond min_delta in the
// direction of `mode`; `patience` checks without one stop the fit. stopping_threshold
// stops as soon as the metric reaches it; divergence_threshold stops when it goes past it
// the wrong way; check_finite stops on NaN/inf. A missing metric is an error naming the
// metric and the ones that were logged (strict = true), else the check is skipped.
// It is a monitoring callback: it runs after the module and the other callbacks at epoch
// end, so metrics logged there are seen. State (wait_count, best_score, stopped_epoch)
// is public for checkpoints.
#pragma once

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>

#include "kiln/core/error.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

enum class mode { min, max };

struct early_stopping_options {
  std::string monitor = "val/loss";
  callbacks::mode mode = mode::min;
  double min_delta = 0.0;
  std::int64_t patience = 3;
  std::optional<double> stopping_threshold;
  std::optional<double> divergence_threshold;
  bool check_finite = true;
  bool check_on_train_epoch_end = false;
  bool strict = true;
  bool verbose = true;
};

struct early_stopping {
  static constexpr bool monitors = true;
  using hooks = hook_list<hook::on_validation_end, hook::on_train_epoch_end>;

  early_stopping_options options;
  // State.
  std::int64_t wait_count = 0;
  double best_score = std::numeric_limits<double>::quiet_NaN();
  std::int64_t stopped_epoch = -1;
  std::string reason;

  early_stopping() = default;
  explicit early_stopping(early_stopping_options o) : options(std::move(o)) {
    KILN_CHECK(!options.monitor.empty(), "early_stopping: monitor must name a metric");
    KILN_CHECK(options.patience >= 0, "early_stopping: patience = ", options.patience, ", expected >= 0");
    KILN_CHECK(options.min_delta >= 0, "early_stopping: min_delta = ", options.min_delta, ", expected >= 0");
  }

  void on_validation_end(auto& ctx) {
    if (!options.check_on_train_epoch_end && !ctx.sanity_checking()) check(ctx);
  }
  void on_train_epoch_end(auto& ctx) {
    if (options.check_on_train_epoch_end) check(ctx);
  }

  // Evaluates one value; returns the reason to stop, or an empty string.
  std::string evaluate(double current) {
    const bool minimise = options.mode == mode::min;
    if (options.check_finite && !std::isfinite(current))
      return "monitored metric " + options.monitor + " = " + std::to_string(current) + " is not finite";
    if (options.stopping_threshold &&
        (minimise ? current < *options.stopping_threshold : current > *options.stopping_threshold))
      return "stopping threshold reached: " + options.monitor + " = " + std::to_string(current) +
             (minimise ? " < " : " > ") + std::to_string(*options.stopping_threshold);
    if (options.divergence_threshold &&
        (minimise ? current > *options.divergence_threshold : current < *options.divergence_threshold))
      return "divergence threshold passed: " + options.monitor + " = " + std::to_string(current);
    const bool improved = std::isnan(best_score) || (minimise ? current < best_score - options.min_delta
                                                              : current > best_score + options.min_delta);
    if (improved) {
      best_score = current;
      wait_count = 0;
      return {};
    }
    if (++wait_count >= options.patience && options.patience >= 0)
      return options.monitor + " did not improve in the last " + std::to_string(wait_count) + " checks; best score " +
             std::to_string(best_score);
    return {};
  }

 private:
  void check(auto& ctx) {
    auto v = ctx.metric(options.monitor);
    if (!v) {
      if (!options.strict) return;
      std::string have;
      for (auto& [k, x] : ctx.callback_metrics()) have += (have.empty() ? "" : ", ") + k;
      throw error("early_stopping: monitored metric '" + options.monitor +
                  "' was not logged (logged: " + (have.empty() ? "none" : have) + ")");
    }
    std::string why = evaluate(*v);
    if (why.empty()) return;
    reason = why;
    stopped_epoch = ctx.epoch();
    if (options.verbose) std::fprintf(stderr, "early_stopping: %s\n", why.c_str());
    ctx.stop("early_stopping: " + why);
  }
};

}  // namespace kiln::callbacks
