// The tensor-core attention kernels' block programs run on host threads, one per warp with
// a std::barrier for __syncthreads, against the CPU attention op: the tiling, masks,
// online softmax, dropout, grouped-query sums and partial tiles are checked here on every
// machine. Two sets: the staged tiles of kiln/cuda/flash_tiles.hpp (scalar loops for the
// 16×16×16 wmma products) and the register-resident programs of
// kiln/cuda/flash_registers.hpp (each warp's 32 lanes stepped in turn, ldmatrix, mma.sync
// and the shuffles emulated from the PTX fragment tables). The PTX instructions
// themselves run only where a GPU runs the gpu suite.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <thread>

#include "../helpers.hpp"
#include "kiln/cuda/flash_registers.hpp"
#include "kiln/cuda/flash_tiles.hpp"

namespace test_flash_tiles {

using namespace kiln;
namespace fl = kiln::cuda_kernels::flash;

namespace {

// A warp is one host thread: one lane, so the warp reductions are the value itself.
struct host_block {
  int tid, nthreads, warp, nwarps, lane, lanes;
  std::barrier<>* bar;
  void sync() const { bar->arrive_and_wait(); }
  static float warp_max(float x) { return x; }
  static float warp_sum(float x) { return x; }
  static void warp_sync() {}
};

// Runs body(ctx, smem, bx, by) for every block of a gx × gy grid, W host threads per
// block. Shared memory starts as all-ones bytes (NaN as f32, bf16 and f16), so a read of
// a value no phase wrote shows up in the results.
template <int W, class Body>
void run_grid(std::int64_t gx, std::int64_t gy, int smem_bytes, Body body) {
  struct freer {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, freer> smem(
      static_cast<unsigned char*>(std::aligned_alloc(128, static_cast<std::size_t>(smem_bytes))));
  for (std::int64_t by = 0; by < gy; ++by)
    for (std::int64_t bx = 0; bx < gx; ++bx) {
      std::memset(smem.get(), 0xff, static_cast<std::size_t>(smem_bytes));
      std::barrier<> bar(W);
      std::vector<std::thread> warps;
      for (int w = 0; w < W; ++w)
        warps.emplace_back([&, w] { body(host_block{w, W, w, W, 0, 1, &bar}, smem.get(), bx, by); });
      for (auto& t : warps) t.join();
    }
}

template <class T>
std::vector<T> random_values(std::size_t n, std::uint64_t seed) {
  const philox_stream st{seed, 0};
  std::vector<T> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = T(2.0f * st.uniform(i) - 1.0f);
  return out;
}

// max |got − want| / max |want|: relative to the tensor's scale, so small gradients are
// not held to an absolute bound (a NaN or infinity counts as the worst).
template <class T>
double worst(const std::vector<T>& got, const tensor<f32>& want) {
  REQUIRE(static_cast<std::int64_t>(got.size()) == want.numel());
  double w = 0, scale = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = float(got[i]), r = want.data()[i];
    const double e = std::isfinite(g) ? std::abs(g - r) : HUGE_VAL;
    w = std::max(w, e);
    scale = std::max(scale, std::abs(r));
  }
  REQUIRE(scale > 0);
  return w / scale;
}

// The two sets of block programs, as the launches in kernels/attention.cu call them.
template <int D>
struct staged {
  static constexpr const char* name = "staged tiles (wmma)";
  static constexpr int forward_warps = 4, dq_warps = 4, dkv_warps = 8;
  using z = fl::sizes<D>;
  static constexpr int forward_bytes = z::forward, dq_bytes = z::dq, dkv_bytes = z::dkv;
  template <class... A>
  static void forward(const host_block& c, A&&... a) {
    fl::forward_block<D, forward_warps>(c, std::forward<A>(a)...);
  }
  template <class... A>
  static void dq(const host_block& c, A&&... a) {
    fl::dq_block<D, dq_warps>(c, std::forward<A>(a)...);
  }
  template <class... A>
  static void dkv(const host_block& c, A&&... a) {
    fl::dkv_block<D, dkv_warps>(c, std::forward<A>(a)...);
  }
};
template <int D>
struct registers {
  static constexpr const char* name = "registers (mma.sync)";
  static constexpr int forward_warps = fl::reg::warps, dq_warps = fl::reg::warps, dkv_warps = fl::reg::warps;
  using z = fl::reg::sizes<D>;
  static constexpr int forward_bytes = z::forward, dq_bytes = z::dq, dkv_bytes = z::dkv;
  template <class... A>
  static void forward(const host_block& c, A&&... a) {
    fl::reg::forward_block<D>(c, std::forward<A>(a)...);
  }
  template <class... A>
  static void dq(const host_block& c, A&&... a) {
    fl::reg::dq_block<D>(c, std::forward<A>(a)...);
  }
  template <class... A>
  static void dkv(const host_block& c, A&&... a) {
    fl::reg::dkv_block<D>(c, std::forward<A>(a)...);
  }
};

struct shape_case {
  std::int64_t batch, q_len, kv_len, q_heads, kv_heads;
  float dropout_p;
};

// Forward and backward through the block programs against ops::attention in f32 on the
// same 16-bit inputs. tol, on max |error| / max |value|: the input type's rounding of P
// and of the outputs (measured: bf16 ≤ 3.4e-3, f16 ≤ 4.7e-4 on these cases).
template <class T, class Mask, int D, template <int> class Program>
void check_program(const shape_case& c, double tol) {
  using P = Program<D>;
  const std::int64_t B = c.batch, Tq = c.q_len, S = c.kv_len, Hq = c.q_heads, Hkv = c.kv_heads;
  const auto q = random_values<T>(B * Tq * Hq * D, 70), k = random_values<T>(B * S * Hkv * D, 71),
             v = random_values<T>(B * S * Hkv * D, 72), dout = random_values<T>(B * Tq * Hq * D, 73);
  auto f32_of = [](const std::vector<T>& x, shape sh) {
    tensor<f32> t(sh);
    for (std::size_t i = 0; i < x.size(); ++i) t.data()[i] = float(x[i]);
    return t;
  };
  var<f32> vq(f32_of(q, {B, Tq, Hq, D}), true), vk(f32_of(k, {B, S, Hkv, D}), true),
      vv(f32_of(v, {B, S, Hkv, D}), true);
  ops::attention_options opt;
  opt.dropout_p = c.dropout_p;
  opt.rng = philox_stream{0xf1a5, 3};
  auto out = ops::attention<Mask>(vq, vk, vv, opt);
  out.backward(f32_of(dout, {B, Tq, Hq, D}));

  cuda_kernels::attention_dims d;
  d.batch = B, d.q_len = Tq, d.kv_len = S, d.q_heads = Hq, d.kv_heads = Hkv, d.head_dim = D;
  d.q_offset = S - Tq;
  d.scale = 1.0f / std::sqrt(float(D));
  d.dropout_p = c.dropout_p;
  d.rng = opt.rng;
  using DM = typename ops::mask::device_form<Mask>::type;
  const DM dm = ops::mask::device_form<Mask>::make();
  std::vector<T> o(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(B * Hq * Tq, NAN), delta(B * Hq * Tq);
  const std::int64_t qtiles = (Tq + fl::br - 1) / fl::br, ktiles = (S + fl::bc - 1) / fl::bc;
  run_grid<P::forward_warps>(qtiles, B * Hq, P::forward_bytes,
                             [&](const host_block& ctx, unsigned char* smem, auto bx, auto by) {
                               P::forward(ctx, smem, bx, by, q.data(), k.data(), v.data(), o.data(), lse.data(), d, dm);
                             });
  // Δ = rowsum(dO∘O), as attention_delta_kernel computes it.
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Tq; ++i) {
        float s = 0;
        for (int x = 0; x < D; ++x) {
          const auto e = fl::at(b, i, h, Tq, Hq, D) + x;
          s += float(dout[e]) * float(o[e]);
        }
        delta[(b * Hq + h) * Tq + i] = s;
      }
  run_grid<P::dq_warps>(qtiles, B * Hq, P::dq_bytes, [&](const host_block& ctx, unsigned char* smem, auto bx, auto by) {
    P::dq(ctx, smem, bx, by, q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), dq.data(), d, dm);
  });
  run_grid<P::dkv_warps>(ktiles, B * Hkv, P::dkv_bytes,
                         [&](const host_block& ctx, unsigned char* smem, auto bx, auto by) {
                           P::dkv(ctx, smem, bx, by, q.data(), k.data(), v.data(), dout.data(), lse.data(),
                                  delta.data(), dk.data(), dv.data(), d, dm);
                         });
  for (float x : lse) REQUIRE(std::isfinite(x));  // every row sees at least its own key
  const double eo = worst(o, out.value()), eq = worst(dq, vq.grad()), ek = worst(dk, vk.grad()),
               ev = worst(dv, vv.grad());
  INFO(P::name, ": O ", eo, ", dQ ", eq, ", dK ", ek, ", dV ", ev, " (tolerance ", tol, ")");
  CHECK(eo <= tol);
  CHECK(eq <= tol);
  CHECK(ek <= tol);
  CHECK(ev <= tol);
}
template <class T, class Mask, int D>
void check_against_cpu(const shape_case& c, double tol) {
  check_program<T, Mask, D, staged>(c, tol);
  check_program<T, Mask, D, registers>(c, tol);
}

}  // namespace

TEST_CASE("flash tiles: causal, grouped-query heads, partial tiles (bf16, D 64)") {
  check_against_cpu<bf16, ops::mask::causal, 64>({2, 130, 130, 4, 2, 0.0f}, 1e-2);
}
TEST_CASE("flash tiles: no mask after 80 cached keys, dropout 0.1 (f16, D 128)") {
  check_against_cpu<f16, ops::mask::none, 128>({1, 70, 150, 2, 1, 0.1f}, 1.5e-3);
}
TEST_CASE("flash tiles: local<7> skips the tiles no row sees (bf16, D 64)") {
  check_against_cpu<bf16, ops::mask::local<7>, 64>({1, 200, 200, 2, 2, 0.0f}, 1e-2);
}
TEST_CASE("flash tiles: strided<5> with 7 cached keys, 4 query heads on one key head (bf16, D 128)") {
  check_against_cpu<bf16, ops::mask::strided<5>, 128>({1, 70, 77, 4, 1, 0.0f}, 1e-2);
}
TEST_CASE("flash tiles: 24 queries after 76 cached keys, causal, dropout (f16, D 64)") {
  check_against_cpu<f16, ops::mask::causal, 64>({2, 24, 100, 2, 2, 0.2f}, 1.5e-3);
}
TEST_CASE("flash tiles: shared memory fits the sm_80 block limit (163 KB); D 64 also fits sm_86 (99 KB)") {
  CHECK(fl::sizes<128>::forward <= 166912);
  CHECK(fl::sizes<128>::dq <= 166912);
  CHECK(fl::sizes<128>::dkv <= 166912);
  CHECK(fl::sizes<64>::dkv < fl::sizes<128>::dkv);
  // sm_86/sm_89 blocks opt into 99 KB: D 64 fits there; D 128 falls back to the reference
  // kernels (kernels/attention.cu reads the device's limit).
  CHECK(std::max({fl::sizes<64>::forward, fl::sizes<64>::dq, fl::sizes<64>::dkv}) <= 101376);
  CHECK(fl::sizes<128>::forward > 101376);
}

}  // namespace test_flash_tiles
