// kiln/strategy/zero3.hpp — ZeRO stage 3 (FSDP): parameters, gradients and optimizer
// state sharded over the ranks; included by kiln/strategy/zero.hpp.
//
// Spec: zero<3, Comm, Offload> keeps, on each rank, only its range of the flat partition
// (zero.hpp) of the parameters the optimizer steps: the optimizer's segments are the
// parameters' only persistent copy. The whole parameters are *units* (nn::unit<M>
// modules, and the root unit: every stepped parameter no unit holds), each laid out
// contiguously in the flat index space, unit after unit in the order the model visits
// them. A unit's parameters are gathered when it is used and released after:
//   forward   before a unit's call its range is gathered (each owning rank broadcasts
//             its part) into the parameters' storage; after the call the storage is
//             freed again (storage_block::release: the autograd nodes keep their
//             handles, not the memory). The root unit is gathered when a step begins
//             and stays until the gradients are reduced.
//   backward  a node recorded after the unit's own nodes gathers it again before its
//             backward; a node recorded before them, which runs once its backward is
//             done, all-reduces the unit's gradients (f32, with one "has a gradient"
//             flag per parameter, so a parameter no rank used keeps none), accumulates
//             the average of this rank's range into the segments' gradients, and frees
//             the whole gradients and the parameters. The root unit's gradients are
//             reduced when the trainer reduces gradients (once per optimizer step, so
//             they accumulate over micro-steps like ddp's).
//   step     each rank steps its segments; nothing is gathered until the next use.
// Between steps a rank therefore holds parameters, gradients and optimizer state of its
// 1/world range only; within a step, the root unit plus the unit in use (with its
// gradients during its backward). Unscaling, norm clipping (a global norm: one
// all-reduce) and the finite check act on the segments (stepped_parameters(optimizer)),
// so the trajectory is single_device's up to float order.
// Checkpoints gather the whole parameters for the capture and release them after; the
// optimizer state is written as zero<1|2> writes it (each rank its range), so a zero<3>
// checkpoint loads into any world size and any strategy. When fit ends the parameters
// are gathered and stay whole (the model is usable as it is after any fit).
// Frozen parameters (requires_grad false) are not sharded: every rank keeps them whole.
// Requires: one optimizer; a precision whose parameters are what the optimizer steps
// (fp32, bf16_true, f16_true — mixed policies keep f32 masters: compile error); every
// rank calls the same units in the same order.
// Devices: with a cuda model (zero<3, Comm, offload::none, cuda>) the segments, the unit
// buffers and the released/restored parameter memory are on the GPU; the gathers and
// reductions go through strategy/buffers.hpp like zero<1|2>'s. With offload::cpu the
// segments (this rank's only copy of its range, and the optimizer's state) are host
// tensors stepped on the host: a unit's gather copies them up, its reduction copies the
// averaged range down (ZeRO-Infinity's CPU tier, without NVMe).
// Traffic per step: one broadcast of each unit's parameters per use in forward and one
// in backward (ZeRO-3's 2 all-gathers), and one all-reduce of its gradients (twice a
// reduce-scatter's bytes: the communicator has no reduce-to-owner yet).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kiln/autograd/grad_mode.hpp"
#include "kiln/autograd/tape.hpp"
#include "kiln/nn/unit.hpp"
#include "kiln/optim/clip.hpp"

namespace kiln::strategy {

template <comm::communicator Comm, class Offload, device Dev>
class zero<3, Comm, Offload, Dev> : public detail::distributed<Comm, Dev> {
  static_assert(std::is_same_v<Offload, offload::none> || std::is_same_v<Offload, offload::cpu>,
                "kiln::strategy::zero: Offload must be offload::none or offload::cpu");

 public:
  using offload_type = Offload;
  static constexpr int stage = 3;
  static constexpr const char* name = "zero3";
  // Capabilities (strategy/strategy.hpp).
  static constexpr bool shards_gradients = true;   // clip_grad_norm over the segments
  static constexpr bool adapts_optimizers = true;  // optimizer_t, adapt: sharded_optimizer
  static constexpr bool shards_parameters = true;  // before_forward, stepped_parameters, full_parameters,
                                                   // finish, abandon
  static constexpr bool plans_memory = true;       // memory_sharding, communication_plan

  template <class O>
  using optimizer_t = sharded_optimizer<std::remove_cvref_t<O>, Comm, Offload>;

  zero() = default;
  zero(const zero&) = delete;
  zero& operator=(const zero&) = delete;
  ~zero() { uninstall(); }

  // Rank 0's weights everywhere, then the units: which parameter each one holds.
  template <class M>
  void setup(M& model) {
    uninstall();
    this->broadcast_parameters(model);
    std::map<const void*, std::size_t> holder = find_units(model, units_);
    std::vector<std::vector<const void*>> per_unit(units_.size());
    nn::visit_parameters(model, [&](const std::string&, auto& p) {
      const auto it = holder.find(p.id());
      per_unit[it == holder.end() ? 0 : it->second].push_back(p.id());
    });
    order_.clear();
    for (auto& ids : per_unit) order_.insert(order_.end(), ids.begin(), ids.end());
    holder_ = std::move(holder);
  }

  // Called by the trainer on the optimizer; from here on the parameters are sharded.
  template <class O>
  optimizer_t<O> adapt(O&& o) {
    KILN_CHECK(ops_.layout.expired(),
               "strategy::zero<3> shards the parameters of one optimizer; this module configures more than one");
    optimizer_t<O> s(o, this->comm_, order_);
    bind(s);
    return s;
  }

  // What the optimizer it adapted steps: this rank's segments, as a module named
  // "fc1.weight[lo:hi]" (what unscaling, clipping and the finite check act on).
  template <class O>
  auto stepped_parameters(O& optimizer) {
    return optimizer.segment_parameters();
  }
  // The root unit, gathered before a step's (or an evaluation's) forward.
  void before_forward() {
    if (active_) ensure(0);
  }
  // The root unit's gradients, reduced into the segments; every unit is released (the
  // step makes their whole copies stale).
  template <class M>
  void reduce_gradients(M&) {
    if (!active_) return;
    if (units_[0].resident) ops_.reduce(0);
    for (std::size_t u = 0; u < units_.size(); ++u) {
      units_[u].pending = 0;
      if (units_[u].resident) release(u);
    }
  }
  // The global L2 norm of the averaged gradients (the segments' squares summed over the
  // ranks) and clipping to max_norm, as single_device clips the whole gradients.
  template <class M>
  double clip_grad_norm(M& segments, double max_norm) {
    KILN_CHECK(max_norm > 0, "clip_grad_norm: max_norm = ", max_norm, ", expected > 0");
    double sq = optim::grad_sq_sum(segments);
    this->all_reduce_host(&sq, 1, comm::op::sum, "zero3: gradient norm");
    const double norm = std::sqrt(sq);
    if (norm > max_norm) optim::scale_gradients(segments, max_norm / (norm + 1e-6));
    return norm;
  }

  // The whole parameters for the duration of the returned guard (checkpoint capture; a
  // collective). A no-op when nothing is sharded.
  class full_parameters_guard {
   public:
    explicit full_parameters_guard(zero* z) : z_(z) {
      if (!z_->active_) return;
      for (std::size_t u = 0; u < z_->units_.size(); ++u)
        if (!z_->units_[u].resident) {
          z_->gather(u);
          gathered_.push_back(u);
        }
    }
    full_parameters_guard(const full_parameters_guard&) = delete;
    full_parameters_guard& operator=(const full_parameters_guard&) = delete;
    ~full_parameters_guard() {
      if (z_->active_)
        for (std::size_t u : gathered_) z_->release(u);
    }

   private:
    zero* z_;
    std::vector<std::size_t> gathered_;
  };
  full_parameters_guard full_parameters() { return full_parameters_guard(this); }
  // End of a successful fit: every parameter whole again, sharding off.
  template <class M>
  void finish(M&) {
    if (!active_) return;
    for (std::size_t u = 0; u < units_.size(); ++u) ensure(u);
    uninstall();
  }
  // A failed fit (no collective may run): sharding off, memory back, values undefined.
  void abandon() {
    if (!active_) return;
    if (ops_.restore_all) ops_.restore_all();
    uninstall();
  }

  strategy::memory_sharding memory_sharding() const { return {this->world_size(), true, true, true, false}; }
  // The memory plan's communication row: the unit buffers, grown to the largest unit (its
  // parameters for the gather; f32 gradients plus one flag per parameter for the
  // reduction), for the units setup() will find; and what they hold once allocated.
  template <class M>
  strategy::communication_bytes communication_plan(M& model, bool /*masters: zero<3> has none*/) const {
    std::vector<unit_state> found;
    const std::map<const void*, std::size_t> holder = find_units(model, found);
    const std::size_t units = found.size();
    std::vector<std::int64_t> bytes(units, 0), elements(units, 0), params(units, 0);
    nn::visit_parameters(model, [&](const std::string&, auto& p) {
      if (!p.requires_grad()) return;
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      const auto it = holder.find(p.id());
      const std::size_t u = it == holder.end() ? 0 : it->second;
      bytes[u] += p.numel() * std::int64_t(sizeof(T));
      elements[u] += p.numel();
      ++params[u];
    });
    std::int64_t gather = 0, reduce = 0;
    for (std::size_t u = 0; u < units; ++u) {
      gather = std::max(gather, bytes[u]);
      if (elements[u] > 0) reduce = std::max(reduce, elements[u] + params[u]);
    }
    strategy::communication_bytes c = detail::comm_buffer<u8, Dev, Comm>::planned(gather);
    c += detail::comm_buffer<float, Dev, Comm>::planned(reduce);
    return c;
  }
  strategy::communication_bytes buffer_bytes() const {
    return ops_.bytes ? ops_.bytes() : strategy::communication_bytes{};
  }

  // Introspection (tests, docs): units in layout order, and whether each is gathered.
  std::size_t num_units() const { return units_.size(); }
  const std::string& unit_name(std::size_t u) const { return units_[u].name; }
  bool unit_resident(std::size_t u) const { return units_[u].resident; }
  bool active() const { return active_; }

 private:
  struct unit_state {
    std::string name;
    const void* id = nullptr;
    bool resident = true;
    int pending = 0;  // forward calls whose backward has not finished
    std::vector<std::size_t> params;
    std::int64_t begin = 0, end = 0;
  };
  // The root unit, then every nn::unit of `model` in visit order, into `units`; returns
  // which unit holds each parameter (the innermost; the root holds the rest).
  template <class M>
  static std::map<const void*, std::size_t> find_units(M& model, std::vector<unit_state>& units) {
    units.clear();
    units.push_back({"(root)", nullptr});
    std::map<const void*, std::size_t> holder;
    nn::visit_modules(model, [&](const std::string& name, auto& sub) {
      if constexpr (nn::sharding_unit<std::remove_cvref_t<decltype(sub)>>) {
        const std::size_t u = units.size();
        units.push_back({name, static_cast<const void*>(&sub)});
        nn::visit_parameters(sub, [&](const std::string&, auto& p) { holder[p.id()] = u; });  // innermost wins
      }
    });
    return holder;
  }
  // The typed work, bound to the optimizer's layout and segments.
  struct typed_ops {
    std::weak_ptr<void> layout;
    std::function<void(std::size_t)> gather, release, reduce;
    std::function<void()> restore_all;
    std::function<strategy::communication_bytes()> bytes;
  };

  template <class S>
  void bind(S& s) {
    auto L = s.shared_layout();
    // Units in the layout: each parameter's unit, and each unit's flat range.
    for (auto& u : units_) {
      u.params.clear();
      u.begin = L->total;
      u.end = 0;
    }
    for (std::size_t k = 0; k < L->params.size(); ++k) {
      const auto it = holder_.find(L->params[k].param.id());
      auto& u = units_[it == holder_.end() ? 0 : it->second];
      u.params.push_back(k);
      u.begin = std::min(u.begin, L->offset[k]);
      u.end = std::max(u.end, L->offset[k] + L->params[k].param.numel());
    }
    for (auto& u : units_)
      if (u.params.empty()) u.begin = u.end = 0;
    ops_ = make_ops(L, s.segments());
    ops_.layout = L;
    index_.clear();
    for (std::size_t u = 0; u < units_.size(); ++u) {
      index_[units_[u].id] = u;
      units_[u].resident = true;
      units_[u].pending = 0;
    }
    for (std::size_t u = 0; u < units_.size(); ++u) release(u);
    install();
  }

  template <class L, class Segs>
  typed_ops make_ops(const std::shared_ptr<L>& lay, Segs segs) {
    using NP = typename decltype(lay->params)::value_type;
    using V = decltype(NP::param);
    using T = typename V::value_type;
    using SD = typename std::remove_cvref_t<decltype(segs[0].second)>::device_type;  // offload::cpu: the host
    typed_ops o;
    std::vector<std::int64_t> seg_of(lay->params.size(), -1);
    for (std::size_t i = 0; i < segs.size(); ++i) seg_of[segs[i].first] = static_cast<std::int64_t>(i);
    // The unit buffers, on the model's device (grown to the largest unit, then kept).
    auto buf = std::make_shared<detail::comm_buffer<u8, Dev, Comm>>();
    auto fbuf = std::make_shared<detail::comm_buffer<float, Dev, Comm>>();
    L* Lp = lay.get();
    o.gather = [this, Lp, segs, seg_of, buf](std::size_t ui) {
      auto& u = units_[ui];
      const std::int64_t n = u.end - u.begin, S = Lp->shard, bytes = n * std::int64_t(sizeof(T));
      buf->reserve(bytes);
      T* b = reinterpret_cast<T*>(buf->data());
      // This rank's part of the unit's range, from its segments.
      for (std::size_t k : u.params) {
        const auto [lo, hi] = Lp->owned(k);
        if (lo == hi) continue;
        const auto& v = segs[static_cast<std::size_t>(seg_of[k])].second;
        detail::copy_across<Dev, SD>(b + (Lp->offset[k] + lo - u.begin), v.value().data(), hi - lo);
      }
      // Each owner's part to every rank.
      if (n > 0 && Lp->world > 1) {
        T* c = reinterpret_cast<T*>(buf->send(this->comm_, bytes));
        const int first = static_cast<int>(u.begin / S), last = static_cast<int>((u.end - 1) / S);
        for (int r = first; r <= last; ++r) {
          const std::int64_t lo = std::max(u.begin, std::int64_t(r) * S), hi = std::min(u.end, std::int64_t(r + 1) * S);
          if (lo >= hi) continue;
          this->comm_.broadcast(reinterpret_cast<std::byte*>(c + (lo - u.begin)), (hi - lo) * std::int64_t(sizeof(T)),
                                r, "zero3: gather of unit '" + u.name + "' from rank " + std::to_string(r));
        }
        buf->receive(bytes);
      }
      for (std::size_t k : u.params) {
        auto& p = Lp->params[k].param;
        p.value().restore_storage();
        detail::copy_elements<Dev>(p.value().data(), b + (Lp->offset[k] - u.begin), p.numel());
      }
    };
    o.release = [this, Lp](std::size_t ui) {
      for (std::size_t k : units_[ui].params) {
        auto& p = Lp->params[k].param;
        p.value().release_storage();
      }
    };
    o.reduce = [this, Lp, segs, seg_of, fbuf](std::size_t ui) {
      auto& u = units_[ui];
      const std::int64_t n = u.end - u.begin;
      const std::size_t np = u.params.size();
      if (n == 0) return;
      // The unit's gradients in f32, then one flag per parameter (1: this rank has one).
      const std::int64_t total = n + static_cast<std::int64_t>(np);
      fbuf->reserve(total);
      float* f = fbuf->data();
      detail::fill_zero<Dev>(f, total);
      for (std::size_t j = 0; j < np; ++j) {
        auto& p = Lp->params[u.params[j]].param;
        if (!p.has_grad()) continue;
        detail::fill<Dev>(f + n + static_cast<std::int64_t>(j), 1, 1.0f);
        detail::convert<Dev>(f + (Lp->offset[u.params[j]] - u.begin), p.grad().data(), p.numel());
      }
      this->comm_.all_reduce(fbuf->send(this->comm_, total), total, comm::op::sum,
                             "zero3: gradients of unit '" + u.name + "'");
      fbuf->receive(total);
      std::vector<float> flags(np);
      detail::read_to_host<Dev>(flags.data(), f + n, static_cast<std::int64_t>(np));
      const float inv = 1.0f / static_cast<float>(Lp->world);
      for (std::size_t j = 0; j < np; ++j) {
        const std::size_t k = u.params[j];
        auto& p = Lp->params[k].param;
        p.grad() = {};  // the whole gradient is done with
        p.zero_grad();
        if (flags[j] == 0.0f || seg_of[k] < 0) continue;
        const auto [lo, hi] = Lp->owned(k);
        const auto& v = segs[static_cast<std::size_t>(seg_of[k])].second;
        const grad_write mode = v.begin_grad_write();
        const float* src = f + (Lp->offset[k] + lo - u.begin);
        if constexpr (std::is_same_v<SD, Dev>) {
          detail::convert<Dev>(v.grad().data(), src, hi - lo, inv, mode);
        } else {  // offloaded segments: the average's range to the host, added there
          std::vector<float> h(static_cast<std::size_t>(hi - lo));
          detail::read_to_host<Dev>(h.data(), src, hi - lo);
          detail::convert<cpu>(v.grad().data(), h.data(), hi - lo, inv, mode);
        }
      }
    };
    o.restore_all = [Lp] {
      for (auto& np : Lp->params) np.param.value().restore_storage();
    };
    o.bytes = [buf, fbuf] {
      strategy::communication_bytes c{buf->device_bytes(), buf->host_bytes()};
      c += {fbuf->device_bytes(), fbuf->host_bytes()};
      return c;
    };
    return o;
  }

  void gather(std::size_t u) {
    ops_.gather(u);
    units_[u].resident = true;
  }
  void release(std::size_t u) {
    ops_.release(u);
    units_[u].resident = false;
  }
  void ensure(std::size_t u) {
    if (!units_[u].resident) gather(u);
  }

  // The nodes around a unit's backward.
  struct marker {
    zero* z;
    std::size_t u;
    bool before_backward;
    bool operator()() {
      if (before_backward)
        z->ensure(u);
      else
        z->after_backward(u);
      return true;
    }
    bool referenced() const { return false; }
  };
  void after_backward(std::size_t u) {
    if (--units_[u].pending > 0) return;
    units_[u].pending = 0;
    ops_.reduce(u);
    release(u);
  }
  void on_before(const void* id) {
    const auto it = index_.find(id);
    if (it == index_.end()) return;  // a unit of another model
    const std::size_t u = it->second;
    ensure(0);
    ensure(u);
    if (autograd::grad_enabled()) {
      ++units_[u].pending;
      autograd::tape::current().record(marker{this, u, false});
    }
  }
  void on_after(const void* id) {
    const auto it = index_.find(id);
    if (it == index_.end()) return;
    const std::size_t u = it->second;
    if (autograd::grad_enabled()) autograd::tape::current().record(marker{this, u, true});
    release(u);
  }

  void install() {
    hooks_.self = this;
    hooks_.before = [](void* s, const void* id) { static_cast<zero*>(s)->on_before(id); };
    hooks_.after = [](void* s, const void* id) { static_cast<zero*>(s)->on_after(id); };
    nn::unit_hooks::current() = &hooks_;
    active_ = true;
  }
  void uninstall() {
    if (nn::unit_hooks::current() == &hooks_) nn::unit_hooks::current() = nullptr;
    active_ = false;
  }

  std::vector<unit_state> units_;
  std::map<const void*, std::size_t> holder_, index_;
  std::vector<const void*> order_;
  typed_ops ops_;
  nn::unit_hooks hooks_;
  bool active_ = false;
};

}  // namespace kiln::strategy
