// kiln/optim/schedule.hpp — learning-rate schedules with warmup, and their binding to an
// optimizer.
//
// Spec: a *schedule* (concept optim::schedule<S>) is a copyable value type with
//   double factor(std::int64_t t) const   the multiplier of each group's base learning
//                                         rate after t scheduler steps (t = 0 before the
//                                         first step).
// Optional capabilities: the schedule declares `static constexpr bool NAME = true;` and
// has the members NAME requires; the trainer and the checkpoint code ask schedule_traits<S>.
//   monitored          update(double metric): before each of its steps the trainer feeds
//                      it the latest value of schedule_options::monitor (with_schedule
//                      refuses an empty name; a metric not logged is an error naming it)
//   checkpoints_state  save_state(io::json&) const, load_state(const io::json&): the state
//                      a resume needs beside t and the base rates (load_state throws on a
//                      malformed section before the trainer changes anything)
// check_schedule<S>() is the compile-time check (a message naming the missing member).
// Provided: constant, linear, cosine, step_decay, exponential, and warmup<Decay> (linear
// ramp from start_factor to 1 over `steps`, then Decay counted from the end of the warmup
// — Hugging Face's get_*_schedule_with_warmup semantics). reduce_on_plateau is monitored
// and checkpoints its state: it cuts the rate by `factor` after `patience` checks without
// improvement (torch's ReduceLROnPlateau with threshold_mode "rel").
// scheduled<O, S> pairs an optimizer with a schedule and says when the trainer steps it:
// every `frequency` optimizer steps (interval::step) or epochs (interval::epoch).
// Ensures: the rate is a pure function of (base rates, t) for schedules without state, so
// a resumed run that restores t continues on the same curve.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <numbers>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/core/capability.hpp"
#include "kiln/core/error.hpp"
#include "kiln/core/type_name.hpp"

namespace kiln::io {
class json;
}  // namespace kiln::io

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
concept schedule = std::copyable<S> && requires(const S& s, std::int64_t t) {
  { s.factor(t) } -> std::convertible_to<double>;
};

// The capabilities S declares (false for each it does not).
template <class S>
struct schedule_traits {
  static constexpr bool monitored = KILN_DECLARED_CAPABILITY(S, monitored);
  static constexpr bool checkpoints_state = KILN_DECLARED_CAPABILITY(S, checkpoints_state);
};

// The compile-time check of a schedule; true when it passes.
template <class S>
constexpr bool check_schedule() {
  static_assert(schedule<S>,
                "kiln::optim::with_schedule(optimizer, schedule): the schedule is not a schedule "
                "(kiln/optim/schedule.hpp). A schedule is a copyable value type with "
                "`double factor(std::int64_t t) const`, the multiplier of the base learning rates after t steps");
  static_assert(
      !schedule_traits<S>::monitored || requires(S & s) { s.update(1.0); },
      "kiln::optim: this schedule declares monitored but has no update(double metric)");
  static_assert(
      !schedule_traits<S>::checkpoints_state || requires(const S& s, io::json& j) { s.save_state(j); },
      "kiln::optim: this schedule declares checkpoints_state but has no save_state(kiln::io::json&) const");
  static_assert(
      !schedule_traits<S>::checkpoints_state || requires(S & s, const io::json& j) { s.load_state(j); },
      "kiln::optim: this schedule declares checkpoints_state but has no load_state(const kiln::io::json&)");
  return true;
}

enum class plateau_mode { min, max };

// torch.optim.lr_scheduler.ReduceLROnPlateau (threshold_mode "rel").
struct reduce_on_plateau {
  static constexpr bool monitored = true;
  static constexpr bool checkpoints_state = true;

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

  // The state fields, as a checkpoint's schedule section holds them (Json: io::json).
  template <class Json>
  void save_state(Json& j) const {
    j.set("current", current);
    j.set("best", best);
    j.set("bad_checks", bad_checks);
    j.set("cooldown_left", cooldown_left);
  }
  template <class Json>
  void load_state(const Json& j) {
    const double c = j.at("current").as_double();
    const double b = j.at("best").as_double();
    const std::int64_t bad = j.at("bad_checks").as_int();
    const std::int64_t cool = j.at("cooldown_left").as_int();
    current = c;
    best = b;
    bad_checks = bad;
    cooldown_left = cool;
  }
};

enum class interval { step, epoch };

struct schedule_options {
  interval every = interval::step;
  std::int64_t frequency = 1;
  std::string monitor;  // monitored schedules only: the metric fed to update()
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
  static_assert(check_schedule<S>());
  KILN_CHECK(options.frequency >= 1, "with_schedule: frequency = ", options.frequency, ", expected >= 1");
  if constexpr (schedule_traits<S>::monitored)
    KILN_CHECK(!options.monitor.empty(), "with_schedule: ", type_name<S>(),
               " needs schedule_options.monitor (the metric name to watch)");
  return {std::move(optimizer), std::move(schedule), std::move(options)};
}

template <class X>
struct is_scheduled : std::false_type {};
template <class O, class S>
struct is_scheduled<scheduled<O, S>> : std::true_type {};

}  // namespace kiln::optim
