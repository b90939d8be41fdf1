// kiln/train/planner.hpp — how trainer.plan() fills a memory_plan (train/memory_plan.hpp
// has the formulas); a friend of the trainer, like checkpointing.
#pragma once

#include <algorithm>
#include <map>

#include <iterator>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/autograd/grad_mode.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/type_name.hpp"
#include "kiln/data/dataset.hpp"
#include "kiln/nn/lora.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/nn/unit.hpp"
#include "kiln/precision/policy.hpp"
#include "kiln/strategy/strategy.hpp"
#include "kiln/train/concepts.hpp"
#include "kiln/train/context.hpp"
#include "kiln/train/memory_plan.hpp"
#include "kiln/train/optimizers.hpp"

namespace kiln::train {

namespace detail {
template <class T, class D>
std::int64_t tensor_block(const tensor<T, D>& t) {
  return block_bytes(t.numel() * static_cast<std::int64_t>(sizeof(T)));
}
// The allocator bytes of one batch: bytes() when the batch says, else its x and y
// tensors, else the batch itself when it is a tensor.
template <class B>
std::int64_t batch_bytes(const B& b) {
  if constexpr (requires { b.bytes(); })
    return b.bytes();
  else if constexpr (requires { tensor_block(b.x) + tensor_block(b.y); })
    return tensor_block(b.x) + tensor_block(b.y);
  else if constexpr (requires { tensor_block(b); })
    return tensor_block(b);
  else
    return 0;
}
}  // namespace detail

template <class Trainer>
struct planner {
  using module_type = typename Trainer::module_type;
  using precision_type = typename Trainer::precision_type;
  using strategy_traits = strategy::traits<typename Trainer::strategy_type>;
  static constexpr bool masters = precision::traits<precision_type>::keeps_masters;

  // Parameters, gradients, master weights and optimizer state of `model` with the
  // precision policy `prec` (set up) and the optimizers `opts` (a pack as the trainer keeps it).
  template <class Opts>
  static device_memory model_states(const Trainer& t, module_type& model, precision_type& prec, Opts& opts) {
    device_memory d;
    d.device = std::string(Trainer::strategy_type::device_type::name);
    nn::visit_parameters(model, [&](const std::string&, auto& p) {
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      const std::int64_t b = detail::block_bytes(p.numel() * static_cast<std::int64_t>(sizeof(T)));
      d.parameters += b;
      if (p.requires_grad()) d.gradients += b;
    });
    // NF4 base weights (adapter::qlora) are no parameters, but are held all the same.
    nn::visit_lora_layers(model, [&](const std::string&, auto& layer) {
      if (layer.qweight) d.parameters += detail::block_bytes(layer.qweight->bytes());
    });
    if constexpr (masters) {
      nn::visit_parameters(prec.master_parameters(model), [&](const std::string&, auto& m) {
        d.master_weights += 2 * detail::block_bytes(m.numel() * 4);
      });
    }
    std::apply(
        [&](auto&... so) {
          (
              [&](auto& o) {
                if constexpr (requires { o.for_each_state_tensor([](const auto&) {}); })
                  o.for_each_state_tensor([&](const auto& ten) { d.optimizer_state += detail::tensor_block(ten); });
                else
                  for (auto& [name, ten] : o.state().tensors) d.optimizer_state += detail::tensor_block(ten);
              }(so.optimizer),
              ...);
        },
        opts);
    shard(t, d);
    d.communication = communication(t, model).device;
    if constexpr (strategy_traits::shards_parameters) {
      // zero<3> holds 1/world between uses; within a step the root unit and the unit in
      // use are whole on top (and their gradients, during the unit's backward).
      d.parameters += gathered_bytes(model, false);
      d.gradients += gathered_bytes(model, true);
    }
    return d;
  }
  // Bytes of the root unit plus the largest nn::unit (parameters, or trainable ones).
  static std::int64_t gathered_bytes(module_type& model, bool trainable_only) {
    std::map<const void*, std::size_t> holder;
    std::vector<std::int64_t> bytes{0};
    nn::visit_modules(model, [&](const std::string&, auto& sub) {
      if constexpr (nn::sharding_unit<std::remove_cvref_t<decltype(sub)>>) {
        const std::size_t u = bytes.size();
        bytes.push_back(0);
        nn::visit_parameters(sub, [&](const std::string&, auto& p) { holder[p.id()] = u; });
      }
    });
    nn::visit_parameters(model, [&](const std::string&, auto& p) {
      if (trainable_only && !p.requires_grad()) return;
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      const auto it = holder.find(p.id());
      bytes[it == holder.end() ? 0 : it->second] += detail::block_bytes(p.numel() * std::int64_t(sizeof(T)));
    });
    return bytes[0] + (bytes.size() > 1 ? *std::max_element(bytes.begin() + 1, bytes.end()) : 0);
  }

  // The whole plan; see memory_plan.hpp.
  template <class L>
  static memory_plan plan(Trainer& t, module_type& model, L& loader) {
    static_assert(Trainer::automatic,
                  "kiln::trainer::plan: the dry run drives training_step with automatic optimisation; a module with "
                  "automatic_optimization = false is not supported yet");
    memory_plan p;
    p.strategy = type_name<typename Trainer::strategy_type>();
    p.precision = precision_type::name;
    const auto counts = nn::count_parameters(model);
    p.parameter_count = counts.total;
    p.trainable_count = counts.trainable;

    // The model states as fit() builds them, with a copy of the policy's knobs.
    precision_type prec = t.precision_;
    prec.setup(model);
    using raw = std::remove_cvref_t<decltype(model.configure_optimizers())>;
    // Unsharded: shard() below divides what a sharding strategy divides.
    detail::unsharded none;
    auto opts = detail::adapted_pack<typename detail::optim_pack<raw>::type, precision_type, detail::unsharded>::make(
        detail::optim_pack<raw>::make(model.configure_optimizers()), prec, none);
    device_memory d = model_states(t, model, prec, opts);

    // Gradient buffers exist before the measurement (they are model states, not activations).
    auto allocate_grads = [](auto& m) {
      nn::visit_parameters(m, [](const std::string&, auto& q) {
        if (q.requires_grad()) {
          if (!q.has_grad()) {
            q.begin_grad_write();
            q.zero_grad();
          }
        }
      });
    };
    allocate_grads(model);
    allocate_grads(prec.master_parameters(model));

    // Dry run of one step on the first batch, RNG streams saved and restored.
    std::vector<std::pair<philox_generator*, std::pair<std::uint64_t, std::uint64_t>>> streams;
    streams.push_back({&default_generator(), {default_generator().seed(), default_generator().offset()}});
    nn::visit_modules(model, [&](const std::string&, auto& sub) {
      if constexpr (requires { sub.generator.offset(); })
        if constexpr (std::is_same_v<std::remove_cvref_t<decltype(sub.generator)>, philox_generator>)
          streams.push_back({&sub.generator, {sub.generator.seed(), sub.generator.offset()}});
    });
    std::int64_t host_batches = -1;  // set when the loader says what it holds on the host
    // Activations and temporaries live on the strategy's device: measure that allocator.
    auto& alloc = caching_allocator<typename Trainer::strategy_type::device_type>::instance();
    {
      using B = batch_of<L>;
      std::vector<B> first;
      {
        auto&& range = loader.epoch(0, 0);
        auto it = std::begin(range);
        KILN_CHECK(it != std::end(range), "trainer.plan: the loader yields no batch to measure a step with");
        first.push_back(*it);
      }
      const std::int64_t one = detail::batch_bytes(first.front());
      if constexpr (requires { loader.batches_on_device(); }) {  // data::on_device: its slots, then its inner loader
        d.batches = one * loader.batches_on_device();
        if constexpr (!std::remove_cvref_t<L>::device_type::is_host)
          host_batches = one * (data::resident_batches(loader.inner()) + loader.pinned_batches());
      } else {
        d.batches = one * data::resident_batches(loader);
      }
      const bool was_planning = std::exchange(t.planning_, true);
      const auto saved_loop = t.state_.loop;
      t.state_.loop = loop_kind::train;
      const std::size_t base = alloc.stats().in_use;
      alloc.reset_peak();
      try {
        enable_grad eg;
        nn::train(model);
        auto out = model.training_step(t.ctx_, first.front());
        auto loss = [&] {
          if constexpr (is_step_output<decltype(out)>::value)
            return out.loss;
          else
            return out;
        }();
        prec.backward(loss, 1.0, model);
        prec.unscale(model, 1.0);
      } catch (...) {
        t.planning_ = was_planning;
        t.state_.loop = saved_loop;
        throw;
      }
      d.activations = static_cast<std::int64_t>(alloc.stats().peak_in_use - base);
      t.planning_ = was_planning;
      t.state_.loop = saved_loop;
    }
    nn::zero_grad(model);
    nn::zero_grad(prec.master_parameters(model));
    for (auto& [g, s] : streams) g->set_state(s.first, s.second);
    t.train_metrics_.reset_entries();
    if constexpr (Trainer::strategy_type::device_type::is_host) {  // ZeRO-Offload on CPU ranks: host-to-host copies
      const std::int64_t copies = offloaded(t, model);
      d.master_weights += copies;
      d.gradients += copies;
    }
    p.devices.push_back(d);
    if constexpr (!Trainer::strategy_type::device_type::is_host) {
      // A loader's batches are host tensors: on a GPU strategy they get a cpu column of
      // their own (training_step's device copy of its batch is among the activations).
      // data::on_device<cuda> says what it holds where: its slots' batches on the device,
      // the inner loader's batches and its pinned staging on the host.
      device_memory host;
      host.device = std::string(cpu::name);
      host.rank = d.rank;
      host.batches = host_batches >= 0 ? host_batches : std::exchange(p.devices.back().batches, 0);
      if constexpr (strategy_traits::plans_memory)
        if (t.strategy_.memory_sharding().offload_optimizer)  // zero<S, Comm, offload::cpu, cuda>
          host.optimizer_state = std::exchange(p.devices.back().optimizer_state, 0);
      host.master_weights = host.gradients = offloaded(t, model);
      host.communication = communication(t, model).host;
      p.devices.push_back(host);
    }
    return p;
  }

 private:
  // The strategy's buffers (train/memory_plan.hpp); on one device, its host part counts there.
  static communication_bytes communication(const Trainer& t, module_type& model) {
    communication_bytes c;
    if constexpr (strategy_traits::plans_memory) {
      c = t.strategy_.communication_plan(model, masters);
      if constexpr (Trainer::strategy_type::device_type::is_host) c = {c.device + c.host, 0};
    }
    return c;
  }
  // ZeRO-Offload's host copies of the rank's range: the bytes of the values, and as many
  // again for the gradients copied down to them (0 without offload).
  static std::int64_t offloaded(const Trainer& t, module_type& model) {
    if constexpr (strategy_traits::offloads_optimizer) {
      return t.strategy_.offload_plan(model, masters);
    } else {
      return 0;
    }
  }
  static void shard(const Trainer& t, device_memory& d) {
    if constexpr (strategy_traits::plans_memory) {
      const memory_sharding s = t.strategy_.memory_sharding();
      d.rank = t.strategy_.rank();
      const std::int64_t w = s.world_size;
      if (s.optimizer_state)
        d.optimizer_state = (d.optimizer_state + w - 1) / w, d.master_weights = (d.master_weights + w - 1) / w;
      if (s.gradients) d.gradients = (d.gradients + w - 1) / w;
      if (s.parameters) d.parameters = (d.parameters + w - 1) / w;
    }
  }
};

}  // namespace kiln::train
