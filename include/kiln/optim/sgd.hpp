// kiln/optim/sgd.hpp — SGD with momentum, dampening, Nesterov and weight decay
// (torch.optim.SGD semantics: L2 decay added to the gradient; the momentum buffer
// starts as the first gradient). One fused pass per tensor via fn::sgd_update.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/ops/kernel/functors.hpp"
#include "kiln/optim/optimizer.hpp"

namespace kiln::optim {

struct sgd_options {
  double lr = 1e-2;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

namespace detail {
template <floating_element T, device Dev>
struct sgd_group {
  std::vector<nn::named_parameter<T, Dev>> params;
  std::vector<tensor<T, Dev>> momentum_buffer;
  std::vector<bool> has_buffer;
  double lr = 0, weight_decay = 0;
};
}  // namespace detail

template <floating_element T = f32, device Dev = cpu>
class sgd : public group_owner<detail::sgd_group<T, Dev>> {
  static_assert(Dev::is_host, "kiln::optim::sgd steps on the host; on the GPU use optim::adamw<T, kiln::cuda>");
  using group = detail::sgd_group<T, Dev>;
  using group_owner<group>::groups_;

 public:
  using group_owner<group>::zero_grad;
  using group_owner<group>::num_groups;
  using group_owner<group>::lr;
  using group_owner<group>::set_lr;

  static constexpr std::string_view kind = "sgd";  // names it in logs

  sgd(std::vector<param_group<T, Dev>> groups, sgd_options defaults = {}) : defaults_(defaults) {
    KILN_CHECK(!defaults.nesterov || (defaults.momentum > 0 && defaults.dampening == 0),
               "sgd: nesterov requires momentum > 0 and dampening == 0");
    KILN_CHECK(defaults.lr >= 0 && defaults.momentum >= 0, "sgd: lr and momentum must be non-negative");
    for (auto& g : groups) {
      group st;
      st.lr = g.lr.value_or(defaults.lr);
      st.weight_decay = g.weight_decay.value_or(defaults.weight_decay);
      for (auto& np : g.params) {
        st.params.push_back(np);
        st.momentum_buffer.push_back(defaults.momentum != 0 ? tensor<T, Dev>::zeros(np.param.shape())
                                                            : tensor<T, Dev>{});
        st.has_buffer.push_back(false);
      }
      groups_.push_back(std::move(st));
    }
  }
  template <class M>
  requires nn::module<M> sgd(M& module, sgd_options defaults = {}) : sgd(single_group<T, Dev>(module), defaults) {}

  // The same optimizer — options, each group's rate and decay — over the parameters
  // map(named_parameter) returns; state starts afresh.
  template <floating_element U, device D2 = Dev, class Map>
  sgd<U, D2> rebind(Map&& map) const {
    return sgd<U, D2>(this->template mapped_groups<U, D2>(map), defaults_);
  }
  // Every state tensor the optimizer holds (momentum buffers exist from construction).
  template <class F>
  void for_each_state_tensor(F&& f) const {
    for (auto& g : groups_)
      for (auto& b : g.momentum_buffer)
        if (b.defined()) f(b);
  }

  void step() {
    cpu_runtime::ensure_initialised();
    using C = compute_t<T>;
    for (auto& g : groups_) {
      for (std::size_t i = 0; i < g.params.size(); ++i) {
        auto& p = g.params[i].param;
        if (!p.has_grad()) continue;
        const ops::fn::sgd_update u{g.lr,           defaults_.momentum, defaults_.dampening,
                                    g.weight_decay, defaults_.nesterov, !g.has_buffer[i]};
        T* pp = p.value().data();
        const T* gp = p.grad().data();
        T* bp = g.momentum_buffer[i].data();
        cpu_runtime::parallel_for(p.numel(), 1 << 15, [&](std::int64_t b, std::int64_t e) {
#pragma omp simd
          for (std::int64_t j = b; j < e; ++j) {
            C pv = C(pp[j]), buf = bp ? C(bp[j]) : C(0);
            u(pv, C(gp[j]), buf);
            pp[j] = T(pv);
            if (bp) bp[j] = T(buf);
          }
        });
        if (bp) g.has_buffer[i] = true;
      }
    }
  }

  optimizer_state<T, Dev> state() const {
    optimizer_state<T, Dev> st;
    for (auto& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i)
        if (g.has_buffer[i]) st.tensors.emplace_back(g.params[i].name + ".momentum_buffer", g.momentum_buffer[i]);
    return st;
  }
  // Momentum buffers absent from `st` are reset (the next step starts them afresh),
  // as torch does for parameters that had not yet been stepped.
  void load_state(const optimizer_state<T, Dev>& st) {
    for (auto& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i)
        if (const auto* t = st.find(g.params[i].name + ".momentum_buffer"))
          KILN_CHECK(t->shape() == g.params[i].param.shape(), "sgd load_state: state tensor '", g.params[i].name,
                     ".momentum_buffer' has shape ", t->shape().str(), ", expected ", g.params[i].param.shape().str());
    for (auto& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i) {
        const auto* t = st.find(g.params[i].name + ".momentum_buffer");
        g.has_buffer[i] = t != nullptr && g.momentum_buffer[i].defined();
        if (g.has_buffer[i]) g.momentum_buffer[i].copy_from(*t);
      }
  }

 private:
  sgd_options defaults_;
};

}  // namespace kiln::optim
