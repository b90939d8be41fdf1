// kiln/ops/attention.hpp — differentiable scaled dot-product attention, one node.
//
// attention<Mask>(q, k, v, options): q [B, T, Hq, D], k and v [B, S, Hkv, D] with Hq a
// multiple of Hkv (grouped-query attention; Hkv = 1 is multi-query), result [B, T, Hq, D].
// Mask is a policy type from kiln/ops/attention_mask.hpp (none, causal, local<W>,
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
#include "kiln/ops/attention_mask.hpp"
#include "kiln/ops/cast.hpp"
#include "kiln/ops/cpu/attention.hpp"

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
  KILN_CHECK(opt.dropout_p >= 0.0f && opt.dropout_p < 1.0f, "attention: dropout_p ", opt.dropout_p,
             " is outside [0, 1)");
  if constexpr (!std::is_same_v<T, compute_t<T>>) {
    return cast<T>(attention<Mask>(cast<f32>(q), cast<f32>(k), cast<f32>(v), opt));
  } else {
    cpu::attention_dims d;
    d.batch = q.size(0);
    d.q_len = q.size(1);
    d.kv_len = k.size(1);
    d.q_heads = q.size(2);
    d.kv_heads = k.size(2);
    d.head_dim = q.size(3);
    d.q_offset = opt.q_offset >= 0 ? opt.q_offset : std::max<std::int64_t>(0, d.kv_len - d.q_len);
    d.scale = opt.scale != 0.0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(d.head_dim));
    d.dropout_p = opt.dropout_p;
    d.rng = opt.rng;
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
          const grad_write mq = bq ? q.begin_grad_write() : grad_write::overwrite;
          const grad_write mk = bk ? k.begin_grad_write() : grad_write::overwrite;
          const grad_write mv = bv ? v.begin_grad_write() : grad_write::overwrite;
          auto g = gy.contiguous();
          cpu::attention_backward<Mask, T>(d, detail::heads_of(qv), detail::heads_of(kv), detail::heads_of(vv),
                                           detail::heads_of(o), detail::heads_of(g), lse->data(),
                                           bq ? q.grad().data() : nullptr, mq, bk ? k.grad().data() : nullptr, mk,
                                           bv ? v.grad().data() : nullptr, mv);
        },
        q, k, v);
  }
}

}  // namespace kiln::ops
