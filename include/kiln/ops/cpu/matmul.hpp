// kiln/ops/cpu/matmul.hpp — GEMM on the CPU through oneDNN or Eigen.
//
// gemm() computes C = op(A) · op(B) (or C += …) on row-major buffers with leading
// dimensions, the BLAS contract. f32 runs on oneDNN's JIT sgemm when kiln was built with
// it (KILN_HAVE_DNNL: meson finds libdnnl-dev), otherwise on Eigen's blocked, vectorised,
// OpenMP-threaded product. Napkin math: 2·M·N·K FLOPs; on the transformer shapes of
// bench/gpt_train.cpp (M = 2048, N and K = 128…512) oneDNN runs at ~200 GFLOP/s per
// core and ~390 on 2 (it scales across the OpenMP team almost perfectly), Eigen at
// ~150-175 and ~235-310 (bench/gemm.cpp prints both). oneDNN also writes C in the
// product (beta = 0), where Eigen's `C = A·B` zero-fills C in a pass of its own.
//
// linear_backward runs its two independent GEMMs (dX = dY·W, dW = dYᵀ·X) side by side
// on two threads, each single-threaded, which scales better than splitting one small
// GEMM across the team (measured 62k → 70k samples/s for batch-128 MLPs).
#pragma once

#include <Eigen/Core>
#include <cstdlib>
#include <map>
#include <string_view>
#include <type_traits>
#include <vector>
#if defined(KILN_HAVE_DNNL)
#include <dnnl.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

namespace kiln::ops::cpu {

template <class T>
using row_major = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using cmap = Eigen::Map<const row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using mmap = Eigen::Map<row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

namespace detail {
// Copies a rows×cols block (leading dimension ld) of half values into packed floats.
template <class T>
void widen(const T* src, std::int64_t rows, std::int64_t cols, std::int64_t ld, std::vector<float>& dst) {
  dst.resize(static_cast<std::size_t>(rows * cols));
  float* d = dst.data();
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    float* o = d + r * cols;
    for (std::int64_t j = 0; j < cols; ++j) o[j] = static_cast<float>(s[j]);
  }
}
}  // namespace detail

template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda,
          const T* b, std::int64_t ldb, T* c, std::int64_t ldc, grad_write mode);
template <class T>
void gemm_half_widened(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, const T* a,
                       std::int64_t lda, const T* b, std::int64_t ldb, T* c, std::int64_t ldc, grad_write mode);

#if defined(KILN_HAVE_DNNL)
namespace detail {
// bf16 GEMMs on oneDNN's matmul primitive, where the CPU multiplies bf16 itself
// (AVX512-BF16, or AMX tiles on Sapphire Rapids and later): bf16 products are exact in
// f32 and summed in f32, then C is rounded to bf16 once — gemm_half's contract, without
// its widening passes: 2.3-7.3x the f32 GEMM on 2 AMX cores (bench/RESULTS.md). A
// primitive is built per shape (m, n, k, leading dimensions, transposes, = or +=) and
// kept per thread: creating one costs 0.5-10 ms, executing one a few µs of overhead.
// KILN_CPU_BF16_GEMM=widen keeps the widening path (A/B benchmarks).
inline bool native_bf16_gemm() {
  static const bool yes = [] {
    const char* env = std::getenv("KILN_CPU_BF16_GEMM");
    if (env && std::string_view(env) == "widen") return false;
    const auto isa = static_cast<unsigned>(dnnl_get_effective_cpu_isa());
    return (isa & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16;
  }();
  return yes;
}
inline void dnnl_ok(dnnl_status_t st, const char* call) {
  KILN_CHECK(st == dnnl_success, "gemm (bf16, oneDNN matmul): ", call, " failed with status ", static_cast<int>(st));
}
class bf16_matmuls {
 public:
  // C = op(A)·op(B) (or +=) if a native primitive exists for the shape; false otherwise.
  bool run(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const void* a, std::int64_t lda,
           const void* b, std::int64_t ldb, void* c, std::int64_t ldc, bool accumulate) {
    // oneDNN partitions a primitive for the threads it may use when it is created: one
    // made inside an OpenMP region (linear_backward's sections) is kept apart.
    const shape_key key{m, n, k, lda, ldb, ldc, ta, tb, accumulate, in_parallel()};
    auto it = cache_.find(key);
    if (it == cache_.end()) {
      if (cache_.size() >= 512) cache_.clear();  // shapes churn (a sweep): start over
      it = cache_.emplace(key, build(key)).first;
    }
    entry& e = it->second;
    if (!e.prim) return false;
    dnnl_ok(dnnl_memory_set_data_handle(e.a, const_cast<void*>(a)), "dnnl_memory_set_data_handle");
    dnnl_ok(dnnl_memory_set_data_handle(e.b, const_cast<void*>(b)), "dnnl_memory_set_data_handle");
    dnnl_ok(dnnl_memory_set_data_handle(e.c, c), "dnnl_memory_set_data_handle");
    const dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, e.a}, {DNNL_ARG_WEIGHTS, e.b}, {DNNL_ARG_DST, e.c}};
    dnnl_ok(dnnl_primitive_execute(e.prim, stream_, 3, args), "dnnl_primitive_execute");
    dnnl_ok(dnnl_stream_wait(stream_), "dnnl_stream_wait");
    return true;
  }
  static bf16_matmuls& for_this_thread() {
    thread_local bf16_matmuls m;
    return m;
  }
  bf16_matmuls(const bf16_matmuls&) = delete;
  bf16_matmuls& operator=(const bf16_matmuls&) = delete;
  ~bf16_matmuls() {
    cache_.clear();
    if (stream_) dnnl_stream_destroy(stream_);
  }

 private:
  struct shape_key {
    std::int64_t m, n, k, lda, ldb, ldc;
    bool ta, tb, acc, nested;
    auto operator<=>(const shape_key&) const = default;
  };
  static bool in_parallel() {
#if defined(_OPENMP)
    return omp_in_parallel() != 0;
#else
    return false;
#endif
  }
  struct entry {
    dnnl_primitive_t prim = nullptr;
    dnnl_memory_t a = nullptr, b = nullptr, c = nullptr;
    entry() = default;
    entry(entry&& o) noexcept : prim(o.prim), a(o.a), b(o.b), c(o.c) { o.prim = nullptr, o.a = o.b = o.c = nullptr; }
    entry& operator=(entry&&) = delete;
    ~entry() {
      if (prim) dnnl_primitive_destroy(prim);
      for (dnnl_memory_t x : {a, b, c})
        if (x) dnnl_memory_destroy(x);
    }
  };
  bf16_matmuls() { dnnl_ok(dnnl_stream_create(&stream_, engine(), dnnl_stream_default_flags), "dnnl_stream_create"); }
  static dnnl_engine_t engine() {
    static const dnnl_engine_t e = [] {
      dnnl_engine_t x = nullptr;
      dnnl_ok(dnnl_engine_create(&x, dnnl_cpu, 0), "dnnl_engine_create");
      return x;
    }();
    return e;
  }
  // A primitive for the shape, or none when oneDNN has only its reference code for it.
  static entry build(const shape_key& s) {
    dnnl_memory_desc_t a_md, b_md, c_md;
    const dnnl_dims_t a_dims = {s.m, s.k}, b_dims = {s.k, s.n}, c_dims = {s.m, s.n};
    const dnnl_dims_t a_str = {s.ta ? 1 : s.lda, s.ta ? s.lda : 1}, b_str = {s.tb ? 1 : s.ldb, s.tb ? s.ldb : 1},
                      c_str = {s.ldc, 1};
    dnnl_ok(dnnl_memory_desc_init_by_strides(&a_md, 2, a_dims, dnnl_bf16, a_str), "dnnl_memory_desc_init_by_strides");
    dnnl_ok(dnnl_memory_desc_init_by_strides(&b_md, 2, b_dims, dnnl_bf16, b_str), "dnnl_memory_desc_init_by_strides");
    dnnl_ok(dnnl_memory_desc_init_by_strides(&c_md, 2, c_dims, dnnl_bf16, c_str), "dnnl_memory_desc_init_by_strides");
    dnnl_matmul_desc_t desc;
    dnnl_ok(dnnl_matmul_desc_init(&desc, &a_md, &b_md, nullptr, &c_md), "dnnl_matmul_desc_init");
    dnnl_primitive_attr_t attr = nullptr;
    dnnl_ok(dnnl_primitive_attr_create(&attr), "dnnl_primitive_attr_create");
    dnnl_post_ops_t ops = nullptr;
    if (s.acc) {  // C = round(A·B + C): the sum post-op reads the old C
      dnnl_ok(dnnl_post_ops_create(&ops), "dnnl_post_ops_create");
      dnnl_ok(dnnl_post_ops_append_sum(ops, 1.0f), "dnnl_post_ops_append_sum");
      dnnl_ok(dnnl_primitive_attr_set_post_ops(attr, ops), "dnnl_primitive_attr_set_post_ops");
    }
    dnnl_primitive_desc_t pd = nullptr;
    const dnnl_status_t st = dnnl_primitive_desc_create(&pd, &desc, attr, engine(), nullptr);
    if (ops) dnnl_post_ops_destroy(ops);
    dnnl_primitive_attr_destroy(attr);
    entry e;
    if (st != dnnl_success) return e;  // unsupported here: the widening path
    const char* impl = nullptr;
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
    const bool reference = !impl || std::string_view(impl).starts_with("ref");
    if (!reference) {
      dnnl_ok(dnnl_primitive_create(&e.prim, pd), "dnnl_primitive_create");
      dnnl_ok(dnnl_memory_create(&e.a, &a_md, engine(), DNNL_MEMORY_NONE), "dnnl_memory_create");
      dnnl_ok(dnnl_memory_create(&e.b, &b_md, engine(), DNNL_MEMORY_NONE), "dnnl_memory_create");
      dnnl_ok(dnnl_memory_create(&e.c, &c_md, engine(), DNNL_MEMORY_NONE), "dnnl_memory_create");
    }
    dnnl_primitive_desc_destroy(pd);
    return e;
  }
  std::map<shape_key, entry> cache_;
  dnnl_stream_t stream_ = nullptr;
};
}  // namespace detail
#endif

// bf16 / f16 operands multiply the way tensor cores do: products and sums in f32, one
// rounding of the result to T (Eigen's product on half types would round after every
// add: a 784-long dot product in bf16 keeps ~2 significant digits). bf16 runs on
// oneDNN's matmul where the CPU has bf16 instructions (above); otherwise, and for f16,
// one widening pass over A and B and one narrowing pass over C, O(MK + KN + MN) against
// 2MNK FLOPs, around the f32 GEMM.
template <class T>
requires(std::is_same_v<T, bf16> ||
         std::is_same_v<T, f16>) void gemm_half(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                                                std::int64_t k, const T* a, std::int64_t lda, const T* b,
                                                std::int64_t ldb, T* c, std::int64_t ldc, grad_write mode) {
#if defined(KILN_HAVE_DNNL)
  if constexpr (std::is_same_v<T, bf16>) {
    if (k > 0 && detail::native_bf16_gemm() &&
        detail::bf16_matmuls::for_this_thread().run(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc,
                                                    mode != grad_write::overwrite))
      return;
  }
#endif
  gemm_half_widened<T>(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, mode);
}
// The widening path on its own (bench/gemm.cpp compares the two in one run).
template <class T>
void gemm_half_widened(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, const T* a,
                       std::int64_t lda, const T* b, std::int64_t ldb, T* c, std::int64_t ldc, grad_write mode) {
  thread_local std::vector<float> wa, wb, wc;
  detail::widen(a, trans_a ? k : m, trans_a ? m : k, lda, wa);
  detail::widen(b, trans_b ? n : k, trans_b ? k : n, ldb, wb);
  wc.resize(static_cast<std::size_t>(m * n));
  gemm<float>(trans_a, trans_b, m, n, k, wa.data(), trans_a ? m : k, wb.data(), trans_b ? k : n, wc.data(), n,
              grad_write::overwrite);
  for (std::int64_t r = 0; r < m; ++r) {
    T* out = c + r * ldc;
    const float* in = wc.data() + r * n;
    if (mode == grad_write::overwrite)
      for (std::int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(in[j]);
    else
      for (std::int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(static_cast<float>(out[j]) + in[j]);
  }
}

// C[M,N] (ldc) = op(A) op(B), op(A) = A[M,K] (lda) or A[K,M]ᵀ; write mode picks = or +=.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda,
          const T* b, std::int64_t ldb, T* c, std::int64_t ldc, grad_write mode) {
  cpu_runtime::ensure_initialised();
  if (m <= 0 || n <= 0) return;
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
    gemm_half<T>(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, mode);
  } else {
#if defined(KILN_HAVE_DNNL)
    if constexpr (std::is_same_v<T, float>) {
      if (k > 0) {
        // Row-major, like ours. Inside an OpenMP region (attention tiles, the backward's
        // two sections) oneDNN runs on the calling thread only.
        const dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb,
                                            mode == grad_write::overwrite ? 0.0f : 1.0f, c, ldc);
        KILN_CHECK(st == dnnl_success, "gemm: oneDNN sgemm failed (status ", static_cast<int>(st), ") for M=", m,
                   " N=", n, " K=", k, " lda=", lda, " ldb=", ldb, " ldc=", ldc);
        return;
      }
    }
#endif
    mmap<T> C(c, m, n, Eigen::OuterStride<>(ldc));
    auto run = [&](const auto& A, const auto& B) {
      if (mode == grad_write::overwrite)
        C.noalias() = A * B;
      else
        C.noalias() += A * B;
    };
    cmap<T> A(a, trans_a ? k : m, trans_a ? m : k, Eigen::OuterStride<>(lda));
    cmap<T> B(b, trans_b ? n : k, trans_b ? k : n, Eigen::OuterStride<>(ldb));
    if (!trans_a && !trans_b) run(A, B);
    if (!trans_a && trans_b) run(A, B.transpose());
    if (trans_a && !trans_b) run(A.transpose(), B);
    if (trans_a && trans_b) run(A.transpose(), B.transpose());
  }
}

// y[N, out] = x[N, in] · w[out, in]ᵀ (+ bias[out]) — PyTorch/HF weight layout. (Writing
// the bias first and letting the GEMM accumulate onto it measured the same.)
template <class T>
void linear_forward(const tensor<T>& x, const tensor<T>& w, const tensor<T>* bias, tensor<T>& y) {
  const std::int64_t n = x.shape().rows(), in = x.shape().back(), out = w.size(0);
  gemm<T>(false, true, n, out, in, x.data(), in, w.data(), in, y.data(), out, grad_write::overwrite);
  if (bias) {
    const T* bp = bias->data();
    T* yp = y.data();
    cpu_runtime::parallel_for(n, 64, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t r = b; r < e; ++r)
        for (std::int64_t j = 0; j < out; ++j)
          yp[r * out + j] = static_cast<T>(compute_t<T>(yp[r * out + j]) + compute_t<T>(bp[j]));
    });
  }
}

template <class T>
void bias_grad(const tensor<T>& gy, tensor<T>& gb, grad_write mode) {
  using C = compute_t<T>;
  const std::int64_t n = gy.shape().rows(), out = gy.shape().back();
  std::vector<C> acc(static_cast<std::size_t>(out), C(0));
  const T* g = gy.data();
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t j = 0; j < out; ++j) acc[static_cast<std::size_t>(j)] += C(g[r * out + j]);
  T* b = gb.data();
  for (std::int64_t j = 0; j < out; ++j) store_grad(b[j], acc[static_cast<std::size_t>(j)], mode);
}

// Gradients of linear_forward. Null outputs are skipped.
template <class T>
void linear_backward(const tensor<T>& x, const tensor<T>& w, const tensor<T>& gy, tensor<T>* gx, grad_write mx,
                     tensor<T>* gw, grad_write mw, tensor<T>* gb, grad_write mb) {
  const std::int64_t n = x.shape().rows(), in = x.shape().back(), out = w.size(0);
  auto dx = [&] { gemm<T>(false, false, n, in, out, gy.data(), out, w.data(), in, gx->data(), in, mx); };
  auto dw = [&] {
    gemm<T>(true, false, out, in, n, gy.data(), out, x.data(), in, gw->data(), in, mw);
    if (gb) bias_grad(gy, *gb, mb);
  };
#if defined(_OPENMP)
  if (gx && (gw || gb) && cpu_runtime::num_threads() > 1 && !omp_in_parallel()) {
    const int saved = Eigen::nbThreads();
    Eigen::setNbThreads(1);
#pragma omp parallel sections num_threads(2)
    {
#pragma omp section
      {
        cpu_runtime::set_flush_denormals();
        dx();
      }
#pragma omp section
      {
        cpu_runtime::set_flush_denormals();
        if (gw)
          dw();
        else
          bias_grad(gy, *gb, mb);
      }
    }
    Eigen::setNbThreads(saved);
    return;
  }
#endif
  if (gx) dx();
  if (gw)
    dw();
  else if (gb)
    bias_grad(gy, *gb, mb);
}

// Batched C[b] = op(A[b]) op(B[b]); a batch stride of 0 broadcasts an operand.
template <class T>
void batched_gemm(std::int64_t batch, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                  const T* a, std::int64_t stride_a, const T* b, std::int64_t stride_b, T* c, grad_write mode) {
  const std::int64_t lda = trans_a ? m : k, ldb = trans_b ? k : n;
  auto one = [&](std::int64_t i) {
    gemm<T>(trans_a, trans_b, m, n, k, a + i * stride_a, lda, b + i * stride_b, ldb, c + i * m * n, n, mode);
  };
#if defined(_OPENMP)
  if (batch > 1 && cpu_runtime::num_threads() > 1 && !omp_in_parallel()) {
    const int saved = Eigen::nbThreads();
    Eigen::setNbThreads(1);
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < batch; ++i) {
      cpu_runtime::set_flush_denormals();
      one(i);
    }
    Eigen::setNbThreads(saved);
    return;
  }
#endif
  for (std::int64_t i = 0; i < batch; ++i) one(i);
}

}  // namespace kiln::ops::cpu
