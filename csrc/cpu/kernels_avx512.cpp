// AVX-512 build of the CPU kernels (kernels_impl.h): the matrix micro-kernels on zmm registers
// (16 lanes, 12-row tiles), everything else as in the AVX2 unit with AVX-512VL's 32 registers.
// ops.cpp selects it at run time when cpuid reports AVX-512F/BW/VL (with AVX2/FMA/F16C) and the OS
// saves the zmm state (XCR0). The target is set by pragma for this unit only, as in kernels_avx2.cpp.
//
// With RK_SIMDE=1 the same source is compiled against SIMDe's portable AVX-512 (the C++ harness,
// csrc/tests/test_cpu_kernels.cpp), so a machine without AVX-512 still runs this unit's code; that
// build is named avx512_simde and is never part of the extension.
#if defined(__x86_64__) || defined(_M_X64)

#include <stdint.h>
#include <string.h>

#if RK_SIMDE
#define RK_ISA avx512_simde
#define RK_ISA_NAME "avx512_simde"
#define RK_KERNELS_SYMBOL kAvx512SimdeKernels
#else
#include <immintrin.h>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define RK_ISA avx512
#define RK_ISA_NAME "avx512"
#define RK_KERNELS_SYMBOL kAvx512Kernels
#endif

#define RK_VEC_AVX2 1
#define RK_VEC_AVX512 1
#include "kernels_impl.h"

#if !RK_SIMDE
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif

#endif  // x86-64
