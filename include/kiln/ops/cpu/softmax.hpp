// kiln/ops/cpu/softmax.hpp — softmax, log-softmax and fused softmax-cross-entropy.
//
// All operate on the last dimension of a contiguous [rows, D] view. The fused
// cross-entropy keeps only one log-sum-exp per row for backward — never the [rows, D]
// probability matrix — and recomputes probabilities on the fly: 2 passes over the
// logits forward, 1 backward.
#pragma once

#include <cmath>
#include <limits>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/ops/kernel/functors.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

namespace kiln::ops::cpu {

template <class T>
void softmax_forward(const tensor<T>& x, tensor<T>& y, bool log) {
  using C = compute_t<T>;
  const std::int64_t d = x.shape().back(), rows = x.shape().rows();
  const T* xp = x.data();
  T* yp = y.data();
  cpu_runtime::parallel_for(rows, 16, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r) {
      const T* xr = xp + r * d;
      T* yr = yp + r * d;
      C mx = -std::numeric_limits<C>::infinity();
      for (std::int64_t j = 0; j < d; ++j) mx = std::max(mx, C(xr[j]));
      // exp_c clamps its argument, so it would turn a NaN into a number: a row with a NaN
      // (or with nothing but -inf) takes libm's exp, which keeps the NaN.
      const C sum_x = cpu_runtime::lane_sum<C>(d, [&](std::int64_t j) { return C(xr[j]); });
      const bool plain = std::isfinite(mx) && !std::isnan(sum_x);
      const C s = plain ? cpu_runtime::lane_sum<C>(d, [&](std::int64_t j) { return fn::exp_c(C(xr[j]) - mx); })
                        : cpu_runtime::lane_sum<C>(d, [&](std::int64_t j) { return std::exp(C(xr[j]) - mx); });
      if (log) {
        const C lse = mx + std::log(s);
        for (std::int64_t j = 0; j < d; ++j) yr[j] = static_cast<T>(C(xr[j]) - lse);
      } else {
        const C inv = C(1) / s;
        if (plain)
          for (std::int64_t j = 0; j < d; ++j) yr[j] = static_cast<T>(fn::exp_c(C(xr[j]) - mx) * inv);
        else
          for (std::int64_t j = 0; j < d; ++j) yr[j] = static_cast<T>(std::exp(C(xr[j]) - mx) * inv);
      }
    }
  });
}

// Backward from the forward output y: softmax gx = y (gy - <gy, y>);
// log-softmax gx = gy - softmax(x) Σgy.
template <class T>
void softmax_backward(const tensor<T>& y, const tensor<T>& gy, tensor<T>& gx, bool log, grad_write mode) {
  using C = compute_t<T>;
  const std::int64_t d = y.shape().back(), rows = y.shape().rows();
  const T *yp = y.data(), *gp = gy.data();
  T* gxp = gx.data();
  cpu_runtime::parallel_for(rows, 16, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r) {
      const T *yr = yp + r * d, *gr = gp + r * d;
      T* o = gxp + r * d;
      C dot = 0;
      if (log) {
        for (std::int64_t j = 0; j < d; ++j) dot += C(gr[j]);
        for (std::int64_t j = 0; j < d; ++j) store_grad(o[j], C(gr[j]) - std::exp(C(yr[j])) * dot, mode);
      } else {
        for (std::int64_t j = 0; j < d; ++j) dot += C(gr[j]) * C(yr[j]);
        for (std::int64_t j = 0; j < d; ++j) store_grad(o[j], C(yr[j]) * (C(gr[j]) - dot), mode);
      }
    }
  });
}

struct cross_entropy_options {
  std::int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  enum class reduction { mean, sum } reduce = reduction::mean;
};

// Per-row losses summed (mean: divided by the number of non-ignored rows). Writes the
// row log-sum-exp into lse[rows]; returns the number of rows that counted.
template <class T, index_element I>
std::int64_t cross_entropy_forward(const tensor<T>& logits, const tensor<I>& target, const cross_entropy_options& opt,
                                   compute_t<T>* lse, compute_t<T>& loss) {
  using C = compute_t<T>;
  const std::int64_t d = logits.shape().back(), rows = logits.shape().rows();
  KILN_CHECK(target.numel() == rows, "cross_entropy: ", rows, " rows of logits ", logits.shape().str(), " but ",
             target.numel(), " targets ", target.shape().str());
  const T* xp = logits.data();
  const I* tp = target.data();
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t t = static_cast<std::int64_t>(tp[r]);
    KILN_CHECK(t == opt.ignore_index || (0 <= t && t < d), "cross_entropy: target ", t, " at row ", r,
               " is outside [0, ", d, ") and is not ignore_index (", opt.ignore_index, ")");
  }
  std::vector<C> row_loss(static_cast<std::size_t>(rows), C(0));
  const C eps = C(opt.label_smoothing);
  cpu_runtime::parallel_for(rows, 16, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r) {
      const T* xr = xp + r * d;
      C mx = -std::numeric_limits<C>::infinity();
      for (std::int64_t j = 0; j < d; ++j) mx = std::max(mx, C(xr[j]));
      // Lane sums and the inlined exp let both loops vectorise (libm's expf was a scalar
      // call per logit). exp_c clamps, so a NaN logit would vanish from s: such a row
      // gets a NaN log-sum-exp, hence a NaN loss and NaN gradients, as with libm's exp.
      const C s = cpu_runtime::lane_sum<C>(d, [&](std::int64_t j) { return fn::exp_c(C(xr[j]) - mx); });
      const C sum_x = cpu_runtime::lane_sum<C>(d, [&](std::int64_t j) { return C(xr[j]); });
      const C l = std::isnan(sum_x) ? sum_x : mx + std::log(s);
      lse[r] = l;
      const std::int64_t t = static_cast<std::int64_t>(tp[r]);
      if (t == opt.ignore_index) continue;
      // -(1-eps) log p_t - eps/D Σ_j log p_j
      // (The smoothing term only when smoothing: with a masked -inf logit, sum_x is -inf
      // and 0 · inf would make the loss NaN.)
      row_loss[static_cast<std::size_t>(r)] =
          (C(1) - eps) * (l - C(xr[t])) + (eps != C(0) ? eps * (l - sum_x / C(d)) : C(0));
    }
  });
  std::int64_t count = 0;
  C total = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    if (static_cast<std::int64_t>(tp[r]) != opt.ignore_index) {
      ++count;
      total += row_loss[static_cast<std::size_t>(r)];
    }
  loss = opt.reduce == cross_entropy_options::reduction::mean ? (count ? total / C(count) : C(0)) : total;
  return count;
}

template <class T, index_element I>
void cross_entropy_backward(const tensor<T>& logits, const tensor<I>& target, const cross_entropy_options& opt,
                            const compute_t<T>* lse, std::int64_t count, compute_t<T> gloss, tensor<T>& gx,
                            grad_write mode) {
  using C = compute_t<T>;
  const std::int64_t d = logits.shape().back(), rows = logits.shape().rows();
  const C scale = opt.reduce == cross_entropy_options::reduction::mean ? (count ? gloss / C(count) : C(0)) : gloss;
  const C eps = C(opt.label_smoothing);
  const T* xp = logits.data();
  const I* tp = target.data();
  T* gp = gx.data();
  cpu_runtime::parallel_for(rows, 16, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r) {
      const std::int64_t t = static_cast<std::int64_t>(tp[r]);
      T* o = gp + r * d;
      const T* xr = xp + r * d;
      if (t == opt.ignore_index) {
        for (std::int64_t j = 0; j < d; ++j) store_grad(o[j], C(0), mode);
        continue;
      }
      if (std::isnan(lse[r])) {
        for (std::int64_t j = 0; j < d; ++j) store_grad(o[j], lse[r], mode);
        continue;
      }
      for (std::int64_t j = 0; j < d; ++j) {
        const C p = fn::exp_c(C(xr[j]) - lse[r]);
        const C q = (j == t ? C(1) - eps : C(0)) + eps / C(d);
        store_grad(o[j], scale * (p - q), mode);
      }
    }
  });
}

}  // namespace kiln::ops::cpu
