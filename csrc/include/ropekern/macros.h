// Portability macros for the torch-free kernel headers (compiled by g++, clang and nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RK_HOST_DEVICE inline
#endif
