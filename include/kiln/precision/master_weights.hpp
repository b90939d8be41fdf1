// kiln/precision/master_weights.hpp — f32 master copies of a module's bf16/f16 parameters.
//
// Spec: master_weights<Half> pairs every trainable Half parameter of a module with an f32
// var of the same name and shape (the *master*), which the optimizer steps instead of the
// Half one (DeepSpeed's and Megatron's mixed-precision layout: Half copies for compute,
// f32 for the update, so an update far below a Half ulp is not lost).
//   bind(model)     creates the masters from the model's values; a floating parameter of
//                   another element type is an error naming it (mixed precision trains
//                   one compute type);
//   fold()          adds every open Half gradient into its master's f32 gradient (the
//                   first fold of an accumulation window overwrites — the master's own
//                   window, closed by the optimizer's zero_grad, says which), closes the
//                   Half window so the next backward overwrites, and records the first
//                   parameter, in visit order, whose gradient holds an inf or NaN (until
//                   clear_overflow(), which the policy calls once a window's step is done);
//   publish(r, t)   writes every master back into its Half parameter, rounded to nearest
//                   or stochastically (r; draw key (seed, t));
//   for_each_child  makes the masters a module (flat names "net.0.weight"), so gradient
//                   clipping, norms and nan checks run on them unchanged.
// Cost: fold reads 2 B + 4 B and writes 4 B per element; publish reads 4 B, writes 2 B.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/ops/functors.hpp"
#include "kiln/optim/optimizer.hpp"

namespace kiln::precision {

template <floating_element Half, device Dev = cpu>
class master_weights {
 public:
  struct link {
    std::string name;
    var<Half, Dev> model;
    var<f32, Dev> master;
  };

  // `policy` names the precision policy in errors.
  template <class M>
  void bind(M& model, std::string_view policy) {
    links_.clear();
    index_.clear();
    nn::visit_parameters(model, [&](const std::string& name, auto& p) {
      using P = std::remove_cvref_t<decltype(p)>;
      if constexpr (std::is_same_v<P, var<Half, Dev>>) {
        if (!p.requires_grad()) return;  // frozen: never stepped, needs no master
        p.set_name(name);
        tensor<f32, Dev> m = p.value().template to<f32>();
        var<f32, Dev> mv(std::move(m), true);
        mv.set_name(name);
        index_.emplace(p.id(), links_.size());
        links_.push_back({name, p, mv});
      } else {
        KILN_CHECK(!p.requires_grad(), policy, ": parameter '", name, "' is ",
                   dtype_name(dtype_of<typename P::value_type>), " but ", policy, " trains ",
                   dtype_name(dtype_of<Half>),
                   " parameters with f32 master copies; build the module with kiln::precision::param_t<the "
                   "policy> (or freeze the parameter)");
      }
    });
  }

  std::size_t size() const { return links_.size(); }
  const std::vector<link>& links() const { return links_; }
  std::vector<link>& links() { return links_; }
  // The master of a model parameter; throws naming it when the parameter has none.
  const var<f32, Dev>& master_of(const var<Half, Dev>& p, std::string_view who) const {
    auto it = index_.find(p.id());
    KILN_CHECK(it != index_.end(), who, ": parameter '", p.name(),
               "' has no master copy (it is not a trainable parameter of the model the precision policy was set "
               "up with)");
    return links_[it->second].master;
  }

  // Adds the open Half gradients into the masters (see the spec). Returns true when any
  // element folded so far in this window is not finite.
  bool fold() {
    for (auto& l : links_) {
      if (!l.model.has_grad()) continue;
      const grad_write mode = l.master.begin_grad_write();
      const Half* g = l.model.grad().data();
      f32* mg = l.master.grad().data();
      const std::int64_t n = l.model.numel();
      float probe = 0;  // x * 0 is 0 for finite x and NaN otherwise
      if (mode == grad_write::overwrite) {
#pragma omp simd reduction(+ : probe)
        for (std::int64_t i = 0; i < n; ++i) {
          const float v = static_cast<float>(g[i]);
          mg[i] = v;
          probe += v * 0.0f;
        }
      } else {
#pragma omp simd reduction(+ : probe)
        for (std::int64_t i = 0; i < n; ++i) {
          const float v = mg[i] + static_cast<float>(g[i]);
          mg[i] = v;
          probe += v * 0.0f;
        }
      }
      if (!std::isfinite(probe) && finite_) {
        finite_ = false;
        first_bad_ = l.name;
      }
      l.model.zero_grad();
    }
    return !finite_;
  }
  // Resets the overflow record; the policy calls it when a window's step is done.
  void clear_overflow() {
    finite_ = true;
    first_bad_.reset();
  }
  bool overflow() const { return !finite_; }
  // Records an overflow without a name (restoring a checkpoint taken inside a window).
  void mark_overflow() { finite_ = false; }
  // The first parameter (visit order) whose master gradient was found non-finite.
  const std::optional<std::string>& first_non_finite() const { return first_bad_; }

  // Writes the masters back into the Half parameters.
  void publish(const optim::param_rounding& r, std::uint64_t step) {
    std::uint64_t element = 0;
    for (std::size_t li = 0; li < links_.size(); ++li) {
      auto& l = links_[li];
      const f32* m = l.master.value().data();
      Half* p = l.model.value().data();
      const std::int64_t n = l.model.numel();
      if constexpr (std::is_same_v<Half, bf16>) {
        if (r.stochastic) {
          const philox_stream rs{r.seed, step << 40};
          for (std::int64_t i = 0; i < n; ++i)
            p[i] = Eigen::numext::bit_cast<bf16>(
                ops::fn::bf16_bits_stochastic(m[i], rs.bits(element + static_cast<std::uint64_t>(i))));
          element += static_cast<std::uint64_t>(n);
          continue;
        }
      }
      cpu_runtime::parallel_for(n, 1 << 15, [=](std::int64_t b, std::int64_t e) {
        for (std::int64_t i = b; i < e; ++i) p[i] = static_cast<Half>(m[i]);
      });
      element += static_cast<std::uint64_t>(n);
    }
  }

  // Bytes of the master values and of their gradients (the memory planner's figures).
  std::int64_t numel() const {
    std::int64_t n = 0;
    for (auto& l : links_) n += l.model.numel();
    return n;
  }

  // The masters as a module: visit_parameters sees var<f32> children named like the model's.
  template <class F>
  void for_each_child(F&& f) {
    for (auto& l : links_) f(l.name, l.master);
  }

 private:
  std::vector<link> links_;
  std::unordered_map<const void*, std::size_t> index_;
  bool finite_ = true;
  std::optional<std::string> first_bad_;
};

}  // namespace kiln::precision
