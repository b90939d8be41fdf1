// kiln/autograd/recompute.hpp — activation checkpointing: keep a segment's input, not
// its intermediates, and run the segment again during backward.
//
// Spec: recompute(f, x, rng) evaluates y = f(x) without recording (so every tensor the
// segment creates is freed as soon as it is dead) and records one node that keeps only
// x. When backward reaches the node it re-runs f on a private tape (tape_scope) with
// recording on, backpropagates the incoming gradient through that local graph — the
// parameters f touches receive their gradient there — and writes x's gradient with
// the usual overwrite/accumulate rule. `rng` lists the random streams f draws from
// (dropout generators): their positions are rewound before the re-run and restored
// after it, so the recomputation draws the same masks as the first run and the
// streams end where an uncheckpointed run would leave them.
// Under no_grad (evaluation, generation) it is simply f(x).
// Cost: one extra forward of the segment per backward (≈ +33% step FLOPs when every
// block is recomputed); memory: the segment's activations no longer outlive its forward.
#pragma once

#include <utility>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/core/philox.hpp"

namespace kiln::autograd {

// The random streams a segment uses, and where they stood.
struct rng_positions {
  std::vector<philox_generator*> generators;
  std::vector<std::uint64_t> offsets() const {
    std::vector<std::uint64_t> o;
    for (auto* g : generators) o.push_back(g->offset());
    return o;
  }
  void rewind(const std::vector<std::uint64_t>& to) const {
    for (std::size_t i = 0; i < generators.size(); ++i) generators[i]->set_state(generators[i]->seed(), to[i]);
  }
};

template <floating_element T, device Dev, class F>
var<T, Dev> recompute(F f, const var<T, Dev>& x, rng_positions rng = {}) {
  if (!grad_enabled()) return f(x);
  const auto before = rng.offsets();
  tensor<T, Dev> y;
  leaf_sink reads;  // the parameters the segment reads: its one node writes their gradients
  {
    no_grad ng;
    y = f(x).value();
  }
  const auto after = rng.offsets();
  if (tape::current().listening())
    for (const void* leaf : reads.leaves()) tape::current().note_leaf(leaf);
  var<T, Dev> out = var<T, Dev>::make_result(std::move(y));
  record_node(out, [f = std::move(f), x, rng, before, after](const tensor<T, Dev>& gy) mutable {
    tape_scope scope;
    enable_grad on;
    var<T, Dev> xi(x.value(), x.requires_grad());
    rng.rewind(before);
    var<T, Dev> yi = f(xi);
    rng.rewind(after);
    if (!yi.requires_grad()) return;  // nothing in the segment is trainable
    yi.backward(gy);
    if (x.requires_grad() && xi.has_grad()) {
      const grad_write m = x.begin_grad_write();
      const T* src = xi.grad().data();
      T* dst = x.grad().data();
      for (std::int64_t i = 0; i < x.numel(); ++i) store_grad(dst[i], static_cast<compute_t<T>>(src[i]), m);
    }
  });
  return out;
}

}  // namespace kiln::autograd
