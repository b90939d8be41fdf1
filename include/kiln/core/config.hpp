// kiln/core/config.hpp — portability macros shared by host code and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KILN_HOST_DEVICE __host__ __device__
#define KILN_DEVICE __device__
#else
#define KILN_HOST_DEVICE
#define KILN_DEVICE
#endif

#define KILN_FORCE_INLINE inline __attribute__((always_inline))

#if defined(__CUDA_ARCH__)
#define KILN_ON_DEVICE 1
#else
#define KILN_ON_DEVICE 0
#endif
