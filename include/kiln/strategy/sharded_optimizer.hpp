// kiln/strategy/sharded_optimizer.hpp — the user's optimizer over this rank's shard, as
// strategy::zero keeps it.
//
// Spec: sharded_optimizer<O, Comm, Offload> satisfies optim::optimizer. Layout: the
// parameters O steps (group order, as it lists them) are laid end to end in one flat
// index space of N elements; rank r owns elements [r·S, min((r+1)·S, N)),
// S = ceil(N / world) — DeepSpeed's flat partition, so each rank's optimizer state is
// N/world elements whatever the tensor sizes (PyTorch's ZeroRedundancyOptimizer shards
// whole tensors instead, and balances worse). O is rebuilt (rebind) over this rank's
// *segments*: 1-D views of the parts of each parameter inside the rank's range, with the
// parameter's group, rate and decay. The layout (shard_layout) is shared with the
// strategy, which reduces gradients into it.
//   step()                 each rank steps its segments on the averaged gradient, then an
//                          all-gather of the updated ranges makes the replicas whole again
//                          (zero<3>'s constructor: the segments own their storage and are
//                          the parameters; nothing is gathered until the next use)
//   step(compute_copies)   mixed precision's fused write-back: each rank writes the
//                          bf16/f16 copies of its segments in its step (each element with
//                          its own rounding counter), then all-gathers the masters and the
//                          copies' ranges
//   save_sharded           a checkpoint without a gather: this rank's range of every state
//                          slot to a file beside the checkpoint, and the layout a reader
//                          needs (train/checkpointing.hpp reassembles whole tensors)
//   state() / load_state   whole tensors (gathered: a collective), named as the unsharded
//                          optimizer names them ("net.0.weight.exp_avg"); load_state takes
//                          this rank's slice, so a checkpoint of any world size and any
//                          strategy loads — the reshard is the load
// Offload: offload::none keeps the segments and the state where the model is;
// offload::cpu (ZeRO-Offload) rebinds O to the cpu over host copies of the rank's ranges:
// a step copies the ranges and their averaged gradients to the host, steps there, copies
// the ranges back and all-gathers on the device. With mixed precision the gathered
// masters are rounded to nearest into the compute copies on the device (stochastic
// rounding is refused at run time).
// Requires: N >= world; O has rebind() (adamw and sgd do).
#pragma once

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/comm/communicator.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/io/checkpoint.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/optim/optimizer.hpp"
#include "kiln/strategy/buffers.hpp"

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
// optimizer (rebound to the cpu) keeps its state and steps there (see the spec above).
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

}  // namespace kiln::strategy
