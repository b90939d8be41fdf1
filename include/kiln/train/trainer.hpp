// kiln/train/trainer.hpp — the training loop, composed at compile time.
//
// Spec: trainer<Module, Strategy, Precision, Callbacks...> runs fit / validate / test /
// predict for a Module (see train/concepts.hpp) with the hook lifecycle of PyTorch
// Lightning (docs/trainer.md lists it):
//   setup → configure_model → configure_optimizers → on_fit_start → sanity validation →
//   on_train_start → per epoch: on_train_epoch_start → per batch: on_train_batch_start →
//   training_step → [window start: on_before_zero_grad → zero_grad] → on_before_backward →
//   backward → on_after_backward → [window end: gradient normalisation → on_before_optimizer_step
//   → clip → optimizer step → scheduler step] → on_train_batch_end → (validation at
//   val_check_interval) → on_train_epoch_end → epoch schedulers → on_train_end → on_fit_end →
//   teardown.
// At each point callbacks fire before the module; monitoring callbacks (those with
// `static constexpr bool monitors = true`: early_stopping, model_checkpoint) fire after
// every other callback, and after the module at on_train_epoch_end and on_validation_end,
// so the metrics they watch are complete.
// Gradient accumulation weighs each micro-batch by its item count and normalises by
// the window's total, so accumulating k batches equals one k-times larger batch.
// Evaluation runs under no_grad with the model in eval mode.
// Checkpoints (train/checkpointing.hpp): save_checkpoint() called while fit runs captures
// the state at the next quiet point — the end of the current batch (after its validation)
// or of the epoch (after the epoch's schedules) — so a resume continues with exactly
// the next batch and replays nothing. fit(..., ckpt_path) restores it: the model and the
// callbacks at configure_model time, optimizers, schedules and the loop after
// on_fit_start; the sanity check is skipped on resume.
// The precision policy is placed on the strategy's device (precision_type is
// precision::bf16_mixed_on<cuda> for bf16_mixed on single_device<cuda>).
// Ensures: no virtual dispatch on the loop's path; hooks a type does not implement are
// not called; options are validated before anything is allocated.
#pragma once

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kiln/autograd/grad_mode.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/type_name.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/optim/clip.hpp"
#include "kiln/optim/schedule.hpp"
#include "kiln/precision/precision.hpp"
#include "kiln/strategy/compatibility.hpp"
#include "kiln/strategy/single_device.hpp"
#include "kiln/strategy/strategy.hpp"
#include "kiln/train/checkpointing.hpp"
#include "kiln/train/context.hpp"
#include "kiln/train/optimizers.hpp"
#include "kiln/train/planner.hpp"
#include "kiln/train/ranks.hpp"

namespace kiln {

namespace train {

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

// The precision policy placed on the strategy's device: a policy that keeps_device_state
// (the mixed policies' f32 masters) names the placed type as on_device<D>.
template <class P, class S>
constexpr auto placed_policy_probe() {
  if constexpr (precision::traits<P>::keeps_device_state && strategy::policy<S>)
    return std::type_identity<typename P::template on_device<typename S::device_type>>{};
  else
    return std::type_identity<P>{};
}
template <class P, class S>
using placed_policy_t = typename decltype(placed_policy_probe<P, S>())::type;
}  // namespace detail

}  // namespace train

template <class Module, class Strategy = strategy::single_device<cpu>, class PrecisionChoice = precision::fp32,
          class... Callbacks>
class trainer {
  // The slots, checked before anything is built from them (each check's messages name the
  // requirement or the member that is missing).
  static_assert(strategy::check<Strategy>());
  static_assert(precision::check<PrecisionChoice>());
  // precision::bf16_mixed on strategy::single_device<cuda> keeps its masters on cuda.
  using Precision = train::detail::placed_policy_t<PrecisionChoice, Strategy>;
  static_assert((check_callback<Callbacks>() && ...));
  static_assert(std::is_class_v<Module>, "kiln::trainer: the first parameter must be the module type");
  static_assert(precision::check<Precision>() && precision::check_for_module<Precision, Module>());
  static_assert(strategy::check_compatible<Strategy, Precision>());

 public:
  using module_type = Module;
  using strategy_type = Strategy;
  using precision_type = Precision;
  using context_type = train::context<trainer>;
  using optimizers_type = typename train::detail::optimizers_of<Module, Precision, Strategy>::type;
  static constexpr std::size_t num_optimizers = std::tuple_size_v<optimizers_type>;
  static constexpr bool automatic = train::module_traits<Module>::automatic_optimization;

  explicit trainer(train::trainer_options options = {}, Callbacks... callbacks)
      : options_(std::move(options)), callbacks_(std::move(callbacks)...), ctx_(*this) {
    options_.validate();
  }
  // Default-constructs every callback.
  explicit trainer(train::trainer_options options = {}) requires(sizeof...(Callbacks) > 0 &&
                                                                 (std::is_default_constructible_v<Callbacks> && ...))
      : trainer(std::move(options), Callbacks{}...) {}
  trainer(const trainer&) = delete;
  trainer& operator=(const trainer&) = delete;

  // ---- entry points ----

  // ckpt_path resumes: "last" (the newest last checkpoint: model_checkpoint's dirpath, then
  // <default_root_dir>/version_*/checkpoints; none found: a fresh start, with a notice),
  // "best" (model_checkpoint's best_model_path) or a checkpoint file.
  template <train::datamodule DM>
  train::fit_result fit(Module& model, DM& dm, std::string_view ckpt_path = {}) {
    if constexpr (requires { dm.setup(train::stage::fit); }) dm.setup(train::stage::fit);
    decltype(auto) tl = dm.train_loader();
    train::fit_result r;
    if constexpr (train::has_val_loader<DM>) {
      decltype(auto) vl = dm.val_loader();
      r = run_fit(model, tl, &vl, ckpt_path);
    } else {
      r = run_fit(model, tl, static_cast<std::nullptr_t>(nullptr), ckpt_path);
    }
    if constexpr (requires { dm.teardown(train::stage::fit); }) dm.teardown(train::stage::fit);
    return r;
  }
  template <train::loader TL>
  train::fit_result fit(Module& model, TL& train_loader, std::string_view ckpt_path = {}) {
    return run_fit(model, train_loader, static_cast<std::nullptr_t>(nullptr), ckpt_path);
  }
  template <train::loader TL, train::loader VL>
  train::fit_result fit(Module& model, TL& train_loader, VL& val_loader, std::string_view ckpt_path = {}) {
    return run_fit(model, train_loader, &val_loader, ckpt_path);
  }

  // Writes a checkpoint of the training state (or, weights_only, the weights and counters)
  // atomically to `path`. During fit the state is taken at the next quiet point (see
  // above); otherwise at once. Only the global rank zero writes.
  void save_checkpoint(const std::filesystem::path& path, bool weights_only = false) {
    KILN_CHECK(model_ != nullptr, "trainer.save_checkpoint(", path.string(),
               "): there is no model yet; call it during or after fit/validate/test");
    if (defer_saves_) {
      for (auto& [p, w] : pending_saves_)
        if (p == path) {
          w = w && weights_only;
          return;
        }
      pending_saves_.emplace_back(path, weights_only);
      return;
    }
    write_checkpoint(path, weights_only, state_.epoch, 0);
  }
  // Resolves "last" / "best" / a path as fit(..., ckpt_path) does; nullopt when
  // "last"/"best" find nothing.
  std::optional<std::filesystem::path> find_checkpoint(std::string_view which) {
    return train::checkpointing<trainer>::find(*this, which);
  }

  // Runs one validation epoch; returns the epoch metrics.
  template <class D>
  std::map<std::string, double> validate(Module& model, D& data) {
    return run_standalone(model, data, train::stage::validate);
  }
  template <class D>
  std::map<std::string, double> test(Module& model, D& data) {
    return run_standalone(model, data, train::stage::test);
  }
  // The same, with the weights of a checkpoint ("best", "last" or a path) loaded first.
  template <class D>
  std::map<std::string, double> validate(Module& model, D& data, std::string_view ckpt_path) {
    load_weights_for_eval(model, ckpt_path);
    return run_standalone(model, data, train::stage::validate);
  }
  template <class D>
  std::map<std::string, double> test(Module& model, D& data, std::string_view ckpt_path) {
    load_weights_for_eval(model, ckpt_path);
    return run_standalone(model, data, train::stage::test);
  }
  // Runs predict_step over every batch; returns the outputs in order.
  template <class D>
  auto predict(Module& model, D& data) {
    model_ = &model;
    begin_stage(train::stage::predict);
    auto&& l = predict_source(data);
    using B = train::batch_of<std::remove_cvref_t<decltype(l)>>;
    static_assert(
        requires(Module & m, context_type & c, const B& b) { m.predict_step(c, b); },
        "kiln::trainer::predict: the module needs predict_step(auto& ctx, const Batch& batch)");
    using R = decltype(model.predict_step(ctx_, std::declval<const B&>()));
    std::vector<R> out;
    fire<hook::setup>(train::stage::predict);
    no_grad ng;
    nn::eval(model);
    state_.loop = train::loop_kind::predict;
    const std::int64_t n = limited(l.size(), options_.limit_predict_batches);
    state_.loop_batches = n;
    fire<hook::on_predict_start>();
    fire<hook::on_predict_epoch_start>();
    state_.batch_idx = 0;
    for (auto&& b : l.epoch(0, 0)) {
      if (state_.batch_idx >= n) break;
      fire<hook::on_predict_batch_start>(b);
      out.push_back(model.predict_step(ctx_, b));
      fire<hook::on_predict_batch_end>(b);
      ++state_.batch_idx;
    }
    fire<hook::on_predict_epoch_end>();
    fire<hook::on_predict_end>();
    state_.loop = train::loop_kind::none;
    fire<hook::teardown>(train::stage::predict);
    return out;
  }

  // ---- memory ----

  // The bytes of parameters, gradients, master weights, optimizer state, activations and
  // batches per device, before the first step (train/memory_plan.hpp has the formulas):
  // model states from the optimizers fit() would build, activations from a dry run of one
  // training step on the loader's first batch (RNG streams restored, nothing stepped).
  template <train::loader L>
  train::memory_plan plan(Module& model, L& loader) {
    model_ = &model;
    return train::planner<trainer>::plan(*this, model, loader);
  }
  template <train::datamodule DM>
  train::memory_plan plan(Module& model, DM& dm) {
    if constexpr (requires { dm.setup(train::stage::fit); }) dm.setup(train::stage::fit);
    return plan(model, dm.train_loader());
  }
  // The model states of the running fit (what model_summary prints at on_fit_start).
  train::device_memory memory_states() {
    KILN_CHECK(optimizers_.has_value() && model_ != nullptr, "trainer.memory_states(): only during or after fit()");
    return train::planner<trainer>::model_states(*this, *model_, precision_, *optimizers_);
  }

  // ---- accessors ----
  const train::trainer_options& options() const { return options_; }
  const train::loop_state& state() const { return state_; }
  std::tuple<Callbacks...>& callbacks() { return callbacks_; }
  template <class C>
  C& callback() {
    return std::get<C>(callbacks_);
  }
  Strategy& strategy() { return strategy_; }
  Precision& precision() { return precision_; }
  const std::map<std::string, double>& callback_metrics() const { return board_.latest; }
  optimizers_type& optimizers() {
    KILN_CHECK(optimizers_.has_value(), "trainer: optimizers exist only during and after fit()");
    return *optimizers_;
  }

 private:
  friend class train::context<trainer>;
  friend struct train::checkpointing<trainer>;
  friend struct train::planner<trainer>;
  friend struct train::ranks<trainer>;
  using codec = train::checkpointing<trainer>;
  using ranks = train::ranks<trainer>;

  void load_weights_for_eval(Module& model, std::string_view which) {
    const auto p = find_checkpoint(which);
    KILN_CHECK(p.has_value(), "trainer: ckpt_path '", which, "' found no checkpoint");
    const auto report = io::load_weights(model, *p);
    (void)report;  // strict: a mismatch has thrown
  }

  // Every rank captures; rank 0 writes (train/checkpointing.hpp: write).
  void write_checkpoint(const std::filesystem::path& path, bool weights_only, std::int64_t epoch,
                        std::int64_t next_batch) {
    codec::write(*this, path, weights_only, epoch, next_batch);
  }
  // Writes the checkpoints requested since the last quiet point, at position (epoch, next_batch).
  void flush_pending_saves(std::int64_t epoch, std::int64_t next_batch) {
    ranks::agree(*this);  // stops, max_time, and rank 0's save requests on every rank
    if (pending_saves_.empty()) return;
    auto saves = std::move(pending_saves_);
    pending_saves_.clear();
    const bool was = defer_saves_;
    defer_saves_ = false;  // hooks fired while capturing must not queue more
    for (auto& [p, w] : saves) write_checkpoint(p, w, epoch, next_batch);
    defer_saves_ = was;
  }

  // ---- hook dispatch ----

  // Fires Hook on callbacks (monitors last) and then the module; with MonitorsAfterModule
  // the monitoring callbacks fire after the module instead.
  template <class Hook, bool MonitorsAfterModule = false, class... A>
  void fire(const A&... a) {
    bool stop = false;
    auto one = [&](auto& c) {
      using C = std::remove_cvref_t<decltype(c)>;
      if constexpr (Hook::template callback_implements<C, context_type&, const A&...>()) {
        using R = decltype(Hook::call(c, std::declval<context_type&>(), std::declval<const A&>()...));
        if constexpr (std::is_same_v<R, train::control>)
          stop |= Hook::call(c, ctx_, a...) == train::control::stop;
        else
          Hook::call(c, ctx_, a...);
      }
    };
    auto callbacks = [&](auto monitoring) {
      std::apply(
          [&](auto&... c) {
            (
                [&](auto& cb) {
                  if constexpr (callback_traits<std::remove_cvref_t<decltype(cb)>>::monitors ==
                                decltype(monitoring)::value)
                    one(cb);
                }(c),
                ...);
          },
          callbacks_);
    };
    callbacks(std::false_type{});
    if constexpr (!MonitorsAfterModule) callbacks(std::true_type{});
    if constexpr (Hook::template module_implements<Module, context_type&, const A&...>()) {
      using R =
          decltype(Hook::call(std::declval<Module&>(), std::declval<context_type&>(), std::declval<const A&>()...));
      if constexpr (std::is_same_v<R, train::control>)
        stop |= Hook::call(*model_, ctx_, a...) == train::control::stop;
      else
        Hook::call(*model_, ctx_, a...);
    }
    if constexpr (MonitorsAfterModule) callbacks(std::true_type{});
    if (stop) ctx_.stop(std::string("a hook returned control::stop at ") + std::string(Hook::name));
  }

  // ---- logging ----
  void log_value(const std::string& name, double v, const train::log_options& o) {
    auto& store = state_.loop == train::loop_kind::train ? train_metrics_ : eval_metrics_;
    if (o.sync_dist) v = strategy_.reduce(v, o.reduction);
    store.log(name, v, o, state_.phase, state_.last_batch_items > 0 ? state_.last_batch_items : 1.0);
  }
  void emit(std::vector<std::pair<std::string, double>> values) {
    if (values.empty() || !state_.loggers_enabled || !strategy_.is_global_zero()) return;
    if (state_.loop == train::loop_kind::sanity) return;
    train::log_record rec{state_.global_step, state_.epoch, std::move(values)};
    fire<hook::on_log>(rec);
  }

  // ---- set-up shared by the entry points ----
  void begin_stage(train::stage s) {
    state_ = train::loop_state{};
    state_.current_stage = s;
    state_.accumulate_grad_batches = options_.accumulate_grad_batches;
    state_.loggers_enabled = options_.fast_dev_run == 0;
    agreed_time_up_ = false;
    if (log_dir_.empty())  // one run directory per trainer, all stages: rank 0's
      log_dir_ = ranks::from_rank_zero(*this, next_version_dir());
    state_.log_dir = log_dir_;
    board_.clear();
    train_metrics_.reset_entries();
    eval_metrics_.reset_entries();
    if (options_.seed) manual_seed(*options_.seed);
  }
  std::string next_version_dir() const {
    namespace fs = std::filesystem;
    for (int v = 0;; ++v) {
      const fs::path p = fs::path(options_.default_root_dir) / ("version_" + std::to_string(v));
      if (!fs::exists(p)) return p.string();
    }
  }
  static std::int64_t limited(std::int64_t available, const train::batch_limit& lim) { return lim.resolve(available); }

  train::hparams collect_hparams() const {
    train::hparams hp;
    hp.values.emplace_back("trainer", options_.str());
    hp.values.emplace_back("precision", Precision::name);
    if constexpr (requires(const Module& m) { m.hparams(); }) {
      for (auto& kv : model_->hparams().values) hp.values.push_back(kv);
    }
    return hp;
  }

  // The loader predict() runs over: the argument itself, or the datamodule's predict_loader().
  template <class D>
  static decltype(auto) predict_source(D& data) {
    if constexpr (train::loader<D>) {
      return (data);
    } else {
      static_assert(train::has_predict_loader<D>,
                    "kiln::trainer::predict: pass a loader or a datamodule with predict_loader()");
      if constexpr (requires { data.setup(train::stage::predict); }) data.setup(train::stage::predict);
      return data.predict_loader();
    }
  }

  template <class D>
  std::map<std::string, double> run_standalone(Module& model, D& data, train::stage s) {
    model_ = &model;
    begin_stage(s);
    fire<hook::setup>(s);
    if constexpr (train::loader<D>) {
      run_eval_loop(data, s == train::stage::test ? train::loop_kind::test : train::loop_kind::validation);
    } else if (s == train::stage::test) {
      static_assert(train::has_test_loader<D> || train::has_val_loader<D> || train::loader<D>,
                    "kiln::trainer::test/validate: pass a loader or a datamodule with test_loader()/val_loader()");
      if constexpr (train::has_test_loader<D>) {
        if constexpr (requires { data.setup(s); }) data.setup(s);
        decltype(auto) l = data.test_loader();
        run_eval_loop(l, train::loop_kind::test);
      } else {
        KILN_CHECK(false, "trainer.test: the datamodule has no test_loader()");
      }
    } else {
      if constexpr (train::has_val_loader<D>) {
        if constexpr (requires { data.setup(s); }) data.setup(s);
        decltype(auto) l = data.val_loader();
        run_eval_loop(l, train::loop_kind::validation);
      } else {
        KILN_CHECK(false, "trainer.validate: the datamodule has no val_loader()");
      }
    }
    fire<hook::teardown>(s);
    std::map<std::string, double> out;
    for (auto& [k, v] : last_eval_) out[k] = v;
    return out;
  }

  // ---- evaluation ----
  template <class L>
  void run_eval_loop(L& l, train::loop_kind kind, std::int64_t max_batches = -1) {
    std::int64_t n = l.size();
    if (kind == train::loop_kind::test)
      n = limited(n, options_.limit_test_batches);
    else if (kind != train::loop_kind::sanity || max_batches < 0)
      n = limited(n, options_.limit_val_batches);
    if (max_batches >= 0) n = std::min(n, max_batches);
    if (options_.fast_dev_run > 0) n = std::min(n, options_.fast_dev_run);
    run_eval_range(l.epoch(0, 0), n, kind);
  }

  template <class Range>
  void run_eval_range(Range&& range, std::int64_t n, train::loop_kind kind) {
    const auto saved_loop = state_.loop;
    const auto saved_idx = state_.batch_idx, saved_batches = state_.loop_batches;
    const auto saved_phase = state_.phase;
    const auto saved_items = state_.last_batch_items;
    const bool test = kind == train::loop_kind::test;
    state_.loop = kind;
    state_.loop_batches = n;
    state_.batch_idx = 0;
    {
      no_grad ng;
      nn::eval(*model_);
      state_.phase = train::log_phase::other;
      if (test) {
        fire<hook::on_test_start>();
        fire<hook::on_test_epoch_start>();
      } else {
        fire<hook::on_validation_start>();
        fire<hook::on_validation_epoch_start>();
      }
      for (auto&& b : range) {
        if (state_.batch_idx >= n) break;
        state_.last_batch_items = train::batch_items(b);
        state_.phase = train::log_phase::eval_step;
        if (test) {
          fire<hook::on_test_batch_start>(b);
          if constexpr (requires(context_type & c) { model_->test_step(c, b); }) {
            prepare_forward();
            model_->test_step(ctx_, b);
          } else {
            KILN_CHECK(false, "trainer.test: the module has no test_step(auto& ctx, const Batch& batch)");
          }
          fire<hook::on_test_batch_end>(b);
        } else {
          fire<hook::on_validation_batch_start>(b);
          if constexpr (requires(context_type & c) { model_->validation_step(c, b); }) {
            prepare_forward();
            model_->validation_step(ctx_, b);
          }
          fire<hook::on_validation_batch_end>(b);
        }
        state_.phase = train::log_phase::other;
        ++state_.batch_idx;
      }
      state_.phase = train::log_phase::epoch_end;
      if (test)
        fire<hook::on_test_epoch_end>();
      else
        fire<hook::on_validation_epoch_end>();
      auto values = eval_metrics_.close_epoch();
      last_eval_ = values;
      emit(std::move(values));
      state_.phase = train::log_phase::other;
      if (test)
        fire<hook::on_test_end, true>();
      else
        fire<hook::on_validation_end, true>();
    }
    if (state_.current_stage == train::stage::fit) nn::train(*model_);
    state_.loop = saved_loop;
    state_.batch_idx = saved_idx;
    state_.loop_batches = saved_batches;
    state_.phase = saved_phase;
    state_.last_batch_items = saved_items;
  }

  // ---- fit ----
  template <class TL, class VLPtr>
  train::fit_result run_fit(Module& model, TL& tl, VLPtr vl, std::string_view ckpt_path) {
    static_assert(train::has_configure_optimizers<Module>,
                  "kiln::trainer::fit: the module needs configure_optimizers() returning an optimizer, "
                  "optim::with_schedule(optimizer, schedule), or a std::tuple of them");
    static_assert(!automatic || num_optimizers == 1,
                  "kiln::trainer::fit: automatic optimisation steps exactly one optimizer; with several, set "
                  "`static constexpr bool automatic_optimization = false;` in the module and step them through ctx");
    using B = train::batch_of<TL>;
    static_assert(train::trainable<Module, context_type, B>,
                  "kiln::trainer::fit: the module needs training_step(auto& ctx, const Batch& batch) for the "
                  "train loader's batch type");
    // Resume: the checkpoint is opened and verified before anything runs or changes.
    std::optional<io::checkpoint_reader> resume;
    if (!ckpt_path.empty()) {
      if (auto p = ranks::from_rank_zero(*this, find_checkpoint(ckpt_path)))
        resume.emplace(io::checkpoint_reader::open(*p));
      else
        std::fprintf(stderr, "kiln: ckpt_path \"%.*s\": no checkpoint found under %s; training from scratch\n",
                     int(ckpt_path.size()), ckpt_path.data(), options_.default_root_dir.c_str());
    }
    typename codec::rollback undo;  // holds the RNG state from before begin_stage reseeds it
    model_ = &model;
    begin_stage(train::stage::fit);
    ranks::distribute(*this, tl);  // each rank a disjoint shard of every epoch (no-op on one rank)
    if constexpr (!std::is_same_v<VLPtr, std::nullptr_t>)
      if (vl) ranks::distribute(*this, *vl);
    pending_saves_.clear();
    const auto t0 = std::chrono::steady_clock::now();
    train::fit_result result;
    std::int64_t first_batch = 0;
    try {
      fire<hook::setup>(train::stage::fit);
      fire<hook::configure_model>();
      if (resume) codec::restore_modules(*this, *resume, undo);
      strategy_.setup(model);  // replicas agree (rank 0's weights) before masters are taken
      precision_.setup(model);
      optimizers_.reset();
      {
        using raw = std::remove_cvref_t<decltype(model.configure_optimizers())>;
        optimizers_.emplace(
            train::detail::adapted_pack<typename train::detail::optim_pack<raw>::type, Precision, Strategy>::make(
                train::detail::optim_pack<raw>::make(model.configure_optimizers()), precision_, strategy_));
      }
      std::apply([](auto&... so) { (bind_schedule(so), ...); }, *optimizers_);
      nn::train(model);
      fire<hook::on_fit_start>();
      if (resume) {
        first_batch = codec::restore_loop(*this, *resume);
        undo.release();  // from here on the restored state is the run's own
        result.resumed_from = resume->name();
      }
      if (state_.loggers_enabled) fire<hook::on_log_hyperparams>(collect_hparams());

      // Batches: the loader's, or a fixed set for overfit_batches.
      std::vector<B> fixed;
      const std::int64_t overfit = limited(tl.size(), options_.overfit_batches);
      if (overfit > 0) {
        for (auto&& b : tl.epoch(0, 0)) {
          if (static_cast<std::int64_t>(fixed.size()) >= overfit) break;
          fixed.push_back(b);
        }
      }

      // Sanity validation.
      if constexpr (!std::is_same_v<VLPtr, std::nullptr_t>) {
        const std::int64_t sanity = options_.fast_dev_run > 0 || resume ? 0 : options_.num_sanity_val_steps;
        if (sanity != 0) {
          fire<hook::on_sanity_check_start>();
          const auto saved = state_.loop;
          if (overfit > 0)
            run_eval_range(train::detail::fixed_batches<B>{&fixed}, sanity < 0 ? overfit : std::min(sanity, overfit),
                           train::loop_kind::sanity);
          else
            run_eval_loop(*vl, train::loop_kind::sanity, sanity);
          state_.loop = saved;
          fire<hook::on_sanity_check_end>();
          board_.clear();
          eval_metrics_.reset_entries();
        }
      }

      fire<hook::on_train_start>();
      const std::int64_t max_epochs = options_.effective_max_epochs();
      defer_saves_ = true;
      while (!fit_done(max_epochs)) {
        const std::int64_t avail = overfit > 0 ? overfit : tl.size();
        std::int64_t n = limited(avail, options_.limit_train_batches);
        if (options_.fast_dev_run > 0) n = std::min(n, options_.fast_dev_run);
        state_.train_batches = n;
        const std::int64_t first = std::min(std::exchange(first_batch, 0), avail);
        if (overfit > 0)
          run_train_epoch(train::detail::fixed_batches<B>{&fixed, first}, n, vl, &fixed, first);
        else
          run_train_epoch(tl.epoch(state_.epoch, first), n, vl, static_cast<std::vector<B>*>(nullptr), first);
        ++state_.epoch;
        // Epoch-interval schedules step after the epoch's hooks (Lightning's order).
        step_schedules(optim::interval::epoch);
        flush_pending_saves(state_.epoch, 0);
        if (options_.fast_dev_run > 0) break;
      }
      defer_saves_ = false;
      flush_pending_saves(state_.epoch, 0);
      if (state_.stop_reason.empty()) state_.stop_reason = describe_end(max_epochs);
      if constexpr (strategy::traits<Strategy>::shards_parameters) strategy_.finish(model);  // whole again
      fire<hook::on_train_end>();
      fire<hook::on_fit_end>();
      fire<hook::teardown>(train::stage::fit);
    } catch (const std::exception& e) {
      defer_saves_ = false;
      pending_saves_.clear();
      if constexpr (strategy::traits<Strategy>::shards_parameters) strategy_.abandon();
      codec::undo(*this, undo);  // a failed resume leaves the model and callbacks as they were
      fire<hook::on_exception>(e);
      if constexpr (strategy::traits<Strategy>::coordinates_ranks) strategy_.abort_job(e);  // end the job
      throw;
    }
    result.epochs = state_.epoch;
    result.global_step = state_.global_step;
    result.micro_batches = state_.micro_batches;
    result.stop_reason = state_.stop_reason;
    result.metrics = board_.latest;
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state_.loop = train::loop_kind::none;
    return result;
  }

  bool can_stop_early() const {
    return state_.epoch >= options_.min_epochs && state_.global_step >= options_.min_steps;
  }
  // With several ranks, what ranks::agree() last decided (each rank's clock differs).
  bool time_up() const {
    if (strategy_.world_size() > 1) return agreed_time_up_;
    return options_.max_time && ctx_.elapsed_seconds() >= options_.max_time->count();
  }
  bool fit_done(std::int64_t max_epochs) {
    if (options_.max_steps >= 0 && state_.global_step >= options_.max_steps) return true;
    if (max_epochs >= 0 && state_.epoch >= max_epochs) return true;
    if (time_up()) {
      ctx_.stop("max_time reached");
      return true;
    }
    return state_.should_stop && can_stop_early();
  }
  std::string describe_end(std::int64_t max_epochs) const {
    if (options_.fast_dev_run > 0) return "fast_dev_run finished";
    if (options_.max_steps >= 0 && state_.global_step >= options_.max_steps)
      return "max_steps=" + std::to_string(options_.max_steps) + " reached";
    if (max_epochs >= 0 && state_.epoch >= max_epochs) return "max_epochs=" + std::to_string(max_epochs) + " reached";
    return "stopped";
  }

  template <class Range, class VLPtr, class Fixed>
  void run_train_epoch(Range&& range, std::int64_t n, VLPtr vl, Fixed* fixed, std::int64_t first) {
    state_.loop = train::loop_kind::train;
    state_.loop_batches = n;
    state_.batch_idx = first;
    state_.phase = train::log_phase::other;
    if (first == 0) {  // else resumed mid-epoch: the window was restored
      accum_count_ = 0;
      window_items_ = 0;
    }
    fire<hook::on_train_epoch_start>();
    const bool val_this_epoch = has_val(vl) && (state_.epoch + 1) % options_.check_val_every_n_epoch == 0;
    std::int64_t val_every = n;
    if (options_.val_check_interval.is_fraction)
      val_every = std::max<std::int64_t>(1, static_cast<std::int64_t>(options_.val_check_interval.value * double(n)));
    else
      val_every = static_cast<std::int64_t>(options_.val_check_interval.value);
    bool validated_at_end = false;
    for (auto&& b : range) {
      if (state_.batch_idx >= n) break;
      state_.last_batch_items = train::batch_items(b);
      state_.phase = train::log_phase::train_step;
      fire<hook::on_train_batch_start>(b);
      if (state_.should_stop && can_stop_early()) break;
      const std::int64_t steps_before = state_.global_step;
      const bool last = state_.batch_idx + 1 == n;
      training_batch(b, last);
      ++state_.micro_batches;
      fire<hook::on_train_batch_end>(b);
      state_.phase = train::log_phase::other;
      if (state_.global_step != steps_before) {
        if (state_.global_step % options_.log_every_n_steps == 0)
          emit(train_metrics_.take_step_values());
        else
          train_metrics_.drop_step_values();
      }
      ++state_.batch_idx;
      if (val_this_epoch && (state_.batch_idx % val_every == 0 || (last && options_.val_check_interval.is_fraction))) {
        run_validation(vl, fixed);
        validated_at_end = last;
      }
      flush_pending_saves(state_.epoch, state_.batch_idx);
      if (options_.max_steps >= 0 && state_.global_step >= options_.max_steps) break;
      if (time_up()) {
        ctx_.stop("max_time reached");
        break;
      }
      if (state_.should_stop && can_stop_early()) break;
    }
    // A window cut short by the end of the epoch still steps (Lightning does the same).
    if constexpr (automatic)
      if (accum_count_ > 0) optimizer_step_automatic();
    (void)validated_at_end;
    // Train epoch aggregates are visible to on_train_epoch_end; values logged there join them.
    state_.phase = train::log_phase::epoch_end;
    auto values = train_metrics_.close_epoch();
    fire<hook::on_train_epoch_end, true>();
    auto more = train_metrics_.close_epoch();
    values.insert(values.end(), more.begin(), more.end());
    emit(std::move(values));
    state_.phase = train::log_phase::other;
    state_.loop = train::loop_kind::none;
  }

  template <class VLPtr>
  static bool has_val(VLPtr vl) {
    if constexpr (std::is_same_v<VLPtr, std::nullptr_t>)
      return false;
    else
      return vl != nullptr;
  }
  template <class VLPtr, class Fixed>
  void run_validation(VLPtr vl, Fixed* fixed) {
    if constexpr (!std::is_same_v<VLPtr, std::nullptr_t>) {
      if constexpr (!std::is_same_v<Fixed, std::nullptr_t>) {
        if (fixed) {
          run_eval_range(train::detail::fixed_batches<typename Fixed::value_type>{fixed},
                         static_cast<std::int64_t>(fixed->size()), train::loop_kind::validation);
          return;
        }
      }
      run_eval_loop(*vl, train::loop_kind::validation);
    }
  }

  // One micro-batch of training.
  template <class B>
  void training_batch(const B& b, bool last_in_epoch) {
    using R = decltype(model_->training_step(ctx_, b));
    prepare_forward();
    if constexpr (!automatic) {
      if constexpr (std::is_void_v<R>) {
        model_->training_step(ctx_, b);
      } else {
        auto out = model_->training_step(ctx_, b);
        if constexpr (train::is_loss_var<R>::value) state_.last_loss = item(out.value());
      }
    } else {
      // The backward of the window's last micro-batch reduces: a strategy that overlaps
      // its reduction with that backward listens from the forward on.
      if (accum_count_ + 1 >= state_.accumulate_grad_batches || last_in_epoch) listen_for_backward();
      auto out = model_->training_step(ctx_, b);
      static_assert(train::is_loss_var<R>::value || train::is_step_output<R>::value,
                    "kiln::trainer: with automatic optimisation, training_step must return the loss (a scalar var) "
                    "or a kiln::train::step_output{loss, items}");
      double items;
      auto loss = [&] {
        if constexpr (train::is_step_output<R>::value) {
          items = out.items;
          return out.loss;
        } else {
          items = train::batch_items(b);
          return out;
        }
      }();
      KILN_CHECK(loss.numel() == 1, "training_step must return a scalar loss, got shape ", loss.shape().str());
      state_.last_loss = item(loss.value());
      if (accum_count_ == 0) {
        fire<hook::on_before_zero_grad>();
        std::get<0>(*optimizers_).optimizer.zero_grad();
        window_items_ = 0;
      }
      const bool accumulating = state_.accumulate_grad_batches > 1;
      backward_with_hooks(loss, accumulating ? items : 1.0);
      window_items_ += items;
      ++accum_count_;
      if (accum_count_ >= state_.accumulate_grad_batches || last_in_epoch) optimizer_step_automatic();
    }
  }

  template <class T, class D>
  void backward_with_hooks(const var<T, D>& loss, double weight) {
    fire<hook::on_before_backward>(loss);
    try {
      precision_.backward(loss, weight, *model_);
    } catch (error& e) {
      throw e.with_context(position());
    }
    fire<hook::on_after_backward>();
  }

  void optimizer_step_automatic() {
    auto& so = std::get<0>(*optimizers_);
    const bool accumulated = window_items_ > 0 && accum_count_ > 0 && state_.accumulate_grad_batches > 1;
    reduce_gradients();
    {
      auto&& target = precision_target();
      precision_.unscale(target, accumulated ? 1.0 / window_items_ : 1.0);
    }
    fire<hook::on_before_optimizer_step>();
    clip();
    const bool stepped = precision_step(so.optimizer);
    accum_count_ = 0;
    window_items_ = 0;
    ++state_.global_step;
    // A step skipped on a loss-scale overflow leaves the schedules where they are (DeepSpeed).
    if (stepped) step_schedules(optim::interval::step);
  }

  // An overlapping strategy (ddp) listens when the gradients backward writes are the ones
  // it reduces: the policy steps the module's own parameters (no keeps_masters).
  void listen_for_backward() {
    if constexpr (strategy::traits<Strategy>::overlaps_backward && !precision::traits<Precision>::keeps_masters)
      strategy_.listen_for_backward(*model_);
  }
  // A parameter-sharding strategy (zero<3>) gathers what the forward needs first.
  void prepare_forward() {
    if constexpr (strategy::traits<Strategy>::shards_parameters) strategy_.before_forward();
  }
  // The parameters the sharding strategy's optimizer steps (zero<3>: this rank's segments).
  decltype(auto) sharded_parameters() {
    using adapted = std::remove_cvref_t<decltype(std::get<0>(*optimizers_).optimizer)>;
    static_assert(strategy::check_stepped_parameters<Strategy, adapted>());
    return strategy_.stepped_parameters(std::get<0>(*optimizers_).optimizer);
  }
  // What the precision policy unscales and checks (it finds the masters under mixed
  // precision itself): the model, or what a parameter-sharding strategy steps.
  decltype(auto) precision_target() {
    if constexpr (strategy::traits<Strategy>::shards_parameters)
      return sharded_parameters();
    else
      return *model_;
  }
  // What clipping acts on: the gradients the optimizer steps (the f32 masters under mixed
  // precision; what a parameter-sharding strategy steps).
  decltype(auto) stepped_parameters() {
    if constexpr (strategy::traits<Strategy>::shards_parameters)
      return sharded_parameters();
    else
      return precision_.master_parameters(*model_);
  }

  // The window's gradients, complete and combined across ranks (identity on one rank);
  // ranks agree on whether any is non-finite, so an f16 overflow skips everywhere.
  void reduce_gradients() {
    if constexpr (precision::traits<Precision>::keeps_masters) precision_.finish_gradients(*model_);
    strategy_.reduce_gradients(precision_.master_parameters(*model_));
    if constexpr (precision::traits<Precision>::flags_non_finite) {
      if (strategy_.world_size() > 1 &&
          strategy_.reduce(precision_.non_finite_gradients() ? 1.0 : 0.0, train::reduce::max) > 0)
        precision_.mark_non_finite_gradients();
    }
  }

  template <class O>
  bool precision_step(O& optimizer) {
    try {
      auto&& target = precision_target();
      return precision_.step(optimizer, target);
    } catch (error& e) {
      throw e.with_context(position());
    }
  }
  std::string position() const {
    return "at epoch " + std::to_string(state_.epoch) + ", global step " + std::to_string(state_.global_step) +
           ", batch " + std::to_string(state_.batch_idx) + " (precision::" + Precision::name + ")";
  }

  // Clipping acts on the gradients the optimizer steps (the f32 masters under mixed precision).
  void clip() {
    if (options_.gradient_clip_val <= 0) return;
    auto&& target = stepped_parameters();
    if (options_.gradient_clip_algorithm == train::clip_algorithm::norm) {
      if constexpr (strategy::traits<Strategy>::shards_gradients)
        strategy_.clip_grad_norm(target, options_.gradient_clip_val);  // a global norm over the shards
      else
        optim::clip_grad_norm(target, options_.gradient_clip_val);
    } else
      optim::clip_grad_value(target, options_.gradient_clip_val);
  }

  template <std::size_t I>
  void manual_optimizer_step() {
    reduce_gradients();
    fire<hook::on_before_optimizer_step>();
    precision_step(std::get<I>(*optimizers_).optimizer);
    ++state_.global_step;
  }
  template <std::size_t I>
  void advance_schedule() {
    auto& so = std::get<I>(*optimizers_);
    if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(so.schedule)>, train::no_schedule>) so.advance();
  }

  template <class SO>
  static void bind_schedule(SO& so) {
    if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(so.schedule)>, train::no_schedule>) so.bind();
  }

  // Steps every schedule whose interval is `when`; a monitored schedule is fed its metric.
  void step_schedules(optim::interval when) {
    if constexpr (!automatic) {
      if (when == optim::interval::step) return;  // manual optimisation steps its own schedules
    }
    const std::int64_t count = when == optim::interval::step ? state_.global_step : state_.epoch;
    std::apply(
        [&](auto&... so) {
          (
              [&](auto& s) {
                using S = std::remove_cvref_t<decltype(s.schedule)>;
                if constexpr (!std::is_same_v<S, train::no_schedule>) {
                  if (s.options.every != when || count % s.options.frequency != 0) return;
                  if constexpr (optim::schedule_traits<S>::monitored) {
                    auto v = ctx_.metric(s.options.monitor);
                    KILN_CHECK(v.has_value(), type_name<S>(), ": monitored metric '", s.options.monitor,
                               "' was not logged (logged metrics: ", metric_names(), ")");
                    s.schedule.update(*v);
                  }
                  s.advance();
                }
              }(so),
              ...);
        },
        *optimizers_);
  }

  std::string metric_names() const {
    std::string s;
    for (auto& [k, v] : board_.latest) s += (s.empty() ? "" : ", ") + k;
    return s.empty() ? "none" : s;
  }

  train::trainer_options options_;
  std::tuple<Callbacks...> callbacks_;
  Strategy strategy_{};
  Precision precision_{};
  train::loop_state state_{};
  train::metric_board board_{};
  train::metric_store train_metrics_{board_};
  train::metric_store eval_metrics_{board_};
  std::vector<std::pair<std::string, double>> last_eval_;
  std::string log_dir_;
  std::optional<optimizers_type> optimizers_;
  Module* model_ = nullptr;
  std::int64_t accum_count_ = 0;
  double window_items_ = 0;
  bool defer_saves_ = false;
  bool planning_ = false;  // inside plan()'s dry run
  bool agreed_time_up_ = false;
  io::checkpoint_shards* capture_shards_ = nullptr;  // where sharded optimizers write, during a capture
  std::vector<std::pair<std::filesystem::path, bool>> pending_saves_;
  context_type ctx_;
};

}  // namespace kiln
