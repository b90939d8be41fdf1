// kiln/precision/master_weights.hpp — f32 master copies of a module's bf16/f16 parameters.
//
// Spec: master_weights<Half, Dev> pairs every trainable Half parameter (on Dev) of a
// module with an f32 var of the same name and shape on the same device (the *master*),
// which the optimizer steps instead of the Half one (DeepSpeed's and Megatron's
// mixed-precision layout: Half copies for compute, f32 for the update, so an update far
// below a Half ulp is not lost).
//   bind(model)     creates the masters from the model's values; a floating parameter of
//                   another element type is an error naming it (mixed precision trains
//                   one compute type);
//   fold()          adds every open Half gradient into its master's f32 gradient (the
//                   first fold of an accumulation window overwrites — the master's own
//                   window, closed by the optimizer's zero_grad, says which), closes the
//                   Half window so the next backward overwrites, and records whether any
//                   folded element was inf or NaN (until clear_overflow(), which the
//                   policy calls once a window's step is done). On cuda the fold is one
//                   multi-tensor kernel and the record is taken when overflow() is first
//                   asked after a fold: Σ g² (f64) of every master gradient into one
//                   vector, read back once. A non-finite sum stays non-finite through
//                   later folds and scaling, but not through clipping by value (which
//                   clamps inf), so the policy asks in unscale, before clipping;
//   copies(r, t)    the table that lets optim::adamw write the masters it steps (those
//                   with a gradient), rounded to Half, into the model in the step's own
//                   pass (optim::compute_copies);
//   publish(r, t)   the write-back as a separate host pass, for optimizers without
//                   step(compute_copies) (ZeRO's sharded step, whose ranks gather masters
//                   they did not step): every master into its Half parameter, rounded to
//                   nearest or stochastically (r);
//   for_each_child  makes the masters a module (flat names "net.0.weight"), so gradient
//                   clipping, norms and nan checks run on them unchanged.
// Stochastic rounding draws element e of link l, at write-back t, from philox (r.seed,
// t << 40) at counter (elements of the links before l) + e, in both write-backs, so
// CPU and GPU runs round alike. The two differ only for a master without a gradient in
// that step: the fused write-back leaves its Half copy alone, publish re-rounds it
// (identical to nearest, a fresh draw stochastically).
// Cost: fold reads 2 B + 4 B and writes 4 B per element; the fused write-back adds 2 B
// written to the optimizer's pass, publish reads 4 B and writes 2 B.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/ops/kernel/functors.hpp"
#include "kiln/optim/optimizer.hpp"
#include "kiln/precision/policy.hpp"

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
      } else if constexpr (std::is_same_v<typename P::value_type, Half>) {
        KILN_CHECK(!p.requires_grad(), policy, ": parameter '", name, "' lives on ", P::device_type::name,
                   " but the trainer's strategy runs on ", Dev::name,
                   "; build the module on the strategy's device (or freeze the parameter)");
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

  // Adds the open Half gradients into the masters (see the spec).
  void fold() {
    if constexpr (!Dev::is_host) {
      fold_device();
      return;
    }
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
      if (!std::isfinite(probe)) finite_ = false;
      l.model.zero_grad();
    }
  }
  // Resets the overflow record; the policy calls it when a window's step is done.
  void clear_overflow() {
    finite_ = true;
    unscreened_ = false;
  }
  // Whether any element folded since clear_overflow() was inf or NaN.
  bool overflow() const {
    screen();
    return !finite_;
  }
  // Records an overflow (restoring a checkpoint taken inside a window).
  void mark_overflow() { finite_ = false; }

  // The fused write-back's table: each master's model parameter and rounding counter
  // (see the spec), for the optimizer's step(compute_copies).
  optim::compute_copies<Half, Dev> copies(const optim::param_rounding& r, std::uint64_t step) {
    optim::compute_copies<Half, Dev> c;
    c.stochastic = std::is_same_v<Half, bf16> && r.stochastic;
    c.stream = philox_stream{r.seed, step << 40};
    std::int64_t element = 0;
    for (auto& l : links_) {
      c.of.emplace(l.master.id(), typename optim::compute_copies<Half, Dev>::target{l.model.value().data(), element});
      element += l.model.numel();
    }
    return c;
  }

  // Writes the masters back into the Half parameters.
  void publish(const optim::param_rounding& r, std::uint64_t step) {
    static_assert(Dev::is_host,
                  "master_weights::publish is a host pass; on cuda the optimizer writes the copies in its step "
                  "(step(compute_copies))");
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
  // The cuda fold: one launch of the multi-tensor kernel over every open gradient.
  void fold_device() {
    namespace ck = cuda_kernels;
    std::vector<ck::fold_chunk> chunks;
    for (auto& l : links_) {
      if (!l.model.has_grad()) continue;
      const std::int32_t accumulate = l.master.begin_grad_write() == grad_write::accumulate ? 1 : 0;
      const Half* g = l.model.grad().data();
      f32* mg = l.master.grad().data();
      const std::int64_t n = l.model.numel();
      for (std::int64_t off = 0; off < n; off += ck::adamw_chunk_elements)
        chunks.push_back({g + off, mg + off, std::min(ck::adamw_chunk_elements, n - off), accumulate});
    }
    if (chunks.empty()) return;
    const auto table = cuda_runtime::upload(chunks);
    ck::fold_gradients<Half>(reinterpret_cast<const ck::fold_chunk*>(table.data()), static_cast<int>(chunks.size()),
                             cuda_runtime::compute_stream());
    // The Half buffers stay allocated (zero_grad only closes the window), and the next
    // backward that overwrites them is enqueued after this kernel.
    for (auto& l : links_) l.model.zero_grad();
    unscreened_ = true;
  }
  // The cuda overflow record, taken once per fold when asked (see the spec).
  void screen() const {
    if constexpr (!Dev::is_host) {
      if (!unscreened_) return;
      unscreened_ = false;
      if (finite_ && detail::any_non_finite_gradient(const_cast<master_weights&>(*this))) finite_ = false;
    }
  }

  std::vector<link> links_;
  std::unordered_map<const void*, std::size_t> index_;
  mutable bool finite_ = true;
  mutable bool unscreened_ = false;  // cuda: folded since the overflow record was last taken
};

}  // namespace kiln::precision
