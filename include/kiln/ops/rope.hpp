// kiln/ops/rope.hpp — differentiable rotary position embedding (HF rotate-half layout).
//
// rope(x, first_position, theta): x [B, T, H, D] (D even); position t of every batch row
// is first_position + t (a KV-cached decode step passes the cache length). The
// rotation is ops::fn::rope_rotate; cos/sin are computed once per call for [T, D/2].
// Bandwidth bound: one read and one write per element each way.
#pragma once

#include <cmath>
#include <memory>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/core/cpu_runtime.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/kernel/functors.hpp"

namespace kiln::ops {

namespace cpu {
// table[t·D/2 + c] = {cos, sin} of position (first + t) at frequency c.
inline std::vector<float> rope_table(std::int64_t len, std::int64_t dim, std::int64_t first, double theta) {
  const std::int64_t half = dim / 2;
  std::vector<float> table(static_cast<std::size_t>(2 * len * half));
  for (std::int64_t t = 0; t < len; ++t)
    for (std::int64_t c = 0; c < half; ++c) {
      const float angle = static_cast<float>(first + t) * fn::rope_inv_freq(c, dim, static_cast<float>(theta));
      table[static_cast<std::size_t>(2 * (t * half + c))] = std::cos(angle);
      table[static_cast<std::size_t>(2 * (t * half + c) + 1)] = std::sin(angle);
    }
  return table;
}

// y (or, with backward = true, the gradient of x) for contiguous [B, T, H, D] buffers.
template <class T>
void rope_apply(const T* x, T* y, std::int64_t b, std::int64_t t, std::int64_t h, std::int64_t d,
                const std::vector<float>& table, bool backward, grad_write mode) {
  using C = compute_t<T>;
  const std::int64_t half = d / 2;
  cpu_runtime::parallel_for(b * t, std::max<std::int64_t>(1, 4096 / std::max<std::int64_t>(1, h * d)),
                            [&](std::int64_t r0, std::int64_t r1) {
                              for (std::int64_t r = r0; r < r1; ++r) {
                                const float* cs = table.data() + 2 * (r % t) * half;
                                for (std::int64_t hh = 0; hh < h; ++hh) {
                                  const std::int64_t base = (r * h + hh) * d;
                                  for (std::int64_t c = 0; c < half; ++c) {
                                    const C co = C(cs[2 * c]), si = C(cs[2 * c + 1]);
                                    const C a = C(x[base + c]), bb = C(x[base + c + half]);
                                    C o1, o2;
                                    if (backward)
                                      fn::rope_rotate::backward(a, bb, co, si, o1, o2);
                                    else
                                      fn::rope_rotate::forward(a, bb, co, si, o1, o2);
                                    store_grad(y[base + c], o1, mode);
                                    store_grad(y[base + c + half], o2, mode);
                                  }
                                }
                              }
                            });
}
}  // namespace cpu

template <floating_element T, device Dev>
var<T, Dev> rope(const var<T, Dev>& x, std::int64_t first_position = 0, double theta = 10000.0) {
  KILN_CHECK(x.rank() == 4 && x.size(3) % 2 == 0, "rope: expects x [B, T, H, D] with an even D, got ", x.shape().str());
  KILN_CHECK(first_position >= 0 && theta > 0.0, "rope: first_position ", first_position, " and theta ", theta,
             " must be non-negative and positive");
  const std::int64_t B = x.size(0), Tn = x.size(1), H = x.size(2), D = x.size(3);
  if constexpr (!Dev::is_host) {
    auto xv = x.value().contiguous();
    tensor<T, Dev> y(xv.shape());
    const float th = static_cast<float>(theta);
    gpu::rope(xv, y, first_position, th, false, grad_write::overwrite);
    return autograd::record(
        std::move(y),
        [x, first_position, th](const tensor<T, Dev>& gy) mutable {
          const grad_write m = x.begin_grad_write();
          gpu::rope(gy.contiguous(), x.grad(), first_position, th, true, m);
        },
        x);
  } else {
    auto table = std::make_shared<std::vector<float>>(cpu::rope_table(Tn, D, first_position, theta));
    auto xv = x.value().contiguous();
    tensor<T, Dev> y(xv.shape());
    cpu::rope_apply(xv.data(), y.data(), B, Tn, H, D, *table, false, grad_write::overwrite);
    return autograd::record(
        std::move(y),
        [x, table, B, Tn, H, D](const tensor<T, Dev>& gy) mutable {
          const grad_write m = x.begin_grad_write();
          auto g = gy.contiguous();
          cpu::rope_apply(g.data(), x.grad().data(), B, Tn, H, D, *table, true, m);
        },
        x);
  }
}

}  // namespace kiln::ops
