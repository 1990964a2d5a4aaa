// The CPU kernels, written once against vec.h and compiled once per instruction set
// (kernels_avx2.cpp, kernels_generic.cpp) into namespace ropekern::cpu::RK_ISA.
//
// Numerics (docs/design.md §4): fp32 everywhere whatever the I/O dtype; angles by the accurate split of
// rope_math.h (angle_turns_high8/low8 below are its functions op for op, eight pairs at a time); scores are
// kept in base 2 (each q.k is multiplied by softmax_scale * log2(e), so exp is one exp2) and the LSE
// is converted back to natural log; masked scores are -inf and their probabilities are selected
// to 0; a row that never sees a key ends as zeros with LSE -inf. Offsets are int64.
#pragma once

#include "kernels.h"
#include "ropekern/rope_math.h"
#include "vec.h"

namespace ropekern {
namespace cpu {
namespace RK_ISA {

constexpr float kLog2e = 1.4426950408889634f;
// Micro-kernel tiles: kMR rows x kNW wide vectors (kNR = 16 kNW columns). The accumulators must
// outnumber the FMA latency x pipes (4 x 2 = 8 in flight) and fit the register file beside the
// operands, and the loads (kNW + kMR per kNW kMR FMAs) must stay below the FMAs:
// 6 rows x 2 ymm = 12 of the 16 ymm registers (AVX2, generic; on NEON 24 of 32 q registers);
// 8 rows x 2 zmm = 16 of 32 zmm.
#if RK_VEC_AVX512
constexpr int kMR = 8;
constexpr int kNW = 2;
#else
constexpr int kMR = 6;
constexpr int kNW = 1;
#endif
constexpr int kNR = kNW * kWide;

RK_INLINE int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }
RK_INLINE int round8(int n) { return (n + 7) / 8 * 8; }
RK_INLINE int round16(int n) { return (n + 15) / 16 * 16; }

// Bump allocator over an item's scratch (64-byte aligned by ops.cpp; every piece is a multiple
// of 16 floats, so every piece stays 64-byte aligned).
struct Bump {
  float* p;
  RK_INLINE float* take(int64_t n) {
    float* r = p;
    p += align16(n);
    return r;
  }
};

// ---------------------------------------------------------------- rotary tables and rotation
// The split frequency table's rows for lanes [i, i + n) (rope_math.h: f1..f4, float[4][half]);
// n < kLanes (the table's tail) pads with zeros.
struct Split8 {
  V f[kSplitRows];
};

RK_INLINE Split8 load_split(const float* split, int half, int i, int n) {
  Split8 r;
  if (n == kLanes) {
    for (int k = 0; k < kSplitRows; ++k) r.f[k] = vload(split + k * half + i);
    return r;
  }
  for (int k = 0; k < kSplitRows; ++k) {
    float t[kLanes] = {0};
    for (int l = 0; l < n; ++l) t[l] = split[k * half + i + l];
    r.f[k] = vload(t);
  }
  return r;
}

RK_INLINE V vreduce_turn(V x) { return x - vfloor(x + vset1(0.5f)); }

// rope_math.h angle_turns_high / angle_turns_low, operation for operation, kLanes pairs at a time.
struct AngleHigh8 {
  V high, small;
};

RK_INLINE AngleHigh8 angle_turns_high8(int32_t pos, const Split8& f) {
  const V p2 = vset1(static_cast<float>(pos >> 24) * 16777216.0f);
  const V p1 = vset1(static_cast<float>((pos >> 12) & 4095) * 4096.0f);
  V h = vreduce_turn(p2 * f.f[0]);
  h = vreduce_turn(h + vreduce_turn(p2 * f.f[1]));
  h = vreduce_turn(h + vreduce_turn(p2 * f.f[2]));
  h = vreduce_turn(h + vreduce_turn(p1 * f.f[0]));
  h = vreduce_turn(h + vreduce_turn(p1 * f.f[1]));
  return {h, p1 * f.f[2] + (p2 * f.f[3] + p1 * f.f[3])};
}

RK_INLINE V angle_turns_low8(const AngleHigh8& hi, int32_t pos, const Split8& f) {
  const V p0 = vset1(static_cast<float>(pos & 4095));
  const V s = vreduce_turn(hi.high + vreduce_turn(p0 * f.f[0]));
  return vreduce_turn(s + (hi.small + (p0 * f.f[1] + (p0 * f.f[2] + p0 * f.f[3]))));
}

// One sequence's rotary source: the law's split table (float[4][half], rows f1..f4, cos/sin times
// `factor`), or with rows > 0 a caller's table float[rows][2][half] (RopeParams::table_positions).
struct SeqRope {
  const float* t;
  int half;
  float factor;
  int rows;
};

RK_INLINE SeqRope seq_rope(const RopeParams& rope, int64_t b) {
  const bool caller = rope.table_positions > 0;
  return {rope.freqs + (caller ? 0 : b * rope.freqs_batch_stride), rope.rotary_dim / 2, rope.attention_factor,
          rope.table_positions};
}

// cos/sin of the R/2 pair angles of one position into cs = [cos: cs_pad][sin: cs_pad], times
// the factor; a caller's table row is copied (padding lanes get cos 1, sin 0, as a zero angle).
static void cos_sin_row(int32_t pos, const SeqRope& sr, int cs_pad, float* cs) {
  float* C = cs;
  float* S = cs + cs_pad;
  const int half = sr.half;
  if (sr.rows) {
    const float* row = sr.t + table_row(pos, sr.rows) * 2 * half;
    for (int i = 0; i < half; ++i) {
      C[i] = row[i];
      S[i] = row[half + i];
    }
    for (int i = half; i < cs_pad; ++i) {
      C[i] = 1.0f;
      S[i] = 0.0f;
    }
    return;
  }
  const V vf = vset1(sr.factor);
  for (int i = 0; i < half; i += kLanes) {
    const Split8 f = load_split(sr.t, half, i, imin(kLanes, half - i));
    V s, c;
    vsincos_turns(angle_turns_low8(angle_turns_high8(pos, f), pos, f), &s, &c);
    vstore(C + i, c * vf);  // cs_pad is a multiple of 8: full vectors always fit
    vstore(S + i, s * vf);
  }
}

// cos_sin_row for the n consecutive positions pos0 .. pos0 + n - 1, rows `stride` floats apart.
// When they share pos >> 12 (n <= 16 keys at a multiple of 16 always do), the high terms are
// computed once and the keys run as independent chains in the inner loop; every value is still
// angle_turns' operation for operation.
static void cos_sin_chunk(int32_t pos0, int n, const SeqRope& sr, int cs_pad, float* out, int64_t stride) {
  if (sr.rows || (pos0 & 4095) + n > 4096) {
    for (int jj = 0; jj < n; ++jj) cos_sin_row(pos0 + jj, sr, cs_pad, out + jj * stride);
    return;
  }
  const int half = sr.half;
  const V vf = vset1(sr.factor);
  for (int i = 0; i < half; i += kLanes) {
    const Split8 f = load_split(sr.t, half, i, imin(kLanes, half - i));
    const AngleHigh8 hi = angle_turns_high8(pos0, f);
    for (int jj = 0; jj < n; ++jj) {
      V sv, cv;
      vsincos_turns(angle_turns_low8(hi, pos0 + jj, f), &sv, &cv);
      vstore(out + jj * stride + i, cv * vf);
      vstore(out + jj * stride + cs_pad + i, sv * vf);
    }
  }
}

// cos_sin_chunk for the n <= kDecodeChunk positions pos0 + jj by the angle-addition identity:
// row 0 is cos_sin_row(pos0), row jj its rotation by `delta` row jj (the exact cos/sin of position
// jj with factor 1, from cos_sin_chunk(0, ...)): 4 multiply-adds per pair instead of the angle
// split and two polynomials. Each factor is within an ulp of exact, so a row is within ~2 ulp (the
// polynomial path: ~1); decode, one thread, 8K-16K cache: -8 % (fp32) / -9 % (bf16) time per key.
// A caller's table has no such identity: its rows are copied.
static void cos_sin_shifted(int32_t pos0, int n, const SeqRope& sr, int cs_pad, const float* delta, float* out) {
  const int64_t stride = 2 * cs_pad;
  if (sr.rows) {
    cos_sin_chunk(pos0, n, sr, cs_pad, out, stride);
    return;
  }
  cos_sin_row(pos0, sr, cs_pad, out);
  for (int jj = 1; jj < n; ++jj) {
    const float* d = delta + jj * stride;
    float* o = out + jj * stride;
    for (int i = 0; i < cs_pad; i += kLanes) {
      const V cb = vload(out + i), sb = vload(out + cs_pad + i), cd = vload(d + i), sd = vload(d + cs_pad + i);
      vstore(o + i, vfms(cb, cd, sb * sd));
      vstore(o + cs_pad + i, vfma(sb, cd, cb * sd));
    }
  }
}

// Rotate the first R channels of an fp32 row in place with one table row (cos_sin_row).
// Half-split pairs (i, i + R/2); interleaved pairs (2i, 2i + 1), whose cos/sin are duplicated
// in registers (zip) so that rotated = x * (c, c) + swap_pairs(x) * (-s, s).
static void rotate_row(float* x, const float* cs, int R, int cs_pad, bool interleaved) {
  const float* C = cs;
  const float* S = cs + cs_pad;
  const int h = R / 2;
  int i = 0;
  if (interleaved) {
    for (; i + kLanes <= h; i += kLanes) {
      const V c = vload(C + i), s = vload(S + i);
      V clo, chi, slo, shi;
      vzip(c, c, &clo, &chi);
      vzip(vneg(s), s, &slo, &shi);
      const V x0 = vload(x + 2 * i), x1 = vload(x + 2 * i + kLanes);
      vstore(x + 2 * i, vfma(x0, clo, vswap_pairs(x0) * slo));
      vstore(x + 2 * i + kLanes, vfma(x1, chi, vswap_pairs(x1) * shi));
    }
    for (; i < h; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * C[i] - b * S[i];
      x[2 * i + 1] = b * C[i] + a * S[i];
    }
  } else {
    for (; i + kLanes <= h; i += kLanes) {
      const V x1 = vload(x + i), x2 = vload(x + h + i), c = vload(C + i), s = vload(S + i);
      vstore(x + i, vfms(x1, c, x2 * s));
      vstore(x + h + i, vfma(x2, c, x1 * s));
    }
    for (; i < h; ++i) {
      const float a = x[i], b = x[h + i];
      x[i] = a * C[i] - b * S[i];
      x[h + i] = b * C[i] + a * S[i];
    }
  }
}

// True when none of the n floats is a NaN or an infinity (x * 0 is NaN exactly for those).
RK_INLINE bool all_finite(const float* x, int64_t n) {
  const V zero = vzero();
  V acc = zero;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = acc + vload(x + i) * zero;
  float lanes[kLanes];
  vstore(lanes, acc);
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += x[i] * 0.0f;
  return sum == 0.0f;
}

// ---------------------------------------------------------------- row load / store
// D elements of src -> fp32 dst, zero-filled up to `pad`.
template <class DT>
RK_INLINE void load_row(const typename DT::T* src, int D, int pad, float* dst) {
  int d = 0;
  for (; d + kLanes <= D; d += kLanes) vstore(dst + d, DT::load8(src + d));
  for (; d < D; ++d) dst[d] = DT::to_float(src[d]);
  for (; d < pad; ++d) dst[d] = 0.0f;
}

template <class DT>
RK_INLINE void store_row(typename DT::T* dst, const float* src, float scale, int D) {
  const V vs = vset1(scale);
  int d = 0;
  for (; d + kLanes <= D; d += kLanes) DT::store8(dst + d, vload(src + d) * vs);
  for (; d < D; ++d) dst[d] = DT::from_float(src[d] * scale);
}

// load_row then rotate_row in one pass (no fp32 round trip through memory) for the common
// layouts: R/2 a multiple of 8 and R a multiple of 8 up to D.
template <class DT>
RK_INLINE void load_rotate_row(const typename DT::T* src, const float* cs, int R, int cs_pad, bool interleaved, int D,
                               int pad, float* dst) {
  const int h = R / 2;
  if (h % kLanes != 0 || R == 0) {
    load_row<DT>(src, D, pad, dst);
    if (R) rotate_row(dst, cs, R, cs_pad, interleaved);
    return;
  }
  const float* C = cs;
  const float* S = cs + cs_pad;
  if (interleaved) {
    for (int i = 0; i < h; i += kLanes) {
      const V c = vload(C + i), s = vload(S + i);
      V clo, chi, slo, shi;
      vzip(c, c, &clo, &chi);
      vzip(vneg(s), s, &slo, &shi);
      const V x0 = DT::load8(src + 2 * i), x1 = DT::load8(src + 2 * i + kLanes);
      vstore(dst + 2 * i, vfma(x0, clo, vswap_pairs(x0) * slo));
      vstore(dst + 2 * i + kLanes, vfma(x1, chi, vswap_pairs(x1) * shi));
    }
  } else {
    for (int i = 0; i < h; i += kLanes) {
      const V x1 = DT::load8(src + i), x2 = DT::load8(src + h + i), c = vload(C + i), s = vload(S + i);
      vstore(dst + i, vfms(x1, c, x2 * s));
      vstore(dst + h + i, vfma(x2, c, x1 * s));
    }
  }
  load_row<DT>(src + R, D - R, pad - R, dst + R);  // pass-through channels and zero padding
}

RK_INLINE void scale_row(float* x, int n, float scale) {
  const V vs = vset1(scale);
  for (int d = 0; d < n; d += kLanes) vstore(x + d, vload(x + d) * vs);
}

RK_INLINE void zero_floats(float* x, int64_t n) { memset(x, 0, static_cast<size_t>(n) * sizeof(float)); }

// ---------------------------------------------------------------- micro-kernels
// C[MR x NW*16] = A[MR x Dp] . B[Dp x NW*16]: MR rows of A (lda apart) against NW wide vectors of
// columns of B (ldb per channel). In the tiled kernel A is the rotated K block and B the
// transposed Q tile, so C is S^T (keys x query rows): K needs no transpose and the softmax runs
// down columns, a vector of query rows at a time.
// Each score sums its channels in chunks of kDotChunk, the chunk sums added in C: one FMA chain
// over all 256 channels of a D = 256 head made the fp32 output error 1.5x the eager baseline's
// (BLAS dots are blocked) and broke the 2x rule of docs/design.md §5 in 1 case of 25; the extra C
// load/add/store per chunk is 12 of every 12 * 64 vector ops and runs beside the FMAs.
constexpr int kDotChunk = 64;
template <int MR, int NW>
RK_INLINE void outer_tile(const float* a, int lda, const float* b, int ldb, int Dp, float* c, int ldc) {
  for (int d0 = 0; d0 < Dp; d0 += kDotChunk) {
    const int d1 = imin(Dp, d0 + kDotChunk);
    W acc[MR][NW];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      for (int w = 0; w < NW; ++w) acc[r][w] = wzero();
    for (int d = d0; d < d1; ++d) {
      W bd[NW];
      for (int w = 0; w < NW; ++w) bd[w] = wload(b + static_cast<int64_t>(d) * ldb + w * kWide);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const W ar = wbcast(a + r * lda + d);
        for (int w = 0; w < NW; ++w) acc[r][w] = wfma(ar, bd[w], acc[r][w]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      for (int w = 0; w < NW; ++w) {
        float* cr = c + static_cast<int64_t>(r) * ldc + w * kWide;
        wstore(cr, d0 == 0 ? acc[r][w] : wload(cr) + acc[r][w]);
      }
  }
}

// O[MR x NW*16] = O * alpha[r] + P . V[n x NW*16], where P[r][j] = p[r * ldr + j * ldj] (row-major
// P in decode, P^T in the tiled kernel). `vrow(j, w)` loads wide vector w of V row j's columns.
template <int MR, int NW, class VRow>
RK_INLINE void pv_tile(const float* p, int64_t ldr, int64_t ldj, const VRow& vrow, int n, float* o, int ldo,
                       const float* alpha) {
  W acc[MR][NW];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    for (int w = 0; w < NW; ++w) acc[r][w] = wload(o + r * ldo + w * kWide) * wbcast(alpha + r);
  for (int j = 0; j < n; ++j) {
    W vj[NW];
    for (int w = 0; w < NW; ++w) vj[w] = vrow(j, w);
    const float* pj = p + j * ldj;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const W pr = wbcast(pj + r * ldr);
      for (int w = 0; w < NW; ++w) acc[r][w] = wfma(pr, vj[w], acc[r][w]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    for (int w = 0; w < NW; ++w) wstore(o + r * ldo + w * kWide, acc[r][w]);
}

// Calls f(Rows<m>{}) for m = rows (1 <= rows <= MR): the micro-kernels' row count is a
// compile-time constant, so their accumulators live in registers.
template <int N>
struct Rows {
  static constexpr int value = N;
};
template <int MR, class F>
RK_INLINE void with_rows(int rows, const F& f) {
  if constexpr (MR > 1) {
    if (rows < MR) return with_rows<MR - 1>(rows, f);
  }
  f(Rows<MR>{});
}

// The block-level helpers below are ordinary functions (one copy per unit, shared by the three
// dtypes): their work per call dwarfs a call, and inlining them everywhere only bloats the build.

// C[rows x ncols] = A . B over kNR-column tiles (outer: the B tile stays in L1) and kMR-row strips;
// ncols is a multiple of 16, and a last 16-column remainder of kNR runs one wide vector wide.
static void outer_block(const float* a, int rows, int Dp, const float* b, int ldb, int ncols, float* c, int ldc) {
  for (int n0 = 0; n0 < ncols; n0 += kNR) {
    const bool full = n0 + kNR <= ncols;
    for (int r0 = 0; r0 < rows; r0 += kMR) {
      const float* ar = a + static_cast<int64_t>(r0) * Dp;
      float* cr = c + static_cast<int64_t>(r0) * ldc + n0;
      with_rows<kMR>(imin(kMR, rows - r0), [&](auto m) {
        if (full)
          outer_tile<decltype(m)::value, kNW>(ar, Dp, b + n0, ldb, Dp, cr, ldc);
        else
          outer_tile<decltype(m)::value, 1>(ar, Dp, b + n0, ldb, Dp, cr, ldc);
      });
    }
  }
}

// O[M x Dp] = O * alpha + P . V[n x Dp], P indexed as in pv_tile and `vrow(j, c)` loading the wide
// vector of V row j at column c; the tiles cover kNR columns, a 16-column remainder one vector.
template <class VRowAt>
RK_INLINE void pv_strips(const float* p, int64_t ldr, int64_t ldj, int M, const VRowAt& vrow_at, int Dp, int n,
                         float* o, const float* alpha) {
  for (int r0 = 0; r0 < M; r0 += kMR) {
    const float* pr = p + r0 * ldr;
    float* orow = o + static_cast<int64_t>(r0) * Dp;
    for (int c0 = 0; c0 < Dp; c0 += kNR) {
      const auto vrow = [&vrow_at, c0](int j, int w) { return vrow_at(j, c0 + w * kWide); };
      with_rows<kMR>(imin(kMR, M - r0), [&](auto m) {
        if (c0 + kNR <= Dp)
          pv_tile<decltype(m)::value, kNW>(pr, ldr, ldj, vrow, n, orow + c0, Dp, alpha + r0);
        else
          pv_tile<decltype(m)::value, 1>(pr, ldr, ldj, vrow, n, orow + c0, Dp, alpha + r0);
      });
    }
  }
}

// pv_strips over fp32 V rows ldv apart.
static void pv_block(const float* p, int64_t ldr, int64_t ldj, int M, const float* v, int64_t ldv, int Dp, int n,
                     float* o, const float* alpha) {
  pv_strips(p, ldr, ldj, M, [v, ldv](int j, int c) { return wload(v + j * ldv + c); }, Dp, n, o, alpha);
}

// pv_strips over V rows vh + voff[j] read straight from the cache in their own dtype (decode; D =
// Dp, a multiple of 16: no padding column is read): converting V into a scratch copy first cost a
// store and a reload per element.
template <class DT>
static void pv_block_direct(const float* p, int64_t ldr, int64_t ldj, int M, const typename DT::T* vh,
                            const int64_t* voff, int Dp, int n, float* o, const float* alpha) {
  pv_strips(p, ldr, ldj, M, [vh, voff](int j, int c) { return DT::load16(vh + voff[j] + c); }, Dp, n, o, alpha);
}

// Online softmax (base-2 scores). The running max m is raised only when a block's max exceeds it
// by more than kLazyMax: probabilities then stay below 2^8, harmless in fp32, and most blocks
// skip the rescale (and its exp2) entirely: alpha is exactly 1. The result and the LSE
// (m + log2 l) are unchanged. Invisible (masked) scores are set to -inf and their
// probabilities are selected to 0, so nothing from a masked key reaches the accumulator.
constexpr float kLazyMax = 8.0f;

// One online-softmax step over S^T [nb keys][ld] (raw q.k of one key block for Mp query rows),
// one vector VT of query rows at a time (V: 8, W: 16), so nothing is horizontal or scalar per row.
// `lim` (as floats) holds the number of visible keys of each row for a block that masks some
// (causal diagonal), or is null when every row sees all nb keys; `lo`, when given, the first key
// each row sees (a sliding window's left edge): keys [lo, lim) are visible. m, l, alpha are per row (Mp, a
// multiple of VT's lanes).
// `scale2` (softmax_scale * log2 e) multiplies each finished score once, here, rather than the
// rotated Q row before the dot: pre-scaling Q adds one rounding per channel to every score, and
// in fp32 that took the output error to 2.7x the eager fp32 baseline's in the worst of 200 random
// small cases (emulated; 1.8x scaling here), breaking the 2x rule of docs/design.md §5 at small positions.
template <class VT>
static void softmax_cols(float* st, int64_t ld, int Mp, int nb, const float* lim, float scale2, float* m, float* l,
                         float* alpha, const float* lo = nullptr) {
  using L = Lanes<VT>;
  const VT neg_inf = L::set1(-kInf), lazy = L::set1(kLazyMax), zero = L::set1(0.0f), one = L::set1(1.0f);
  const VT sc = L::set1(scale2);
  for (int c = 0; c < Mp; c += L::n) {
    float* col = st + c;
    VT mx = neg_inf;
    if (lim && lo) {
      const VT lv = L::load(lim + c), fv = L::load(lo + c);
      for (int n = 0; n < nb; ++n) {
        const VT nv = L::set1(static_cast<float>(n));
        const VT x = vselect_lt(nv, fv, neg_inf, vselect_lt(nv, lv, L::load(col + n * ld) * sc, neg_inf));
        L::store(col + n * ld, x);
        mx = vmax(mx, x);
      }
    } else if (lim) {
      const VT lv = L::load(lim + c);
      for (int n = 0; n < nb; ++n) {
        const VT x = vselect_lt(L::set1(static_cast<float>(n)), lv, L::load(col + n * ld) * sc, neg_inf);
        L::store(col + n * ld, x);
        mx = vmax(mx, x);
      }
    } else {
      for (int n = 0; n < nb; ++n) {
        const VT x = L::load(col + n * ld) * sc;
        L::store(col + n * ld, x);
        mx = vmax(mx, x);
      }
    }
    // Raise the running max only where it was -inf or the block exceeds it by kLazyMax.
    const VT mo = L::load(m + c);
    const auto raise = vor_mask(vcmp_eq(mo, neg_inf), vcmp_gt(mx, mo + lazy));
    const VT mn = vselect(raise, mx, mo);
    // mo = -inf: alpha 0 (the accumulator is still 0); vexp2 flushes -inf to 0 without NaN.
    const VT a = vselect(raise, vselect(vcmp_eq(mo, neg_inf), zero, vexp2(mo - mn)), one);
    VT sum0 = zero, sum1 = zero;
    int n = 0;
    if (lim) {
      for (; n < nb; ++n) {
        const VT x = L::load(col + n * ld);
        const VT pj = vzero_where_neginf(x, vexp2(x - mn));
        L::store(col + n * ld, pj);
        sum0 = sum0 + pj;
      }
    } else {
      for (; n + 1 < nb; n += 2) {
        const VT p0 = vexp2(L::load(col + n * ld) - mn), p1 = vexp2(L::load(col + (n + 1) * ld) - mn);
        L::store(col + n * ld, p0);
        L::store(col + (n + 1) * ld, p1);
        sum0 = sum0 + p0;
        sum1 = sum1 + p1;
      }
      if (n < nb) {
        const VT p0 = vexp2(L::load(col + n * ld) - mn);
        L::store(col + n * ld, p0);
        sum0 = sum0 + p0;
      }
    }
    L::store(m + c, mn);
    L::store(l + c, vfma(L::load(l + c), a, sum0 + sum1));
    L::store(alpha + c, a);
  }
}

// Natural-log LSE from the base-2 max and the sum; in double, so the change of base adds no
// rounding to the fp32 result (two fp32 roundings here measured as large as the baseline's error).
RK_INLINE float finish_lse(float m, float l) {
  if (!(l > 0.0f)) return -kInf;
  return static_cast<float>(static_cast<double>(m) * 0.69314718055994530942 + __builtin_log(static_cast<double>(l)));
}

// ---------------------------------------------------------------- cos/sin tables
RK_INLINE int batch_of_row(const int32_t* cu, int batch, int64_t r) {
  int lo = 0, hi = batch;  // largest b with cu[b] <= r (skips empty sequences ending at r)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

void cos_sin_rows(const CosSinJob& job, int64_t begin, int64_t end) {
  const RopeParams& rope = job.rope;
  const int R = rope.rotary_dim, cp = cs_pad_of(R);
  for (int64_t r = begin; r < end; ++r) {
    int b;
    int64_t first;
    if (job.cu_rows) {
      b = batch_of_row(job.cu_rows, job.batch, r);
      first = job.cu_rows[b];
    } else {
      b = static_cast<int>(r / job.rows_per_batch);
      first = b * job.rows_per_batch;
    }
    const int32_t pos = job.positions ? job.positions[r] : static_cast<int32_t>(r - first);
    cos_sin_row(pos, seq_rope(rope, b), cp, job.out + r * 2 * cp);
  }
}

// ---------------------------------------------------------------- AMX (bf16 tiles)
// The AMX unit (kernels_amx.cpp) computes the tiled kernel's two products for bf16 inputs on the
// tile unit: rotated Q and K rounded to bf16 once, the probabilities rounded to bf16 for P.V (as
// GPU FlashAttention does), fp32 accumulation; the softmax and everything else as in the other
// units. All eight tiles are 16 rows x 64 bytes: C 16 x 16 fp32, A 16 x 32 bf16, B 16 pairs x 16
// columns of bf16 pairs (the layout tdpbf16ps multiplies: B[k][n] = (b[2k][n], b[2k+1][n])).
#if RK_AMX
constexpr bool kAmx = true;
constexpr int kColAlign = 32;  // query columns per item padded for 2 x 16-column tiles
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
RK_INLINE void amx_begin() {
  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}
RK_INLINE void amx_end() { _tile_release(); }

// C [M][N] (fp32, ldc floats a row) = (accumulate ? C : 0) + A [M][K] (bf16 rows, lda apart) .
// B [K/2][N] (bf16 pairs of rows 2k, 2k + 1 of the right-hand matrix, ldb pairs apart); M, N and
// K multiples of 32: 2 x 2 C tiles per two A and two B tile loads.
static void amx_gemm(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc, int M,
                     int N, int K, bool accumulate) {
  for (int m0 = 0; m0 < M; m0 += 32)
    for (int n0 = 0; n0 < N; n0 += 32) {
      float* c0 = c + m0 * ldc + n0;
      if (accumulate) {
        _tile_loadd(0, c0, ldc * 4);
        _tile_loadd(1, c0 + 16, ldc * 4);
        _tile_loadd(2, c0 + 16 * ldc, ldc * 4);
        _tile_loadd(3, c0 + 16 * ldc + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, a + m0 * lda + k0, lda * 2);
        _tile_loadd(5, a + (m0 + 16) * lda + k0, lda * 2);
        _tile_loadd(6, b + (k0 / 2) * ldb + n0, ldb * 4);
        _tile_loadd(7, b + (k0 / 2) * ldb + n0 + 16, ldb * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, ldc * 4);
      _tile_stored(1, c0 + 16, ldc * 4);
      _tile_stored(2, c0 + 16 * ldc, ldc * 4);
      _tile_stored(3, c0 + 16 * ldc + 16, ldc * 4);
    }
}

// St [nbk][Mp] (fp32, S^T) = Kb [nbk][Dk] (bf16 key rows) . Qp [Dk/2][Mp] (bf16 pairs of the
// transposed Q tile).
RK_INLINE void amx_scores(const uint16_t* kb, int nbk, int Dk, const uint32_t* qp, int Mp, float* st) {
  amx_gemm(kb, Dk, qp, Mp, st, Mp, nbk, Mp, Dk, false);
}

// O [Mp][Dp] (fp32) += Pb [Mp][nbk] (bf16 probability rows) . Vp [nbk/2][Dp] (bf16 pairs of
// consecutive V rows).
RK_INLINE void amx_pv(const uint16_t* pb, int Mp, int nbk, const uint32_t* vp, int Dp, float* o) {
  amx_gemm(pb, nbk, vp, Dp, o, Dp, Mp, Dp, nbk, true);
}
#else
constexpr bool kAmx = false;
constexpr int kColAlign = 16;
RK_INLINE void amx_begin() {}
RK_INLINE void amx_end() {}
RK_INLINE void amx_scores(const uint16_t*, int, int, const uint32_t*, int, float*) {}
RK_INLINE void amx_pv(const uint16_t*, int, int, const uint32_t*, int, float*) {}
RK_INLINE void amx_gemm(const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, int, int, int, bool) {}
#endif

// Eight floats rounded to bf16 for a tile operand. The AMX unit uses AVX512_BF16's one-instruction
// conversion (round to nearest even like vstore_bf16, but denormals to zero and any NaN quiet):
// vstore_bf16's eight integer operations per vector were the largest cost around the tiles. The
// outputs keep vstore_bf16 (exact c10 rounding).
RK_INLINE void vstore_bf16_operand(uint16_t* p, V a) {
#if RK_AMX
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), (__m128i)_mm256_cvtneps_pbh(a.v));
#else
  vstore_bf16(p, a);
#endif
}

// Rows [r0, r0 + 8) of an fp32 matrix (ld floats apart) rounded to bf16 and transposed as 32-bit
// pairs: out[k][r0 + t] = (x[t][2k], x[t][2k + 1]) for k < n2 (n2 a multiple of 8), out rows ldo
// pairs apart. The AMX B operand of Q (pairs of channels) from Q rows.
RK_INLINE void bf16_pairs_transposed(const float* x, int64_t ld, int n2, uint32_t* tmp, uint32_t* out, int64_t ldo,
                                     int r0) {
  for (int t = 0; t < 8; ++t)
    for (int d = 0; d < 2 * n2; d += kLanes)
      vstore_bf16_operand(reinterpret_cast<uint16_t*>(tmp + static_cast<int64_t>(t) * n2) + d, vload(x + t * ld + d));
  for (int k0 = 0; k0 < n2; k0 += 8) {
    V r8[8];
    for (int t = 0; t < 8; ++t) r8[t] = vload(reinterpret_cast<const float*>(tmp + static_cast<int64_t>(t) * n2 + k0));
    transpose8(r8);
    for (int u = 0; u < 8; ++u) vstore(reinterpret_cast<float*>(out + (k0 + u) * ldo + r0), r8[u]);
  }
}

// AMX operands of one K/V block (fp32 rows of nb keys, Dp floats apart; rows nb .. nbk - 1 are
// zeroed, so the padded tiles add nothing): the K rows in bf16, and the bf16 pairs of V rows
// (2j, 2j + 1) (exact: V came in as bf16).
static void amx_k_operand(float* Ks, int nb, int nbk, int Dp, uint16_t* Kb) {
  zero_floats(Ks + static_cast<int64_t>(nb) * Dp, static_cast<int64_t>(nbk - nb) * Dp);
  for (int64_t e = 0; e < static_cast<int64_t>(nbk) * Dp; e += kLanes) vstore_bf16_operand(Kb + e, vload(Ks + e));
}
static void amx_v_operand(float* Vs, int nb, int nbk, int Dp, uint32_t* Vp) {
  zero_floats(Vs + static_cast<int64_t>(nb) * Dp, static_cast<int64_t>(nbk - nb) * Dp);
  for (int j2 = 0; j2 < nbk / 2; ++j2) {
    const float* a = Vs + static_cast<int64_t>(2 * j2) * Dp;
    uint16_t* dst = reinterpret_cast<uint16_t*>(Vp + static_cast<int64_t>(j2) * Dp);
    for (int c = 0; c < Dp; c += kLanes) {
      V lo, hi;
      vzip(vload(a + c), vload(a + Dp + c), &lo, &hi);
      vstore_bf16_operand(dst + 2 * c, lo);
      vstore_bf16_operand(dst + 2 * c + kLanes, hi);
    }
  }
}

// O = O * alpha + P . V on the tile unit: the probabilities St [nb][Mp] (fp32, from softmax_cols)
// to query rows Pb [Mp][nbk] in bf16 (keys past nb zero), O's rows rescaled where alpha != 1 (the
// lazy running max leaves most at exactly 1), then amx_pv.
// St [nb][Mp] (fp32) transposed to rows Pb [Mp][nbk] in bf16, keys past nb zero: the A operand
// of a product over keys (P.V; dS.K in the backward).
static void amx_rows_of_transposed(const float* St, int Mp, int nb, int nbk, uint16_t* Pb) {
  for (int c0 = 0; c0 < Mp; c0 += 8)
    for (int j0 = 0; j0 < nbk; j0 += 8) {
      V r8[8];
      for (int t = 0; t < 8; ++t) r8[t] = j0 + t < nb ? vload(St + static_cast<int64_t>(j0 + t) * Mp + c0) : vzero();
      transpose8(r8);
      for (int u = 0; u < 8; ++u) vstore_bf16_operand(Pb + static_cast<int64_t>(c0 + u) * nbk + j0, r8[u]);
    }
}

static void amx_pv_step(const float* St, int Mp, int nb, int nbk, const float* alpha, uint16_t* Pb, const uint32_t* Vp,
                        int Dp, float* O) {
  amx_rows_of_transposed(St, Mp, nb, nbk, Pb);
  for (int r = 0; r < Mp; ++r)
    if (alpha[r] != 1.0f) scale_row(O + static_cast<int64_t>(r) * Dp, Dp, alpha[r]);
  amx_pv(Pb, Mp, nbk, Vp, Dp, O);
}

// Eight fp32 rows of Dp channels (Dp apart) into columns r0 .. r0 + 7 of a transposed tile
// [Dp][Mp] (the B operand of outer_block).
RK_INLINE void transpose_rows8(const float* rows, int Dp, float* t, int Mp, int r0) {
  for (int d = 0; d < Dp; d += 8) {
    V r8[8];
    for (int i = 0; i < 8; ++i) r8[i] = vload(rows + i * Dp + d);
    transpose8(r8);
    for (int u = 0; u < 8; ++u) vstore(t + static_cast<int64_t>(d + u) * Mp + r0, r8[u]);
  }
}

// ---------------------------------------------------------------- tiled forward
// Query rows of an item, padded to whole 16-column tiles of the transposed Q.
RK_INLINE int round_cols(int n) { return (n + kColAlign - 1) / kColAlign * kColAlign; }
RK_INLINE int tile_cols(const TiledPlan& plan) {
  return round_cols(plan.block_m * (plan.p.num_heads / plan.p.num_heads_k));
}

int64_t tiled_scratch_floats(const TiledPlan& plan) {
  const int Dp = head_dim_pad_of(plan.p.head_dim);
  const int64_t Mp = tile_cols(plan);
  const int64_t amx = kAmx ? 2 * align16(kBlockN * Dp / 2) + align16(Mp * Dp / 2) + align16(Mp * kBlockN / 2) +
                                  align16(4 * Dp)
                            : 0;
  return 2 * align16(Mp * Dp) + align16(Mp * kBlockN) + 2 * align16(static_cast<int64_t>(kBlockN) * Dp) +
         align16(8 * Dp) + 5 * align16(Mp) + amx;
}

// Where key j of one sequence and KV head lives: packed/dense rows, or a paged cache's blocks.
template <class T>
struct KVRows {
  const T* k;
  const T* v;
  int64_t k_seq, v_seq;  // offset of the sequence (dense, varlen)
  int64_t k_row, v_row, k_block, v_block;
  const int32_t* btab;  // paged: this sequence's block table row, else null
  int block_size;
  int64_t row_bytes;
  RK_INLINE const T* krow(int64_t j) const {
    return k + (btab ? btab[j / block_size] * k_block + (j % block_size) * k_row : k_seq + j * k_row);
  }
  RK_INLINE const T* vrow(int64_t j) const {
    return v + (btab ? btab[j / block_size] * v_block + (j % block_size) * v_row : v_seq + j * v_row);
  }
  // Ask for the K/V rows and cos/sin table rows of keys [j0, j1) one block ahead of use: the QK
  // and PV work of the current block (~200k cycles) hides their latency (+5% measured).
  RK_INLINE void prefetch(int64_t j0, int64_t j1, const float* cs, int64_t cs_stride) const {
    for (int64_t j = j0; j < j1; ++j) {
      const char* kr = reinterpret_cast<const char*>(krow(j));
      const char* vr = reinterpret_cast<const char*>(vrow(j));
      for (int64_t c = 0; c < row_bytes; c += 64) {
        __builtin_prefetch(kr + c, 0, 3);
        __builtin_prefetch(vr + c, 0, 3);
      }
      if (cs) {
        const char* cr = reinterpret_cast<const char*>(cs + j * cs_stride);
        for (int64_t c = 0; c < cs_stride * 4; c += 64) __builtin_prefetch(cr + c, 0, 2);
      }
    }
  }
};

// KV head hkv of sequence b (its first packed row k_row0 when varlen), not paged.
template <class T>
RK_INLINE KVRows<T> kv_rows(const AttnParams& p, int b, int hkv, int64_t k_row0) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  KVRows<T> kv;
  kv.k = static_cast<const T*>(p.k) + hkv * p.k_head_stride;
  kv.v = static_cast<const T*>(p.v) + hkv * p.v_head_stride;
  kv.k_seq = varlen ? k_row0 * p.k_row_stride : b * p.k_batch_stride;
  kv.v_seq = varlen ? k_row0 * p.v_row_stride : b * p.v_batch_stride;
  kv.k_row = p.k_row_stride;
  kv.v_row = p.v_row_stride;
  kv.k_block = p.k_batch_stride;
  kv.v_block = p.v_batch_stride;
  kv.btab = nullptr;
  kv.block_size = 0;
  kv.row_bytes = static_cast<int64_t>(p.head_dim) * sizeof(T);
  return kv;
}

// amx_v_operand from the bf16 rows themselves (the AMX unit's bf16 inputs, D = Dp): each pair of
// keys' rows interleaved 16 bits at a time, rows past nb zeros.
template <class KV>
static void amx_v_operand_raw(const KV& kv, int64_t j0, int nb, int nbk, int Dp, uint32_t* Vp) {
#if RK_AMX
  for (int j2 = 0; j2 < nbk / 2; ++j2) {
    const bool has_a = 2 * j2 < nb, has_b = 2 * j2 + 1 < nb;
    const uint16_t* a = has_a ? reinterpret_cast<const uint16_t*>(kv.vrow(j0 + 2 * j2)) : nullptr;
    const uint16_t* b = has_b ? reinterpret_cast<const uint16_t*>(kv.vrow(j0 + 2 * j2 + 1)) : nullptr;
    uint16_t* dst = reinterpret_cast<uint16_t*>(Vp + static_cast<int64_t>(j2) * Dp);
    for (int c = 0; c < Dp; c += 8) {
      const __m128i x = has_a ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + c)) : _mm_setzero_si128();
      const __m128i y = has_b ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c)) : _mm_setzero_si128();
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * c), _mm_unpacklo_epi16(x, y));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * c + 8), _mm_unpackhi_epi16(x, y));
    }
  }
#else
  (void)kv, (void)j0, (void)nb, (void)nbk, (void)Dp, (void)Vp;
#endif
}

// Which keys each query of one sequence sees, [lo(i), hi(i)): the causal diagonal (bottom-right:
// query i sits at key position i + sk - sq) and the sliding window; both bounds grow with i.
// P: AttnParams or DecodeParams.
struct KeySpan {
  int64_t sk, off, wl, wr;
  bool causal;
  template <class P>
  KeySpan(const P& p, int64_t sq, int64_t sk_)
      : sk(sk_), off(sk_ - sq), wl(p.window_left), wr(p.causal ? -1 : p.window_right), causal(p.causal) {}
  RK_INLINE int64_t hi(int64_t i) const {
    int64_t h = sk;
    if (causal) h = lmin(h, i + off + 1);
    if (wr >= 0) h = lmin(h, i + off + wr + 1);
    return lmax_(h, 0);
  }
  RK_INLINE int64_t lo(int64_t i) const { return wl >= 0 ? lmin(sk, lmax_(0, i + off - wl)) : int64_t{0}; }
};

// Sequence b's query and key rows: its first packed row and length (varlen), or row 0 and the
// dense lengths (keys: `sk_dense`, which a cache sets per sequence).
struct SeqRows {
  int64_t q0, sq, k0, sk;
};
RK_INLINE SeqRows seq_rows(const AttnParams& p, int b, int64_t sk_dense) {
  if (!p.cu_seqlens_q) return {0, p.seqlen_q, 0, sk_dense};
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  return {q0, p.cu_seqlens_q[b + 1] - q0, k0, p.cu_seqlens_k[b + 1] - k0};
}

template <class DT>
void tiled_item_t(const TiledPlan& plan, int64_t item, float* scratch) {
  using T = typename DT::T;
  const AttnParams& p = plan.p;
  const int Hkv = p.num_heads_k, G = p.num_heads / Hkv, D = p.head_dim, Dp = head_dim_pad_of(D);
  const int R = p.rope.rotary_dim, cp = cs_pad_of(R);
  const bool il = p.rope.interleaved;
  const int64_t cs_stride = 2 * cp;
  // Items of one (sequence, KV head) are consecutive, so the threads share its K/V in L3. Causal
  // cost grows with the query block: within a head the longest blocks go first, which also
  // leaves the shortest items for the end of the run.
  const int64_t bh = item / plan.num_q_blocks;
  const int64_t rank = item % plan.num_q_blocks;
  const int64_t qb = p.causal ? plan.num_q_blocks - 1 - rank : rank;
  const int b = static_cast<int>(bh / Hkv), hkv = static_cast<int>(bh % Hkv);
  const bool varlen = p.cu_seqlens_q != nullptr;

  const SeqRows rows = seq_rows(p, b, plan.cache_lens ? plan.cache_lens[b] : p.seqlen_k);
  const int64_t sq = rows.sq, sk = rows.sk, q_row0 = rows.q0, k_row0 = rows.k0;
  const int64_t i0 = qb * plan.block_m;
  if (i0 >= sq) return;
  const int64_t i1 = lmin(sq, i0 + plan.block_m);
  const int nq = static_cast<int>(i1 - i0), M = nq * G;
  // A tile's keys run from its first row's lo to its last row's hi (both grow with the row).
  const KeySpan span(p, sq, sk);
  const int64_t j_begin = span.lo(i0), j_end = lmax_(j_begin, span.hi(i1 - 1));

  const T* q = static_cast<const T*>(p.q) + (varlen ? q_row0 * p.q_row_stride : b * p.q_batch_stride);
  T* out = static_cast<T*>(p.out) + (varlen ? q_row0 * p.o_row_stride : b * p.o_batch_stride);
  KVRows<T> kv = kv_rows<T>(p, b, hkv, k_row0);
  kv.btab = plan.block_table ? plan.block_table + b * plan.block_table_stride : nullptr;
  kv.block_size = plan.block_size;
  const float* q_cs = R ? plan.q_cs + (varlen ? q_row0 : b * static_cast<int64_t>(p.seqlen_q)) * cs_stride : nullptr;
  const float* k_cs = R ? plan.k_cs + (varlen ? k_row0 : b * plan.k_cs_rows) * cs_stride : nullptr;
  const float scale2 = p.softmax_scale * kLog2e;
  if (j_end > j_begin) kv.prefetch(j_begin, lmin(j_begin + kBlockN, j_end), k_cs, cs_stride);

  const int Mp = round_cols(M);
  // The AMX unit's tile products for bf16 inputs with D a multiple of 32 (other inputs: as elsewhere).
  const bool amx = kAmx && DT::is_bf16 && D % 32 == 0;
  Bump bump{scratch};
  float* Qt = bump.take(static_cast<int64_t>(Dp) * Mp);  // Q tile transposed: [Dp][Mp]
  float* O = bump.take(static_cast<int64_t>(Mp) * Dp);
  float* St = bump.take(static_cast<int64_t>(kBlockN) * Mp);  // scores, then probabilities: [keys][Mp]
  float* Ks = bump.take(static_cast<int64_t>(kBlockN) * Dp);
  float* Vs = bump.take(static_cast<int64_t>(kBlockN) * Dp);
  float* Q8 = bump.take(8 * Dp);
  float* m = bump.take(Mp);
  float* l = bump.take(Mp);
  float* alpha = bump.take(Mp);
  float* lim = bump.take(Mp);
  float* lo = bump.take(Mp);
  uint16_t* Kb = nullptr;  // AMX: rotated K rows in bf16 [kBlockN][Dp]
  uint32_t* Vp = nullptr;  // AMX: bf16 pairs of V rows (2j, 2j + 1) [kBlockN / 2][Dp]
  uint32_t* Qp = nullptr;  // AMX: bf16 pairs of the transposed Q tile [Dp / 2][Mp]
  uint16_t* Pb = nullptr;  // AMX: probabilities in bf16, query rows [Mp][kBlockN]
  uint32_t* tmp = nullptr;
  if (amx) {
    Kb = reinterpret_cast<uint16_t*>(bump.take(kBlockN * Dp / 2));
    Vp = reinterpret_cast<uint32_t*>(bump.take(kBlockN * Dp / 2));
    Qp = reinterpret_cast<uint32_t*>(bump.take(static_cast<int64_t>(Mp) * Dp / 2));
    Pb = reinterpret_cast<uint16_t*>(bump.take(static_cast<int64_t>(Mp) * kBlockN / 2));
    tmp = reinterpret_cast<uint32_t*>(bump.take(4 * Dp));
    amx_begin();
  }

  // Q tile: rows r = (i - i0) * G + g, rotated once (the base-2 softmax scale is applied to the
  // finished scores, see softmax_cols) and transposed eight rows at a time (rows past M are zeros).
  for (int r0 = 0; r0 < Mp; r0 += 8) {
    for (int t = 0; t < 8; ++t) {
      const int r = r0 + t;
      float* row = Q8 + t * Dp;
      if (r >= M) {
        zero_floats(row, Dp);
        continue;
      }
      const int64_t i = i0 + r / G;
      const int h = hkv * G + r % G;
      load_rotate_row<DT>(q + i * p.q_row_stride + h * p.q_head_stride, R ? q_cs + i * cs_stride : nullptr, R, cp, il,
                          D, Dp, row);
    }
    if (amx) {
      bf16_pairs_transposed(Q8, Dp, Dp / 2, tmp, Qp, Mp, r0);
      continue;
    }
    transpose_rows8(Q8, Dp, Qt, Mp, r0);
  }
  for (int r = 0; r < Mp; ++r) {
    m[r] = -kInf;
    l[r] = 0.0f;
  }
  zero_floats(O, static_cast<int64_t>(Mp) * Dp);

  for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
    const int nb = static_cast<int>(lmin(kBlockN, j_end - j0));
    // Some row of the tile does not see every key of the block: the causal diagonal, or a window's edge.
    const bool diagonal = j0 + nb > span.hi(i0) || j0 < span.lo(i1 - 1);
    // AMX off the diagonal: V's tile operand straight from the bf16 rows, no fp32 copy (the
    // diagonal keeps Vs for its check of masked non-finite values).
    const bool v_raw = amx && !diagonal;
    // K and V blocks: each key is converted and rotated once for all G * nq query rows.
    for (int jj = 0; jj < nb; ++jj) {
      const int64_t j = j0 + jj;
      float* krow = Ks + static_cast<int64_t>(jj) * Dp;
      load_rotate_row<DT>(kv.krow(j), R ? k_cs + j * cs_stride : nullptr, R, cp, il, D, Dp, krow);
      if (!v_raw) load_row<DT>(kv.vrow(j), D, Dp, Vs + static_cast<int64_t>(jj) * Dp);
    }
    if (j0 + kBlockN < j_end) kv.prefetch(j0 + kBlockN, lmin(j0 + 2 * kBlockN, j_end), k_cs, cs_stride);
    const int nbk = (nb + 31) / 32 * 32;  // AMX: keys padded to whole tiles with zero rows
    if (amx) {
      amx_k_operand(Ks, nb, nbk, Dp, Kb);
      if (v_raw)
        amx_v_operand_raw(kv, j0, nb, nbk, Dp, Vp);
      else
        amx_v_operand(Vs, nb, nbk, Dp, Vp);
    }

    // Causal: rows whose last visible key falls inside this block get a per-row key count, and
    // the block is computed only as far as some row of a 16-column score tile / 6-row P.V strip
    // sees (the rest is masked by the count): the triangle costs 9% of the work at 1K, 2% at 4K.
    if (!diagonal) {
      if (amx) {
        amx_scores(Kb, nbk, Dp, Qp, Mp, St);
        softmax_cols<W>(St, Mp, Mp, nb, nullptr, scale2, m, l, alpha);
        amx_pv_step(St, Mp, nb, nbk, alpha, Pb, Vp, Dp, O);
        continue;
      }
      outer_block(Ks, nb, Dp, Qt, Mp, Mp, St, Mp);
      softmax_cols<W>(St, Mp, Mp, nb, nullptr, scale2, m, l, alpha);
      pv_block(St, 1, Mp, M, Vs, Dp, Dp, nb, O, alpha);
      continue;
    }
    // Row r sees the block's keys [first(r), visible(r)).
    auto visible = [&](int r) { return static_cast<int>(lmin(nb, lmax_(0, span.hi(i0 + r / G) - j0))); };
    auto first = [&](int r) { return static_cast<int>(lmin(nb, lmax_(0, span.lo(i0 + r / G) - j0))); };
    // Padding rows (r >= M) see nothing: their columns stay -inf/0 instead of reading stale scores.
    for (int r = 0; r < Mp; ++r) {
      lim[r] = static_cast<float>(r < M ? visible(r) : 0);
      lo[r] = static_cast<float>(r < M ? first(r) : 0);
    }
    const bool windowed = span.wl >= 0 && j0 < span.lo(i1 - 1);
    if (amx) {
      amx_scores(Kb, nbk, Dp, Qp, Mp, St);
    } else {
      for (int c0 = 0; c0 < Mp; c0 += kNR) {
        const int keys = c0 < M ? visible(imin(c0 + kNR, M) - 1) : 0;
        if (keys > 0) outer_block(Ks, keys, Dp, Qt + c0, Mp, imin(kNR, Mp - c0), St + c0, Mp);
      }
    }
    softmax_cols<W>(St, Mp, Mp, nb, lim, scale2, m, l, alpha, windowed ? lo : nullptr);
    // A strip of rows runs over the keys its rows see, multiplying the other rows' zero
    // probabilities of keys they cannot see by those keys' V: a NaN or an infinity there would
    // reach them (0 * NaN = NaN). When the V rows some row cannot see, [0, first(M - 1)) and
    // [visible(0), nb), hold one, each row runs alone over its own keys (only non-finite values in
    // V take this path).
    const int seen_by_all = M ? visible(0) : nb, seen_from = M ? first(M - 1) : 0;
    const bool one_by_one =
        !all_finite(Vs + static_cast<int64_t>(seen_by_all) * Dp, static_cast<int64_t>(nb - seen_by_all) * Dp) ||
        !all_finite(Vs, static_cast<int64_t>(seen_from) * Dp);
    if (amx) {
      // The tiles multiply every probability, masked zeros included: the non-finite V entries of
      // keys some row cannot see go through them as 0 (the row that cannot see them gets what it
      // would with a 0 there) and are added afterwards, in fp32, to the rows that see them.
      const auto hidden_key = [&](int jj) { return jj < seen_from || jj >= seen_by_all; };
      if (one_by_one) {
        for (int jj = 0; jj < nb; ++jj) {
          if (!hidden_key(jj)) continue;
          float* vrow = Vs + static_cast<int64_t>(jj) * Dp;
          for (int c = 0; c < Dp; ++c)
            if (!(vrow[c] - vrow[c] == 0.0f)) vrow[c] = 0.0f;
        }
        amx_v_operand(Vs, nb, nbk, Dp, Vp);
      }
      amx_pv_step(St, Mp, nb, nbk, alpha, Pb, Vp, Dp, O);
      for (int jj = 0; one_by_one && jj < nb; ++jj) {
        if (!hidden_key(jj)) continue;
        const T* vr = kv.vrow(j0 + jj);
        for (int c = 0; c < D; ++c) {
          const float x = DT::to_float(vr[c]);
          if (x - x == 0.0f) continue;
          for (int r = 0; r < M; ++r)
            if (first(r) <= jj && visible(r) > jj)
              O[static_cast<int64_t>(r) * Dp + c] += St[static_cast<int64_t>(jj) * Mp + r] * x;
        }
      }
      continue;
    }
    for (int r0 = 0; r0 < M; r0 += kMR) {
      const int rows = imin(kMR, M - r0);
      if (!one_by_one) {
        pv_block(St + r0, 1, Mp, rows, Vs, Dp, Dp, visible(r0 + rows - 1), O + static_cast<int64_t>(r0) * Dp,
                 alpha + r0);
        continue;
      }
      for (int r = r0; r < r0 + rows; ++r) {
        const int j1 = first(r), keys = imax(visible(r) - j1, 0);
        pv_block(St + r + static_cast<int64_t>(j1) * Mp, 1, Mp, 1, Vs + static_cast<int64_t>(j1) * Dp, Dp, Dp, keys,
                 O + static_cast<int64_t>(r) * Dp, alpha + r);
      }
    }
  }

  if (amx) amx_end();

  for (int r = 0; r < M; ++r) {
    const int64_t i = i0 + r / G;
    const int h = hkv * G + r % G;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    store_row<DT>(out + i * p.o_row_stride + h * p.o_head_stride, O + static_cast<int64_t>(r) * Dp, inv, D);
    if (p.lse) {
      const int64_t base = varlen ? q_row0 : b * p.lse_batch_stride;
      p.lse[base + h * p.lse_head_stride + i] = finish_lse(m[r], l[r]);
    }
  }
}

void tiled_item(const TiledPlan& plan, int64_t item, float* scratch) {
  switch (plan.dtype) {
    case DType::kFloat32: tiled_item_t<F32>(plan, item, scratch); break;
    case DType::kBFloat16: tiled_item_t<BF16>(plan, item, scratch); break;
    case DType::kFloat16: tiled_item_t<F16>(plan, item, scratch); break;
  }
}

// ---------------------------------------------------------------- decode
// Rows per KV head in the decode scratch Ks/Vs: the chunk plus one row of padding. Unpadded, the
// heads' rows were 16 * 512 B = 8 KiB apart at D = 128, so one key's rows of all 8 heads fell in
// the same 8 L1 sets (32 KiB, 8-way) as each other: the rotate pass stored into lines it was
// evicting. With the extra row, head h's rows shift by h rows and the 8 heads cover all 64 sets.
constexpr int kDecodeHeadRows = kDecodeChunk + 1;
int64_t decode_scratch_floats(const DecodePlan& plan) {
  const DecodeParams& p = plan.p;
  const int Dp = head_dim_pad_of(p.head_dim), cp = cs_pad_of(p.rope.rotary_dim);
  const int64_t rows = static_cast<int64_t>(p.num_heads) * p.seqlen_q;
  const int64_t rows8 = round8(static_cast<int>(rows));
  return 2 * align16(rows * Dp) + 5 * align16(rows8) + align16(static_cast<int64_t>(p.seqlen_q) * 2 * cp) +
         2 * align16(kDecodeChunk * 2 * cp) + 2 * align16(static_cast<int64_t>(p.num_heads_k) * kDecodeHeadRows * Dp) +
         align16(rows8 * kDecodeChunk);
}

template <class DT>
void decode_item_t(const DecodePlan& plan, int64_t item, float* scratch) {
  using T = typename DT::T;
  const DecodeParams& p = plan.p;
  const int Hq = p.num_heads, Hkv = p.num_heads_k, G = Hq / Hkv, Sq = p.seqlen_q, D = p.head_dim;
  const int Dp = head_dim_pad_of(D), R = p.rope.rotary_dim, cp = cs_pad_of(R);
  const bool il = p.rope.interleaved;
  const int64_t cs_stride = 2 * cp;
  const int b = static_cast<int>(item / plan.num_splits), split = static_cast<int>(item % plan.num_splits);
  const int64_t n = static_cast<int64_t>(p.cache_seqlens[b]) + p.s_new;
  // Query i sits at n - Sq + i; this split's keys are cut to those some query sees.
  const KeySpan span(p, Sq, n);
  const int64_t ks = lmax_(split * plan.split_len, span.lo(0));
  const int64_t ke = lmin(lmin(n, split * plan.split_len + plan.split_len), span.hi(Sq - 1));
  const int rows = Hq * Sq, group_rows = G * Sq;
  float* part = plan.partial + (static_cast<int64_t>(b) * plan.num_splits + split) * rows * (Dp + 2);
  if (ks >= ke) {  // this split holds no key of sequence b
    for (int r = 0; r < rows; ++r) {
      part[static_cast<int64_t>(r) * (Dp + 2) + Dp] = -kInf;
      part[static_cast<int64_t>(r) * (Dp + 2) + Dp + 1] = 0.0f;
    }
    return;
  }
  const SeqRope table = seq_rope(p.rope, b);
  const bool paged = p.block_table != nullptr;
  const int32_t* btab = paged ? p.block_table + b * p.block_table_batch_stride : nullptr;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;

  Bump bump{scratch};
  const int rows8 = round8(rows);  // scores are kept transposed, St[key][row], rows padded to 8
  float* Qs = bump.take(static_cast<int64_t>(rows) * Dp);
  float* O = bump.take(static_cast<int64_t>(rows) * Dp);
  float* m = bump.take(rows8);
  float* l = bump.take(rows8);
  float* alpha = bump.take(rows8);
  float* lim = bump.take(rows8);
  float* lo = bump.take(rows8);
  float* qcs = bump.take(static_cast<int64_t>(Sq) * cs_stride);
  float* kcs = bump.take(kDecodeChunk * cs_stride);
  float* kdelta = bump.take(kDecodeChunk * cs_stride);  // cos/sin of positions 0..kDecodeChunk-1, factor 1
  if (R && !table.rows) cos_sin_chunk(0, kDecodeChunk, {table.t, table.half, 1.0f, 0}, cp, kdelta, cs_stride);
  float* Ks = bump.take(static_cast<int64_t>(Hkv) * kDecodeHeadRows * Dp);  // [Hkv][chunk + 1][Dp]
  float* Vs = bump.take(static_cast<int64_t>(Hkv) * kDecodeHeadRows * Dp);
  float* St = bump.take(static_cast<int64_t>(kDecodeChunk) * rows8);

  // V is read in place by the P.V tiles when its rows have no padding (D a multiple of 16), else
  // through the fp32 copy Vs: one thread, 16K fp32 cache, 122-126 instead of 143-154 ns per key
  // and KV head (bf16 within noise, 100-105 vs 103-108 ns under load 6.6).
  const bool v_direct = D == Dp;
  const int64_t row_bytes = static_cast<int64_t>(D) * sizeof(T);
  int64_t voff[kDecodeChunk];

  // Queries: rows r = h * Sq + i at positions n - Sq + i, or 0 for the first Sq - n when the cache
  // holds fewer keys than there are queries (those see no key under causal).
  const float scale2 = p.softmax_scale * kLog2e;
  for (int i = 0; i < Sq; ++i)
    if (R) cos_sin_row(static_cast<int32_t>(lmax_(n - Sq + i, 0)), table, cp, qcs + i * cs_stride);
  for (int h = 0; h < Hq; ++h) {
    for (int i = 0; i < Sq; ++i) {
      const int r = h * Sq + i;
      float* dst = Qs + static_cast<int64_t>(r) * Dp;
      load_rotate_row<DT>(q + i * p.q_row_stride + h * p.q_head_stride, qcs + i * cs_stride, R, cp, il, D, Dp, dst);
    }
  }
  for (int r = 0; r < rows8; ++r) {
    m[r] = -kInf;
    l[r] = 0.0f;
  }
  zero_floats(O, static_cast<int64_t>(rows) * Dp);
  zero_floats(St, static_cast<int64_t>(kDecodeChunk) * rows8);  // padding rows stay finite

  for (int64_t c0 = ks; c0 < ke; c0 += kDecodeChunk) {
    const int nc = static_cast<int>(lmin(kDecodeChunk, ke - c0));
    const int w = round8(nc);
    // cos/sin of this chunk's positions, shared by every KV head.
    if (R) cos_sin_shifted(static_cast<int32_t>(c0), nc, table, cp, kdelta, kcs);
    // K and V of the chunk for every KV head, key by key: in the [.., S, Hkv, D] cache layout a
    // key's heads are adjacent, so this walks memory sequentially (head by head would jump
    // Hkv * D elements per key, defeating the hardware prefetcher: measured 4 vs 7 GB/s).
    for (int jj = 0; jj < w; ++jj) {
      const int64_t j = c0 + jj;
      int64_t k_off = 0, v_off = 0;
      if (jj < nc) {
        if (paged) {
          const int64_t blk = btab[j / p.block_size], t = j % p.block_size;
          k_off = blk * p.kc_batch_stride + t * p.kc_row_stride;
          v_off = blk * p.vc_batch_stride + t * p.vc_row_stride;
        } else {
          k_off = b * p.kc_batch_stride + j * p.kc_row_stride;
          v_off = b * p.vc_batch_stride + j * p.vc_row_stride;
        }
      }
      for (int hkv = 0; hkv < Hkv; ++hkv) {
        float* krow = Ks + (static_cast<int64_t>(hkv) * kDecodeHeadRows + jj) * Dp;
        if (jj >= nc) {
          zero_floats(krow, Dp);
          continue;
        }
        load_rotate_row<DT>(kc + k_off + hkv * p.kc_head_stride, kcs + jj * cs_stride, R, cp, il, D, Dp, krow);
        if (!v_direct)
          load_row<DT>(vc + v_off + hkv * p.vc_head_stride, D, Dp,
                       Vs + (static_cast<int64_t>(hkv) * kDecodeHeadRows + jj) * Dp);
      }
      voff[jj] = v_off;
      // The P.V tiles read V head by head (Hkv * D apart): ask for this key's V rows now, in
      // memory order, so that they arrive while K is rotated and scored. One thread, bf16, 4K-16K
      // cache (load 4.6-6.2): 81-98 vs 92-112 ns per key and KV head; fp32 within noise, left out.
      if (sizeof(T) == 2 && v_direct && jj < nc)
        for (int hkv = 0; hkv < Hkv; ++hkv) {
          const char* vr = reinterpret_cast<const char*>(vc + v_off + hkv * p.vc_head_stride);
          for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(vr + c, 0, 3);
        }
    }
    // Scores of every head into St[key][row]: tiles of 4 query rows x 2 keys (6 loads per 8
    // FMAs) reduced eight at a time; leftover rows one row x 8 keys.
    for (int hkv = 0; hkv < Hkv; ++hkv) {
      const float* Kh = Ks + static_cast<int64_t>(hkv) * kDecodeHeadRows * Dp;
      const int hr0 = hkv * group_rows;
      int rr = 0;
      for (; rr + 4 <= group_rows; rr += 4) {
        const float* q0 = Qs + static_cast<int64_t>(hr0 + rr) * Dp;
        for (int jj = 0; jj < w; jj += 2) {
          V acc[8];
          for (int t = 0; t < 8; ++t) acc[t] = vzero();
          const float* k0 = Kh + static_cast<int64_t>(jj) * Dp;
          for (int d = 0; d < Dp; d += kLanes) {
            const V kv0 = vload(k0 + d), kv1 = vload(k0 + Dp + d);
#pragma GCC unroll 4
            for (int r = 0; r < 4; ++r) {
              const V qv = vload(q0 + r * Dp + d);
              acc[2 * r] = vfma(qv, kv0, acc[2 * r]);
              acc[2 * r + 1] = vfma(qv, kv1, acc[2 * r + 1]);
            }
          }
          float sums[8];
          vstore(sums, hsum8(acc));
          for (int r = 0; r < 4; ++r) {
            St[jj * rows8 + hr0 + rr + r] = sums[2 * r];
            St[(jj + 1) * rows8 + hr0 + rr + r] = sums[2 * r + 1];
          }
        }
      }
      for (; rr < group_rows; ++rr) {
        const float* qr = Qs + static_cast<int64_t>(hr0 + rr) * Dp;
        for (int jj0 = 0; jj0 < w; jj0 += 8) {
          V acc[8];
          for (int t = 0; t < 8; ++t) acc[t] = vzero();
          const float* kb = Kh + static_cast<int64_t>(jj0) * Dp;
          for (int d = 0; d < Dp; d += kLanes) {
            const V qv = vload(qr + d);
#pragma GCC unroll 8
            for (int t = 0; t < 8; ++t) acc[t] = vfma(qv, vload(kb + t * Dp + d), acc[t]);
          }
          float sums[8];
          vstore(sums, hsum8(acc));
          for (int t = 0; t < 8; ++t) St[(jj0 + t) * rows8 + hr0 + rr] = sums[t];
        }
      }
    }
    // One online-softmax step for all rows, eight per vector. Causal with Sq > 1: query i sees
    // keys j <= n - Sq + i, which cuts into the last chunks only; a window's left edge into the first.
    const bool masked = c0 + nc > span.hi(0) || c0 < span.lo(Sq - 1);
    const bool windowed = span.wl >= 0 && c0 < span.lo(Sq - 1);
    if (masked)
      for (int r = 0; r < rows8; ++r) {
        lim[r] = r < rows ? static_cast<float>(lmin(nc, lmax_(0, span.hi(r % Sq) - c0))) : nc;
        lo[r] = r < rows ? static_cast<float>(lmin(nc, lmax_(0, span.lo(r % Sq) - c0))) : 0.0f;
      }
    softmax_cols<V>(St, rows8, rows8, nc, masked ? lim : nullptr, scale2, m, l, alpha, windowed ? lo : nullptr);
    for (int hkv = 0; hkv < Hkv; ++hkv) {
      const int hr0 = hkv * group_rows;
      const T* vh = vc + hkv * p.vc_head_stride;
      const float* Vh = Vs + static_cast<int64_t>(hkv) * kDecodeHeadRows * Dp;
      // With Sq > 1 a masked row must not multiply its zero probabilities by V rows it cannot see
      // holding a NaN or an infinity (as in the prefill's diagonal block): then each row runs alone.
      if (masked) {
        int seen_by_all = nc, seen_from = 0;
        for (int r = 0; r < group_rows; ++r) {
          seen_by_all = imin(seen_by_all, static_cast<int>(lim[hr0 + r]));
          if (windowed) seen_from = imax(seen_from, static_cast<int>(lo[hr0 + r]));
        }
        bool finite = true;
        if (v_direct) {
          float sum = 0.0f;
          for (int jj = 0; jj < nc; ++jj)
            if (jj < seen_from || jj >= seen_by_all)
              for (int d = 0; d < D; ++d) sum += DT::to_float(vh[voff[jj] + d]) * 0.0f;
          finite = sum == 0.0f;
        } else {
          finite = all_finite(Vh + static_cast<int64_t>(seen_by_all) * Dp, static_cast<int64_t>(nc - seen_by_all) * Dp) &&
                   all_finite(Vh, static_cast<int64_t>(seen_from) * Dp);
        }
        if (!finite) {
          for (int r = hr0; r < hr0 + group_rows; ++r) {
            const int j1 = windowed ? static_cast<int>(lo[r]) : 0;
            const int keys = imax(static_cast<int>(lim[r]) - j1, 0);
            float* o_r = O + static_cast<int64_t>(r) * Dp;
            const float* st_r = St + r + static_cast<int64_t>(j1) * rows8;
            if (v_direct)
              pv_block_direct<DT>(st_r, 1, rows8, 1, vh, voff + j1, Dp, keys, o_r, alpha + r);
            else
              pv_block(st_r, 1, rows8, 1, Vh + static_cast<int64_t>(j1) * Dp, Dp, Dp, keys, o_r, alpha + r);
          }
          continue;
        }
      }
      if (v_direct)
        pv_block_direct<DT>(St + hr0, 1, rows8, group_rows, vh, voff, Dp, nc, O + static_cast<int64_t>(hr0) * Dp,
                            alpha + hr0);
      else
        pv_block(St + hr0, 1, rows8, group_rows, Vh, Dp, Dp, nc, O + static_cast<int64_t>(hr0) * Dp, alpha + hr0);
    }
  }

  for (int r = 0; r < rows; ++r) {
    float* dst = part + static_cast<int64_t>(r) * (Dp + 2);
    memcpy(dst, O + static_cast<int64_t>(r) * Dp, static_cast<size_t>(Dp) * sizeof(float));
    dst[Dp] = m[r];
    dst[Dp + 1] = l[r];
  }
}

void decode_item(const DecodePlan& plan, int64_t item, float* scratch) {
  switch (plan.dtype) {
    case DType::kFloat32: decode_item_t<F32>(plan, item, scratch); break;
    case DType::kBFloat16: decode_item_t<BF16>(plan, item, scratch); break;
    case DType::kFloat16: decode_item_t<F16>(plan, item, scratch); break;
  }
}

// Combine the splits of rows (b, r = h * Sq + i) in [begin, end): weights 2^(m_s - max m), the
// first split's partial row is the accumulator; splits that saw no key (l = 0) are skipped.
template <class DT>
void decode_merge_t(const DecodePlan& plan, int64_t begin, int64_t end) {
  using T = typename DT::T;
  const DecodeParams& p = plan.p;
  const int Sq = p.seqlen_q, D = p.head_dim, Dp = head_dim_pad_of(D);
  const int64_t rows = static_cast<int64_t>(p.num_heads) * Sq;
  const int64_t row_len = Dp + 2;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t b = idx / rows, r = idx % rows;
    const int64_t h = r / Sq, i = r % Sq;
    float* first = plan.partial + (b * plan.num_splits * rows + r) * row_len;
    T* dst = static_cast<T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    float mx = -kInf;
    for (int s = 0; s < plan.num_splits; ++s) {
      const float* part = first + s * rows * row_len;
      if (part[Dp + 1] > 0.0f) mx = fmax_(mx, part[Dp]);
    }
    if (mx == -kInf) {
      for (int d = 0; d < D; ++d) dst[d] = DT::from_float(0.0f);
      if (p.lse) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = -kInf;
      continue;
    }
    float total = 0.0f;
    for (int s = 0; s < plan.num_splits; ++s) {
      float* part = first + s * rows * row_len;
      const float ls = part[Dp + 1];
      const float w = ls > 0.0f ? __builtin_exp2f(part[Dp] - mx) : 0.0f;
      total += ls * w;
      if (s == 0) {
        if (w > 0.0f)
          scale_row(first, Dp, w);
        else
          zero_floats(first, Dp);
      } else if (w > 0.0f) {
        const V vw = vset1(w);
        for (int d = 0; d < Dp; d += kLanes) vstore(first + d, vfma(vload(part + d), vw, vload(first + d)));
      }
    }
    store_row<DT>(dst, first, 1.0f / total, D);
    if (p.lse) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = finish_lse(mx, total);
  }
}

void decode_merge(const DecodePlan& plan, int64_t begin, int64_t end) {
  switch (plan.dtype) {
    case DType::kFloat32: decode_merge_t<F32>(plan, begin, end); break;
    case DType::kBFloat16: decode_merge_t<BF16>(plan, begin, end); break;
    case DType::kFloat16: decode_merge_t<F16>(plan, begin, end); break;
  }
}

// ---------------------------------------------------------------- apply_rope
int64_t rope_scratch_floats(const RopeJob& job) {
  return align16(2 * cs_pad_of(job.rope.rotary_dim)) + align16(job.rope.rotary_dim);
}

template <class DT>
void rope_rows_t(const RopeJob& job, int64_t begin, int64_t end, float* scratch) {
  using T = typename DT::T;
  const RopeParams& rope = job.rope;
  const int R = rope.rotary_dim, cp = cs_pad_of(R), D = job.head_dim;
  float* cs = scratch;
  float* row = scratch + align16(2 * cp);
  for (int64_t rix = begin; rix < end; ++rix) {
    const int64_t b = rix / job.seqlen, s = rix % job.seqlen;
    if (R) cos_sin_row(job.positions[rix], seq_rope(rope, b), cp, cs);
    const T* x = static_cast<const T*>(job.x) + b * job.x_batch_stride + s * job.x_row_stride;
    T* out = static_cast<T*>(job.out) + b * job.o_batch_stride + s * job.o_row_stride;
    for (int h = 0; h < job.num_heads; ++h) {
      const T* src = x + h * job.x_head_stride;
      T* dst = out + h * job.o_head_stride;
      if (R) {
        load_row<DT>(src, R, R, row);
        rotate_row(row, cs, R, cp, rope.interleaved);
        store_row<DT>(dst, row, 1.0f, R);
      }
      // Pass-through channels are copied bit for bit (not through fp32).
      if (D > R && dst != src) memcpy(dst + R, src + R, static_cast<size_t>(D - R) * sizeof(T));
    }
  }
}

void rope_rows(const RopeJob& job, int64_t begin, int64_t end, float* scratch) {
  switch (job.dtype) {
    case DType::kFloat32: rope_rows_t<F32>(job, begin, end, scratch); break;
    case DType::kBFloat16: rope_rows_t<BF16>(job, begin, end, scratch); break;
    case DType::kFloat16: rope_rows_t<F16>(job, begin, end, scratch); break;
  }
}

#include "kernels_bwd.h"

}  // namespace RK_ISA

// The unit's entry points, in namespace ropekern::cpu under the name chosen by the unit.
extern const Kernels RK_KERNELS_SYMBOL;
const Kernels RK_KERNELS_SYMBOL = {
    RK_ISA_NAME,
    RK_ISA::kMR,
    &RK_ISA::cos_sin_rows,
    &RK_ISA::tiled_scratch_floats,
    &RK_ISA::tiled_item,
    &RK_ISA::decode_scratch_floats,
    &RK_ISA::decode_item,
    &RK_ISA::decode_merge,
    &RK_ISA::rope_scratch_floats,
    &RK_ISA::rope_rows,
    &RK_ISA::bwd_prep_rows,
    &RK_ISA::bwd_scratch_floats,
    &RK_ISA::bwd_item,
    &RK_ISA::bwd_dq_rows,
};

}  // namespace cpu
}  // namespace ropekern
