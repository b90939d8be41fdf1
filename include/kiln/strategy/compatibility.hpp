// kiln/strategy/compatibility.hpp — which strategies and precision policies compose.
//
// Spec: compatibility<Strategy, Precision> states, in capabilities, the pairs a trainer
// refuses:
//   shards_gradients × scaled        a loss-scaling policy tests the gradients for
//                                    overflow after the reduction, and a rank that holds
//                                    only its shard of the averaged gradients would test
//                                    unreduced ones (zero<2|3> with f16_mixed)
//   shards_parameters × keeps_masters  the parameters the optimizer steps are sharded,
//                                    and the policy steps separate f32 masters of whole
//                                    parameters (zero<3> with bf16_mixed / f16_mixed)
// check_compatible<Strategy, Precision>() is the trainer's compile-time check: a message
// per rule, naming the pairs that work.
#pragma once

#include "kiln/precision/policy.hpp"
#include "kiln/strategy/strategy.hpp"

namespace kiln::strategy {

template <class Strategy, class Precision>
struct compatibility {
  static constexpr bool sharded_gradients_with_loss_scaling =
      traits<Strategy>::shards_gradients && precision::traits<Precision>::scaled;
  static constexpr bool sharded_parameters_with_masters =
      traits<Strategy>::shards_parameters && precision::traits<Precision>::keeps_masters;
  static constexpr bool value = !sharded_gradients_with_loss_scaling && !sharded_parameters_with_masters;
};

template <class Strategy, class Precision>
constexpr bool check_compatible() {
  using C = compatibility<Strategy, Precision>;
  static_assert(!C::sharded_gradients_with_loss_scaling,
                "kiln::trainer: the strategy shards gradients (strategy::zero<2>), and a loss-scaling precision "
                "(f16_mixed) would test unreduced gradients for overflow; use zero<1> with f16_mixed, or bf16_mixed "
                "with zero<2>");
  static_assert(!C::sharded_parameters_with_masters,
                "kiln::trainer: the strategy shards the parameters the optimizer steps (strategy::zero<3>), and this "
                "precision policy steps separate f32 master weights; use zero<3> with fp32, bf16_true or f16_true, "
                "or zero<2> with the mixed policies");
  return true;
}

}  // namespace kiln::strategy
