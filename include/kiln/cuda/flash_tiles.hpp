// kiln/cuda/flash_tiles.hpp — the tensor-core attention kernels' block programs, written
// once for two compilers: nvcc runs them as CUDA blocks (kernels/attention.cu), g++ runs
// them on host threads standing in for the warps (tests/ops/test_flash_tiles.cpp), so the
// tiling, masking, online softmax, dropout and grouped-query bookkeeping are tested on
// every CPU machine, not only where a GPU is lent.
//
// Algorithm (FlashAttention-2, Dao 2023), for 16-bit q, k, v with head dimension D of 64
// or 128, Br = Bc = 64 rows per tile:
//   forward, one block per (64 queries, batch·query head): Q stays in shared memory;
//     per key tile, S = Q·Kᵀ on tensor cores (f32 accumulate), a row pass keeps the
//     running max m and normaliser l and writes P = exp(scale·S − m) (dropped out, 16-bit),
//     O (f32, shared memory) is rescaled by exp(m_old − m_new) and advanced by P·V on
//     tensor cores. O/l and the log-sum-exp m + log l are written at the end.
//   dQ, one block per (64 queries, batch·query head): per key tile S = Q·Kᵀ and
//     dP = dO·Vᵀ, dS = P∘(dP∘Z − Δ) with P = exp(scale·S − L), dQ += dS·K with the dQ
//     accumulators held in the warps' registers for the whole sweep.
//   dK and dV, one block per (64 keys, batch·key/value head): every query tile of every
//     query head of the group passes through, dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q in
//     registers; so grouped-query heads sum without atomics and the result is the same
//     run to run.
// Each 16×16×16 product is a warp's; a block is W warps that deal the output tiles of a
// product among themselves (tile t to warp t mod W), the forward's softmax rows (a warp
// per row, its lanes across the keys, shuffles for the row's max and sum) and every
// element-wise pass among their threads; a barrier separates the phases. The block
// context (Ctx) gives tid, nthreads, warp, nwarps, lane, lanes, sync(), warp_sync(),
// warp_max() and warp_sum(); on the host a warp is one thread (lanes = 1). The probabilities are rounded to the
// input type before their products, as FlashAttention does; everything else is f32.
// Masks are kiln::ops::mask's device forms; a tile no row may see is skipped whole.
//
// Shared memory (bytes, D = 128): forward 113 KB, dQ 112 KB, dK/dV 121 KB — over the 48 KB
// default, so the launches raise the block's limit (sm_80 allows 163 KB).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kiln/core/config.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define KILN_TILE_FN __device__ __forceinline__
#else
#define KILN_TILE_FN inline
#endif

namespace kiln::cuda_kernels::flash {

inline constexpr int br = 64, bc = 64;  // query rows, key rows per tile

// ---- element conversions: CUDA's 16-bit types on the device, kiln's (Eigen's) on the host
#if defined(__CUDACC__)
KILN_TILE_FN float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
KILN_TILE_FN float to_f32(__half x) { return __half2float(x); }
KILN_TILE_FN void store_as(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
KILN_TILE_FN void store_as(__half* p, float x) { *p = __float2half_rn(x); }
KILN_TILE_FN float exp_f(float x) { return __expf(x); }
KILN_TILE_FN float log_f(float x) { return __logf(x); }
#else
inline float to_f32(bf16 x) { return static_cast<float>(x); }
inline float to_f32(f16 x) { return static_cast<float>(x); }
inline void store_as(bf16* p, float x) { *p = bf16(x); }
inline void store_as(f16* p, float x) { *p = f16(x); }
inline float exp_f(float x) { return std::exp(x); }
inline float log_f(float x) { return std::log(x); }
#endif

// ---- 16×16×16 warp products: wmma on the device, scalar loops on the host ----------------
// layout::row: element (r, c) at p[r·ld + c]; layout::col: at p[c·ld + r].
enum class layout { row, col };
#if defined(__CUDACC__)
using accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
KILN_TILE_FN void fill(accumulator& c, float v) { nvcuda::wmma::fill_fragment(c, v); }
KILN_TILE_FN void load(accumulator& c, const float* p, int ld) {
  nvcuda::wmma::load_matrix_sync(c, p, ld, nvcuda::wmma::mem_row_major);
}
KILN_TILE_FN void store(float* p, const accumulator& c, int ld) {
  nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
}
KILN_TILE_FN void scale(accumulator& c, float s) {
  for (int e = 0; e < c.num_elements; ++e) c.x[e] *= s;  // uniform: the element order does not matter
}
template <layout L>
using wmma_layout = std::conditional_t<L == layout::row, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
// c += A·B, A 16×16 at a, B 16×16 at b (pointers 32-byte aligned, ld a multiple of 8).
template <layout LA, layout LB, class DT>
KILN_TILE_FN void mma(accumulator& c, const DT* a, int lda, const DT* b, int ldb) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, DT, wmma_layout<LA>> fa;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, DT, wmma_layout<LB>> fb;
  nvcuda::wmma::load_matrix_sync(fa, a, lda);
  nvcuda::wmma::load_matrix_sync(fb, b, ldb);
  nvcuda::wmma::mma_sync(c, fa, fb, c);
}
#else
struct accumulator {
  float x[256];
};
inline void fill(accumulator& c, float v) {
  for (float& e : c.x) e = v;
}
inline void load(accumulator& c, const float* p, int ld) {
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) c.x[r * 16 + k] = p[r * ld + k];
}
inline void store(float* p, const accumulator& c, int ld) {
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) p[r * ld + k] = c.x[r * 16 + k];
}
inline void scale(accumulator& c, float s) {
  for (float& e : c.x) e *= s;
}
template <layout L, class DT>
float element(const DT* p, int ld, int r, int c) {
  return to_f32(L == layout::row ? p[r * ld + c] : p[c * ld + r]);
}
template <layout LA, layout LB, class DT>
void mma(accumulator& c, const DT* a, int lda, const DT* b, int ldb) {
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) s += element<LA>(a, lda, r, k) * element<LB>(b, ldb, k, n);
      c.x[r * 16 + n] = s;
    }
}
#endif

// ---- shared helpers ------------------------------------------------------------------------
// Element (b, t, h, 0) of a contiguous [B, L, H, D] buffer.
KILN_TILE_FN std::int64_t at(std::int64_t b, std::int64_t t, std::int64_t h, std::int64_t L, std::int64_t H, int D) {
  return ((b * L + t) * H + h) * D;
}
// The dropout factor of probability (b, h, i, j): 0 or 1/(1−p), from the CPU's Philox index.
KILN_TILE_FN float keep(const attention_dims& d, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  if (d.dropout_p <= 0.0f) return 1.0f;
  const auto idx = static_cast<std::uint64_t>(((b * d.q_heads + h) * d.q_len + i) * d.kv_len + j);
  return d.rng.uniform(idx) < d.dropout_p ? 0.0f : 1.0f / (1.0f - d.dropout_p);
}
// The first key any query at positions p0..p1 may see (first_key need not grow with the
// row: strided's does not).
template <class Mask>
KILN_TILE_FN std::int64_t block_first_key(const Mask& mask, std::int64_t p0, std::int64_t p1) {
  std::int64_t f = mask.first_key(p0);
  for (std::int64_t p = p0 + 1; p <= p1; ++p) {
    const std::int64_t x = mask.first_key(p);
    f = x < f ? x : f;
  }
  return f;
}
template <class Mask>
KILN_TILE_FN bool visible(const Mask& mask, const attention_dims& d, std::int64_t i, std::int64_t j) {
  if (i >= d.q_len || j >= d.kv_len) return false;
  const std::int64_t pos = d.q_offset + i;
  return j >= mask.first_key(pos) && j < mask.end_key(pos, d.kv_len) && mask.allowed(pos, j);
}
// Whether any query of rows [i0, i0+br) may see a key of [j0, j0+bc) (by the key ranges;
// a tile that passes may still be all masked, which costs time, not correctness).
template <class Mask>
KILN_TILE_FN bool tile_live(const Mask& mask, const attention_dims& d, std::int64_t i0, std::int64_t j0) {
  for (std::int64_t i = i0; i < i0 + br && i < d.q_len; ++i) {
    const std::int64_t pos = d.q_offset + i, f = mask.first_key(pos), e = mask.end_key(pos, d.kv_len);
    if ((f > j0 ? f : j0) < (e < j0 + bc ? e : j0 + bc)) return true;
  }
  return false;
}

// Copies rows [t0, t0+rows) of head h of a [B, L, H, D] buffer into a tile with row
// stride ld, zero past L, 8 elements (16 bytes) at a time: the launch checked that the
// buffers are 16-byte aligned, and D is a multiple of 8.
template <int D, class DT, class Ctx>
KILN_TILE_FN void load_tile(const Ctx& ctx, DT* tile, int ld, const DT* src, std::int64_t b, std::int64_t t0,
                            std::int64_t h, std::int64_t L, std::int64_t H, int rows) {
  constexpr int chunks = D / 8;
  for (int e = ctx.tid; e < rows * chunks; e += ctx.nthreads) {
    const int r = e / chunks, c = (e % chunks) * 8;
    const std::int64_t t = t0 + r;
    DT* dst = tile + r * ld + c;
#if defined(__CUDACC__)
    *reinterpret_cast<uint4*>(dst) =
        t < L ? *reinterpret_cast<const uint4*>(src + at(b, t, h, L, H, D) + c) : make_uint4(0, 0, 0, 0);
#else
    if (t < L)
      std::memcpy(dst, src + at(b, t, h, L, H, D) + c, 8 * sizeof(DT));
    else
      std::memset(static_cast<void*>(dst), 0, 8 * sizeof(DT));
#endif
  }
}

// Shared-memory carving: regions in bytes, each 128-byte aligned (wmma wants 32).
constexpr int align128(int n) { return (n + 127) / 128 * 128; }
template <int D>
struct sizes {
  static constexpr int ld_h = D + 8;   // 16-bit [rows, D] tiles
  static constexpr int ld_p = bc + 8;  // 16-bit [br, bc] tiles (P, dS)
  static constexpr int ld_s = bc + 4;  // f32 [br, bc] tiles (S, dP)
  static constexpr int ld_o = D + 4;   // f32 [rows, D] tiles (O, staging)
  static constexpr int half_tile = align128(br * ld_h * 2);
  static constexpr int p_tile = align128(br * ld_p * 2);
  static constexpr int s_tile = align128(br * ld_s * 4);
  static constexpr int o_tile = align128(br * ld_o * 4);
  static constexpr int rows = align128(br * 4);
  static_assert(br == bc, "the carving below assumes square tiles");
  // S and dP, which the backward's final staging of dQ, dK or dV reuses
  static constexpr int s_region = 2 * s_tile > o_tile ? 2 * s_tile : o_tile;
  // forward: Q K V | S | P | O | m l corr
  static constexpr int forward = 3 * half_tile + s_tile + p_tile + o_tile + 3 * rows;
  // dQ: Q dO K V | S dP (then staging) | dS | lse Δ
  static constexpr int dq = 4 * half_tile + s_region + p_tile + 2 * rows;
  // dK/dV: K V Q dO | S dP (then staging) | P∘Z dS | lse Δ
  static constexpr int dkv = 4 * half_tile + s_region + 2 * p_tile + 2 * rows;
};

// S[br, bc] = Q·Kᵀ (and, when dp is given, dP = dO·Vᵀ): 16×16 tiles dealt to the warps.
template <int D, class DT, class Ctx>
KILN_TILE_FN void scores(const Ctx& ctx, const DT* qs, const DT* ks, float* s, const DT* gs, const DT* vs, float* dp) {
  using z = sizes<D>;
  constexpr int tiles = (br / 16) * (bc / 16);
  const int total = dp ? 2 * tiles : tiles;
  for (int t = ctx.warp; t < total; t += ctx.nwarps) {
    const bool second = t >= tiles;
    const int tm = (t % tiles) / (bc / 16), tn = (t % tiles) % (bc / 16);
    const DT* a = second ? gs : qs;
    const DT* b = second ? vs : ks;
    accumulator c;
    fill(c, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      mma<layout::row, layout::col>(c, a + tm * 16 * z::ld_h + kk * 16, z::ld_h, b + tn * 16 * z::ld_h + kk * 16,
                                    z::ld_h);
    store((second ? dp : s) + tm * 16 * z::ld_s + tn * 16, c, z::ld_s);
  }
}

// acc[n] += A·B over the warp's output tiles n of a [64, D] result, k over 64: A is
// [64 × 64] 16-bit (layout LA, ld_p), B is [64, D] 16-bit row-major (ld_h).
template <int D, int W, layout LA, class DT, class Ctx>
KILN_TILE_FN void accumulate(const Ctx& ctx, accumulator* acc, const DT* a, const DT* b) {
  using z = sizes<D>;
  constexpr int per_warp = (br / 16) * (D / 16) / W;
#pragma unroll
  for (int n = 0; n < per_warp; ++n) {
    const int t = ctx.warp + n * W, tm = t / (D / 16), tn = t % (D / 16);
#pragma unroll
    for (int kk = 0; kk < bc / 16; ++kk) {
      const DT* ap = LA == layout::row ? a + tm * 16 * z::ld_p + kk * 16 : a + kk * 16 * z::ld_p + tm * 16;
      mma<LA, layout::row>(acc[n], ap, z::ld_p, b + kk * 16 * z::ld_h + tn * 16, z::ld_h);
    }
  }
}

// Writes the warps' accumulators (times s) to rows [t0, t0+64) of head h of a [B, L, H, D]
// output, through the f32 staging tile. Ends with a barrier (the staging is reused).
template <int D, int W, class DT, class Ctx>
KILN_TILE_FN void write_out(const Ctx& ctx, accumulator* acc, float s, float* staging, DT* dst, std::int64_t b,
                            std::int64_t t0, std::int64_t h, std::int64_t L, std::int64_t H) {
  using z = sizes<D>;
  constexpr int per_warp = (br / 16) * (D / 16) / W;
#pragma unroll
  for (int n = 0; n < per_warp; ++n) {
    const int t = ctx.warp + n * W, tm = t / (D / 16), tn = t % (D / 16);
    scale(acc[n], s);
    store(staging + tm * 16 * z::ld_o + tn * 16, acc[n], z::ld_o);
  }
  ctx.sync();
  for (int e = ctx.tid; e < br * D; e += ctx.nthreads) {
    const int r = e / D, c = e % D;
    if (t0 + r < L) store_as(dst + at(b, t0 + r, h, L, H, D) + c, staging[r * z::ld_o + c]);
  }
  ctx.sync();
}

// ---- forward ---------------------------------------------------------------------------------
template <int D, int W, class DT, class Mask, class Ctx>
KILN_TILE_FN void forward_block(const Ctx& ctx, unsigned char* smem, std::int64_t bx, std::int64_t bh, const DT* q,
                                const DT* k, const DT* v, DT* o, float* lse, const attention_dims& d,
                                const Mask& mask) {
  using z = sizes<D>;
  DT* qs = reinterpret_cast<DT*>(smem);
  DT* ks = reinterpret_cast<DT*>(smem + z::half_tile);
  DT* vs = reinterpret_cast<DT*>(smem + 2 * z::half_tile);
  float* s = reinterpret_cast<float*>(smem + 3 * z::half_tile);
  DT* p = reinterpret_cast<DT*>(smem + 3 * z::half_tile + z::s_tile);
  float* os = reinterpret_cast<float*>(smem + 3 * z::half_tile + z::s_tile + z::p_tile);
  float* m = reinterpret_cast<float*>(smem + 3 * z::half_tile + z::s_tile + z::p_tile + z::o_tile);
  float* l = m + z::rows / 4;
  float* corr = l + z::rows / 4;

  const std::int64_t b = bh / d.q_heads, h = bh % d.q_heads, g = h / (d.q_heads / d.kv_heads);
  const std::int64_t i0 = bx * br, last = (i0 + br < d.q_len ? i0 + br : d.q_len) - 1;
  load_tile<D>(ctx, qs, z::ld_h, q, b, i0, h, d.q_len, d.q_heads, br);
  for (int e = ctx.tid; e < br * D; e += ctx.nthreads) os[(e / D) * z::ld_o + e % D] = 0.0f;
  for (int r = ctx.tid; r < br; r += ctx.nthreads) m[r] = -INFINITY, l[r] = 0.0f;
  ctx.sync();  // the final pass reads these even when no key tile is live

  const std::int64_t j_begin = block_first_key(mask, d.q_offset + i0, d.q_offset + last) / bc * bc,
                     j_end = mask.end_key(d.q_offset + last, d.kv_len);
  for (std::int64_t j0 = j_begin; j0 < j_end; j0 += bc) {
    if (!tile_live(mask, d, i0, j0)) continue;  // the same answer in every thread
    load_tile<D>(ctx, ks, z::ld_h, k, b, j0, g, d.kv_len, d.kv_heads, bc);
    load_tile<D>(ctx, vs, z::ld_h, v, b, j0, g, d.kv_len, d.kv_heads, bc);
    ctx.sync();
    scores<D>(ctx, qs, ks, s, static_cast<const DT*>(nullptr), static_cast<const DT*>(nullptr), nullptr);
    ctx.sync();
    // The online softmax: a warp per query row, its lanes across the keys.
    for (int r = ctx.warp; r < br; r += ctx.nwarps) {
      float* sr = s + r * z::ld_s;
      const std::int64_t i = i0 + r, pos = d.q_offset + i;
      const bool in = i < d.q_len;
      const std::int64_t first = in ? mask.first_key(pos) : 0, end = in ? mask.end_key(pos, d.kv_len) : 0;
      const float m_old = m[r];
      float mx = -INFINITY;
      for (int jj = ctx.lane; jj < bc; jj += ctx.lanes) {
        const std::int64_t j = j0 + jj;
        const float x = j >= first && j < end && mask.allowed(pos, j) ? sr[jj] * d.scale : -INFINITY;
        sr[jj] = x;
        mx = x > mx ? x : mx;
      }
      mx = ctx.warp_max(mx);
      mx = m_old > mx ? m_old : mx;
      const float c = mx == -INFINITY ? 1.0f : exp_f(m_old - mx);
      float sum = 0.0f;
      for (int jj = ctx.lane; jj < bc; jj += ctx.lanes) {
        const float pr = sr[jj] == -INFINITY ? 0.0f : exp_f(sr[jj] - mx);
        sum += pr;
        store_as(p + r * z::ld_p + jj, pr == 0.0f ? 0.0f : pr * keep(d, b, h, i, j0 + jj));
      }
      sum = ctx.warp_sum(sum);
      ctx.warp_sync();  // every lane has read m[r] before lane 0 overwrites it (a shuffle orders no memory)
      if (ctx.lane == 0) {
        l[r] = l[r] * c + sum;
        m[r] = mx;
        corr[r] = c;
      }
    }
    ctx.sync();
    for (int e = ctx.tid; e < br * D; e += ctx.nthreads) os[(e / D) * z::ld_o + e % D] *= corr[e / D];
    ctx.sync();
    // O += P·V, the warps' tiles of O loaded from and stored back to shared memory.
    {
      constexpr int per_warp = (br / 16) * (D / 16) / W;
#pragma unroll
      for (int n = 0; n < per_warp; ++n) {
        const int t = ctx.warp + n * W, tm = t / (D / 16), tn = t % (D / 16);
        accumulator c;
        load(c, os + tm * 16 * z::ld_o + tn * 16, z::ld_o);
#pragma unroll
        for (int kk = 0; kk < bc / 16; ++kk)
          mma<layout::row, layout::row>(c, p + tm * 16 * z::ld_p + kk * 16, z::ld_p, vs + kk * 16 * z::ld_h + tn * 16,
                                        z::ld_h);
        store(os + tm * 16 * z::ld_o + tn * 16, c, z::ld_o);
      }
    }
    ctx.sync();
  }
  for (int e = ctx.tid; e < br * D; e += ctx.nthreads) {
    const int r = e / D, c = e % D;
    if (i0 + r < d.q_len) {
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      store_as(o + at(b, i0 + r, h, d.q_len, d.q_heads, D) + c, os[r * z::ld_o + c] * inv);
    }
  }
  for (int r = ctx.tid; r < br; r += ctx.nthreads)
    if (i0 + r < d.q_len) lse[bh * d.q_len + i0 + r] = m[r] + log_f(l[r]);
}

// ---- backward: the probabilities and dS of one (query tile, key tile) ------------------------
// From S and dP in shared memory: P = exp(scale·S − L), dS = P∘(dP∘Z − Δ) (16-bit), and,
// when pz is given, P∘Z (16-bit).
template <int D, class DT, class Mask, class Ctx>
KILN_TILE_FN void probabilities(const Ctx& ctx, const float* s, const float* dp, const float* ls, const float* dls,
                                DT* ds, DT* pz, std::int64_t b, std::int64_t h, std::int64_t i0, std::int64_t j0,
                                const attention_dims& d, const Mask& mask) {
  using z = sizes<D>;
  for (int e = ctx.tid; e < br * bc; e += ctx.nthreads) {
    const int r = e / bc, jj = e % bc;
    const std::int64_t i = i0 + r, j = j0 + jj;
    float pr = 0.0f, zk = 0.0f;
    if (visible(mask, d, i, j)) {
      pr = exp_f(s[r * z::ld_s + jj] * d.scale - ls[r]);
      zk = keep(d, b, h, i, j);
    }
    store_as(ds + r * z::ld_p + jj, pr * (dp[r * z::ld_s + jj] * zk - dls[r]));
    if (pz) store_as(pz + r * z::ld_p + jj, pr * zk);
  }
}

// The backward kernels' shared memory: four 16-bit [64, D] tiles (dQ: Q dO K V; dK/dV:
// K V Q dO), S and dP (f32; afterwards the staging of the result), one or two 16-bit
// [64, 64] tiles (dS; P∘Z), and the query rows' L and Δ.
template <int D, class DT>
struct backward_smem {
  using z = sizes<D>;
  DT* tile[4];
  float *s, *dp, *ls, *dls;
  DT* p[2];
  KILN_TILE_FN backward_smem(unsigned char* smem, int p_tiles) {
    for (int t = 0; t < 4; ++t) tile[t] = reinterpret_cast<DT*>(smem + t * z::half_tile);
    s = reinterpret_cast<float*>(smem + 4 * z::half_tile);
    dp = s + z::s_tile / 4;
    p[0] = reinterpret_cast<DT*>(smem + 4 * z::half_tile + z::s_region);
    p[1] = reinterpret_cast<DT*>(smem + 4 * z::half_tile + z::s_region + z::p_tile);
    ls = reinterpret_cast<float*>(smem + 4 * z::half_tile + z::s_region + p_tiles * z::p_tile);
    dls = ls + z::rows / 4;
  }
  // L and Δ of query rows [i0, i0+64) of head bh (0 past the end).
  template <class Ctx>
  KILN_TILE_FN void load_rows(const Ctx& ctx, const float* lse, const float* delta, std::int64_t bh, std::int64_t i0,
                              const attention_dims& d) {
    for (int r = ctx.tid; r < br; r += ctx.nthreads) {
      const bool in = i0 + r < d.q_len;
      ls[r] = in ? lse[bh * d.q_len + i0 + r] : 0.0f;
      dls[r] = in ? delta[bh * d.q_len + i0 + r] : 0.0f;
    }
  }
};

// dQ for queries [64·bx, +64) of head bh.
template <int D, int W, class DT, class Mask, class Ctx>
KILN_TILE_FN void dq_block(const Ctx& ctx, unsigned char* smem, std::int64_t bx, std::int64_t bh, const DT* q,
                           const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta, DT* dq,
                           const attention_dims& d, const Mask& mask) {
  using z = sizes<D>;
  backward_smem<D, DT> m(smem, 1);
  DT *qs = m.tile[0], *gs = m.tile[1], *ks = m.tile[2], *vs = m.tile[3], *ds = m.p[0];
  float *s = m.s, *dp = m.dp, *ls = m.ls, *dls = m.dls;

  const std::int64_t b = bh / d.q_heads, h = bh % d.q_heads, g = h / (d.q_heads / d.kv_heads);
  const std::int64_t i0 = bx * br, last = (i0 + br < d.q_len ? i0 + br : d.q_len) - 1;
  load_tile<D>(ctx, qs, z::ld_h, q, b, i0, h, d.q_len, d.q_heads, br);
  load_tile<D>(ctx, gs, z::ld_h, dout, b, i0, h, d.q_len, d.q_heads, br);
  m.load_rows(ctx, lse, delta, bh, i0, d);
  constexpr int per_warp = (br / 16) * (D / 16) / W;
  accumulator acc[per_warp];
#pragma unroll
  for (int n = 0; n < per_warp; ++n) fill(acc[n], 0.0f);

  const std::int64_t j_begin = block_first_key(mask, d.q_offset + i0, d.q_offset + last) / bc * bc,
                     j_end = mask.end_key(d.q_offset + last, d.kv_len);
  for (std::int64_t j0 = j_begin; j0 < j_end; j0 += bc) {
    if (!tile_live(mask, d, i0, j0)) continue;
    load_tile<D>(ctx, ks, z::ld_h, k, b, j0, g, d.kv_len, d.kv_heads, bc);
    load_tile<D>(ctx, vs, z::ld_h, v, b, j0, g, d.kv_len, d.kv_heads, bc);
    ctx.sync();
    scores<D>(ctx, qs, ks, s, gs, vs, dp);
    ctx.sync();
    probabilities<D>(ctx, s, dp, ls, dls, ds, static_cast<DT*>(nullptr), b, h, i0, j0, d, mask);
    ctx.sync();
    accumulate<D, W, layout::row>(ctx, acc, ds, ks);  // dQ += dS·K
    ctx.sync();
  }
  write_out<D, W>(ctx, acc, d.scale, s, dq, b, i0, h, d.q_len, d.q_heads);
}

// dK and dV for keys [64·bx, +64) of key/value head bg, summed over the group's query heads.
template <int D, int W, class DT, class Mask, class Ctx>
KILN_TILE_FN void dkv_block(const Ctx& ctx, unsigned char* smem, std::int64_t bx, std::int64_t bg, const DT* q,
                            const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta, DT* dk,
                            DT* dv, const attention_dims& d, const Mask& mask) {
  using z = sizes<D>;
  backward_smem<D, DT> m(smem, 2);
  DT *ks = m.tile[0], *vs = m.tile[1], *qs = m.tile[2], *gs = m.tile[3], *pz = m.p[0], *ds = m.p[1];
  float *s = m.s, *dp = m.dp, *ls = m.ls, *dls = m.dls;

  const std::int64_t b = bg / d.kv_heads, g = bg % d.kv_heads, group = d.q_heads / d.kv_heads;
  const std::int64_t j0 = bx * bc;
  load_tile<D>(ctx, ks, z::ld_h, k, b, j0, g, d.kv_len, d.kv_heads, bc);
  load_tile<D>(ctx, vs, z::ld_h, v, b, j0, g, d.kv_len, d.kv_heads, bc);
  constexpr int per_warp = (bc / 16) * (D / 16) / W;
  accumulator gk[per_warp], gv[per_warp];
#pragma unroll
  for (int n = 0; n < per_warp; ++n) fill(gk[n], 0.0f), fill(gv[n], 0.0f);

  for (std::int64_t hh = 0; hh < group; ++hh) {
    const std::int64_t h = g * group + hh, bh = b * d.q_heads + h;
    for (std::int64_t i0 = 0; i0 < d.q_len; i0 += br) {
      if (!tile_live(mask, d, i0, j0)) continue;
      load_tile<D>(ctx, qs, z::ld_h, q, b, i0, h, d.q_len, d.q_heads, br);
      load_tile<D>(ctx, gs, z::ld_h, dout, b, i0, h, d.q_len, d.q_heads, br);
      m.load_rows(ctx, lse, delta, bh, i0, d);
      ctx.sync();
      scores<D>(ctx, qs, ks, s, gs, vs, dp);
      ctx.sync();
      probabilities<D>(ctx, s, dp, ls, dls, ds, pz, b, h, i0, j0, d, mask);
      ctx.sync();
      accumulate<D, W, layout::col>(ctx, gv, pz, gs);  // dV += (P∘Z)ᵀ·dO
      accumulate<D, W, layout::col>(ctx, gk, ds, qs);  // dK += dSᵀ·Q
      ctx.sync();
    }
  }
  write_out<D, W>(ctx, gk, d.scale, s, dk, b, j0, g, d.kv_len, d.kv_heads);
  write_out<D, W>(ctx, gv, 1.0f, s, dv, b, j0, g, d.kv_len, d.kv_heads);
}

}  // namespace kiln::cuda_kernels::flash
