// kiln/train/fit_loop.hpp — trainer.fit: the set-up, the epochs, and the training epoch.
//
// Spec: fit_loop<Trainer>::run(t, model, train_loader, val_loader_or_null, ckpt_path):
//   [resume: the checkpoint opened and verified first] → setup → configure_model →
//   [resume: on_load_checkpoint, model weights] → strategy setup → precision setup →
//   configure_optimizers (adapted by the precision policy, then by a strategy that
//   adapts_optimizers; schedules bound) → on_fit_start → [resume: optimizers, schedules,
//   loop] → on_log_hyperparams → sanity validation (not on resume) → on_train_start →
//   epochs until max_epochs / max_steps / max_time / a stop once min_epochs and min_steps
//   are met → on_train_end → on_fit_end → teardown. After each epoch the epoch-interval
//   schedules step, and checkpoints requested during the epoch are written at the quiet
//   points (after a batch and its validation, after an epoch's schedules).
//   A failure rolls a resume back, fires on_exception, lets a strategy that
//   shards_parameters abandon and one that coordinates_ranks end the job, and rethrows.
// train_epoch(t, ...): on_train_epoch_start → per batch: on_train_batch_start →
//   stepper::micro_batch → on_train_batch_end → the step's logged values →
//   validation at val_check_interval → the quiet point; then the window cut short by
//   the epoch's end steps, and on_train_epoch_end sees the epoch's aggregates (monitors
//   after the module).
// overfit_batches replays a fixed set of batches; a resume continues mid-epoch at the
// next batch with the accumulation window it saved.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/nn/module.hpp"
#include "kiln/strategy/strategy.hpp"
#include "kiln/train/checkpointing.hpp"
#include "kiln/train/eval_loop.hpp"
#include "kiln/train/hook_dispatch.hpp"
#include "kiln/train/optimizers.hpp"
#include "kiln/train/ranks.hpp"
#include "kiln/train/step.hpp"

namespace kiln::train {

struct fit_result {
  std::int64_t epochs = 0;       // epochs completed
  std::int64_t global_step = 0;  // optimizer steps taken
  std::int64_t micro_batches = 0;
  std::string stop_reason;  // why the loop ended
  std::map<std::string, double> metrics;
  double seconds = 0;
  std::string resumed_from;  // the checkpoint fit() resumed from, if any
};

namespace detail {
// A batch range over a vector (overfit_batches replays a fixed set of batches).
template <class B>
struct fixed_batches {
  const std::vector<B>* v;
  std::int64_t first = 0;
  auto begin() const { return v->begin() + first; }
  auto end() const { return v->end(); }
};
}  // namespace detail

template <class Trainer>
struct fit_loop {
  using module_type = typename Trainer::module_type;
  using context_type = typename Trainer::context_type;
  using strategy_traits = strategy::traits<typename Trainer::strategy_type>;
  using codec = checkpointing<Trainer>;
  using eval = eval_loop<Trainer>;
  using step = stepper<Trainer>;

  template <class TL, class VLPtr>
  static fit_result run(Trainer& t, module_type& model, TL& tl, VLPtr vl, std::string_view ckpt_path) {
    static_assert(has_configure_optimizers<module_type>,
                  "kiln::trainer::fit: the module needs configure_optimizers() returning an optimizer, "
                  "optim::with_schedule(optimizer, schedule), or a std::tuple of them");
    static_assert(!Trainer::automatic || Trainer::num_optimizers == 1,
                  "kiln::trainer::fit: automatic optimisation steps exactly one optimizer; with several, set "
                  "`static constexpr bool automatic_optimization = false;` in the module and step them through ctx");
    using B = batch_of<TL>;
    static_assert(trainable<module_type, context_type, B>,
                  "kiln::trainer::fit: the module needs training_step(auto& ctx, const Batch& batch) for the "
                  "train loader's batch type");
    auto& st = t.state_;
    const auto& o = t.options_;
    // Resume: the checkpoint is opened and verified before anything runs or changes.
    std::optional<io::checkpoint_reader> resume;
    if (!ckpt_path.empty()) {
      if (auto p = ranks<Trainer>::from_rank_zero(t, t.find_checkpoint(ckpt_path)))
        resume.emplace(io::checkpoint_reader::open(*p));
      else
        std::fprintf(stderr, "kiln: ckpt_path \"%.*s\": no checkpoint found under %s; training from scratch\n",
                     int(ckpt_path.size()), ckpt_path.data(), o.default_root_dir.c_str());
    }
    typename codec::rollback undo;  // holds the RNG state from before begin_stage reseeds it
    t.model_ = &model;
    t.begin_stage(stage::fit);
    ranks<Trainer>::distribute(t, tl);  // each rank a disjoint shard of every epoch (no-op on one rank)
    if constexpr (!std::is_same_v<VLPtr, std::nullptr_t>)
      if (vl) ranks<Trainer>::distribute(t, *vl);
    t.pending_saves_.clear();
    const auto t0 = std::chrono::steady_clock::now();
    fit_result result;
    std::int64_t first_batch = 0;
    try {
      fire<hook::setup>(t, stage::fit);
      fire<hook::configure_model>(t);
      if (resume) codec::restore_modules(t, *resume, undo);
      t.strategy_.setup(model);  // replicas agree (rank 0's weights) before masters are taken
      t.precision_.setup(model);
      t.optimizers_.reset();
      {
        using raw = std::remove_cvref_t<decltype(model.configure_optimizers())>;
        using pack = detail::adapted_pack<typename detail::optim_pack<raw>::type, typename Trainer::precision_type,
                                          typename Trainer::strategy_type>;
        t.optimizers_.emplace(
            pack::make(detail::optim_pack<raw>::make(model.configure_optimizers()), t.precision_, t.strategy_));
      }
      std::apply([](auto&... so) { (step::bind_schedule(so), ...); }, *t.optimizers_);
      nn::train(model);
      fire<hook::on_fit_start>(t);
      if (resume) {
        first_batch = codec::restore_loop(t, *resume);
        undo.release();  // from here on the restored state is the run's own
        result.resumed_from = resume->name();
      }
      if (st.loggers_enabled) fire<hook::on_log_hyperparams>(t, t.collect_hparams());

      // Batches: the loader's, or a fixed set for overfit_batches.
      std::vector<B> fixed;
      const std::int64_t overfit = eval::limited(tl.size(), o.overfit_batches);
      if (overfit > 0) {
        for (auto&& b : tl.epoch(0, 0)) {
          if (static_cast<std::int64_t>(fixed.size()) >= overfit) break;
          fixed.push_back(b);
        }
      }

      // Sanity validation.
      if constexpr (!std::is_same_v<VLPtr, std::nullptr_t>) {
        const std::int64_t sanity = o.fast_dev_run > 0 || resume ? 0 : o.num_sanity_val_steps;
        if (sanity != 0) {
          fire<hook::on_sanity_check_start>(t);
          const auto saved = st.loop;
          if (overfit > 0)
            eval::run_range(t, detail::fixed_batches<B>{&fixed}, sanity < 0 ? overfit : std::min(sanity, overfit),
                            loop_kind::sanity);
          else
            eval::run(t, *vl, loop_kind::sanity, sanity);
          st.loop = saved;
          fire<hook::on_sanity_check_end>(t);
          t.board_.clear();
          t.eval_metrics_.reset_entries();
        }
      }

      fire<hook::on_train_start>(t);
      const std::int64_t max_epochs = o.effective_max_epochs();
      t.defer_saves_ = true;
      while (!done(t, max_epochs)) {
        const std::int64_t avail = overfit > 0 ? overfit : tl.size();
        std::int64_t n = eval::limited(avail, o.limit_train_batches);
        if (o.fast_dev_run > 0) n = std::min(n, o.fast_dev_run);
        st.train_batches = n;
        const std::int64_t first = std::min(std::exchange(first_batch, 0), avail);
        if (overfit > 0)
          train_epoch(t, detail::fixed_batches<B>{&fixed, first}, n, vl, &fixed, first);
        else
          train_epoch(t, tl.epoch(st.epoch, first), n, vl, static_cast<std::vector<B>*>(nullptr), first);
        ++st.epoch;
        // Epoch-interval schedules step after the epoch's hooks (Lightning's order).
        step::step_schedules(t, optim::interval::epoch);
        t.flush_pending_saves(st.epoch, 0);
        if (o.fast_dev_run > 0) break;
      }
      t.defer_saves_ = false;
      t.flush_pending_saves(st.epoch, 0);
      if (st.stop_reason.empty()) st.stop_reason = describe_end(t, max_epochs);
      if constexpr (strategy_traits::shards_parameters) t.strategy_.finish(model);  // whole again
      fire<hook::on_train_end>(t);
      fire<hook::on_fit_end>(t);
      fire<hook::teardown>(t, stage::fit);
    } catch (const std::exception& e) {
      t.defer_saves_ = false;
      t.pending_saves_.clear();
      if constexpr (strategy_traits::shards_parameters) t.strategy_.abandon();
      codec::undo(t, undo);  // a failed resume leaves the model and callbacks as they were
      fire<hook::on_exception>(t, e);
      if constexpr (strategy_traits::coordinates_ranks) t.strategy_.abort_job(e);  // end the job
      throw;
    }
    result.epochs = st.epoch;
    result.global_step = st.global_step;
    result.micro_batches = st.micro_batches;
    result.stop_reason = st.stop_reason;
    result.metrics = t.board_.latest;
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    st.loop = loop_kind::none;
    return result;
  }

  template <class Range, class VLPtr, class Fixed>
  static void train_epoch(Trainer& t, Range&& range, std::int64_t n, VLPtr vl, Fixed* fixed, std::int64_t first) {
    auto& st = t.state_;
    const auto& o = t.options_;
    st.loop = loop_kind::train;
    st.loop_batches = n;
    st.batch_idx = first;
    st.phase = log_phase::other;
    if (first == 0) {  // else resumed mid-epoch: the window was restored
      t.accum_count_ = 0;
      t.window_items_ = 0;
    }
    fire<hook::on_train_epoch_start>(t);
    const bool val_this_epoch = has_val(vl) && (st.epoch + 1) % o.check_val_every_n_epoch == 0;
    std::int64_t val_every = n;
    if (o.val_check_interval.is_fraction)
      val_every = std::max<std::int64_t>(1, static_cast<std::int64_t>(o.val_check_interval.value * double(n)));
    else
      val_every = static_cast<std::int64_t>(o.val_check_interval.value);
    for (auto&& b : range) {
      if (st.batch_idx >= n) break;
      st.last_batch_items = batch_items(b);
      st.phase = log_phase::train_step;
      fire<hook::on_train_batch_start>(t, b);
      if (st.should_stop && can_stop_early(t)) break;
      const std::int64_t steps_before = st.global_step;
      const bool last = st.batch_idx + 1 == n;
      step::micro_batch(t, b, last);
      ++st.micro_batches;
      fire<hook::on_train_batch_end>(t, b);
      st.phase = log_phase::other;
      if (st.global_step != steps_before) {
        if (st.global_step % o.log_every_n_steps == 0)
          hook_dispatch<Trainer>::emit(t, t.train_metrics_.take_step_values());
        else
          t.train_metrics_.drop_step_values();
      }
      ++st.batch_idx;
      if (val_this_epoch && (st.batch_idx % val_every == 0 || (last && o.val_check_interval.is_fraction)))
        validate(t, vl, fixed);
      t.flush_pending_saves(st.epoch, st.batch_idx);
      if (o.max_steps >= 0 && st.global_step >= o.max_steps) break;
      if (time_up(t)) {
        t.ctx_.stop("max_time reached");
        break;
      }
      if (st.should_stop && can_stop_early(t)) break;
    }
    // A window cut short by the end of the epoch still steps (Lightning does the same).
    if constexpr (Trainer::automatic)
      if (t.accum_count_ > 0) step::optimizer_step(t);
    // Train epoch aggregates are visible to on_train_epoch_end; values logged there join them.
    st.phase = log_phase::epoch_end;
    auto values = t.train_metrics_.close_epoch();
    fire<hook::on_train_epoch_end, true>(t);
    auto more = t.train_metrics_.close_epoch();
    values.insert(values.end(), more.begin(), more.end());
    hook_dispatch<Trainer>::emit(t, std::move(values));
    st.phase = log_phase::other;
    st.loop = loop_kind::none;
  }

 private:
  static bool can_stop_early(const Trainer& t) {
    return t.state_.epoch >= t.options_.min_epochs && t.state_.global_step >= t.options_.min_steps;
  }
  // With several ranks, what ranks::agree() last decided (each rank's clock differs).
  static bool time_up(const Trainer& t) {
    if (t.strategy_.world_size() > 1) return t.agreed_time_up_;
    return t.options_.max_time && t.ctx_.elapsed_seconds() >= t.options_.max_time->count();
  }
  static bool done(Trainer& t, std::int64_t max_epochs) {
    const auto& st = t.state_;
    if (t.options_.max_steps >= 0 && st.global_step >= t.options_.max_steps) return true;
    if (max_epochs >= 0 && st.epoch >= max_epochs) return true;
    if (time_up(t)) {
      t.ctx_.stop("max_time reached");
      return true;
    }
    return st.should_stop && can_stop_early(t);
  }
  static std::string describe_end(const Trainer& t, std::int64_t max_epochs) {
    const auto& o = t.options_;
    const auto& st = t.state_;
    if (o.fast_dev_run > 0) return "fast_dev_run finished";
    if (o.max_steps >= 0 && st.global_step >= o.max_steps)
      return "max_steps=" + std::to_string(o.max_steps) + " reached";
    if (max_epochs >= 0 && st.epoch >= max_epochs) return "max_epochs=" + std::to_string(max_epochs) + " reached";
    return "stopped";
  }

  template <class VLPtr>
  static bool has_val(VLPtr vl) {
    if constexpr (std::is_same_v<VLPtr, std::nullptr_t>)
      return false;
    else
      return vl != nullptr;
  }
  // A validation inside the training epoch: over the fixed batches under overfit_batches.
  template <class VLPtr, class Fixed>
  static void validate(Trainer& t, VLPtr vl, Fixed* fixed) {
    if constexpr (!std::is_same_v<VLPtr, std::nullptr_t>) {
      if constexpr (!std::is_same_v<Fixed, std::nullptr_t>) {
        if (fixed) {
          eval::run_range(t, detail::fixed_batches<typename Fixed::value_type>{fixed},
                          static_cast<std::int64_t>(fixed->size()), loop_kind::validation);
          return;
        }
      }
      eval::run(t, *vl, loop_kind::validation);
    }
  }
};

}  // namespace kiln::train
