// kiln/callbacks/lambda_callback.hpp — a callback made of one function per hook.
//
// Spec: lambda_callback(on<hook::X>(f), on<hook::Y>(g), ...) is a callback listing
// exactly the hooks it was given; at hook X it calls f(ctx, args...). Generic lambdas
// (`[](auto& ctx) {...}`) are the usual form. A function that cannot be called with the
// hook's arguments is a compile error naming the hook and its expected signature.
#pragma once

#include <tuple>
#include <utility>

#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

template <class Hook, class F>
struct hook_fn {
  using hook = Hook;
  F f;
};

// Binds a function to a hook: on<kiln::hook::on_train_epoch_end>([](auto& ctx) {...}).
template <class Hook, class F>
hook_fn<Hook, F> on(F f) {
  return {std::move(f)};
}

template <class... Fns>
struct lambda_callback {
  using hooks = hook_list<typename Fns::hook...>;
  std::tuple<Fns...> fns;

  explicit lambda_callback(Fns... f) : fns(std::move(f)...) {}

  template <class Hook>
  static constexpr std::size_t index_of() {
    std::size_t i = 0, found = sizeof...(Fns);
    ((std::is_same_v<typename Fns::hook, Hook> ? (found = i, ++i) : ++i), ...);
    return found;
  }

  template <class Hook, class... A>
  requires(index_of<Hook>() < sizeof...(Fns)) decltype(auto) invoke(hook_tag<Hook>, A&&... a) {
    constexpr std::size_t i = index_of<Hook>();
    return std::get<i>(fns).f(std::forward<A>(a)...);
  }
};

}  // namespace kiln::callbacks
