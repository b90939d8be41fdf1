// kiln/cuda/ops.hpp — the device side of kiln's ops: what an op in kiln/ops/ calls when
// its tensors live on the cuda device (kernels/ops.cu).
//
// Spec: each function mirrors the ops::cpu function of the same name (same arguments,
// with tensor<T, cuda>; same overwrite/accumulate rule for gradients) and is enqueued on
// kiln's compute stream without synchronising, except where noted. Element types are
// f32, bf16 and f16, computed in f32 through the same scalar functors
// (kiln/ops/functors.hpp) and the same binary rule (ops::cpu::apply_binary), so the two
// backends evaluate one formula. Tensors are contiguous (the ops make them so) and
// broadcasting follows the CPU's rules (shapes aligned on the right, size-1 dimensions
// repeated, at most 8 dimensions). Reductions run in a fixed order: results are
// deterministic run to run.
// Like kiln/cuda/kernels.hpp this header needs no CUDA header, so the ops' templates can
// name these functions in every build; a program that runs them defines KILN_WITH_CUDA and
// links libkiln_kernels.a (see kiln/cuda/runtime.hpp).
#pragma once

#include <cstdint>

#include "kiln/core/device.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/ops/cpu/elementwise.hpp"
#include "kiln/ops/cpu/softmax.hpp"
#include "kiln/ops/grad_write.hpp"

// In an op that has no device path yet: a compile error naming the op, instead of host
// loops over device memory.
#define KILN_HOST_ONLY_OP(Dev, op)                                                 \
  static_assert(Dev::is_host, op                                                   \
                " is not ported to cuda tensors yet (kiln/cuda/ops.hpp lists the " \
                "ops that are); compute it on the cpu")

namespace kiln::ops::gpu {

template <class T>
using dtensor = tensor<T, cuda>;

// y = f(x), and gx (=|+=) f.grad(x, gy), for f one of fn::relu, gelu_exact, gelu_tanh, silu.
template <class F, class T>
void unary_forward(F f, const dtensor<T>& x, dtensor<T>& y);
template <class F, class T>
void unary_backward(F f, const dtensor<T>& x, const dtensor<T>& gy, dtensor<T>& gx, grad_write mode);

// out = a Op b with broadcasting; the gradient of operand `which` (0: a, 1: b), summed
// over the dimensions that operand was broadcast along.
template <cpu::binary_op Op, class T>
void binary_forward(const dtensor<T>& a, const dtensor<T>& b, dtensor<T>& out);
template <cpu::binary_op Op, class T>
void binary_backward(const dtensor<T>& a, const dtensor<T>& b, const dtensor<T>& gy, int which, dtensor<T>& g,
                     grad_write mode);

// y (=|+=) x · s.
template <class T>
void scale(const dtensor<T>& x, float s, dtensor<T>& y, grad_write mode);

// y = x·wᵀ (+ bias) over x [rows, in], w [out, in] (cuBLASLt, the bias in its epilogue);
// backward: gx = gy·w, gw = gyᵀ·x, gb = Σ_rows gy (each when non-null, with its mode).
template <class T>
void linear_forward(const dtensor<T>& x, const dtensor<T>& w, const dtensor<T>* bias, dtensor<T>& y);
template <class T>
void linear_backward(const dtensor<T>& x, const dtensor<T>& w, const dtensor<T>& gy, dtensor<T>* gx, grad_write mx,
                     dtensor<T>* gw, grad_write mw, dtensor<T>* gb, grad_write mb);

// Softmax cross-entropy over logits [rows, vocab] and i64 targets [rows] (no label
// smoothing on the device yet): writes the loss (mean over the rows whose target is not
// ignore_index, or their sum) into loss[] and returns the number of those rows. It
// synchronises the stream to read that count back (the backward's scale needs it).
template <class T>
std::int64_t cross_entropy_forward(const dtensor<T>& logits, const dtensor<std::int64_t>& target,
                                   const cpu::cross_entropy_options& opt, dtensor<T>& loss);
// The gradient of the loss for an upstream gradient gloss [] (on the device; read back,
// so this synchronises too), written into gx with its mode.
template <class T>
void cross_entropy_backward(const dtensor<T>& logits, const dtensor<std::int64_t>& target,
                            const cpu::cross_entropy_options& opt, std::int64_t count, const dtensor<T>& gloss,
                            dtensor<T>& gx, grad_write mode);

// layer_norm (rms = false) / rms_norm over the last dimension of x [rows, cols], w and b
// optional (null): y, and f32 stats [2·rows] (mean, then rstd) for the backward, which
// writes each non-null gradient with its mode (weight and bias gradients are summed in
// f32 in a fixed order, then stored as T).
template <class T>
void norm_forward(const dtensor<T>& x, const T* w, const T* b, double eps, bool rms, dtensor<T>& y,
                  dtensor<float>& stats);
template <class T>
void norm_backward(const dtensor<T>& x, const T* w, const dtensor<T>& gy, const dtensor<float>& stats, bool rms, T* gx,
                   grad_write mx, T* gw, grad_write mw, T* gb, grad_write mb);

}  // namespace kiln::ops::gpu
