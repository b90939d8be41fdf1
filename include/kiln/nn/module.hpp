// kiln/nn/module.hpp — what a module is, and the visitors over its parameters.
//
// Spec: a *module* is a type whose children can be enumerated by name, either
//   (a) by a member `for_each_child(f)` that calls f(std::string_view name, child&) for
//       every parameter (a var) and every submodule, or
//   (b) by Boost.Hana reflection: a struct declared with BOOST_HANA_DEFINE_STRUCT, whose
//       members are its children under their member names.
// A *parameter* is a var<T, Dev> child. Members that are neither are ignored.
// Parameter names are the dot-joined path from the root ("net.0.weight"), the scheme
// PyTorch and Hugging Face use, so names are stable across runs and match HF
// checkpoints wherever the module mirrors an HF architecture.
// A module with a `bool training` member is switched by set_training/train/eval
// together with all its descendants.
// Ensures: visit order is declaration order, hence deterministic.
#pragma once

#include <boost/hana.hpp>
#include <concepts>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kiln/autograd/recompute.hpp"
#include "kiln/autograd/var.hpp"

namespace kiln::nn {

template <class T>
struct is_var : std::false_type {};
template <class T, class D>
struct is_var<var<T, D>> : std::true_type {};
template <class T>
concept parameter = is_var<std::remove_cvref_t<T>>::value;

struct child_probe {
  template <class C>
  void operator()(std::string_view, C&) const {}
};

template <class M>
concept has_children = requires(M& m) {
  m.for_each_child(child_probe{});
};

template <class M>
concept hana_struct = boost::hana::Struct<std::remove_cvref_t<M>>::value;

template <class M>
concept module = !parameter<M> && (has_children<M> || hana_struct<M>);

// A module without parameters: the policy slots' concepts (strategy::policy,
// precision::policy) call the members that take a module with it.
struct empty_module {
  template <class F>
  void for_each_child(F&&) {}
};

namespace detail {
inline std::string join(std::string_view prefix, std::string_view name) {
  if (prefix.empty()) return std::string(name);
  std::string s(prefix);
  s += '.';
  s += name;
  return s;
}

template <class M, class F>
void for_each_child(M& m, F&& f) {
  if constexpr (has_children<M>) {
    m.for_each_child(f);
  } else if constexpr (hana_struct<M>) {
    boost::hana::for_each(boost::hana::accessors<std::remove_cvref_t<M>>(), [&](auto pair) {
      f(std::string_view(boost::hana::to<char const*>(boost::hana::first(pair))), boost::hana::second(pair)(m));
    });
  }
}
}  // namespace detail

// Calls f(const std::string& name, var<T, Dev>& p) for every parameter under m.
template <class M, class F>
void visit_parameters(M& m, F&& f, std::string_view prefix = {}) {
  if constexpr (parameter<M>) {
    f(std::string(prefix), m);
  } else if constexpr (module<M>) {
    detail::for_each_child(m, [&](std::string_view name, auto& child) {
      using C = std::remove_cvref_t<decltype(child)>;
      if constexpr (parameter<C> || module<C>) visit_parameters(child, f, detail::join(prefix, name));
    });
  }
}

// Calls f(const std::string& name, auto& submodule) for m and every module under it.
template <class M, class F>
void visit_modules(M& m, F&& f, std::string_view prefix = {}) {
  if constexpr (module<M>) {
    f(std::string(prefix), m);
    detail::for_each_child(m, [&](std::string_view name, auto& child) {
      using C = std::remove_cvref_t<decltype(child)>;
      if constexpr (module<C>) visit_modules(child, f, detail::join(prefix, name));
    });
  }
}

template <floating_element T, device Dev = cpu>
struct named_parameter {
  std::string name;
  var<T, Dev> param;
};

// Every parameter of element type T (and device Dev), in visit order, with its name.
// Also stamps each var with its name so later errors can cite it.
template <floating_element T, device Dev = cpu, class M>
std::vector<named_parameter<T, Dev>> named_parameters(M& m) {
  std::vector<named_parameter<T, Dev>> out;
  visit_parameters(m, [&](const std::string& name, auto& p) {
    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(p)>, var<T, Dev>>) {
      p.set_name(name);
      out.push_back({name, p});
    }
  });
  return out;
}

// The random streams (dropout generators) of every module under m.
template <class M>
autograd::rng_positions random_streams(M& m) {
  autograd::rng_positions r;
  visit_modules(m, [&](const std::string&, auto& sub) {
    if constexpr (requires { sub.generator; })
      if constexpr (std::is_same_v<std::remove_cvref_t<decltype(sub.generator)>, philox_generator>)
        r.generators.push_back(&sub.generator);
  });
  return r;
}

struct parameter_counts {
  std::int64_t total = 0, trainable = 0;
};
template <class M>
parameter_counts count_parameters(M& m) {
  parameter_counts c;
  visit_parameters(m, [&](const std::string&, auto& p) {
    c.total += p.numel();
    if (p.requires_grad()) c.trainable += p.numel();
  });
  return c;
}

template <class M>
void set_training(M& m, bool training) {
  visit_modules(m, [&](const std::string&, auto& sub) {
    if constexpr (requires { sub.training = true; }) sub.training = training;
  });
}
template <class M>
void train(M& m) {
  set_training(m, true);
}
template <class M>
void eval(M& m) {
  set_training(m, false);
}

// Closes every parameter's gradient window (the next backward overwrites).
template <class M>
void zero_grad(M& m) {
  visit_parameters(m, [](const std::string&, auto& p) { p.zero_grad(); });
}

// Marks every parameter under m as trainable or frozen.
template <class M>
void requires_grad(M& m, bool on) {
  visit_parameters(m, [on](const std::string&, auto& p) { p.set_requires_grad(on); });
}

}  // namespace kiln::nn
