// kiln/ops/kernel/grad_write.hpp — how a backward kernel writes a gradient.
//
// Every backward kernel takes a grad_write: `overwrite` stores the gradient (the first
// contribution, no need to zero the buffer), `accumulate` adds to what is there (a
// tensor used twice, or gradient accumulation across micro-batches). The autograd tape
// picks the mode; kernels never guess.
#pragma once

#include "kiln/core/config.hpp"

namespace kiln {

enum class grad_write { overwrite, accumulate };

template <class T, class C>
KILN_HOST_DEVICE inline void store_grad(T& dst, C v, grad_write mode) {
  if (mode == grad_write::overwrite)
    dst = static_cast<T>(v);
  else
    dst = static_cast<T>(static_cast<C>(dst) + v);
}

}  // namespace kiln
