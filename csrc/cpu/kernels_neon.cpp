// AArch64 NEON build of the CPU kernels (kernels_impl.h): vec.h's RK_VEC_NEON flavour, V as two q
// registers driven by intrinsics (FMA, frintn, fcvtl/fcvtn for fp16, shll for bf16) rather than
// left to the auto-vectoriser as in kernels_generic.cpp. Advanced SIMD is part of the AArch64 base
// ISA, so ops.cpp takes this unit whenever it is built; the generic unit stays for
// ROPEKERN_CPU_ISA=generic. No target pragma is needed (the baseline already has every instruction
// used), and the unit compiles to nothing on other architectures (setup.py builds every
// csrc/cpu/*.cpp).
#if defined(__aarch64__)

#define RK_VEC_AVX2 0
#define RK_VEC_NEON 1
#define RK_ISA neon
#define RK_ISA_NAME "neon"
#define RK_KERNELS_SYMBOL kNeonKernels
#include "kernels_impl.h"

#endif  // aarch64
