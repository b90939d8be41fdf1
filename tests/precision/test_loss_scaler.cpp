// dynamic_loss_scaler: DeepSpeed's growth, hysteresis, backoff and floor, step by step.
#include "../helpers.hpp"
#include "kiln/precision/loss_scaler.hpp"

namespace test_loss_scaler {

using namespace kiln;
using precision::dynamic_loss_scaler;

TEST_CASE("loss scaler: starts at 2^power and grows by the factor after each clean window") {
  dynamic_loss_scaler s({.initial_scale_power = 4, .window = 3});
  CHECK(s.scale() == 16.0);
  CHECK(!s.update(false));
  CHECK(!s.update(false));
  CHECK(s.scale() == 16.0);
  s.update(false);  // third clean step since the start: grow
  CHECK(s.scale() == 32.0);
  for (int i = 0; i < 3; ++i) s.update(false);
  CHECK(s.scale() == 64.0);
  CHECK(s.iteration() == 6);
  CHECK(s.skipped_steps() == 0);
}

TEST_CASE("loss scaler: hysteresis absorbs overflows before a backoff; every overflow skips its step") {
  dynamic_loss_scaler s({.initial_scale_power = 10, .window = 4, .hysteresis = 2});
  CHECK(s.update(true));  // first overflow: allowance 2 → 1, scale kept
  CHECK(s.scale() == 1024.0);
  CHECK(s.hysteresis_left() == 1);
  CHECK(s.update(true));  // second: back off
  CHECK(s.scale() == 512.0);
  CHECK(s.update(true));  // the allowance is not restored by a backoff: back off again
  CHECK(s.scale() == 256.0);
  CHECK(s.skipped_steps() == 3);
  // Regrowth: `window` clean steps after the last overflow (iteration 2) → at iteration 6.
  for (int i = 0; i < 3; ++i) CHECK(!s.update(false));
  CHECK(s.scale() == 256.0);
  s.update(false);
  CHECK(s.scale() == 512.0);
  CHECK(s.hysteresis_left() == 2);  // growth restores the allowance
  CHECK(s.update(true));
  CHECK(s.scale() == 512.0);
}

TEST_CASE("loss scaler: consecutive_hysteresis restores the allowance on every clean step") {
  dynamic_loss_scaler s({.initial_scale_power = 8, .window = 100, .hysteresis = 2, .consecutive_hysteresis = true});
  s.update(true);
  CHECK(s.hysteresis_left() == 1);
  s.update(false);
  CHECK(s.hysteresis_left() == 2);
  s.update(true);  // absorbed again
  CHECK(s.scale() == 256.0);
  s.update(true);
  CHECK(s.scale() == 128.0);
}

TEST_CASE("loss scaler: the floor, and the error when overflowing at it") {
  dynamic_loss_scaler s({.initial_scale_power = 2, .window = 1000, .hysteresis = 1, .min_scale = 2.0});
  s.update(true);
  CHECK(s.scale() == 2.0);
  CHECK_THROWS_WITH_AS(s.update(true), doctest::Contains("overflowed at the minimum loss scale 2"), error);
  dynamic_loss_scaler lenient(
      {.initial_scale_power = 1, .hysteresis = 1, .min_scale = 2.0, .error_at_min_scale = false});
  CHECK(lenient.update(true));
  CHECK(lenient.scale() == 2.0);
}

TEST_CASE("loss scaler: state round-trips through JSON and resumes identically") {
  const precision::loss_scaler_options o{.initial_scale_power = 6, .window = 3, .hysteresis = 2};
  dynamic_loss_scaler a(o), b(o);
  const bool pattern[] = {false, true, false, true, true, false, false, false, false, true, false, false};
  for (int i = 0; i < 5; ++i) a.update(pattern[i]);
  b.load_state(io::json::parse(a.state_json().dump()));
  for (int i = 5; i < 12; ++i) {
    a.update(pattern[i]);
    b.update(pattern[i]);
    CHECK(a.scale() == b.scale());
    CHECK(a.hysteresis_left() == b.hysteresis_left());
  }
  CHECK(a.state_json() == b.state_json());
  auto bad = a.state_json();
  bad.set("hysteresis_left", 7);
  CHECK_THROWS_WITH_AS(b.load_state(bad, "run.ckpt"), doctest::Contains("run.ckpt: inconsistent loss scaler state"),
                       error);
  auto missing = io::json::object();
  missing.set("scale", 8.0);
  CHECK_THROWS_WITH_AS(b.load_state(missing, "run.ckpt"), doctest::Contains("no field \"iteration\""), error);
}

TEST_CASE("loss scaler: options are checked, and overflow detection sees inf and NaN") {
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.window = 0}), doctest::Contains("window 0 must be at least 1"), error);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.factor = 1.0}), doctest::Contains("factor 1 must be greater than 1"),
                       error);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.initial_scale_power = 0, .min_scale = 4.0}),
                       doctest::Contains("below min_scale"), error);
  auto t = tensor<f16>::from({3}, {f16(1.0f), f16(2.0f), f16(3.0f)});
  CHECK(!precision::has_non_finite(t));
  t(1) = f16(70000.0f);  // beyond f16's range: inf
  CHECK(precision::has_non_finite(t));
  auto u = tensor<f32>::zeros({4});
  u(2) = std::nanf("");
  CHECK(precision::has_non_finite(u));
}

}  // namespace test_loss_scaler
