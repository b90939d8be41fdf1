// kiln/ops/attention.hpp — differentiable scaled dot-product attention, one node.
//
// attention<Mask>(q, k, v, options): q [B, T, Hq, D], k and v [B, S, Hkv, D] with Hq a
// multiple of Hkv (grouped-query attention; Hkv = 1 is multi-query), result [B, T, Hq, D].
// Mask is a policy type from kiln/ops/kernel/attention_mask.hpp (none, causal, local<W>,
// strided<L>). Queries sit at absolute positions q_offset.. (default S − T: the queries
// are the newest positions, which is what a KV cache needs); keys at 0..S−1.
// The forward keeps O and one log-sum-exp per query row — never a T×S matrix — and the
// backward recomputes the probabilities tile by tile (kiln/ops/cpu/attention.hpp).
// bf16/f16 inputs compute in f32 and round the result once.
#pragma once

#include <cmath>
#include <memory>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cast.hpp"
#include "kiln/ops/cpu/attention.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"

namespace kiln::ops {

struct attention_options {
  double scale = 0.0;          // 0 means 1/sqrt(D)
  float dropout_p = 0.0f;      // dropout on the attention probabilities
  philox_stream rng{};         // the dropout stream (B·Hq·T·S elements are used)
  std::int64_t q_offset = -1;  // -1 means S − T
};

namespace detail {
template <class T, device Dev>
tensor<T, Dev> heads_layout(const tensor<T, Dev>& t) {
  const std::int64_t d = t.size(3);
  return (t.strides()[3] == 1 && (t.size(2) == 1 || t.strides()[2] == d)) ? t : t.contiguous();
}
template <class T, device Dev>
cpu::heads_view<const T> heads_of(const tensor<T, Dev>& t) {
  return {t.data(), t.strides()[0], t.strides()[1]};
}
}  // namespace detail

namespace detail {
inline cpu::attention_dims attention_dims_for(std::int64_t batch, std::int64_t q_len, std::int64_t kv_len,
                                              std::int64_t q_heads, std::int64_t kv_heads, std::int64_t head_dim,
                                              const attention_options& opt) {
  KILN_CHECK(opt.dropout_p >= 0.0f && opt.dropout_p < 1.0f, "attention: dropout_p ", opt.dropout_p,
             " is outside [0, 1)");
  cpu::attention_dims d;
  d.batch = batch;
  d.q_len = q_len;
  d.kv_len = kv_len;
  d.q_heads = q_heads;
  d.kv_heads = kv_heads;
  d.head_dim = head_dim;
  d.q_offset = opt.q_offset >= 0 ? opt.q_offset : std::max<std::int64_t>(0, kv_len - q_len);
  d.scale = opt.scale != 0.0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
  d.dropout_p = opt.dropout_p;
  d.rng = opt.rng;
  return d;
}
// A [B, L, ·, D] view of the buffer at `data` from element `offset` on, positions
// `pos_stride` apart (null data stays null: that gradient is not wanted).
template <class P>
cpu::heads_view<P> heads_at(P* data, std::int64_t offset, std::int64_t len, std::int64_t pos_stride) {
  return {data ? data + offset : nullptr, len * pos_stride, pos_stride};
}

// The mode of x's gradient write in a backward, when x wants one (overwrite otherwise).
template <floating_element T, device Dev>
grad_write grad_mode(const var<T, Dev>& x) {
  return x.requires_grad() ? x.begin_grad_write() : grad_write::overwrite;
}

// The device path (kernels/attention.cu through kiln/cuda/ops.hpp): q, k, v made
// contiguous [B, ·, H, D]; every gradient written with its own mode.
template <attention_mask Mask>
inline constexpr bool has_device_kernel = std::is_same_v<Mask, mask::none> || std::is_same_v<Mask, mask::causal> ||
                                          std::is_same_v<typename mask::device_form<Mask>::type, mask::local_n> ||
                                          std::is_same_v<typename mask::device_form<Mask>::type, mask::strided_n>;

inline cuda_kernels::attention_dims device_dims(const cpu::attention_dims& d) {
  cuda_kernels::attention_dims g;
  g.batch = d.batch;
  g.q_len = d.q_len;
  g.kv_len = d.kv_len;
  g.q_heads = d.q_heads;
  g.kv_heads = d.kv_heads;
  g.head_dim = d.head_dim;
  g.q_offset = d.q_offset;
  g.scale = static_cast<float>(d.scale);
  g.dropout_p = d.dropout_p;
  g.rng = d.rng;
  return g;
}

template <attention_mask Mask, floating_element T, device Dev>
var<T, Dev> attention_device(const var<T, Dev>& q, const var<T, Dev>& k, const var<T, Dev>& v,
                             const attention_options& opt) {
  static_assert(has_device_kernel<Mask>,
                "kiln::attention on cuda tensors: masks none, causal, local<W> and strided<L> have device kernels "
                "(kernels/attention.cu); compute this mask on the cpu");
  const cpu::attention_dims d =
      attention_dims_for(q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), opt);
  const cuda_kernels::attention_dims gd = device_dims(d);
  auto qv = q.value().contiguous(), kv = k.value().contiguous(), vv = v.value().contiguous();
  tensor<T, Dev> o(shape{d.batch, d.q_len, d.q_heads, d.head_dim});
  tensor<float, Dev> lse(shape{d.batch * d.q_heads * d.q_len});
  using DM = typename mask::device_form<Mask>::type;  // local<W> → local_n{W}, ...
  gpu::attention_forward<T, DM>(qv, kv, vv, o, lse, gd, mask::device_form<Mask>::make());
  if (!autograd::any_requires_grad(q, k, v)) return var<T, Dev>(std::move(o));
  return autograd::record(
      o,
      [q, k, v, qv, kv, vv, o, lse, gd](const tensor<T, Dev>& gy) mutable {
        const bool bq = q.requires_grad(), bk = k.requires_grad(), bv = v.requires_grad();
        const grad_write mq = grad_mode(q), mk = grad_mode(k), mv = grad_mode(v);
        gpu::attention_backward<T, DM>(qv, kv, vv, o, gy.contiguous(), lse, gd, bq ? &q.grad() : nullptr, mq,
                                       bk ? &k.grad() : nullptr, mk, bv ? &v.grad() : nullptr, mv,
                                       mask::device_form<Mask>::make());
      },
      q, k, v);
}
}  // namespace detail

template <attention_mask Mask = mask::causal, floating_element T, device Dev>
var<T, Dev> attention(const var<T, Dev>& q, const var<T, Dev>& k, const var<T, Dev>& v, attention_options opt = {}) {
  KILN_CHECK(q.rank() == 4 && k.rank() == 4 && v.rank() == 4,
             "attention: expects q [B, T, Hq, D] and k, v [B, S, Hkv, D], got q ", q.shape().str(), ", k ",
             k.shape().str(), ", v ", v.shape().str());
  KILN_CHECK(k.shape() == v.shape(), "attention: k ", k.shape().str(), " and v ", v.shape().str(), " differ");
  KILN_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "attention: q ", q.shape().str(), " and k ",
             k.shape().str(), " differ in batch or head dimension");
  KILN_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "attention: ", q.size(2), " query heads cannot share ",
             k.size(2), " key/value heads (grouped-query attention needs Hq to be a multiple of Hkv)");
  if constexpr (!Dev::is_host) {
    return detail::attention_device<Mask>(q, k, v, opt);
  } else if constexpr (!std::is_same_v<T, compute_t<T>>) {
    return cast<T>(attention<Mask>(cast<f32>(q), cast<f32>(k), cast<f32>(v), opt));
  } else {
    const cpu::attention_dims d =
        detail::attention_dims_for(q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), opt);
    auto qv = detail::heads_layout(q.value()), kv = detail::heads_layout(k.value()),
         vv = detail::heads_layout(v.value());
    tensor<T, Dev> o(shape{d.batch, d.q_len, d.q_heads, d.head_dim});
    auto lse = std::make_shared<std::vector<T>>(static_cast<std::size_t>(d.batch * d.q_heads * d.q_len));
    cpu::attention_forward<Mask, T>(d, detail::heads_of(qv), detail::heads_of(kv), detail::heads_of(vv),
                                    {o.data(), o.strides()[0], o.strides()[1]}, lse->data());
    if (!autograd::any_requires_grad(q, k, v)) return var<T, Dev>(std::move(o));
    return autograd::record(
        o,
        [q, k, v, qv, kv, vv, o, lse, d](const tensor<T, Dev>& gy) mutable {
          const bool bq = q.requires_grad(), bk = k.requires_grad(), bv = v.requires_grad();
          const grad_write mq = detail::grad_mode(q), mk = detail::grad_mode(k), mv = detail::grad_mode(v);
          auto g = gy.contiguous();
          const std::int64_t D = d.head_dim;
          cpu::attention_backward<Mask, T>(
              d, detail::heads_of(qv), detail::heads_of(kv), detail::heads_of(vv), detail::heads_of(o),
              detail::heads_of(g), lse->data(),
              detail::heads_at(bq ? q.grad().data() : nullptr, 0, d.q_len, d.q_heads * D), mq,
              detail::heads_at(bk ? k.grad().data() : nullptr, 0, d.kv_len, d.kv_heads * D), mk,
              detail::heads_at(bv ? v.grad().data() : nullptr, 0, d.kv_len, d.kv_heads * D), mv);
        },
        q, k, v);
  }
}

// Attention on one packed projection: qkv [B, T, (Hq + 2·Hkv)·D] holds, per position, the
// Hq query heads, then the Hkv key heads, then the Hkv value heads (GPT-2's c_attn output;
// HF splits it the same way). Returns [B, T, Hq·D], heads side by side, ready for the
// output projection. The same op as attention(q, k, v) on the three slices, without the
// slice/reshape nodes: the forward reads the heads in place and the backward writes dq,
// dk and dv straight into qkv's gradient (each element once), where the sliced form
// copied each part into its own buffer, zero-filled qkv's and added the three in
// (bench/gpt_train.cpp: those passes were ~4% of a step).
template <attention_mask Mask = mask::causal, floating_element T, device Dev>
var<T, Dev> attention_packed(const var<T, Dev>& qkv, std::int64_t q_heads, std::int64_t kv_heads,
                             attention_options opt = {}) {
  KILN_CHECK(qkv.rank() == 3, "attention_packed: expects qkv [B, T, (Hq + 2·Hkv)·D], got ", qkv.shape().str());
  KILN_CHECK(q_heads > 0 && kv_heads > 0 && q_heads % kv_heads == 0, "attention_packed: ", q_heads,
             " query heads cannot share ", kv_heads,
             " key/value heads (grouped-query attention needs Hq to be a multiple of Hkv)");
  const std::int64_t width = qkv.size(2), heads = q_heads + 2 * kv_heads;
  KILN_CHECK(width % heads == 0, "attention_packed: the last dimension ", width, " of qkv ", qkv.shape().str(),
             " is not (Hq + 2·Hkv)·D for Hq = ", q_heads, ", Hkv = ", kv_heads);
  if constexpr (!Dev::is_host) {
    // On the device: the three head groups copied out contiguous, the kernels, and the
    // gradients stored back into their slices of qkv's (each element once, so each
    // slice takes the gradient's mode).
    const std::int64_t B = qkv.size(0), L = qkv.size(1), D = width / heads;
    const cpu::attention_dims d = detail::attention_dims_for(B, L, L, q_heads, kv_heads, D, opt);
    const cuda_kernels::attention_dims gd = detail::device_dims(d);
    static_assert(
        detail::has_device_kernel<Mask>,
        "kiln::attention_packed on cuda tensors: masks none, causal, local<W> and strided<L> have device kernels "
        "(kernels/attention.cu); compute this mask on the cpu");
    auto x = qkv.value().contiguous().reshape(shape{B, L, heads, D});
    auto qv = x.slice(2, 0, q_heads).contiguous(), kv = x.slice(2, q_heads, q_heads + kv_heads).contiguous(),
         vv = x.slice(2, q_heads + kv_heads, heads).contiguous();
    tensor<T, Dev> o(shape{B, L, q_heads, D});
    tensor<float, Dev> lse(shape{B * q_heads * L});
    using DM = typename mask::device_form<Mask>::type;
    gpu::attention_forward<T, DM>(qv, kv, vv, o, lse, gd, mask::device_form<Mask>::make());
    tensor<T, Dev> out = o.reshape(shape{B, L, q_heads * D});
    if (!autograd::any_requires_grad(qkv)) return var<T, Dev>(std::move(out));
    return autograd::record(
        out,
        [qkv, qv, kv, vv, o, lse, gd, B, L, D, heads, q_heads, kv_heads](const tensor<T, Dev>& gy) mutable {
          const grad_write m = qkv.begin_grad_write();
          tensor<T, Dev> dq(qv.shape()), dk(kv.shape()), dv(vv.shape());
          gpu::attention_backward<T, DM>(qv, kv, vv, o, gy.contiguous().reshape(o.shape()), lse, gd, &dq,
                                         grad_write::overwrite, &dk, grad_write::overwrite, &dv, grad_write::overwrite,
                                         mask::device_form<Mask>::make());
          auto g = qkv.grad().reshape(shape{B, L, heads, D});
          gpu::strided_store(g.slice(2, 0, q_heads), dq, m);
          gpu::strided_store(g.slice(2, q_heads, q_heads + kv_heads), dk, m);
          gpu::strided_store(g.slice(2, q_heads + kv_heads, heads), dv, m);
        },
        qkv);
  } else if constexpr (!std::is_same_v<T, compute_t<T>>) {
    return cast<T>(attention_packed<Mask>(cast<f32>(qkv), q_heads, kv_heads, opt));
  } else {
    const std::int64_t B = qkv.size(0), L = qkv.size(1), D = width / heads;
    const cpu::attention_dims d = detail::attention_dims_for(B, L, L, q_heads, kv_heads, D, opt);
    const std::int64_t k_off = q_heads * D, v_off = (q_heads + kv_heads) * D;
    auto x = qkv.value().contiguous();
    tensor<T, Dev> o(shape{B, L, q_heads * D});
    auto lse = std::make_shared<std::vector<T>>(static_cast<std::size_t>(B * q_heads * L));
    const T* xp = x.data();
    cpu::attention_forward<Mask, T>(d, detail::heads_at(xp, 0, L, width), detail::heads_at(xp, k_off, L, width),
                                    detail::heads_at(xp, v_off, L, width), detail::heads_at(o.data(), 0, L, k_off),
                                    lse->data());
    if (!autograd::any_requires_grad(qkv)) return var<T, Dev>(std::move(o));
    return autograd::record(
        o,
        [qkv, x, o, lse, d, width, k_off, v_off](const tensor<T, Dev>& gy) mutable {
          const grad_write m = qkv.begin_grad_write();
          auto g = gy.contiguous();
          const T* xp = x.data();
          T* gp = qkv.grad().data();
          const std::int64_t L = d.q_len;
          cpu::attention_backward<Mask, T>(d, detail::heads_at(xp, 0, L, width), detail::heads_at(xp, k_off, L, width),
                                           detail::heads_at(xp, v_off, L, width),
                                           detail::heads_at(static_cast<const T*>(o.data()), 0, L, k_off),
                                           detail::heads_at(static_cast<const T*>(g.data()), 0, L, k_off), lse->data(),
                                           detail::heads_at(gp, 0, L, width), m, detail::heads_at(gp, k_off, L, width),
                                           m, detail::heads_at(gp, v_off, L, width), m);
        },
        qkv);
  }
}

}  // namespace kiln::ops
