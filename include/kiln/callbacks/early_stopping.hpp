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
// end, so metrics logged there are seen. State (wait_count, best_score, stopped_epoch) is
// public and saved in checkpoints, so a resumed run counts patience where it left off.
// restore_best_weights (Keras' option) keeps a copy of the parameters at the best score
// (in checkpoints too) and copies them back into the model at on_train_end.
#pragma once

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "kiln/callbacks/monitor.hpp"
#include "kiln/core/error.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/train/checkpoint_io.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

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
  bool restore_best_weights = false;
};

struct early_stopping {
  static constexpr bool monitors = true;
  using hooks = hook_list<hook::on_validation_end, hook::on_train_epoch_end, hook::on_train_end,
                          hook::on_save_checkpoint, hook::on_load_checkpoint>;
  static constexpr std::string_view state_key = "early_stopping";

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
  void on_train_end(auto& ctx) {
    if (!options.restore_best_weights || best_weights_.empty()) return;
    std::size_t i = 0;
    nn::visit_parameters(ctx.model(), [&](const std::string&, auto& p) {
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      copy_from_host(p.value(), std::get<tensor<T>>(best_weights_[i++].second));
    });
    if (options.verbose)
      std::fprintf(stderr, "early_stopping: restored the weights of the best %s = %g\n", options.monitor.c_str(),
                   best_score);
  }
  void on_save_checkpoint(auto&, const train::checkpoint_out& ckpt) const {
    auto& s = ckpt.state();
    s.set("wait_count", wait_count);
    s.set("best_score", best_score);
    s.set("stopped_epoch", stopped_epoch);
    s.set("reason", reason);
    s.set("best_weights", !best_weights_.empty());
    for (auto& [name, t] : best_weights_) std::visit([&](auto& x) { ckpt.add("best/" + name, x); }, t);
  }
  void on_load_checkpoint(auto& ctx, const train::checkpoint_in& ckpt) {
    const auto& s = ckpt.state();
    if (!s.contains("wait_count")) return;  // not in this checkpoint
    // Read everything first: a bad checkpoint leaves the callback as it was.
    const auto w = s.at("wait_count").as_int("early_stopping.wait_count");
    const double b = s.at("best_score").as_double("early_stopping.best_score");
    const auto e = s.at("stopped_epoch").as_int("early_stopping.stopped_epoch");
    std::string r = s.at("reason").as_string("early_stopping.reason");
    decltype(best_weights_) bw;
    if (s.at("best_weights").as_bool() && ckpt.contains("best/" + first_param_name(ctx)))
      nn::visit_parameters(ctx.model(), [&](const std::string& name, auto& p) {
        using T = typename std::remove_cvref_t<decltype(p)>::value_type;
        auto t = ckpt.template load<T>("best/" + name);
        KILN_CHECK(t.shape() == p.shape(), ckpt.file_name(), ": early_stopping best weight '", name,
                   "' has the wrong shape");
        bw.emplace_back(name, std::move(t));
      });
    wait_count = w;
    best_score = b;
    stopped_epoch = e;
    reason = std::move(r);
    best_weights_ = std::move(bw);
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
      improved_ = true;
      return {};
    }
    if (++wait_count >= options.patience && options.patience >= 0)
      return options.monitor + " did not improve in the last " + std::to_string(wait_count) + " checks; best score " +
             std::to_string(best_score);
    return {};
  }

 private:
  void check(auto& ctx) {
    auto v = monitored_value(ctx, options.monitor, "early_stopping", options.strict);
    if (!v) return;
    improved_ = false;
    std::string why = evaluate(*v);
    if (options.restore_best_weights) {
      // zero<3> keeps 1/world of each parameter between uses: gather them to copy the best
      // (a collective, so every rank enters it whether or not its value improved).
      [[maybe_unused]] auto whole = whole_parameters(ctx);
      if (improved_) keep_best(ctx);
    }
    if (why.empty()) return;
    reason = why;
    stopped_epoch = ctx.epoch();
    if (options.verbose) std::fprintf(stderr, "early_stopping: %s\n", why.c_str());
    ctx.stop("early_stopping: " + why);
  }
  static auto whole_parameters(auto& ctx) {
    if constexpr (requires { ctx.strategy().full_parameters(); })
      return ctx.strategy().full_parameters();
    else
      return 0;
  }
  void keep_best(auto& ctx) {
    best_weights_.clear();
    nn::visit_parameters(
        ctx.model(), [&](const std::string& name, auto& p) { best_weights_.emplace_back(name, host_copy(p.value())); });
  }
  static std::string first_param_name(auto& ctx) {
    std::string first;
    nn::visit_parameters(ctx.model(), [&](const std::string& name, auto&) {
      if (first.empty()) first = name;
    });
    return first;
  }

  bool improved_ = false;
  std::vector<std::pair<std::string, std::variant<tensor<f32>, tensor<f64>, tensor<bf16>, tensor<f16>>>> best_weights_;
};

}  // namespace kiln::callbacks
