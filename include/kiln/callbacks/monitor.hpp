// kiln/callbacks/monitor.hpp — what monitoring callbacks (early_stopping, model_checkpoint)
// share: the direction of improvement and reading the monitored metric.
#pragma once

#include <cmath>
#include <optional>
#include <string>

#include "kiln/core/error.hpp"

namespace kiln::callbacks {

enum class mode { min, max };

// True when `a` is strictly better than `b` in `m`; NaN is never better than anything.
inline bool better(double a, double b, mode m) {
  if (std::isnan(a)) return false;
  if (std::isnan(b)) return true;
  return m == mode::min ? a < b : a > b;
}

// The current value of `monitor`; a metric that was not logged is an error naming it and
// the metrics that were (strict), else nullopt.
template <class Ctx>
std::optional<double> monitored_value(const Ctx& ctx, const std::string& monitor, const char* who, bool strict = true) {
  auto v = ctx.metric(monitor);
  if (v || !strict) return v;
  std::string have;
  for (auto& [k, x] : ctx.callback_metrics()) have += (have.empty() ? "" : ", ") + k;
  kiln::detail::fail(who, ": monitored metric '", monitor, "' was not logged (logged: ", have.empty() ? "none" : have,
                     ")");
}

}  // namespace kiln::callbacks
