// kiln/optim/optimizer.hpp — the optimizer concept, parameter groups and named state.
//
// Spec: an optimizer owns parameter groups (each a list of named parameters plus the
// hyperparameters that differ per group) and per-parameter state tensors. It
//   requires: step() updates every parameter that has a gradient; zero_grad() closes
//             every parameter's gradient window; state() / load_state() expose all
//             mutable state as named tensors and counters;
//   ensures:  state names are "<param name>.<slot>" (e.g. "net.0.weight.exp_avg"), so a
//             checkpoint or a ZeRO shard can address each slot, and load_state()
//             rejects a missing key or a shape mismatch naming the tensor, before it
//             changes anything.
#pragma once

#include <concepts>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/nn/module.hpp"

namespace kiln::optim {

template <floating_element T, device Dev = cpu>
struct optimizer_state {
  std::vector<std::pair<std::string, tensor<T, Dev>>> tensors;
  std::map<std::string, std::int64_t> counters;

  const tensor<T, Dev>* find(const std::string& name) const {
    for (auto& [n, t] : tensors)
      if (n == name) return &t;
    return nullptr;
  }
};

// The tensor type of an optimizer's named state (tensor<T, Dev>): its element type and
// the device of the parameters it steps.
template <class O>
using state_tensor_t =
    typename std::remove_cvref_t<decltype(std::declval<const O&>().state().tensors)>::value_type::second_type;

template <class O>
concept optimizer = requires(O& o, const O& co) {
  o.step();
  o.zero_grad();
  {co.state()};
  o.load_state(co.state());
  { co.num_groups() } -> std::convertible_to<std::size_t>;
  { co.lr(std::size_t{}) } -> std::convertible_to<double>;
  o.set_lr(std::size_t{}, 0.0);
};

// A group: parameters and the hyperparameter overrides they share. Fields left unset
// take the optimizer's defaults.
template <floating_element T, device Dev = cpu>
struct param_group {
  std::vector<nn::named_parameter<T, Dev>> params;
  std::optional<double> lr;
  std::optional<double> weight_decay;
};

namespace detail {
// An optimizer over var<T, Dev> that finds none while the module holds var<T, Other>
// parameters was spelled for the wrong device (adamw<float> over a cuda model): an error
// naming a parameter and the spelling, not an optimizer that silently steps nothing.
template <floating_element T, device Dev, class M>
void check_parameter_device(M& module, std::size_t found) {
  if (found > 0) return;
  std::string other, where;
  nn::visit_parameters(module, [&](const std::string& name, auto& p) {
    using P = std::remove_cvref_t<decltype(p)>;
    if constexpr (std::is_same_v<typename P::value_type, T> && !std::is_same_v<typename P::device_type, Dev>)
      if (other.empty()) {
        other = std::string(P::device_type::name);
        where = name;
      }
  });
  KILN_CHECK(other.empty(), "optimizer over ", Dev::name, " parameters: the module's parameters live on ", other,
             " (e.g. '", where, "'); give the optimizer the module's device, e.g. optim::adamw<T, kiln::", other,
             ">(module, ...)");
}
}  // namespace detail

// The usual split: weight decay on matrices (rank >= 2), none on biases and norm
// weights (rank 1), as GPT-2, LLaMA and BERT recipes do.
template <floating_element T = f32, device Dev = cpu, class M>
std::vector<param_group<T, Dev>> decay_groups(M& module, double weight_decay) {
  param_group<T, Dev> decay, no_decay;
  decay.weight_decay = weight_decay;
  no_decay.weight_decay = 0.0;
  const auto all = nn::named_parameters<T, Dev>(module);
  detail::check_parameter_device<T, Dev>(module, all.size());
  for (auto& np : all) {
    if (!np.param.requires_grad()) continue;
    (np.param.rank() >= 2 ? decay : no_decay).params.push_back(np);
  }
  return {decay, no_decay};
}

// All trainable parameters of a module in one group.
template <floating_element T = f32, device Dev = cpu, class M>
std::vector<param_group<T, Dev>> single_group(M& module) {
  param_group<T, Dev> g;
  const auto all = nn::named_parameters<T, Dev>(module);
  detail::check_parameter_device<T, Dev>(module, all.size());
  for (auto& np : all)
    if (np.param.requires_grad()) g.params.push_back(np);
  return {g};
}

// How an optimizer stores updated bf16 parameters: rounded to nearest (the default), or
// stochastically (E[stored] = computed, so updates far below a bf16 ulp still move the
// weight on average; precision::bf16_true turns it on). Draw i of step t for element e
// is bit-for-bit a function of (seed, t, e), so a resumed run rounds identically.
struct param_rounding {
  bool stochastic = false;
  std::uint64_t seed = 0;
};

// Mixed precision's write-back fused into the step. An optimizer over f32 master
// weights that has `step(const compute_copies<C, Dev>&)` writes every parameter it
// updates, rounded to C, into that parameter's compute copy (the model's bf16/f16
// weight) in the same pass over memory; precision/master_weights.hpp builds the table.
// Element e of a parameter is rounded with draw stream.bits(first + e) when stochastic
// (bf16 only), to nearest otherwise. A parameter absent from the table has no copy.
template <floating_element C, device Dev>
struct compute_copies {
  struct target {
    C* data;             // numel elements, contiguous, on Dev
    std::int64_t first;  // the rounding counter of element 0
  };
  std::unordered_map<const void*, target> of;  // keyed by the stepped parameter's id()
  bool stochastic = false;
  philox_stream stream{};
};

namespace detail {
struct no_compute_copies {};
// compute_copies<C, Dev>, or no_compute_copies for C = void (a step without copies).
template <class C, device Dev>
struct copies_of {
  using type = compute_copies<C, Dev>;
};
template <device Dev>
struct copies_of<void, Dev> {
  using type = no_compute_copies;
};
}  // namespace detail

// The group bookkeeping every optimizer shares. Group must have `params` (named
// parameters), `lr` and `weight_decay`.
template <class Group>
class group_owner {
 public:
  // The groups with their parameters replaced by map(named_parameter) and their own
  // learning rates and decay kept: what an optimizer's rebind() builds the same
  // optimizer over other parameters from (mixed precision moves a bf16 model's optimizer
  // onto the f32 master copies this way). A map returning std::optional drops the
  // parameters it returns nullopt for (ZeRO keeps only its rank's shard).
  template <floating_element U, device D2, class Map>
  std::vector<param_group<U, D2>> mapped_groups(Map&& map) const {
    std::vector<param_group<U, D2>> out;
    for (auto& g : groups_) {
      param_group<U, D2> ng;
      ng.lr = g.lr;
      ng.weight_decay = g.weight_decay;
      for (auto& np : g.params) {
        if constexpr (requires { map(np).has_value(); }) {
          if (auto v = map(np)) ng.params.push_back({np.name, std::move(*v)});
        } else {
          ng.params.push_back({np.name, map(np)});
        }
      }
      out.push_back(std::move(ng));
    }
    return out;
  }
  // Every parameter the optimizer steps, in group order.
  template <class F>
  void for_each_parameter(F&& f) const {
    for (auto& g : groups_)
      for (auto& np : g.params) f(np);
  }

  // Closes every parameter's gradient window (the next backward overwrites).
  void zero_grad() {
    for (auto& g : groups_)
      for (auto& np : g.params) np.param.zero_grad();
  }
  std::size_t num_groups() const { return groups_.size(); }
  double lr(std::size_t group) const { return groups_.at(group).lr; }
  void set_lr(std::size_t group, double lr) { groups_.at(group).lr = lr; }

 protected:
  std::vector<Group> groups_;
};

namespace detail {
// Checks that `st` holds every expected slot with the right shape; throws naming the
// first problem. Called before any state is modified.
template <floating_element T, device Dev>
void check_state(const optimizer_state<T, Dev>& st, const std::vector<std::pair<std::string, shape>>& expected,
                 const char* opt_name) {
  for (auto& [name, s] : expected) {
    const auto* t = st.find(name);
    KILN_CHECK(t != nullptr, opt_name, " load_state: missing state tensor '", name, "'");
    KILN_CHECK(t->shape() == s, opt_name, " load_state: state tensor '", name, "' has shape ", t->shape().str(),
               ", expected ", s.str());
  }
}
}  // namespace detail

}  // namespace kiln::optim
