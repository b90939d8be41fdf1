// kiln/optim/adamw.hpp — AdamW, fused and multi-tensor.
//
// One step makes a single pass over every element of every parameter: the
// fn::adamw_update functor reads p, g, m, v once and writes p, m, v once, in registers
// (16 B read + 12 B written per f32 element: bandwidth bound). All parameters of all
// groups are cut into chunks of at most `chunk_elements` and the chunk list is spread
// over the thread team in one parallel region — the multi-tensor apply, which keeps
// many small tensors (biases, norms) from each paying a thread wake-up.
// Semantics follow torch.optim.AdamW (decoupled weight decay, bias correction, a
// per-group step count). Parameters without a gradient are skipped and do not advance.
#pragma once

#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "kiln/core/cuda_runtime.hpp"
#include "kiln/cuda/kernels.hpp"

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/ops/kernel/functors.hpp"
#include "kiln/optim/optimizer.hpp"

namespace kiln::optim {

struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

namespace detail {
template <floating_element T, device Dev>
struct adamw_group {
  std::vector<nn::named_parameter<T, Dev>> params;
  std::vector<tensor<T, Dev>> exp_avg, exp_avg_sq;
  double lr = 0, weight_decay = 0;
  std::int64_t step = 0;
};
}  // namespace detail

template <floating_element T = f32, device Dev = cpu>
class adamw : public group_owner<detail::adamw_group<T, Dev>> {
  using group = detail::adamw_group<T, Dev>;
  using group_owner<group>::groups_;

 public:
  using group_owner<group>::zero_grad;
  using group_owner<group>::num_groups;
  using group_owner<group>::lr;
  using group_owner<group>::set_lr;

  static constexpr std::string_view kind = "adamw";  // names it in logs

  static constexpr std::int64_t chunk_elements = 1 << 16;

  adamw(std::vector<param_group<T, Dev>> groups, adamw_options defaults = {}) : defaults_(defaults) {
    KILN_CHECK(defaults.lr >= 0 && defaults.eps >= 0 && defaults.beta1 >= 0 && defaults.beta1 < 1 &&
                   defaults.beta2 >= 0 && defaults.beta2 < 1,
               "adamw: invalid options (lr ", defaults.lr, ", betas ", defaults.beta1, "/", defaults.beta2, ", eps ",
               defaults.eps, ")");
    for (auto& g : groups) {
      group st;
      st.lr = g.lr.value_or(defaults.lr);
      st.weight_decay = g.weight_decay.value_or(defaults.weight_decay);
      for (auto& np : g.params) {
        st.params.push_back(np);
        st.exp_avg.push_back(tensor<T, Dev>::zeros(np.param.shape()));
        st.exp_avg_sq.push_back(tensor<T, Dev>::zeros(np.param.shape()));
      }
      groups_.push_back(std::move(st));
    }
  }
  template <class M>
  requires nn::module<M> adamw(M& module, adamw_options defaults = {})
      : adamw(decay_groups<T, Dev>(module, defaults.weight_decay), defaults) {}

  // The same optimizer — options, each group's rate and decay — over the parameters
  // map(named_parameter) returns; state starts afresh.
  template <floating_element U, device D2 = Dev, class Map>
  adamw<U, D2> rebind(Map&& map) const {
    return adamw<U, D2>(this->template mapped_groups<U, D2>(map), defaults_);
  }
  // bf16 parameters only: see param_rounding.
  void set_rounding(param_rounding r) {
    KILN_CHECK(!r.stochastic || (std::is_same_v<T, bf16>),
               "adamw: stochastic rounding applies to bf16 parameters, not ", dtype_name(dtype_of<T>));
    rounding_ = r;
  }
  const param_rounding& rounding() const { return rounding_; }
  // Every state tensor the optimizer holds (the memory planner counts them).
  template <class F>
  void for_each_state_tensor(F&& f) const {
    for (auto& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i) {
        f(g.exp_avg[i]);
        f(g.exp_avg_sq[i]);
      }
  }

  void step() { run_step<void>(nullptr); }
  // The step that also writes each updated parameter, rounded to C, into its compute
  // copy (mixed precision: the f32 masters' bf16/f16 model weights) in the same pass.
  template <floating_element C>
  void step(const compute_copies<C, Dev>& copies) {
    static_assert(std::is_same_v<T, f32>, "adamw::step(compute_copies): compute copies are of f32 master weights");
    run_step<C>(&copies);
  }

  // One step's work, shared by the CPU loop and the GPU launch: every chunk of at most
  // chunk_elements of every parameter that has a gradient (`first`: the chunk's first
  // element among all the optimizer's elements, the stochastic-rounding counter; `copy`,
  // `copy_first`: where its compute copy goes and that copy's rounding counter), each
  // group's step counter advanced when any of its parameters has one, and the groups'
  // updates for this step.
  struct step_chunk {
    T *p, *m, *v;
    const T* g;
    std::int64_t n;
    std::size_t group;
    std::int64_t first;
    void* copy = nullptr;
    std::int64_t copy_first = 0;
  };
  template <class C>
  using copies_t = typename detail::copies_of<C, Dev>::type;
  template <class C = void>
  std::vector<ops::fn::adamw_update> plan_step(std::vector<step_chunk>& chunks, const copies_t<C>* copies = nullptr) {
    std::int64_t element = 0;
    std::vector<ops::fn::adamw_update> upd;
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      auto& g = groups_[gi];
      bool any = false;
      for (std::size_t i = 0; i < g.params.size(); ++i) {
        auto& p = g.params[i].param;
        if (!p.has_grad()) continue;
        any = true;
        const std::int64_t n = p.numel();
        std::conditional_t<std::is_void_v<C>, T, C>* copy = nullptr;  // (never set without copies)
        std::int64_t copy_first = 0;
        if constexpr (!std::is_void_v<C>) {
          if (copies != nullptr)
            if (auto it = copies->of.find(p.id()); it != copies->of.end()) {
              copy = it->second.data;
              copy_first = it->second.first;
            }
        }
        for (std::int64_t off = 0; off < n; off += chunk_elements)
          chunks.push_back({p.value().data() + off, g.exp_avg[i].data() + off, g.exp_avg_sq[i].data() + off,
                            p.grad().data() + off, std::min(chunk_elements, n - off), gi, element + off,
                            copy != nullptr ? static_cast<void*>(copy + off) : nullptr, copy_first + off});
        element += n;
      }
      if (any) ++g.step;
      const double bc1 = 1.0 - std::pow(defaults_.beta1, static_cast<double>(g.step));
      const double bc2 = 1.0 - std::pow(defaults_.beta2, static_cast<double>(g.step));
      upd.push_back({g.lr, defaults_.beta1, defaults_.beta2, defaults_.eps, g.weight_decay, bc1, std::sqrt(bc2)});
    }
    return upd;
  }

  std::int64_t step_count(std::size_t group = 0) const { return groups_.at(group).step; }
  const adamw_options& defaults() const { return defaults_; }

  optimizer_state<T, Dev> state() const {
    optimizer_state<T, Dev> st;
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      auto& g = groups_[gi];
      st.counters["group" + std::to_string(gi) + ".step"] = g.step;
      for (std::size_t i = 0; i < g.params.size(); ++i) {
        st.tensors.emplace_back(g.params[i].name + ".exp_avg", g.exp_avg[i]);
        st.tensors.emplace_back(g.params[i].name + ".exp_avg_sq", g.exp_avg_sq[i]);
      }
    }
    return st;
  }
  // From the optimizer's own device, or from host tensors into a cuda optimizer (a
  // resume stages the file's state on the host and copies it in tensor by tensor, so the
  // device never holds a second copy of the whole state).
  template <device From>
  requires(std::is_same_v<From, Dev> || From::is_host) void load_state(const optimizer_state<T, From>& st) {
    std::vector<std::pair<std::string, shape>> expected;
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      const std::string key = "group" + std::to_string(gi) + ".step";
      KILN_CHECK(st.counters.count(key), "adamw load_state: missing counter '", key, "'");
      for (auto& np : groups_[gi].params) {
        expected.emplace_back(np.name + ".exp_avg", np.param.shape());
        expected.emplace_back(np.name + ".exp_avg_sq", np.param.shape());
      }
    }
    detail::check_state(st, expected, "adamw");
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      auto& g = groups_[gi];
      g.step = st.counters.at("group" + std::to_string(gi) + ".step");
      for (std::size_t i = 0; i < g.params.size(); ++i) {
        copy_state(g.exp_avg[i], *st.find(g.params[i].name + ".exp_avg"));
        copy_state(g.exp_avg_sq[i], *st.find(g.params[i].name + ".exp_avg_sq"));
      }
    }
  }

 private:
  template <device From>
  static void copy_state(tensor<T, Dev>& dst, const tensor<T, From>& src) {
    if constexpr (std::is_same_v<From, Dev>)
      dst.copy_from(src);
    else
      copy_from_host(dst, src);
  }

  // The CPU loop: the chunk list spread over the thread team; a chunk's compute copy is
  // written right after its update, while the chunk is still in cache.
  template <class C>
  void run_step(const copies_t<C>* copies) {
    if constexpr (!Dev::is_host) {
      step_device<C>(copies);
      return;
    }
    cpu_runtime::ensure_initialised();
    std::vector<step_chunk> chunks;
    const std::vector<ops::fn::adamw_update> upd = plan_step<C>(chunks, copies);
    using CT = compute_t<T>;
    cpu_runtime::parallel_for(static_cast<std::int64_t>(chunks.size()), 1, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t c = b; c < e; ++c) {
        const step_chunk& ch = chunks[static_cast<std::size_t>(c)];
        const auto u = upd[ch.group].template as<CT>();
        // Distinct tensors never overlap: restrict lets the loop vectorise.
        T* __restrict pp = ch.p;
        T* __restrict mp = ch.m;
        T* __restrict vp = ch.v;
        const T* __restrict gp = ch.g;
        const std::int64_t n = ch.n;
        if constexpr (std::is_same_v<T, bf16>) {
          if (rounding_.stochastic) {
            // Key: (seed, this group's step); counter: the element's index. 2^40 elements per step.
            const philox_stream rs{rounding_.seed ^ (0x9E3779B97F4A7C15ULL * (ch.group + 1)),
                                   static_cast<std::uint64_t>(groups_[ch.group].step) << 40};
            for (std::int64_t i = 0; i < n; ++i) {
              CT p = CT(pp[i]), m = CT(mp[i]), v = CT(vp[i]);
              u(p, CT(gp[i]), m, v);
              pp[i] = Eigen::numext::bit_cast<bf16>(
                  ops::fn::bf16_bits_stochastic(p, rs.bits(static_cast<std::uint64_t>(ch.first + i))));
              mp[i] = T(m);
              vp[i] = T(v);
            }
            continue;
          }
        }
#pragma omp simd
        for (std::int64_t i = 0; i < n; ++i) {
          CT p = CT(pp[i]), m = CT(mp[i]), v = CT(vp[i]);
          u(p, CT(gp[i]), m, v);
          pp[i] = T(p);
          mp[i] = T(m);
          vp[i] = T(v);
        }
        if constexpr (!std::is_void_v<C>) {
          if (ch.copy == nullptr) continue;
          C* __restrict cp = static_cast<C*>(ch.copy);
          if constexpr (std::is_same_v<C, bf16>) {
            if (copies->stochastic) {
              for (std::int64_t i = 0; i < n; ++i)
                cp[i] = Eigen::numext::bit_cast<bf16>(ops::fn::bf16_bits_stochastic(
                    pp[i], copies->stream.bits(static_cast<std::uint64_t>(ch.copy_first + i))));
              continue;
            }
          }
#pragma omp simd
          for (std::int64_t i = 0; i < n; ++i) cp[i] = static_cast<C>(pp[i]);
        }
      }
    });
  }

  // The GPU step: every chunk of every parameter in one launch of the fused multi-tensor
  // kernel (kernels/adamw.cu) on kiln's compute stream — the same chunking, update functor
  // and stochastic-rounding streams as the CPU loop above. The chunk table goes to the
  // device through caching-allocator blocks (stream-ordered, so the next step may reuse
  // them once the kernel has run).
  template <class C>
  void step_device(const copies_t<C>* copies) {
    namespace ck = cuda_kernels;
    static_assert(!std::is_same_v<T, f64>, "adamw: the CUDA kernels step f32, bf16 or f16 parameters");
    static_assert(chunk_elements == ck::adamw_chunk_elements, "adamw: the CPU and GPU steps chunk alike");
    std::vector<step_chunk> plan;
    const std::vector<ops::fn::adamw_update> upd = plan_step<C>(plan, copies);
    std::vector<ck::adamw_chunk> chunks;
    for (const step_chunk& c : plan)
      chunks.push_back({c.p, c.g, c.m, c.v, c.copy, c.n, c.first, c.copy_first, static_cast<std::int32_t>(c.group)});
    std::vector<ck::adamw_group> gs;
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      ck::adamw_group cg;
      cg.update = upd[gi].template as<float>();
      if (rounding_.stochastic) {
        cg.sr = {rounding_.seed ^ (0x9E3779B97F4A7C15ULL * (gi + 1)), static_cast<std::uint64_t>(groups_[gi].step)
                                                                          << 40};
        cg.stochastic = 1;
      }
      if constexpr (!std::is_void_v<C>) {
        cg.copy_sr = copies->stream;
        cg.copy_stochastic = copies->stochastic ? 1 : 0;
      }
      gs.push_back(cg);
    }
    if (chunks.empty()) return;
    const auto dchunks = cuda_runtime::upload(chunks);
    const auto dgroups = cuda_runtime::upload(gs);
    ck::adamw_step<T, C>(reinterpret_cast<const ck::adamw_chunk*>(dchunks.data()), static_cast<int>(chunks.size()),
                         reinterpret_cast<const ck::adamw_group*>(dgroups.data()), cuda_runtime::compute_stream());
  }

  adamw_options defaults_;
  param_rounding rounding_{};
};

}  // namespace kiln::optim
