// kiln/train/optimizers.hpp — what configure_optimizers() returns, as the trainer holds it.
//
// Spec: configure_optimizers() may return an optimizer, optim::with_schedule(optimizer,
// schedule), or a std::tuple of either. optimizers_of<M, Precision, Strategy>::type is always a
// tuple of optim::scheduled<O, S>, with S = no_schedule for an optimizer given alone and
// O as the precision policy and the strategy adapted it, so the loop and the checkpoint code handle one shape.
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "kiln/optim/schedule.hpp"
#include "kiln/precision/policy.hpp"
#include "kiln/strategy/strategy.hpp"
#include "kiln/train/checkpointing.hpp"
#include "kiln/train/concepts.hpp"

namespace kiln::train::detail {

template <class R>
struct as_scheduled {
  using type = optim::scheduled<R, no_schedule>;
  static type make(R&& r) { return {std::move(r), no_schedule{}, {}}; }
};
template <class O, class S>
struct as_scheduled<optim::scheduled<O, S>> {
  static_assert([] {
    if constexpr (std::is_same_v<S, no_schedule>)
      return true;
    else
      return optim::check_schedule<S>();
  }());
  using type = optim::scheduled<O, S>;
  static type make(optim::scheduled<O, S>&& r) { return std::move(r); }
};
template <class R>
struct optim_pack {
  using type = std::tuple<typename as_scheduled<R>::type>;
  static type make(R&& r) { return type{as_scheduled<R>::make(std::move(r))}; }
};
template <class... R>
struct optim_pack<std::tuple<R...>> {
  using type = std::tuple<typename as_scheduled<R>::type...>;
  static type make(std::tuple<R...>&& r) {
    return std::apply([](auto&&... x) { return type{as_scheduled<R>::make(std::move(x))...}; }, std::move(r));
  }
};
// A strategy that keeps optimizers as they are (the planner counts unsharded states).
struct unsharded {};

// The optimizer as the strategy S keeps it: S::optimizer_t<O> when S adapts_optimizers
// (ZeRO shards them), O itself otherwise.
template <class S, class O>
struct strategy_optimizer {
  using type = O;
  static O&& make(S&, O&& o) { return std::move(o); }
};
template <class S, class O>
requires(strategy::traits<S>::adapts_optimizers) struct strategy_optimizer<S, O> {
  static_assert(strategy::check_adapt<S, O>());
  using type = typename S::template optimizer_t<O>;
  static type make(S& s, O&& o) { return s.adapt(std::move(o)); }
};

// The pack as the precision policy P and the strategy S keep it: each optimizer O becomes
// P::optimizer_t<O> (the mixed policies rebind it to f32 master weights), then what S
// makes of that; its schedule unchanged. make() builds it from the user's pack before
// any schedule is bound.
template <class Pack, class P, class S>
struct adapted_pack;
template <class... O, class... Sc, class P, class S>
struct adapted_pack<std::tuple<optim::scheduled<O, Sc>...>, P, S> {
  static_assert((precision::check_optimizer<P, O>() && ...));
  template <class X>
  using adapted = typename strategy_optimizer<S, typename P::template optimizer_t<X>>::type;
  using type = std::tuple<optim::scheduled<adapted<O>, Sc>...>;
  static type make(std::tuple<optim::scheduled<O, Sc>...>&& pack, P& precision, S& strategy) {
    return std::apply(
        [&](auto&&... so) {
          return type{optim::scheduled<adapted<std::remove_cvref_t<decltype(so.optimizer)>>,
                                       std::remove_cvref_t<decltype(so.schedule)>>{
              strategy_optimizer<S, typename P::template optimizer_t<std::remove_cvref_t<decltype(so.optimizer)>>>::
                  make(strategy, precision.adapt(std::move(so.optimizer))),
              std::move(so.schedule), std::move(so.options)}...};
        },
        std::move(pack));
  }
};

template <class M, class P, class S>
struct optimizers_of {
  using type = std::tuple<>;
};
template <has_configure_optimizers M, class P, class S>
struct optimizers_of<M, P, S> {
  using raw = std::remove_cvref_t<decltype(std::declval<M&>().configure_optimizers())>;
  using user_type = typename optim_pack<raw>::type;
  using type = typename adapted_pack<user_type, P, S>::type;
};

}  // namespace kiln::train::detail
