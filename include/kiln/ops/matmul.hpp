// kiln/ops/matmul.hpp — differentiable matmul, batched matmul and linear.
#pragma once

#include <optional>

#include "kiln/autograd/var.hpp"
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/cuda/blas.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cpu/matmul.hpp"

namespace kiln::ops {

namespace detail {
// The row-major GEMM of ops::cpu::gemm on either device (cuBLASLt on kiln's compute
// stream for cuda), and its batched form (on the device, one strided-batched cuBLASLt call).
template <class T, device Dev>
void gemm_on(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda, const T* b,
             std::int64_t ldb, T* c, std::int64_t ldc, grad_write mode) {
  if constexpr (Dev::is_host)
    cpu::gemm<T>(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, mode);
  else
    cuda_kernels::gemm<T>({ta, tb, m, n, k, lda, ldb, ldc}, a, b, c, mode, cuda_runtime::compute_stream());
}
template <class T, device Dev>
void batched_gemm_on(std::int64_t batch, bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const T* a,
                     std::int64_t stride_a, const T* b, std::int64_t stride_b, T* c, grad_write mode) {
  if constexpr (Dev::is_host) {
    cpu::batched_gemm<T>(batch, ta, tb, m, n, k, a, stride_a, b, stride_b, c, mode);
  } else {
    if (batch == 0) return;
    cuda_kernels::gemm_shape s{ta, tb, m, n, k, ta ? m : k, tb ? k : n, n};
    s.batch = batch;
    s.stride_a = stride_a;
    s.stride_b = stride_b;
    s.stride_c = m * n;
    cuda_kernels::gemm<T>(s, a, b, c, mode, cuda_runtime::compute_stream());
  }
}
// linear's forward (y = x·wᵀ + bias) and its gradients (null outputs skipped) on either
// device; ops::linear and ops::lora_linear both run their base layer through these.
template <class T, device Dev>
void linear_forward_on(const tensor<T, Dev>& x, const tensor<T, Dev>& w, const tensor<T, Dev>* bias,
                       tensor<T, Dev>& y) {
  if constexpr (Dev::is_host)
    cpu::linear_forward(x, w, bias, y);
  else
    gpu::linear_forward(x, w, bias, y);
}
template <class T, device Dev>
void linear_backward_on(const tensor<T, Dev>& x, const tensor<T, Dev>& w, const tensor<T, Dev>& gy, tensor<T, Dev>* gx,
                        grad_write mx, tensor<T, Dev>* gw, grad_write mw, tensor<T, Dev>* gb, grad_write mb) {
  if constexpr (Dev::is_host)
    cpu::linear_backward(x, w, gy, gx, mx, gw, mw, gb, mb);
  else
    gpu::linear_backward(x, w, gy, gx, mx, gw, mw, gb, mb);
}
}  // namespace detail

// [M, K] · [K, N] → [M, N]
template <floating_element T, device Dev>
var<T, Dev> matmul(const var<T, Dev>& a, const var<T, Dev>& b) {
  KILN_CHECK(a.rank() == 2 && b.rank() == 2, "matmul: expects 2-D operands, got ", a.shape().str(), " and ",
             b.shape().str(), " (use bmm for batches)");
  KILN_CHECK(a.size(1) == b.size(0), "matmul: inner dimensions differ, ", a.shape().str(), " · ", b.shape().str());
  auto av = a.value().contiguous(), bv = b.value().contiguous();
  const std::int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  tensor<T, Dev> y(shape{m, n});
  detail::gemm_on<T, Dev>(false, false, m, n, k, av.data(), k, bv.data(), n, y.data(), n, grad_write::overwrite);
  return autograd::record(
      std::move(y),
      [a, b, av, bv, m, n, k](const tensor<T, Dev>& gy) mutable {
        if (a.requires_grad()) {  // dA = dY · Bᵀ
          const grad_write md = a.begin_grad_write();
          detail::gemm_on<T, Dev>(false, true, m, k, n, gy.data(), n, bv.data(), n, a.grad().data(), k, md);
        }
        if (b.requires_grad()) {  // dB = Aᵀ · dY
          const grad_write md = b.begin_grad_write();
          detail::gemm_on<T, Dev>(true, false, k, n, m, av.data(), k, gy.data(), n, b.grad().data(), n, md);
        }
      },
      a, b);
}

// [B, M, K] · [B, K, N] → [B, M, N]; b may also be [K, N], shared by every batch.
template <floating_element T, device Dev>
var<T, Dev> bmm(const var<T, Dev>& a, const var<T, Dev>& b) {
  KILN_CHECK(a.rank() == 3 && (b.rank() == 3 || b.rank() == 2), "bmm: expects [B, M, K] and [B, K, N] or [K, N], got ",
             a.shape().str(), " and ", b.shape().str());
  const bool shared = b.rank() == 2;
  const std::int64_t bt = a.size(0), m = a.size(1), k = a.size(2), n = b.size(-1);
  KILN_CHECK(b.size(-2) == k && (shared || b.size(0) == bt), "bmm: shapes ", a.shape().str(), " and ", b.shape().str(),
             " do not multiply");
  auto av = a.value().contiguous(), bv = b.value().contiguous();
  tensor<T, Dev> y(shape{bt, m, n});
  detail::batched_gemm_on<T, Dev>(bt, false, false, m, n, k, av.data(), m * k, bv.data(), shared ? 0 : k * n, y.data(),
                                  grad_write::overwrite);
  return autograd::record(
      std::move(y),
      [a, b, av, bv, bt, m, n, k, shared](const tensor<T, Dev>& gy) mutable {
        if (a.requires_grad()) {  // dA[i] = dY[i] · B[i]ᵀ
          const grad_write md = a.begin_grad_write();
          detail::batched_gemm_on<T, Dev>(bt, false, true, m, k, n, gy.data(), m * n, bv.data(), shared ? 0 : k * n,
                                          a.grad().data(), md);
        }
        if (b.requires_grad()) {
          const grad_write md = b.begin_grad_write();
          if (shared)  // dB = Σ_i A[i]ᵀ dY[i] = A_flatᵀ · dY_flat, one GEMM over B·M rows
            detail::gemm_on<T, Dev>(true, false, k, n, bt * m, av.data(), k, gy.data(), n, b.grad().data(), n, md);
          else
            detail::batched_gemm_on<T, Dev>(bt, true, false, k, n, m, av.data(), m * k, gy.data(), m * n,
                                            b.grad().data(), md);
        }
      },
      a, b);
}

// y = x · wᵀ + bias, x [..., in], w [out, in] (PyTorch / Hugging Face layout), one node.
template <floating_element T, device Dev>
var<T, Dev> linear(const var<T, Dev>& x, const var<T, Dev>& w, const std::optional<var<T, Dev>>& bias = std::nullopt) {
  KILN_CHECK(w.rank() == 2 && x.rank() >= 1 && x.shape().back() == w.size(1), "linear: input ", x.shape().str(),
             " does not match weight ", w.shape().str(), " (expected input [..., ", w.rank() == 2 ? w.size(1) : -1,
             "])");
  KILN_CHECK(!bias || (bias->rank() == 1 && bias->size(0) == w.size(0)), "linear: bias ",
             bias ? bias->shape().str() : "", " does not match weight ", w.shape().str());
  auto xv = x.value().contiguous();
  const auto& wv = w.value();
  KILN_CHECK(wv.is_contiguous(), "linear: weight must be contiguous");
  shape ys = xv.shape();
  ys[ys.rank() - 1] = w.size(0);
  tensor<T, Dev> y(ys);
  detail::linear_forward_on(xv, wv, bias ? &bias->value() : nullptr, y);
  auto backward = [x, w, bias, xv](const tensor<T, Dev>& gy) mutable {
    const bool bx = x.requires_grad(), bw = w.requires_grad(), bb = bias && bias->requires_grad();
    const grad_write mx = bx ? x.begin_grad_write() : grad_write::overwrite;
    const grad_write mw = bw ? w.begin_grad_write() : grad_write::overwrite;
    const grad_write mb = bb ? bias->begin_grad_write() : grad_write::overwrite;
    detail::linear_backward_on(xv, w.value(), gy, bx ? &x.grad() : nullptr, mx, bw ? &w.grad() : nullptr, mw,
                               bb ? &bias->grad() : nullptr, mb);
  };
  if (bias) return autograd::record(std::move(y), std::move(backward), x, w, *bias);
  return autograd::record(std::move(y), std::move(backward), x, w);
}

}  // namespace kiln::ops
