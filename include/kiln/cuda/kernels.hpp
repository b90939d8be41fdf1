// kiln/cuda/kernels.hpp — the CUDA kernels' host entry points (kernels/*.cu).
//
// Spec: each function launches one op on `stream` (a cudaStream_t; nullptr is the
// legacy default stream) over device pointers, and returns without synchronising;
// a launch error throws kiln::error naming the kernel. Element types T are f32, bf16
// and f16 (kiln's types; bit-compatible with float, __nv_bfloat16 and __half); the
// arithmetic is f32, through the scalar functors the CPU backend uses
// (kiln/ops/kernel/functors.hpp), so the two backends compute the same formula. Statistics,
// optimizer moments of f32 masters and gradients of norm weights are f32.
// Every reduction runs in a fixed order (no atomics), so results are deterministic run
// to run — the bit-exact resume the CPU backend has — except embedding_backward, which
// accumulates with f32 atomics (documented there).
// This header needs no CUDA headers: C++ translation units can declare and call the
// kernels; the definitions are explicit instantiations in libkiln_kernels.a (built with
// -Dcuda=enabled or when nvcc is found, for every architecture in -Dgpu_archs).
#pragma once

#include <cstdint>

#include "kiln/core/dtype.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/ops/kernel/functors.hpp"

namespace kiln::cuda_kernels {

using stream_t = void*;

// ---- fused multi-tensor AdamW -------------------------------------------------------
// One launch steps every chunk: p, m, v read once and written once (torch.optim.AdamW
// semantics, fn::basic_adamw_update), and, when `copy` is set, the updated parameter
// rounded to Copy (the bf16/f16 compute copy of an f32 master: mixed precision's
// write-back) in the same pass. `chunks` and `groups` point to device memory (the
// optimizer builds them on the host, optim/adamw.hpp).
struct adamw_chunk {
  void* p;        // P[n]
  const void* g;  // P[n]
  void* m;        // P[n]
  void* v;        // P[n]
  void* copy;     // Copy[n] or nullptr
  std::int64_t n;
  std::int64_t first;       // the chunk's first element among all the optimizer's elements
  std::int64_t copy_first;  // the copy's rounding counter for the chunk's first element
  std::int32_t group;
  std::int32_t pad = 0;
};
struct adamw_group {
  ops::fn::basic_adamw_update<float> update;
  // bf16 parameters with stochastic rounding: this group's step's stream, as the CPU
  // optimizer draws it ({seed ^ golden·(group+1), step << 40}), at counter = the element's
  // index `first + i`; stochastic = 0 rounds to nearest.
  philox_stream sr{};
  // bf16 copies with stochastic rounding (bf16_mixed): the write-back's stream, drawn at
  // counter `copy_first + i` (precision/master_weights.hpp); copy_stochastic = 0 rounds
  // the copy to nearest.
  philox_stream copy_sr{};
  std::int32_t stochastic = 0;
  std::int32_t copy_stochastic = 0;
};
inline constexpr std::int64_t adamw_chunk_elements = 65536;
template <class P, class Copy = void>
void adamw_step(const adamw_chunk* chunks, int num_chunks, const adamw_group* groups, stream_t stream);

// ---- mixed precision: Half gradients into f32 master gradients -----------------------
// One launch over every chunk: master_grad = (accumulate ? master_grad : 0) + f32(g), the
// fold of one micro-batch's bf16/f16 gradients into the masters' f32 accumulation window
// (precision/master_weights.hpp). Chunks of at most adamw_chunk_elements; device memory.
struct fold_chunk {
  const void* g;       // Half[n]
  float* master_grad;  // f32[n]
  std::int64_t n;
  std::int32_t accumulate;
  std::int32_t pad = 0;
};
template <class Half>
void fold_gradients(const fold_chunk* chunks, int num_chunks, stream_t stream);

// ---- layer_norm / rms_norm over the last dimension -----------------------------------
// Forward: h = x (+ residual, when given; h is written to residual_out when that is
// given: the fused residual add of a pre-norm block), y = (h − mean)·rstd·w + b (rms:
// no mean, no b). mean (layer_norm) and rstd are f32 [rows], kept for backward.
template <class T>
void norm_forward(const T* x, const T* residual, T* residual_out, const T* w, const T* b, T* y, float* mean,
                  float* rstd, std::int64_t rows, std::int64_t cols, float eps, bool rms, stream_t stream);
// Backward from the normalised input h (residual_out of the forward, or x): dx (the
// gradient of h, hence of x and of the residual), and f32 dw / db summed over rows in a
// fixed order (scratch: 2·norm_slabs·cols floats). accumulate adds into dx (the
// residual stream's gradient arrives twice in a pre-norm block).
inline constexpr int norm_slabs = 32;
template <class T>
void norm_backward(const T* h, const T* w, const float* mean, const float* rstd, const T* dy, T* dx, bool accumulate,
                   float* dw, float* db, float* scratch, std::int64_t rows, std::int64_t cols, bool rms,
                   stream_t stream);

// ---- softmax cross-entropy without the probability matrix ------------------------------
// Per row of logits [rows, vocab]: loss[r] = logsumexp(row) − row[target] (0 for
// ignore_index rows), by an online max/sum over the vocabulary in one pass; and, when
// dlogits is given, dlogits = (softmax(row) − onehot(target)) · grad_scale (0 for ignored
// rows) in a second pass — dlogits may alias logits (in place). grad_scale is the
// caller's normalisation: 1 / (valid targets of the whole accumulation window).
// label_smoothing ε mixes the one-hot target with the uniform distribution (PyTorch's).
template <class T>
void cross_entropy(const T* logits, const std::int64_t* targets, float* loss, T* dlogits, float grad_scale,
                   std::int64_t rows, std::int64_t vocab, std::int64_t ignore_index, stream_t stream,
                   float label_smoothing = 0.0f);

// ---- attention ----------------------------------------------------------------------------
// Scaled dot-product attention with an online softmax (the CPU op's algorithm, as in
// FlashAttention): q [B, T, Hq, D], k and v [B, S, Hkv, D] contiguous, Hq a multiple of
// Hkv (grouped-query); queries at absolute positions q_offset + i, keys at 0..S−1; Mask
// none, causal, local_n or strided_n of kiln::ops::mask (the last two carry their width:
// pass the value, ops::mask::device_form<local<W>>::make()); D 32, 64 or 128. The forward writes
// O [B, T, Hq, D] and lse [B, Hq, T] (f32, for the backward). Dropout on the
// probabilities draws the CPU's Philox index ((b·Hq + h)·T + i)·S + j.
struct attention_dims {
  std::int64_t batch = 0, q_len = 0, kv_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  std::int64_t q_offset = 0;
  float scale = 1.0f;  // usually 1/sqrt(D)
  float dropout_p = 0.0f;
  philox_stream rng{};
  // bf16/f16 at head dims 64 and 128 run the tensor-core kernels unless this is set: then
  // the CUDA-core reference kernels, as for f32 and D 32 (tests and benchmarks compare).
  bool reference_kernels = false;
  // Which tensor-core kernels: the register-resident ones (kiln/cuda/flash_registers.hpp,
  // the default) or, when set, the staged tiles of kiln/cuda/flash_tiles.hpp.
  bool staged_tiles = false;
};
template <class T, class Mask>
void attention_forward(const T* q, const T* k, const T* v, T* o, float* lse, const attention_dims& d, stream_t stream,
                       Mask mask = Mask{});
// dq, dk, dv are overwritten; delta is scratch of B·Hq·T floats.
template <class T, class Mask>
void attention_backward(const T* q, const T* k, const T* v, const T* o, const T* dout, const float* lse, float* delta,
                        T* dq, T* dk, T* dv, const attention_dims& d, stream_t stream, Mask mask = Mask{});

// ---- elementwise ------------------------------------------------------------------------
// GELU (tanh approximation): y = gelu(x); backward dx = gelu'(x)·dy.
template <class T>
void gelu_forward(const T* x, T* y, std::int64_t n, stream_t stream);
template <class T>
void gelu_backward(const T* x, const T* dy, T* dx, std::int64_t n, stream_t stream);
// SwiGLU (LLaMA's MLP gate): y = silu(gate)·up; backward writes dgate and dup.
template <class T>
void swiglu_forward(const T* gate, const T* up, T* y, std::int64_t n, stream_t stream);
template <class T>
void swiglu_backward(const T* gate, const T* up, const T* dy, T* dgate, T* dup, std::int64_t n, stream_t stream);
// RoPE on x [B, T, H, D] in HF's rotate-half layout; position of t is first + t.
template <class T>
void rope(const T* x, T* y, std::int64_t batch, std::int64_t len, std::int64_t heads, std::int64_t dim,
          std::int64_t first, float theta, bool backward, stream_t stream);
// Inverted dropout with the CPU's mask: keep element i iff uniform(i) >= p, scale 1/(1−p).
// The backward is the same call on the gradient with the same stream.
template <class T>
void dropout(const T* x, T* y, std::int64_t n, float p, philox_stream rng, stream_t stream);
// dW[token[i]] += dy[i] (f32 dW [vocab, cols]). f32 atomics: the order of the additions
// into one row varies with scheduling (a row's sum is exact to f32 rounding, not bitwise
// reproducible when a token repeats in the batch).
template <class T>
void embedding_backward(const std::int64_t* tokens, const T* dy, float* dw, std::int64_t n, std::int64_t cols,
                        stream_t stream);

}  // namespace kiln::cuda_kernels
