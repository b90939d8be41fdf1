// bench/gpu/adamw.cu — kiln's fused multi-tensor AdamW (kernels/adamw.cu) in GB/s, and as
// a fraction of this device's measured copy bandwidth, over GPT-2 124M's parameter
// shapes (issue 8's target: ≥ 85%). The peer, torch.optim.AdamW(fused=True) on the same
// shapes, is bench/gpu/torch_adamw.py; tools/gpu-check.sh runs both.
//
// Napkin math: an f32 AdamW step reads p, g, m, v and writes p, m, v: 28 bytes per
// parameter, 3.48 GB for 124.4 M parameters, ~0.9 ms at the H200's ~4 TB/s. The copy
// reference moves 2 × 1 GiB (read + write) per cudaMemcpyAsync.
// Output: one JSON line.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "common.cuh"
#include "kiln/cuda/kernels.hpp"

namespace ck = kiln::cuda_kernels;

using kiln_bench::ok;
using kiln_bench::time_ms;

namespace {

// GPT-2 124M (HF names): wte, wpe, 12 blocks, ln_f.
std::vector<std::int64_t> gpt2_shapes() {
  const std::int64_t C = 768;
  std::vector<std::int64_t> n = {50257 * C, 1024 * C};
  for (int l = 0; l < 12; ++l)
    for (std::int64_t s : {C, C, C * 3 * C, 3 * C, C * C, C, C, C, C * 4 * C, 4 * C, 4 * C * C, C}) n.push_back(s);
  n.push_back(C);
  n.push_back(C);
  return n;
}

}  // namespace

int main() {
  const cudaDeviceProp prop = kiln_bench::device_or_skip("gpu_adamw");
  const auto shapes = gpt2_shapes();
  std::int64_t total = 0;
  for (auto n : shapes) total += n;
  float *p, *g, *m, *v;
  for (float** b : {&p, &g, &m, &v}) {
    ok(cudaMalloc(b, total * sizeof(float)), "malloc");
    ok(cudaMemset(*b, 0, total * sizeof(float)), "memset");
  }
  std::vector<ck::adamw_chunk> chunks;
  std::int64_t first = 0;
  for (auto n : shapes) {
    for (std::int64_t off = 0; off < n; off += ck::adamw_chunk_elements)
      chunks.push_back({p + first + off, g + first + off, m + first + off, v + first + off, nullptr,
                        std::min(ck::adamw_chunk_elements, n - off), first + off, 0, 0});
    first += n;
  }
  ck::adamw_group grp{kiln::ops::fn::adamw_update{3e-4, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05}.as<float>()};
  ck::adamw_chunk* dchunks;
  ck::adamw_group* dgroup;
  ok(cudaMalloc(&dchunks, chunks.size() * sizeof(ck::adamw_chunk)), "malloc");
  ok(cudaMalloc(&dgroup, sizeof(ck::adamw_group)), "malloc");
  ok(cudaMemcpy(dchunks, chunks.data(), chunks.size() * sizeof(ck::adamw_chunk), cudaMemcpyHostToDevice), "copy");
  ok(cudaMemcpy(dgroup, &grp, sizeof grp, cudaMemcpyHostToDevice), "copy");

  const float adamw_ms =
      time_ms([&] { ck::adamw_step<float, void>(dchunks, static_cast<int>(chunks.size()), dgroup, nullptr); }, 20);
  const std::size_t copy_bytes = std::size_t{1} << 30;
  void *src, *dst;
  ok(cudaMalloc(&src, copy_bytes), "malloc");
  ok(cudaMalloc(&dst, copy_bytes), "malloc");
  const float copy_ms =
      time_ms([&] { ok(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice), "copy"); }, 20);
  const double adamw_gbps = 28.0 * double(total) / (adamw_ms * 1e-3) / 1e9;
  const double copy_gbps = 2.0 * double(copy_bytes) / (copy_ms * 1e-3) / 1e9;
  std::printf(
      "{\"impl\":\"kiln\",\"device\":\"%s\",\"params\":%lld,\"tensors\":%zu,\"step_ms\":%.4f,\"adamw_gbps\":%.1f,"
      "\"copy_gbps\":%.1f,\"fraction_of_copy\":%.3f}\n",
      prop.name, static_cast<long long>(total), shapes.size(), adamw_ms, adamw_gbps, copy_gbps, adamw_gbps / copy_gbps);
  return 0;
}
