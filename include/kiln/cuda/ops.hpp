// kiln/cuda/ops.hpp — the device side of kiln's ops: what an op in kiln/ops/ calls when
// its tensors live on the cuda device (kernels/ops_*.cu: element-wise, reductions, layers).
//
// Spec: each function mirrors the ops::cpu function of the same name (same arguments,
// with tensor<T, cuda>; same overwrite/accumulate rule for gradients) and is enqueued on
// kiln's compute stream without synchronising, except where noted. Element types are
// f32, bf16 and f16, computed in f32 through the same scalar functors
// (kiln/ops/kernel/functors.hpp) and the same binary rule (ops::cpu::apply_binary), so the two
// backends evaluate one formula. Tensors are contiguous (the ops make them so) and
// broadcasting follows the CPU's rules (shapes aligned on the right, size-1 dimensions
// repeated, at most 8 dimensions). Reductions run in a fixed order: results are
// deterministic run to run.
// Like kiln/cuda/kernels.hpp this header needs no CUDA header, so the ops' templates can
// name these functions in every build; a program that runs them defines KILN_WITH_CUDA and
// links libkiln_kernels.a (see kiln/core/cuda_runtime.hpp).
#pragma once

#include <cstdint>

#include "kiln/core/device.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/ops/cpu/elementwise.hpp"
#include "kiln/ops/cpu/reduce.hpp"
#include "kiln/ops/cpu/softmax.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

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

// Softmax cross-entropy over logits [rows, vocab] and i64 targets [rows], with the
// options' label smoothing: writes the loss (mean over the rows whose target is not
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

// dst (=|+=) src element by element: dst is any strided view with src's shape, src is
// contiguous (the backward of transpose, slice, concat and reshape; rank <= 8).
template <class T>
void strided_store(dtensor<T> dst, const dtensor<T>& src, grad_write mode);

// out[o, i] = scale · Σ_k x[o, k, i] over geometry g (sum, mean): for a whole-tensor sum,
// 256 blocks' fixed-order partial sums then one block over them; a block per output
// element when g.inner == 1 (CUB's fixed tree); a thread per output element otherwise
// (k in order). The backward: gx[o, k, i] (=|+=) scale · gy[o, i].
template <class T>
void sum_dim(const dtensor<T>& x, cpu::reduce_geometry g, float scale, dtensor<T>& out);
template <class T>
void sum_dim_backward(const dtensor<T>& gy, cpu::reduce_geometry g, float scale, dtensor<T>& gx, grad_write mode);

// out[o, i] = max_k x[o, k, i] and arg[o, i] the first k attaining it (a thread per output
// element, k in order: the CPU's tie rule); the backward routes gy[o, i] to x[o, arg, i]
// and writes zeros elsewhere, with mode.
template <class T>
void max_dim(const dtensor<T>& x, cpu::reduce_geometry g, dtensor<T>& out, dtensor<std::int64_t>& arg);
template <class T>
void max_dim_backward(const dtensor<T>& gy, cpu::reduce_geometry g, const dtensor<std::int64_t>& arg, dtensor<T>& gx,
                      grad_write mode);

// y[..., :] = weight[ids[...], :]. An id outside [0, V) throws, naming it (the op reads
// back one flag, so it synchronises). The backward adds each position's gradient into its
// row of gw: positions are sorted by id (CUB's stable radix sort), then each row sums its
// positions in their original order — deterministic, no atomics.
template <class T, class I>
void embedding_forward(const dtensor<I>& ids, const dtensor<T>& weight, dtensor<T>& y);
template <class T, class I>
void embedding_backward(const dtensor<I>& ids, const dtensor<T>& gy, dtensor<T>& gw, grad_write mode);

// Attention over contiguous q [B, T, Hq, D], k and v [B, S, Hkv, D] (kernels/attention.cu:
// masks none, causal, local_n and strided_n, head dims 32, 64 and 128): o and f32 lse
// [B·Hq·T]. The backward writes each non-null gradient with its mode.
template <class T, class Mask>
void attention_forward(const dtensor<T>& q, const dtensor<T>& k, const dtensor<T>& v, dtensor<T>& o,
                       dtensor<float>& lse, const cuda_kernels::attention_dims& d, Mask mask);
template <class T, class Mask>
void attention_backward(const dtensor<T>& q, const dtensor<T>& k, const dtensor<T>& v, const dtensor<T>& o,
                        const dtensor<T>& dout, const dtensor<float>& lse, const cuda_kernels::attention_dims& d,
                        dtensor<T>* dq, grad_write mq, dtensor<T>* dk, grad_write mk, dtensor<T>* dv, grad_write mv,
                        Mask mask);

// RoPE on a contiguous x [B, T, H, D] (positions first + t): y, or with backward the
// gradient of x from y's, written with mode.
template <class T>
void rope(const dtensor<T>& x, dtensor<T>& y, std::int64_t first, float theta, bool backward, grad_write mode);

// SwiGLU: y = silu(gate)·up; the backward writes each non-null gradient with its mode.
template <class T>
void swiglu_forward(const dtensor<T>& gate, const dtensor<T>& up, dtensor<T>& y);
template <class T>
void swiglu_backward(const dtensor<T>& gate, const dtensor<T>& up, const dtensor<T>& gy, dtensor<T>* ggate,
                     grad_write mg, dtensor<T>* gup, grad_write mu);

// Gradient clipping: acc[0] += Σ x² in f64 (fixed-order partial sums per block, then one
// block over them: deterministic), and x clamped to [lo, hi] in place.
template <class T>
void add_sum_squares(const dtensor<T>& x, dtensor<double>& acc);
template <class T>
void clamp(dtensor<T>& x, float lo, float hi);

// Softmax (log = false) or log-softmax over the last dimension of a contiguous x, a block
// per row (CUB's fixed trees for the max and the sum); the backward from the forward's
// output y, written with mode.
template <class T>
void softmax_forward(const dtensor<T>& x, dtensor<T>& y, bool log);
template <class T>
void softmax_backward(const dtensor<T>& y, const dtensor<T>& gy, dtensor<T>& gx, bool log, grad_write mode);

// Inverted dropout with the CPU's mask (element i kept iff rng.uniform(i) >= p), y written
// with mode (the backward is the same call on the gradient).
template <class T>
void dropout_apply(const dtensor<T>& x, float p, philox_stream rng, dtensor<T>& y, grad_write mode);

}  // namespace kiln::ops::gpu
