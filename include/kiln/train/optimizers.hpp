// kiln/train/optimizers.hpp — what configure_optimizers() returns, as the trainer holds it.
//
// Spec: configure_optimizers() may return an optimizer, optim::with_schedule(optimizer,
// schedule), or a std::tuple of either. optimizers_of<M>::type is always a tuple of
// optim::scheduled<O, S>, with S = no_schedule for an optimizer given alone, so the loop
// and the checkpoint code handle one shape.
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "kiln/optim/schedule.hpp"
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
template <class M>
struct optimizers_of {
  using type = std::tuple<>;
};
template <has_configure_optimizers M>
struct optimizers_of<M> {
  using raw = std::remove_cvref_t<decltype(std::declval<M&>().configure_optimizers())>;
  using type = typename optim_pack<raw>::type;
};

}  // namespace kiln::train::detail
