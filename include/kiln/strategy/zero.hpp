// kiln/strategy/zero.hpp — ZeRO: optimizer state (stage 1) and gradients (stage 2)
// sharded over the ranks.
//
// Spec: zero<Stage, Comm, Offload> is ddp whose optimizer is cut into world shards.
// Layout: the parameters the optimizer steps (group order, as it lists them) are laid
// end to end in one flat index space of N elements; rank r owns elements
// [r·S, min((r+1)·S, N)), S = ceil(N / world) — DeepSpeed's flat partition, so each
// rank's optimizer state is N/world elements whatever the tensor sizes (PyTorch's
// ZeroRedundancyOptimizer shards whole tensors instead, and balances worse). The user's
// optimizer is rebuilt (rebind) over this rank's *segments*: 1-D views of the parts of
// each parameter inside the rank's range, with the parameter's group, rate and decay.
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
// Checkpoints: each rank writes its own range of the optimizer state to a file beside
// the checkpoint (save_sharded: nothing is gathered); the checkpoint records the layout,
// and loading reassembles whole tensors from all the shards and takes this rank's slice
// (load_state). So a checkpoint of zero<S> on W ranks loads into any world size and any
// strategy (single_device, ddp, the other stage) — the reshard is the load. state()
// still gathers whole tensors (named as the unsharded optimizer names them,
// "net.0.weight.exp_avg"; a collective: every rank calls it) for code that wants them.
// Offload: offload::none keeps the shards where the model is (with a cuda model,
// zero<S, Comm, offload::none, cuda>, the shards, the reduce-scatter and the gather
// buffers live on the GPU: strategy/buffers.hpp). offload::cpu (ZeRO-Offload) keeps each
// rank's optimizer state on the host: the optimizer is rebound to the cpu over host
// copies of the rank's parameter ranges; a step copies the ranges and their averaged
// gradients to the host, steps there (the CPU's multi-threaded AdamW), copies the ranges
// back and all-gathers on the device as before. The memory plan puts the optimizer state
// in the cpu column. On a cpu model the copies are host to host (what the CPU tests run).
// Mixed precision with offload::cpu rounds the gathered masters to nearest into the
// compute copies on the device (stochastic rounding is refused at run time).
// Mixed precision: step(compute_copies) has each rank write the bf16/f16 copies of its
// segments in its step (the fused write-back, each element with its own rounding
// counter), then all-gathers the masters and the copies' ranges.
// Requires: N >= world; the optimizer has rebind() (adamw and sgd do); under stage 2 no
// loss scaling (the overflow test would read unreduced gradients: compile error).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <vector>

#include "kiln/core/transfer.hpp"
#include "kiln/io/checkpoint.hpp"
#include "kiln/optim/clip.hpp"
#include "kiln/optim/optimizer.hpp"
#include "kiln/strategy/ddp.hpp"

namespace kiln::strategy {

namespace offload {
struct none {
  static constexpr const char* name = "none";
};
struct cpu {
  static constexpr const char* name = "cpu";
};
}  // namespace offload

namespace detail {

template <class S>
struct state_types;
template <class T, class D>
struct state_types<optim::optimizer_state<T, D>> {
  using element = T;
  using device_type = D;
};

// Named parameters as a module (for the visitors).
template <class T, class D>
struct param_list {
  std::vector<nn::named_parameter<T, D>>* params;
  template <class F>
  void for_each_child(F&& f) {
    for (auto& np : *params) f(std::string_view(np.name), np.param);
  }
};

// The flat partition of an optimizer's parameters, shared by the optimizer (which steps
// and gathers) and the strategy (which reduces gradients into it).
template <class T, class D, class Comm>
struct shard_layout {
  using device_type = D;
  std::vector<nn::named_parameter<T, D>> params;
  std::vector<std::int64_t> offset;
  std::int64_t total = 0, shard = 0;
  int rank = 0, world = 1;
  comm_buffer<float, D, Comm> flat, mine;  // stage 2: the reduce-scatter buffers
  comm_buffer<u8, D, Comm> gather_buffer;  // the all-gather of updated parameters
  comm_buffer<u8, D, Comm> copy_buffer;    // and of their compute copies (mixed precision)
  std::vector<std::int64_t> used;

  std::int64_t begin() const { return std::min(total, std::int64_t(rank) * shard); }
  std::int64_t end() const { return std::min(total, std::int64_t(rank + 1) * shard); }
  // The part [lo, hi) of parameter i inside this rank's range, in the parameter's own
  // element indices; empty when lo == hi.
  std::pair<std::int64_t, std::int64_t> owned(std::size_t i) const {
    const std::int64_t a = offset[i], b = a + params[i].param.numel();
    const std::int64_t lo = std::max(a, begin()), hi = std::min(b, end());
    return lo < hi ? std::pair{lo - a, hi - a} : std::pair{std::int64_t(0), std::int64_t(0)};
  }
};

template <class T, class D>
tensor<T, D> flat_view(const tensor<T, D>& t, std::int64_t lo, std::int64_t hi) {
  return t.reshape({-1}).slice(0, lo, hi);
}

}  // namespace detail

// The user's optimizer O over this rank's shard; satisfies optim::optimizer.
// Offload = offload::cpu: the segments are host copies of the parameters' ranges, and the
// optimizer (rebound to the cpu) keeps its state and steps there (see zero's spec).
template <class O, class Comm, class Offload = offload::none>
class sharded_optimizer {
  using state_type = std::remove_cvref_t<decltype(std::declval<const O&>().state())>;
  using T = typename detail::state_types<state_type>::element;
  using D = typename detail::state_types<state_type>::device_type;
  using layout = detail::shard_layout<T, D, Comm>;
  static constexpr bool offloaded = std::is_same_v<Offload, offload::cpu>;
  using SD = std::conditional_t<offloaded, cpu, D>;  // where the segments and the state live
  using segment_list = std::vector<std::pair<std::size_t, var<T, SD>>>;

  static auto make_inner(const O& o, layout& L, segment_list& segs, bool own = false) {
    static_assert(
        requires { o.template rebind<T, SD>([](const nn::named_parameter<T, D>&) { return var<T, SD>{}; }); },
        "kiln::strategy::zero: the optimizer needs rebind<T, Dev>(map) to be sharded (adamw and sgd have it)");
    std::size_t i = 0;
    auto map = [&](const nn::named_parameter<T, D>&) -> std::optional<var<T, SD>> {
      const std::size_t k = i++;
      const auto [lo, hi] = L.owned(k);
      if (lo == hi) return std::nullopt;
      auto view = detail::flat_view(L.params[k].param.value(), lo, hi);
      var<T, SD> v;
      if constexpr (offloaded)
        v = var<T, SD>(host_copy(view), true);
      else
        v = var<T, SD>(own ? view.clone() : view, true);
      segs.emplace_back(k, v);
      return v;
    };
    return o.template rebind<T, SD>(map);
  }

 public:
  using inner_type =
      decltype(make_inner(std::declval<const O&>(), std::declval<layout&>(), std::declval<segment_list&>()));
  using inner_state = std::remove_cvref_t<decltype(std::declval<const inner_type&>().state())>;
  static constexpr auto kind = O::kind;

  sharded_optimizer(const O& o, Comm& c) : L_(init_layout(o, c)), comm_(&c), inner_(make_inner(o, *L_, segs_)) {
    if constexpr (requires { o.rounding(); }) inner_.set_rounding(o.rounding());
  }
  // ZeRO-3: the flat index space follows `order` (parameter identities; the rest after,
  // in the optimizer's order), and each segment owns its storage — the whole parameters
  // are released between uses, and the strategy writes the segments' gradients.
  sharded_optimizer(const O& o, Comm& c, const std::vector<const void*>& order)
      : L_(init_layout(o, c, &order)), comm_(&c), inner_(make_inner(o, *L_, segs_, true)), owns_segments_(true) {
    if constexpr (requires { o.rounding(); }) inner_.set_rounding(o.rounding());
    for (auto& [k, v] : segs_) {
      const auto [lo, hi] = L_->owned(k);
      segment_names_.push_back({L_->params[k].name + "[" + std::to_string(lo) + ":" + std::to_string(hi) + "]", v});
    }
  }

  // Each rank steps its segments on the averaged gradient, then the ranks exchange the
  // updated ranges (ZeRO-3: the segments are the parameters; the next use gathers them).
  void step() {
    if (owns_segments_) {
      inner_.step();
      return;
    }
    if constexpr (offloaded) {
      offload_in();
      inner_.step();
      offload_out();
    } else {
      bind_segments();
      inner_.step();
    }
    gather_parameters();
  }
  // Mixed precision's fused write-back: each rank's step writes the compute copies of its
  // segments (element e of a parameter with its own rounding counter, as one rank's step
  // would), then the ranks exchange the updated masters and the copies' ranges.
  // Offloaded, the host step cannot write device copies: the gathered masters are rounded
  // to nearest into them on the device (stochastic rounding is refused).
  template <floating_element C>
  void step(const optim::compute_copies<C, D>& copies) requires(
      offloaded || requires(inner_type & i, const optim::compute_copies<C, D>& c) { i.step(c); }) {
    KILN_CHECK(!owns_segments_, "zero<3> steps parameters that are their own masters; it takes no compute copies");
    if constexpr (offloaded) {
      KILN_CHECK(!copies.stochastic,
                 "strategy::zero with offload::cpu: stochastic rounding of the compute copies is not supported (the "
                 "host step writes no device copies); turn stochastic_rounding off or use offload::none");
      step();
      for (auto& np : L_->params)
        if (auto it = copies.of.find(np.param.id()); it != copies.of.end())
          detail::convert<D>(it->second.data, np.param.value().data(), np.param.numel());
      return;
    } else {
      optim::compute_copies<C, D> mine;
      mine.stochastic = copies.stochastic;
      mine.stream = copies.stream;
      for (auto& [k, v] : segs_)
        if (auto it = copies.of.find(L_->params[k].param.id()); it != copies.of.end()) {
          const auto [lo, hi] = L_->owned(k);
          mine.of[v.id()] = {it->second.data + lo, it->second.first + lo};
        }
      bind_segments();
      inner_.step(mine);
      gather_parameters();
      gather_ranges<C>(L_->copy_buffer, "zero: all-gather of updated compute copies", [&](std::size_t k) -> C* {
        const auto it = copies.of.find(L_->params[k].param.id());
        return it == copies.of.end() ? nullptr : it->second.data;
      });
    }
  }

 private:
  // Offloaded: each segment's parameter range and averaged gradient into its host copy.
  void offload_in() {
    for (auto& [k, v] : segs_) {
      auto& p = L_->params[k].param;
      const auto [lo, hi] = L_->owned(k);
      detail::read_to_host<D>(v.value().data(), p.value().data() + lo, hi - lo);
      if (p.has_grad()) {
        tensor<T, cpu> g(shape{hi - lo});
        detail::read_to_host<D>(g.data(), p.grad().data() + lo, hi - lo);
        v.grad() = g;
        v.begin_grad_write();  // same shape: keeps the tensor, marks it valid
      } else {
        v.zero_grad();
      }
    }
  }
  // Offloaded: the stepped host copies back into the parameters' ranges.
  void offload_out() {
    for (auto& [k, v] : segs_) {
      const auto [lo, hi] = L_->owned(k);
      detail::write_from_host<D>(L_->params[k].param.value().data() + lo, v.value().data(), hi - lo);
    }
  }
  // The segments viewing this step's parameters and gradients.
  void bind_segments() {
    for (auto& [k, v] : segs_) {
      auto& p = L_->params[k].param;
      const auto [lo, hi] = L_->owned(k);
      v.value() = detail::flat_view(p.value(), lo, hi);
      if (p.has_grad()) {
        v.grad() = detail::flat_view(p.grad(), lo, hi);
        v.begin_grad_write();  // same shape: keeps the view, marks it valid
      } else {
        v.zero_grad();
      }
    }
  }

 public:
  void zero_grad() {
    for (auto& np : L_->params) np.param.zero_grad();
    inner_.zero_grad();
  }
  std::size_t num_groups() const { return inner_.num_groups(); }
  double lr(std::size_t g) const { return inner_.lr(g); }
  void set_lr(std::size_t g, double lr) { inner_.set_lr(g, lr); }
  template <class F>
  void for_each_parameter(F&& f) const {
    for (auto& np : L_->params) f(np);
  }
  template <class F>
  void for_each_state_tensor(F&& f) const {
    inner_.for_each_state_tensor(f);
  }
  void set_rounding(optim::param_rounding r) requires requires(inner_type& i) { i.set_rounding(r); }
  { inner_.set_rounding(r); }
  const inner_type& shard_optimizer() const { return inner_; }
  std::int64_t shard_elements() const { return L_->end() - L_->begin(); }
  std::int64_t total_elements() const { return L_->total; }
  std::shared_ptr<layout> shared_layout() const { return L_; }
  // This rank's segments: (index into the layout's parameters, the 1-D var stepped).
  const segment_list& segments() const { return segs_; }
  // The segments as a module (ZeRO-3's gradients: what unscaling, clipping and the
  // finite check act on), named "fc1.weight[lo:hi]".
  detail::param_list<T, SD> segment_parameters() { return {&segment_names_}; }

  // Whole tensors gathered from every rank (a collective: every rank calls it).
  state_type state() const {
    const inner_state mine = inner_.state();
    const int w = L_->world;
    const std::vector<std::string> slots = slot_names(mine);
    state_type out;
    // Assembled on the host (a checkpoint's capture: the tensors are written from there).
    std::vector<T> buf(static_cast<std::size_t>(L_->shard * w));
    for (auto& slot : slots) {
      std::fill(buf.begin(), buf.end(), T(0));
      T* part = buf.data() + static_cast<std::size_t>(L_->rank) * static_cast<std::size_t>(L_->shard);
      for (auto& [k, v] : segs_) {
        const auto* t = mine.find(L_->params[k].name + "." + slot);
        KILN_CHECK(t != nullptr, "zero: optimizer state of '", L_->params[k].name, "' has no slot '", slot, "'");
        const auto [lo, hi] = L_->owned(k);
        const auto h = to_host(*t);
        std::memcpy(part + (L_->offset[k] + lo - L_->begin()), h.data(), static_cast<std::size_t>(hi - lo) * sizeof(T));
      }
      const std::int64_t bytes = L_->shard * std::int64_t(sizeof(T));
      detail::through_comm_memory<cpu>(*comm_, reinterpret_cast<std::byte*>(buf.data()), bytes * w, [&](std::byte* q) {
        comm_->all_gather(q, bytes, "zero: gather optimizer state '" + slot + "'");
      });
      for (std::size_t k = 0; k < L_->params.size(); ++k) {
        const auto& p = L_->params[k].param;
        tensor<T, cpu> full(p.shape());
        std::memcpy(full.data(), buf.data() + L_->offset[k], static_cast<std::size_t>(p.numel()) * sizeof(T));
        out.tensors.emplace_back(L_->params[k].name + "." + slot, to_device<D>(full));
      }
    }
    // Counters (per-group step counts): a rank without a segment in a group never stepped
    // it; the maximum is the group's count.
    std::vector<std::int64_t> values = max_counters(mine);
    std::size_t i = 0;
    for (auto& [n, c] : mine.counters) out.counters[n] = values[i++];
    return out;
  }
  // A checkpoint without a gather: this rank writes its own range of every state slot
  // (flat, "exp_avg" [end - begin]) to a file beside the checkpoint; `j` gets the counters
  // (maximum over ranks) and the layout a reader needs to reassemble whole tensors
  // (train/checkpointing.hpp), whatever world size or strategy loads them.
  void save_sharded(io::json& j, io::checkpoint_shards& sh, std::size_t index) const {
    const inner_state mine = inner_.state();
    const auto& L = *L_;
    std::vector<std::string> slots = slot_names(mine);
    io::checkpoint_writer w;
    const std::int64_t b = L.begin(), e = L.end();
    for (auto& slot : slots) {
      tensor<T, SD> flat({e - b});
      for (auto& [k, v] : segs_) {
        const auto* t = mine.find(L.params[k].name + "." + slot);
        KILN_CHECK(t != nullptr, "zero: optimizer state of '", L.params[k].name, "' has no slot '", slot, "'");
        const auto [lo, hi] = L.owned(k);
        detail::copy_elements<SD>(flat.data() + (L.offset[k] + lo - b), t->data(), hi - lo);
      }
      w.add(slot, flat);
    }
    const std::string world = std::to_string(L.world);
    auto name_of = [&](int r) {
      return sh.file_name("optimizer" + std::to_string(index) + ".rank" + std::to_string(r) + "-of-" + world);
    };
    io::json& ws = w.state();
    ws.set("kind", "zero optimizer shard");
    ws.set("rank", std::int64_t(L.rank));
    ws.set("world", std::int64_t(L.world));
    ws.set("begin", b);
    ws.set("end", e);
    sh.files.emplace_back(sh.main.parent_path() / name_of(L.rank), std::move(w));

    const std::vector<std::int64_t> values = max_counters(mine);
    io::json counters = io::json::object();
    std::size_t i = 0;
    for (auto& [n, c] : mine.counters) counters.set(n, values[i++]);
    j.set("counters", std::move(counters));

    io::json lay = io::json::object();
    lay.set("tag", sh.tag);
    lay.set("world", std::int64_t(L.world));
    lay.set("total", L.total);
    lay.set("shard", L.shard);
    io::json sl = io::json::array(), files = io::json::array(), params = io::json::array();
    for (auto& slot : slots) sl.push_back(slot);
    for (int r = 0; r < L.world; ++r) files.push_back(name_of(r));
    for (std::size_t k = 0; k < L.params.size(); ++k) {
      io::json p = io::json::object(), shape = io::json::array();
      p.set("name", L.params[k].name);
      p.set("offset", L.offset[k]);
      for (auto d : L.params[k].param.shape()) shape.push_back(std::int64_t(d));
      p.set("shape", std::move(shape));
      params.push_back(std::move(p));
    }
    lay.set("slots", std::move(sl));
    lay.set("files", std::move(files));
    lay.set("params", std::move(params));
    j.set("shards", std::move(lay));
  }

  // This rank's slices of whole tensors; checks every tensor before changing anything.
  void load_state(const state_type& full) {
    inner_state mine;
    mine.counters = full.counters;
    std::set<std::string> slots;
    for (auto& [n, t] : full.tensors)
      for (auto& np : L_->params)
        if (n.size() > np.name.size() && n.compare(0, np.name.size(), np.name) == 0 && n[np.name.size()] == '.')
          slots.insert(n.substr(np.name.size() + 1));
    for (auto& [k, v] : segs_) {
      const auto& np = L_->params[k];
      const auto [lo, hi] = L_->owned(k);
      for (auto& slot : slots) {
        const auto* t = full.find(np.name + "." + slot);
        if (!t) continue;  // the shard optimizer's load_state names what is missing
        KILN_CHECK(t->shape() == np.param.shape(), "zero load_state: state tensor '", np.name, ".", slot,
                   "' has shape ", t->shape().str(), ", expected ", np.param.shape().str());
        mine.tensors.emplace_back(np.name + "." + slot, to_device<SD>(detail::flat_view(*t, lo, hi).contiguous()));
      }
    }
    inner_.load_state(mine);
  }

 private:
  // The state's counters, each the maximum over ranks.
  std::vector<std::int64_t> max_counters(const inner_state& mine) const {
    std::vector<std::int64_t> values;
    for (auto& [n, c] : mine.counters) values.push_back(c);
    const auto n = static_cast<std::int64_t>(values.size());
    detail::through_comm_memory<cpu>(
        *comm_, values.data(), n, [&](std::int64_t* q) { comm_->all_reduce(q, n, comm::op::max, "zero: counters"); });
    return values;
  }
  // The state slots: the suffixes this rank's first segment has ("exp_avg", "exp_avg_sq");
  // every rank owns at least one segment (N >= world) of the same optimizer type.
  std::vector<std::string> slot_names(const inner_state& mine) const {
    std::vector<std::string> slots;
    if (!segs_.empty()) {
      const std::string& first = L_->params[segs_.front().first].name;
      for (auto& [n, t] : mine.tensors)
        if (n.size() > first.size() && n.compare(0, first.size(), first) == 0 && n[first.size()] == '.')
          slots.push_back(n.substr(first.size() + 1));
    }
    return slots;
  }
  static std::shared_ptr<layout> init_layout(const O& o, Comm& c, const std::vector<const void*>* order = nullptr) {
    auto L = std::make_shared<layout>();
    o.for_each_parameter([&](const nn::named_parameter<T, D>& np) {
      L->offset.push_back(L->total);
      L->total += np.param.numel();
      L->params.push_back(np);
    });
    if (order) {  // offsets in the given order; the parameters keep the optimizer's order
      std::vector<std::size_t> seq;
      std::vector<bool> placed(L->params.size(), false);
      for (const void* id : *order)
        for (std::size_t k = 0; k < L->params.size(); ++k)
          if (!placed[k] && L->params[k].param.id() == id) {
            seq.push_back(k);
            placed[k] = true;
          }
      for (std::size_t k = 0; k < L->params.size(); ++k)
        if (!placed[k]) seq.push_back(k);
      std::int64_t at = 0;
      for (std::size_t k : seq) {
        L->offset[k] = at;
        at += L->params[k].param.numel();
      }
    }
    L->rank = c.rank();
    L->world = c.world_size();
    KILN_CHECK(L->total >= L->world, "strategy::zero: the optimizer steps ", L->total, " elements, fewer than the ",
               L->world, " ranks to shard them over");
    L->shard = (L->total + L->world - 1) / L->world;
    return L;
  }
  // Every rank's updated range into every replica, bit for bit.
  void gather_parameters() {
    gather_ranges<T>(L_->gather_buffer, "zero: all-gather of updated parameters",
                     [&](std::size_t k) { return L_->params[k].param.value().data(); });
  }
  // For each parameter k with base(k) non-null (numel elements of U on D): this rank's
  // range out, every rank's range in, through one all-gather of the flat index space.
  template <class U, class Base>
  void gather_ranges(detail::comm_buffer<u8, D, Comm>& buffer, const char* label, Base&& base) {
    auto& L = *L_;
    const std::int64_t S = L.shard, bytes = S * L.world * std::int64_t(sizeof(U));
    if (buffer.size() != bytes) buffer.resize(bytes);
    U* buf = reinterpret_cast<U*>(buffer.data());
    for (std::size_t k = 0; k < L.params.size(); ++k) {
      const auto [lo, hi] = L.owned(k);
      if (U* p = base(k); p && lo != hi) detail::copy_elements<D>(buf + (L.offset[k] + lo), p + lo, hi - lo);
    }
    comm_->all_gather(reinterpret_cast<std::byte*>(buffer.send(*comm_)), S * std::int64_t(sizeof(U)), label);
    buffer.receive();
    for (std::size_t k = 0; k < L.params.size(); ++k)
      if (U* p = base(k)) detail::copy_elements<D>(p, buf + L.offset[k], L.params[k].param.numel());
  }

  std::shared_ptr<layout> L_;
  Comm* comm_;
  segment_list segs_;
  inner_type inner_;
  bool owns_segments_ = false;
  std::vector<nn::named_parameter<T, SD>> segment_names_;
};

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
                           train::communication_bytes c;
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
  train::memory_sharding memory_sharding() const {
    return {this->world_size(), true, Stage >= 2, false, std::is_same_v<Offload, offload::cpu>};
  }
  // The memory plan's communication row (train/memory_plan.hpp) for `model` with one
  // optimizer over its trainable parameters (masters: f32 masters under a mixed policy),
  // and what the buffers hold once allocated.
  template <class M>
  train::communication_bytes communication_plan(M& model, bool masters) const {
    const auto t = detail::trainable_sizes(model, masters);
    const std::int64_t n = t.total, elem = t.stepped_bytes;
    const std::int64_t copy = masters && !std::is_same_v<Offload, offload::cpu> ? t.param_bytes : 0;
    train::communication_bytes c;
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
  train::communication_bytes buffer_bytes() const {
    train::communication_bytes c = ddp_reducer_.buffer_bytes();
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
    std::function<train::communication_bytes()> bytes;
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
