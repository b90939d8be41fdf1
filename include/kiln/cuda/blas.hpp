// kiln/cuda/blas.hpp — matrix products on the GPU through cuBLASLt (kernels/blas.cu).
//
// Spec: gemm<T> computes C = op(A)·op(B) (or C += op(A)·op(B)) on row-major device
// buffers with leading dimensions, the contract of the CPU backend's
// ops::cpu::gemm (kiln/ops/cpu/matmul.hpp), so the ops can pick either by device. T is
// f32, bf16 or f16; products accumulate in f32 and C is rounded once. For f32 operands
// `math` chooses exact f32 FMA (gemm_math::f32, what the CPU computes) or TF32 tensor
// cores (gemm_math::tf32: 10-bit mantissa products, f32 sums; what PyTorch calls
// allow_tf32). An epilogue fuses what a linear layer does after its product into the
// same kernel: + bias[N] (one value per output column), then optionally GELU (tanh
// form, fn::gelu_tanh); `pre_activation`, when given, receives op(A)·op(B) + bias
// before the GELU, which the backward needs.
// Launches on `stream` and returns without synchronising; a cuBLASLt error throws
// kiln::error naming the call, the shape and the status. Each host thread uses its own
// cuBLASLt handle and a 32 MiB workspace per device, created on first use.
// Napkin math: 2·M·N·K FLOPs; on an H100/H200 SXM, ~60 TFLOP/s f32 (FMA), ~400 TF32 and
// ~800-990 bf16/f16 dense, so only shapes above ~1024³ reach the tensor-core bound.
// This header needs no CUDA headers; the definitions are in libkiln_kernels.a (link
// -lcublasLt -lcudart).
#pragma once

#include <cstdint>

#include "kiln/core/dtype.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

namespace kiln::cuda_kernels {

using stream_t = void*;

enum class gemm_math { f32, tf32 };
enum class gemm_epilogue { none, bias, bias_gelu_tanh };

struct gemm_shape {
  bool trans_a = false, trans_b = false;
  std::int64_t m = 0, n = 0, k = 0;
  std::int64_t lda = 0, ldb = 0, ldc = 0;
  // Strided batch: `batch` products in one call, operand i at a + i·stride_a (0: one
  // operand shared by every product), b + i·stride_b, c + i·stride_c.
  std::int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
};

template <class T>
void gemm(const gemm_shape& s, const T* a, const T* b, T* c, grad_write mode, stream_t stream,
          gemm_math math = gemm_math::f32, gemm_epilogue epilogue = gemm_epilogue::none, const T* bias = nullptr,
          T* pre_activation = nullptr);

extern template void gemm<f32>(const gemm_shape&, const f32*, const f32*, f32*, grad_write, stream_t, gemm_math,
                               gemm_epilogue, const f32*, f32*);
extern template void gemm<bf16>(const gemm_shape&, const bf16*, const bf16*, bf16*, grad_write, stream_t, gemm_math,
                                gemm_epilogue, const bf16*, bf16*);
extern template void gemm<f16>(const gemm_shape&, const f16*, const f16*, f16*, grad_write, stream_t, gemm_math,
                               gemm_epilogue, const f16*, f16*);

}  // namespace kiln::cuda_kernels
