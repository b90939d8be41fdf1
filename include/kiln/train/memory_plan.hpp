// kiln/train/memory_plan.hpp — the bytes a training run will hold, per device, before
// its first step.
//
// Spec: trainer.plan(model, loader) returns a memory_plan: for each device (one for
// single_device; one per rank for the sharding strategies) the bytes of
//   parameters        Σ over parameters of block(numel · sizeof(T))
//   gradients         Σ over trainable parameters of block(numel · sizeof(T)) — the
//                     buffers backward writes, kept between steps
//   master weights    mixed policies: Σ over trainable parameters of 2 · block(numel · 4)
//                     (the f32 master and its f32 gradient)
//   optimizer state   Σ over the optimizer's state tensors of block(numel · sizeof(S)),
//                     read off the optimizer configure_optimizers() builds (AdamW: two
//                     moments per parameter, in f32 under the mixed policies)
//   activations       measured by a dry run of one training step on the loader's first
//                     batch: the allocator's high-water mark above what the step started
//                     with, through forward and backward (saved activations, gradients of
//                     intermediate values, scratch), with parameter gradients allocated
//                     beforehand so they are not counted twice
//   communication     the strategy's own buffers (strategy.communication_plan): ddp's
//                     f32 buckets; zero's all-gather buffers (and at stage 2 its
//                     reduce-scatter buffers); a pinned host mirror of them in the cpu
//                     column when a cuda model reduces over comm::mpi; zero<3>'s unit
//                     buffers (the largest unit)
//   ZeRO-Offload      zero<S, Comm, offload::cpu>: the optimizer state's shard moves to
//                     the cpu column, which also holds the host copies of the rank's
//                     range (strategy.offload_plan): its values in master weights and
//                     the gradients copied down to them in gradients, one block per
//                     parameter the range touches (on CPU ranks, added to the one column)
//   batches           bytes of one batch times the batches the loader holds at once
//                     (1, plus num_workers · prefetch_factor with workers); host memory,
//                     so on a GPU strategy they are a cpu column of their own beside the
//                     device's (whose activations include training_step's device copy)
// where block(n) is the caching allocator's block size for n bytes (core/allocator.hpp),
// so the figures are what the allocator will hand out. A sharding strategy divides the
// model states by its world size as ZeRO does (optimizer state and masters at stage ≥ 1,
// gradients at ≥ 2, parameters at 3), through strategy.memory_sharding().
// Compare DeepSpeed's estimate_zero2_model_states_mem_needs (model states only, f16
// parameters and gradients plus 12 bytes of f32 state per parameter: 16 B/param); kiln's
// mixed policies add 4 B/param for the f32 gradient they accumulate in, and the plan also
// counts activations and batches.
// The dry run runs training_step once with the RNG streams saved and restored and its
// logged metrics discarded; ctx.planning() is true inside it for modules that record
// what they see. Nothing is stepped.
#pragma once

#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "kiln/core/allocator.hpp"
#include "kiln/strategy/memory.hpp"

namespace kiln::train {

// What a strategy reports (kiln/strategy/memory.hpp), under the names the plan uses.
using memory_sharding = strategy::memory_sharding;
using communication_bytes = strategy::communication_bytes;

struct device_memory {
  std::string device = "cpu";
  int rank = 0;
  std::int64_t parameters = 0, gradients = 0, master_weights = 0, optimizer_state = 0, activations = 0, batches = 0,
               communication = 0;
  std::int64_t model_states() const { return parameters + gradients + master_weights + optimizer_state; }
  std::int64_t total() const { return model_states() + activations + batches + communication; }
};

struct memory_plan {
  std::string strategy, precision;
  std::int64_t parameter_count = 0, trainable_count = 0;
  std::vector<device_memory> devices;

  // A table in MiB, one column per device.
  std::string str() const {
    std::ostringstream os;
    char buf[256];
    os << "memory plan (" << precision << ", " << strategy << "; " << parameter_count << " parameters, "
       << trainable_count << " trainable)\n";
    auto row = [&](const char* what, auto get) {
      std::snprintf(buf, sizeof buf, "  %-16s", what);
      os << buf;
      for (auto& d : devices) {
        std::snprintf(buf, sizeof buf, " %12.3f", double(get(d)) / (1024.0 * 1024.0));
        os << buf;
      }
      os << '\n';
    };
    std::snprintf(buf, sizeof buf, "  %-16s", "MiB");
    os << buf;
    for (auto& d : devices) {
      std::snprintf(buf, sizeof buf, " %12s", (d.device + ":" + std::to_string(d.rank)).c_str());
      os << buf;
    }
    os << '\n';
    row("parameters", [](const device_memory& d) { return d.parameters; });
    row("gradients", [](const device_memory& d) { return d.gradients; });
    row("master weights", [](const device_memory& d) { return d.master_weights; });
    row("optimizer state", [](const device_memory& d) { return d.optimizer_state; });
    row("activations", [](const device_memory& d) { return d.activations; });
    row("batches", [](const device_memory& d) { return d.batches; });
    row("communication", [](const device_memory& d) { return d.communication; });
    row("total", [](const device_memory& d) { return d.total(); });
    return os.str();
  }
};

namespace detail {
inline std::int64_t block_bytes(std::int64_t bytes) {
  return bytes <= 0 ? 0 : static_cast<std::int64_t>(kiln::detail::round_block_size(static_cast<std::size_t>(bytes)));
}
}  // namespace detail

}  // namespace kiln::train
