// kiln/ops/cpu/tile_gemm.hpp — register-blocked products of small tiles held in L1.
//
// c[i, j] (+)= Σ_k a(i, k) · b[k, j] for the 32×32×D tiles of the attention kernels.
// a is read one scalar at a time through two free strides (so a tile or its transpose
// serve alike), b row by row (its rows must be contiguous), c row by row.
//
// Why not Eigen's product: at these sizes Eigen's GEMM spends as much time packing both
// operands into its panel layout as multiplying them (bench/gpt_train.cpp profile: packing
// 3.4% of a step against 7.2% in the kernel). Here nothing is packed: each step of k
// loads NV vectors of b's row and broadcasts R scalars of a's column into R·NV
// accumulators (8×2 for f32 on AVX-512: 16 of the 32 vector registers, 10 loads per 16
// FMAs, so the FMA ports bound it, not the loads). Columns past the last whole vector
// take a scalar loop; at head dimensions 32, 64 and 128 there are none.
// The summation order over k is fixed (k ascending), so results are deterministic.
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace kiln::ops::cpu {

namespace detail {
template <class C>
using tile_packet = typename Eigen::internal::packet_traits<C>::type;

template <int R, int NV, class C>
void tile_gemm_block(std::int64_t kk, const C* a, std::int64_t ars, std::int64_t acs, const C* b, std::int64_t ldb,
                     C* c, std::int64_t ldc, bool accumulate) {
  namespace ei = Eigen::internal;
  using P = tile_packet<C>;
  constexpr std::int64_t W = ei::packet_traits<C>::size;
  P acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? ei::ploadu<P>(c + r * ldc + v * W) : ei::pset1<P>(C(0));
  for (std::int64_t k = 0; k < kk; ++k) {
    P bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = ei::ploadu<P>(b + k * ldb + v * W);
    const C* ak = a + k * acs;
    for (int r = 0; r < R; ++r) {
      const P s = ei::pset1<P>(ak[r * ars]);
      for (int v = 0; v < NV; ++v) acc[r][v] = ei::pmadd(s, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) ei::pstoreu(c + r * ldc + v * W, acc[r][v]);
}

// All m rows of the column strip [j, j + NV·W).
template <int NV, class C>
void tile_gemm_strip(std::int64_t m, std::int64_t kk, const C* a, std::int64_t ars, std::int64_t acs, const C* b,
                     std::int64_t ldb, C* c, std::int64_t ldc, bool accumulate) {
  std::int64_t i = 0;
  for (; i + 8 <= m; i += 8) tile_gemm_block<8, NV>(kk, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i + 4 <= m; i += 4) tile_gemm_block<4, NV>(kk, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < m; ++i) tile_gemm_block<1, NV>(kk, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
}
}  // namespace detail

// c[i·ldc + j] = (accumulate ? c[i·ldc + j] : 0) + Σ_{k<kk} a[i·ars + k·acs] · b[k·ldb + j]
// for i < m, j < n.
template <class C>
void tile_gemm(std::int64_t m, std::int64_t n, std::int64_t kk, const C* a, std::int64_t ars, std::int64_t acs,
               const C* b, std::int64_t ldb, C* c, std::int64_t ldc, bool accumulate) {
  constexpr std::int64_t W = Eigen::internal::packet_traits<C>::size;
  std::int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) detail::tile_gemm_strip<2>(m, kk, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  for (; j + W <= n; j += W) detail::tile_gemm_strip<1>(m, kk, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  for (; j < n; ++j)
    for (std::int64_t i = 0; i < m; ++i) {
      C s = accumulate ? c[i * ldc + j] : C(0);
      for (std::int64_t k = 0; k < kk; ++k) s += a[i * ars + k * acs] * b[k * ldb + j];
      c[i * ldc + j] = s;
    }
}

}  // namespace kiln::ops::cpu
