// kiln/nn/embedding.hpp — a learned table of vectors, N(0, 1) initialised as torch.nn.Embedding.
#pragma once

#include "kiln/nn/init.hpp"
#include "kiln/ops/embedding.hpp"

namespace kiln::nn {

template <floating_element T = f32, device Dev = cpu>
struct embedding {
  using device_type = Dev;
  var<T, Dev> weight;  // [num_embeddings, embedding_dim]

  embedding() = default;
  embedding(std::int64_t num_embeddings, std::int64_t dim) {
    KILN_CHECK(num_embeddings > 0 && dim > 0, "nn::embedding: sizes must be positive, got ", num_embeddings, " x ",
               dim);
    weight = var<T, Dev>(to_device<Dev>(init::normal<T>(shape{num_embeddings, dim}, 1.0)), true);
  }
  template <index_element I>
  var<T, Dev> operator()(const tensor<I, Dev>& ids) const {
    return ops::embedding(ids, weight);
  }

  template <class F>
  void for_each_child(F&& f) {
    f("weight", weight);
  }
};

}  // namespace kiln::nn
