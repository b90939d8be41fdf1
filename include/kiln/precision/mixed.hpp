// kiln/precision/mixed.hpp — mixed precision: bf16/f16 compute, f32 master weights.
//
// precision::bf16_mixed and precision::f16_mixed<Scaler> train a module whose parameters
// (and so activations) are bf16 or f16, while the optimizer steps f32 master copies
// (precision/master_weights.hpp) with f32 moments; after each step the masters are
// written back, rounded to nearest or (bf16_mixed, stochastic_rounding) stochastically.
// Gradients are accumulated across micro-batches in f32 (each micro-batch's Half
// gradient is folded into the master's before the next backward), unscaled in f32 before
// clipping and on_before_optimizer_step, and clipping, norms and nan checks see the f32
// master gradients (master_parameters()).
// f16_mixed multiplies the loss by the loss scale S before backward (f16 gradients
// underflow below 6e-8) and divides by S in the unscale; an inf or NaN anywhere in the
// folded gradients is an overflow: the step is skipped and the scaler backs off
// (precision/loss_scaler.hpp: DeepSpeed's window, hysteresis, min scale). bf16 shares
// f32's exponent range and needs no scale: a non-finite loss or gradient there is an
// error naming the first offending parameter (check_finite).
// Memory per trainable parameter (AdamW): 2 (Half value) + 2 (Half gradient) + 4 (master)
// + 4 (master gradient) + 8 (moments) = 20 bytes, against fp32's 16; DeepSpeed's 16 keeps
// no f32 gradient (it accumulates in Half).
// Checkpoints hold the masters (and open master gradients), the rounding counter and the
// scaler's state, so a resume continues bit for bit.
// Device: the masters live where the model does. The trainer places the policy on its
// strategy's device (`on_device<D>`: bf16_mixed on strategy::single_device<cuda> is
// bf16_mixed_on<cuda>). On cuda the fold is one multi-tensor kernel per micro-batch, and
// optim::adamw writes the stepped masters back into the bf16/f16 model in its own fused
// pass (step(compute_copies): f32 master + Half copy in one kernel).
#pragma once

#include <string>
#include <type_traits>

#include "kiln/core/transfer.hpp"
#include "kiln/optim/clip.hpp"
#include "kiln/precision/loss_scaler.hpp"
#include "kiln/precision/master_weights.hpp"
#include "kiln/precision/policy.hpp"

namespace kiln::precision {

// No loss scaling (bf16).
struct no_loss_scaling {
  static constexpr double scale() { return 1.0; }
};

namespace detail {

template <floating_element Half, device Dev>
struct rebind_probe {
  var<f32, Dev> operator()(const nn::named_parameter<Half, Dev>&) const;
};

// The device of the parameters an optimizer steps (cpu when it does not say).
template <class O>
constexpr auto optimizer_device_probe() {
  if constexpr (requires(const O& o) { o.state().tensors; })
    return std::type_identity<typename optim::state_tensor_t<O>::device_type>{};
  else
    return std::type_identity<cpu>{};
}
template <class O>
using optimizer_device_t = typename decltype(optimizer_device_probe<O>())::type;

template <class O, floating_element Half, device Dev>
constexpr auto rebound_optimizer() {
  if constexpr (!std::is_same_v<optimizer_device_t<O>, Dev>) {
    static_assert(std::is_same_v<optimizer_device_t<O>, Dev>,
                  "kiln::precision (bf16_mixed / f16_mixed): the optimizer from configure_optimizers() steps "
                  "parameters on one device and the trainer's strategy (where the f32 master weights are kept) runs "
                  "on another; build the module, its optimizer and the strategy on one device, e.g. name the "
                  "module's device in the strategy: strategy::single_device<kiln::cuda>");
    return std::type_identity<O>{};
  } else if constexpr (requires(const O& o) { o.template rebind<f32, Dev>(rebind_probe<Half, Dev>{}); }) {
    return std::type_identity<decltype(std::declval<const O&>().template rebind<f32, Dev>(
        rebind_probe<Half, Dev>{}))>{};
  } else {
    static_assert(sizeof(O) == 0,
                  "kiln::precision (bf16_mixed / f16_mixed): the optimizer returned by configure_optimizers() has no "
                  "`template <floating_element U, device D, class Map> auto rebind(Map) const` building the same "
                  "optimizer over the f32 master weights; add one (see optim::adamw::rebind) or use "
                  "precision::bf16_true / f16_true, which step the parameters directly");
    return std::type_identity<O>{};
  }
}

template <floating_element Half, class Scaler, class Derived, device Dev>
class mixed {
 public:
  using param_type = Half;
  // Capabilities (precision/policy.hpp).
  static constexpr bool scaled = !std::is_same_v<Scaler, no_loss_scaling>;
  static constexpr bool keeps_masters = true;
  static constexpr bool flags_non_finite = true;
  static constexpr bool keeps_device_state = true;  // Derived::on_device<D>
  static constexpr bool checkpoints_state = true;

  bool check_finite = true;  // bf16: a non-finite loss or gradient is an error (f16: an overflow)
  Scaler scaler{};

  template <class O>
  using optimizer_t = typename decltype(rebound_optimizer<O, Half, Dev>())::type;

  template <class Module>
  static constexpr void check_module() {
    check_module_common<Module, Derived>();
  }

  template <class M>
  void setup(M& model) {
    masters_.bind(model, Derived::name);
    masters_.clear_overflow();
    unscaled_ = false;
  }
  template <class O>
  optimizer_t<O> adapt(O&& o) {
    return o.template rebind<f32, Dev>(
        [&](const nn::named_parameter<Half, Dev>& np) { return masters_.master_of(np.param, Derived::name); });
  }

  template <class T, class D, class M>
  void backward(var<T, D> loss, double weight, M& model) {
    static_assert(!(scaled && std::is_same_v<T, f16>),
                  "kiln::precision::f16_mixed: training_step returned an f16 loss, but the loss scale (2^16 by "
                  "default) does not fit in f16 (max 65504); compute the loss in f32 — "
                  "kiln::cross_entropy(kiln::ops::cast<float>(logits), labels) — as autocast does");
    masters_.fold();  // the previous micro-batch of this window
    if constexpr (!scaled)
      if (check_finite) check_loss_finite(loss, model, Derived::name);
    seeded_backward(loss, weight * scale());
  }
  template <class M>
  void unscale(M&, double factor) {
    masters_.fold();
    const double f = factor / scale();
    // The overflow record is taken here, before clipping (on cuda the first ask screens
    // the masters; clipping by value would clamp an inf away).
    const bool bad = (scaled || check_finite || f != 1.0) && masters_.overflow();
    if (f != 1.0 && !bad) optim::scale_gradients(masters_, f);
    unscaled_ = true;
  }
  // Folds the window's last micro-batch: the master gradients are then complete (the
  // trainer calls it before a strategy reduces them across ranks).
  template <class M>
  void finish_gradients(M&) {
    masters_.fold();
  }
  // Whether a non-finite gradient was folded in this window; ranks agree on it after a
  // reduction through mark_non_finite_gradients, so they all skip (or throw) together.
  bool non_finite_gradients() const { return masters_.overflow(); }
  void mark_non_finite_gradients() { masters_.mark_overflow(); }
  master_weights<Half, Dev>& master_parameters(auto&) { return masters_; }
  const master_weights<Half, Dev>& masters() const { return masters_; }
  bool overflowed() const { return scaled && masters_.overflow(); }
  double scale() const { return scaler.scale(); }

  template <class O, class M>
  bool step(O& optimizer, M& model) {
    if (!unscaled_) unscale(model, 1.0);  // manual optimisation steps without the trainer's unscale
    unscaled_ = false;
    bool skip = false;
    if constexpr (scaled) {
      skip = scaler.update(masters_.overflow());
    } else {
      if (check_finite && masters_.overflow()) check_gradients_finite(masters_, Derived::name);
    }
    if (!skip) {
      const optim::param_rounding r = static_cast<const Derived&>(*this).rounding();
      if constexpr (requires { optimizer.step(masters_.copies(r, 0)); }) {
        optimizer.step(masters_.copies(r, publishes_++));  // the write-back fused into the step
      } else {
        static_assert(Dev::is_host,
                      "kiln::precision (bf16_mixed / f16_mixed): on cuda the optimizer writes the f32 masters back "
                      "into the model in its step; this optimizer has no step(optim::compute_copies<Half, cuda>) "
                      "(optim::adamw has)");
        optimizer.step();
        masters_.publish(r, publishes_++);
      }
    }
    masters_.clear_overflow();
    return !skip;
  }

  template <class Out>
  void save_state(const Out& out) const {
    io::json& j = out.state();
    j.set("policy", std::string(Derived::name));
    j.set("publishes", static_cast<std::int64_t>(publishes_));
    j.set("overflow", masters_.overflow());
    if constexpr (scaled) j.set("scaler", scaler.state_json());
    for (auto& l : masters_.links()) {
      out.add("master/" + l.name, l.master.value());
      if (l.master.has_grad()) out.add("master_grad/" + l.name, l.master.grad());
    }
  }
  template <class In>
  void load_state(const In& in) {
    const io::json& j = in.state();
    const std::string& file = in.file_name();
    const io::json* pol = j.find("policy");
    KILN_CHECK(pol != nullptr, file, ": the checkpoint holds no ", Derived::name,
               " state (no f32 master weights): it was written under another precision policy");
    KILN_CHECK(pol->as_string("precision.policy") == Derived::name, file,
               ": the checkpoint was written under precision::", pol->as_string(),
               ", this trainer uses precision::", Derived::name);
    const std::int64_t pub = j.at("publishes").as_int("precision.publishes");
    const bool overflow = j.at("overflow").as_bool("precision.overflow");
    for (auto& l : masters_.links()) {
      KILN_CHECK(in.contains("master/" + l.name), file, ": missing master weight 'precision/master/", l.name, "'");
      const auto t = in.template load<f32>("master/" + l.name);
      KILN_CHECK(t.shape() == l.master.shape(), file, ": master weight 'precision/master/", l.name, "' has shape ",
                 t.shape().str(), ", the parameter has ", l.master.shape().str());
    }
    Scaler restored = scaler;
    if constexpr (scaled) {
      KILN_CHECK(j.contains("scaler"), file, ": the checkpoint has no loss-scaler state");
      restored.load_state(j.at("scaler"), file + ": precision.scaler");
    }
    // Apply (everything above has been checked).
    for (auto& l : masters_.links()) {
      copy_from_host(l.master.value(), in.template load<f32>("master/" + l.name));
      l.master.zero_grad();
      if (in.contains("master_grad/" + l.name)) {
        l.master.begin_grad_write();
        copy_from_host(l.master.grad(), in.template load<f32>("master_grad/" + l.name));
      }
    }
    masters_.clear_overflow();
    if (overflow) masters_.mark_overflow();
    publishes_ = static_cast<std::uint64_t>(pub);
    scaler = restored;
  }

 private:
  master_weights<Half, Dev> masters_;
  std::uint64_t publishes_ = 0;  // master → model write-backs: the stochastic-rounding key
  bool unscaled_ = false;
};

}  // namespace detail

// bf16 parameters and activations, f32 master weights and optimizer math, on Dev (the
// trainer picks it: see on_device). Set stochastic_rounding to round the write-back of the
// masters stochastically.
template <device Dev = cpu>
struct bf16_mixed_on : detail::mixed<bf16, no_loss_scaling, bf16_mixed_on<Dev>, Dev> {
  static constexpr const char* name = "bf16_mixed";
  template <device D>
  using on_device = bf16_mixed_on<D>;
  bool stochastic_rounding = false;
  std::uint64_t rounding_seed = 0x5eed;
  optim::param_rounding rounding() const { return {stochastic_rounding, rounding_seed}; }
};
// What users name: the trainer turns it into bf16_mixed_on<its strategy's device>.
using bf16_mixed = bf16_mixed_on<cpu>;

// f16 parameters and activations, f32 master weights, dynamic (or static) loss scaling.
template <loss_scaler Scaler = dynamic_loss_scaler, device Dev = cpu>
struct f16_mixed : detail::mixed<f16, Scaler, f16_mixed<Scaler, Dev>, Dev> {
  static constexpr const char* name = "f16_mixed";
  template <device D>
  using on_device = f16_mixed<Scaler, D>;
  optim::param_rounding rounding() const { return {}; }
};

}  // namespace kiln::precision
