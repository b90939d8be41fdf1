// kiln/ops.hpp — every differentiable op, also reachable as kiln::<op>.
#pragma once

#include "kiln/ops/accuracy.hpp"
#include "kiln/ops/activation.hpp"
#include "kiln/ops/arithmetic.hpp"
#include "kiln/ops/attention.hpp"
#include "kiln/ops/cast.hpp"
#include "kiln/ops/embedding.hpp"
#include "kiln/ops/lora.hpp"
#include "kiln/ops/matmul.hpp"
#include "kiln/ops/norm.hpp"
#include "kiln/ops/reduce.hpp"
#include "kiln/ops/rope.hpp"
#include "kiln/ops/shape_ops.hpp"
#include "kiln/ops/softmax.hpp"

namespace kiln {
using ops::add, ops::sub, ops::mul, ops::div, ops::scale, ops::bias_add;
using ops::attention, ops::attention_packed, ops::attention_options, ops::rope;
using ops::cast;
using ops::embedding;
using ops::layer_norm, ops::rms_norm;
using ops::matmul, ops::bmm, ops::linear;
using ops::relu, ops::gelu, ops::silu, ops::swiglu, ops::dropout, ops::gelu_approximation;
using ops::reshape, ops::transpose, ops::slice, ops::concat, ops::unflatten;
namespace mask = ops::mask;
using ops::accuracy;
using ops::softmax, ops::log_softmax, ops::cross_entropy, ops::cross_entropy_options;
using ops::sum, ops::mean, ops::max, ops::mse;
using ops::operator+, ops::operator-, ops::operator*, ops::operator/;
}  // namespace kiln
