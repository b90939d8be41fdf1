// Compiled by nvcc in CI: every public header must be usable from a CUDA translation
// unit, and the shared scalar functors must be callable from device code.
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/cuda/blas.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/kiln.hpp"
#include "kiln/nn/llama.hpp"
#include "kiln/nn/peft.hpp"
#include "kiln/train.hpp"

__global__ void apply_gelu(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = kiln::ops::fn::gelu_tanh{}(x[i]);
}

__global__ void philox_fill(float* x, int n, kiln::philox_stream s) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = s.uniform(static_cast<unsigned long long>(i));
}

// Stochastic rounding to bf16, the functor the optimizers use on the host.
__global__ void round_bf16(const float* x, unsigned short* y, int n, kiln::philox_stream s) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = kiln::ops::fn::bf16_bits_stochastic(x[i], s.bits(static_cast<unsigned long long>(i)));
}

int host_side() {
  kiln::var<float> a(kiln::tensor<float>::ones({2, 2}), true);
  auto l = kiln::sum(kiln::matmul(a, a));
  l.backward();
  return static_cast<int>(a.grad().data()[0]);
}

// A LoRA-adapted layer (the fused node) and the PEFT file code in a CUDA translation unit.
int lora_host_side() {
  kiln::nn::lora_linear<float> l(4, 3);
  l.attach(2, 1.0, 0.0f);
  auto y = l(kiln::var<float>(kiln::tensor<float>::ones({2, 4}), true));
  kiln::sum(y).backward();
  kiln::nn::llama<kiln::ops::mask::causal, kiln::nn::recompute::none, float, kiln::cpu, kiln::nn::adapter::lora> m;
  return static_cast<int>(kiln::nn::count_lora(m).adapted + l.rank());
}

// The trainer, with a callback and a logger, instantiated in a CUDA translation unit.
struct nvcc_module {
  kiln::nn::linear<float> lin{4, 1};
  template <class F>
  void for_each_child(F&& f) {
    f("lin", lin);
  }
  kiln::var<float> training_step(auto& ctx, const kiln::data::labelled_batch& b) {
    auto loss = kiln::cross_entropy(lin(kiln::var<float>(b.x)), b.y);
    ctx.log("train/loss", loss);
    return loss;
  }
  auto configure_optimizers() { return kiln::optim::adamw<float>(*this); }
};

double trainer_side(kiln::data::data_loader<kiln::data::tensor_dataset>& loader) {
  nvcc_module m;
  kiln::trainer<nvcc_module, kiln::strategy::single_device<kiln::cpu>, kiln::precision::fp32,
                kiln::callbacks::early_stopping, kiln::loggers::csv>
      t({.max_epochs = 1});
  return static_cast<double>(t.fit(m, loader).global_step);
}

// A mixed-precision trainer (bf16 module, f32 masters) and its memory plan, under nvcc.
template <class T>
struct nvcc_mixed {
  kiln::nn::linear<T> lin{4, 3};
  template <class F>
  void for_each_child(F&& f) {
    f("lin", lin);
  }
  kiln::var<float> training_step(auto&, const kiln::data::labelled_batch& b) {
    return kiln::cross_entropy(kiln::ops::cast<float>(lin(kiln::var<T>(b.x.template to<T>()))), b.y);
  }
  auto configure_optimizers() { return kiln::optim::adamw<T>(*this); }
};

double mixed_side(kiln::data::data_loader<kiln::data::tensor_dataset>& loader) {
  using P = kiln::precision::bf16_mixed;
  nvcc_mixed<kiln::precision::param_t<P>> m;
  kiln::trainer<nvcc_mixed<kiln::precision::param_t<P>>, kiln::strategy::single_device<kiln::cpu>, P> t(
      {.max_epochs = 1});
  const auto plan = t.plan(m, loader);
  return static_cast<double>(t.fit(m, loader).global_step + plan.devices.at(0).total());
}
