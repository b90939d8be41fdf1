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
// (five GEMMs, one a recomputation); tiles are 32×32×D, small enough for L1, so the
// kernel runs at Eigen's small-GEMM rate (~100 GFLOP/s per core here at D = 64). 32 over
// 64: under a causal mask a T = 128 sequence computes 10 of 16 tiles instead of 3 of 4, and the work splits
// into more tasks (bench/gpt_train.cpp: 65-66 ms → 58-61 ms per step on 2 threads).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/ops/attention_mask.hpp"
#include "kiln/ops/grad_write.hpp"

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

template <class C>
using attn_mat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class C>
using attn_cmap = Eigen::Map<const attn_mat<C>, Eigen::Unaligned, Eigen::OuterStride<>>;

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

// Sets masked entries of the tile (rows from absolute position p0, keys from j0) to -inf.
template <attention_mask M, class Tile>
void apply_mask(Tile& s, std::int64_t p0, std::int64_t j0) {
  const std::int64_t nq = s.rows(), nk = s.cols();
  if (M::dense(p0, p0 + nq - 1, j0, j0 + nk - 1)) return;
  using C = typename Tile::Scalar;
  for (std::int64_t r = 0; r < nq; ++r)
    for (std::int64_t c = 0; c < nk; ++c)
      if (!M::allowed(p0 + r, j0 + c)) s(r, c) = -std::numeric_limits<C>::infinity();
}

// Multiplies the tile by the dropout keep-mask scaled by 1/(1-p).
template <class Tile>
void apply_dropout(Tile& p, const attention_dims& d, std::int64_t b, std::int64_t h, std::int64_t i0, std::int64_t j0) {
  using C = typename Tile::Scalar;
  const C keep_scale = C(1) / (C(1) - C(d.dropout_p));
  for (std::int64_t r = 0; r < p.rows(); ++r)
    for (std::int64_t c = 0; c < p.cols(); ++c)
      p(r, c) = d.rng.uniform(d.rng_index(b, h, i0 + r, j0 + c)) < d.dropout_p ? C(0) : p(r, c) * keep_scale;
}
}  // namespace detail

// o = softmax(scale·q·kᵀ masked)·v; lse [B, Hq, T] receives the row log-sum-exp.
template <attention_mask M, class C>
void attention_forward(const attention_dims& d, heads_view<const C> q, heads_view<const C> k, heads_view<const C> v,
                       heads_view<C> o, C* lse) {
  using namespace detail;
  using mat = attn_mat<C>;
  const std::int64_t D = d.head_dim, T = d.q_len, S = d.kv_len, Hq = d.q_heads, group = d.q_heads / d.kv_heads;
  const std::int64_t nqb = (T + attn_block_q - 1) / attn_block_q;
  cpu_runtime::ensure_initialised();
  cpu_runtime::parallel_for(d.batch * Hq * nqb, 1, [&](std::int64_t t0, std::int64_t t1) {
    mat tile(attn_block_q, attn_block_k), acc(attn_block_q, D);
    std::vector<C> m(attn_block_q), l(attn_block_q);
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t b = task / (Hq * nqb), h = (task / nqb) % Hq, i0 = (task % nqb) * attn_block_q;
      const std::int64_t nq = std::min(attn_block_q, T - i0), kvh = h / group, p0 = d.q_offset + i0;
      attn_cmap<C> Q(q.at(b, i0, h, D), nq, D, Eigen::OuterStride<>(q.pos_stride));
      auto A = acc.topRows(nq);
      A.setZero();
      std::fill(m.begin(), m.end(), -std::numeric_limits<C>::infinity());
      std::fill(l.begin(), l.end(), C(0));
      std::int64_t kb, ke;
      key_range<M>(p0, p0 + nq - 1, S, kb, ke);
      for (std::int64_t j0 = kb; j0 < ke; j0 += attn_block_k) {
        const std::int64_t nk = std::min(attn_block_k, ke - j0);
        attn_cmap<C> K(k.at(b, j0, kvh, D), nk, D, Eigen::OuterStride<>(k.pos_stride));
        attn_cmap<C> V(v.at(b, j0, kvh, D), nk, D, Eigen::OuterStride<>(v.pos_stride));
        auto P = tile.topLeftCorner(nq, nk);
        P.noalias() = (C(d.scale) * Q) * K.transpose();
        apply_mask<M>(P, p0, j0);
        for (std::int64_t r = 0; r < nq; ++r) {
          const C mx = P.row(r).maxCoeff();
          if (mx == -std::numeric_limits<C>::infinity()) {  // nothing visible in this tile
            P.row(r).setZero();
            continue;
          }
          const C mnew = std::max(m[r], mx);
          const C corr = std::exp(m[r] - mnew);  // 0 on the first visible tile (m = -inf)
          P.row(r) = (P.row(r).array() - mnew).exp().matrix();
          l[r] = l[r] * corr + P.row(r).sum();
          A.row(r) *= corr;
          m[r] = mnew;
        }
        if (d.dropout()) apply_dropout(P, d, b, h, i0, j0);
        A.noalias() += P * V;
      }
      for (std::int64_t r = 0; r < nq; ++r) {
        C* out = o.at(b, i0 + r, h, D);
        C* row_lse = lse + (b * Hq + h) * T + i0 + r;
        if (l[r] > C(0)) {
          const C inv = C(1) / l[r];
          for (std::int64_t c = 0; c < D; ++c) out[c] = A(r, c) * inv;
          *row_lse = m[r] + std::log(l[r]);
        } else {
          for (std::int64_t c = 0; c < D; ++c) out[c] = C(0);
          *row_lse = -std::numeric_limits<C>::infinity();
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
  using mat = attn_mat<C>;
  const std::int64_t D = d.head_dim, T = d.q_len, S = d.kv_len, Hq = d.q_heads, Hkv = d.kv_heads;
  const std::int64_t group = Hq / Hkv, nqb = (T + attn_block_q - 1) / attn_block_q;
  cpu_runtime::ensure_initialised();
  cpu_runtime::parallel_for(d.batch * Hkv, 1, [&](std::int64_t t0, std::int64_t t1) {
    mat dK(S, D), dV(S, D), dQ(attn_block_q, D), P(attn_block_q, attn_block_k), dP(attn_block_q, attn_block_k);
    mat Z(attn_block_q, attn_block_k);
    std::vector<C> delta(attn_block_q);
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t b = task / Hkv, kvh = task % Hkv;
      dK.setZero();
      dV.setZero();
      for (std::int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (std::int64_t qb = 0; qb < nqb; ++qb) {
          const std::int64_t i0 = qb * attn_block_q, nq = std::min(attn_block_q, T - i0), p0 = d.q_offset + i0;
          attn_cmap<C> Q(q.at(b, i0, h, D), nq, D, Eigen::OuterStride<>(q.pos_stride));
          attn_cmap<C> O(o.at(b, i0, h, D), nq, D, Eigen::OuterStride<>(o.pos_stride));
          attn_cmap<C> dO(dout.at(b, i0, h, D), nq, D, Eigen::OuterStride<>(dout.pos_stride));
          const C* L = lse + (b * Hq + h) * T + i0;
          for (std::int64_t r = 0; r < nq; ++r) delta[r] = dO.row(r).dot(O.row(r));
          auto dQb = dQ.topRows(nq);
          dQb.setZero();
          std::int64_t kb, ke;
          key_range<M>(p0, p0 + nq - 1, S, kb, ke);
          for (std::int64_t j0 = kb; j0 < ke; j0 += attn_block_k) {
            const std::int64_t nk = std::min(attn_block_k, ke - j0);
            attn_cmap<C> K(k.at(b, j0, kvh, D), nk, D, Eigen::OuterStride<>(k.pos_stride));
            attn_cmap<C> V(v.at(b, j0, kvh, D), nk, D, Eigen::OuterStride<>(v.pos_stride));
            auto Pt = P.topLeftCorner(nq, nk);
            auto dPt = dP.topLeftCorner(nq, nk);
            Pt.noalias() = (C(d.scale) * Q) * K.transpose();
            apply_mask<M>(Pt, p0, j0);
            for (std::int64_t r = 0; r < nq; ++r) {
              if (L[r] == -std::numeric_limits<C>::infinity())
                Pt.row(r).setZero();
              else
                Pt.row(r) = (Pt.row(r).array() - L[r]).exp().matrix();
            }
            dPt.noalias() = dO * V.transpose();
            if (d.dropout()) {
              auto Zt = Z.topLeftCorner(nq, nk);
              Zt.setOnes();
              apply_dropout(Zt, d, b, h, i0, j0);
              dV.middleRows(j0, nk).noalias() += Pt.cwiseProduct(Zt).transpose() * dO;
              dPt = dPt.cwiseProduct(Zt);
            } else {
              dV.middleRows(j0, nk).noalias() += Pt.transpose() * dO;
            }
            for (std::int64_t r = 0; r < nq; ++r)
              dPt.row(r).array() = Pt.row(r).array() * (dPt.row(r).array() - delta[r]);
            dQb.noalias() += C(d.scale) * (dPt * K);
            dK.middleRows(j0, nk).noalias() += C(d.scale) * (dPt.transpose() * Q);
          }
          if (dq.data)
            for (std::int64_t r = 0; r < nq; ++r) {
              C* dst = dq.at(b, i0 + r, h, D);
              for (std::int64_t c = 0; c < D; ++c) store_grad(dst[c], dQb(r, c), mq);
            }
        }
      }
      for (std::int64_t j = 0; j < S; ++j) {
        if (dk.data) {
          C* dst = dk.at(b, j, kvh, D);
          for (std::int64_t c = 0; c < D; ++c) store_grad(dst[c], dK(j, c), mk);
        }
        if (dv.data) {
          C* dst = dv.at(b, j, kvh, D);
          for (std::int64_t c = 0; c < D; ++c) store_grad(dst[c], dV(j, c), mv);
        }
      }
    }
  });
}

}  // namespace kiln::ops::cpu
