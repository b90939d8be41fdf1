// kiln/cuda/flash_registers.hpp — register-resident attention: FlashAttention-2's warp
// programs on mma.sync, ldmatrix and cp.async, written once for two compilers like
// flash_tiles.hpp. nvcc runs them as CUDA blocks (kernels/attention.cu); g++ runs each
// warp on a host thread that steps its 32 lanes in turn, with ldmatrix, mma.sync and the
// quad shuffles emulated from the PTX ISA's fragment tables, so the register layouts, the
// lane arithmetic and the algorithm are tested on every CPU machine
// (tests/ops/test_flash_tiles.cpp), not only where a GPU is lent.
//
// Algorithm, for 16-bit q, k, v with head dimension D of 64 or 128: a block is four warps
// over a tile of 64 rows, 16 rows a warp, and everything a row owns stays in its lanes'
// registers between the products (flash_tiles.hpp stages S, P and O through shared memory
// instead):
//   forward, one block per (64 queries, batch·query head): the warp's Q fragments are
//     loaded once; per key tile, S = Q·Kᵀ into registers (m16n8k16, f32 accumulate); the
//     online softmax runs on the accumulators (a row's max and sum across the four lanes
//     that hold it, by two shuffles); P = exp(scale·S − m), dropped out and rounded to
//     16 bits, is the A operand of P·V straight from the accumulators' layout; O stays in
//     registers, rescaled in place. O/l and m + log l are written at the end.
//   dQ, one block per (64 queries, batch·query head): per key tile S = Q·Kᵀ and
//     dP = dO·Vᵀ into registers, dS = P∘(dP∘Z − Δ) with P = exp(scale·S − L) in place,
//     dQ += dS·K with dS as the A operand and K read transposed (ldmatrix.trans).
//   dK and dV, one block per (64 keys, batch·key/value head): each warp holds 16 keys'
//     dK and dV; every live query tile of every query head of the group passes through,
//     Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ in registers (D 128 takes a tile in two halves of 32
//     queries, so the accumulators fit), dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q. Grouped heads
//     sum in registers: no atomics, the same bits run to run.
// Key (or query) tiles are double-buffered: while a block computes on one, cp.async brings
// the next live one into the other buffer. Tiles no row may see are never loaded. Rows
// of 16-bit tiles are padded to D + 8 elements, so the eight row addresses of an ldmatrix
// fall in distinct bank groups. Shared memory (bytes, D = 128): forward 87 KB, dQ 105 KB,
// dK/dV 105 KB; D = 64: 46, 56, 56 KB.
// The probabilities are rounded to the input type before their products, as
// FlashAttention does; accumulation is f32. Requires sm_80 (bf16 mma.sync, cp.async).
#pragma once

#include <cstdint>
#include <cstring>

#include "kiln/cuda/flash_tiles.hpp"

namespace kiln::cuda_kernels::flash::reg {

inline constexpr int warps = 4;  // per block: 16 rows of a 64-row tile each

// ---- lanes ---------------------------------------------------------------------------------
// Per-lane code runs in `for (int ln : lanes(ctx))`: on the device the loop is the calling
// lane once; on the host, all 32 lanes of the warp one after another. Registers are
// regs<T, N>: N values in each lane (on the host, 32 × N). Between two cross-lane
// operations (ldsm_x4, mma, quad_*), lanes only touch their own registers.
struct lane_range {
  int first, last;
  struct iterator {
    int i;
    KILN_TILE_FN int operator*() const { return i; }
    KILN_TILE_FN iterator& operator++() {
      ++i;
      return *this;
    }
    KILN_TILE_FN bool operator!=(const iterator& o) const { return i != o.i; }
  };
  KILN_TILE_FN iterator begin() const { return {first}; }
  KILN_TILE_FN iterator end() const { return {last}; }
};

template <class T, int N>
struct regs {
#if defined(__CUDACC__)
  T v[N];
  KILN_TILE_FN T& operator()(int, int i) { return v[i]; }
  KILN_TILE_FN const T& operator()(int, int i) const { return v[i]; }
#else
  T v[32][N];
  T& operator()(int lane, int i) { return v[lane][i]; }
  const T& operator()(int lane, int i) const { return v[lane][i]; }
#endif
};

template <class Ctx>
KILN_TILE_FN lane_range lanes(const Ctx& ctx) {
#if defined(__CUDACC__)
  return {ctx.lane, ctx.lane + 1};
#else
  (void)ctx;
  return {0, 32};
#endif
}

template <class T, int N>
KILN_TILE_FN void fill(const lane_range& all, regs<T, N>& r, T x) {
  for (int ln : all)
#pragma unroll
    for (int i = 0; i < N; ++i) r(ln, i) = x;
}

// ---- two 16-bit values in a 32-bit register, the lower index in the low half ------------------
#if defined(__CUDACC__)
template <class DT>
KILN_TILE_FN std::uint32_t pack2(float lo, float hi) {
  std::uint32_t r;
  if constexpr (std::is_same_v<DT, __nv_bfloat16>) {
    const __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&r, &x, 4);
  } else {
    const __half2 x = __floats2half2_rn(lo, hi);
    std::memcpy(&r, &x, 4);
  }
  return r;
}
template <class DT>
KILN_TILE_FN void store2(DT* p, float lo, float hi) {
  *reinterpret_cast<std::uint32_t*>(p) = pack2<DT>(lo, hi);  // p is 4-byte aligned: even column
}
KILN_TILE_FN std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
#else
template <class DT>
std::uint16_t bits(float x) {
  const DT h(x);
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
template <class DT>
float half_of(std::uint32_t r, int which) {
  const auto b = static_cast<std::uint16_t>(which ? r >> 16 : r & 0xffffu);
  DT h;
  std::memcpy(&h, &b, 2);
  return to_f32(h);
}
template <class DT>
std::uint32_t pack2(float lo, float hi) {
  return std::uint32_t(bits<DT>(lo)) | (std::uint32_t(bits<DT>(hi)) << 16);
}
template <class DT>
void store2(DT* p, float lo, float hi) {
  const std::uint32_t r = pack2<DT>(lo, hi);
  std::memcpy(p, &r, 4);
}
#endif

// ---- warp operations ---------------------------------------------------------------------------
// ldmatrix .x4: four 8×8 16-bit matrices from shared memory into r(·, base..base+3), lane l
// giving the address of row l % 8 of matrix l / 8 (16-byte aligned). Without Trans, lane l
// receives row l/4, columns 2(l%4) and 2(l%4)+1 of each matrix; with Trans, column l/4,
// rows 2(l%4) and 2(l%4)+1.
template <bool Trans, class DT, int N, class Ctx, class Addr>
KILN_TILE_FN void ldsm_x4(const Ctx& ctx, regs<std::uint32_t, N>& r, int base, Addr addr) {
#if defined(__CUDACC__)
  const std::uint32_t a = shared_address(addr(ctx.lane));
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.v[base]), "=r"(r.v[base + 1]), "=r"(r.v[base + 2]), "=r"(r.v[base + 3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.v[base]), "=r"(r.v[base + 1]), "=r"(r.v[base + 2]), "=r"(r.v[base + 3])
                 : "r"(a));
#else
  (void)ctx;
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln / 4, t = ln % 4;
    for (int m = 0; m < 4; ++m) {
      std::uint16_t lo, hi;
      if (Trans) {
        std::memcpy(&lo, addr(m * 8 + 2 * t) + g, 2);
        std::memcpy(&hi, addr(m * 8 + 2 * t + 1) + g, 2);
      } else {
        const DT* row = addr(m * 8 + g);
        std::memcpy(&lo, row + 2 * t, 2);
        std::memcpy(&hi, row + 2 * t + 1, 2);
      }
      r(ln, base + m) = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
    }
  }
#endif
}

// mma.sync m16n8k16, row-major A, column-major B, f32 accumulate:
// c(·, cb..cb+3) += A·B, A's fragment in a(·, ab..ab+3), B's in b(·, bb..bb+1).
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane/4, t = lane%4:
//   A element i (two per register): row g + 8·((i/2) % 2), column 2t + i%2 + 8·(i/4);
//   B element i: row (k) 2t + i%2 + 8·(i/2), column (n) g;
//   C element i: row g + 8·(i/2), column 2t + i%2.
template <class DT, int NC, int NA, int NB>
KILN_TILE_FN void mma(regs<float, NC>& c, int cb, const regs<std::uint32_t, NA>& a, int ab,
                      const regs<std::uint32_t, NB>& b, int bb) {
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<DT, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c.v[cb]), "+f"(c.v[cb + 1]), "+f"(c.v[cb + 2]), "+f"(c.v[cb + 3])
        : "r"(a.v[ab]), "r"(a.v[ab + 1]), "r"(a.v[ab + 2]), "r"(a.v[ab + 3]), "r"(b.v[bb]), "r"(b.v[bb + 1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c.v[cb]), "+f"(c.v[cb + 1]), "+f"(c.v[cb + 2]), "+f"(c.v[cb + 3])
        : "r"(a.v[ab]), "r"(a.v[ab + 1]), "r"(a.v[ab + 2]), "r"(a.v[ab + 3]), "r"(b.v[bb]), "r"(b.v[bb + 1]));
#else
  float A[16][16], B[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln / 4, t = ln % 4;
    for (int i = 0; i < 8; ++i)
      A[g + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)] = half_of<DT>(a(ln, ab + i / 2), i % 2);
    for (int i = 0; i < 4; ++i) B[2 * t + i % 2 + 8 * (i / 2)][g] = half_of<DT>(b(ln, bb + i / 2), i % 2);
  }
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln / 4, t = ln % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      float s = 0.0f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c(ln, cb + i) += s;
    }
  }
#endif
}

// A row of an m16n8 accumulator lives in the four lanes 4g..4g+3: the max (sum) over
// them, in each of the four, by butterfly shuffles (the host takes the same steps, so the
// same bits).
template <bool Max, int N, class Ctx>
KILN_TILE_FN void quad_reduce(const Ctx& ctx, regs<float, N>& x) {
#if defined(__CUDACC__)
  (void)ctx;

#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x.v[i], o);
      x.v[i] = Max ? fmaxf(x.v[i], y) : x.v[i] + y;
    }
#else
  (void)ctx;
  for (int o = 1; o <= 2; o <<= 1) {
    regs<float, N> y = x;
    for (int ln = 0; ln < 32; ++ln)
      for (int i = 0; i < N; ++i) {
        const float a = y(ln, i), b = y(ln ^ o, i);
        x(ln, i) = Max ? (a > b ? a : b) : a + b;
      }
  }
#endif
}

// ---- asynchronous tile loads ---------------------------------------------------------------------
// 16 bytes global → shared, zeros when !valid (cp.async on the device, a copy on the host).
template <class DT>
KILN_TILE_FN void copy16(DT* dst, const DT* src, bool valid) {
#if defined(__CUDACC__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#else
  if (valid)
    std::memcpy(dst, src, 16);
  else
    std::memset(static_cast<void*>(dst), 0, 16);
#endif
}
KILN_TILE_FN void commit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
KILN_TILE_FN void wait_pending() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <int D>
struct sizes {
  static constexpr int ld = D + 8;                 // row stride of a 16-bit [64, D] tile, in elements
  static constexpr int tile = br * ld * 2;         // its bytes (a multiple of 128)
  static constexpr int rows = br * 4;              // 64 floats
  static constexpr int forward = 5 * tile;         // Q | K V | K V
  static constexpr int dq = 6 * tile + 2 * rows;   // Q dO | K V | K V | L Δ
  static constexpr int dkv = 6 * tile + 4 * rows;  // K V | Q dO | Q dO | L Δ | L Δ
  static_assert(br == 64 && bc == 64, "four warps of 16 rows");
};

// Rows [t0, t0+64) of head h of a [B, L, H, D] buffer into a tile (row stride D + 8),
// zeros past L, asynchronously: the caller commits and waits.
template <int D, class DT, class Ctx>
KILN_TILE_FN void load_async(const Ctx& ctx, DT* tile, const DT* src, std::int64_t b, std::int64_t t0, std::int64_t h,
                             std::int64_t L, std::int64_t H) {
  constexpr int chunks = D / 8;
  for (int e = ctx.tid; e < br * chunks; e += ctx.nthreads) {
    const int r = e / chunks, c = (e % chunks) * 8;
    const std::int64_t t = t0 + r;
    copy16(tile + r * sizes<D>::ld + c, t < L ? src + at(b, t, h, L, H, D) + c : src, t < L);
  }
}
// L and Δ of query rows [i0, i0+64) of head bh into ls, dls (0 past the end).
template <class Ctx>
KILN_TILE_FN void load_rows(const Ctx& ctx, float* ls, float* dls, const float* lse, const float* delta,
                            std::int64_t bh, std::int64_t i0, const attention_dims& d) {
  for (int r = ctx.tid; r < br; r += ctx.nthreads) {
    const bool in = i0 + r < d.q_len;
    ls[r] = in ? lse[bh * d.q_len + i0 + r] : 0.0f;
    dls[r] = in ? delta[bh * d.q_len + i0 + r] : 0.0f;
  }
}

// ---- the products ----------------------------------------------------------------------------
// The A fragments of 16 rows × D (row-major at a, row stride D + 8), one k16 chunk per four
// registers.
template <int D, class DT, class Ctx>
KILN_TILE_FN void load_a(const Ctx& ctx, regs<std::uint32_t, D / 4>& af, const DT* a) {
  constexpr int ld = sizes<D>::ld;

#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldsm_x4<false, DT>(ctx, af, 4 * kk,
                       [&](int ln) -> const DT* { return a + (ln % 16) * ld + 16 * kk + (ln / 16) * 8; });
}
// s(·, 4n..4n+3) = A·Bᵀ for the NT n-tiles of 8 rows of B (row-major at b, stride D + 8),
// A's fragments given (16 rows × D).
template <int D, int NT, class DT, class Ctx>
KILN_TILE_FN void abt(const Ctx& ctx, regs<float, 4 * NT>& s, const regs<std::uint32_t, D / 4>& af, const DT* b) {
  constexpr int ld = sizes<D>::ld;
  fill(lanes(ctx), s, 0.0f);

#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      regs<std::uint32_t, 4> bf;
      ldsm_x4<false, DT>(ctx, bf, 0, [&](int ln) -> const DT* {
        const int m = ln / 8;
        return b + (16 * np + ln % 8 + 8 * (m / 2)) * ld + 16 * kk + 8 * (m % 2);
      });
      mma<DT>(s, 8 * np, af, 4 * kk, bf, 0);
      mma<DT>(s, 8 * np + 4, af, 4 * kk, bf, 2);
    }
}
// The accumulator pairs of a 16 × 8·NT result as the A fragments of its k16 chunks: a
// register of the chunk c is two neighbouring accumulators of n-tiles 2c and 2c + 1.
template <class DT, int NT, class Ctx>
KILN_TILE_FN void to_a(const Ctx& ctx, regs<std::uint32_t, 2 * NT>& pf, const regs<float, 4 * NT>& s) {
  for (int ln : lanes(ctx))
#pragma unroll
    for (int r = 0; r < 2 * NT; ++r) pf(ln, r) = pack2<DT>(s(ln, 2 * r), s(ln, 2 * r + 1));
}
// acc (16 × D) += P·B, P's fragments over KC chunks of 16 (k), B row-major [16·KC, D] at b
// (stride D + 8), read transposed.
template <int D, int KC, class DT, class Ctx>
KILN_TILE_FN void accumulate_ab(const Ctx& ctx, regs<float, D / 2>& acc, const regs<std::uint32_t, 4 * KC>& pf,
                                const DT* b) {
  constexpr int ld = sizes<D>::ld;

#pragma unroll
  for (int c = 0; c < KC; ++c)
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      regs<std::uint32_t, 4> bf;
      ldsm_x4<true, DT>(ctx, bf, 0, [&](int ln) -> const DT* {
        const int m = ln / 8;
        return b + (16 * c + ln % 8 + 8 * (m % 2)) * ld + 16 * dp + 8 * (m / 2);
      });
      mma<DT>(acc, 8 * dp, pf, 4 * c, bf, 0);
      mma<DT>(acc, 8 * dp + 4, pf, 4 * c, bf, 2);
    }
}
// Rows [t0 + 16w, +16) of head h of a [B, L, H, D] output ← acc · s (rows ≥ L skipped).
template <int D, class DT, class Ctx>
KILN_TILE_FN void write_rows(const Ctx& ctx, const regs<float, D / 2>& acc, float s, DT* dst, std::int64_t b,
                             std::int64_t t0, std::int64_t h, std::int64_t L, std::int64_t H) {
  for (int ln : lanes(ctx)) {
    const int g = ln / 4, t = ln % 4;

#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const std::int64_t row = t0 + 16 * ctx.warp + g + 8 * hr;
      if (row >= L) continue;

#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        store2(dst + at(b, row, h, L, H, D) + 8 * n + 2 * t, acc(ln, 4 * n + 2 * hr) * s,
               acc(ln, 4 * n + 2 * hr + 1) * s);
    }
  }
}

// ---- a query block's sweep over its key tiles (forward, dQ) ----------------------------------------
template <int D, class DT, class Mask>
struct query_block {
  const attention_dims& d;
  const Mask& mask;
  std::int64_t b, h, g, i0, last, j_end;
  KILN_TILE_FN query_block(std::int64_t bx, std::int64_t bh, const attention_dims& dims, const Mask& m)
      : d(dims),
        mask(m),
        b(bh / dims.q_heads),
        h(bh % dims.q_heads),
        g(h / (dims.q_heads / dims.kv_heads)),
        i0(bx * br),
        last((i0 + br < dims.q_len ? i0 + br : dims.q_len) - 1),
        j_end(m.end_key(dims.q_offset + last, dims.kv_len)) {}
  // The first live key tile at or after j (j_end when none is left).
  KILN_TILE_FN std::int64_t next_live(std::int64_t j) const {
    while (j < j_end && !tile_live(mask, d, i0, j)) j += bc;
    return j;
  }
  KILN_TILE_FN std::int64_t first_live() const {
    return next_live(block_first_key(mask, d.q_offset + i0, d.q_offset + last) / bc * bc);
  }
  // K and V of key tile j into kd and vd, asynchronously.
  template <class Ctx>
  KILN_TILE_FN void fetch(const Ctx& ctx, DT* kd, DT* vd, const DT* k, const DT* v, std::int64_t j) const {
    load_async<D>(ctx, kd, k, b, j, g, d.kv_len, d.kv_heads);
    load_async<D>(ctx, vd, v, b, j, g, d.kv_len, d.kv_heads);
  }
  // body(j, K, V) for every live key tile j from `j` on, tile j in kv(buf, 0 | 1) while the
  // next live one is fetched into kv(buf ^ 1, ·). Tile j must be fetched (and committed).
  template <class Ctx, class KV, class Body>
  KILN_TILE_FN void sweep(const Ctx& ctx, std::int64_t j, KV kv, const DT* k, const DT* v, Body body) const {
    for (int buf = 0; j < j_end; buf ^= 1) {
      const std::int64_t jn = next_live(j + bc);
      if (jn < j_end) fetch(ctx, kv(buf ^ 1, 0), kv(buf ^ 1, 1), k, v, jn);  // last read before the barrier below
      commit();  // possibly empty: every thread's groups stay in step
      wait_pending<1>();
      ctx.sync();  // tile j is in kv(buf, ·) for every thread
      body(j, static_cast<const DT*>(kv(buf, 0)), static_cast<const DT*>(kv(buf, 1)));
      ctx.sync();  // every warp is done with kv(buf, ·) before the next prefetch overwrites it
      j = jn;
    }
  }
};

// ---- forward ------------------------------------------------------------------------------------
template <int D, class DT, class Mask, class Ctx>
KILN_TILE_FN void forward_block(const Ctx& ctx, unsigned char* smem, std::int64_t bx, std::int64_t bh, const DT* q,
                                const DT* k, const DT* v, DT* o, float* lse, const attention_dims& d,
                                const Mask& mask) {
  using z = sizes<D>;
  DT* qs = reinterpret_cast<DT*>(smem);
  auto kv = [&](int buf, int which) { return reinterpret_cast<DT*>(smem + (1 + 2 * buf + which) * z::tile); };
  const query_block<D, DT, Mask> qb(bx, bh, d, mask);
  const std::int64_t b = qb.b, h = qb.h, i0 = qb.i0;
  const std::int64_t j_first = qb.first_live();
  load_async<D>(ctx, qs, q, b, i0, h, d.q_len, d.q_heads);
  if (j_first < qb.j_end) qb.fetch(ctx, kv(0, 0), kv(0, 1), k, v, j_first);
  commit();
  wait_pending<0>();
  ctx.sync();

  const auto all = lanes(ctx);
  const int w = ctx.warp;
  regs<std::uint32_t, D / 4> qf;
  load_a<D>(ctx, qf, qs + 16 * w * z::ld);
  regs<float, D / 2> acc;
  regs<float, 2> m, l;  // per row the lane holds (g, g + 8): running max; this lane's share of the sum
  fill(all, acc, 0.0f);
  fill(all, m, -INFINITY);
  fill(all, l, 0.0f);

  qb.sweep(ctx, j_first, kv, k, v, [&](std::int64_t j, const DT* ks, const DT* vs) {
    regs<float, 32> s;
    abt<D, 8>(ctx, s, qf, ks);
    regs<float, 2> mx;
    for (int ln : all) {
      const int gg = ln / 4, t = ln % 4;

#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const std::int64_t i = i0 + 16 * w + gg + 8 * hr, pos = d.q_offset + i;
        const bool in = i < d.q_len;
        const std::int64_t first = in ? mask.first_key(pos) : 0, end = in ? mask.end_key(pos, d.kv_len) : 0;
        float x_max = -INFINITY;

#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const std::int64_t jj = j + 8 * n + 2 * t + e;
            float& x = s(ln, 4 * n + 2 * hr + e);
            x = jj >= first && jj < end && mask.allowed(pos, jj) ? x * d.scale : -INFINITY;
            x_max = x > x_max ? x : x_max;
          }
        mx(ln, hr) = x_max;
      }
    }
    quad_reduce<true>(ctx, mx);
    for (int ln : all) {
      const int gg = ln / 4, t = ln % 4;

#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const std::int64_t i = i0 + 16 * w + gg + 8 * hr;
        const float m_old = m(ln, hr), m_new = m_old > mx(ln, hr) ? m_old : mx(ln, hr);
        const float c = m_new == -INFINITY ? 1.0f : exp_f(m_old - m_new);
        float sum = 0.0f;

#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s(ln, 4 * n + 2 * hr + e);
            const float p = x == -INFINITY ? 0.0f : exp_f(x - m_new);
            sum += p;
            x = p == 0.0f ? 0.0f : p * keep(d, b, h, i, j + 8 * n + 2 * t + e);
          }
        l(ln, hr) = l(ln, hr) * c + sum;
        m(ln, hr) = m_new;

#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          acc(ln, 4 * n + 2 * hr) *= c;
          acc(ln, 4 * n + 2 * hr + 1) *= c;
        }
      }
    }
    regs<std::uint32_t, 16> pf;
    to_a<DT, 8>(ctx, pf, s);
    accumulate_ab<D, 4>(ctx, acc, pf, vs);  // O += P·V
  });

  quad_reduce<false>(ctx, l);
  for (int ln : all) {
    const int gg = ln / 4, t = ln % 4;

#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const std::int64_t i = i0 + 16 * w + gg + 8 * hr;
      if (i >= d.q_len) continue;
      const float inv = l(ln, hr) > 0.0f ? 1.0f / l(ln, hr) : 0.0f;

#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        store2(o + at(b, i, h, d.q_len, d.q_heads, D) + 8 * n + 2 * t, acc(ln, 4 * n + 2 * hr) * inv,
               acc(ln, 4 * n + 2 * hr + 1) * inv);
      if (t == 0) lse[bh * d.q_len + i] = m(ln, hr) + log_f(l(ln, hr));
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------
// dQ for queries [64·bx, +64) of head bh.
template <int D, class DT, class Mask, class Ctx>
KILN_TILE_FN void dq_block(const Ctx& ctx, unsigned char* smem, std::int64_t bx, std::int64_t bh, const DT* q,
                           const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta, DT* dq,
                           const attention_dims& d, const Mask& mask) {
  using z = sizes<D>;
  DT* qs = reinterpret_cast<DT*>(smem);
  DT* gs = reinterpret_cast<DT*>(smem + z::tile);
  auto kv = [&](int buf, int which) { return reinterpret_cast<DT*>(smem + (2 + 2 * buf + which) * z::tile); };
  float* ls = reinterpret_cast<float*>(smem + 6 * z::tile);
  float* dls = ls + br;
  const query_block<D, DT, Mask> qb(bx, bh, d, mask);
  const std::int64_t b = qb.b, h = qb.h, i0 = qb.i0;
  const std::int64_t j_first = qb.first_live();
  load_async<D>(ctx, qs, q, b, i0, h, d.q_len, d.q_heads);
  load_async<D>(ctx, gs, dout, b, i0, h, d.q_len, d.q_heads);
  if (j_first < qb.j_end) qb.fetch(ctx, kv(0, 0), kv(0, 1), k, v, j_first);
  commit();
  load_rows(ctx, ls, dls, lse, delta, bh, i0, d);
  wait_pending<0>();
  ctx.sync();

  const auto all = lanes(ctx);
  const int w = ctx.warp;
  regs<float, D / 2> acc;
  fill(all, acc, 0.0f);
  qb.sweep(ctx, j_first, kv, k, v, [&](std::int64_t j, const DT* ks, const DT* vs) {
    regs<float, 32> s, dp;
    {
      regs<std::uint32_t, D / 4> af;  // Q's rows, then dO's: reloaded per tile to spare registers
      load_a<D>(ctx, af, qs + 16 * w * z::ld);
      abt<D, 8>(ctx, s, af, ks);
      load_a<D>(ctx, af, gs + 16 * w * z::ld);
      abt<D, 8>(ctx, dp, af, vs);
    }
    for (int ln : all) {
      const int gg = ln / 4, t = ln % 4;

#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = 16 * w + gg + 8 * hr;
        const std::int64_t i = i0 + r;

#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const std::int64_t jj = j + 8 * n + 2 * t + e;
            const int x = 4 * n + 2 * hr + e;
            float ds = 0.0f;
            if (visible(mask, d, i, jj)) {
              const float p = exp_f(s(ln, x) * d.scale - ls[r]);
              ds = p * (dp(ln, x) * keep(d, b, h, i, jj) - dls[r]);
            }
            s(ln, x) = ds;
          }
      }
    }
    regs<std::uint32_t, 16> df;
    to_a<DT, 8>(ctx, df, s);
    accumulate_ab<D, 4>(ctx, acc, df, ks);  // dQ += dS·K
  });
  write_rows<D>(ctx, acc, d.scale, dq, b, i0, h, d.q_len, d.q_heads);
}

// dK and dV for keys [64·bx, +64) of key/value head bg, summed over the group's query heads.
template <int D, class DT, class Mask, class Ctx>
KILN_TILE_FN void dkv_block(const Ctx& ctx, unsigned char* smem, std::int64_t bx, std::int64_t bg, const DT* q,
                            const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta, DT* dk,
                            DT* dv, const attention_dims& d, const Mask& mask) {
  using z = sizes<D>;
  constexpr int nt = D == 128 ? 4 : 8;  // n-tiles of queries per pass: 32 or 64 queries
  DT* ks = reinterpret_cast<DT*>(smem);
  DT* vs = reinterpret_cast<DT*>(smem + z::tile);
  auto qg = [&](int buf, int which) { return reinterpret_cast<DT*>(smem + (2 + 2 * buf + which) * z::tile); };
  auto rows = [&](int buf, int which) {
    return reinterpret_cast<float*>(smem + 6 * z::tile + (2 * buf + which) * z::rows);
  };
  const std::int64_t b = bg / d.kv_heads, g = bg % d.kv_heads, group = d.q_heads / d.kv_heads;
  const std::int64_t j0 = bx * bc, qtiles = (d.q_len + br - 1) / br, steps = group * qtiles;
  // Step n is query tile n % qtiles of the group's head n / qtiles.
  auto next_live = [&](std::int64_t n) {
    while (n < steps && !tile_live(mask, d, (n % qtiles) * br, j0)) ++n;
    return n;
  };
  auto fetch = [&](int buf, std::int64_t n) {
    const std::int64_t h = g * group + n / qtiles, i0 = (n % qtiles) * br;
    load_async<D>(ctx, qg(buf, 0), q, b, i0, h, d.q_len, d.q_heads);
    load_async<D>(ctx, qg(buf, 1), dout, b, i0, h, d.q_len, d.q_heads);
    load_rows(ctx, rows(buf, 0), rows(buf, 1), lse, delta, b * d.q_heads + h, i0, d);
  };
  std::int64_t n = next_live(0);
  load_async<D>(ctx, ks, k, b, j0, g, d.kv_len, d.kv_heads);
  load_async<D>(ctx, vs, v, b, j0, g, d.kv_len, d.kv_heads);
  if (n < steps) fetch(0, n);
  commit();
  wait_pending<0>();
  ctx.sync();

  const auto all = lanes(ctx);
  const int w = ctx.warp;
  regs<float, D / 2> gk, gv;
  fill(all, gk, 0.0f);
  fill(all, gv, 0.0f);
  for (int buf = 0; n < steps; buf ^= 1) {
    const std::int64_t nn = next_live(n + 1);
    if (nn < steps) fetch(buf ^ 1, nn);
    commit();
    wait_pending<1>();
    ctx.sync();

    const std::int64_t h = g * group + n / qtiles, i0 = (n % qtiles) * br;
    const DT *qs = qg(buf, 0), *gs = qg(buf, 1);
    const float *ls = rows(buf, 0), *dls = rows(buf, 1);

#pragma unroll
    for (int half = 0; half < 8 / nt; ++half) {
      const int c0 = 8 * nt * half;  // the pass's first query, within the tile
      regs<float, 4 * nt> s, dp;
      {
        regs<std::uint32_t, D / 4> af;  // the warp's 16 keys, then its 16 values
        load_a<D>(ctx, af, ks + 16 * w * z::ld);
        abt<D, nt>(ctx, s, af, qs + c0 * z::ld);  // Sᵀ = K·Qᵀ
        load_a<D>(ctx, af, vs + 16 * w * z::ld);
        abt<D, nt>(ctx, dp, af, gs + c0 * z::ld);  // dPᵀ = V·dOᵀ
      }
      for (int ln : all) {
        const int gg = ln / 4, t = ln % 4;

#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const std::int64_t jj = j0 + 16 * w + gg + 8 * hr;

#pragma unroll
          for (int x_n = 0; x_n < nt; ++x_n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = c0 + 8 * x_n + 2 * t + e, x = 4 * x_n + 2 * hr + e;
              const std::int64_t i = i0 + c;
              float pz = 0.0f, ds = 0.0f;
              if (visible(mask, d, i, jj)) {
                const float p = exp_f(s(ln, x) * d.scale - ls[c]), zk = keep(d, b, h, i, jj);
                pz = p * zk;
                ds = p * (dp(ln, x) * zk - dls[c]);
              }
              s(ln, x) = pz;
              dp(ln, x) = ds;
            }
        }
      }
      regs<std::uint32_t, 2 * nt> af;
      to_a<DT, nt>(ctx, af, s);
      accumulate_ab<D, nt / 2>(ctx, gv, af, gs + c0 * z::ld);  // dV += (P∘Z)ᵀ·dO
      to_a<DT, nt>(ctx, af, dp);
      accumulate_ab<D, nt / 2>(ctx, gk, af, qs + c0 * z::ld);  // dK += dSᵀ·Q
    }
    ctx.sync();
    n = nn;
  }
  write_rows<D>(ctx, gk, d.scale, dk, b, j0, g, d.kv_len, d.kv_heads);
  write_rows<D>(ctx, gv, 1.0f, dv, b, j0, g, d.kv_len, d.kv_heads);
}

}  // namespace kiln::cuda_kernels::flash::reg
