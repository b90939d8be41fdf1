// kiln/strategy/ddp.hpp — data parallelism: every rank holds the whole model.
//
// Spec: ddp<Comm> keeps a full replica of the model on every rank of Comm (comm::mpi on
// CPU). At setup it broadcasts rank 0's parameters, so every replica starts identical
// whatever each rank's seed did. The trainer calls reduce_gradients once per optimizer
// step, after the last backward of an accumulation window (the micro-steps before it
// communicate nothing: no_sync is the default, not an option), on the gradients the
// optimizer steps (the f32 masters under mixed precision). Gradients are packed into
// f32 buckets of at most bucket_cap_mb (25 MB, PyTorch's default) in reverse parameter
// order, each bucket's all-reduce is posted as soon as it is packed, and the average
// over ranks is written back; a parameter no rank produced a gradient for keeps none.
// Every rank then takes the same optimizer step on the same averaged gradients, so the
// replicas stay identical. With each rank's loader sharded by the trainer
// (distributed_sampler: rank r takes elements r, r + world, ... of the epoch's order), a
// global batch of world·b reproduces single_device's batch of the same size up to the
// order of the floating-point sum.
// Logging and checkpoints: only rank 0 logs and writes; every rank joins the capture
// (so sharded strategies can gather). log(..., sync_dist = true) all-reduces the value:
// mean, sum, max or min over ranks of each rank's value.
// Overlap (ddp_options::overlap_backward, on by default): for the window's last
// micro-batch the trainer has ddp listen on the autograd tape before the forward; the
// tape reports each parameter as soon as the last node that writes its gradient has run,
// and a bucket is packed and posted the moment all of its parameters and every earlier
// bucket's are reported, so the reduction of the last layers runs while backward computes
// the first ones (on cuda, NCCL's stream beside the compute stream). What was not
// reported (a parameter no node read on this rank, or read inside nn::thread_replicas)
// is posted after backward. The result is the same bits as posting after backward: the
// same buckets, the same sums. A gradient written after its bucket was packed would be
// lost, so it is an error naming the parameter (var::seal). Policies that reduce master
// copies (bf16_mixed, f16_mixed: the fold into the masters comes after backward) reduce
// after backward.
// Devices: ddp<Comm, Dev> keeps its buckets on Dev, the model's device (cpu by default).
// On cuda they are packed and unpacked by kernels and reduced in place by comm::nccl, or
// through pinned host memory by comm::mpi (strategy/buffers.hpp); a module whose
// parameters live elsewhere than Dev is a compile error.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kiln/autograd/tape.hpp"
#include "kiln/comm/communicator.hpp"
#include "kiln/core/device.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/strategy/buffers.hpp"
#include "kiln/strategy/memory.hpp"
#include "kiln/strategy/reduce.hpp"
#include "kiln/strategy/strategy.hpp"

namespace kiln::strategy {

namespace detail {

// One parameter as the reducers see it, whatever its element type; the pointers are on
// the parameter's device.
struct grad_slot {
  std::string name;
  const void* id = nullptr;  // the parameter's identity (var::id)
  std::int64_t numel = 0;
  std::function<void(const std::string*)> seal;  // see var::seal
  std::function<bool()> has_grad;
  std::function<void(float*)> pack;                // gradient → f32 (zeros when it has none)
  std::function<void(const float*, float)> store;  // f32 · factor → gradient (creating it)
};

template <class M>
std::vector<grad_slot> grad_slots(M& target) {
  std::vector<grad_slot> out;
  nn::visit_parameters(target, [&](const std::string& name, auto& p) {
    if (!p.requires_grad()) return;
    using V = std::remove_cvref_t<decltype(p)>;
    using D = typename V::device_type;
    auto v = p;  // a handle: shares the parameter's state
    grad_slot s;
    s.name = name;
    s.id = v.id();
    s.numel = v.numel();
    s.seal = [v](const std::string* by) { v.seal(by); };
    s.has_grad = [v] { return v.has_grad(); };
    s.pack = [v](float* dst) {
      if (!v.has_grad())
        fill_zero<D>(dst, v.numel());
      else
        convert<D>(dst, v.grad().data(), v.numel());
    };
    s.store = [v](const float* src, float f) mutable {
      v.begin_grad_write();
      convert<D>(v.grad().data(), src, v.numel(), f);
    };
    out.push_back(std::move(s));
  });
  return out;
}

// The trainable parameters as the memory plans see them: each one's element count, their
// sum, and the bytes of an element the optimizer steps (4 for f32 masters) and of one
// parameter element (the last parameter's type: the plans assume one type).
struct trainable {
  std::vector<std::int64_t> numels;
  std::int64_t total = 0, stepped_bytes = 0, param_bytes = 0;
};
template <class M>
trainable trainable_sizes(M& target, bool masters) {
  trainable t;
  nn::visit_parameters(target, [&](const std::string&, auto& p) {
    if (!p.requires_grad()) return;
    using T = typename std::remove_cvref_t<decltype(p)>::value_type;
    t.numels.push_back(p.numel());
    t.total += p.numel();
    t.param_bytes = std::int64_t(sizeof(T));
    t.stepped_bytes = masters ? 4 : t.param_bytes;
  });
  return t;
}

// The base of every multi-rank strategy: rank queries, metric reduction, broadcasts, and
// setup (rank 0's weights on every rank).
template <comm::communicator Comm, device Dev>
class distributed {
  static_assert(comm_reaches<Comm, Dev>,
                "kiln::strategy (ddp / zero): this communicator moves device buffers (comm::nccl) but the model is "
                "on the cpu device; on CPU ranks use comm::mpi");

 public:
  using device_type = Dev;
  // Capability (strategy/strategy.hpp): agree, broadcast_string, abort_job.
  static constexpr bool coordinates_ranks = true;

  template <class M>
  void setup(M& model) {
    broadcast_parameters(model);
  }
  using communicator_type = Comm;
  int rank() const { return comm_.rank(); }
  int world_size() const { return comm_.world_size(); }
  bool is_global_zero() const { return comm_.rank() == 0; }
  Comm& communicator() { return comm_; }

  double reduce(double v, strategy::reduce r) {
    const comm::op o = r == strategy::reduce::max   ? comm::op::max
                       : r == strategy::reduce::min ? comm::op::min
                                                    : comm::op::sum;
    all_reduce_host(&v, 1, o, "log(sync_dist)");
    if (r == strategy::reduce::mean) v /= world_size();
    return v;
  }
  void barrier() { comm_.barrier("barrier"); }
  // The maximum over ranks of each of n flags, in place (the trainer's stop and save
  // agreement at each quiet point: one small all-reduce).
  void agree(std::int64_t* v, int n) { all_reduce_host(v, n, comm::op::max, "trainer: stop/save agreement"); }
  // Rank 0's string on every rank (checkpoint requests, so every rank joins a capture).
  void broadcast_string(std::string& s) {
    std::int64_t n = static_cast<std::int64_t>(s.size());
    broadcast_host(reinterpret_cast<std::byte*>(&n), sizeof n, "broadcast_string.size");
    s.resize(static_cast<std::size_t>(n));
    if (n > 0) broadcast_host(reinterpret_cast<std::byte*>(s.data()), n, "broadcast_string");
  }
  // A collective on values in host memory, whatever memory the communicator takes.
  template <class T>
  void all_reduce_host(T* v, std::int64_t n, comm::op o, std::string_view label) {
    through_comm_memory<cpu>(comm_, v, n, [&](T* q) { comm_.all_reduce(q, n, o, label); });
  }
  void broadcast_host(std::byte* v, std::int64_t n, std::string_view label) {
    through_comm_memory<cpu>(comm_, v, n, [&](std::byte* q) { comm_.broadcast(q, n, 0, label); });
  }
  // A fit that failed on this rank ends the job (the trainer calls it after on_exception):
  // the other ranks would otherwise wait in their next collective until the watchdog.
  void abort_job(const std::exception& e) {
    if constexpr (requires { comm_.abort(1, std::string_view{}); })
      if (world_size() > 1) comm_.abort(1, std::string("fit failed: ") + e.what());
  }
  // Rank 0's parameter values on every rank, bit for bit.
  template <class M>
  void broadcast_parameters(M& model) {
    nn::visit_parameters(model, [&](const std::string& name, auto& p) {
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      using D = typename std::remove_cvref_t<decltype(p)>::device_type;
      static_assert(std::is_same_v<D, Dev>,
                    "kiln::strategy (ddp / zero): the module's parameters live on another device than the strategy's; "
                    "name the module's device in the strategy: strategy::ddp<Comm, kiln::cuda>, "
                    "strategy::zero<Stage, Comm, strategy::offload::none, kiln::cuda>");
      auto& v = p.value();
      KILN_CHECK(v.is_contiguous(), "strategy: parameter '", name, "' is not contiguous");
      if constexpr (requires { comm_.device(); })
        if (v.numel() > 0) {
          const int at = cuda_runtime::device_of(v.data());
          KILN_CHECK(at == comm_.device(), "strategy ", Comm::name, ": parameter '", name, "' lives on GPU ", at,
                     ", but rank ", rank(), " communicates on GPU ", comm_.device(),
                     "; call kiln::cuda_runtime::use_local_device() before building the model");
        }
      through_comm_memory<Dev>(
          comm_, reinterpret_cast<std::byte*>(v.data()), v.numel() * std::int64_t(sizeof(T)), [&](std::byte* q) {
            comm_.broadcast(q, v.numel() * std::int64_t(sizeof(T)), 0, "broadcast of parameter " + name);
          });
    });
  }

 protected:
  Comm comm_{};
};

// Bucketed all-reduce of the gradients of `target` (parameters on Dev), averaged over
// ranks. With listen(), the buckets are posted during the backward that follows.
template <class Comm, device Dev = cpu>
class gradient_reducer {
  using handle = decltype(std::declval<Comm&>().iall_reduce(static_cast<float*>(nullptr), std::int64_t{}, comm::op::sum,
                                                            std::string_view{}));

 public:
  explicit gradient_reducer(double bucket_cap_mb = 25.0) : cap_mb_(bucket_cap_mb) {}
  // The tape holds `this` while listening, and parameters point at the slots' names while
  // sealed: neither may move.
  gradient_reducer(const gradient_reducer&) = delete;
  gradient_reducer& operator=(const gradient_reducer&) = delete;
  ~gradient_reducer() { reset(cap_mb_); }
  // A new bucket cap; the buckets are rebuilt at the next reduction.
  void reset(double bucket_cap_mb) {
    stop();
    for (auto& s : slots_) s.seal(nullptr);
    cap_mb_ = bucket_cap_mb;
    slots_.clear();
    bound_.clear();
    buckets_.clear();
  }

  // Before the forward of a micro-batch that ends an accumulation window: listen on this
  // thread's tape, so that each bucket is packed and its all-reduce posted as soon as
  // backward has finished every gradient in it and every bucket before it (the ranks
  // post the same collectives in the same order). all_reduce_mean then posts the rest.
  template <class M>
  void listen(Comm& c, M& target) {
    if (c.world_size() == 1) return;
    bind(target);
    start(c);
    waiting_.clear();
    for (auto& bk : buckets_) waiting_.push_back(static_cast<std::int64_t>(bk.slots.size()));
    ready_.assign(slots_.size(), 0);
    autograd::tape::current().listen({&gradient_reducer::on_ready, this});
    listening_ = true;
  }

  template <class M>
  void all_reduce_mean(Comm& c, M& target) {
    if (c.world_size() == 1) return;
    if (listening_) {
      stop();
      KILN_CHECK(trainable_ids(target) == bound_,
                 "ddp: the trainable parameters changed between the forward and the reduction");
    } else {
      bind(target);
      start(c);
    }
    while (next_ < buckets_.size()) launch(next_++);
    // Which parameters some rank has a gradient for (a branch one rank skipped still
    // gets the others' average; one no rank used keeps no gradient, as on one rank).
    used_.assign(slots_.size(), 0);
    for (std::size_t i = 0; i < slots_.size(); ++i) used_[i] = slots_[i].has_grad() ? 1 : 0;
    const auto flags = static_cast<std::int64_t>(used_.size());
    through_comm_memory<cpu>(c, used_.data(), flags, [&](std::int64_t* q) {
      c.all_reduce(q, flags, comm::op::max, "ddp: which gradients exist");
    });
    const float inv = 1.0f / static_cast<float>(c.world_size());
    for (auto& s : slots_) s.seal(nullptr);
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      pending_[b].wait();
      auto& bk = buckets_[b];
      bk.data.receive();
      for (std::size_t k = 0; k < bk.slots.size(); ++k)
        if (used_[bk.slots[k]]) slots_[bk.slots[k]].store(bk.data.data() + bk.offsets[k], inv);
    }
    pending_.clear();
    comm_ = nullptr;
  }
  // Buckets the last reduction posted while backward still had nodes to run.
  std::size_t overlapped_buckets() const { return overlapped_; }
  std::size_t num_buckets() const { return buckets_.size(); }

 private:
  struct bucket {
    std::vector<std::size_t> slots;
    std::vector<std::int64_t> offsets;
    comm_buffer<float, Dev, Comm> data;
  };
  // Slots and buckets are built once per set of parameters (the same vars in the same
  // order): a step only checks their identities.
  template <class M>
  static std::vector<const void*> trainable_ids(M& target) {
    std::vector<const void*> ids;
    nn::visit_parameters(target, [&](const std::string&, auto& p) {
      if (p.requires_grad()) ids.push_back(p.id());
    });
    return ids;
  }
  template <class M>
  void bind(M& target) {
    auto ids = trainable_ids(target);
    if (ids == bound_ && !buckets_.empty()) return;
    for (auto& s : slots_) s.seal(nullptr);  // before the names they point at go
    slots_ = grad_slots(target);
    bound_ = std::move(ids);
    buckets_.clear();
    std::vector<std::int64_t> numels;
    for (auto& s : slots_) numels.push_back(s.numel);
    bucket_of_.assign(slots_.size(), 0);
    slot_of_.clear();
    for (std::size_t i = 0; i < slots_.size(); ++i) slot_of_[slots_[i].id] = i;
    for (auto& members : partition(numels)) {
      bucket cur;
      std::int64_t fill = 0;
      for (std::size_t i : members) {
        cur.slots.push_back(i);
        cur.offsets.push_back(fill);
        bucket_of_[i] = buckets_.size();
        fill += slots_[i].numel;
      }
      cur.data.resize(fill);
      buckets_.push_back(std::move(cur));
    }
  }
  // The buckets over parameters of these sizes: slot indices, in reverse (the order
  // backward finishes them), each bucket at most the cap (or one larger parameter).
  std::vector<std::vector<std::size_t>> partition(const std::vector<std::int64_t>& numels) const {
    const auto cap = std::max<std::int64_t>(1, static_cast<std::int64_t>(cap_mb_ * 1024 * 1024 / sizeof(float)));
    std::vector<std::vector<std::size_t>> out;
    std::vector<std::size_t> cur;
    std::int64_t fill = 0;
    for (std::size_t i = numels.size(); i-- > 0;) {
      if (fill > 0 && fill + numels[i] > cap) {
        out.push_back(std::move(cur));
        cur.clear();
        fill = 0;
      }
      cur.push_back(i);
      fill += numels[i];
    }
    if (fill > 0) out.push_back(std::move(cur));
    return out;
  }

 public:
  // The buckets' bytes: as allocated (buffer_bytes), or as they will be for `target`
  // (planned; nothing is allocated on one rank).
  strategy::communication_bytes buffer_bytes() const {
    strategy::communication_bytes c;
    for (auto& b : buckets_) c += {b.data.device_bytes(), b.data.host_bytes()};
    return c;
  }
  template <class M>
  strategy::communication_bytes planned(M& target, int world) const {
    strategy::communication_bytes c;
    if (world == 1) return c;
    const auto numels = trainable_sizes(target, false).numels;
    for (auto& members : partition(numels)) {
      std::int64_t fill = 0;
      for (std::size_t i : members) fill += numels[i];
      c += comm_buffer<float, Dev, Comm>::planned(fill);
    }
    return c;
  }

 private:
  double cap_mb_;
  std::vector<grad_slot> slots_;
  std::vector<const void*> bound_;
  std::vector<bucket> buckets_;
  std::vector<std::int64_t> used_;
  // One reduction in flight: its communicator, its posted buckets (in order), the next
  // bucket to post; while listening, which slots backward has finished and how many each
  // bucket still waits for.
  Comm* comm_ = nullptr;
  std::vector<handle> pending_;
  std::size_t next_ = 0, overlapped_ = 0;
  bool listening_ = false;
  std::vector<char> ready_;
  std::vector<std::int64_t> waiting_;
  std::vector<std::size_t> bucket_of_;
  std::unordered_map<const void*, std::size_t> slot_of_;

  // A new reduction; parameters a failed one left sealed are unsealed.
  void start(Comm& c) {
    for (auto& s : slots_) s.seal(nullptr);
    comm_ = &c;
    pending_.clear();
    pending_.reserve(buckets_.size());
    next_ = 0;
    overlapped_ = 0;
  }
  void stop() {
    if (listening_) autograd::tape::current().stop_listening();
    listening_ = false;
  }
  // Seals the bucket's parameters (a later gradient write is an error: it would not be
  // reduced), packs it, and posts its all-reduce.
  void launch(std::size_t b) {
    auto& bk = buckets_[b];
    for (std::size_t k = 0; k < bk.slots.size(); ++k) {
      auto& s = slots_[bk.slots[k]];
      s.seal(&s.name);
      s.pack(bk.data.data() + bk.offsets[k]);
    }
    pending_.push_back(
        comm_->iall_reduce(bk.data.send(*comm_), bk.data.size(), comm::op::sum,
                           "ddp gradient bucket " + std::to_string(b + 1) + "/" + std::to_string(buckets_.size())));
  }
  static void on_ready(void* self, const void* leaf) {
    auto& r = *static_cast<gradient_reducer*>(self);
    const auto it = r.slot_of_.find(leaf);
    if (it == r.slot_of_.end() || r.ready_[it->second]) return;  // an input, or reported already
    r.ready_[it->second] = 1;
    --r.waiting_[r.bucket_of_[it->second]];
    const bool early = autograd::tape::current().nodes_left() > 0;
    while (r.next_ < r.buckets_.size() && r.waiting_[r.next_] == 0) {
      r.launch(r.next_++);
      if (early) ++r.overlapped_;
    }
  }
};

}  // namespace detail

// Options of ddp: bucket size, and whether buckets are posted during backward; pass them
// to the constructor or to set_options before fit.
struct ddp_options {
  double bucket_cap_mb = 25.0;
  // Post each bucket's all-reduce during the backward of the window's last micro-batch, as
  // soon as its gradients are final (the trainer calls listen_for_backward for it; fp32
  // and other policies that step the module's own parameters). Off: after backward.
  bool overlap_backward = true;
};

template <comm::communicator Comm, device Dev = cpu>
class ddp : public detail::distributed<Comm, Dev> {
 public:
  static constexpr const char* name = "ddp";
  // Capabilities (strategy/strategy.hpp).
  static constexpr bool overlaps_backward = true;  // listen_for_backward
  static constexpr bool plans_memory = true;       // memory_sharding, communication_plan

  ddp() = default;
  explicit ddp(ddp_options o) : opt_(o), reducer_(o.bucket_cap_mb) {}
  // Before fit, through trainer.strategy() (the communicator stays).
  void set_options(ddp_options o) {
    opt_ = o;
    reducer_.reset(o.bucket_cap_mb);
  }

  // The trainer, before the forward of a micro-batch whose backward ends the window, when
  // `target` is what it will pass to reduce_gradients.
  template <class M>
  void listen_for_backward(M& target) {
    if (opt_.overlap_backward) reducer_.listen(this->comm_, target);
  }
  template <class M>
  void reduce_gradients(M& target) {
    reducer_.all_reduce_mean(this->comm_, target);
  }
  // Buckets the last reduction posted while backward still had nodes to run.
  std::size_t overlapped_buckets() const { return reducer_.overlapped_buckets(); }
  strategy::memory_sharding memory_sharding() const { return {this->world_size(), false, false, false, false}; }
  const ddp_options& options() const { return opt_; }
  std::size_t num_buckets() const { return reducer_.num_buckets(); }
  // The memory plan's communication row, and what the buckets hold once allocated.
  template <class M>
  strategy::communication_bytes communication_plan(M& model, bool /*masters*/) const {
    return reducer_.planned(model, this->world_size());
  }
  strategy::communication_bytes buffer_bytes() const { return reducer_.buffer_bytes(); }

 private:
  ddp_options opt_{};
  detail::gradient_reducer<Comm, Dev> reducer_{opt_.bucket_cap_mb};
};

}  // namespace kiln::strategy
