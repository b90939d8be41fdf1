// kiln/ops/embedding.hpp — differentiable table look-up.
#pragma once

#include "kiln/autograd/var.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cpu/reduce.hpp"

namespace kiln::ops {

// out[..., :] = weight[ids[...], :]; ids of any shape, weight [V, D].
template <floating_element T, device Dev, index_element I>
var<T, Dev> embedding(const tensor<I, Dev>& ids, const var<T, Dev>& weight) {
  KILN_CHECK(weight.rank() == 2, "embedding: weight must be [num_embeddings, dim], got ", weight.shape().str());
  auto iv = ids.contiguous();
  shape os = iv.shape();
  os.push_back(weight.size(1));
  tensor<T, Dev> y(os);
  if constexpr (Dev::is_host)
    cpu::embedding_forward(iv, weight.value(), y);
  else
    gpu::embedding_forward(iv, weight.value().contiguous(), y);
  return autograd::record(
      std::move(y),
      [weight, iv](const tensor<T, Dev>& gy) mutable {
        const grad_write m = weight.begin_grad_write();
        if constexpr (Dev::is_host)
          cpu::embedding_backward(iv, gy, weight.grad(), m);
        else
          gpu::embedding_backward(iv, gy.contiguous(), weight.grad(), m);
      },
      weight);
}

}  // namespace kiln::ops
