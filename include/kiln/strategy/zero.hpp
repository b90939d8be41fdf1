// kiln/strategy/zero.hpp — ZeRO: optimizer state (stage 1) and gradients (stage 2)
// sharded over the ranks.
//
// Spec: zero<Stage, Comm, Offload> is ddp whose optimizer is cut into world shards: the
// trainer keeps sharded_optimizer<O> (strategy/sharded_optimizer.hpp has the flat layout,
// the sharded checkpoints and ZeRO-Offload) for each optimizer, and each rank steps its
// own range.
//   stage 1: gradients are all-reduced (averaged) exactly as ddp does, buckets posted
//            during backward with one optimizer (zero_options); each rank steps
//            its segments; an all-gather of the updated parameters makes the replicas
//            whole again.
//   stage 2: gradients are reduce-scattered: each rank receives only the average of its
//            own range (half of all-reduce's traffic) and writes it into its segments;
//            the rest of each gradient buffer still holds this rank's local gradient and
//            is not used by the step. Norm clipping is computed over the shards and
//            all-reduced (clip_grad_norm below), so it equals ddp's.
// Since every rank's update of its range is the update single_device would make on those
// elements (AdamW and SGD are elementwise), the trajectory is ddp's up to float order.
// A checkpoint of zero<S> on W ranks loads into any world size and any strategy
// (single_device, ddp, the other stage): each rank writes its range beside it.
// Offload: offload::none keeps the shards where the model is (with a cuda model,
// zero<S, Comm, offload::none, cuda>, the shards, the reduce-scatter and the gather
// buffers live on the GPU: strategy/buffers.hpp). offload::cpu (ZeRO-Offload) keeps each
// rank's optimizer state and its step on the host; the memory plan puts the optimizer
// state in the cpu column. On a cpu model the copies are host to host (what the CPU tests
// run).
// Requires: N >= world; the optimizer has rebind() (adamw and sgd do); under stage 2 no
// loss scaling (the overflow test would read unreduced gradients: compile error,
// strategy/compatibility.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include "kiln/optim/clip.hpp"
#include "kiln/strategy/ddp.hpp"
#include "kiln/strategy/sharded_optimizer.hpp"

namespace kiln::strategy {

// Options of zero<1>'s gradient all-reduce (ddp's buckets; see ddp_options). zero<2>
// reduce-scatters after backward.
struct zero_options {
  double bucket_cap_mb = 25.0;
  bool overlap_backward = true;
};

template <int Stage, comm::communicator Comm, class Offload = offload::none, device Dev = cpu>
class zero : public detail::distributed<Comm, Dev> {
  static_assert(Stage == 1 || Stage == 2,
                "kiln::strategy::zero<Stage, ...>: Stage must be 1 (optimizer state), 2 (and gradients) or 3 "
                "(and parameters)");
  static_assert(std::is_same_v<Offload, offload::none> || std::is_same_v<Offload, offload::cpu>,
                "kiln::strategy::zero: Offload must be offload::none or offload::cpu");

 public:
  using offload_type = Offload;
  static constexpr int stage = Stage;
  static constexpr const char* name = Stage == 1 ? "zero1" : "zero2";
  // Capabilities (strategy/strategy.hpp). With sharded gradients the trainer refuses loss
  // scaling (strategy/compatibility.hpp).
  static constexpr bool overlaps_backward = Stage == 1;  // listen_for_backward: ddp's buckets
  static constexpr bool shards_gradients = Stage >= 2;   // clip_grad_norm over the shards
  static constexpr bool adapts_optimizers = true;        // optimizer_t, adapt: sharded_optimizer
  static constexpr bool plans_memory = true;             // memory_sharding, communication_plan
  static constexpr bool offloads_optimizer = std::is_same_v<Offload, offload::cpu>;  // offload_plan

  template <class O>
  using optimizer_t = sharded_optimizer<std::remove_cvref_t<O>, Comm, Offload>;

  zero() = default;
  explicit zero(zero_options o) : opt_(o), ddp_reducer_(o.bucket_cap_mb) {}
  void set_options(zero_options o) {  // before fit, through trainer.strategy()
    opt_ = o;
    ddp_reducer_.reset(o.bucket_cap_mb);
  }
  const zero_options& options() const { return opt_; }

  // Called by the trainer on each optimizer after the precision policy adapted it.
  template <class O>
  optimizer_t<O> adapt(O&& o) {
    optimizer_t<O> s(o, this->comm_);
    static_assert(std::is_same_v<typename decltype(s.shared_layout())::element_type::device_type, Dev>,
                  "kiln::strategy::zero: the optimizer's parameters live on another device than the strategy's "
                  "(zero<Stage, Comm, Offload, Dev>: Dev is the model's device)");
    std::erase_if(reducers_, [](auto& r) { return r.alive.expired(); });
    auto L = s.shared_layout();
    reducers_.push_back({L, [this, w = std::weak_ptr(L)] { reduce_into(*w.lock()); },
                         [this, w = std::weak_ptr(L)] {
                           if (this->world_size() == 1) return;
                           auto list = make_list(*w.lock());
                           ddp_reducer_.listen(this->comm_, list);
                         },
                         [this, w = std::weak_ptr(L)] { return shard_norm_sq(*w.lock()); },
                         [w = std::weak_ptr(L)](double f) { scale_shard(*w.lock(), f); },
                         [w = std::weak_ptr(L)] {
                           auto& l = *w.lock();
                           strategy::communication_bytes c;
                           for (auto* b : {&l.flat, &l.mine}) c += {b->device_bytes(), b->host_bytes()};
                           for (auto* b : {&l.gather_buffer, &l.copy_buffer}) c += {b->device_bytes(), b->host_bytes()};
                           return c;
                         }});
    return s;
  }

  // Stage 1 with one optimizer: its buckets are posted during the backward of the window's
  // last micro-batch, as ddp's (the trainer calls this before its forward).
  template <class M>
  void listen_for_backward(M&) {
    if constexpr (Stage == 1) {
      if (!opt_.overlap_backward) return;
      reducer* only = nullptr;
      for (auto& r : reducers_)
        if (!r.alive.expired()) {
          if (only) return;  // two optimizers share the buckets: reduce after backward
          only = &r;
        }
      if (only) only->listen();
    }
  }
  std::size_t overlapped_buckets() const { return ddp_reducer_.overlapped_buckets(); }
  std::size_t num_buckets() const { return ddp_reducer_.num_buckets(); }

  // Gradients of every sharded optimizer: all-reduced (stage 1) or reduce-scattered (2).
  template <class M>
  void reduce_gradients(M&) {
    for (auto& r : reducers_)
      if (!r.alive.expired()) r.reduce();
  }
  // Global L2 norm of the averaged gradients and clipping to max_norm (torch semantics);
  // stage 1 has whole gradients and clips them as single_device does.
  template <class M>
  double clip_grad_norm(M& target, double max_norm) {
    if constexpr (Stage == 1) {
      return optim::clip_grad_norm(target, max_norm);
    } else {
      KILN_CHECK(max_norm > 0, "clip_grad_norm: max_norm = ", max_norm, ", expected > 0");
      double sq = 0;
      for (auto& r : reducers_)
        if (!r.alive.expired()) sq += r.norm_sq();
      this->all_reduce_host(&sq, 1, comm::op::sum, "zero: gradient norm");
      const double norm = std::sqrt(sq);
      if (norm > max_norm)
        for (auto& r : reducers_)
          if (!r.alive.expired()) r.scale(max_norm / (norm + 1e-6));
      return norm;
    }
  }
  strategy::memory_sharding memory_sharding() const {
    return {this->world_size(), true, Stage >= 2, false, std::is_same_v<Offload, offload::cpu>};
  }
  // The memory plan's communication row (kiln/train/memory_plan.hpp) for `model` with one
  // optimizer over its trainable parameters (masters: f32 masters under a mixed policy),
  // and what the buffers hold once allocated.
  template <class M>
  strategy::communication_bytes communication_plan(M& model, bool masters) const {
    const auto t = detail::trainable_sizes(model, masters);
    const std::int64_t n = t.total, elem = t.stepped_bytes;
    const std::int64_t copy = masters && !std::is_same_v<Offload, offload::cpu> ? t.param_bytes : 0;
    strategy::communication_bytes c;
    if (n == 0) return c;
    const std::int64_t w = this->world_size(), s = (n + w - 1) / w;
    if constexpr (Stage == 1) {
      c += ddp_reducer_.planned(model, this->world_size());
    } else if (w > 1) {
      c += detail::comm_buffer<float, Dev, Comm>::planned(s * w);
      c += detail::comm_buffer<float, Dev, Comm>::planned(s);
    }
    c += detail::comm_buffer<u8, Dev, Comm>::planned(s * w * elem);  // every step, on one rank too
    if (copy) c += detail::comm_buffer<u8, Dev, Comm>::planned(s * w * copy);
    return c;
  }
  // ZeRO-Offload's host copies of this rank's range, each (the values the host steps, and
  // the averaged gradients copied down to it): one allocator block per parameter the
  // range touches, in the parameters' order (zero<3> orders its range by units; the
  // figure is exact where the units follow that order). 0 without offload.
  template <class M>
  std::int64_t offload_plan(M& model, bool masters) const {
    if constexpr (!std::is_same_v<Offload, offload::cpu>) {
      return 0;
    } else {
      const auto t = detail::trainable_sizes(model, masters);
      const std::int64_t n = t.total, elem = t.stepped_bytes;
      const std::int64_t w = this->world_size(), s = (n + w - 1) / w;
      const std::int64_t lo = std::min(n, this->rank() * s), hi = std::min(n, lo + s);
      std::int64_t bytes = 0, at = 0;
      for (std::int64_t k : t.numels) {
        const std::int64_t a = std::max(lo, at), b = std::min(hi, at + k);
        if (a < b) bytes += static_cast<std::int64_t>(kiln::detail::round_block_size(std::size_t((b - a) * elem)));
        at += k;
      }
      return bytes;
    }
  }
  strategy::communication_bytes buffer_bytes() const {
    strategy::communication_bytes c = ddp_reducer_.buffer_bytes();
    for (auto& r : reducers_)
      if (!r.alive.expired()) c += r.bytes();
    return c;
  }

 private:
  struct reducer {
    std::weak_ptr<void> alive;
    std::function<void()> reduce;
    std::function<void()> listen;
    std::function<double()> norm_sq;
    std::function<void(double)> scale;
    std::function<strategy::communication_bytes()> bytes;
  };

  template <class L>
  void reduce_into(L& lay) {
    if (this->world_size() == 1) return;
    auto list = make_list(lay);
    if constexpr (Stage == 1) {
      ddp_reducer_.all_reduce_mean(this->comm_, list);
    } else {
      reduce_scatter(lay);
    }
  }
  template <class L>
  static auto make_list(L& lay) {
    using NP = typename decltype(lay.params)::value_type;
    using V = decltype(NP::param);
    return detail::param_list<typename V::value_type, typename V::device_type>{&lay.params};
  }
  template <class L>
  void reduce_scatter(L& lay) {
    const std::int64_t S = lay.shard, W = lay.world;
    if (lay.flat.size() != S * W) {
      lay.flat.resize(S * W);
      lay.mine.resize(S);
    } else {
      detail::fill_zero<Dev>(lay.flat.data(), S * W);
    }
    lay.used.assign(lay.params.size(), 0);
    for (std::size_t k = 0; k < lay.params.size(); ++k) {
      auto& p = lay.params[k].param;
      if (!p.has_grad()) continue;
      lay.used[k] = 1;
      detail::convert<Dev>(lay.flat.data() + lay.offset[k], p.grad().data(), p.numel());
    }
    const auto flags = static_cast<std::int64_t>(lay.used.size());
    this->all_reduce_host(lay.used.data(), flags, comm::op::max, "zero: which gradients exist");
    this->comm_.reduce_scatter(lay.flat.send(this->comm_), lay.mine.target(this->comm_), S, comm::op::sum,
                               "zero: gradient reduce-scatter");
    lay.mine.receive();
    const float inv = 1.0f / static_cast<float>(W);
    for (std::size_t k = 0; k < lay.params.size(); ++k) {
      auto& p = lay.params[k].param;
      if (!lay.used[k]) continue;
      const auto [lo, hi] = lay.owned(k);
      if (!p.has_grad()) {  // no local gradient: start from zeros, then write the owned range
        p.begin_grad_write();
        detail::fill_zero<Dev>(p.grad().data(), p.numel());
      }
      detail::convert<Dev>(p.grad().data() + lo, lay.mine.data() + (lay.offset[k] + lo - lay.begin()), hi - lo, inv);
    }
  }
  template <class L>
  static double shard_norm_sq(L& lay) {
    optim::sum_of_squares sq;
    for (std::size_t k = 0; k < lay.params.size(); ++k) {
      auto& p = lay.params[k].param;
      const auto [lo, hi] = lay.owned(k);
      if (p.has_grad() && lo < hi) sq.add(detail::flat_view(p.grad(), lo, hi));
    }
    return sq.total();
  }
  template <class L>
  static void scale_shard(L& lay, double f) {
    for (std::size_t k = 0; k < lay.params.size(); ++k) {
      auto& p = lay.params[k].param;
      if (!p.has_grad()) continue;
      const auto [lo, hi] = lay.owned(k);
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      T* g = p.grad().data();
      if constexpr (Dev::is_host)
        for (std::int64_t i = lo; i < hi; ++i) g[i] = static_cast<T>(static_cast<double>(g[i]) * f);
      else
        detail::convert<Dev>(g + lo, g + lo, hi - lo, static_cast<float>(f));
    }
  }

  zero_options opt_{};
  std::vector<reducer> reducers_;
  detail::gradient_reducer<Comm, Dev> ddp_reducer_{opt_.bucket_cap_mb};
};

}  // namespace kiln::strategy

#include "kiln/strategy/zero3.hpp"  // zero<3, ...>
