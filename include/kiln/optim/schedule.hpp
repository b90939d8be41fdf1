// kiln/optim/schedule.hpp — learning-rate schedules with warmup, and their binding to an
// optimizer.
//
// Spec: a *schedule* is a value type with `double factor(std::int64_t t) const`, the
// multiplier of each group's base learning rate after t scheduler steps (t = 0 before the
// first step). Provided: constant, linear, cosine, step_decay, exponential, and
// warmup<Decay> (linear ramp from start_factor to 1 over `steps`, then Decay counted from
// the end of the warmup — Hugging Face's get_*_schedule_with_warmup semantics).
// reduce_on_plateau is stateful: it is fed a monitored metric and cuts the rate by
// `factor` after `patience` checks without improvement (torch's ReduceLROnPlateau with
// threshold_mode "rel").
// scheduled<O, S> pairs an optimizer with a schedule and says when the trainer steps it:
// every `frequency` optimizer steps (interval::step) or epochs (interval::epoch).
// Ensures: the rate is a pure function of (base rates, t) for factor schedules, so a
// resumed run that restores t continues on the same curve.
#pragma once

#include <cmath>
#include <numbers>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/core/error.hpp"

namespace kiln::optim {

struct constant {
  double factor(std::int64_t) const { return 1.0; }
};

// Linear from 1 to end_factor over total_steps, then held.
struct linear {
  std::int64_t total_steps = 1;
  double end_factor = 0.0;
  double factor(std::int64_t t) const {
    const double p = std::min(1.0, double(t) / double(std::max<std::int64_t>(total_steps, 1)));
    return 1.0 + (end_factor - 1.0) * p;
  }
};

// Half a cosine from 1 to min_factor over total_steps, then held.
struct cosine {
  std::int64_t total_steps = 1;
  double min_factor = 0.0;
  double factor(std::int64_t t) const {
    const double p = std::min(1.0, double(t) / double(std::max<std::int64_t>(total_steps, 1)));
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
  }
};

// Multiply by gamma every step_size steps.
struct step_decay {
  std::int64_t step_size = 1;
  double gamma = 0.1;
  double factor(std::int64_t t) const { return std::pow(gamma, double(t / std::max<std::int64_t>(step_size, 1))); }
};

struct exponential {
  double gamma = 0.99;
  double factor(std::int64_t t) const { return std::pow(gamma, double(t)); }
};

// Linear warmup from start_factor to 1 over `steps`, then `then` (counted from 0 again).
template <class Decay = constant>
struct warmup {
  std::int64_t steps = 0;
  Decay then{};
  double start_factor = 0.0;
  double factor(std::int64_t t) const {
    if (t < steps) return start_factor + (1.0 - start_factor) * double(t) / double(steps);
    return then.factor(t - steps);
  }
};

template <class S>
concept factor_schedule = requires(const S& s, std::int64_t t) {
  { s.factor(t) } -> std::convertible_to<double>;
};

enum class plateau_mode { min, max };

// torch.optim.lr_scheduler.ReduceLROnPlateau (threshold_mode "rel").
struct reduce_on_plateau {
  plateau_mode mode = plateau_mode::min;
  double factor_on_plateau = 0.1;
  std::int64_t patience = 10;
  double threshold = 1e-4;
  std::int64_t cooldown = 0;
  double min_factor = 0.0;  // lower bound of the multiplier of the base rate

  // State (saved in checkpoints).
  double current = 1.0;
  double best = std::numeric_limits<double>::quiet_NaN();
  std::int64_t bad_checks = 0, cooldown_left = 0;

  double factor(std::int64_t) const { return current; }
  // Feeds one value of the monitored metric; returns true when the rate was reduced.
  bool update(double metric) {
    KILN_CHECK(factor_on_plateau > 0 && factor_on_plateau < 1, "reduce_on_plateau: factor ", factor_on_plateau,
               " must lie in (0, 1)");
    const bool better = std::isnan(best) || (mode == plateau_mode::min ? metric < best * (1.0 - threshold)
                                                                       : metric > best * (1.0 + threshold));
    if (better) {
      best = metric;
      bad_checks = 0;
    } else {
      ++bad_checks;
    }
    if (cooldown_left > 0) {
      --cooldown_left;
      bad_checks = 0;
    }
    if (bad_checks > patience) {
      const double next = std::max(current * factor_on_plateau, min_factor);
      const bool changed = next < current;
      current = next;
      cooldown_left = cooldown;
      bad_checks = 0;
      return changed;
    }
    return false;
  }
};

enum class interval { step, epoch };

struct schedule_options {
  interval every = interval::step;
  std::int64_t frequency = 1;
  std::string monitor;  // reduce_on_plateau only: the metric fed to update()
};

// An optimizer and its schedule, as configure_optimizers() may return them.
template <class O, class S>
struct scheduled {
  O optimizer;
  S schedule;
  schedule_options options{};

  std::int64_t t = 0;        // scheduler steps taken
  std::vector<double> base;  // base learning rate of each group, captured at bind()

  void bind() {
    base.clear();
    for (std::size_t g = 0; g < optimizer.num_groups(); ++g) base.push_back(optimizer.lr(g));
    apply();
  }
  void apply() {
    const double f = schedule.factor(t);
    for (std::size_t g = 0; g < base.size(); ++g) optimizer.set_lr(g, base[g] * f);
  }
  void advance() {
    ++t;
    apply();
  }
};

template <class O, class S>
scheduled<O, S> with_schedule(O optimizer, S schedule, schedule_options options = {}) {
  KILN_CHECK(options.frequency >= 1, "with_schedule: frequency = ", options.frequency, ", expected >= 1");
  if constexpr (std::is_same_v<S, reduce_on_plateau>)
    KILN_CHECK(!options.monitor.empty(),
               "with_schedule: reduce_on_plateau needs schedule_options.monitor (the metric name to watch)");
  return {std::move(optimizer), std::move(schedule), std::move(options)};
}

template <class X>
struct is_scheduled : std::false_type {};
template <class O, class S>
struct is_scheduled<scheduled<O, S>> : std::true_type {};

}  // namespace kiln::optim
