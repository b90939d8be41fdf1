// kiln/strategy/reduce.hpp — how logged values combine: over the batches of an epoch, and
// across ranks.
//
// Spec: a strategy's reduce(value, r) returns r over every rank's value (log(...,
// sync_dist)): mean, sum, max or min; single_device returns the value. The trainer's
// metric store reduces an epoch's values with the same enum (kiln/train/metrics.hpp,
// which names it strategy::reduce, the spelling log options use).
#pragma once

namespace kiln::strategy {

enum class reduce { mean, sum, max, min };

}  // namespace kiln::strategy
