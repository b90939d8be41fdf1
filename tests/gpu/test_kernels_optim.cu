// tests/gpu/test_kernels_optim.cu — part of test_kernels (main in test_kernels.cu): the
// fused AdamW kernel (every parameter type, f32 masters' copies, stochastic rounding), the
// mixed-precision gradient fold, and optim::adamw<T, cuda> and gradient clipping against
// the CPU's.
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kiln/core/cuda_runtime.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/ops/kernel/functors.hpp"
#include "kiln/optim/adamw.hpp"
#include "kiln/optim/clip.hpp"

#include "kernel_test_common.cuh"

namespace {

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

}  // namespace

void kernel_test::adamw_optimizer_tests() {
  test_adamw_optimizer<f32>();
  test_adamw_optimizer<bf16>();
  test_adamw_optimizer_copies();
}

void kernel_test::clipping_tests() { test_clipping(); }

void kernel_test::adamw_kernel_tests() {
  test_adamw<f32, f32>();
  test_adamw<f32, bf16>();
  test_adamw<f32, f16>();
  test_adamw<bf16, bf16>();
  test_adamw_stochastic_copy();
  test_fold<bf16>();
  test_fold<f16>();
}
