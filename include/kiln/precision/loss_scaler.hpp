// kiln/precision/loss_scaler.hpp — dynamic loss scaling with DeepSpeed's semantics.
//
// Spec: f16 gradients underflow unless the loss is multiplied by a large scale S before
// backward (and the gradients divided by S before clipping and the optimizer step).
// dynamic_loss_scaler chooses S the way DeepSpeed's fp16 engine does, with its knobs
// (config names in brackets):
//   - S starts at 2^initial_scale_power           [initial_scale_power, default 16];
//   - a step whose gradients hold an inf or NaN is an *overflow*: the optimizer step is
//     skipped. The scale shrinks by `factor` only when `hysteresis` overflows have been
//     absorbed [hysteresis, default 2]: the first hysteresis − 1 overflows only use up
//     the allowance;
//   - S never falls below min_scale [min_loss_scale, default 1]. An overflow at the
//     minimum is an error (error_at_min_scale, default true) — training cannot recover —
//     or, with it false, the step is skipped and S stays at the minimum;
//   - after `window` consecutive overflow-free steps since the last overflow (counted from
//     the start for the first growth) S grows by `factor` [loss_scale_window, default 1000],
//     and the hysteresis allowance is restored; with consecutive_hysteresis the allowance is
//     restored by every overflow-free step instead [consecutive_hysteresis].
// The whole state — scale, iteration, last overflow, allowance left, skipped steps — is
// a small JSON object for checkpoints, so a resumed run scales exactly as an
// uninterrupted one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "kiln/core/error.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/io/json.hpp"

namespace kiln::precision {

struct loss_scaler_options {
  int initial_scale_power = 16;
  std::int64_t window = 1000;
  int hysteresis = 2;
  double min_scale = 1.0;
  double factor = 2.0;
  bool consecutive_hysteresis = false;
  bool error_at_min_scale = true;

  void validate() const {
    KILN_CHECK(initial_scale_power >= 0 && initial_scale_power <= 64, "loss_scaler: initial_scale_power ",
               initial_scale_power, " is outside [0, 64]");
    KILN_CHECK(window >= 1, "loss_scaler: window ", window, " must be at least 1 step");
    KILN_CHECK(hysteresis >= 1, "loss_scaler: hysteresis ", hysteresis, " must be at least 1");
    KILN_CHECK(min_scale > 0.0 && std::isfinite(min_scale), "loss_scaler: min_scale ", min_scale, " must be positive");
    KILN_CHECK(factor > 1.0 && std::isfinite(factor), "loss_scaler: factor ", factor, " must be greater than 1");
    KILN_CHECK(std::ldexp(1.0, initial_scale_power) >= min_scale, "loss_scaler: the initial scale 2^",
               initial_scale_power, " is below min_scale ", min_scale);
  }
  std::string str() const {
    std::ostringstream os;
    os << "initial_scale_power=" << initial_scale_power << " window=" << window << " hysteresis=" << hysteresis
       << " min_scale=" << min_scale << " factor=" << factor << " consecutive_hysteresis=" << consecutive_hysteresis
       << " error_at_min_scale=" << error_at_min_scale;
    return os.str();
  }
};

class dynamic_loss_scaler {
 public:
  explicit dynamic_loss_scaler(loss_scaler_options o = {}) : o_(o) {
    o_.validate();
    scale_ = std::ldexp(1.0, o_.initial_scale_power);
    hysteresis_left_ = o_.hysteresis;
  }

  double scale() const { return scale_; }
  const loss_scaler_options& options() const { return o_; }
  std::int64_t iteration() const { return iter_; }
  std::int64_t skipped_steps() const { return skipped_; }
  int hysteresis_left() const { return hysteresis_left_; }

  // Records one step's outcome; returns true when the step must be skipped (overflow).
  bool update(bool overflow) {
    if (overflow) {
      if (o_.hysteresis == 1 || hysteresis_left_ == 1) {
        KILN_CHECK(
            !(scale_ <= o_.min_scale && o_.error_at_min_scale),
            "loss_scaler: gradients overflowed at the minimum loss scale ", o_.min_scale, " (step ", iter_,
            "); training cannot recover: look for the first non-finite gradient, lower the learning rate, or use "
            "bf16");
        scale_ = std::max(scale_ / o_.factor, o_.min_scale);
      } else {
        --hysteresis_left_;
      }
      last_overflow_ = iter_;
      ++skipped_;
    } else {
      if (o_.consecutive_hysteresis) hysteresis_left_ = o_.hysteresis;
      if ((iter_ - last_overflow_) % o_.window == 0) {
        if (!o_.consecutive_hysteresis) hysteresis_left_ = o_.hysteresis;
        scale_ *= o_.factor;
      }
    }
    ++iter_;
    return overflow;
  }

  io::json state_json() const {
    io::json j = io::json::object();
    j.set("scale", scale_);
    j.set("iteration", iter_);
    j.set("last_overflow", last_overflow_);
    j.set("hysteresis_left", static_cast<std::int64_t>(hysteresis_left_));
    j.set("skipped_steps", skipped_);
    return j;
  }
  // Restores a state written by state_json(); `where` names the checkpoint in errors.
  void load_state(const io::json& j, std::string_view where = "checkpoint") {
    const std::string w(where);
    KILN_CHECK(j.is_object(), w, ": loss scaler state must be an object, got ", j.describe());
    auto field = [&](const char* k) -> const io::json& {
      KILN_CHECK(j.contains(k), w, ": loss scaler state has no field \"", k, "\"");
      return j.at(k);
    };
    const double s = field("scale").as_double("scale");
    const std::int64_t it = field("iteration").as_int("iteration"),
                       last = field("last_overflow").as_int("last_overflow");
    const std::int64_t h = field("hysteresis_left").as_int("hysteresis_left");
    const std::int64_t sk = field("skipped_steps").as_int("skipped_steps");
    KILN_CHECK(s >= o_.min_scale && std::isfinite(s), w, ": loss scale ", s, " is below min_scale ", o_.min_scale,
               " or not finite");
    KILN_CHECK(it >= 0 && last >= -1 && last < it + 1 && h >= 1 && h <= o_.hysteresis && sk >= 0 && sk <= it, w,
               ": inconsistent loss scaler state (iteration ", it, ", last_overflow ", last, ", hysteresis_left ", h,
               " of ", o_.hysteresis, ", skipped ", sk, ")");
    scale_ = s;
    iter_ = it;
    last_overflow_ = last;
    hysteresis_left_ = static_cast<int>(h);
    skipped_ = sk;
  }

 private:
  loss_scaler_options o_;
  double scale_ = 1.0;
  std::int64_t iter_ = 0, last_overflow_ = -1, skipped_ = 0;
  int hysteresis_left_ = 1;
};

// A fixed scale (DeepSpeed's `loss_scale: S`, S > 0): an overflowing step is skipped, the
// scale never changes.
class static_loss_scaler {
 public:
  explicit static_loss_scaler(double scale = 128.0) : scale_(scale) {
    KILN_CHECK(scale_ > 0 && std::isfinite(scale_), "static_loss_scaler: scale ", scale_, " must be positive");
  }
  double scale() const { return scale_; }
  std::int64_t iteration() const { return iter_; }
  std::int64_t skipped_steps() const { return skipped_; }
  bool update(bool overflow) {
    ++iter_;
    skipped_ += overflow;
    return overflow;
  }
  io::json state_json() const {
    io::json j = io::json::object();
    j.set("scale", scale_);
    j.set("iteration", iter_);
    j.set("skipped_steps", skipped_);
    return j;
  }
  void load_state(const io::json& j, std::string_view where = "checkpoint") {
    const std::string w(where);
    KILN_CHECK(j.is_object() && j.contains("scale") && j.contains("iteration") && j.contains("skipped_steps"), w,
               ": static loss scaler state needs fields scale, iteration, skipped_steps");
    const double s = j.at("scale").as_double("scale");
    KILN_CHECK(s == scale_, w, ": the checkpoint's static loss scale is ", s, ", this run's is ", scale_);
    iter_ = j.at("iteration").as_int("iteration");
    skipped_ = j.at("skipped_steps").as_int("skipped_steps");
  }

 private:
  double scale_;
  std::int64_t iter_ = 0, skipped_ = 0;
};

// What f16_mixed<Scaler> needs of a loss scaler.
template <class S>
concept loss_scaler = requires(S& s, const S& cs, const io::json& j) {
  { cs.scale() } -> std::convertible_to<double>;
  { s.update(true) } -> std::same_as<bool>;
  { cs.skipped_steps() } -> std::convertible_to<std::int64_t>;
  { cs.state_json() } -> std::same_as<io::json>;
  s.load_state(j, std::string_view{});
};

// True when any element of t is an inf or a NaN (the overflow test on gradients).
template <element T, device Dev>
bool has_non_finite(const tensor<T, Dev>& t) {
  static_assert(Dev::is_host, "has_non_finite: host tensors (the CUDA backend brings its own reduction)");
  const auto c = t.contiguous();
  const T* p = c.data();
  bool bad = false;
  for (std::int64_t i = 0, n = c.numel(); i < n; ++i) bad |= !std::isfinite(static_cast<double>(compute_t<T>(p[i])));
  return bad;
}

}  // namespace kiln::precision
