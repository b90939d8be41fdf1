// bench/gpu/cross_entropy.cu — kiln's fused softmax cross-entropy (kernels/cross_entropy.cu)
// forward + backward at GPT-2 124M's head (8 × 1024 rows, vocabulary 50257, bf16 logits):
// time, and the device memory the op needs beyond its logits and targets. The gradient
// is written over the logits (in place) and only one f32 loss per row is kept, so the
// extra memory is rows · 4 bytes; the probability matrix is never materialised. The
// peer, torch.nn.functional.cross_entropy on the same logits, is
// bench/gpu/torch_cross_entropy.py (it reports torch's measured peak over its inputs).
// tools/gpu-check.sh runs both. Output: one JSON line.
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "common.cuh"
#include "kiln/core/philox.hpp"
#include "kiln/cuda/kernels.hpp"

namespace ck = kiln::cuda_kernels;
using kiln::bf16;

using kiln_bench::ok;

namespace {
std::size_t used_bytes() {
  std::size_t free = 0, total = 0;
  ok(cudaDeviceSynchronize(), "sync");
  ok(cudaMemGetInfo(&free, &total), "mem info");
  return total - free;
}
}  // namespace

int main() {
  const cudaDeviceProp prop = kiln_bench::device_or_skip("gpu_cross_entropy");
  const std::int64_t rows = 8 * 1024, vocab = 50257;
  kiln::philox_stream s{5, 0};
  std::vector<bf16> h(static_cast<std::size_t>(rows * vocab));
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = bf16(4.0f * s.uniform(i) - 2.0f);
  std::vector<std::int64_t> t(static_cast<std::size_t>(rows));
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<std::int64_t>((i * 7919) % vocab);
  bf16* logits;
  std::int64_t* targets;
  ok(cudaMalloc(&logits, h.size() * sizeof(bf16)), "malloc");
  ok(cudaMalloc(&targets, t.size() * sizeof(std::int64_t)), "malloc");
  ok(cudaMemcpy(targets, t.data(), t.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice), "copy");
  const std::size_t before = used_bytes();
  float* loss;
  ok(cudaMalloc(&loss, rows * sizeof(float)), "malloc");
  const std::size_t extra = used_bytes() - before;  // the allocation granularity rounds this up
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "event");
  ok(cudaEventCreate(&b), "event");
  const int reps = 10;
  float total_ms = 0;
  for (int r = 0; r <= reps; ++r) {  // the first is the warm-up
    ok(cudaMemcpy(logits, h.data(), h.size() * sizeof(bf16), cudaMemcpyHostToDevice), "copy");
    ok(cudaEventRecord(a), "record");
    ck::cross_entropy<bf16>(logits, targets, loss, logits, 1.0f / float(rows), rows, vocab, -100, nullptr);
    ok(cudaEventRecord(b), "record");
    ok(cudaEventSynchronize(b), "sync");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, a, b), "elapsed");
    if (r) total_ms += ms;
  }
  std::printf(
      "{\"impl\":\"kiln\",\"device\":\"%s\",\"rows\":%lld,\"vocab\":%lld,\"dtype\":\"bf16\",\"fwd_bwd_ms\":%.4f,"
      "\"logits_mb\":%.1f,\"extra_mb\":%.2f,\"extra_mb_counted\":%.3f}\n",
      prop.name, static_cast<long long>(rows), static_cast<long long>(vocab), total_ms / reps,
      double(h.size() * sizeof(bf16)) / 1e6, double(extra) / 1e6, double(rows * sizeof(float)) / 1e6);
  return 0;
}
