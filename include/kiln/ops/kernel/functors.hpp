// kiln/ops/kernel/functors.hpp — scalar math, written once.
//
// Every activation, its derivative, and every per-element optimizer update lives here
// as a constexpr KILN_HOST_DEVICE functor on a compute type C (float or double). The CPU
// kernels in ops/cpu/ and the CUDA kernels in kernels/ both call these, so the two
// backends cannot drift apart (llm.c wrote GELU three times; we write it once).
// Derivative functors take (x, dy) and return dx; `y` forms take the forward output
// where that is cheaper.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kiln/core/config.hpp"

namespace kiln::ops::fn {

// exp for f32 in plain arithmetic, so loops over it vectorise (libm's expf/tanhf are
// calls the compiler cannot vectorise without -ffast-math; they were 17% of a GPT step).
// x = n·ln2 + r with |r| <= ln2/2, n an integer (ln2 split in two for an exact n·ln2_hi), e^r by its
// degree-7 Taylor polynomial (truncation < 2e-9 relative), 2^n from the exponent bits.
// Relative error ~1 ulp; inputs are clamped to [-87.3, 88.3] (no denormals, no inf).
// Always inlined: a call inside a loop stops it vectorising (GELU's loops fell to scalar
// code once exp_f32 had enough callers for GCC to outline it).
KILN_HOST_DEVICE KILN_FORCE_INLINE float exp_f32(float x) {
  x = std::max(-87.3f, std::min(x, 88.3f));
  // Round to nearest by adding and subtracting 1.5·2^23 (plain arithmetic: floorf would
  // not vectorise without -fno-trapping-math).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 +
                                          r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}
template <class C>
KILN_HOST_DEVICE KILN_FORCE_INLINE C exp_c(C x) {
  if constexpr (std::is_same_v<C, float>)
    return exp_f32(x);
  else
    return std::exp(x);
}
// tanh(x) = 1 − 2/(e^{2x} + 1): absolute error ~1e-7 in f32 (what GELU and its
// derivative need; they multiply by x and 1 − t²).
template <class C>
KILN_HOST_DEVICE KILN_FORCE_INLINE C tanh_c(C x) {
  if constexpr (std::is_same_v<C, float>)
    return 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f);
  else
    return std::tanh(x);
}

template <class C>
KILN_HOST_DEVICE KILN_FORCE_INLINE C sigmoid(C x) {
  return C(1) / (C(1) + exp_c(-x));
}

struct relu {
  template <class C>
  KILN_HOST_DEVICE constexpr C operator()(C x) const {
    return x > C(0) ? x : C(0);
  }
  template <class C>
  KILN_HOST_DEVICE constexpr C grad(C x, C dy) const {
    return x > C(0) ? dy : C(0);
  }
};

// GELU with the exact erf form: x * Phi(x).
struct gelu_exact {
  template <class C>
  KILN_HOST_DEVICE C operator()(C x) const {
    return C(0.5) * x * (C(1) + std::erf(x * C(0.70710678118654752440)));
  }
  template <class C>
  KILN_HOST_DEVICE C grad(C x, C dy) const {
    const C cdf = C(0.5) * (C(1) + std::erf(x * C(0.70710678118654752440)));
    const C pdf = std::exp(C(-0.5) * x * x) * C(0.39894228040143267794);
    return dy * (cdf + x * pdf);
  }
};

// GELU with the tanh approximation (GPT-2's "gelu_new").
struct gelu_tanh {
  static constexpr double k = 0.79788456080286535588;  // sqrt(2/pi)
  static constexpr double a = 0.044715;
  template <class C>
  KILN_HOST_DEVICE C operator()(C x) const {
    const C t = tanh_c(C(k) * (x + C(a) * x * x * x));
    return C(0.5) * x * (C(1) + t);
  }
  template <class C>
  KILN_HOST_DEVICE C grad(C x, C dy) const {
    const C t = tanh_c(C(k) * (x + C(a) * x * x * x));
    const C dinner = C(k) * (C(1) + C(3 * a) * x * x);
    return dy * (C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * dinner);
  }
};

// SiLU / swish: x * sigmoid(x).
struct silu {
  template <class C>
  KILN_HOST_DEVICE C operator()(C x) const {
    return x * sigmoid(x);
  }
  template <class C>
  KILN_HOST_DEVICE C grad(C x, C dy) const {
    const C s = sigmoid(x);
    return dy * s * (C(1) + x * (C(1) - s));
  }
};

// Rotary position embedding (Su et al. 2021) in the "rotate-half" layout of Hugging
// Face Llama: dimension c < D/2 pairs with c + D/2, and the pair at position p turns by
// p·θ^(−2c/D). The inverse frequency and angle are computed in f32 exactly as
// transformers does (1 / θ^(2c/D) with f32 operands, then p·inv_freq), so cos/sin agree
// bit for bit with the reference before any rounding of the activations.
KILN_HOST_DEVICE inline float rope_inv_freq(long long c, long long dim, float theta) {
  return 1.0f / std::pow(theta, static_cast<float>(2 * c) / static_cast<float>(dim));
}
struct rope_rotate {
  template <class C>
  KILN_HOST_DEVICE static void forward(C x1, C x2, C cos, C sin, C& y1, C& y2) {
    y1 = x1 * cos - x2 * sin;
    y2 = x2 * cos + x1 * sin;
  }
  // The rotation's transpose: the gradient turns back by the same angle.
  template <class C>
  KILN_HOST_DEVICE static void backward(C g1, C g2, C cos, C sin, C& d1, C& d2) {
    d1 = g1 * cos + g2 * sin;
    d2 = g2 * cos - g1 * sin;
  }
};

// AdamW (Loshchilov & Hutter; torch.optim.AdamW semantics): decoupled weight decay
// p -= lr*wd*p, then the Adam step with bias-corrected moments. One call updates one
// element's parameter and both moments in registers: the "fused" in fused AdamW.
template <class K = double>
struct basic_adamw_update {
  // Knobs in K: double when built on the host (an f64 run is exact); kernels convert
  // once to their compute type with as<C>() so the per-element math stays in C.
  K lr, beta1, beta2, eps, weight_decay;
  K bias_correction1;       // 1 - beta1^t
  K bias_correction2_sqrt;  // sqrt(1 - beta2^t)

  template <class K2>
  KILN_HOST_DEVICE constexpr basic_adamw_update<K2> as() const {
    return {K2(lr), K2(beta1), K2(beta2), K2(eps), K2(weight_decay), K2(bias_correction1), K2(bias_correction2_sqrt)};
  }
  template <class C>
  KILN_HOST_DEVICE void operator()(C& p, C g, C& m, C& v) const {
    p = p * (C(1) - C(lr) * C(weight_decay));
    m = C(beta1) * m + (C(1) - C(beta1)) * g;
    v = C(beta2) * v + (C(1) - C(beta2)) * g * g;
    const C denom = std::sqrt(v) / C(bias_correction2_sqrt) + C(eps);
    p = p - (C(lr) / C(bias_correction1)) * m / denom;
  }
};
using adamw_update = basic_adamw_update<double>;

// SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD semantics).
struct sgd_update {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
  bool first_step;  // the momentum buffer starts as the first gradient
  template <class C>
  KILN_HOST_DEVICE void operator()(C& p, C g, C& buf) const {
    if (weight_decay != 0.0) g = g + C(weight_decay) * p;
    if (momentum != 0.0) {
      buf = first_step ? g : C(momentum) * buf + (C(1) - C(dampening)) * g;
      g = nesterov ? g + C(momentum) * buf : buf;
    }
    p = p - C(lr) * g;
  }
};

// f32 → bf16 with stochastic rounding (Gupta et al. 2015; "Revisiting BFloat16 Training",
// Zamirai et al. 2020): x rounds up to the next bf16 with probability equal to its
// distance from the lower one, so E[round(x)] = x and many small updates to a bf16
// weight add up instead of vanishing under round-to-nearest. `r` supplies 16 random
// bits (the low half of one counter-RNG draw). Infinities and NaN pass through; a
// finite value that would round past the largest bf16 saturates to it.
KILN_HOST_DEVICE inline std::uint16_t bf16_bits_stochastic(float x, std::uint32_t r) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7F800000u) == 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | ((u & 0xFFFFu) ? 0x40u : 0u));
  const std::uint32_t up = u + (r & 0xFFFFu);
  if ((up & 0x7F800000u) == 0x7F800000u) return static_cast<std::uint16_t>(((u >> 16) & 0x8000u) | 0x7F7Fu);
  return static_cast<std::uint16_t>(up >> 16);
}

}  // namespace kiln::ops::fn
