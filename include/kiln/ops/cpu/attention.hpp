// kiln/ops/cpu/attention.hpp — memory-efficient scaled dot-product attention on the CPU.
//
// Layout: q [B, T, Hq, D], k and v [B, S, Hkv, D], o [B, T, Hq, D] — the layout a fused
// QKV projection produces, so no transpose is needed. Within a row, heads are adjacent
// (stride D) and D is contiguous; the batch and position strides are free, so a KV cache
// slice or a column slice of a packed QKV tensor is read in place.
//
// Forward (online softmax, Milakov & Gimelshein 2018; FlashAttention's tiling): for each
// (batch, query head, block of 32 queries) the keys are visited in blocks of 32. A tile
// S = scale·Q·Kᵀ is masked, the running row maximum m and normaliser l are updated, and
// the output accumulator is rescaled and advanced by P·V. Only O and the row
// log-sum-exp L = m + log l are kept: 4 bytes per query row instead of a T×S matrix.
// Backward (FlashAttention-2): with Δ = rowsum(dO ∘ O), each tile recomputes
// P = exp(S − L), then dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − Δ), dQ += scale·dS·K,
// dK += scale·dSᵀ·Q. Work is split by (batch, KV head) so the query heads that share a
// KV head (GQA) add into one dK/dV without races.
// Dropout on the probabilities uses the counter RNG: element (b, h, i, j) draws
// uniform(((b·Hq + h)·T + i)·S + j), so backward regenerates the mask instead of storing it.
//
// Napkin math: 4·B·Hq·T·S·D FLOPs forward (two GEMMs per tile) and 2.5x that backward
// (five GEMMs, one a recomputation); tiles are 32×32×D, small enough for L1. Their
// products run in kiln/ops/cpu/tile_gemm.hpp (register-blocked, nothing packed), not in
// Eigen's GEMM, whose packing cost as much as its arithmetic at this size. 32 over 64:
// under a causal mask a T = 128 sequence computes 10 of 16 tiles instead of 3 of 4, and
// the work splits into more tasks.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/ops/cpu/tile_gemm.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

namespace kiln::ops::cpu {

// A [B, L, H, D] tensor with free batch and position strides (elements).
template <class C>
struct heads_view {
  C* data = nullptr;
  std::int64_t batch_stride = 0, pos_stride = 0;
  C* at(std::int64_t b, std::int64_t t, std::int64_t h, std::int64_t d) const {
    return data + b * batch_stride + t * pos_stride + h * d;
  }
};

struct attention_dims {
  std::int64_t batch = 0, q_len = 0, kv_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  std::int64_t q_offset = 0;  // absolute position of query 0 (keys start at 0)
  double scale = 1.0;
  float dropout_p = 0.0f;
  philox_stream rng{};
  bool dropout() const { return dropout_p > 0.0f; }
  std::uint64_t rng_index(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    return static_cast<std::uint64_t>(((b * q_heads + h) * q_len + i) * kv_len + j);
  }
};

namespace detail {
// Tile sizes (queries × keys); tests cross several tiles with T and S above 32.
inline constexpr std::int64_t attn_block_q = 32, attn_block_k = 32;

// Tiles are held transposed, [keys × queries] with row stride attn_block_q: the online
// softmax's per-query state (running max, normaliser, Δ, L) then runs along a row, so
// every step of it is a vector operation over 32 queries, and the products read the
// query side (Qᵀ, dOᵀ) from one transposed copy per query block that all key blocks share.
// Buffers are aligned and rows attn_block_q apart keep that alignment, so Eigen's
// vectorised exp runs on whole packets (an unaligned map peels up to a packet's worth of
// scalar expf calls off the front of every row: 5% of a GPT step).
template <class C>
using attn_row = Eigen::Map<Eigen::Array<C, 1, Eigen::Dynamic>, Eigen::AlignedMax>;
template <class C>
using attn_buffer = std::vector<C, Eigen::aligned_allocator<C>>;

// Keys that any query in [p0, p1] may see.
template <attention_mask M>
void key_range(std::int64_t p0, std::int64_t p1, std::int64_t s, std::int64_t& kb, std::int64_t& ke) {
  kb = s;
  ke = 0;
  for (std::int64_t p = p0; p <= p1; ++p) {
    kb = std::min<std::int64_t>(kb, M::first_key(p));
    ke = std::max<std::int64_t>(ke, M::end_key(p, s));
  }
  kb = std::max<std::int64_t>(kb, 0);
}

// Sets masked entries of the transposed tile st [nk × nq] (queries from absolute position
// p0, keys from j0) to -inf.
template <attention_mask M, class C>
void apply_mask(C* st, std::int64_t nk, std::int64_t nq, std::int64_t p0, std::int64_t j0) {
  if (M::dense(p0, p0 + nq - 1, j0, j0 + nk - 1)) return;
  for (std::int64_t j = 0; j < nk; ++j)
    for (std::int64_t r = 0; r < nq; ++r)
      if (!M::allowed(p0 + r, j0 + j)) st[j * attn_block_q + r] = -std::numeric_limits<C>::infinity();
}

// Multiplies the transposed tile by the dropout keep-mask scaled by 1/(1-p).
template <class C>
void apply_dropout(C* pt, std::int64_t nk, std::int64_t nq, const attention_dims& d, std::int64_t b, std::int64_t h,
                   std::int64_t i0, std::int64_t j0) {
  const C keep_scale = C(1) / (C(1) - C(d.dropout_p));
  for (std::int64_t j = 0; j < nk; ++j)
    for (std::int64_t r = 0; r < nq; ++r) {
      C& x = pt[j * attn_block_q + r];
      x = d.rng.uniform(d.rng_index(b, h, i0 + r, j0 + j)) < d.dropout_p ? C(0) : x * keep_scale;
    }
}

// dst[c·attn_block_q + r] = alpha · rows[r·stride + c]: nq rows of D values, transposed.
template <class C>
void transpose_rows(const C* rows, std::int64_t stride, std::int64_t nq, std::int64_t D, C alpha, C* dst) {
  for (std::int64_t r = 0; r < nq; ++r)
    for (std::int64_t c = 0; c < D; ++c) dst[c * attn_block_q + r] = alpha * rows[r * stride + c];
}
}  // namespace detail

// o = softmax(scale·q·kᵀ masked)·v; lse [B, Hq, T] receives the row log-sum-exp.
template <attention_mask M, class C>
void attention_forward(const attention_dims& d, heads_view<const C> q, heads_view<const C> k, heads_view<const C> v,
                       heads_view<C> o, C* lse) {
  using namespace detail;
  constexpr std::int64_t BQ = attn_block_q, BK = attn_block_k;
  constexpr C inf = std::numeric_limits<C>::infinity();
  const std::int64_t D = d.head_dim, T = d.q_len, S = d.kv_len, Hq = d.q_heads, group = d.q_heads / d.kv_heads;
  const std::int64_t nqb = (T + BQ - 1) / BQ;
  cpu_runtime::ensure_initialised();
  cpu_runtime::parallel_for(d.batch * Hq * nqb, 1, [&](std::int64_t t0, std::int64_t t1) {
    attn_buffer<C> qt(D * BQ), st(BK * BQ), acc(BQ * D), m(BQ), l(BQ), shift(BQ), corr(BQ);
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t b = task / (Hq * nqb), h = (task / nqb) % Hq, i0 = (task % nqb) * BQ;
      const std::int64_t nq = std::min(BQ, T - i0), kvh = h / group, p0 = d.q_offset + i0;
      transpose_rows(q.at(b, i0, h, D), q.pos_stride, nq, D, C(d.scale), qt.data());
      std::fill(acc.begin(), acc.end(), C(0));
      std::fill(m.begin(), m.end(), -inf);
      std::fill(l.begin(), l.end(), C(0));
      std::int64_t kb, ke;
      key_range<M>(p0, p0 + nq - 1, S, kb, ke);
      for (std::int64_t j0 = kb; j0 < ke; j0 += BK) {
        const std::int64_t nk = std::min(BK, ke - j0);
        // Sᵀ[j, r] = K[j0 + j] · (scale·Q[r])
        tile_gemm(nk, nq, D, k.at(b, j0, kvh, D), k.pos_stride, std::int64_t{1}, qt.data(), BQ, st.data(), BQ, false);
        apply_mask<M>(st.data(), nk, nq, p0, j0);
        for (std::int64_t r = 0; r < nq; ++r) shift[r] = m[r];
        for (std::int64_t j = 0; j < nk; ++j)
          for (std::int64_t r = 0; r < nq; ++r) shift[r] = std::max(shift[r], st[j * BQ + r]);
        for (std::int64_t r = 0; r < nq; ++r) {
          // A query that has seen no key yet keeps m = -inf: its column is all -inf,
          // exp(-inf - 0) = 0, and its zero accumulator stays zero.
          const bool none = shift[r] == -inf;
          corr[r] = none ? C(1) : std::exp(m[r] - shift[r]);  // 0 on the first visible tile (m = -inf)
          m[r] = shift[r];
          if (none) shift[r] = C(0);
          l[r] *= corr[r];
        }
        const attn_row<C> sh(shift.data(), nq);
        for (std::int64_t j = 0; j < nk; ++j) {
          attn_row<C> row(st.data() + j * BQ, nq);
          row = (row - sh).exp();
        }
        for (std::int64_t j = 0; j < nk; ++j)
          for (std::int64_t r = 0; r < nq; ++r) l[r] += st[j * BQ + r];
        for (std::int64_t r = 0; r < nq; ++r)
          if (corr[r] != C(1))
            for (std::int64_t c = 0; c < D; ++c) acc[r * D + c] *= corr[r];
        if (d.dropout()) apply_dropout(st.data(), nk, nq, d, b, h, i0, j0);
        // acc[r] += Σ_j P[r, j]·V[j0 + j]
        tile_gemm(nq, D, nk, st.data(), std::int64_t{1}, BQ, v.at(b, j0, kvh, D), v.pos_stride, acc.data(), D, true);
      }
      for (std::int64_t r = 0; r < nq; ++r) {
        C* out = o.at(b, i0 + r, h, D);
        C* row_lse = lse + (b * Hq + h) * T + i0 + r;
        if (l[r] != C(0)) {  // a NaN normaliser (a NaN score) gives a NaN row, not a zero one
          const C inv = C(1) / l[r];
          for (std::int64_t c = 0; c < D; ++c) out[c] = acc[r * D + c] * inv;
          *row_lse = m[r] + std::log(l[r]);
        } else {
          for (std::int64_t c = 0; c < D; ++c) out[c] = C(0);
          *row_lse = -inf;
        }
      }
    }
  });
}

// Gradients of attention_forward, written through [B, ·, H, D] views (each element once,
// so a view into one packed QKV gradient works); a view with null data is not computed.
template <attention_mask M, class C>
void attention_backward(const attention_dims& d, heads_view<const C> q, heads_view<const C> k, heads_view<const C> v,
                        heads_view<const C> o, heads_view<const C> dout, const C* lse, heads_view<C> dq, grad_write mq,
                        heads_view<C> dk, grad_write mk, heads_view<C> dv, grad_write mv) {
  using namespace detail;
  constexpr std::int64_t BQ = attn_block_q, BK = attn_block_k, one = 1;
  constexpr C inf = std::numeric_limits<C>::infinity();
  const std::int64_t D = d.head_dim, T = d.q_len, S = d.kv_len, Hq = d.q_heads, Hkv = d.kv_heads;
  const std::int64_t group = Hq / Hkv, nqb = (T + BQ - 1) / BQ;
  const C scale = C(d.scale);
  cpu_runtime::ensure_initialised();
  cpu_runtime::parallel_for(d.batch * Hkv, 1, [&](std::int64_t t0, std::int64_t t1) {
    attn_buffer<C> dK(S * D), dV(S * D), dQ(BQ * D), qt(D * BQ), dot(D * BQ);
    attn_buffer<C> pt(BK * BQ), dpt(BK * BQ), zt(BK * BQ), delta(BQ), lsub(BQ);
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t b = task / Hkv, kvh = task % Hkv;
      std::fill(dK.begin(), dK.end(), C(0));
      std::fill(dV.begin(), dV.end(), C(0));
      for (std::int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (std::int64_t qb = 0; qb < nqb; ++qb) {
          const std::int64_t i0 = qb * BQ, nq = std::min(BQ, T - i0), p0 = d.q_offset + i0;
          const C* Q = q.at(b, i0, h, D);
          const C* dO = dout.at(b, i0, h, D);
          const C* L = lse + (b * Hq + h) * T + i0;
          transpose_rows(Q, q.pos_stride, nq, D, scale, qt.data());
          transpose_rows(dO, dout.pos_stride, nq, D, C(1), dot.data());
          for (std::int64_t r = 0; r < nq; ++r) {
            const C* orow = o.at(b, i0 + r, h, D);
            C s = 0;
            for (std::int64_t c = 0; c < D; ++c) s += dO[r * dout.pos_stride + c] * orow[c];
            delta[r] = s;
            lsub[r] = L[r] == -inf ? inf : L[r];  // a query that saw no key: P = exp(· − inf) = 0
          }
          std::fill(dQ.begin(), dQ.end(), C(0));
          const attn_row<C> lrow(lsub.data(), nq), drow(delta.data(), nq);
          std::int64_t kb, ke;
          key_range<M>(p0, p0 + nq - 1, S, kb, ke);
          for (std::int64_t j0 = kb; j0 < ke; j0 += BK) {
            const std::int64_t nk = std::min(BK, ke - j0);
            const C* K = k.at(b, j0, kvh, D);
            const C* V = v.at(b, j0, kvh, D);
            // Pᵀ = exp(Sᵀ − L), dPᵀ[j, r] = V[j0 + j] · dO[r]
            tile_gemm(nk, nq, D, K, k.pos_stride, one, qt.data(), BQ, pt.data(), BQ, false);
            apply_mask<M>(pt.data(), nk, nq, p0, j0);
            for (std::int64_t j = 0; j < nk; ++j) {
              attn_row<C> row(pt.data() + j * BQ, nq);
              row = (row - lrow).exp();
            }
            tile_gemm(nk, nq, D, V, v.pos_stride, one, dot.data(), BQ, dpt.data(), BQ, false);
            // dV[j0 + j] += Σ_r (P∘Z)[r, j]·dO[r], with Z the dropout keep-mask (scaled)
            const C* pv = pt.data();
            if (d.dropout()) {
              for (std::int64_t j = 0; j < nk; ++j)
                for (std::int64_t r = 0; r < nq; ++r) zt[j * BQ + r] = C(1);
              apply_dropout(zt.data(), nk, nq, d, b, h, i0, j0);
              for (std::int64_t j = 0; j < nk; ++j)
                for (std::int64_t r = 0; r < nq; ++r) {
                  dpt[j * BQ + r] *= zt[j * BQ + r];
                  zt[j * BQ + r] *= pt[j * BQ + r];
                }
              pv = zt.data();
            }
            tile_gemm(nk, D, nq, pv, BQ, one, dO, dout.pos_stride, dV.data() + j0 * D, D, true);
            // dSᵀ = scale · Pᵀ ∘ (dPᵀ − Δ)
            for (std::int64_t j = 0; j < nk; ++j) {
              attn_row<C> ds(dpt.data() + j * BQ, nq);
              const attn_row<C> p(pt.data() + j * BQ, nq);
              ds = scale * p * (ds - drow);
            }
            // dQ[r] += Σ_j dS[r, j]·K[j0 + j];  dK[j0 + j] += Σ_r dS[r, j]·Q[r]
            tile_gemm(nq, D, nk, dpt.data(), one, BQ, K, k.pos_stride, dQ.data(), D, true);
            tile_gemm(nk, D, nq, dpt.data(), BQ, one, Q, q.pos_stride, dK.data() + j0 * D, D, true);
          }
          if (dq.data)
            for (std::int64_t r = 0; r < nq; ++r) {
              C* dst = dq.at(b, i0 + r, h, D);
              for (std::int64_t c = 0; c < D; ++c) store_grad(dst[c], dQ[r * D + c], mq);
            }
        }
      }
      for (std::int64_t j = 0; j < S; ++j) {
        if (dk.data) {
          C* dst = dk.at(b, j, kvh, D);
          for (std::int64_t c = 0; c < D; ++c) store_grad(dst[c], dK[j * D + c], mk);
        }
        if (dv.data) {
          C* dst = dv.at(b, j, kvh, D);
          for (std::int64_t c = 0; c < D; ++c) store_grad(dst[c], dV[j * D + c], mv);
        }
      }
    }
  });
}

}  // namespace kiln::ops::cpu
