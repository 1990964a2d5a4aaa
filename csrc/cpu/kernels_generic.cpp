// Portable build of the CPU kernels (kernels_impl.h): eight-float arrays that the compiler
// vectorises for the baseline ISA (SSE2 on x86-64, NEON on aarch64). Used where AVX2/FMA/F16C
// are missing, on non-x86 machines, and when ROPEKERN_CPU_ISA=generic.
#define RK_VEC_AVX2 0
#define RK_ISA generic
#define RK_ISA_NAME "generic"
#define RK_KERNELS_SYMBOL kGenericKernels
#include "kernels_impl.h"
