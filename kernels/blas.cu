// kernels/blas.cu — row-major GEMM with bias/GELU epilogues on cuBLASLt (spec in
// kiln/cuda/blas.hpp).
//
// cuBLASLt is column-major. A row-major X[r × c] with leading dimension ld is, read
// column-major, Xᵀ[c × r] with the same ld, so the row-major C = op(A)·op(B) is computed
// as the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the B buffer goes in cuBLASLt's A slot and the
// A buffer in its B slot, each with its own transpose flag kept (a stored [K × N] B is
// already op(B)ᵀ column-major). The bias epilogue adds one value per row of the
// column-major result, which is one per column N of ours: a linear layer's bias.
#include <cublasLt.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common.cuh"
#include "kiln/cuda/blas.hpp"

namespace kiln::cuda_kernels {
namespace {

void lt_ok(cublasStatus_t st, const char* what, const gemm_shape& s) {
  KILN_CHECK(st == CUBLAS_STATUS_SUCCESS, "cuda gemm: ", what, " failed (cublasStatus ", static_cast<int>(st),
             ") for M=", s.m, " N=", s.n, " K=", s.k, " lda=", s.lda, " ldb=", s.ldb, " ldc=", s.ldc,
             s.trans_a ? " A transposed" : "", s.trans_b ? " B transposed" : "");
}

// One cuBLASLt handle and workspace per host thread and device.
struct lt_context {
  static constexpr std::size_t workspace_bytes = std::size_t{32} << 20;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  int device = -1;
  lt_context(int dev) : device(dev) {
    KILN_CHECK(cublasLtCreate(&handle) == CUBLAS_STATUS_SUCCESS, "cuda gemm: cublasLtCreate failed on device ", dev);
    detail::check(cudaMalloc(&workspace, workspace_bytes), "cuda gemm: workspace allocation");
  }
  ~lt_context() {
    cudaFree(workspace);
    cublasLtDestroy(handle);
  }
  lt_context(const lt_context&) = delete;
  lt_context& operator=(const lt_context&) = delete;
};

lt_context& context() {
  thread_local std::vector<std::unique_ptr<lt_context>> per_device;
  int dev = 0;
  detail::check(cudaGetDevice(&dev), "cuda gemm: cudaGetDevice");
  for (auto& c : per_device)
    if (c->device == dev) return *c;
  per_device.push_back(std::make_unique<lt_context>(dev));
  return *per_device.back();
}

template <class T>
constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, f32>) return CUDA_R_32F;
  if constexpr (std::is_same_v<T, bf16>) return CUDA_R_16BF;
  if constexpr (std::is_same_v<T, f16>) return CUDA_R_16F;
}

// RAII for the descriptors of one call.
struct lt_desc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~lt_desc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

template <class T>
void gemm(const gemm_shape& s, const T* a, const T* b, T* c, grad_write mode, stream_t stream, gemm_math math,
          gemm_epilogue epilogue, const T* bias, T* pre_activation) {
  KILN_CHECK(s.m >= 0 && s.n >= 0 && s.k >= 0, "cuda gemm: negative size M=", s.m, " N=", s.n, " K=", s.k);
  KILN_CHECK(epilogue == gemm_epilogue::none || bias != nullptr, "cuda gemm: the bias epilogue needs a bias pointer");
  KILN_CHECK(pre_activation == nullptr || epilogue == gemm_epilogue::bias_gelu_tanh,
             "cuda gemm: pre_activation is only written by the bias_gelu_tanh epilogue");
  KILN_CHECK(s.batch >= 1 && s.batch <= 2147483647, "cuda gemm: batch ", s.batch, " is outside [1, 2^31 - 1]");
  KILN_CHECK(s.batch == 1 || epilogue == gemm_epilogue::none, "cuda gemm: a batched product takes no epilogue");
  if (s.m == 0 || s.n == 0) return;
  if (s.k == 0) {  // an empty sum: C = 0 when overwriting, unchanged when accumulating
    KILN_CHECK(epilogue == gemm_epilogue::none, "cuda gemm: K = 0 with a bias epilogue (M=", s.m, " N=", s.n, ")");
    if (mode == grad_write::overwrite)
      for (std::int64_t i = 0; i < s.batch; ++i)
        detail::check(cudaMemset2DAsync(c + i * s.stride_c, static_cast<std::size_t>(s.ldc) * sizeof(T), 0,
                                        static_cast<std::size_t>(s.n) * sizeof(T), static_cast<std::size_t>(s.m),
                                        static_cast<cudaStream_t>(stream)),
                      "cudaMemset2DAsync (gemm with K = 0)");
    return;
  }
  // Column-major view (see the file comment): D[N × M] = opA(Bbuf)[N × K] · opB(Abuf)[K × M].
  const cublasOperation_t op_a = s.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const std::uint64_t a_rows = s.trans_b ? s.k : s.n, a_cols = s.trans_b ? s.n : s.k;
  const std::uint64_t b_rows = s.trans_a ? s.m : s.k, b_cols = s.trans_a ? s.k : s.m;
  const cudaDataType_t dt = data_type<T>();
  const cublasComputeType_t compute =
      std::is_same_v<T, f32> && math == gemm_math::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;

  lt_desc d;
  lt_ok(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F), "cublasLtMatmulDescCreate", s);
  lt_ok(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)), "TRANSA", s);
  lt_ok(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)), "TRANSB", s);
  if (epilogue != gemm_epilogue::none) {
    cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    if (epilogue == gemm_epilogue::bias_gelu_tanh)
      ep = pre_activation ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS;
    lt_ok(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)), "EPILOGUE", s);
    const void* bp = bias;
    lt_ok(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)), "BIAS_POINTER", s);
    if (pre_activation) {
      void* aux = pre_activation;
      const std::int64_t aux_ld = s.ldc;
      lt_ok(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)),
            "EPILOGUE_AUX_POINTER", s);
      lt_ok(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)),
            "EPILOGUE_AUX_LD", s);
    }
  }
  lt_ok(cublasLtMatrixLayoutCreate(&d.a, dt, a_rows, a_cols, s.ldb), "layout of B", s);
  lt_ok(cublasLtMatrixLayoutCreate(&d.b, dt, b_rows, b_cols, s.lda), "layout of A", s);
  lt_ok(cublasLtMatrixLayoutCreate(&d.c, dt, s.n, s.m, s.ldc), "layout of C", s);
  if (s.batch > 1) {  // one strided-batched call (cuBLASLt's A is our b, its B our a)
    const std::int32_t count = static_cast<std::int32_t>(s.batch);
    const std::pair<cublasLtMatrixLayout_t, std::int64_t> layouts[] = {
        {d.a, s.stride_b}, {d.b, s.stride_a}, {d.c, s.stride_c}};
    for (const auto& [layout, stride] : layouts) {
      lt_ok(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
            "BATCH_COUNT", s);
      lt_ok(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                             sizeof(stride)),
            "STRIDED_BATCH_OFFSET", s);
    }
  }

  lt_context& ctx = context();
  lt_ok(cublasLtMatmulPreferenceCreate(&d.pref), "cublasLtMatmulPreferenceCreate", s);
  const std::size_t ws = lt_context::workspace_bytes;
  lt_ok(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
        "MAX_WORKSPACE_BYTES", s);
  // The heuristic otherwise assumes 256-byte-aligned operands: tell it what these
  // pointers really have (a row-slice view of a tensor may start anywhere on an element).
  auto alignment = [](const void* p) {
    const auto v = reinterpret_cast<std::uintptr_t>(p);
    std::uint32_t al = 256;
    while (al > 1 && v % al) al /= 2;
    return al;
  };
  const std::uint32_t al_a = alignment(b), al_b = alignment(a), al_c = alignment(c);  // cuBLASLt's A is our b
  lt_ok(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)),
        "MIN_ALIGNMENT_A_BYTES", s);
  lt_ok(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)),
        "MIN_ALIGNMENT_B_BYTES", s);
  lt_ok(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)),
        "MIN_ALIGNMENT_C_BYTES", s);
  lt_ok(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)),
        "MIN_ALIGNMENT_D_BYTES", s);
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  lt_ok(cublasLtMatmulAlgoGetHeuristic(ctx.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heuristic, &found),
        "cublasLtMatmulAlgoGetHeuristic", s);
  KILN_CHECK(found > 0, "cuda gemm: cuBLASLt has no algorithm for M=", s.m, " N=", s.n, " K=", s.k,
             " (leading dimensions and pointers must suit its alignment rules: 16 bytes for tensor cores)");
  const float alpha = 1.0f, beta = mode == grad_write::accumulate ? 1.0f : 0.0f;
  lt_ok(cublasLtMatmul(ctx.handle, d.op, &alpha, b, d.a, a, d.b, &beta, c, d.c, c, d.c, &heuristic.algo, ctx.workspace,
                       ws, static_cast<cudaStream_t>(stream)),
        "cublasLtMatmul", s);
}

template void gemm<f32>(const gemm_shape&, const f32*, const f32*, f32*, grad_write, stream_t, gemm_math, gemm_epilogue,
                        const f32*, f32*);
template void gemm<bf16>(const gemm_shape&, const bf16*, const bf16*, bf16*, grad_write, stream_t, gemm_math,
                         gemm_epilogue, const bf16*, bf16*);
template void gemm<f16>(const gemm_shape&, const f16*, const f16*, f16*, grad_write, stream_t, gemm_math, gemm_epilogue,
                        const f16*, f16*);

}  // namespace kiln::cuda_kernels
