// Eight-lane fp32 vectors (V) for the CPU kernels, and sixteen-lane ones (W) for their matrix
// micro-kernels, in three flavours selected by the including unit:
//   RK_VEC_AVX512=1  AVX-512F/BW/VL (+ the AVX2 set below): W is one zmm register
//                    (kernels_avx512.cpp; with RK_SIMDE the same source through SIMDe's portable
//                    AVX-512, so machines without it still test it);
//   RK_VEC_AVX2=1    AVX2 + FMA + F16C intrinsics: V is one ymm register, W two
//                    (kernels_avx2.cpp and, for V, kernels_avx512.cpp);
//   RK_VEC_NEON=1    AArch64 Advanced SIMD intrinsics: V is two q registers, W four
//                    (kernels_neon.cpp);
//   otherwise        plain arrays with loops that any compiler vectorises for its baseline ISA
//                    (SSE2 on x86-64, NEON on aarch64) (kernels_generic.cpp).
// Everything lives in namespace ropekern::cpu::RK_ISA and is force-inlined, so the units never
// share an out-of-line function: a generic caller can never land in AVX2 code on an older CPU.
// No C++ standard library here for the same reason (its inline templates are shared by name).
#pragma once

#include <stdint.h>
#include <string.h>

#if RK_VEC_AVX512 && !RK_VEC_AVX2
#error "the AVX-512 flavour builds on the AVX2 one: define RK_VEC_AVX2=1 too"
#endif

#if RK_VEC_AVX2
#if RK_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#include <immintrin.h>
#endif
#endif

#if RK_VEC_NEON
#if RK_VEC_AVX2 || !defined(__aarch64__)
// vrndnq_f32, vcvtnq_s32_f32, vpaddq_f32, vzip1q_f32, vfmaq_f32 ... are AArch64 (A64) only.
#error "the NEON flavour is AArch64 only and excludes the AVX ones"
#endif
#include <arm_neon.h>
#endif

#ifndef RK_ISA
#error "define RK_ISA (the per-ISA namespace) before including vec.h"
#endif

#define RK_INLINE inline __attribute__((always_inline))

namespace ropekern {
namespace cpu {
namespace RK_ISA {

constexpr int kLanes = 8;
constexpr float kInf = __builtin_inff();

RK_INLINE float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
RK_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
RK_INLINE int imin(int a, int b) { return a < b ? a : b; }
RK_INLINE int imax(int a, int b) { return a > b ? a : b; }
RK_INLINE int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
RK_INLINE int64_t lmax_(int64_t a, int64_t b) { return a > b ? a : b; }
RK_INLINE float fmax_(float a, float b) { return a > b ? a : b; }

// 2^f for f in [-0.5, 0.5] (vexp2): polynomial coefficients, highest degree first.
constexpr int kExp2Terms = 7;
constexpr float kExp2Poly[kExp2Terms] = {1.5370710752904415e-04f, 1.339985290542245e-03f, 9.618373587727547e-03f,
                                         5.550329014658928e-02f,  2.4022647738456726e-01f, 6.931471824645996e-01f,
                                         1.0f};

// ---------------------------------------------------------------- scalar dtype conversions
// bf16 and fp16 are carried as raw uint16_t bits. Rounding is to nearest even, as in c10.
RK_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
RK_INLINE uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;  // quiet NaN, as c10::BFloat16
  const uint32_t u = float_to_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

RK_INLINE float f16_to_float_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
RK_INLINE uint16_t float_to_f16_soft(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN / inf
  if (x >= 0x477FF000u) return sign | 0x7C00u;                                 // >= 65520 rounds to inf
  if (x < 0x38800000u) {  // below 2^-14: fp16 subnormal (or zero) in units of 2^-24
    const float units = bits_to_float(x) * 16777216.0f;  // exact scaling by 2^24
    return sign | static_cast<uint16_t>(__builtin_nearbyintf(units));  // 1024 becomes the smallest normal
  }
  x += 0xFFFu + ((x >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return sign | static_cast<uint16_t>((x - 0x38000000u) >> 13);  // rebias the exponent 127 -> 15
}

#if RK_VEC_AVX2
RK_INLINE float f16_to_float(uint16_t h) { return _cvtsh_ss(h); }
RK_INLINE uint16_t float_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#elif RK_VEC_NEON
// The conversion instructions (fcvt) of the vector loads and stores below, so that scalar tails
// round and propagate NaN payloads exactly as the vector body does (as F16C does for AVX2).
RK_INLINE float f16_to_float(uint16_t h) {
  return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}
RK_INLINE uint16_t float_to_f16(float f) {
  return vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(f))), 0);
}
#else
RK_INLINE float f16_to_float(uint16_t h) { return f16_to_float_soft(h); }
RK_INLINE uint16_t float_to_f16(float f) { return float_to_f16_soft(f); }
#endif

// ---------------------------------------------------------------- the vector type
#if RK_VEC_AVX2
struct V {
  __m256 v;
};
RK_INLINE V vzero() { return {_mm256_setzero_ps()}; }
RK_INLINE V vset1(float x) { return {_mm256_set1_ps(x)}; }
RK_INLINE V vload(const float* p) { return {_mm256_loadu_ps(p)}; }
RK_INLINE void vstore(float* p, V a) { _mm256_storeu_ps(p, a.v); }
RK_INLINE V vbcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
RK_INLINE V operator+(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
RK_INLINE V operator-(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
RK_INLINE V operator*(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
RK_INLINE V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }   // a*b + c
RK_INLINE V vfms(V a, V b, V c) { return {_mm256_fmsub_ps(a.v, b.v, c.v)}; }   // a*b - c
RK_INLINE V vmax(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }
RK_INLINE V vfloor(V a) { return {_mm256_floor_ps(a.v)}; }
// Lanes where `a == -inf` become 0, others keep `b` (masked probabilities are selected, never multiplied).
RK_INLINE V vzero_where_neginf(V a, V b) {
  return {_mm256_andnot_ps(_mm256_cmp_ps(a.v, _mm256_set1_ps(-kInf), _CMP_EQ_OQ), b.v)};
}
// (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...): the partner of each interleaved pair.
RK_INLINE V vswap_pairs(V a) { return {_mm256_permute_ps(a.v, 0xB1)}; }
// (a0..a7), (b0..b7) -> lo (a0 b0 a1 b1 a2 b2 a3 b3), hi (a4 b4 ... a7 b7).
RK_INLINE void vzip(V a, V b, V* lo, V* hi) {
  const __m256 l = _mm256_unpacklo_ps(a.v, b.v), h = _mm256_unpackhi_ps(a.v, b.v);
  lo->v = _mm256_permute2f128_ps(l, h, 0x20);
  hi->v = _mm256_permute2f128_ps(l, h, 0x31);
}
// Eight horizontal sums at once: lane i of the result is the sum of a[i].
RK_INLINE V hsum8(const V* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v), t1 = _mm256_hadd_ps(a[2].v, a[3].v);
  const __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v), t3 = _mm256_hadd_ps(a[6].v, a[7].v);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return {_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))};
}
// In-place 8x8 transpose of rows r[0..7].
RK_INLINE void transpose8(V* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0].v, r[1].v), t1 = _mm256_unpackhi_ps(r[0].v, r[1].v);
  const __m256 t2 = _mm256_unpacklo_ps(r[2].v, r[3].v), t3 = _mm256_unpackhi_ps(r[2].v, r[3].v);
  const __m256 t4 = _mm256_unpacklo_ps(r[4].v, r[5].v), t5 = _mm256_unpackhi_ps(r[4].v, r[5].v);
  const __m256 t6 = _mm256_unpacklo_ps(r[6].v, r[7].v), t7 = _mm256_unpackhi_ps(r[6].v, r[7].v);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0].v = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1].v = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2].v = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3].v = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4].v = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5].v = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6].v = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7].v = _mm256_permute2f128_ps(s3, s7, 0x31);
}
RK_INLINE V vload_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
RK_INLINE void vstore_bf16(uint16_t* p, V a) {
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
RK_INLINE V vload_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
RK_INLINE void vstore_f16(uint16_t* p, V a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
// 2^x for x <= 0 (scores minus their running max). x < -126 flushes to 0.
RK_INLINE V vexp2(V x) {
  __m256 xc = _mm256_max_ps(x.v, _mm256_set1_ps(-127.0f));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);  // [-0.5, 0.5]
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  // 2^n by building the exponent field; n = -127 gives the bit pattern of +0, so the result is 0.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};
}
// Quadrant selection for vsincos_turns: lanes where (q & bit) != 0.
RK_INLINE __m256 quadrant_mask(__m256i q, int bit) {
  const __m256i b = _mm256_set1_epi32(bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, b), b));
}
RK_INLINE V vselect(__m256 mask, V yes, V no) { return {_mm256_blendv_ps(no.v, yes.v, mask)}; }
RK_INLINE __m256 vcmp_eq(V a, V b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
RK_INLINE __m256 vcmp_gt(V a, V b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
RK_INLINE __m256 vor_mask(__m256 a, __m256 b) { return _mm256_or_ps(a, b); }
// a < b ? yes : no, lane by lane.
RK_INLINE V vselect_lt(V a, V b, V yes, V no) { return {_mm256_blendv_ps(no.v, yes.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))}; }
RK_INLINE __m256i vround_to_int(V a) { return _mm256_cvtps_epi32(a.v); }
RK_INLINE V vneg(V a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f))}; }
#elif RK_VEC_NEON  // ---------------------------------------------------------------- AArch64 NEON
// V = two q registers (lanes 0-3, 4-7). Each operation gives the portable flavour's result lane for
// lane: compare-and-select where a NEON instruction treats NaN otherwise (fmax returns NaN, the
// portable a > b ? a : b returns b), round-to-nearest-even instructions (frintn, fcvtns) where it
// calls nearbyintf in the default rounding mode, and one FMA where its source is a multiply-add,
// which GCC contracts into an FMA on aarch64 anyway (-ffp-contract=fast, its default for C++).
// The horizontal sums add in the AVX2 flavour's tree order instead of the portable left-to-right.
struct V {
  float32x4_t lo, hi;
};
RK_INLINE V vzero() { return {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
RK_INLINE V vset1(float x) { return {vdupq_n_f32(x), vdupq_n_f32(x)}; }
RK_INLINE V vload(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
RK_INLINE void vstore(float* p, V a) {
  vst1q_f32(p, a.lo);
  vst1q_f32(p + 4, a.hi);
}
RK_INLINE V vbcast(const float* p) {
  const float32x4_t b = vld1q_dup_f32(p);
  return {b, b};
}
RK_INLINE V operator+(V a, V b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
RK_INLINE V operator-(V a, V b) { return {vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
RK_INLINE V operator*(V a, V b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
RK_INLINE V vfma(V a, V b, V c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }  // a*b + c
// a*b - c, one rounding: fma(a, b, -c) (negation is exact; vfmsq_f32 computes c - a*b).
RK_INLINE V vfms(V a, V b, V c) {
  return {vfmaq_f32(vnegq_f32(c.lo), a.lo, b.lo), vfmaq_f32(vnegq_f32(c.hi), a.hi, b.hi)};
}
// a > b ? a : b: b where either is NaN, as the portable and AVX flavours (fmax would give NaN).
RK_INLINE float32x4_t vmax4(float32x4_t a, float32x4_t b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
RK_INLINE V vmax(V a, V b) { return {vmax4(a.lo, b.lo), vmax4(a.hi, b.hi)}; }
RK_INLINE V vfloor(V a) { return {vrndmq_f32(a.lo), vrndmq_f32(a.hi)}; }
// Lanes where `a == -inf` become 0, others keep `b` (masked probabilities are selected, never multiplied).
RK_INLINE float32x4_t vzero_where_neginf4(float32x4_t a, float32x4_t b) {
  const uint32x4_t neginf = vceqq_f32(a, vdupq_n_f32(-kInf));
  return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(b), neginf));  // b & ~mask
}
RK_INLINE V vzero_where_neginf(V a, V b) { return {vzero_where_neginf4(a.lo, b.lo), vzero_where_neginf4(a.hi, b.hi)}; }
// (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...): rev64 swaps the 32-bit halves of each 64-bit pair.
RK_INLINE V vswap_pairs(V a) { return {vrev64q_f32(a.lo), vrev64q_f32(a.hi)}; }
// (a0..a7), (b0..b7) -> lo (a0 b0 a1 b1 a2 b2 a3 b3), hi (a4 b4 ... a7 b7).
RK_INLINE void vzip(V a, V b, V* lo, V* hi) {
  lo->lo = vzip1q_f32(a.lo, b.lo);
  lo->hi = vzip2q_f32(a.lo, b.lo);
  hi->lo = vzip1q_f32(a.hi, b.hi);
  hi->hi = vzip2q_f32(a.hi, b.hi);
}
// ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)): hsum8's order for one vector.
RK_INLINE float hsum(V a) { return vaddvq_f32(vpaddq_f32(a.lo, a.hi)); }
// Lane i = hsum(a[i]) for four rows, in the AVX2 flavour's order (its hadd tree), so the two agree:
// pairwise sums within each row, then pairs of those, then the two halves.
RK_INLINE float32x4_t hsum4(const V* a) {
  const float32x4_t p0 = vpaddq_f32(a[0].lo, a[0].hi), p1 = vpaddq_f32(a[1].lo, a[1].hi);  // (a01 a23 a45 a67)
  const float32x4_t p2 = vpaddq_f32(a[2].lo, a[2].hi), p3 = vpaddq_f32(a[3].lo, a[3].hi);
  const float32x4_t q01 = vpaddq_f32(p0, p1), q23 = vpaddq_f32(p2, p3);  // (a0123 a4567) of two rows
  return vpaddq_f32(q01, q23);
}
// Eight horizontal sums at once: lane i of the result is the sum of a[i].
RK_INLINE V hsum8(const V* a) { return {hsum4(a), hsum4(a + 4)}; }
// 4x4 transpose of rows r0..r3 into o[0..3]: trn on 32-bit lanes, then on 64-bit pairs.
RK_INLINE void transpose4(float32x4_t r0, float32x4_t r1, float32x4_t r2, float32x4_t r3, float32x4_t* o) {
  const float64x2_t t0 = vreinterpretq_f64_f32(vtrn1q_f32(r0, r1));  // r00 r10 r02 r12
  const float64x2_t t1 = vreinterpretq_f64_f32(vtrn2q_f32(r0, r1));  // r01 r11 r03 r13
  const float64x2_t t2 = vreinterpretq_f64_f32(vtrn1q_f32(r2, r3));  // r20 r30 r22 r32
  const float64x2_t t3 = vreinterpretq_f64_f32(vtrn2q_f32(r2, r3));  // r21 r31 r23 r33
  o[0] = vreinterpretq_f32_f64(vtrn1q_f64(t0, t2));
  o[1] = vreinterpretq_f32_f64(vtrn1q_f64(t1, t3));
  o[2] = vreinterpretq_f32_f64(vtrn2q_f64(t0, t2));
  o[3] = vreinterpretq_f32_f64(vtrn2q_f64(t1, t3));
}
// In-place 8x8 transpose of rows r[0..7], as four 4x4 blocks: the off-diagonal blocks trade places.
RK_INLINE void transpose8(V* r) {
  float32x4_t a[4], b[4], c[4], d[4];
  transpose4(r[0].lo, r[1].lo, r[2].lo, r[3].lo, a);  // rows 0-3 of the result, lanes 0-3
  transpose4(r[4].lo, r[5].lo, r[6].lo, r[7].lo, b);  // rows 0-3, lanes 4-7
  transpose4(r[0].hi, r[1].hi, r[2].hi, r[3].hi, c);  // rows 4-7, lanes 0-3
  transpose4(r[4].hi, r[5].hi, r[6].hi, r[7].hi, d);  // rows 4-7, lanes 4-7
  for (int i = 0; i < 4; ++i) {
    r[i].lo = a[i];
    r[i].hi = b[i];
    r[i + 4].lo = c[i];
    r[i + 4].hi = d[i];
  }
}
// bf16 -> fp32 is the 16 bits shifted into the top half (shll: widen and shift by 16 at once).
RK_INLINE V vload_bf16(const uint16_t* p) {
  const uint16x8_t h = vld1q_u16(p);
  return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vreinterpretq_f32_u32(vshll_high_n_u16(h, 16))};
}
// float_to_bf16 on four lanes: (u + 0x7FFF + lsb) >> 16 (addhn: the add's high halves, narrowed),
// NaN -> 0x7FC0.
RK_INLINE uint16x4_t bf16_round4(float32x4_t a) {
  const uint32x4_t u = vreinterpretq_u32_f32(a);
  const uint32x4_t bias = vaddq_u32(vdupq_n_u32(0x7FFFu), vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1u)));
  const uint16x4_t nan = vmovn_u32(vmvnq_u32(vceqq_f32(a, a)));
  return vbsl_u16(nan, vdup_n_u16(0x7FC0), vaddhn_u32(u, bias));
}
RK_INLINE void vstore_bf16(uint16_t* p, V a) { vst1q_u16(p, vcombine_u16(bf16_round4(a.lo), bf16_round4(a.hi))); }
// fp16 <-> fp32 by fcvtl / fcvtn (base AArch64): round to nearest even in the default FPCR mode,
// subnormals kept (Linux leaves FPCR.FZ off), as float_to_f16_soft.
RK_INLINE V vload_f16(const uint16_t* p) {
  const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p));
  return {vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
}
RK_INLINE void vstore_f16(uint16_t* p, V a) {
  vst1q_u16(p, vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(a.lo), a.hi)));
}
// 2^x for x <= 0 (scores minus their running max). x < -126 flushes to 0.
RK_INLINE float32x4_t vexp2_4(float32x4_t x) {
  const float32x4_t xc = vmax4(x, vdupq_n_f32(-127.0f));  // NaN -> -127, as the portable flavour
  const float32x4_t n = vrndnq_f32(xc);
  const float32x4_t f = vsubq_f32(xc, n);  // [-0.5, 0.5]
  float32x4_t p = vdupq_n_f32(kExp2Poly[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = vfmaq_f32(vdupq_n_f32(kExp2Poly[i]), p, f);
  // 2^n by building the exponent field; n = -127 gives the bit pattern of +0, so the result is 0.
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
RK_INLINE V vexp2(V x) { return {vexp2_4(x.lo), vexp2_4(x.hi)}; }
// Lane masks are all-ones / all-zeros words, as the compare instructions give them.
struct Mask {
  uint32x4_t lo, hi;
};
struct IntV {
  int32x4_t lo, hi;
};
// Quadrant selection for vsincos_turns: lanes where (q & bit) != 0 (cmtst).
RK_INLINE Mask quadrant_mask(IntV q, int bit) {
  const int32x4_t b = vdupq_n_s32(bit);
  return {vtstq_s32(q.lo, b), vtstq_s32(q.hi, b)};
}
RK_INLINE V vselect(Mask mask, V yes, V no) {
  return {vbslq_f32(mask.lo, yes.lo, no.lo), vbslq_f32(mask.hi, yes.hi, no.hi)};
}
RK_INLINE Mask vcmp_eq(V a, V b) { return {vceqq_f32(a.lo, b.lo), vceqq_f32(a.hi, b.hi)}; }
RK_INLINE Mask vcmp_gt(V a, V b) { return {vcgtq_f32(a.lo, b.lo), vcgtq_f32(a.hi, b.hi)}; }
RK_INLINE Mask vor_mask(Mask a, Mask b) { return {vorrq_u32(a.lo, b.lo), vorrq_u32(a.hi, b.hi)}; }
// a < b ? yes : no, lane by lane.
RK_INLINE V vselect_lt(V a, V b, V yes, V no) {
  return {vbslq_f32(vcltq_f32(a.lo, b.lo), yes.lo, no.lo), vbslq_f32(vcltq_f32(a.hi, b.hi), yes.hi, no.hi)};
}
RK_INLINE IntV vround_to_int(V a) { return {vcvtnq_s32_f32(a.lo), vcvtnq_s32_f32(a.hi)}; }  // ties to even
RK_INLINE V vneg(V a) { return {vnegq_f32(a.lo), vnegq_f32(a.hi)}; }
#else  // ------------------------------------------------------------------ portable fallback
struct V {
  float v[kLanes];
};
#define RK_LANES for (int i_ = 0; i_ < kLanes; ++i_)
RK_INLINE V vzero() {
  V r;
  RK_LANES r.v[i_] = 0.0f;
  return r;
}
RK_INLINE V vset1(float x) {
  V r;
  RK_LANES r.v[i_] = x;
  return r;
}
RK_INLINE V vload(const float* p) {
  V r;
  RK_LANES r.v[i_] = p[i_];
  return r;
}
RK_INLINE void vstore(float* p, V a) { RK_LANES p[i_] = a.v[i_]; }
RK_INLINE V vbcast(const float* p) { return vset1(*p); }
RK_INLINE V operator+(V a, V b) {
  RK_LANES a.v[i_] += b.v[i_];
  return a;
}
RK_INLINE V operator-(V a, V b) {
  RK_LANES a.v[i_] -= b.v[i_];
  return a;
}
RK_INLINE V operator*(V a, V b) {
  RK_LANES a.v[i_] *= b.v[i_];
  return a;
}
RK_INLINE V vfma(V a, V b, V c) {
  RK_LANES c.v[i_] += a.v[i_] * b.v[i_];
  return c;
}
RK_INLINE V vfms(V a, V b, V c) {
  RK_LANES c.v[i_] = a.v[i_] * b.v[i_] - c.v[i_];
  return c;
}
RK_INLINE V vmax(V a, V b) {
  RK_LANES a.v[i_] = a.v[i_] > b.v[i_] ? a.v[i_] : b.v[i_];
  return a;
}
RK_INLINE V vfloor(V a) {
  RK_LANES a.v[i_] = __builtin_floorf(a.v[i_]);
  return a;
}
RK_INLINE V vzero_where_neginf(V a, V b) {
  RK_LANES b.v[i_] = a.v[i_] == -kInf ? 0.0f : b.v[i_];
  return b;
}
RK_INLINE V vswap_pairs(V a) {
  V r;
  RK_LANES r.v[i_] = a.v[i_ ^ 1];
  return r;
}
RK_INLINE void vzip(V a, V b, V* lo, V* hi) {
  for (int i = 0; i < kLanes / 2; ++i) {
    lo->v[2 * i] = a.v[i];
    lo->v[2 * i + 1] = b.v[i];
    hi->v[2 * i] = a.v[i + kLanes / 2];
    hi->v[2 * i + 1] = b.v[i + kLanes / 2];
  }
}
RK_INLINE float hsum(V a) {
  float s = 0.0f;
  RK_LANES s += a.v[i_];
  return s;
}
RK_INLINE V hsum8(const V* a) {
  V r;
  RK_LANES r.v[i_] = hsum(a[i_]);
  return r;
}
RK_INLINE void transpose8(V* r) {
  for (int i = 0; i < kLanes; ++i)
    for (int j = i + 1; j < kLanes; ++j) {
      const float t = r[i].v[j];
      r[i].v[j] = r[j].v[i];
      r[j].v[i] = t;
    }
}
RK_INLINE V vload_bf16(const uint16_t* p) {
  V r;
  RK_LANES r.v[i_] = bf16_to_float(p[i_]);
  return r;
}
RK_INLINE void vstore_bf16(uint16_t* p, V a) { RK_LANES p[i_] = float_to_bf16(a.v[i_]); }
RK_INLINE V vload_f16(const uint16_t* p) {
  V r;
  RK_LANES r.v[i_] = f16_to_float(p[i_]);
  return r;
}
RK_INLINE void vstore_f16(uint16_t* p, V a) { RK_LANES p[i_] = float_to_f16(a.v[i_]); }
RK_INLINE V vexp2(V x) {
  V r;
  RK_LANES {
    const float xc = x.v[i_] > -127.0f ? x.v[i_] : -127.0f;
    const float n = __builtin_nearbyintf(xc);
    const float f = xc - n;
    float p = kExp2Poly[0];
    for (int k = 1; k < kExp2Terms; ++k) p = p * f + kExp2Poly[k];
    r.v[i_] = p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  }
  return r;
}
struct Mask {
  bool m[kLanes];
};
struct IntV {
  int32_t v[kLanes];
};
RK_INLINE Mask quadrant_mask(IntV q, int bit) {
  Mask r;
  RK_LANES r.m[i_] = (q.v[i_] & bit) != 0;
  return r;
}
RK_INLINE V vselect(Mask mask, V yes, V no) {
  RK_LANES no.v[i_] = mask.m[i_] ? yes.v[i_] : no.v[i_];
  return no;
}
RK_INLINE Mask vcmp_eq(V a, V b) {
  Mask r;
  RK_LANES r.m[i_] = a.v[i_] == b.v[i_];
  return r;
}
RK_INLINE Mask vcmp_gt(V a, V b) {
  Mask r;
  RK_LANES r.m[i_] = a.v[i_] > b.v[i_];
  return r;
}
RK_INLINE Mask vor_mask(Mask a, Mask b) {
  RK_LANES a.m[i_] = a.m[i_] || b.m[i_];
  return a;
}
RK_INLINE V vselect_lt(V a, V b, V yes, V no) {
  RK_LANES no.v[i_] = a.v[i_] < b.v[i_] ? yes.v[i_] : no.v[i_];
  return no;
}
RK_INLINE IntV vround_to_int(V a) {
  IntV r;
  RK_LANES r.v[i_] = static_cast<int32_t>(__builtin_nearbyintf(a.v[i_]));
  return r;
}
RK_INLINE V vneg(V a) {
  RK_LANES a.v[i_] = -a.v[i_];
  return a;
}
#undef RK_LANES
#endif

// sin and cos of 2*pi*t for t in turns, |t| <= 0.5 (already reduced by angle_turns).
// The quadrant q = round(4t) is removed exactly (t - q/4 is exact in fp32), the remainder
// r in [-1/8, 1/8] turn becomes x = 2*pi*r (one rounding, as the scalar header's t * 2*pi), and
// minimax polynomials on [-pi/4, pi/4] (max error 4e-9 before fp32 rounding) give sin and cos.
RK_INLINE void vsincos_turns(V t, V* s_out, V* c_out) {
  const V q4 = t * vset1(4.0f);
  const auto qi = vround_to_int(q4);
  V qf;
#if RK_VEC_AVX2
  qf.v = _mm256_cvtepi32_ps(qi);
#elif RK_VEC_NEON
  qf = {vcvtq_f32_s32(qi.lo), vcvtq_f32_s32(qi.hi)};
#else
  for (int i = 0; i < kLanes; ++i) qf.v[i] = static_cast<float>(qi.v[i]);
#endif
  const V r = t - qf * vset1(0.25f);
  const V x = r * vset1(6.28318530717958647692f);
  const V x2 = x * x;
  V sp = vfma(vset1(-1.949347642948851e-04f), x2, vset1(8.331958204507828e-03f));
  sp = vfma(sp, x2, vset1(-1.6666650772094727e-01f));
  const V s = vfma(sp * x2, x, x);
  V cp = vfma(vset1(2.4435832528979518e-05f), x2, vset1(-1.388734090141952e-03f));
  cp = vfma(cp, x2, vset1(4.166664555668831e-02f));
  const V c = vfma(cp * x2, x2, vfma(vset1(-0.5f), x2, vset1(1.0f)));
  // Quadrant q (mod 4): sin(2pi t) = (s, c, -s, -c)[q], cos(2pi t) = (c, -s, -c, s)[q].
  const auto odd = quadrant_mask(qi, 1);
  V sin_v = vselect(odd, c, s);
  V cos_v = vselect(odd, s, c);
  sin_v = vselect(quadrant_mask(qi, 2), vneg(sin_v), sin_v);
#if RK_VEC_AVX2
  const __m256i q1 = _mm256_add_epi32(qi, _mm256_set1_epi32(1));
#elif RK_VEC_NEON
  const IntV q1 = {vaddq_s32(qi.lo, vdupq_n_s32(1)), vaddq_s32(qi.hi, vdupq_n_s32(1))};
#else
  IntV q1;
  for (int i = 0; i < kLanes; ++i) q1.v[i] = qi.v[i] + 1;
#endif
  cos_v = vselect(quadrant_mask(q1, 2), vneg(cos_v), cos_v);
  *s_out = sin_v;
  *c_out = cos_v;
}

// ---------------------------------------------------------------- the wide vector
// W: kWide = 16 fp32 lanes, the column unit (kNR) of the matrix micro-kernels. One zmm register
// in the AVX-512 unit; elsewhere two V, so the AVX2 micro-kernels compile to the two-ymm code
// they always were.
constexpr int kWide = 16;
#if RK_VEC_AVX512
struct W {
  __m512 v;
};
RK_INLINE W wzero() { return {_mm512_setzero_ps()}; }
RK_INLINE W wload(const float* p) { return {_mm512_loadu_ps(p)}; }
RK_INLINE void wstore(float* p, W a) { _mm512_storeu_ps(p, a.v); }
RK_INLINE W wbcast(const float* p) { return {_mm512_set1_ps(*p)}; }
RK_INLINE W wfma(W a, W b, W c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
RK_INLINE W operator+(W a, W b) { return {_mm512_add_ps(a.v, b.v)}; }
RK_INLINE W operator*(W a, W b) { return {_mm512_mul_ps(a.v, b.v)}; }
RK_INLINE W wload_bf16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
RK_INLINE W wload_f16(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// The V operations the online softmax uses, on sixteen lanes (same names, overloaded on W).
RK_INLINE W wset1(float x) { return {_mm512_set1_ps(x)}; }
RK_INLINE W operator-(W a, W b) { return {_mm512_sub_ps(a.v, b.v)}; }
RK_INLINE W vfma(W a, W b, W c) { return wfma(a, b, c); }
RK_INLINE W vmax(W a, W b) { return {_mm512_max_ps(a.v, b.v)}; }
struct WMask {
  __mmask16 m;
};
RK_INLINE WMask vcmp_eq(W a, W b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
RK_INLINE WMask vcmp_gt(W a, W b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
RK_INLINE WMask vor_mask(WMask a, WMask b) { return {static_cast<__mmask16>(a.m | b.m)}; }
RK_INLINE W vselect(WMask mask, W yes, W no) { return {_mm512_mask_blend_ps(mask.m, no.v, yes.v)}; }
RK_INLINE W vselect_lt(W a, W b, W yes, W no) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), no.v, yes.v)};
}
RK_INLINE W vzero_where_neginf(W a, W b) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(-kInf), _CMP_NEQ_UQ), b.v)};
}
// vexp2 on sixteen lanes, operation for operation.
RK_INLINE W vexp2(W x) {
  const __m512 xc = _mm512_max_ps(x.v, _mm512_set1_ps(-127.0f));
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return {_mm512_mul_ps(p, _mm512_castsi512_ps(e))};
}
#else
struct W {
  V lo, hi;
};
RK_INLINE W wzero() { return {vzero(), vzero()}; }
RK_INLINE W wload(const float* p) { return {vload(p), vload(p + kLanes)}; }
RK_INLINE void wstore(float* p, W a) {
  vstore(p, a.lo);
  vstore(p + kLanes, a.hi);
}
RK_INLINE W wbcast(const float* p) {
  const V b = vbcast(p);
  return {b, b};
}
RK_INLINE W wfma(W a, W b, W c) { return {vfma(a.lo, b.lo, c.lo), vfma(a.hi, b.hi, c.hi)}; }
RK_INLINE W operator+(W a, W b) { return {a.lo + b.lo, a.hi + b.hi}; }
RK_INLINE W operator*(W a, W b) { return {a.lo * b.lo, a.hi * b.hi}; }
RK_INLINE W wload_bf16(const uint16_t* p) { return {vload_bf16(p), vload_bf16(p + kLanes)}; }
RK_INLINE W wload_f16(const uint16_t* p) { return {vload_f16(p), vload_f16(p + kLanes)}; }
RK_INLINE W wset1(float x) { return {vset1(x), vset1(x)}; }
RK_INLINE W operator-(W a, W b) { return {a.lo - b.lo, a.hi - b.hi}; }
RK_INLINE W vfma(W a, W b, W c) { return wfma(a, b, c); }
RK_INLINE W vmax(W a, W b) { return {vmax(a.lo, b.lo), vmax(a.hi, b.hi)}; }
struct WMask {
  decltype(vcmp_eq(V{}, V{})) lo, hi;
};
RK_INLINE WMask vcmp_eq(W a, W b) { return {vcmp_eq(a.lo, b.lo), vcmp_eq(a.hi, b.hi)}; }
RK_INLINE WMask vcmp_gt(W a, W b) { return {vcmp_gt(a.lo, b.lo), vcmp_gt(a.hi, b.hi)}; }
RK_INLINE WMask vor_mask(WMask a, WMask b) { return {vor_mask(a.lo, b.lo), vor_mask(a.hi, b.hi)}; }
RK_INLINE W vselect(WMask mask, W yes, W no) { return {vselect(mask.lo, yes.lo, no.lo), vselect(mask.hi, yes.hi, no.hi)}; }
RK_INLINE W vselect_lt(W a, W b, W yes, W no) {
  return {vselect_lt(a.lo, b.lo, yes.lo, no.lo), vselect_lt(a.hi, b.hi, yes.hi, no.hi)};
}
RK_INLINE W vzero_where_neginf(W a, W b) { return {vzero_where_neginf(a.lo, b.lo), vzero_where_neginf(a.hi, b.hi)}; }
RK_INLINE W vexp2(W x) { return {vexp2(x.lo), vexp2(x.hi)}; }
#endif

// Load, store and broadcast by vector type, for code written once for V and W (softmax_cols).
template <class VT>
struct Lanes;
template <>
struct Lanes<V> {
  static constexpr int n = kLanes;
  static RK_INLINE V set1(float x) { return vset1(x); }
  static RK_INLINE V load(const float* p) { return vload(p); }
  static RK_INLINE void store(float* p, V a) { vstore(p, a); }
};
template <>
struct Lanes<W> {
  static constexpr int n = kWide;
  static RK_INLINE W set1(float x) { return wset1(x); }
  static RK_INLINE W load(const float* p) { return wload(p); }
  static RK_INLINE void store(float* p, W a) { wstore(p, a); }
};

// ---------------------------------------------------------------- element types
// Tag types: how one input element is loaded into / stored from fp32.
struct F32 {
  using T = float;
  static constexpr bool is_bf16 = false;
  static RK_INLINE V load8(const T* p) { return vload(p); }
  static RK_INLINE W load16(const T* p) { return wload(p); }
  static RK_INLINE void store8(T* p, V a) { vstore(p, a); }
  static RK_INLINE float to_float(T x) { return x; }
  static RK_INLINE T from_float(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static constexpr bool is_bf16 = true;
  static RK_INLINE V load8(const T* p) { return vload_bf16(p); }
  static RK_INLINE W load16(const T* p) { return wload_bf16(p); }
  static RK_INLINE void store8(T* p, V a) { vstore_bf16(p, a); }
  static RK_INLINE float to_float(T x) { return bf16_to_float(x); }
  static RK_INLINE T from_float(float x) { return float_to_bf16(x); }
};
struct F16 {
  using T = uint16_t;
  static constexpr bool is_bf16 = false;
  static RK_INLINE V load8(const T* p) { return vload_f16(p); }
  static RK_INLINE W load16(const T* p) { return wload_f16(p); }
  static RK_INLINE void store8(T* p, V a) { vstore_f16(p, a); }
  static RK_INLINE float to_float(T x) { return f16_to_float(x); }
  static RK_INLINE T from_float(float x) { return float_to_f16(x); }
};

}  // namespace RK_ISA
}  // namespace cpu
}  // namespace ropekern
