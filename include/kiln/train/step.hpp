// kiln/train/step.hpp — one training micro-batch, and the optimizer step that ends a window.
//
// Spec: stepper<Trainer> is the part of trainer t between a batch and the updated weights.
//   micro_batch(t, b, last)  the forward (training_step), on_before_zero_grad and zero_grad
//                            at a window's start, backward (weighted by the batch's items
//                            when accumulating), and at the window's end — every
//                            accumulate_grad_batches micro-batches, or the epoch's last —
//                            the optimizer step. A strategy that overlaps_backward listens
//                            from the forward of the window's last micro-batch on.
//   optimizer_step(t)        the window's gradients completed by the precision policy and
//                            combined by the strategy (ranks agree on a non-finite one),
//                            unscaled and normalised by the window's items, then
//                            on_before_optimizer_step → clip → the precision policy's step →
//                            global_step + 1 → the step-interval schedules (not after a step
//                            skipped on a loss-scale overflow)
//   step_schedules(t, when)  every schedule of interval `when` whose frequency divides the
//                            count; a monitored schedule is fed its metric first (an error
//                            naming it when it was not logged)
// Manual optimisation: the module steps through ctx, which calls manual_backward,
// manual_optimizer_step<I> and advance_schedule<I> here; the trainer's step-interval
// schedules do not run.
// What is unscaled, checked and clipped is what the optimizer steps: the model, its f32
// masters (keeps_masters), or the strategy's stepped_parameters (shards_parameters).
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "kiln/core/error.hpp"
#include "kiln/core/type_name.hpp"
#include "kiln/optim/clip.hpp"
#include "kiln/optim/schedule.hpp"
#include "kiln/precision/policy.hpp"
#include "kiln/strategy/strategy.hpp"
#include "kiln/train/checkpointing.hpp"
#include "kiln/train/concepts.hpp"
#include "kiln/train/hook_dispatch.hpp"

namespace kiln::train {

template <class Trainer>
struct stepper {
  using strategy_traits = strategy::traits<typename Trainer::strategy_type>;
  using precision_traits = precision::traits<typename Trainer::precision_type>;

  // One micro-batch of training.
  template <class B>
  static void micro_batch(Trainer& t, const B& b, bool last_in_epoch) {
    auto& st = t.state_;
    using R = decltype(t.model_->training_step(t.ctx_, b));
    prepare_forward(t);
    if constexpr (!Trainer::automatic) {
      if constexpr (std::is_void_v<R>) {
        t.model_->training_step(t.ctx_, b);
      } else {
        auto out = t.model_->training_step(t.ctx_, b);
        if constexpr (is_loss_var<R>::value) st.last_loss = item(out.value());
      }
    } else {
      // The backward of the window's last micro-batch reduces: a strategy that overlaps
      // its reduction with that backward listens from the forward on.
      if (t.accum_count_ + 1 >= st.accumulate_grad_batches || last_in_epoch) listen_for_backward(t);
      auto out = t.model_->training_step(t.ctx_, b);
      static_assert(is_loss_var<R>::value || is_step_output<R>::value,
                    "kiln::trainer: with automatic optimisation, training_step must return the loss (a scalar var) "
                    "or a kiln::train::step_output{loss, items}");
      double items;
      auto loss = [&] {
        if constexpr (is_step_output<R>::value) {
          items = out.items;
          return out.loss;
        } else {
          items = batch_items(b);
          return out;
        }
      }();
      KILN_CHECK(loss.numel() == 1, "training_step must return a scalar loss, got shape ", loss.shape().str());
      st.last_loss = item(loss.value());
      if (t.accum_count_ == 0) {
        fire<hook::on_before_zero_grad>(t);
        std::get<0>(*t.optimizers_).optimizer.zero_grad();
        t.window_items_ = 0;
      }
      const bool accumulating = st.accumulate_grad_batches > 1;
      manual_backward(t, loss, accumulating ? items : 1.0);
      t.window_items_ += items;
      ++t.accum_count_;
      if (t.accum_count_ >= st.accumulate_grad_batches || last_in_epoch) optimizer_step(t);
    }
  }

  // on_before_backward → the precision policy's backward → on_after_backward.
  template <class T, class D>
  static void manual_backward(Trainer& t, const var<T, D>& loss, double weight = 1.0) {
    fire<hook::on_before_backward>(t, loss);
    try {
      t.precision_.backward(loss, weight, *t.model_);
    } catch (error& e) {
      throw e.with_context(position(t));
    }
    fire<hook::on_after_backward>(t);
  }

  // The step that ends an accumulation window (automatic optimisation).
  static void optimizer_step(Trainer& t) {
    auto& so = std::get<0>(*t.optimizers_);
    const bool accumulated = t.window_items_ > 0 && t.accum_count_ > 0 && t.state_.accumulate_grad_batches > 1;
    reduce_gradients(t);
    {
      auto&& target = precision_target(t);
      t.precision_.unscale(target, accumulated ? 1.0 / t.window_items_ : 1.0);
    }
    fire<hook::on_before_optimizer_step>(t);
    clip(t);
    const bool stepped = precision_step(t, so.optimizer);
    t.accum_count_ = 0;
    t.window_items_ = 0;
    ++t.state_.global_step;
    // A step skipped on a loss-scale overflow leaves the schedules where they are (DeepSpeed).
    if (stepped) step_schedules(t, optim::interval::step);
  }

  // ctx.optimizer_step<I>() under manual optimisation.
  template <std::size_t I>
  static void manual_optimizer_step(Trainer& t) {
    reduce_gradients(t);
    fire<hook::on_before_optimizer_step>(t);
    precision_step(t, std::get<I>(*t.optimizers_).optimizer);
    ++t.state_.global_step;
  }
  // ctx.scheduler_step<I>() under manual optimisation.
  template <std::size_t I>
  static void advance_schedule(Trainer& t) {
    auto& so = std::get<I>(*t.optimizers_);
    if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(so.schedule)>, no_schedule>) so.advance();
  }
  // Each schedule's base rates, taken when fit has built the optimizers.
  template <class SO>
  static void bind_schedule(SO& so) {
    if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(so.schedule)>, no_schedule>) so.bind();
  }

  // Steps every schedule whose interval is `when`; a monitored schedule is fed its metric.
  static void step_schedules(Trainer& t, optim::interval when) {
    if constexpr (!Trainer::automatic) {
      if (when == optim::interval::step) return;  // manual optimisation steps its own schedules
    }
    const std::int64_t count = when == optim::interval::step ? t.state_.global_step : t.state_.epoch;
    std::apply(
        [&](auto&... so) {
          (
              [&](auto& s) {
                using S = std::remove_cvref_t<decltype(s.schedule)>;
                if constexpr (!std::is_same_v<S, no_schedule>) {
                  if (s.options.every != when || count % s.options.frequency != 0) return;
                  if constexpr (optim::schedule_traits<S>::monitored) {
                    auto v = t.ctx_.metric(s.options.monitor);
                    KILN_CHECK(v.has_value(), type_name<S>(), ": monitored metric '", s.options.monitor,
                               "' was not logged (logged metrics: ", metric_names(t), ")");
                    s.schedule.update(*v);
                  }
                  s.advance();
                }
              }(so),
              ...);
        },
        *t.optimizers_);
  }

  // A parameter-sharding strategy (zero<3>) gathers what the forward needs first.
  static void prepare_forward(Trainer& t) {
    if constexpr (strategy_traits::shards_parameters) t.strategy_.before_forward();
  }

 private:
  // An overlapping strategy (ddp) listens when the gradients backward writes are the ones
  // it reduces: the policy steps the module's own parameters (no keeps_masters).
  static void listen_for_backward(Trainer& t) {
    if constexpr (strategy_traits::overlaps_backward && !precision_traits::keeps_masters)
      t.strategy_.listen_for_backward(*t.model_);
  }
  // The parameters the sharding strategy's optimizer steps (zero<3>: this rank's segments).
  static decltype(auto) sharded_parameters(Trainer& t) {
    using adapted = std::remove_cvref_t<decltype(std::get<0>(*t.optimizers_).optimizer)>;
    static_assert(strategy::check_stepped_parameters<typename Trainer::strategy_type, adapted>());
    return t.strategy_.stepped_parameters(std::get<0>(*t.optimizers_).optimizer);
  }
  // What the precision policy unscales and checks (it finds the masters under mixed
  // precision itself): the model, or what a parameter-sharding strategy steps.
  static decltype(auto) precision_target(Trainer& t) {
    if constexpr (strategy_traits::shards_parameters)
      return sharded_parameters(t);
    else
      return *t.model_;
  }
  // What clipping acts on: the gradients the optimizer steps (the f32 masters under mixed
  // precision; what a parameter-sharding strategy steps).
  static decltype(auto) stepped_parameters(Trainer& t) {
    if constexpr (strategy_traits::shards_parameters)
      return sharded_parameters(t);
    else
      return t.precision_.master_parameters(*t.model_);
  }

  // The window's gradients, complete and combined across ranks (identity on one rank);
  // ranks agree on whether any is non-finite, so an f16 overflow skips everywhere.
  static void reduce_gradients(Trainer& t) {
    if constexpr (precision_traits::keeps_masters) t.precision_.finish_gradients(*t.model_);
    t.strategy_.reduce_gradients(t.precision_.master_parameters(*t.model_));
    if constexpr (precision_traits::flags_non_finite) {
      if (t.strategy_.world_size() > 1 &&
          t.strategy_.reduce(t.precision_.non_finite_gradients() ? 1.0 : 0.0, reduce::max) > 0)
        t.precision_.mark_non_finite_gradients();
    }
  }

  template <class O>
  static bool precision_step(Trainer& t, O& optimizer) {
    try {
      auto&& target = precision_target(t);
      return t.precision_.step(optimizer, target);
    } catch (error& e) {
      throw e.with_context(position(t));
    }
  }
  static std::string position(const Trainer& t) {
    const auto& st = t.state_;
    return "at epoch " + std::to_string(st.epoch) + ", global step " + std::to_string(st.global_step) + ", batch " +
           std::to_string(st.batch_idx) + " (precision::" + Trainer::precision_type::name + ")";
  }

  // Clipping acts on the gradients the optimizer steps (the f32 masters under mixed precision).
  static void clip(Trainer& t) {
    const auto& o = t.options_;
    if (o.gradient_clip_val <= 0) return;
    auto&& target = stepped_parameters(t);
    if (o.gradient_clip_algorithm == clip_algorithm::norm) {
      if constexpr (strategy_traits::shards_gradients)
        t.strategy_.clip_grad_norm(target, o.gradient_clip_val);  // a global norm over the shards
      else
        optim::clip_grad_norm(target, o.gradient_clip_val);
    } else
      optim::clip_grad_value(target, o.gradient_clip_val);
  }

  static std::string metric_names(const Trainer& t) {
    std::string s;
    for (auto& [k, v] : t.board_.latest) s += (s.empty() ? "" : ", ") + k;
    return s.empty() ? "none" : s;
  }
};

}  // namespace kiln::train
