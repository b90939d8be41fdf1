// kiln/precision/precision.hpp — every precision policy (the spec is in policy.hpp).
//
//   fp32         f32 everywhere
//   bf16_mixed   bf16 compute, f32 master weights and optimizer math
//   f16_mixed<S> f16 compute, f32 master weights, loss scaler S (dynamic_loss_scaler)
//   bf16_true    bf16 everywhere, optional stochastic rounding of the weights
//   f16_true     f16 everywhere, no loss scaling
#pragma once

#include "kiln/precision/fp32.hpp"
#include "kiln/precision/mixed.hpp"
#include "kiln/precision/true_half.hpp"
