// kiln/nn/replicas.hpp — data parallelism across the CPU threads of one process.
//
// Spec: thread_replicas<Model> splits a step's batch across N threads, each running
// the whole forward and backward of its shard with single-threaded kernels, instead of
// running every op across the N threads in turn. Small models gain: one op's work on a
// 2-core machine is too little to share well (each GEMM and each pass over activations
// pays a fork/join and splits an L2-sized working set), while N independent shards keep
// every core busy for the whole step and keep each shard's activations in its own
// core's cache (measured on the GPT benchmark: see bench/RESULTS.md).
//
// The primary model is the user's; the N-1 twins are built with the primary's
// constructor arguments and hold *views of the primary's parameter values* (no copy:
// an optimizer step on the primary is seen by every twin), but gradients of their own.
// run(step) calls step(model, k) for k in [0, N) on N threads at once (k = 0 gets the
// primary, on the calling thread); each thread records on its own tape and calls
// backward itself. When all have finished, the twins' gradients are added into the
// primary's in twin order (deterministic for a fixed N), honouring the primary's
// accumulation window: the first write of a window overwrites, later ones add. The
// optimizer, clipping and checkpoints then see only the primary.
//
// At every run the twins are re-synchronised from the primary: parameter values
// (re-pointed, so a parameter the user replaced is followed), requires_grad (frozen
// parameters, adapters), training mode, and their random streams — twin k's dropout
// generator i draws from seed(primary i) mixed with k, at the primary's offset — so
// the masks are a function of the primary's checkpointed state and a resumed run
// replays them. Grad mode (no_grad) is carried to the worker threads.
//
// The step decides its shard (shard(n, k) gives an even split) and must weight its
// loss by its share of the batch when the loss is a mean (e.g. loss * (e - b) / B), so
// the summed gradient is the full batch's. Numerically the result equals the unsplit
// step up to the order of floating-point sums.
//
// run_split(n, chunks, step) does the splitting: replica k takes its share of n rows in
// `chunks` sequential pieces, calling step(model, rows, k) for each, so the gradient
// accumulates over pieces whose activations stay in the core's cache (on the GPT
// benchmark, 1-sequence pieces were ~12% faster than 8-sequence ones and cut the tensor
// peak from 97 to 26 MB). Chunking changes no result beyond the order of the sums.
//
// Requires: Model is constructible from the given arguments, and the primary is not
// moved while the replicas exist. Buffers that are not parameters (RoPE tables, masks)
// are the twins' own, built by the same constructor. Not for parameter-sharding
// strategies (zero<3>'s units gather per thread): run() refuses when one is listening.
// ddp's overlap of reduction with backward is paused for the run: the primary's
// gradients are complete only after the twins' are added in.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/error.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/nn/unit.hpp"

namespace kiln::nn {

// [begin, end) of part k of n items split into `parts` near-equal contiguous parts.
struct shard_range {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
};
inline shard_range shard(std::int64_t n, int k, int parts) { return {n * k / parts, n * (k + 1) / parts}; }

template <class Model>
class thread_replicas {
 public:
  // N = threads replicas in all (the primary and threads - 1 twins). The default
  // generator is left where it was: building the twins draws nothing from it.
  template <class... Args>
  thread_replicas(Model& primary, int threads, const Args&... args) : primary_(&primary) {
    KILN_CHECK(threads >= 1, "nn::thread_replicas: threads must be at least 1, got ", threads);
    primary_params_ = collect(primary);
    primary_modes_ = training_flags(primary);
    primary_streams_ = random_streams(primary).generators;
    philox_generator& g = default_generator();
    const std::uint64_t seed = g.seed(), offset = g.offset();
    for (int k = 1; k < threads; ++k) twins_.push_back(make_twin(k, args...));
    g.set_state(seed, offset);
  }

  int size() const { return static_cast<int>(twins_.size()) + 1; }
  Model& replica(int k) { return k == 0 ? *primary_ : *twins_.at(static_cast<std::size_t>(k - 1)).model; }

  // Runs step(Model&, int k) for every replica concurrently, then reduces the gradients
  // into the primary. The first exception any step throws is rethrown here, after
  // every thread has finished (the gradients are then left unreduced).
  template <class Step>
  void run(Step&& step) {
    KILN_CHECK(unit_hooks::current() == nullptr,
               "nn::thread_replicas::run: a parameter-sharding strategy (zero<3>) is listening on this thread; "
               "thread replicas cannot share gathered parameters");
    for (auto& t : twins_) sync(t);
    // The twins' gradients are added into the primary's after every backward: none of the
    // primary's is final when its own tape says so (ddp's overlap then reduces at the end).
    autograd::quiet_listener quiet;
    const int n = size();
    const bool grad_on = autograd::grad_enabled();
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
    std::vector<char> ran(static_cast<std::size_t>(n), 0);  // char: written by different threads
    auto run_one = [&](int k) {
      ran[static_cast<std::size_t>(k)] = 1;
      cpu_runtime::set_flush_denormals();
      const bool prev = autograd::grad_enabled_flag();
      autograd::grad_enabled_flag() = grad_on;
      try {
        step(replica(k), k);
      } catch (...) {
        errors[static_cast<std::size_t>(k)] = std::current_exception();
      }
      autograd::grad_enabled_flag() = prev;
    };
#if defined(_OPENMP)
    if (n > 1) {
#pragma omp parallel num_threads(n)
      run_one(omp_get_thread_num());
    }
#endif
    // Without OpenMP, or where it gave fewer threads than asked, the rest run here.
    for (int k = 0; k < n; ++k)
      if (!ran[static_cast<std::size_t>(k)]) run_one(k);
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
    for (auto& t : twins_)
      for (auto& r : t.reduce) r();
  }

  // Rows [0, n) split evenly over the replicas, each replica's share in `chunks`
  // sequential pieces (fewer when it has fewer rows): step(Model&, shard_range rows,
  // int k) per piece, then the reduction of run().
  template <class Step>
  void run_split(std::int64_t n, int chunks, Step&& step) {
    KILN_CHECK(n >= size(), "nn::thread_replicas::run_split: ", n, " rows cannot be split over ", size(), " replicas");
    KILN_CHECK(chunks >= 1, "nn::thread_replicas::run_split: chunks must be at least 1, got ", chunks);
    run([&](Model& m, int k) {
      const shard_range mine = shard(n, k, size());
      const int pieces = static_cast<int>(std::min<std::int64_t>(chunks, mine.size()));
      for (int u = 0; u < pieces; ++u) {
        const shard_range p = shard(mine.size(), u, pieces);
        step(m, shard_range{mine.begin + p.begin, mine.begin + p.end}, k);
      }
    });
  }

 private:
  struct param_ref {
    std::string name;
    std::type_index type;
    void* var;
    std::string shape;
  };
  struct twin {
    std::unique_ptr<Model> model;
    std::vector<std::function<void()>> sync;    // per parameter: value view, requires_grad, closed window
    std::vector<std::function<void()>> reduce;  // per parameter: gradient into the primary's
    std::vector<bool*> modes;
    std::vector<philox_generator*> streams;
    std::uint64_t key = 0;
  };

  template <class M>
  static std::vector<param_ref> collect(M& m) {
    std::vector<param_ref> out;
    visit_parameters(m, [&](const std::string& name, auto& p) {
      out.push_back({name, std::type_index(typeid(p)), &p, p.shape().str()});
    });
    return out;
  }
  template <class M>
  static std::vector<bool*> training_flags(M& m) {
    std::vector<bool*> out;
    visit_modules(m, [&](const std::string&, auto& sub) {
      if constexpr (requires { sub.training = true; }) out.push_back(&sub.training);
    });
    return out;
  }

  template <class... Args>
  twin make_twin(int k, const Args&... args) {
    twin t;
    t.model = std::make_unique<Model>(args...);
    // A distinct, fixed key per replica for its random streams: a Weyl step.
    t.key = 0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(k);
    const auto params = collect(*t.model);
    KILN_CHECK(params.size() == primary_params_.size(), "nn::thread_replicas: replica ", k, " has ", params.size(),
               " parameters, the primary ", primary_params_.size(),
               " (the constructor arguments must build the primary's architecture)");
    std::size_t i = 0;
    visit_parameters(*t.model, [&](const std::string& name, auto& p) {
      using V = std::remove_cvref_t<decltype(p)>;
      const param_ref& ref = primary_params_[i++];
      KILN_CHECK(ref.name == name && ref.type == std::type_index(typeid(V)) && ref.shape == p.shape().str(),
                 "nn::thread_replicas: replica ", k, " parameter ", name, " (", p.shape().str(),
                 ") does not match the primary's ", ref.name, " (", ref.shape, ")");
      const V prim = *static_cast<V*>(ref.var);  // handles: share the primary's and the twin's state
      V tw = p;
      t.sync.push_back([prim, tw]() mutable {
        tw.value() = prim.value();
        tw.set_requires_grad(prim.requires_grad());
        tw.zero_grad();
      });
      t.reduce.push_back([prim, tw] {
        if (tw.has_grad()) add_grad(prim, tw.grad());
      });
    });
    t.modes = training_flags(*t.model);
    t.streams = random_streams(*t.model).generators;
    KILN_CHECK(t.modes.size() == primary_modes_.size() && t.streams.size() == primary_streams_.size(),
               "nn::thread_replicas: replica ", k, " has a different module structure from the primary");
    return t;
  }

  template <class V>
  static void add_grad(const V& prim, const typename V::tensor_type& g) {
    using T = typename V::value_type;
    if (prim.begin_grad_write() == grad_write::overwrite) {
      prim.grad().copy_from(g);
      return;
    }
    T* dst = prim.grad().data();
    const T* src = g.data();
    cpu_runtime::parallel_for(prim.numel(), 1 << 15, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t j = b; j < e; ++j) dst[j] = T(compute_t<T>(dst[j]) + compute_t<T>(src[j]));
    });
  }

  void sync(twin& t) {
    for (auto& s : t.sync) s();
    for (std::size_t i = 0; i < t.modes.size(); ++i) *t.modes[i] = *primary_modes_[i];
    for (std::size_t i = 0; i < t.streams.size(); ++i) {
      const philox_generator& p = *primary_streams_[i];
      t.streams[i]->set_state(p.seed() ^ t.key, p.offset());
    }
  }

  Model* primary_;
  std::vector<twin> twins_;
  std::vector<param_ref> primary_params_;
  std::vector<bool*> primary_modes_;
  std::vector<philox_generator*> primary_streams_;
};

}  // namespace kiln::nn
