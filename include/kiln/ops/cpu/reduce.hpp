// kiln/ops/cpu/reduce.hpp — sum / max over one dimension, viewed as [outer, n, inner].
//
// Accumulation is in the compute type (double for f64, float otherwise) in a fixed
// order, so results do not depend on the thread count.
#pragma once

#include <limits>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

namespace kiln::ops::cpu {

struct reduce_geometry {
  std::int64_t outer = 1, n = 1, inner = 1;
};
inline reduce_geometry geometry_of(const shape& s, int dim) {
  reduce_geometry g;
  for (int i = 0; i < s.rank(); ++i) {
    if (i < dim) g.outer *= s[i];
    if (i == dim) g.n = s[i];
    if (i > dim) g.inner *= s[i];
  }
  return g;
}

// out[o, i] = scale * Σ_k x[o, k, i]
template <class T>
void sum_dim(const tensor<T>& x, reduce_geometry g, compute_t<T> scale, tensor<T>& out) {
  using C = compute_t<T>;
  const T* xp = x.data();
  T* op = out.data();
  cpu_runtime::parallel_for(g.outer, 1, [&](std::int64_t b, std::int64_t e) {
    std::vector<C> acc(static_cast<std::size_t>(g.inner));
    for (std::int64_t o = b; o < e; ++o) {
      std::fill(acc.begin(), acc.end(), C(0));
      for (std::int64_t k = 0; k < g.n; ++k) {
        const T* row = xp + (o * g.n + k) * g.inner;
        for (std::int64_t i = 0; i < g.inner; ++i) acc[static_cast<std::size_t>(i)] += C(row[i]);
      }
      for (std::int64_t i = 0; i < g.inner; ++i)
        op[o * g.inner + i] = static_cast<T>(acc[static_cast<std::size_t>(i)] * scale);
    }
  });
}

// gx[o, k, i] (=|+=) scale * gy[o, i]
template <class T>
void sum_dim_backward(const tensor<T>& gy, reduce_geometry g, compute_t<T> scale, tensor<T>& gx, grad_write mode) {
  using C = compute_t<T>;
  const T* gp = gy.data();
  T* xp = gx.data();
  cpu_runtime::parallel_for(g.outer, 1, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t o = b; o < e; ++o)
      for (std::int64_t k = 0; k < g.n; ++k)
        for (std::int64_t i = 0; i < g.inner; ++i)
          store_grad(xp[(o * g.n + k) * g.inner + i], C(gp[o * g.inner + i]) * scale, mode);
  });
}

// out[o, i] = max_k x[o, k, i]; arg[o, i] = the first k attaining it.
template <class T>
void max_dim(const tensor<T>& x, reduce_geometry g, tensor<T>& out, std::int64_t* arg) {
  using C = compute_t<T>;
  const T* xp = x.data();
  T* op = out.data();
  for (std::int64_t o = 0; o < g.outer; ++o)
    for (std::int64_t i = 0; i < g.inner; ++i) {
      C best = -std::numeric_limits<C>::infinity();
      std::int64_t bk = 0;
      for (std::int64_t k = 0; k < g.n; ++k) {
        const C v = C(xp[(o * g.n + k) * g.inner + i]);
        if (k == 0 || v > best) {
          best = v;
          bk = k;
        }
      }
      op[o * g.inner + i] = static_cast<T>(best);
      arg[o * g.inner + i] = bk;
    }
}

template <class T>
void max_dim_backward(const tensor<T>& gy, reduce_geometry g, const std::int64_t* arg, tensor<T>& gx, grad_write mode) {
  using C = compute_t<T>;
  const T* gp = gy.data();
  T* xp = gx.data();
  for (std::int64_t o = 0; o < g.outer; ++o)
    for (std::int64_t k = 0; k < g.n; ++k)
      for (std::int64_t i = 0; i < g.inner; ++i) {
        const std::int64_t j = o * g.inner + i;
        store_grad(xp[(o * g.n + k) * g.inner + i], arg[j] == k ? C(gp[j]) : C(0), mode);
      }
}

// Writes `src` (contiguous, same shape) into the possibly strided view `dst`, row by
// row of the last dimension (the offset of a row is computed once, not per element).
template <class T>
void strided_store(tensor<T>& dst, const tensor<T>& src, grad_write mode) {
  using C = compute_t<T>;
  check_same_shape(dst.shape(), src.shape(), "strided_store");
  const std::int64_t n = src.numel();
  if (n == 0) return;
  const T* sp = src.data();
  T* dp = dst.data();
  if (dst.is_contiguous()) {
    cpu_runtime::parallel_for(n, 1 << 16, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) store_grad(dp[i], C(sp[i]), mode);
    });
    return;
  }
  const int r = dst.rank();
  const std::int64_t inner = dst.shape()[r - 1], ds = dst.strides()[r - 1], rows = n / inner;
  cpu_runtime::parallel_for(rows, std::max<std::int64_t>(1, (1 << 15) / std::max<std::int64_t>(inner, 1)),
                            [&](std::int64_t b, std::int64_t e) {
                              for (std::int64_t row = b; row < e; ++row) {
                                std::int64_t off = 0, rem = row;
                                for (int k = r - 2; k >= 0; --k) {
                                  off += (rem % dst.shape()[k]) * dst.strides()[k];
                                  rem /= dst.shape()[k];
                                }
                                T* d = dp + off;
                                const T* s = sp + row * inner;
                                for (std::int64_t i = 0; i < inner; ++i) store_grad(d[i * ds], C(s[i]), mode);
                              }
                            });
}

// out[..., :] = weight[ids[...], :]
template <class T, index_element I>
void embedding_forward(const tensor<I>& ids, const tensor<T>& weight, tensor<T>& out) {
  const std::int64_t v = weight.size(0), d = weight.size(1), n = ids.numel();
  const I* ip = ids.data();
  for (std::int64_t i = 0; i < n; ++i)
    KILN_CHECK(0 <= ip[i] && ip[i] < v, "embedding: index ", static_cast<std::int64_t>(ip[i]), " at position ", i,
               " is outside the table of ", v, " rows");
  const T* wp = weight.data();
  T* op = out.data();
  cpu_runtime::parallel_for(n, 64, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) std::copy_n(wp + static_cast<std::int64_t>(ip[i]) * d, d, op + i * d);
  });
}

// gw[ids[i], :] += gy[i, :]; overwrite mode zeroes the table first (rows no id hits
// get a zero gradient).
template <class T, index_element I>
void embedding_backward(const tensor<I>& ids, const tensor<T>& gy, tensor<T>& gw, grad_write mode) {
  using C = compute_t<T>;
  const std::int64_t d = gw.size(1), n = ids.numel();
  if (mode == grad_write::overwrite) gw.fill(T(0));
  const I* ip = ids.data();
  const T* gp = gy.data();
  T* wp = gw.data();
  // Parallel over columns: each thread owns a column slice, so there are no races and
  // the summation order per element is the id order.
  cpu_runtime::parallel_for(d, 64, [&](std::int64_t cb, std::int64_t ce) {
    for (std::int64_t i = 0; i < n; ++i) {
      T* row = wp + static_cast<std::int64_t>(ip[i]) * d;
      const T* g = gp + i * d;
      for (std::int64_t j = cb; j < ce; ++j) row[j] = static_cast<T>(C(row[j]) + C(g[j]));
    }
  });
}

}  // namespace kiln::ops::cpu
