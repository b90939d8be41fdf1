// kiln/train/context.hpp — the one object every hook and step receives.
//
// Spec: context<Trainer> is a view of the running trainer: counters (epoch, global_step
// = optimizer steps, micro_batches, batch_idx within the current loop), which loop is
// running, the options, the model, the metrics (log(), callback_metrics()), the
// optimizers (for manual optimisation and for monitors), and the stop flag. Hooks take
// it as `auto& ctx`; adding a field here never breaks a callback.
// ctx.stop(reason) requests a graceful stop; the fit loop honours it after the current
// batch once min_epochs/min_steps are met (Lightning's semantics).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "kiln/train/concepts.hpp"
#include "kiln/train/metrics.hpp"
#include "kiln/train/options.hpp"

namespace kiln::train {

enum class loop_kind { none, sanity, train, validation, test, predict };
inline const char* loop_name(loop_kind k) {
  switch (k) {
    case loop_kind::none:
      return "idle";
    case loop_kind::sanity:
      return "sanity check";
    case loop_kind::train:
      return "train";
    case loop_kind::validation:
      return "validation";
    case loop_kind::test:
      return "test";
    case loop_kind::predict:
      return "predict";
  }
  return "?";
}

struct loop_state {
  stage current_stage = stage::fit;
  loop_kind loop = loop_kind::none;
  std::int64_t epoch = 0;
  std::int64_t global_step = 0;    // optimizer steps
  std::int64_t micro_batches = 0;  // training micro-batches seen, over the whole fit
  std::int64_t batch_idx = 0;      // index within the current loop's epoch
  std::int64_t loop_batches = 0;   // batches the current loop will run this epoch
  std::int64_t train_batches = 0;  // training batches per epoch (after limits)
  std::int64_t accumulate_grad_batches = 1;
  bool should_stop = false;
  std::string stop_reason;
  double last_loss = std::numeric_limits<double>::quiet_NaN();
  double last_batch_items = 0;
  log_phase phase = log_phase::other;
  std::string log_dir;
  bool loggers_enabled = true;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
};

// The trainer's parts that context calls into (train/step.hpp, train/hook_dispatch.hpp).
template <class Trainer>
struct stepper;
template <class Trainer>
struct hook_dispatch;

template <class Trainer>
class context {
 public:
  using trainer_type = Trainer;
  using module_type = typename Trainer::module_type;

  explicit context(Trainer& t) : t_(&t) {}

  // --- state ---
  std::int64_t epoch() const { return st().epoch; }
  std::int64_t global_step() const { return st().global_step; }
  std::int64_t micro_batches() const { return st().micro_batches; }
  std::int64_t batch_idx() const { return st().batch_idx; }
  std::int64_t loop_batches() const { return st().loop_batches; }
  std::int64_t num_training_batches() const { return st().train_batches; }
  loop_kind loop() const { return st().loop; }
  stage current_stage() const { return st().current_stage; }
  bool sanity_checking() const { return st().loop == loop_kind::sanity; }
  bool training() const { return st().loop == loop_kind::train; }
  // True inside trainer.plan()'s dry run of training_step (nothing will be stepped).
  bool planning() const { return t_->planning_; }
  std::int64_t accumulate_grad_batches() const { return st().accumulate_grad_batches; }
  // Changes the accumulation factor from the next accumulation window on.
  void set_accumulate_grad_batches(std::int64_t n) {
    KILN_CHECK(n >= 1, "set_accumulate_grad_batches(", n, "): expected >= 1");
    t_->state_.accumulate_grad_batches = n;
  }
  double last_loss() const { return st().last_loss; }
  double last_batch_items() const { return st().last_batch_items; }
  double elapsed_seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - st().start).count();
  }
  const trainer_options& options() const { return t_->options_; }
  // Where loggers write: <default_root_dir>/version_<n>, chosen when fit/validate/test starts.
  const std::string& log_dir() const { return st().log_dir; }
  // False under fast_dev_run: loggers and checkpoints must not write files.
  bool loggers_enabled() const { return st().loggers_enabled; }

  module_type& model() const { return *t_->model_; }
  Trainer& trainer() const { return *t_; }
  template <class C>
  C& callback() const {
    return std::get<C>(t_->callbacks_);
  }

  // --- checkpoints ---
  // Saves a checkpoint at the next quiet point of the loop (see trainer::save_checkpoint).
  void save_checkpoint(const std::filesystem::path& path, bool weights_only = false) const {
    t_->save_checkpoint(path, weights_only);
  }

  // --- stopping ---
  void stop(std::string reason = "stop requested") {
    auto& s = t_->state_;
    if (!s.should_stop) s.stop_reason = std::move(reason);
    s.should_stop = true;
  }
  bool should_stop() const { return st().should_stop; }
  const std::string& stop_reason() const { return st().stop_reason; }

  // --- logging ---
  void log(const std::string& name, double value, const log_options& o = {}) {
    hook_dispatch<Trainer>::log_value(*t_, name, value, o);
  }
  template <class T, class D>
  void log(const std::string& name, const var<T, D>& v, const log_options& o = {}) {
    KILN_CHECK(v.numel() == 1, "log('", name, "'): expected a scalar, got a tensor of shape ", v.shape().str());
    hook_dispatch<Trainer>::log_value(*t_, name, item(v.value()), o);
  }
  const std::map<std::string, double>& callback_metrics() const { return t_->board_.latest; }
  const std::vector<std::pair<std::string, double>>& progress_bar_metrics() const { return t_->board_.bar; }
  std::optional<double> metric(const std::string& name) const {
    auto it = t_->board_.latest.find(name);
    if (it == t_->board_.latest.end()) return std::nullopt;
    return it->second;
  }

  // --- precision ---
  // The precision policy (loss scale, overflow state, master weights).
  auto& precision() const { return t_->precision_; }
  // The strategy, and where this process sits in it (rank 0 of 1 on single_device).
  auto& strategy() const { return t_->strategy_; }
  int global_rank() const { return t_->strategy_.rank(); }
  int world_size() const { return t_->strategy_.world_size(); }
  bool is_global_zero() const { return t_->strategy_.is_global_zero(); }
  // The parameters the optimizer steps: the model itself, or under bf16_mixed/f16_mixed
  // its f32 master copies (same names), whose gradients at on_before_optimizer_step are
  // the unscaled, normalised ones the step and the clipping use.
  auto& master_parameters() const { return t_->precision_.master_parameters(*t_->model_); }

  // --- optimizers ---
  static constexpr std::size_t num_optimizers() { return Trainer::num_optimizers; }
  template <std::size_t I = 0>
  auto& optimizer() const {
    return std::get<I>(t_->optimizers()).optimizer;
  }
  template <std::size_t I = 0>
  auto& scheduled_optimizer() const {
    return std::get<I>(t_->optimizers());
  }
  // Calls f(index, optimizer&) for every optimizer.
  template <class F>
  void for_each_optimizer(F&& f) const {
    std::size_t i = 0;
    std::apply([&](auto&... so) { (f(i++, so.optimizer), ...); }, t_->optimizers());
  }

  // --- manual optimisation ---
  // Runs on_before_backward, backward, on_after_backward for `loss`.
  template <class T, class D>
  void manual_backward(const var<T, D>& loss) {
    stepper<Trainer>::manual_backward(*t_, loss, 1.0);
  }
  // Runs on_before_optimizer_step, steps optimizer I, and advances global_step.
  template <std::size_t I = 0>
  void optimizer_step() {
    stepper<Trainer>::template manual_optimizer_step<I>(*t_);
  }
  // Advances optimizer I's schedule by one step.
  template <std::size_t I = 0>
  void scheduler_step() {
    stepper<Trainer>::template advance_schedule<I>(*t_);
  }

 private:
  const loop_state& st() const { return t_->state_; }
  Trainer* t_;
};

}  // namespace kiln::train
