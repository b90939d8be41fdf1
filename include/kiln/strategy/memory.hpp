// kiln/strategy/memory.hpp — what a strategy tells the memory planner.
//
// Spec: memory_sharding() says how the strategy divides model states across its ranks
// (the ZeRO stages); communication_plan(model, masters) and buffer_bytes() give its
// communication buffers as communication_bytes: bytes on the model's device and in host
// memory. The planner (kiln/train/memory_plan.hpp, which also names these
// strategy::memory_sharding and strategy::communication_bytes) turns them into the plan's rows.
#pragma once

#include <cstdint>

namespace kiln::strategy {

// How a strategy divides model states across its ranks (ZeRO stages).
struct memory_sharding {
  int world_size = 1;
  bool optimizer_state = false;    // ZeRO ≥ 1 (master weights shard with it)
  bool gradients = false;          // ZeRO ≥ 2
  bool parameters = false;         // ZeRO 3
  bool offload_optimizer = false;  // ZeRO-Offload: the optimizer state's shard lives on the host
};

// A strategy's communication buffers: bytes on the model's device and in host memory.
struct communication_bytes {
  std::int64_t device = 0, host = 0;
  communication_bytes& operator+=(const communication_bytes& o) {
    device += o.device;
    host += o.host;
    return *this;
  }
  friend bool operator==(const communication_bytes&, const communication_bytes&) = default;
};

}  // namespace kiln::strategy
