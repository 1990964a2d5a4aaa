// Portability layer of the CUDA kernels: the same kernel source compiles with nvcc for the device,
// and with a host compiler under -DRK_EMULATE for the CPU emulation harness (emu/simt.h).
// No torch header may be included here or by anything that includes this file, except the
// torch-facing launcher bindings_cuda.cpp.
#pragma once

#include <math.h>
#include <stdint.h>

#include "ropekern/macros.h"

#if defined(RK_EMULATE)
#include "emu/simt.h"
#define RK_DEVICE inline
#define RK_GLOBAL
#define RK_LAUNCH_BOUNDS(threads)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RK_DEVICE __device__ __forceinline__
#define RK_GLOBAL __global__
#define RK_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#endif

namespace ropekern {
namespace cuda {

#if defined(RK_EMULATE)
using half_t = rk_emu::half;
using bf16_t = rk_emu::bfloat16;
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
#endif

// Element types the kernels are instantiated for (the runtime tag of the dispatch layer).
enum class DType { kFloat16, kBFloat16, kFloat32 };

RK_HOST_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }
RK_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
RK_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }

// fp32 <-> storage type, and two values packed into one 32-bit register (first in the low half,
// the order mma.sync and ldmatrix use for consecutive columns).
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static RK_DEVICE float to_float(float x) { return x; }
  static RK_DEVICE float from_float(float x) { return x; }
};

template <>
struct Convert<half_t> {
  static constexpr uint32_t kExponent = 0x7C00u;  // all ones: an infinity or a NaN
#if defined(RK_EMULATE)
  static inline float to_float(half_t x) { return rk_emu::half_bits_to_float(x.bits); }
  static inline half_t from_float(float x) { return half_t{rk_emu::float_to_half_bits(x)}; }
  static inline uint32_t pack2(float lo, float hi) {
    return static_cast<uint32_t>(rk_emu::float_to_half_bits(lo)) |
           (static_cast<uint32_t>(rk_emu::float_to_half_bits(hi)) << 16);
  }
#else
  static RK_DEVICE float to_float(half_t x) { return __half2float(x); }
  static RK_DEVICE half_t from_float(float x) { return __float2half_rn(x); }
  static RK_DEVICE uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
#endif
};

template <>
struct Convert<bf16_t> {
  static constexpr uint32_t kExponent = 0x7F80u;
#if defined(RK_EMULATE)
  static inline float to_float(bf16_t x) { return rk_emu::bf16_bits_to_float(x.bits); }
  static inline bf16_t from_float(float x) { return bf16_t{rk_emu::float_to_bf16_bits(x)}; }
  static inline uint32_t pack2(float lo, float hi) {
    return static_cast<uint32_t>(rk_emu::float_to_bf16_bits(lo)) |
           (static_cast<uint32_t>(rk_emu::float_to_bf16_bits(hi)) << 16);
  }
#else
  static RK_DEVICE float to_float(bf16_t x) { return __bfloat162float(x); }
  static RK_DEVICE bf16_t from_float(float x) { return __float2bfloat16_rn(x); }
  static RK_DEVICE uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
#endif
};

// The two 16-bit elements packed in `w` with NaN and infinities (exponent all ones) set to +0.
template <typename Element>
RK_DEVICE uint32_t zero_nonfinite2(uint32_t w) {
  constexpr uint32_t e = Convert<Element>::kExponent;
  if ((w & e) == e) w &= 0xFFFF0000u;
  if (((w >> 16) & e) == e) w &= 0x0000FFFFu;
  return w;
}

}  // namespace cuda
}  // namespace ropekern
