// Warp-level primitives of the sm80+ kernels: ldmatrix, mma.sync m16n8k16 (fp16/bf16 in, fp32
// accumulate), cp.async with zero-fill, quad reductions. Inline PTX on the device; under
// RK_EMULATE the host emulation in emu/simt.h with the same semantics.
#pragma once

#include "common.h"

namespace ropekern {
namespace cuda {

#if defined(RK_EMULATE)

}  // namespace cuda
}  // namespace ropekern
#include <type_traits>
namespace ropekern {
namespace cuda {

inline void syncthreads() { rk_emu::syncthreads(); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { rk_emu::ldmatrix_x4(r, smem_row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { rk_emu::ldmatrix_x4(r, smem_row, true); }
template <typename Element>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  rk_emu::mma_16816(d, a, b0, b1, std::is_same<Element, bf16_t>::value);
}
inline void cp_async_16(void* smem, const void* gmem, bool valid) { rk_emu::copy_async_16(smem, gmem, valid); }
inline void cp_async_commit() { rk_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  rk_emu::cp_async_wait(N);
}
inline float shfl_xor(float v, int mask) { return rk_emu::bits_f32(rk_emu::shfl_xor(rk_emu::f32_bits(v), mask)); }

#else

RK_DEVICE void syncthreads() { __syncthreads(); }

RK_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

RK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

RK_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

// d += a * b for one m16n8k16 tile.
template <typename Element>
RK_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
RK_DEVICE void mma_16816<half_t>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
RK_DEVICE void mma_16816<bf16_t>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy that bypasses L1 (.cg); `valid == false` reads nothing and
// writes 16 zero bytes (src-size 0), which is how rows past the end of a sequence are padded.
RK_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
RK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
RK_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

RK_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

#endif

// Reductions over the 4 lanes of a quad (the lanes that share an accumulator row).
RK_DEVICE float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  return fmaxf(v, shfl_xor(v, 2));
}
RK_DEVICE float quad_sum(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}

}  // namespace cuda
}  // namespace ropekern
