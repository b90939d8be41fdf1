// The CUDA kernels against the CPU backend (suite gpu): every op in f32, bf16 and f16,
// forward and backward, on random inputs, within a per-dtype tolerance. Exits 77
// (skipped) where no GPU is visible. Built by nvcc in CI (compile-only there).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kiln/core/cuda_runtime.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/cuda/blas.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/ops/activation.hpp"
#include "kiln/ops/arithmetic.hpp"
#include "kiln/ops/attention.hpp"
#include "kiln/ops/cpu/elementwise.hpp"
#include "kiln/ops/cpu/matmul.hpp"
#include "kiln/ops/cpu/norm.hpp"
#include "kiln/ops/embedding.hpp"
#include "kiln/ops/matmul.hpp"
#include "kiln/ops/norm.hpp"
#include "kiln/ops/reduce.hpp"
#include "kiln/ops/rope.hpp"
#include "kiln/ops/shape_ops.hpp"
#include "kiln/ops/softmax.hpp"
#include "kiln/optim/adamw.hpp"
#include "kiln/optim/clip.hpp"

using namespace kiln;
namespace ck = kiln::cuda_kernels;

namespace {

int failures = 0, checks = 0;

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "test_kernels: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// A device copy of a host vector, freed at scope end.
template <class T>
struct dbuf {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dbuf(std::size_t count) : n(count) {
    cuda_ok(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)), "malloc");
  }
  explicit dbuf(const std::vector<T>& h) : dbuf(h.size()) {
    cuda_ok(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "copy in");
  }
  ~dbuf() { cudaFree(p); }
  dbuf(const dbuf&) = delete;
  std::vector<T> host() const {
    std::vector<T> h(n);
    cuda_ok(cudaDeviceSynchronize(), "sync");
    cuda_ok(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "copy out");
    return h;
  }
};

template <class T>
double tol() {
  if constexpr (std::is_same_v<T, f32>)
    return 2e-5;
  else if constexpr (std::is_same_v<T, f16>)
    return 4e-3;
  else
    return 3e-2;
}
template <class T>
const char* tname() {
  return std::is_same_v<T, f32> ? "f32" : std::is_same_v<T, f16> ? "f16" : "bf16";
}

// |a − b| <= tol · (1 + |b|), element by element; prints the worst.
template <class A, class B>
void expect_close(const std::string& what, const std::vector<A>& got, const std::vector<B>& want, double t) {
  ++checks;
  double worst = 0;
  std::size_t at = 0;
  bool sizes = got.size() == want.size();
  for (std::size_t i = 0; sizes && i < got.size(); ++i) {
    const double g = static_cast<double>(static_cast<float>(got[i])),
                 w = static_cast<double>(static_cast<float>(want[i]));
    const double e = std::abs(g - w) / (1.0 + std::abs(w));
    if (!(e <= worst)) worst = e, at = i;  // NaN counts as the worst
  }
  const bool ok = sizes && worst <= t;
  if (!ok) ++failures;
  std::printf("%s %-44s max rel err %.3g (tolerance %.1g)%s\n", ok ? "ok  " : "FAIL", what.c_str(), worst, t,
              sizes ? "" : " — sizes differ");
  (void)at;
}

// max |a − b| <= tol · max |b|: for gradients, whose elements are small next to 1, so
// expect_close's (1 + |b|) would make the tolerance absolute (a zero gradient would pass).
template <class A, class B>
void expect_close_scaled(const std::string& what, const std::vector<A>& got, const std::vector<B>& want, double t) {
  ++checks;
  double worst = 0, scale = 0;
  const bool sizes = got.size() == want.size();
  for (std::size_t i = 0; sizes && i < got.size(); ++i) {
    const double g = static_cast<float>(got[i]), w = static_cast<float>(want[i]);
    const double e = std::abs(g - w);
    if (!(e <= worst)) worst = e;  // NaN counts as the worst
    scale = std::max(scale, std::abs(w));
  }
  const double rel = scale > 0 ? worst / scale : worst;
  const bool ok = sizes && scale > 0 && rel <= t;
  if (!ok) ++failures;
  std::printf("%s %-44s max err / max |want| %.3g (tolerance %.1g)%s\n", ok ? "ok  " : "FAIL", what.c_str(), rel, t,
              !sizes      ? " — sizes differ"
              : scale > 0 ? ""
                          : " — the reference is all zeros");
}

template <class T>
std::vector<T> random(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  philox_stream s{seed, 0};
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = T(scale * (2.0f * s.uniform(i) - 1.0f));
  return v;
}
template <class T>
tensor<T> as_tensor(const std::vector<T>& v, shape s) {
  tensor<T> t(s);
  std::copy(v.begin(), v.end(), t.data());
  return t;
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

// One AdamW step of P parameters (and an f32 master's Copy) against the functor loop
// the CPU optimizer runs.
template <class P, class Copy>
void test_adamw() {
  const std::int64_t sizes[] = {1000, 70000, 3};  // the second spans two chunks
  ops::fn::adamw_update u{1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0 - 0.9, std::sqrt(1.0 - 0.95)};
  std::vector<std::vector<P>> p, g, m, v;
  std::vector<std::vector<P>> rp, rm, rv;
  for (int k = 0; k < 3; ++k) {
    const auto n = static_cast<std::size_t>(sizes[k]);
    p.push_back(random<P>(n, 20 + k));
    g.push_back(random<P>(n, 30 + k));
    m.push_back(random<P>(n, 40 + k, 0.1f));
    v.push_back(random<P>(n, 50 + k, 0.1f));
    for (auto& e : v.back()) e = P(std::abs(float(e)));
    rp.push_back(p.back());
    rm.push_back(m.back());
    rv.push_back(v.back());
    const auto uf = u.as<float>();
    for (std::size_t i = 0; i < n; ++i) {
      float pi = float(rp[k][i]), mi = float(rm[k][i]), vi = float(rv[k][i]);
      uf(pi, float(g[k][i]), mi, vi);
      rp[k][i] = P(pi), rm[k][i] = P(mi), rv[k][i] = P(vi);
    }
  }
  std::vector<std::unique_ptr<dbuf<P>>> bufs;
  std::vector<std::unique_ptr<dbuf<Copy>>> copies;
  std::vector<ck::adamw_chunk> chunks;
  std::int64_t first = 0;
  for (int k = 0; k < 3; ++k) {
    auto* dp = bufs.emplace_back(new dbuf<P>(p[k])).get();
    auto* dg = bufs.emplace_back(new dbuf<P>(g[k])).get();
    auto* dm = bufs.emplace_back(new dbuf<P>(m[k])).get();
    auto* dv = bufs.emplace_back(new dbuf<P>(v[k])).get();
    Copy* dc = nullptr;
    if constexpr (!std::is_same_v<Copy, P>) dc = copies.emplace_back(new dbuf<Copy>(p[k].size())).get()->p;
    for (std::int64_t off = 0; off < sizes[k]; off += ck::adamw_chunk_elements)
      chunks.push_back({dp->p + off, dg->p + off, dm->p + off, dv->p + off, dc ? dc + off : nullptr,
                        std::min(ck::adamw_chunk_elements, sizes[k] - off), first + off, 0, 0});
    first += sizes[k];
  }
  ck::adamw_group grp{u.as<float>()};
  dbuf<ck::adamw_chunk> dchunks(chunks);
  dbuf<ck::adamw_group> dgroups(std::vector<ck::adamw_group>{grp});
  if constexpr (std::is_same_v<Copy, P>)
    ck::adamw_step<P, void>(dchunks.p, static_cast<int>(chunks.size()), dgroups.p, nullptr);
  else
    ck::adamw_step<P, Copy>(dchunks.p, static_cast<int>(chunks.size()), dgroups.p, nullptr);
  const std::string n = std::string("adamw ") + tname<P>() + (std::is_same_v<Copy, P> ? "" : " + copy");
  for (int k = 0; k < 3; ++k) {
    expect_close(n + " p[" + std::to_string(k) + "]", bufs[4 * k]->host(), rp[k],
                 std::is_same_v<P, f32> ? 1e-6 : tol<P>());
    // Contractions into FMA may differ between nvcc and the host compiler by an f32 ulp,
    // which a 16-bit store can turn into one ulp of that type.
    expect_close(n + " m[" + std::to_string(k) + "]", bufs[4 * k + 2]->host(), rm[k],
                 std::is_same_v<P, f32> ? 1e-6 : tol<P>());
    expect_close(n + " v[" + std::to_string(k) + "]", bufs[4 * k + 3]->host(), rv[k],
                 std::is_same_v<P, f32> ? 1e-6 : tol<P>());
    if constexpr (!std::is_same_v<Copy, P>) {
      std::vector<Copy> want(rp[k].size());
      for (std::size_t i = 0; i < want.size(); ++i) want[i] = Copy(float(rp[k][i]));
      expect_close(n + " copy[" + std::to_string(k) + "]", copies[k]->host(), want, tol<Copy>());
    }
  }
}

// Attention forward and backward against the CPU op (f32 arithmetic on the same,
// T-rounded inputs): grouped-query heads, a KV-cache offset, and dropout.
template <class T, class Mask, std::int64_t D = 64>
void test_attention(std::int64_t tq, std::int64_t s, float dropout_p, const std::string& label) {
  const std::int64_t B = 2, Hq = 4, Hkv = 2;
  const auto q = random<T>(B * tq * Hq * D, 60), k = random<T>(B * s * Hkv * D, 61), v = random<T>(B * s * Hkv * D, 62),
             dout = random<T>(B * tq * Hq * D, 63);
  auto f32_of = [](const std::vector<T>& x, shape sh) {
    tensor<float> t(sh);
    for (std::size_t i = 0; i < x.size(); ++i) t.data()[i] = float(x[i]);
    return t;
  };
  var<float> vq(f32_of(q, {B, tq, Hq, D}), true), vk(f32_of(k, {B, s, Hkv, D}), true),
      vv(f32_of(v, {B, s, Hkv, D}), true);
  ops::attention_options opt;
  opt.dropout_p = dropout_p;
  opt.rng = philox_stream{0xa77e, 99};
  auto out = ops::attention<Mask>(vq, vk, vv, opt);
  out.backward(f32_of(dout, {B, tq, Hq, D}));
  auto vec = [](const tensor<float>& t) { return std::vector<float>(t.data(), t.data() + t.numel()); };

  ck::attention_dims d;
  d.batch = B, d.q_len = tq, d.kv_len = s, d.q_heads = Hq, d.kv_heads = Hkv, d.head_dim = D;
  d.q_offset = s - tq;
  d.scale = 1.0f / std::sqrt(float(D));
  d.dropout_p = dropout_p;
  d.rng = opt.rng;
  dbuf<T> dq(q), dk(k), dv(v), ddo(dout), o(q.size()), gq(q.size()), gk(k.size()), gv(v.size());
  dbuf<float> lse(B * Hq * tq), delta(B * Hq * tq);
  using DM = typename ops::mask::device_form<Mask>::type;  // local<W> → local_n{W}, ...
  const DM dm = ops::mask::device_form<Mask>::make();
  ck::attention_forward<T, DM>(dq.p, dk.p, dv.p, o.p, lse.p, d, nullptr, dm);
  ck::attention_backward<T, DM>(dq.p, dk.p, dv.p, o.p, ddo.p, lse.p, delta.p, gq.p, gk.p, gv.p, d, nullptr, dm);
  const std::string n = "attention " + label + " " + tname<T>() + " D " + std::to_string(D);
  // Outputs and gradients against their own scale (max |error| / max |value|), so the
  // later, smaller tiles are held to the bound too: the host runs of the tensor-core block
  // programs (tests/ops/test_flash_tiles.cpp) measure bf16 ≤ 3.4e-3 and f16 ≤ 4.7e-4.
  const double tg = std::is_same_v<T, f32> ? 1e-4 : std::is_same_v<T, f16> ? 2e-3 : 1e-2;
  expect_close_scaled(n + " O", o.host(), vec(out.value()), tg);
  expect_close_scaled(n + " dq", gq.host(), vec(vq.grad()), tg);
  expect_close_scaled(n + " dk (summed over the group)", gk.host(), vec(vk.grad()), tg);
  expect_close_scaled(n + " dv", gv.host(), vec(vv.grad()), tg);
}

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) ++failures;
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

// f32 masters with a bf16 copy rounded stochastically (bf16_mixed's fused write-back): the
// copy's draws come from copy_sr at counter copy_first + i, not from the parameter's own
// counter. The host recomputes p in f32 and rounds with the same draws; nvcc may contract
// the update into FMAs differently, which can move p by an f32 ulp and so, rarely, the
// rounded copy by a bf16 ulp: at least 99.9% of the copies must match bit for bit, and
// they must differ from round-to-nearest about a quarter of the time (the mean of
// min(f, 1 − f) over a uniform fraction f of an ulp).
void test_adamw_stochastic_copy() {
  const std::int64_t n = 70000;  // two chunks
  const ops::fn::adamw_update u{1e-3, 0.9, 0.999, 1e-8, 0.01, 0.1, std::sqrt(0.001)};
  auto p = random<f32>(n, 200), g = random<f32>(n, 201), m = random<f32>(n, 202, 0.1f), v = random<f32>(n, 203, 0.1f);
  for (auto& e : v) e = std::abs(e);
  const philox_stream csr{0x5eed, 3ull << 40};
  const std::int64_t copy_first = 12345;  // the link's place among all masters
  std::vector<std::uint16_t> want(n), nearest(n);
  for (std::int64_t i = 0; i < n; ++i) {
    float pi = p[i], mi = m[i], vi = v[i];
    u.as<float>()(pi, g[i], mi, vi);
    want[i] = ops::fn::bf16_bits_stochastic(pi, csr.bits(static_cast<std::uint64_t>(copy_first + i)));
    nearest[i] = Eigen::numext::bit_cast<std::uint16_t>(bf16(pi));
  }
  dbuf<f32> dp(p), dg(g), dm(m), dv(v);
  dbuf<bf16> dc(static_cast<std::size_t>(n));
  std::vector<ck::adamw_chunk> chunks;
  for (std::int64_t off = 0; off < n; off += ck::adamw_chunk_elements)
    chunks.push_back({dp.p + off, dg.p + off, dm.p + off, dv.p + off, dc.p + off,
                      std::min(ck::adamw_chunk_elements, n - off), off, copy_first + off, 0});
  ck::adamw_group grp{u.as<float>()};
  grp.copy_sr = csr;
  grp.copy_stochastic = 1;
  dbuf<ck::adamw_chunk> dchunks(chunks);
  dbuf<ck::adamw_group> dgroups(std::vector<ck::adamw_group>{grp});
  ck::adamw_step<f32, bf16>(dchunks.p, static_cast<int>(chunks.size()), dgroups.p, nullptr);
  const auto got = dc.host();
  std::int64_t same = 0, off_nearest = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto b = Eigen::numext::bit_cast<std::uint16_t>(got[i]);
    same += b == want[i];
    off_nearest += b != nearest[i];
  }
  expect(same >= n - n / 1000, "adamw f32 + stochastic bf16 copy: " + std::to_string(same) + " of " +
                                   std::to_string(n) + " copies match the host's draws");
  expect(off_nearest > n / 8 && off_nearest < 3 * n / 8, "adamw stochastic copy: " + std::to_string(off_nearest) +
                                                             " of " + std::to_string(n) +
                                                             " differ from round-to-nearest (about a quarter should)");
}

// The mixed-precision fold: master_grad = (accumulate ? master_grad : 0) + f32(g), exact.
template <class Half>
void test_fold() {
  const std::int64_t sizes[] = {1000, 70000, 5};
  std::vector<std::unique_ptr<dbuf<Half>>> gs;
  std::vector<std::unique_ptr<dbuf<f32>>> mgs;
  std::vector<std::vector<f32>> want;
  std::vector<ck::fold_chunk> chunks;
  for (int k = 0; k < 3; ++k) {
    const auto n = static_cast<std::size_t>(sizes[k]);
    const auto g = random<Half>(n, 300 + k);
    const auto mg = random<f32>(n, 310 + k);
    const bool accumulate = k != 2;
    auto& w = want.emplace_back(n);
    for (std::size_t i = 0; i < n; ++i) w[i] = (accumulate ? mg[i] : 0.0f) + float(g[i]);
    auto* dg = gs.emplace_back(new dbuf<Half>(g)).get();
    auto* dmg = mgs.emplace_back(new dbuf<f32>(mg)).get();
    for (std::int64_t off = 0; off < sizes[k]; off += ck::adamw_chunk_elements)
      chunks.push_back(
          {dg->p + off, dmg->p + off, std::min(ck::adamw_chunk_elements, sizes[k] - off), accumulate ? 1 : 0});
  }
  dbuf<ck::fold_chunk> dchunks(chunks);
  ck::fold_gradients<Half>(dchunks.p, static_cast<int>(chunks.size()), nullptr);
  for (int k = 0; k < 3; ++k)
    expect_close(std::string("fold ") + tname<Half>() + " into f32 [" + std::to_string(k) + "]", mgs[k]->host(),
                 want[k], 0.0);
}

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

}  // namespace

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

// Two AdamW groups over parameters a, b, c (ps[0..2]): `first` in the first group, in
// that order, `second` alone in a group without weight decay.
template <class T, class Dev>
std::vector<optim::param_group<T, Dev>> adamw_groups(std::vector<var<T, Dev>>& ps, std::initializer_list<int> first,
                                                     int second) {
  using NP = nn::named_parameter<T, Dev>;
  auto name = [](int i) { return std::string(1, static_cast<char>('a' + i)); };
  std::vector<optim::param_group<T, Dev>> g(2);
  for (int i : first) g[0].params.push_back(NP{name(i), ps[static_cast<std::size_t>(i)]});
  g[1].params = {NP{name(second), ps[static_cast<std::size_t>(second)]}};
  g[1].weight_decay = 0.0;
  return g;
}

// optim::adamw over cuda parameters (the fused kernel, one launch per step) against the
// same optimizer over the same parameters on the CPU, three steps, two groups.
template <class P>
void test_adamw_optimizer() {
  namespace cr = kiln::cuda_runtime;
  const std::int64_t sizes[] = {1000, 70000, 5};
  std::vector<var<P>> hp;
  std::vector<var<P, cuda>> dp;
  for (int k = 0; k < 3; ++k) {
    auto t = as_tensor(random<P>(static_cast<std::size_t>(sizes[k]), 70 + k), shape{sizes[k]});
    hp.emplace_back(t.clone(), true);
    dp.emplace_back(cr::to_device(t), true);
  }
  auto groups = [](auto& ps) { return adamw_groups(ps, {0, 1}, 2); };
  const optim::adamw_options o{.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  optim::adamw<P> host(groups(hp), o);
  optim::adamw<P, cuda> dev(groups(dp), o);
  for (int step = 0; step < 3; ++step) {
    for (int k = 0; k < 3; ++k) {
      auto gr = as_tensor(random<P>(static_cast<std::size_t>(sizes[k]), 100 * step + k), shape{sizes[k]});
      hp[k].begin_grad_write();
      hp[k].grad().copy_from(gr);
      dp[k].begin_grad_write();
      auto dg = cr::to_device(gr);
      dp[k].grad().copy_from(dg);
    }
    host.step();
    dev.step();
  }
  // Both sides apply the same f32 update and round to nearest: they may differ where an
  // FMA contraction tips a rounding, by one ulp of P (bf16: 2^-7 near 1). The parameters
  // moved by ~3e-2 over the three steps, so a step that did nothing fails.
  for (int k = 0; k < 3; ++k) {
    const std::string n = std::string("adamw optimizer ") + tname<P>() + " param " + std::to_string(k);
    const auto got = cr::to_host(dp[k].value()).to_vector(), want = hp[k].value().to_vector();
    expect_close(n, got, want, std::is_same_v<P, f32> ? 1e-5 : 8e-3);
    const auto before = random<P>(static_cast<std::size_t>(sizes[k]), 70 + k);
    double moved = 0;
    for (std::size_t i = 0; i < got.size(); ++i) moved = std::max(moved, std::abs(double(got[i]) - double(before[i])));
    expect(moved > 1.5e-2, n + " moved (the step ran)");
  }
}

// adamw<f32, cuda>::step(compute_copies) against the CPU optimizer's: f32 masters in two
// groups, each step writing stochastically rounded bf16 copies through the table mixed
// precision builds (the copies' counters start at each master's place among all of them,
// not the optimizer's group order). The masters agree to f32 rounding; at least 99.9% of
// the copies bit for bit (an FMA contraction may move a master by an f32 ulp, and so,
// rarely, its rounded copy); and about a quarter of the copies differ from nearest.
void test_adamw_optimizer_copies() {
  namespace cr = kiln::cuda_runtime;
  const std::int64_t sizes[] = {1000, 70000, 5};
  std::vector<var<f32>> hp;
  std::vector<var<f32, cuda>> dp;
  std::vector<tensor<bf16>> hc;
  std::vector<tensor<bf16, cuda>> dc;
  for (int k = 0; k < 3; ++k) {
    auto t = as_tensor(random<f32>(static_cast<std::size_t>(sizes[k]), 80 + k), shape{sizes[k]});
    hp.emplace_back(t.clone(), true);
    dp.emplace_back(cr::to_device(t), true);
    hc.emplace_back(shape{sizes[k]});
    dc.emplace_back(shape{sizes[k]});
  }
  auto groups = [](auto& ps) { return adamw_groups(ps, {2, 0}, 1); };  // not the masters' order
  const optim::adamw_options o{.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  optim::adamw<f32> host(groups(hp), o);
  optim::adamw<f32, cuda> dev(groups(dp), o);
  for (std::uint64_t step = 0; step < 3; ++step) {
    optim::compute_copies<bf16, cpu> htab;
    optim::compute_copies<bf16, cuda> dtab;
    htab.stochastic = dtab.stochastic = true;
    htab.stream = dtab.stream = philox_stream{0x5eed, step << 40};
    std::int64_t first = 0;
    for (int k = 0; k < 3; ++k) {
      auto gr = as_tensor(random<f32>(static_cast<std::size_t>(sizes[k]), 500 + 10 * step + k), shape{sizes[k]});
      hp[k].begin_grad_write();
      hp[k].grad().copy_from(gr);
      dp[k].begin_grad_write();
      dp[k].grad().copy_from(cr::to_device(gr));
      htab.of[hp[k].id()] = {hc[k].data(), first};
      dtab.of[dp[k].id()] = {dc[k].data(), first};
      first += sizes[k];
    }
    host.step(htab);
    dev.step(dtab);
  }
  for (int k = 0; k < 3; ++k) {
    const std::string n = "adamw<f32, cuda> + stochastic bf16 copies, param " + std::to_string(k);
    const auto master = hp[k].value().to_vector();
    expect_close(n + " masters", cr::to_host(dp[k].value()).to_vector(), master, 1e-5);
    const auto got = cr::to_host(dc[k]).to_vector(), want = hc[k].to_vector();
    std::size_t same = 0, off_nearest = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const auto b = Eigen::numext::bit_cast<std::uint16_t>(got[i]);
      same += b == Eigen::numext::bit_cast<std::uint16_t>(want[i]);
      off_nearest += b != Eigen::numext::bit_cast<std::uint16_t>(bf16(master[i]));
    }
    expect(same >= got.size() - got.size() / 1000,
           n + ": " + std::to_string(same) + " of " + std::to_string(got.size()) + " copies match the CPU's bits");
    if (got.size() >= 1000)
      expect(off_nearest > got.size() / 8 && off_nearest < 3 * got.size() / 8,
             n + ": " + std::to_string(off_nearest) + " copies differ from nearest (about a quarter should)");
  }
}

// A small network's forward and backward through kiln's ops on cuda tensors — linear
// (cuBLASLt, bias epilogue), layer_norm and rms_norm sharing a weight (its gradient
// accumulates), GELU, a broadcast add, a product, a scale, cross-entropy with an ignored
// row (plain, and summed with label smoothing 0.1: its gradient accumulates into the
// logits') — against the same graph on the CPU: the loss and every gradient.
template <class T>
void test_ops_graph() {
  namespace cr = kiln::cuda_runtime;
  const std::int64_t B = 48, In = 96, H = 80, K = 10;
  std::vector<i64> labels(B);
  for (std::int64_t i = 0; i < B; ++i) labels[static_cast<std::size_t>(i)] = (i * 7) % K;
  labels[3] = -100;  // ignored
  const auto ht = as_tensor(labels, shape{B});
  const tensor<T> init[] = {
      as_tensor(random<T>(B * In, 200), shape{B, In}),     as_tensor(random<T>(H * In, 201, 0.1f), shape{H, In}),
      as_tensor(random<T>(H, 202, 0.1f), shape{H}),        as_tensor(random<T>(H, 203), shape{H}),
      as_tensor(random<T>(K * H, 204, 0.1f), shape{K, H}), as_tensor(random<T>(K, 205, 0.1f), shape{K}),
      as_tensor(random<T>(H, 206, 0.2f), shape{H}),        as_tensor(random<T>(H, 207, 0.2f), shape{H})};
  auto run = [&](auto dev_tag, auto to_dev) {
    using D = decltype(dev_tag);
    std::vector<var<T, D>> p;
    for (auto& t : init) p.emplace_back(to_dev(t), true);
    auto z = ops::layer_norm(ops::linear(p[0], p[1], std::optional(p[2])), std::optional(p[6]), std::optional(p[7]));
    auto h = ops::gelu(ops::rms_norm(z, std::optional(p[6])), ops::gelu_approximation::tanh);
    auto g = ops::mul(ops::add(h, p[3]), h);  // broadcast add over rows, then a same-shape product
    auto y = ops::linear(ops::scale(g, 0.5), p[4], std::optional(p[5]));
    ops::cross_entropy_options smooth;
    smooth.label_smoothing = 0.1f;
    smooth.reduce = ops::cross_entropy_options::reduction::sum;
    auto loss =
        ops::add(ops::cross_entropy(y, to_dev(ht)), ops::scale(ops::cross_entropy(y, to_dev(ht), smooth), 0.02));
    loss.backward();
    return std::pair{loss, p};
  };
  auto [hl, hp] = run(cpu{}, [](const auto& t) { return t.clone(); });
  auto [dl, dp] = run(cuda{}, [](const auto& t) { return cr::to_device(t); });
  const std::string n = std::string("ops graph ") + tname<T>();
  const double t = std::is_same_v<T, f32> ? 1e-4 : tol<T>();
  expect_close(n + " loss", cr::to_host(dl.value()).to_vector(), hl.value().to_vector(), t);
  const char* names[] = {"x", "w1", "b1", "c", "w2", "b2", "norm w", "norm b"};
  for (std::size_t k = 0; k < hp.size(); ++k)
    expect_close_scaled(n + " grad " + names[k], cr::to_host(dp[k].grad()).to_vector(), hp[k].grad().to_vector(), t);
}

// A transformer-shaped graph through the ops ported to cuda tensors — embedding (i64 ids
// that repeat, so its backward sums rows, and i32 ids into the same table, so the
// gradient accumulates), attention_packed and attention with RoPE over slices of one QKV
// projection (causal, and unmasked with dropout 0.1; grouped-query 2/1, head dim 32),
// SwiGLU, dropout, transpose, concat, a product, mean and sums over the last and a middle
// dimension — against the same graph on the CPU: the loss and every gradient.
template <class T>
void test_transformer_ops() {
  namespace cr = kiln::cuda_runtime;
  const std::int64_t B = 2, L = 40, V = 50, E = 64, F = 96, D = 32;
  std::vector<i64> ids(B * L);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<i64>((i * 13 + i / 7) % 23);  // repeats
  const auto hid = as_tensor(ids, shape{B, L});
  std::vector<i32> ids2(B * L);  // i32 ids into the same table: its gradient accumulates
  for (std::size_t i = 0; i < ids2.size(); ++i) ids2[i] = static_cast<i32>((i * 5 + 3) % V);
  const auto hid2 = as_tensor(ids2, shape{B, L});
  const tensor<T> init[] = {as_tensor(random<T>(V * E, 300), shape{V, E}),
                            as_tensor(random<T>(4 * D * E, 301, 0.15f), shape{4 * D, E}),
                            as_tensor(random<T>(E * 2 * D, 302, 0.15f), shape{E, 2 * D}),
                            as_tensor(random<T>(F * E, 303, 0.15f), shape{F, E}),
                            as_tensor(random<T>(F * E, 304, 0.15f), shape{F, E}),
                            as_tensor(random<T>(E * F, 305, 0.15f), shape{E, F})};
  auto run = [&](auto dev_tag, auto to_dev) {
    using Dv = decltype(dev_tag);
    std::vector<var<T, Dv>> p;
    for (auto& t : init) p.emplace_back(to_dev(t), true);
    auto x = ops::add(ops::embedding(to_dev(hid), p[0]), ops::embedding(to_dev(hid2), p[0]));  // [B, L, E]
    auto qkv = ops::linear(x, p[1]);                                                           // [B, L, (2 + 1 + 1)·D]
    auto a = ops::attention_packed<ops::mask::causal>(qkv, 2, 1);
    auto q = ops::rope(ops::reshape(ops::slice(qkv, 2, 0, 2 * D), shape{B, L, 2, D}));
    auto k = ops::rope(ops::reshape(ops::slice(qkv, 2, 2 * D, 3 * D), shape{B, L, 1, D}));
    auto v = ops::reshape(ops::slice(qkv, 2, 3 * D, 4 * D), shape{B, L, 1, D});
    auto a2 = ops::reshape(ops::attention<ops::mask::causal>(q, k, v), shape{B, L, 2 * D});
    ops::attention_options drop;
    drop.dropout_p = 0.1f;
    drop.rng = philox_stream{78, 0};
    auto a3 = ops::reshape(ops::attention<ops::mask::none>(q, k, v, drop), shape{B, L, 2 * D});
    auto h = ops::add(x, ops::linear(ops::add(ops::add(a, a2), a3), p[2]));
    auto m = ops::linear(ops::swiglu(ops::linear(h, p[3]), ops::linear(h, p[4])), p[5]);
    auto h2 = ops::add(h, ops::dropout(m, 0.1f, philox_stream{77, 0}));
    auto t = ops::transpose(h2, 1, 2);  // [B, E, L], a strided view
    auto c = ops::concat(std::vector<var<T, Dv>>{t, ops::scale(t, 0.5)}, 1);
    auto loss = ops::add(ops::add(ops::mean(ops::mul(c, c)), ops::mean(ops::sum(c, 2))),
                         ops::mean(ops::sum(c, 1)));  // a sum over the last and over a middle dimension
    loss.backward();
    return std::pair{loss, p};
  };
  auto [hl, hp] = run(cpu{}, [](const auto& t) { return t.clone(); });
  auto [dl, dp] = run(cuda{}, [](const auto& t) { return cr::to_device(t); });
  const std::string n = std::string("transformer ops ") + tname<T>();
  const double t = std::is_same_v<T, f32> ? 1e-4 : tol<T>();
  expect_close(n + " loss", cr::to_host(dl.value()).to_vector(), hl.value().to_vector(), t);
  const char* names[] = {"embedding", "qkv", "proj", "gate", "up", "down"};
  for (std::size_t k = 0; k < hp.size(); ++k)
    expect_close_scaled(n + " grad " + names[k], cr::to_host(dp[k].grad()).to_vector(), hp[k].grad().to_vector(), t);
  // An id outside the table is an error naming it, not a read past the table.
  bool named = false;
  try {
    auto bad = hid.clone();
    bad(1, 5) = V + 3;
    auto w = var<T, cuda>(cr::to_device(init[0]), false);
    ops::embedding(cr::to_device(bad), w);
  } catch (const kiln::error& e) {
    named = std::string(e.what()).find("id 53") != std::string::npos;
  }
  expect(named, n + ": an out-of-range id is named");
}

// matmul, bmm (per-batch and shared right operands), softmax / log_softmax, mse and max
// (over a dimension and over everything) on cuda tensors against the CPU: the loss and every gradient.
template <class T>
void test_matmul_softmax() {
  namespace cr = kiln::cuda_runtime;
  const std::int64_t Bt = 3, M = 12, K = 20, N = 16;
  const tensor<T> init[] = {as_tensor(random<T>(M * K, 400), shape{M, K}),
                            as_tensor(random<T>(K * N, 401), shape{K, N}),
                            as_tensor(random<T>(Bt * M * K, 402), shape{Bt, M, K}),
                            as_tensor(random<T>(Bt * K * N, 403), shape{Bt, K, N}),
                            as_tensor(random<T>(4 * 1000, 404, 3.0f), shape{4, 1000}),  // rows wider than a block
                            as_tensor(random<T>(6 * 50, 405), shape{6, 50})};  // max's input, its own parameter
  auto run = [&](auto dev_tag, auto to_dev) {
    using Dv = decltype(dev_tag);
    std::vector<var<T, Dv>> p;
    for (auto& t : init) p.emplace_back(to_dev(t), true);
    auto y = ops::matmul(p[0], p[1]);                               // [M, N]
    auto z = ops::add(ops::bmm(p[2], p[3]), ops::bmm(p[2], p[1]));  // per-batch and shared B
    auto s = ops::softmax(y);
    auto ls = ops::log_softmax(z);
    auto loss = ops::add(ops::add(ops::mean(ops::mul(s, y)), ops::mean(ops::mul(ls, ops::scale(z, 0.1)))),
                         ops::add(ops::mse(s, ops::scale(y, 0.1)), ops::mean(ops::mul(ops::softmax(p[4]), p[4]))));
    // Row maxima and the global max of inputs both sides hold bit for bit (a GEMM output
    // could round differently and move a near-tie's argmax); ties take the first, as on the CPU.
    loss = ops::add(loss, ops::add(ops::mean(ops::max(p[5], 1)), ops::max(p[5])));
    loss.backward();
    return std::pair{loss, p};
  };
  auto [hl, hp] = run(cpu{}, [](const auto& t) { return t.clone(); });
  auto [dl, dp] = run(cuda{}, [](const auto& t) { return cr::to_device(t); });
  const std::string n = std::string("matmul/bmm/softmax/mse/max ") + tname<T>();
  const double t = std::is_same_v<T, f32> ? 1e-4 : tol<T>();
  expect_close(n + " loss", cr::to_host(dl.value()).to_vector(), hl.value().to_vector(), t);
  const char* names[] = {"a", "b (matmul, shared bmm)", "A", "B", "wide softmax input", "max input"};
  for (std::size_t k = 0; k < hp.size(); ++k)
    expect_close_scaled(n + " grad " + names[k], cr::to_host(dp[k].grad()).to_vector(), hp[k].grad().to_vector(), t);
}

// Gradient clipping over cuda parameters (the f64 sum of squares on the device, scaling
// and clamping there) against the same on the CPU.
template <class Dv>
struct clip_params {
  std::vector<var<f32, Dv>> ps;
  template <class F>
  void for_each_child(F&& f) {
    for (std::size_t i = 0; i < ps.size(); ++i) f(std::to_string(i), ps[i]);
  }
};
void test_clipping() {
  namespace cr = kiln::cuda_runtime;
  const std::int64_t sizes[] = {1000, 70000, 5};
  for (bool by_value : {false, true}) {
    clip_params<cpu> h;
    clip_params<cuda> d;
    for (int k = 0; k < 3; ++k) {
      auto g = as_tensor(random<f32>(static_cast<std::size_t>(sizes[k]), 80 + k, 0.05f), shape{sizes[k]});
      h.ps.emplace_back(tensor<f32>::zeros(shape{sizes[k]}), true);
      d.ps.emplace_back(tensor<f32, cuda>::zeros(shape{sizes[k]}), true);
      h.ps[k].begin_grad_write();
      h.ps[k].grad().copy_from(g);
      d.ps[k].begin_grad_write();
      d.ps[k].grad().copy_from(cr::to_device(g));
    }
    const std::string n = by_value ? "clip_grad_value(0.02)" : "clip_grad_norm(1.0)";
    if (by_value) {
      optim::clip_grad_value(h, 0.02);
      optim::clip_grad_value(d, 0.02);
    } else {
      const double hn = optim::clip_grad_norm(h, 1.0), dn = optim::clip_grad_norm(d, 1.0);
      expect_close(n + " norm", std::vector<double>{dn}, std::vector<double>{hn}, 1e-6);
      expect(hn > 1.0, n + ": the norm exceeds 1, so the gradients were scaled");
    }
    for (int k = 0; k < 3; ++k)
      expect_close_scaled(n + " grad " + std::to_string(k), cr::to_host(d.ps[k].grad()).to_vector(),
                          h.ps[k].grad().to_vector(), 1e-6);
  }
  // A NaN gradient stays NaN under clip_grad_value (std::clamp's behaviour on the CPU).
  clip_params<cuda> d;
  auto g = tensor<f32>::full(shape{4}, 5.0f);
  g(2) = std::numeric_limits<float>::quiet_NaN();
  d.ps.emplace_back(tensor<f32, cuda>::zeros(shape{4}), true);
  d.ps[0].begin_grad_write();
  d.ps[0].grad().copy_from(cr::to_device(g));
  optim::clip_grad_value(d, 1.0);
  const auto got = cr::to_host(d.ps[0].grad()).to_vector();
  expect(got[0] == 1.0f && std::isnan(got[2]), "clip_grad_value keeps a NaN gradient NaN and clamps the rest");
}

// The tensor-core kernels against the CUDA-core reference kernels on the same device and
// inputs (attention_dims::reference_kernels), for both tensor-core sets: the register-
// resident programs (the default) and the staged tiles (attention_dims::staged_tiles).
// All round only their outputs and, on tensor cores, the probabilities, so they agree
// within the 16-bit type's tolerance; and each tensor-core set is deterministic — a
// second run gives the same bits. Both head dims, so every D's kernels run once here.
void test_tensor_cores_against_reference(std::int64_t D) {
  const std::int64_t B = 1, T = 150, S = 150, Hq = 4, Hkv = 2;
  const auto q = random<bf16>(B * T * Hq * D, 80), k = random<bf16>(B * S * Hkv * D, 81),
             v = random<bf16>(B * S * Hkv * D, 82), dout = random<bf16>(B * T * Hq * D, 83);
  ck::attention_dims d;
  d.batch = B, d.q_len = T, d.kv_len = S, d.q_heads = Hq, d.kv_heads = Hkv, d.head_dim = D;
  d.scale = 1.0f / std::sqrt(float(D));
  d.dropout_p = 0.1f;
  d.rng = philox_stream{0x7c, 1};
  enum class set { registers, staged, reference };
  auto run = [&](set which) {
    ck::attention_dims dd = d;
    dd.reference_kernels = which == set::reference;
    dd.staged_tiles = which == set::staged;
    dbuf<bf16> dq(q), dk(k), dv(v), ddo(dout), o(q.size()), gq(q.size()), gk(k.size()), gv(v.size());
    dbuf<float> lse(B * Hq * T), delta(B * Hq * T);
    ck::attention_forward<bf16, ops::mask::causal>(dq.p, dk.p, dv.p, o.p, lse.p, dd, nullptr);
    ck::attention_backward<bf16, ops::mask::causal>(dq.p, dk.p, dv.p, o.p, ddo.p, lse.p, delta.p, gq.p, gk.p, gv.p, dd,
                                                    nullptr);
    return std::vector<std::vector<bf16>>{o.host(), gq.host(), gk.host(), gv.host()};
  };
  const auto ref = run(set::reference);
  const char* names[] = {"O", "dq", "dk", "dv"};
  for (set which : {set::registers, set::staged}) {
    const auto tc = run(which), again = run(which);
    const std::string n = std::string("attention tensor cores (") + (which == set::registers ? "registers" : "staged") +
                          ") vs reference (bf16, D " + std::to_string(D) + ", causal, dropout) ";
    for (int i = 0; i < 4; ++i) {
      std::vector<float> want(ref[i].size());
      for (std::size_t e = 0; e < want.size(); ++e) want[e] = float(ref[i][e]);
      // Each within ~3.4e-3 of the exact result (scaled): two such errors apart.
      expect_close_scaled(n + names[i], tc[i], want, 1.5e-2);
      expect(std::memcmp(tc[i].data(), again[i].data(), tc[i].size() * sizeof(bf16)) == 0,
             n + "a second run gives the same bits, " + names[i]);
    }
  }
}

// The attention cases, also run alone (`test_kernels attention`) under compute-sanitizer
// racecheck by tools/gpu-check.sh: the tensor-core kernels' shared-memory phases are
// tested for order on host threads, but only racecheck sees a missing barrier.
void attention_tests() {
  test_attention<f32, ops::mask::causal>(40, 40, 0.0f, "causal GQA 4/2");
  test_attention<f32, ops::mask::causal>(8, 40, 0.0f, "causal, 8 queries after 32 cached keys");
  test_attention<f32, ops::mask::none>(33, 47, 0.1f, "no mask, dropout 0.1");
  // The sparse patterns. Blocks hold 64 query rows; strided's first key is not monotone in
  // the row, so the second block of the strided cases (positions 67..72, 71..76) starts
  // at a row whose first key (3, 1) is above its last row's (0).
  test_attention<f32, ops::mask::local<7>>(70, 70, 0.0f, "local<7>");
  test_attention<f32, ops::mask::local<16>>(12, 80, 0.1f, "local<16>, 12 queries after 68 cached keys, dropout");
  test_attention<f32, ops::mask::strided<8>>(70, 73, 0.0f, "strided<8>, 3 cached keys");
  test_attention<bf16, ops::mask::strided<5>>(70, 77, 0.0f, "strided<5>, 7 cached keys");
  test_attention<bf16, ops::mask::causal>(40, 40, 0.0f, "causal GQA 4/2");
  test_attention<f16, ops::mask::causal>(40, 40, 0.0f, "causal GQA 4/2");
  // bf16 and f16 at head dims 64 and 128 run the tensor-core kernels (kiln/cuda/flash_tiles.hpp):
  // three query tiles with a partial last one, cached keys, dropout, the sparse masks.
  test_attention<bf16, ops::mask::causal, 128>(130, 130, 0.0f, "causal GQA 4/2, three query tiles");
  test_attention<f16, ops::mask::none, 128>(70, 150, 0.1f, "no mask, 80 cached keys, dropout 0.1");
  test_attention<bf16, ops::mask::local<16>, 64>(200, 200, 0.0f, "local<16>, tiles skipped");
  test_attention<f16, ops::mask::strided<5>, 128>(70, 77, 0.0f, "strided<5>, 7 cached keys");
  test_tensor_cores_against_reference(128);
  test_tensor_cores_against_reference(64);
}

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
  test_adamw_optimizer<f32>();
  test_adamw_optimizer<bf16>();
  test_adamw_optimizer_copies();
  test_ops_graph<f32>();
  test_ops_graph<bf16>();
  test_transformer_ops<f32>();
  test_transformer_ops<bf16>();
  test_matmul_softmax<f32>();
  test_matmul_softmax<bf16>();
  test_clipping();
  test_gemm<f32>(ck::gemm_math::f32, true);
  test_gemm<f32>(ck::gemm_math::f32, false);
  test_gemm<f32>(ck::gemm_math::tf32, true);
  test_gemm<bf16>(ck::gemm_math::f32, true);
  test_gemm<f16>(ck::gemm_math::f32, true);
  test_adamw<f32, f32>();
  test_adamw<f32, bf16>();
  test_adamw<f32, f16>();
  test_adamw<bf16, bf16>();
  test_adamw_stochastic_copy();
  test_fold<bf16>();
  test_fold<f16>();
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
