// kiln/callbacks/nan_detector.hpp — fail fast, and by name, on the first non-finite value.
//
// Spec: checks the training loss after every training_step (on_before_backward), every
// gradient before each optimizer step (on_before_optimizer_step — after accumulation
// normalisation and unscaling, before clipping; the f32 masters' gradients under mixed
// precision; a loss-scale overflow that f16_mixed will skip is not an error) and, with check_parameters, every
// parameter after the step (on_train_batch_end). The first NaN or infinity found throws
// a kiln::error naming the tensor ("gradient of net.2.weight"), the element's flat index
// and value, the epoch and the global step, instead of letting the run continue to
// produce a NaN model. The scan is the precision policies' (find_non_finite: a device
// tensor screened on the device, copied to the host only to name the bad element).
#pragma once

#include <cmath>
#include <sstream>
#include <string>

#include "kiln/core/error.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/precision/policy.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

struct nan_detector {
  using hooks = hook_list<hook::on_before_backward, hook::on_before_optimizer_step, hook::on_train_batch_end>;
  bool check_parameters = true;

  void on_before_backward(auto& ctx, const auto& loss) {
    const double v = item(loss.value());
    if (!std::isfinite(v)) fail(ctx, "training loss", 0, v);
  }
  void on_before_optimizer_step(auto& ctx) {
    if (ctx.precision().overflowed()) return;  // f16_mixed skips this step and backs the loss scale off
    nn::visit_parameters(ctx.master_parameters(), [&](const std::string& name, auto& p) {
      if (p.has_grad()) scan(ctx, "gradient of " + name, p.grad());
    });
  }
  void on_train_batch_end(auto& ctx, const auto&) {
    if (!check_parameters) return;
    nn::visit_parameters(ctx.model(),
                         [&](const std::string& name, auto& p) { scan(ctx, "parameter " + name, p.value()); });
  }

 private:
  // A parameter whose memory a sharding strategy released (zero<3> between uses) is not
  // in memory to scan: it is skipped (zero<3>'s step checks its own segments).
  template <class Ctx, class Tensor>
  static void scan(Ctx& ctx, const std::string& what, const Tensor& t) {
    if (!t.storage_resident()) return;
    if (auto bad = precision::detail::find_non_finite(t)) fail(ctx, what, bad->first, bad->second);
  }
  template <class Ctx>
  [[noreturn]] static void fail(Ctx& ctx, const std::string& what, std::int64_t index, double v) {
    std::ostringstream os;
    os << "nan_detector: " << what << " is not finite (element " << index << " = " << v << ") at epoch " << ctx.epoch()
       << ", global step " << ctx.global_step() << ", batch " << ctx.batch_idx();
    throw error(os.str());
  }
};

}  // namespace kiln::callbacks
