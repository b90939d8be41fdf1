// comm::nccl on the GPUs of this machine (suite gpu): run under mpirun with one rank per
// GPU (tests/gpu/run_nccl.sh picks the count). Every collective on device buffers is
// checked against its closed form; exits 77 (skip) where there is no GPU.
#include <cstdio>
#include <vector>

#include "kiln/comm/nccl.hpp"

#define CHECK_EQ(a, b)                                                                                             \
  do {                                                                                                             \
    if (!((a) == (b))) {                                                                                           \
      std::fprintf(stderr, "test_nccl: rank %d: %s == %s failed (%g vs %g) at line %d\n", rank, #a, #b, double(a), \
                   double(b), __LINE__);                                                                           \
      ++failures;                                                                                                  \
    }                                                                                                              \
  } while (0)

int main() try {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_nccl: no CUDA device, skipped\n");
    return 77;
  }
  kiln::comm::nccl c;
  const int rank = c.rank(), w = c.world_size();
  int failures = 0;
  const int n = 1000;
  std::vector<float> h(static_cast<std::size_t>(n * w));
  float* d = nullptr;
  cudaMalloc(&d, sizeof(float) * n * w);

  // all_reduce: element i of rank r is r + i; the sum is w·i + w(w-1)/2.
  for (int i = 0; i < n; ++i) h[i] = float(rank + i);
  cudaMemcpy(d, h.data(), sizeof(float) * n, cudaMemcpyHostToDevice);
  c.all_reduce(d, n, kiln::comm::op::sum, "sum");
  cudaMemcpy(h.data(), d, sizeof(float) * n, cudaMemcpyDeviceToHost);
  for (int i = 0; i < n; i += 97) CHECK_EQ(h[i], float(w * i + w * (w - 1) / 2));

  // reduce_scatter: block b of every rank's send holds b + rank.
  float* r = nullptr;
  cudaMalloc(&r, sizeof(float) * n);
  for (int b = 0; b < w; ++b)
    for (int i = 0; i < n; ++i) h[static_cast<std::size_t>(b * n + i)] = float(b + rank);
  cudaMemcpy(d, h.data(), sizeof(float) * n * w, cudaMemcpyHostToDevice);
  c.reduce_scatter(d, r, n, kiln::comm::op::sum, "rs");
  std::vector<float> got(n);
  cudaMemcpy(got.data(), r, sizeof(float) * n, cudaMemcpyDeviceToHost);
  CHECK_EQ(got[0], float(w * rank + w * (w - 1) / 2));

  // all_gather in place, and broadcast of bytes.
  for (int i = 0; i < n; ++i) h[static_cast<std::size_t>(rank * n + i)] = float(10 * rank + 1);
  cudaMemcpy(d + rank * n, h.data() + rank * n, sizeof(float) * n, cudaMemcpyHostToDevice);
  c.all_gather(d, n, "ag");
  cudaMemcpy(h.data(), d, sizeof(float) * n * w, cudaMemcpyDeviceToHost);
  for (int b = 0; b < w; ++b) CHECK_EQ(h[static_cast<std::size_t>(b * n)], float(10 * b + 1));
  unsigned char byte = rank == 0 ? 42 : 0;
  unsigned char* db = nullptr;
  cudaMalloc(&db, 1);
  cudaMemcpy(db, &byte, 1, cudaMemcpyHostToDevice);
  c.broadcast(reinterpret_cast<std::byte*>(db), 1, 0, "bcast");
  cudaMemcpy(&byte, db, 1, cudaMemcpyDeviceToHost);
  CHECK_EQ(int(byte), 42);
  c.barrier("end");
  cudaFree(d);
  cudaFree(r);
  cudaFree(db);
  std::printf("test_nccl: rank %d of %d on GPU %d: %s\n", rank, w, c.device(),
              failures ? "FAILED" : "all collectives correct");
  return failures ? 1 : 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
