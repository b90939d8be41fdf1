// The CUDA kernels against the CPU backend (suite gpu): every op in f32, bf16 and f16,
// forward and backward, on random inputs, within a per-dtype tolerance. Exits 77
// (skipped) where no GPU is visible. Built by nvcc in CI (compile-only there).
// One program in three files: this one (main, the runtime, device tensors, and the norm,
// cross-entropy, element-wise and GEMM kernels one by one), test_kernels_optim.cu (AdamW,
// the gradient fold, clipping) and test_kernels_ops.cu (kiln's ops on cuda tensors, and
// attention); kernel_test_common.cuh holds what they share.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <vector>

#include "kernel_test_common.cuh"
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/cuda/blas.hpp"
#include "kiln/ops/cpu/elementwise.hpp"
#include "kiln/ops/cpu/matmul.hpp"
#include "kiln/ops/cpu/norm.hpp"
#include "kiln/ops/kernel/functors.hpp"
#include "kiln/ops/rope.hpp"

namespace {

// The cuda device's runtime: tensors on the device through the caching allocator
// (stream-ordered cudaMallocAsync), copies through pinned memory, events.
void test_runtime() {
  namespace cr = kiln::cuda_runtime;
  expect(cr::device_count() > 0, "runtime: device_count sees the GPU");
  {
    // Small copies share the thread's cached staging buffer; one past the cache gets its own.
    void* a = cr::pinned_staging(100).data;
    void* b = cr::pinned_staging(5000).data;  // grows the cache
    void* c = cr::pinned_staging(200).data;
    const auto big = cr::pinned_staging(cr::staging_cache_bytes + 1);
    expect(a != nullptr && b == c && big.owned != nullptr && big.data != c,
           "runtime: pinned staging is cached per thread up to staging_cache_bytes");
  }
  const auto inf = cr::info(cr::current_device());
  expect(inf.memory_bytes > 0 && inf.major >= 8, "runtime: " + inf.name + " reports memory and sm_80 or newer");
  // A strided host tensor round-trips exactly.
  auto h = as_tensor(random<f32>(6 * 5, 60), shape{6, 5}).transpose(0, 1);
  auto d = cr::to_device(h);
  expect(d.shape() == shape({5, 6}) && d.is_contiguous(), "runtime: to_device keeps the shape, contiguous");
  expect(cr::to_host(d).to_vector() == h.contiguous().to_vector(), "runtime: host → device → host is exact");
  // The caching allocator reuses a freed block without another system allocation.
  auto& alloc = caching_allocator<cuda>::instance();
  { tensor<f32, cuda> warm(shape{1 << 20}); }
  const auto before = alloc.stats();
  for (int i = 0; i < 3; ++i) {
    tensor<f32, cuda> t(shape{1 << 20});
    cr::copy(t.data(), d.data(), 30 * sizeof(float), cr::copy_kind::device_to_device, cr::compute_stream());
  }
  const auto after = alloc.stats();
  expect(after.system_allocs == before.system_allocs && after.cache_hits >= before.cache_hits + 3,
         "runtime: freed device blocks are reused from the cache");
  expect(after.in_use == before.in_use, "runtime: every device block came back");
  // Stream order: a block freed after a copy is rewritten by the next op on the stream.
  std::vector<f32> want(1 << 16);
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = f32(i % 251);
  tensor<f32, cuda> last;
  for (int i = 0; i < 4; ++i) last = cr::to_device(as_tensor(want, shape{std::int64_t(want.size())}));
  expect(cr::to_host(last).to_vector() == want, "runtime: stream-ordered reuse keeps the data");
  // convert_scaled (the strategies' bucket packing): each element as the host's
  // static_cast<To>(float(x) · factor), in place too.
  {
    const auto src = random<bf16>(1000, 61, 3.0f);
    auto d16 = cr::to_device(as_tensor(src, shape{1000}));
    tensor<f32, cuda> d32(shape{1000});
    cr::convert_scaled(d32.data(), dtype::f32, d16.data(), dtype::bf16, 1000, 1.0f, false, cr::compute_stream());
    cr::convert_scaled(d16.data(), dtype::bf16, d32.data(), dtype::f32, 1000, 0.25f, false, cr::compute_stream());
    cr::convert_scaled(d32.data(), dtype::f32, d32.data(), dtype::f32, 1000, 0.5f, false, cr::compute_stream());
    // accumulate: d16 += d32 · 2 (d32 holds src / 2 now), as store_grad adds into a gradient.
    cr::convert_scaled(d16.data(), dtype::bf16, d32.data(), dtype::f32, 1000, 2.0f, true, cr::compute_stream());
    const auto got16 = cr::to_host(d16).to_vector();
    const auto got32 = cr::to_host(d32).to_vector();
    bool exact = true;
    for (std::size_t i = 0; i < src.size(); ++i) {
      exact = exact && float(got16[i]) == float(bf16(float(bf16(float(src[i]) * 0.25f)) + float(src[i])));
      exact = exact && got32[i] == float(src[i]) * 0.5f;
    }
    expect(exact, "runtime: convert_scaled rounds as the host does, bf16 <-> f32, in place, accumulating");
  }
  // Events time work on the stream.
  cr::event start(true), stop(true);
  start.record(cr::compute_stream());
  tensor<f32, cuda> from(shape{1 << 24}), to(shape{1 << 24});  // 64 MiB each
  cr::copy(to.data(), from.data(), std::size_t{1} << 26, cr::copy_kind::device_to_device, cr::compute_stream());
  stop.record(cr::compute_stream());
  stop.synchronize();
  expect(stop.elapsed_ms(start) >= 0.0f, "runtime: events measure elapsed time");
}

// Device fills and copies behind tensor<T, cuda>: zeros by memset, other values by the
// pattern kernel, contiguous clones; strided device copies are refused by name.
void test_device_tensor() {
  namespace cr = kiln::cuda_runtime;
  auto z = tensor<f32, cuda>::zeros(shape{1000});
  expect(cr::to_host(z).to_vector() == std::vector<f32>(1000, 0.0f), "device tensor: zeros");
  auto f = tensor<bf16, cuda>::full(shape{3, 333}, bf16(2.5f));
  expect(cr::to_host(f).to_vector() == std::vector<bf16>(999, bf16(2.5f)), "device tensor: bf16 full(2.5)");
  auto g = tensor<f64, cuda>::full(shape{17}, -1.25);
  expect(cr::to_host(g).to_vector() == std::vector<f64>(17, -1.25), "device tensor: f64 full");
  auto c = f.clone();
  expect(c.data() != f.data() && cr::to_host(c).to_vector() == cr::to_host(f).to_vector(), "device tensor: clone");
  // Strided device copies: a transpose and a stepped slice made contiguous, and a copy
  // into a strided destination, against the same on the host.
  auto h = as_tensor(random<f32>(6 * 35, 90), shape{6, 35});
  auto d = cr::to_device(h);
  expect(cr::to_host(d.transpose(0, 1).contiguous()).to_vector() == h.transpose(0, 1).contiguous().to_vector(),
         "device tensor: transpose made contiguous");
  expect(cr::to_host(d.slice(1, 3, 30, 4).contiguous()).to_vector() == h.slice(1, 3, 30, 4).contiguous().to_vector(),
         "device tensor: stepped slice made contiguous");
  auto hd = tensor<f32>::zeros(shape{35, 6});
  auto dd = tensor<f32, cuda>::zeros(shape{35, 6});
  hd.transpose(0, 1).copy_from(h);
  dd.transpose(0, 1).copy_from(d);
  expect(cr::to_host(dd).to_vector() == hd.to_vector(), "device tensor: copy into a transposed view");
}

// cuBLASLt GEMM against the CPU's gemm: every transpose pair, overwrite and accumulate,
// leading dimensions wider than the rows, and the bias / bias+GELU epilogues (with the
// pre-activation written for backward). Odd sizes leave cuBLASLt's aligned fast paths.
template <class T>
void test_gemm(ck::gemm_math math, bool aligned) {
  const std::int64_t M = aligned ? 64 : 37, N = aligned ? 96 : 53, K = aligned ? 128 : 71, pad = aligned ? 8 : 3;
  const double t = std::is_same_v<T, f32> && math == ck::gemm_math::tf32 ? 4e-3 : 2 * tol<T>();
  const std::string base = std::string("gemm ") + tname<T>() + (math == ck::gemm_math::tf32 ? " tf32" : "") +
                           (aligned ? " 64x96x128" : " 37x53x71");
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      ck::gemm_shape sh{ta == 1, tb == 1, M, N, K, (ta ? M : K) + pad, (tb ? K : N) + pad, N + pad};
      const auto a = random<T>((ta ? K : M) * sh.lda, 40 + ta), b = random<T>((tb ? N : K) * sh.ldb, 42 + tb);
      const auto c0 = random<T>(M * sh.ldc, 44), bias = random<T>(N, 45);
      for (int acc = 0; acc < 2; ++acc) {
        const grad_write mode = acc ? grad_write::accumulate : grad_write::overwrite;
        std::vector<T> want = c0;
        ops::cpu::gemm<T>(sh.trans_a, sh.trans_b, M, N, K, a.data(), sh.lda, b.data(), sh.ldb, want.data(), sh.ldc,
                          mode);
        dbuf<T> da(a), db(b), dc(c0);
        ck::gemm<T>(sh, da.p, db.p, dc.p, mode, nullptr, math);
        expect_close(base + (ta ? " Aᵀ" : " A") + (tb ? "Bᵀ" : "B") + (acc ? " +=" : " ="), dc.host(), want, t);
      }
      // Epilogues (overwrite): + bias, then GELU-tanh with the pre-activation kept.
      std::vector<T> pre = c0;
      ops::cpu::gemm<T>(sh.trans_a, sh.trans_b, M, N, K, a.data(), sh.lda, b.data(), sh.ldb, pre.data(), sh.ldc,
                        grad_write::overwrite);
      std::vector<T> act = pre;
      for (std::int64_t i = 0; i < M; ++i)
        for (std::int64_t j = 0; j < N; ++j) {
          const float z = float(pre[i * sh.ldc + j]) + float(bias[j]);
          pre[i * sh.ldc + j] = T(z);
          act[i * sh.ldc + j] = T(ops::fn::gelu_tanh{}(z));
        }
      dbuf<T> da(a), db(b), dbias(bias), dc(c0), dpre(c0), dc2(c0);
      ck::gemm<T>(sh, da.p, db.p, dc.p, grad_write::overwrite, nullptr, math, ck::gemm_epilogue::bias, dbias.p);
      expect_close(base + " + bias", dc.host(), pre, t);
      ck::gemm<T>(sh, da.p, db.p, dc2.p, grad_write::overwrite, nullptr, math, ck::gemm_epilogue::bias_gelu_tanh,
                  dbias.p, dpre.p);
      expect_close(base + " + bias, gelu", dc2.host(), act, t);
      expect_close(base + " + bias, gelu: pre-activation", dpre.host(), pre, t);
    }
}

template <class T>
void test_norm(bool rms) {
  const std::int64_t rows = 67, cols = 300;
  const auto x = random<T>(rows * cols, 1), res = random<T>(rows * cols, 2), w = random<T>(cols, 3),
             b = random<T>(cols, 4), dy = random<T>(rows * cols, 5);
  // CPU: h = x + res (rounded to T), then the norm.
  std::vector<T> h(x.size());
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = T(float(x[i]) + float(res[i]));
  tensor<T> ht = as_tensor(h, {rows, cols}), y({rows, cols});
  std::vector<compute_t<T>> mean(rows), rstd(rows);
  ops::cpu::norm_forward(ht, w.data(), rms ? nullptr : b.data(), 1e-5, rms, y, mean.data(), rstd.data());
  std::vector<T> gx(h.size()), gw(cols), gb(cols);
  ops::cpu::norm_backward(ht, w.data(), as_tensor(dy, {rows, cols}), mean.data(), rstd.data(), rms, gx.data(),
                          grad_write::overwrite, gw.data(), grad_write::overwrite, gb.data(), grad_write::overwrite);
  // GPU.
  dbuf<T> dx_(x), dres(res), dh(h.size()), dw_(w), db_(b), dyv(h.size()), dmean(rows), drstd(rows);
  dbuf<float> fmean(rows), frstd(rows);
  ck::norm_forward(dx_.p, dres.p, dh.p, dw_.p, rms ? nullptr : db_.p, dyv.p, fmean.p, frstd.p, rows, cols, 1e-5f, rms,
                   nullptr);
  dbuf<T> ddy(dy), dgx(h.size());
  dbuf<float> dgw(cols), dgb(cols), scratch(2 * ck::norm_slabs * cols);
  ck::norm_backward(dh.p, dw_.p, fmean.p, frstd.p, ddy.p, dgx.p, false, dgw.p, rms ? nullptr : dgb.p, scratch.p, rows,
                    cols, rms, nullptr);
  const std::string n = std::string(rms ? "rms_norm " : "layer_norm ") + tname<T>();
  expect_close(n + " residual add", dh.host(), h, tol<T>());
  expect_close(n + " forward", dyv.host(), std::vector<T>(y.data(), y.data() + y.numel()), tol<T>());
  expect_close(n + " rstd", frstd.host(), rstd, 1e-5);
  expect_close(n + " dx", dgx.host(), gx, 4 * tol<T>());
  expect_close(n + " dw (f32)", dgw.host(), gw, 4 * tol<T>());
  if (!rms) expect_close(n + " db (f32)", dgb.host(), gb, 4 * tol<T>());
}

template <class T>
void test_cross_entropy() {
  const std::int64_t rows = 37, vocab = 5003, ignore = -100;
  const auto logits = random<T>(rows * vocab, 6, 4.0f);
  std::vector<std::int64_t> tgt(rows);
  for (std::int64_t r = 0; r < rows; ++r) tgt[r] = r % 5 == 3 ? ignore : (r * 7919) % vocab;
  std::int64_t valid = 0;
  for (auto t : tgt) valid += t != ignore;
  const float scale = 1.0f / static_cast<float>(valid);
  // Reference in double.
  std::vector<double> loss(rows), grad(logits.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, s = 0;
    for (std::int64_t j = 0; j < vocab; ++j) m = std::max(m, double(float(logits[r * vocab + j])));
    for (std::int64_t j = 0; j < vocab; ++j) s += std::exp(double(float(logits[r * vocab + j])) - m);
    const double lse = m + std::log(s);
    const bool ign = tgt[r] == ignore;
    loss[r] = ign ? 0 : lse - double(float(logits[r * vocab + tgt[r]]));
    for (std::int64_t j = 0; j < vocab; ++j)
      grad[r * vocab + j] =
          ign ? 0 : (std::exp(double(float(logits[r * vocab + j])) - lse) - (j == tgt[r] ? 1 : 0)) * scale;
  }
  dbuf<T> dl(logits);
  dbuf<std::int64_t> dt(tgt);
  dbuf<float> dloss(rows);
  ck::cross_entropy(dl.p, dt.p, dloss.p, dl.p, scale, rows, vocab, ignore, nullptr);  // gradient in place
  const std::string n = std::string("cross_entropy ") + tname<T>();
  expect_close(n + " loss (vocab 5003, ignore_index)", dloss.host(), loss, std::is_same_v<T, f32> ? 1e-5 : 1e-2);
  expect_close(n + " dlogits in place", dl.host(), grad, tol<T>());
}

template <class T>
void test_elementwise() {
  const std::int64_t n = 10007;
  const auto x = random<T>(n, 7, 3.0f), u = random<T>(n, 8), dy = random<T>(n, 9);
  std::vector<T> y(n), dx(n), dg(n), du(n), sy(n);
  for (std::int64_t i = 0; i < n; ++i) {
    y[i] = T(ops::fn::gelu_tanh{}(float(x[i])));
    dx[i] = T(ops::fn::gelu_tanh{}.grad(float(x[i]), float(dy[i])));
    sy[i] = T(ops::fn::silu{}(float(x[i])) * float(u[i]));
    dg[i] = T(ops::fn::silu{}.grad(float(x[i]), float(dy[i]) * float(u[i])));
    du[i] = T(ops::fn::silu{}(float(x[i])) * float(dy[i]));
  }
  dbuf<T> dxv(x), duv(u), ddy(dy), out(n), out2(n);
  const std::string t = tname<T>();
  ck::gelu_forward(dxv.p, out.p, n, nullptr);
  expect_close("gelu forward " + t, out.host(), y, tol<T>());
  ck::gelu_backward(dxv.p, ddy.p, out.p, n, nullptr);
  expect_close("gelu backward " + t, out.host(), dx, tol<T>());
  ck::swiglu_forward(dxv.p, duv.p, out.p, n, nullptr);
  expect_close("swiglu forward " + t, out.host(), sy, tol<T>());
  ck::swiglu_backward(dxv.p, duv.p, ddy.p, out.p, out2.p, n, nullptr);
  expect_close("swiglu backward (gate) " + t, out.host(), dg, tol<T>());
  expect_close("swiglu backward (up) " + t, out2.host(), du, tol<T>());
  // Dropout: the CPU's mask, exactly.
  tensor<T> xt = as_tensor(x, {n}), yt({n});
  const philox_stream rng{0x5eed, 12345};
  ops::cpu::dropout_apply(xt, 0.3f, rng, yt, grad_write::overwrite);
  ck::dropout(dxv.p, out.p, n, 0.3f, rng, nullptr);
  expect_close("dropout p=0.3 (the CPU's mask) " + t, out.host(), std::vector<T>(yt.data(), yt.data() + n), 0.0);
  // RoPE forward and backward against the CPU op's kernel.
  const std::int64_t B = 2, L = 9, H = 3, D = 64;
  const auto q = random<T>(B * L * H * D, 10);
  const auto table = ops::cpu::rope_table(L, D, 5, 10000.0);
  std::vector<T> rf(q.size()), rb(q.size());
  ops::cpu::rope_apply(q.data(), rf.data(), B, L, H, D, table, false, grad_write::overwrite);
  ops::cpu::rope_apply(q.data(), rb.data(), B, L, H, D, table, true, grad_write::overwrite);
  dbuf<T> dq(q), dr(q.size());
  ck::rope(dq.p, dr.p, B, L, H, D, 5, 10000.0f, false, nullptr);
  expect_close("rope forward (first position 5) " + t, dr.host(), rf, tol<T>());
  ck::rope(dq.p, dr.p, B, L, H, D, 5, 10000.0f, true, nullptr);
  expect_close("rope backward " + t, dr.host(), rb, tol<T>());
  // Embedding gradient with repeated tokens.
  const std::int64_t tokens = 50, cols = 32, vocab = 11;
  std::vector<std::int64_t> tok(tokens);
  for (std::int64_t i = 0; i < tokens; ++i) tok[i] = (i * 3) % vocab;
  const auto g = random<T>(tokens * cols, 11);
  std::vector<float> dw(vocab * cols, 0.0f);
  for (std::int64_t i = 0; i < tokens; ++i)
    for (std::int64_t c = 0; c < cols; ++c) dw[tok[i] * cols + c] += float(g[i * cols + c]);
  dbuf<std::int64_t> dtok(tok);
  dbuf<T> dg_(g);
  dbuf<float> ddw(std::vector<float>(vocab * cols, 0.0f));
  ck::embedding_backward(dtok.p, dg_.p, ddw.p, tokens, cols, nullptr);
  expect_close("embedding backward (repeated tokens) " + t, ddw.host(), dw, 1e-6);
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_kernels: no GPU visible, skipped\n");
    return 77;
  }
  cudaDeviceProp prop{};
  cuda_ok(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("test_kernels on %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  if (argc > 1 && std::string(argv[1]) == "attention") {
    attention_tests();
    std::printf("test_kernels attention: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
  }
  test_runtime();
  test_device_tensor();
  adamw_optimizer_tests();
  ops_graph_tests();
  clipping_tests();
  test_gemm<f32>(ck::gemm_math::f32, true);
  test_gemm<f32>(ck::gemm_math::f32, false);
  test_gemm<f32>(ck::gemm_math::tf32, true);
  test_gemm<bf16>(ck::gemm_math::f32, true);
  test_gemm<f16>(ck::gemm_math::f32, true);
  adamw_kernel_tests();
  test_norm<f32>(false);
  test_norm<f32>(true);
  test_norm<bf16>(false);
  test_norm<bf16>(true);
  test_norm<f16>(false);
  test_cross_entropy<f32>();
  test_cross_entropy<bf16>();
  test_elementwise<f32>();
  test_elementwise<bf16>();
  test_elementwise<f16>();
  attention_tests();
  std::printf("test_kernels: %d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
