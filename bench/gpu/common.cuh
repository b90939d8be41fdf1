// bench/gpu/common.cuh — what the GPU benchmarks share: a checked CUDA call, an event
// timer, and the exit-77 skip where no GPU is visible.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace kiln_bench {

// Exits with the benchmark's name and CUDA's message when a call failed.
inline void ok(cudaError_t e, const char* what, const char* program = "gpu bench") {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s: %s\n", program, what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// Milliseconds per call of f over reps calls on the default stream, after one warm-up.
template <class F>
float time_ms(F f, int reps) {
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "event");
  ok(cudaEventCreate(&b), "event");
  f();
  ok(cudaEventRecord(a), "record");
  for (int i = 0; i < reps; ++i) f();
  ok(cudaEventRecord(b), "record");
  ok(cudaEventSynchronize(b), "sync");
  float ms = 0;
  ok(cudaEventElapsedTime(&ms, a, b), "elapsed");
  return ms / reps;
}

// The first device's properties; exits 77 (skipped) when no GPU is visible.
inline cudaDeviceProp device_or_skip(const char* program) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("%s: no GPU visible, skipped\n", program);
    std::exit(77);
  }
  cudaDeviceProp prop{};
  ok(cudaGetDeviceProperties(&prop, 0), "properties", program);
  return prop;
}

}  // namespace kiln_bench
