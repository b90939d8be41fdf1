// tests/gpu/test_kernels_ops.cu — part of test_kernels (main in test_kernels.cu): graphs
// of kiln's ops on cuda tensors (an MLP with norms and cross-entropy, a transformer
// block's ops, matmul/bmm/softmax/max) against the same graphs on the CPU, the losses and
// every gradient; attention forward and backward against the CPU op (every mask,
// grouped-query heads, KV-cache offsets, dropout), and the tensor-core kernels against
// the reference kernels.
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/ops/activation.hpp"
#include "kiln/ops/arithmetic.hpp"
#include "kiln/ops/attention.hpp"
#include "kiln/ops/embedding.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"
#include "kiln/ops/matmul.hpp"
#include "kiln/ops/norm.hpp"
#include "kiln/ops/reduce.hpp"
#include "kiln/ops/rope.hpp"
#include "kiln/ops/shape_ops.hpp"
#include "kiln/ops/softmax.hpp"

#include "kernel_test_common.cuh"

namespace {

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

}  // namespace

void kernel_test::ops_graph_tests() {
  test_ops_graph<f32>();
  test_ops_graph<bf16>();
  test_transformer_ops<f32>();
  test_transformer_ops<bf16>();
  test_matmul_softmax<f32>();
  test_matmul_softmax<bf16>();
}

// The attention cases, also run alone (`test_kernels attention`) under compute-sanitizer
// racecheck by tools/gpu-check.sh: the tensor-core kernels' shared-memory phases are
// tested for order on host threads, but only racecheck sees a missing barrier.
void kernel_test::attention_tests() {
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
