// kiln/callbacks/gradient_accumulation_scheduler.hpp — change accumulate_grad_batches by epoch.
//
// Spec (Lightning's GradientAccumulationScheduler): `scheduling` maps a starting epoch
// (0-based) to an accumulation factor; from that epoch on, that many micro-batches make
// one optimizer step. Epochs before the first key use the trainer's option. Keys must be
// >= 0 and factors >= 1 (checked at construction, naming the bad entry).
#pragma once

#include <cstdint>
#include <map>

#include "kiln/core/error.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

struct gradient_accumulation_scheduler {
  using hooks = hook_list<hook::on_train_epoch_start>;
  std::map<std::int64_t, std::int64_t> scheduling;

  gradient_accumulation_scheduler() = default;
  explicit gradient_accumulation_scheduler(std::map<std::int64_t, std::int64_t> s) : scheduling(std::move(s)) {
    for (auto& [epoch, factor] : scheduling) {
      KILN_CHECK(epoch >= 0, "gradient_accumulation_scheduler: epoch key ", epoch, " must be >= 0");
      KILN_CHECK(factor >= 1, "gradient_accumulation_scheduler: factor ", factor, " for epoch ", epoch,
                 " must be >= 1");
    }
  }

  void on_train_epoch_start(auto& ctx) {
    auto it = scheduling.upper_bound(ctx.epoch());
    if (it == scheduling.begin()) return;
    ctx.set_accumulate_grad_batches(std::prev(it)->second);
  }
};

}  // namespace kiln::callbacks
