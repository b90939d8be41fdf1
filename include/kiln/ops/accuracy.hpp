// kiln/ops/accuracy.hpp — classification accuracy (not differentiable; a metric).
//
// Spec: accuracy(logits [N, C], target [N]) is the fraction of rows whose arg-max class
// (first maximum on ties, as torch.argmax) equals the target; top_k counts a row as
// correct when the target is among its k largest logits. Targets outside [0, C) are
// an error naming the row and the value. Device tensors are read on the host.
#pragma once

#include <cstdint>

#include "kiln/autograd/var.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/core/transfer.hpp"

namespace kiln::ops {

template <floating_element T, index_element I>
double accuracy(const tensor<T>& logits, const tensor<I>& target, int top_k = 1) {
  KILN_CHECK(logits.rank() == 2, "accuracy: logits must be [N, C], got ", logits.shape().str());
  KILN_CHECK(target.rank() == 1 && target.size(0) == logits.size(0), "accuracy: target must be [", logits.size(0),
             "], got ", target.shape().str());
  KILN_CHECK(top_k >= 1 && top_k <= logits.size(1), "accuracy: top_k = ", top_k, " must lie in [1, ", logits.size(1),
             "]");
  const auto l = logits.contiguous();
  const auto t = target.contiguous();
  const std::int64_t n = l.size(0), c = l.size(1);
  if (n == 0) return 0.0;
  std::int64_t correct = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const T* row = l.data() + i * c;
    const std::int64_t y = static_cast<std::int64_t>(t.data()[i]);
    KILN_CHECK(y >= 0 && y < c, "accuracy: target[", i, "] = ", y, " is outside [0, ", c, ")");
    // Rank of the target: how many classes beat it (earlier ties count as beating it).
    std::int64_t above = 0;
    for (std::int64_t j = 0; j < c; ++j) above += row[j] > row[y] || (row[j] == row[y] && j < y);
    correct += above < top_k;
  }
  return static_cast<double>(correct) / static_cast<double>(n);
}

// On a device, the logits and targets are copied to the host first (N·C values, once
// per logged batch; the copy waits for the compute stream).
template <floating_element T, class D, index_element I>
double accuracy(const var<T, D>& logits, const tensor<I, D>& target, int top_k = 1) {
  if constexpr (D::is_host)
    return accuracy(logits.value(), target, top_k);
  else
    return accuracy(to_host(logits.value()), to_host(target), top_k);
}

}  // namespace kiln::ops
