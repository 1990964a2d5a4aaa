// AVX2 + FMA + F16C build of the CPU kernels (kernels_impl.h), selected at run time by ops.cpp
// when cpuid reports all three. The target is set by pragma for this unit only, so setup.py needs
// no per-file flags and the rest of the extension stays runnable on any x86-64. System headers
// come first, outside the target region; everything compiled inside it has internal names
// (namespace ropekern::cpu::avx2), so no AVX2 code can be shared with the generic unit.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define RK_VEC_AVX2 1
#define RK_ISA avx2
#define RK_ISA_NAME "avx2"
#define RK_KERNELS_SYMBOL kAvx2Kernels
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
