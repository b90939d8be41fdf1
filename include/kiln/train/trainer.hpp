// kiln/train/trainer.hpp — the training run, composed at compile time.
//
// Spec: trainer<Module, Strategy, Precision, Callbacks...> runs fit / validate / test /
// predict for a Module with the hook lifecycle of PyTorch Lightning (docs/trainer.md lists
// it). Each slot is a concept (docs/writing-a-policy.md): the trainer checks them at
// compile time (strategy::check, precision::check, check_callback, and
// strategy::check_compatible for the pair) and asks their declared capabilities, never
// their types. It is one class without virtual dispatch; its parts are friend helpers
// templated on it:
//   train/fit_loop.hpp       fit: set-up, epochs, the training epoch, resume, failure
//   train/eval_loop.hpp      validation, test and predict loops
//   train/step.hpp           one micro-batch, the optimizer step, the schedules
//   train/hook_dispatch.hpp  hooks to callbacks and module (monitors last), logged rows
//   train/checkpointing.hpp  the full state to a checkpoint and back
//   train/planner.hpp        trainer.plan(): memory before the first step
//   train/ranks.hpp          what the loop does differently on several ranks
// Checkpoints: save_checkpoint() called while fit runs captures the state at the next
// quiet point — the end of the current batch (after its validation) or of the epoch
// (after the epoch's schedules) — so a resume continues with exactly the next batch and
// replays nothing. fit(..., ckpt_path) restores it: the model and the callbacks at
// configure_model time, optimizers, schedules and the loop after on_fit_start; the sanity
// check is skipped on resume.
// The precision policy is placed on the strategy's device when it keeps_device_state
// (precision_type is precision::bf16_mixed_on<cuda> for bf16_mixed on single_device<cuda>).
// Ensures: no virtual dispatch on the loop's path; hooks a type does not implement are
// not called; options are validated before anything is allocated.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/core/philox.hpp"
#include "kiln/nn/weights.hpp"
#include "kiln/precision/precision.hpp"
#include "kiln/strategy/compatibility.hpp"
#include "kiln/strategy/single_device.hpp"
#include "kiln/strategy/strategy.hpp"
#include "kiln/train/checkpointing.hpp"
#include "kiln/train/context.hpp"
#include "kiln/train/eval_loop.hpp"
#include "kiln/train/fit_loop.hpp"
#include "kiln/train/hook_dispatch.hpp"
#include "kiln/train/optimizers.hpp"
#include "kiln/train/planner.hpp"
#include "kiln/train/ranks.hpp"
#include "kiln/train/step.hpp"

namespace kiln {

namespace train::detail {
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
}  // namespace train::detail

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
      r = fitting::run(*this, model, tl, &vl, ckpt_path);
    } else {
      r = fitting::run(*this, model, tl, static_cast<std::nullptr_t>(nullptr), ckpt_path);
    }
    if constexpr (requires { dm.teardown(train::stage::fit); }) dm.teardown(train::stage::fit);
    return r;
  }
  template <train::loader TL>
  train::fit_result fit(Module& model, TL& train_loader, std::string_view ckpt_path = {}) {
    return fitting::run(*this, model, train_loader, static_cast<std::nullptr_t>(nullptr), ckpt_path);
  }
  template <train::loader TL, train::loader VL>
  train::fit_result fit(Module& model, TL& train_loader, VL& val_loader, std::string_view ckpt_path = {}) {
    return fitting::run(*this, model, train_loader, &val_loader, ckpt_path);
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
    return evaluation::standalone(*this, model, data, train::stage::validate);
  }
  template <class D>
  std::map<std::string, double> test(Module& model, D& data) {
    return evaluation::standalone(*this, model, data, train::stage::test);
  }
  // The same, with the weights of a checkpoint ("best", "last" or a path) loaded first.
  template <class D>
  std::map<std::string, double> validate(Module& model, D& data, std::string_view ckpt_path) {
    load_weights_for_eval(model, ckpt_path);
    return evaluation::standalone(*this, model, data, train::stage::validate);
  }
  template <class D>
  std::map<std::string, double> test(Module& model, D& data, std::string_view ckpt_path) {
    load_weights_for_eval(model, ckpt_path);
    return evaluation::standalone(*this, model, data, train::stage::test);
  }
  // Runs predict_step over every batch; returns the outputs in order.
  template <class D>
  auto predict(Module& model, D& data) {
    return evaluation::predict(*this, model, data);
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
  friend struct train::hook_dispatch<trainer>;
  friend struct train::stepper<trainer>;
  friend struct train::eval_loop<trainer>;
  friend struct train::fit_loop<trainer>;
  using codec = train::checkpointing<trainer>;
  using ranks = train::ranks<trainer>;
  using fitting = train::fit_loop<trainer>;
  using evaluation = train::eval_loop<trainer>;

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

  train::hparams collect_hparams() const {
    train::hparams hp;
    hp.values.emplace_back("trainer", options_.str());
    hp.values.emplace_back("precision", Precision::name);
    if constexpr (requires(const Module& m) { m.hparams(); }) {
      for (auto& kv : model_->hparams().values) hp.values.push_back(kv);
    }
    return hp;
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
