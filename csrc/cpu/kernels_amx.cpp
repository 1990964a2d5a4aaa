// AVX-512 + AMX build of the CPU kernels (kernels_impl.h): the avx512 unit, plus the tile unit
// (AMX-BF16) for the two products of the tiled kernel when the inputs are bf16 and the head dim a
// multiple of 32 (rotated Q/K and the probabilities rounded to bf16, fp32 accumulation). ops.cpp
// selects it at run time when cpuid reports AMX-TILE/AMX-BF16 on top of the avx512 unit's needs,
// XCR0 has the tile state on, and Linux grants the process the tile data (arch_prctl).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma clang attribute push(                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16")
#endif

#define RK_VEC_AVX2 1
#define RK_VEC_AVX512 1
#define RK_AMX 1
#define RK_ISA amx
#define RK_ISA_NAME "amx"
#define RK_KERNELS_SYMBOL kAmxKernels
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
