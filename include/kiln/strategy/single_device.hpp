// kiln/strategy/single_device.hpp — the strategy of one process on one device.
//
// Spec: a *strategy* owns where the model lives and how gradients and metrics are
// combined across processes. The trainer calls, in order: setup(model) once before the
// first step; reduce_gradients(model) after the last backward of an accumulation window
// and before on_before_optimizer_step; reduce(value, op) for log(..., sync_dist);
// barrier() where ranks must meet. rank()/world_size()/is_global_zero() decide who writes
// logs and checkpoints. single_device is the identity for all of these; ddp and zero
// (a later issue) fill them in without touching the loop.
#pragma once

#include "kiln/core/device.hpp"
#include "kiln/strategy/reduce.hpp"

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
