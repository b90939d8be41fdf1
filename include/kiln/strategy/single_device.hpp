// kiln/strategy/single_device.hpp — the strategy of one process on one device.
//
// Spec: single_device<Dev> satisfies strategy::policy (kiln/strategy/strategy.hpp has the
// slot) with the identity for everything: rank 0 of 1, nothing to reduce, no barrier to
// wait at. It declares no optional capability.
#pragma once

#include "kiln/core/device.hpp"
#include "kiln/strategy/reduce.hpp"
#include "kiln/strategy/strategy.hpp"

namespace kiln::strategy {

template <device Dev = cpu>
struct single_device {
  using device_type = Dev;

  static constexpr int rank() { return 0; }
  static constexpr int world_size() { return 1; }
  static constexpr bool is_global_zero() { return true; }

  template <class M>
  void setup(M&) {}
  template <class M>
  void reduce_gradients(M&) {}
  double reduce(double v, strategy::reduce) const { return v; }
  void barrier() {}
};

}  // namespace kiln::strategy
