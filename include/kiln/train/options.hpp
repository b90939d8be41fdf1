// kiln/train/options.hpp — the trainer's knobs, as one value struct.
//
// Spec: trainer_options is a regular, printable aggregate (a value policy): every field
// has a default, so `trainer<...>{{.max_epochs = 5}}` states only what differs. Fields
// follow PyTorch Lightning's Trainer arguments of the same names and meanings, so a
// Lightning user can translate a configuration line by line:
//   - global_step counts optimizer steps; micro-batches (what the loader yields) are
//     counted separately, so accumulate_grad_batches = 4 advances global_step once per
//     four micro-batches.
//   - a batch_limit is a count (an integer: "this many batches") or a fraction (a
//     floating-point value: "this share of the loader"); 1.0 means all, 1 means one.
//   - max_steps = -1 and max_epochs = -1 mean "no limit" (at least one limit — epochs,
//     steps or time — must be set; the default is 1000 epochs like Lightning's).
// Ensures: validate() rejects contradictory or out-of-range settings with an error that
// names the field and the accepted range, before anything is allocated.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include "kiln/core/error.hpp"

namespace kiln::train {

// A number of batches, given as a count (integer) or as a fraction of the loader (floating point).
struct batch_limit {
  double value = 1.0;
  bool is_fraction = true;

  constexpr batch_limit() = default;
  constexpr batch_limit(int count) : value(count), is_fraction(false) {}                   // NOLINT: implicit by design
  constexpr batch_limit(std::int64_t count) : value(double(count)), is_fraction(false) {}  // NOLINT
  constexpr batch_limit(double fraction) : value(fraction), is_fraction(true) {}           // NOLINT

  // How many of `available` batches this limit admits.
  std::int64_t resolve(std::int64_t available) const {
    if (!is_fraction) return std::min<std::int64_t>(available, static_cast<std::int64_t>(value));
    return static_cast<std::int64_t>(std::floor(value * static_cast<double>(available)));
  }
  std::string str() const {
    std::ostringstream os;
    if (is_fraction)
      os << value << " of the loader";
    else
      os << static_cast<std::int64_t>(value) << " batches";
    return os.str();
  }
  void check(const char* field) const {
    if (is_fraction)
      KILN_CHECK(value >= 0.0 && value <= 1.0, "trainer_options.", field, " = ", value,
                 ": a fraction must lie in [0, 1] (use an integer for a batch count)");
    else
      KILN_CHECK(value >= 0, "trainer_options.", field, " = ", value, ": a batch count must be >= 0");
  }
};

enum class clip_algorithm { norm, value };

struct trainer_options {
  std::int64_t max_epochs = -1;  // -1 with max_steps = -1 and no max_time: 1000 epochs
  std::int64_t min_epochs = 0;
  std::int64_t max_steps = -1;
  std::int64_t min_steps = 0;
  std::optional<std::chrono::duration<double>> max_time;

  batch_limit limit_train_batches = 1.0;
  batch_limit limit_val_batches = 1.0;
  batch_limit limit_test_batches = 1.0;
  batch_limit limit_predict_batches = 1.0;
  batch_limit val_check_interval = 1.0;  // fraction of an epoch, or every N training batches
  std::int64_t check_val_every_n_epoch = 1;
  std::int64_t num_sanity_val_steps = 2;

  std::int64_t accumulate_grad_batches = 1;
  double gradient_clip_val = 0.0;  // 0: no clipping
  clip_algorithm gradient_clip_algorithm = clip_algorithm::norm;

  std::int64_t fast_dev_run = 0;    // N > 0: run N batches of each loop once, no loggers' files
  batch_limit overfit_batches = 0;  // > 0: train and validate on this fixed set of training batches
  bool deterministic = false;
  std::optional<std::uint64_t> seed;

  std::int64_t log_every_n_steps = 50;
  std::string default_root_dir = "runs";
  bool enable_progress_bar = true;
  bool enable_model_summary = true;

  // Lightning's default when no stopping condition is given.
  std::int64_t effective_max_epochs() const {
    if (fast_dev_run > 0) return 1;
    if (max_epochs >= 0) return max_epochs;
    return (max_steps < 0 && !max_time) ? 1000 : -1;
  }

  void validate() const {
    KILN_CHECK(max_epochs >= -1, "trainer_options.max_epochs = ", max_epochs, ": expected -1 (no limit) or >= 0");
    KILN_CHECK(max_steps >= -1, "trainer_options.max_steps = ", max_steps, ": expected -1 (no limit) or >= 0");
    KILN_CHECK(min_epochs >= 0, "trainer_options.min_epochs = ", min_epochs, ": expected >= 0");
    KILN_CHECK(min_steps >= 0, "trainer_options.min_steps = ", min_steps, ": expected >= 0");
    KILN_CHECK(max_epochs < 0 || min_epochs <= max_epochs, "trainer_options.min_epochs = ", min_epochs,
               " exceeds max_epochs = ", max_epochs);
    KILN_CHECK(!max_time || max_time->count() > 0, "trainer_options.max_time must be positive");
    limit_train_batches.check("limit_train_batches");
    limit_val_batches.check("limit_val_batches");
    limit_test_batches.check("limit_test_batches");
    limit_predict_batches.check("limit_predict_batches");
    overfit_batches.check("overfit_batches");
    KILN_CHECK(val_check_interval.value > 0, "trainer_options.val_check_interval = ", val_check_interval.value,
               ": expected a positive batch count or a fraction in (0, 1]");
    val_check_interval.check("val_check_interval");
    KILN_CHECK(check_val_every_n_epoch >= 1, "trainer_options.check_val_every_n_epoch = ", check_val_every_n_epoch,
               ": expected >= 1");
    KILN_CHECK(num_sanity_val_steps >= -1, "trainer_options.num_sanity_val_steps = ", num_sanity_val_steps,
               ": expected -1 (all) or >= 0");
    KILN_CHECK(accumulate_grad_batches >= 1, "trainer_options.accumulate_grad_batches = ", accumulate_grad_batches,
               ": expected >= 1");
    KILN_CHECK(gradient_clip_val >= 0, "trainer_options.gradient_clip_val = ", gradient_clip_val,
               ": expected >= 0 (0 disables clipping)");
    KILN_CHECK(fast_dev_run >= 0, "trainer_options.fast_dev_run = ", fast_dev_run, ": expected >= 0");
    KILN_CHECK(log_every_n_steps >= 1, "trainer_options.log_every_n_steps = ", log_every_n_steps, ": expected >= 1");
  }

  std::string str() const {
    std::ostringstream os;
    os << "max_epochs=" << max_epochs << " min_epochs=" << min_epochs << " max_steps=" << max_steps
       << " max_time=" << (max_time ? std::to_string(max_time->count()) + "s" : "none")
       << " limit_train_batches=" << limit_train_batches.str() << " limit_val_batches=" << limit_val_batches.str()
       << " val_check_interval=" << val_check_interval.str() << " check_val_every_n_epoch=" << check_val_every_n_epoch
       << " num_sanity_val_steps=" << num_sanity_val_steps << " accumulate_grad_batches=" << accumulate_grad_batches
       << " gradient_clip_val=" << gradient_clip_val
       << " gradient_clip_algorithm=" << (gradient_clip_algorithm == clip_algorithm::norm ? "norm" : "value")
       << " fast_dev_run=" << fast_dev_run << " overfit_batches=" << overfit_batches.str()
       << " deterministic=" << deterministic << " seed=" << (seed ? std::to_string(*seed) : "none")
       << " log_every_n_steps=" << log_every_n_steps << " default_root_dir=" << default_root_dir;
    return os.str();
  }
};

}  // namespace kiln::train
