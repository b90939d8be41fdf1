// kiln/nn/unit.hpp — a sharding unit: the granularity at which ZeRO-3 gathers parameters.
//
// Spec: unit<M> is M (it derives from it, so construction, members, parameter names and
// the `training` switch are M's) whose call operator tells a parameter-sharding strategy
// when the unit's forward begins and ends. With no strategy listening (single_device,
// ddp, zero<1|2>, evaluation after fit) the call is M's call plus one thread-local load.
// strategy::zero<3> listens: before the forward it gathers the unit's parameters from
// their owners, after it releases them again, and it records two nodes on the tape
// around the unit's own nodes, so backward gathers the parameters once more before the
// unit's backward and reduces and releases its gradients right after (PyTorch FSDP's
// wrapped modules). Wrap the blocks of a deep model (gpt2 and llama do); whatever no unit
// holds (embeddings, final norms, a plain MLP) forms the root unit, gathered for the
// whole step. Every rank must call the same units in the same order, as with any
// collective; a unit called twice in one step is gathered for both calls and reduced
// once, after its first call's backward.
#pragma once

#include <utility>

#include "kiln/nn/module.hpp"

namespace kiln::nn {

// What a listening strategy installs for the calling thread.
struct unit_hooks {
  void* self = nullptr;
  void (*before)(void* self, const void* unit) = nullptr;
  void (*after)(void* self, const void* unit) = nullptr;
  static unit_hooks*& current() {
    thread_local unit_hooks* h = nullptr;
    return h;
  }
};

template <class M>
struct unit : M {
  static constexpr bool is_sharding_unit = true;
  using wrapped_type = M;
  using M::M;
  unit() = default;
  unit(M m) : M(std::move(m)) {}

  template <class... A>
  auto operator()(A&&... a) {
    return call(static_cast<M&>(*this), std::forward<A>(a)...);
  }
  template <class... A>
  auto operator()(A&&... a) const {
    return call(static_cast<const M&>(*this), std::forward<A>(a)...);
  }
  // M's children under M's names (a unit adds no level to parameter names).
  template <class F>
  void for_each_child(F&& f) {
    detail::for_each_child(static_cast<M&>(*this), f);
  }

 private:
  template <class Self, class... A>
  auto call(Self& m, A&&... a) const {
    unit_hooks* h = unit_hooks::current();
    if (!h) return m(std::forward<A>(a)...);
    h->before(h->self, this);
    auto out = m(std::forward<A>(a)...);
    h->after(h->self, this);
    return out;
  }
};

template <class T>
concept sharding_unit = requires {
  T::is_sharding_unit;
};

}  // namespace kiln::nn
