// bench/gpu/attention.cu — kiln's attention forward + backward (kernels/attention.cu) in
// TFLOP/s on bf16 causal self-attention at GPT-2 124M's shape and at a head dim of 128.
// The peer, torch's scaled_dot_product_attention on the same shapes, is
// bench/gpu/torch_attention.py; tools/gpu-check.sh runs both (issue 8's target: ≥ 0.9x
// torch, stretch 1.0x).
//
// FLOPs counted as FlashAttention's benchmarks do: 4·B·H·T²·D forward (two GEMMs), 2.5x
// that backward, halved under the causal mask. Output: one JSON line per shape and kernel
// set — the register-resident tensor-core programs (the default), the staged-tile ones
// (attention_dims::staged_tiles), then the CUDA-core reference kernels
// (attention_dims::reference_kernels), so one run shows what each step bought.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "common.cuh"
#include "kiln/core/philox.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"

namespace ck = kiln::cuda_kernels;
using kiln::bf16;

using kiln_bench::ok;
using kiln_bench::time_ms;

namespace {
bf16* random_device(std::size_t n, std::uint64_t seed) {
  kiln::philox_stream s{seed, 0};
  std::vector<bf16> h(n);
  for (std::size_t i = 0; i < n; ++i) h[i] = bf16(2.0f * s.uniform(i) - 1.0f);
  bf16* d = nullptr;
  ok(cudaMalloc(&d, n * sizeof(bf16)), "malloc");
  ok(cudaMemcpy(d, h.data(), n * sizeof(bf16), cudaMemcpyHostToDevice), "copy");
  return d;
}

enum class kernels { registers, staged, reference };
const char* name_of(kernels k) {
  return k == kernels::registers ? "tensor cores, registers (mma.sync)"
         : k == kernels::staged  ? "tensor cores, staged tiles (wmma)"
                                 : "reference (CUDA cores)";
}

void run(const char* device, std::int64_t B, std::int64_t T, std::int64_t H, std::int64_t D, kernels which) {
  ck::attention_dims d;
  d.reference_kernels = which == kernels::reference;
  d.staged_tiles = which == kernels::staged;
  d.batch = B;
  d.q_len = d.kv_len = T;
  d.q_heads = d.kv_heads = H;
  d.head_dim = D;
  d.scale = 1.0f / std::sqrt(float(D));
  const std::size_t n = static_cast<std::size_t>(B * T * H * D);
  bf16 *q = random_device(n, 1), *k = random_device(n, 2), *v = random_device(n, 3), *dout = random_device(n, 4);
  bf16 *o, *dq, *dk, *dv;
  float *lse, *delta;
  for (bf16** p : {&o, &dq, &dk, &dv}) ok(cudaMalloc(p, n * sizeof(bf16)), "malloc");
  ok(cudaMalloc(&lse, B * H * T * sizeof(float)), "malloc");
  ok(cudaMalloc(&delta, B * H * T * sizeof(float)), "malloc");
  using causal = kiln::ops::mask::causal;
  const float fwd = time_ms([&] { ck::attention_forward<bf16, causal>(q, k, v, o, lse, d, nullptr); }, 10);
  const float bwd =
      time_ms([&] { ck::attention_backward<bf16, causal>(q, k, v, o, dout, lse, delta, dq, dk, dv, d, nullptr); }, 10);
  const double flops_fwd = 4.0 * B * H * double(T) * T * D * 0.5;
  const double tflops = 3.5 * flops_fwd / ((fwd + bwd) * 1e-3) / 1e12;
  std::printf(
      "{\"impl\":\"kiln\",\"kernels\":\"%s\",\"device\":\"%s\",\"dtype\":\"bf16\",\"mask\":\"causal\",\"B\":%lld,\"T\":"
      "%lld,\"H\":%lld,"
      "\"D\":%lld,\"fwd_ms\":%.4f,\"bwd_ms\":%.4f,\"fwd_bwd_tflops\":%.2f}\n",
      name_of(which), device, static_cast<long long>(B), static_cast<long long>(T), static_cast<long long>(H),
      static_cast<long long>(D), fwd, bwd, tflops);
  for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(dout),
                  static_cast<void*>(o), static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv),
                  static_cast<void*>(lse), static_cast<void*>(delta)})
    cudaFree(p);
}
}  // namespace

int main() {
  const cudaDeviceProp prop = kiln_bench::device_or_skip("gpu_attention");
  for (kernels which : {kernels::registers, kernels::staged, kernels::reference}) {
    run(prop.name, 4, 1024, 12, 64, which);   // GPT-2 124M
    run(prop.name, 2, 2048, 16, 128, which);  // a head dim of 128
  }
  return 0;
}
