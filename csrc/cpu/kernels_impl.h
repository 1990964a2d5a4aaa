// The CPU kernels, written once against vec.h and compiled once per instruction set
// (kernels_avx2.cpp, kernels_generic.cpp) into namespace ropekern::cpu::RK_ISA.
//
// Numerics (DESIGN §4): fp32 everywhere whatever the I/O dtype; angles by the accurate split of
// rope_math.h (angle_turns8 below is angle_turns op for op, eight pairs at a time); scores are
// kept in base 2 (Q is pre-multiplied by softmax_scale * log2(e), so exp is one exp2) and the LSE
// is converted back to natural log; masked scores are -inf and their probabilities are selected
// to 0; a row that never sees a key ends as zeros with LSE -inf. Offsets are int64.
#pragma once

#include "kernels.h"
#include "vec.h"

namespace ropekern {
namespace cpu {
namespace RK_ISA {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMR = 6;   // micro-kernel rows: 6 x 16 accumulators = 12 of the 16 ymm registers
constexpr int kNR = 16;  // micro-kernel columns (two vectors)

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
// Accurate angle in turns for one position and eight split frequencies: rope_math.h angle_turns,
// operation for operation (every step before the last is exact in fp32).
RK_INLINE V angle_turns8(float ph, float pl, V f1, V f2, V f3) {
  const V vph = vset1(ph), vpl = vset1(pl), k4096 = vset1(4096.0f);
  V a = vph * f1 * k4096;
  a = a - vfloor(a);
  V b = vph * f2 * k4096;
  b = b - vfloor(b);
  V c = vpl * f1;
  c = c - vfloor(c);
  V s = a + b;
  s = s - vfloor(s);
  s = s + c;
  s = s - vfloor(s);
  s = s + (vset1(ph * 4096.0f) * f3 + vpl * f2 + vpl * f3);
  return s - vfloor(s + vset1(0.5f));
}

// Expanded cos/sin of one position into cs = [C: rot_pad][S: rot_pad] (layout in kernels.h).
// `split` is one sequence's table float[3][half].
static void cos_sin_row(int32_t pos, const float* split, int half, float factor, bool interleaved, int rot_pad,
                           float* cs) {
  float* C = cs;
  float* S = cs + rot_pad;
  const float ph = static_cast<float>(pos >> 12), pl = static_cast<float>(pos & 4095);
  const V vf = vset1(factor);
  for (int i = 0; i < half; i += kLanes) {
    const int n = imin(kLanes, half - i);
    V f1, f2, f3;
    if (n == kLanes) {
      f1 = vload(split + i);
      f2 = vload(split + half + i);
      f3 = vload(split + 2 * half + i);
    } else {
      float t1[kLanes] = {0}, t2[kLanes] = {0}, t3[kLanes] = {0};
      for (int k = 0; k < n; ++k) {
        t1[k] = split[i + k];
        t2[k] = split[half + i + k];
        t3[k] = split[2 * half + i + k];
      }
      f1 = vload(t1);
      f2 = vload(t2);
      f3 = vload(t3);
    }
    V s, c;
    vsincos_turns(angle_turns8(ph, pl, f1, f2, f3), &s, &c);
    c = c * vf;
    s = s * vf;
    if (!interleaved) {
      if (n == kLanes) {
        vstore(C + i, c);
        vstore(S + i, s);
      } else {
        float tc[kLanes], ts[kLanes];
        vstore(tc, c);
        vstore(ts, s);
        for (int k = 0; k < n; ++k) {
          C[i + k] = tc[k];
          S[i + k] = ts[k];
        }
      }
    } else {
      V clo, chi, slo, shi;
      vzip(c, c, &clo, &chi);
      vzip(vneg(s), s, &slo, &shi);
      if (n == kLanes) {
        vstore(C + 2 * i, clo);
        vstore(C + 2 * i + kLanes, chi);
        vstore(S + 2 * i, slo);
        vstore(S + 2 * i + kLanes, shi);
      } else {
        float tc[2 * kLanes], ts[2 * kLanes];
        vstore(tc, clo);
        vstore(tc + kLanes, chi);
        vstore(ts, slo);
        vstore(ts + kLanes, shi);
        for (int k = 0; k < 2 * n; ++k) {
          C[2 * i + k] = tc[k];
          S[2 * i + k] = ts[k];
        }
      }
    }
  }
}

// Rotate the first R channels of an fp32 row in place with an expanded table row.
static void rotate_row(float* x, const float* cs, int R, int rot_pad, bool interleaved) {
  const float* C = cs;
  const float* S = cs + rot_pad;
  if (interleaved) {
    int c = 0;
    for (; c + kLanes <= R; c += kLanes) {
      const V xv = vload(x + c);
      vstore(x + c, vfma(xv, vload(C + c), vswap_pairs(xv) * vload(S + c)));
    }
    for (; c < R; c += 2) {
      const float a = x[c], b = x[c + 1];
      x[c] = a * C[c] + b * S[c];
      x[c + 1] = b * C[c + 1] + a * S[c + 1];
    }
  } else {
    const int h = R / 2;
    int i = 0;
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

RK_INLINE void scale_row(float* x, int n, float scale) {
  const V vs = vset1(scale);
  for (int d = 0; d < n; d += kLanes) vstore(x + d, vload(x + d) * vs);
}

RK_INLINE void zero_floats(float* x, int64_t n) { memset(x, 0, static_cast<size_t>(n) * sizeof(float)); }

// ---------------------------------------------------------------- micro-kernels
// S[MR x 16] = Q[MR x Dp] . Kt[Dp x 16] (Kt holds the rotated keys transposed, ldk per channel).
template <int MR>
RK_INLINE void qk_tile(const float* q, int ldq, const float* kt, int ldk, int Dp, float* s, int lds) {
  V acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vzero();
  for (int d = 0; d < Dp; ++d) {
    const V k0 = vload(kt + static_cast<int64_t>(d) * ldk), k1 = vload(kt + static_cast<int64_t>(d) * ldk + kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const V qb = vbcast(q + r * ldq + d);
      acc[r][0] = vfma(qb, k0, acc[r][0]);
      acc[r][1] = vfma(qb, k1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    vstore(s + r * lds, acc[r][0]);
    vstore(s + r * lds + kLanes, acc[r][1]);
  }
}

// O[MR x 16] = O * alpha[r] + P[MR x n] . V[n x 16].
template <int MR>
RK_INLINE void pv_tile(const float* p, int ldp, const float* v, int ldv, int n, float* o, int ldo,
                       const float* alpha) {
  V acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    const V a = vset1(alpha[r]);
    acc[r][0] = vload(o + r * ldo) * a;
    acc[r][1] = vload(o + r * ldo + kLanes) * a;
  }
  for (int j = 0; j < n; ++j) {
    const V v0 = vload(v + static_cast<int64_t>(j) * ldv), v1 = vload(v + static_cast<int64_t>(j) * ldv + kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const V pb = vbcast(p + r * ldp + j);
      acc[r][0] = vfma(pb, v0, acc[r][0]);
      acc[r][1] = vfma(pb, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    vstore(o + r * ldo, acc[r][0]);
    vstore(o + r * ldo + kLanes, acc[r][1]);
  }
}

// The block-level helpers below are ordinary functions (one copy per unit, shared by the three
// dtypes): their work per call dwarfs a call, and inlining them everywhere only bloats the build.

// S[M x ncols] = Q . Kt over row strips of 6 (ncols a multiple of 16).
static void qk_block(const float* q, int M, int Dp, const float* kt, int ldk, int ncols, float* s, int lds) {
  for (int r0 = 0; r0 < M; r0 += kMR) {
    const int mr = imin(kMR, M - r0);
    const float* qr = q + static_cast<int64_t>(r0) * Dp;
    float* sr = s + static_cast<int64_t>(r0) * lds;
    for (int n0 = 0; n0 < ncols; n0 += kNR) {
      switch (mr) {
        case 6: qk_tile<6>(qr, Dp, kt + n0, ldk, Dp, sr + n0, lds); break;
        case 5: qk_tile<5>(qr, Dp, kt + n0, ldk, Dp, sr + n0, lds); break;
        case 4: qk_tile<4>(qr, Dp, kt + n0, ldk, Dp, sr + n0, lds); break;
        case 3: qk_tile<3>(qr, Dp, kt + n0, ldk, Dp, sr + n0, lds); break;
        case 2: qk_tile<2>(qr, Dp, kt + n0, ldk, Dp, sr + n0, lds); break;
        default: qk_tile<1>(qr, Dp, kt + n0, ldk, Dp, sr + n0, lds); break;
      }
    }
  }
}

// O[M x Dp] = O * alpha + P[M x n] . V[n x Dp].
static void pv_block(const float* p, int ldp, int M, const float* v, int Dp, int n, float* o, const float* alpha) {
  for (int r0 = 0; r0 < M; r0 += kMR) {
    const int mr = imin(kMR, M - r0);
    const float* pr = p + static_cast<int64_t>(r0) * ldp;
    float* orow = o + static_cast<int64_t>(r0) * Dp;
    for (int c0 = 0; c0 < Dp; c0 += kNR) {
      switch (mr) {
        case 6: pv_tile<6>(pr, ldp, v + c0, Dp, n, orow + c0, Dp, alpha + r0); break;
        case 5: pv_tile<5>(pr, ldp, v + c0, Dp, n, orow + c0, Dp, alpha + r0); break;
        case 4: pv_tile<4>(pr, ldp, v + c0, Dp, n, orow + c0, Dp, alpha + r0); break;
        case 3: pv_tile<3>(pr, ldp, v + c0, Dp, n, orow + c0, Dp, alpha + r0); break;
        case 2: pv_tile<2>(pr, ldp, v + c0, Dp, n, orow + c0, Dp, alpha + r0); break;
        default: pv_tile<1>(pr, ldp, v + c0, Dp, n, orow + c0, Dp, alpha + r0); break;
      }
    }
  }
}

// One online-softmax step for one row over a block of `nb` keys of which the first `lim` are
// visible (lim <= 0: none). Scores s (base 2) become probabilities in place; returns the factor
// that rescales the row's accumulator. Invisible scores are set to -inf and their
// probabilities are selected to 0, so nothing from a masked key reaches the accumulator.
static float softmax_step(float* s, int nb, int lim, float* m, float* l) {
  const int w = round8(nb);
  if (lim <= 0) {
    zero_floats(s, w);
    return 1.0f;
  }
  for (int j = lim; j < w; ++j) s[j] = -kInf;
  V mx = vset1(-kInf);
  for (int j = 0; j < w; j += kLanes) mx = vmax(mx, vload(s + j));
  const float m_new = fmax_(*m, hmax(mx));
  if (m_new == -kInf) {  // every visible score is -inf (only with infinite inputs)
    zero_floats(s, w);
    return 1.0f;
  }
  const float alpha = (*m == -kInf) ? 0.0f : __builtin_exp2f(*m - m_new);
  const V vm = vset1(m_new);
  V sum = vzero();
  for (int j = 0; j < w; j += kLanes) {
    const V x = vload(s + j);
    const V pj = vzero_where_neginf(x, vexp2(x - vm));
    vstore(s + j, pj);
    sum = sum + pj;
  }
  *l = *l * alpha + hsum(sum);
  *m = m_new;
  return alpha;
}

RK_INLINE float finish_lse(float m, float l) { return l > 0.0f ? (m + __builtin_log2f(l)) * kLn2 : -kInf; }

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
  const int R = rope.rotary_dim, rp = rot_pad_of(R);
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
    cos_sin_row(pos, rope.freqs + b * rope.freqs_batch_stride, R / 2, rope.attention_factor, rope.interleaved, rp,
                job.out + r * 2 * rp);
  }
}

// ---------------------------------------------------------------- tiled forward
int64_t tiled_scratch_floats(const TiledPlan& plan) {
  const int G = plan.p.num_heads / plan.p.num_heads_k, Dp = head_dim_pad_of(plan.p.head_dim);
  const int64_t M = static_cast<int64_t>(plan.block_m) * G;
  return 2 * align16(M * Dp) + align16(M * kBlockN) + 2 * align16(static_cast<int64_t>(Dp) * kBlockN) +
         align16(8 * Dp) + 3 * align16(M);
}

template <class DT>
void tiled_item_t(const TiledPlan& plan, int64_t item, float* scratch) {
  using T = typename DT::T;
  const AttnParams& p = plan.p;
  const int Hkv = p.num_heads_k, G = p.num_heads / Hkv, D = p.head_dim, Dp = head_dim_pad_of(D);
  const int R = p.rope.rotary_dim, rp = rot_pad_of(R);
  const bool il = p.rope.interleaved;
  const int64_t cs_stride = 2 * rp;
  const int64_t bh_count = static_cast<int64_t>(p.batch) * Hkv;
  const int64_t rank = item / bh_count;
  const int64_t bh = item % bh_count;
  // Causal cost grows with the query block: hand out the longest items first.
  const int64_t qb = p.causal ? plan.num_q_blocks - 1 - rank : rank;
  const int b = static_cast<int>(bh / Hkv), hkv = static_cast<int>(bh % Hkv);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const bool paged = plan.block_table != nullptr;

  int64_t sq, sk, q_row0 = 0, k_row0 = 0;
  if (varlen) {
    q_row0 = p.cu_seqlens_q[b];
    sq = p.cu_seqlens_q[b + 1] - q_row0;
    k_row0 = p.cu_seqlens_k[b];
    sk = p.cu_seqlens_k[b + 1] - k_row0;
  } else {
    sq = p.seqlen_q;
    sk = plan.cache_lens ? plan.cache_lens[b] : p.seqlen_k;
  }
  const int64_t i0 = qb * plan.block_m;
  if (i0 >= sq) return;
  const int64_t i1 = lmin(sq, i0 + plan.block_m);
  const int nq = static_cast<int>(i1 - i0), M = nq * G;
  const int64_t off = sk - sq;  // causal: query i sees key j iff j <= i + off
  const int64_t j_end = p.causal ? lmin(sk, i1 + off) : sk;

  const T* q = static_cast<const T*>(p.q) + (varlen ? q_row0 * p.q_row_stride : b * p.q_batch_stride);
  T* out = static_cast<T*>(p.out) + (varlen ? q_row0 * p.o_row_stride : b * p.o_batch_stride);
  const T* kbase = static_cast<const T*>(p.k) + hkv * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + hkv * p.v_head_stride;
  const int64_t k_seq = varlen ? k_row0 * p.k_row_stride : b * p.k_batch_stride;
  const int64_t v_seq = varlen ? k_row0 * p.v_row_stride : b * p.v_batch_stride;
  const int32_t* btab = paged ? plan.block_table + b * plan.block_table_stride : nullptr;
  const float* q_cs = R ? plan.q_cs + (varlen ? q_row0 : b * static_cast<int64_t>(p.seqlen_q)) * cs_stride : nullptr;
  const float* k_cs = R ? plan.k_cs + (varlen ? k_row0 : b * plan.k_cs_rows) * cs_stride : nullptr;
  const float scale2 = p.softmax_scale * kLog2e;

  Bump bump{scratch};
  float* Qs = bump.take(static_cast<int64_t>(M) * Dp);
  float* O = bump.take(static_cast<int64_t>(M) * Dp);
  float* S = bump.take(static_cast<int64_t>(M) * kBlockN);
  float* Kt = bump.take(static_cast<int64_t>(Dp) * kBlockN);
  float* Vs = bump.take(static_cast<int64_t>(Dp) * kBlockN);
  float* K8 = bump.take(8 * Dp);
  float* m = bump.take(M);
  float* l = bump.take(M);
  float* alpha = bump.take(M);

  // Q tile: rows r = (i - i0) * G + g, rotated once, pre-scaled into base 2.
  for (int qi = 0; qi < nq; ++qi) {
    const int64_t i = i0 + qi;
    for (int g = 0; g < G; ++g) {
      const int r = qi * G + g;
      const int h = hkv * G + g;
      float* dst = Qs + static_cast<int64_t>(r) * Dp;
      load_row<DT>(q + i * p.q_row_stride + h * p.q_head_stride, D, Dp, dst);
      if (R) rotate_row(dst, q_cs + i * cs_stride, R, rp, il);
      scale_row(dst, Dp, scale2);
      m[r] = -kInf;
      l[r] = 0.0f;
    }
  }
  zero_floats(O, static_cast<int64_t>(M) * Dp);

  for (int64_t j0 = 0; j0 < j_end; j0 += kBlockN) {
    const int nb = static_cast<int>(lmin(kBlockN, j_end - j0));
    const int ncols = round16(nb);
    // K block: each key is converted and rotated once for all G * nq query rows, then stored
    // transposed (Kt[d][j]) for the outer-product micro-kernel; rows past nb are zeros.
    for (int jj = 0; jj < ncols; jj += 8) {
      for (int t = 0; t < 8; ++t) {
        float* row = K8 + t * Dp;
        const int64_t j = j0 + jj + t;
        if (jj + t < nb) {
          const int64_t k_off = paged ? static_cast<int64_t>(btab[j / plan.block_size]) * p.k_batch_stride +
                                            (j % plan.block_size) * p.k_row_stride
                                      : k_seq + j * p.k_row_stride;
          load_row<DT>(kbase + k_off, D, Dp, row);
          if (R) rotate_row(row, k_cs + j * cs_stride, R, rp, il);
        } else {
          zero_floats(row, Dp);
        }
      }
      for (int d = 0; d < Dp; d += 8) {
        V r8[8];
        for (int t = 0; t < 8; ++t) r8[t] = vload(K8 + t * Dp + d);
        transpose8(r8);
        for (int u = 0; u < 8; ++u) vstore(Kt + static_cast<int64_t>(d + u) * kBlockN + jj, r8[u]);
      }
    }
    for (int jj = 0; jj < nb; ++jj) {
      const int64_t j = j0 + jj;
      const int64_t v_off = paged ? static_cast<int64_t>(btab[j / plan.block_size]) * p.v_batch_stride +
                                        (j % plan.block_size) * p.v_row_stride
                                  : v_seq + j * p.v_row_stride;
      load_row<DT>(vbase + v_off, D, Dp, Vs + static_cast<int64_t>(jj) * Dp);
    }

    qk_block(Qs, M, Dp, Kt, kBlockN, ncols, S, kBlockN);
    for (int r = 0; r < M; ++r) {
      int lim = nb;
      if (p.causal) lim = static_cast<int>(lmin(nb, i0 + r / G + off - j0 + 1));
      alpha[r] = softmax_step(S + static_cast<int64_t>(r) * kBlockN, nb, lim, m + r, l + r);
    }
    pv_block(S, kBlockN, M, Vs, Dp, nb, O, alpha);
  }

  for (int qi = 0; qi < nq; ++qi) {
    const int64_t i = i0 + qi;
    for (int g = 0; g < G; ++g) {
      const int r = qi * G + g;
      const int h = hkv * G + g;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      store_row<DT>(out + i * p.o_row_stride + h * p.o_head_stride, O + static_cast<int64_t>(r) * Dp, inv, D);
      if (p.lse) {
        const int64_t base = varlen ? q_row0 : b * p.lse_batch_stride;
        p.lse[base + h * p.lse_head_stride + i] = finish_lse(m[r], l[r]);
      }
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
int64_t decode_scratch_floats(const DecodePlan& plan) {
  const DecodeParams& p = plan.p;
  const int Dp = head_dim_pad_of(p.head_dim), rp = rot_pad_of(p.rope.rotary_dim);
  const int64_t rows = static_cast<int64_t>(p.num_heads) * p.seqlen_q;
  const int64_t group_rows = rows / p.num_heads_k;
  return 2 * align16(rows * Dp) + 3 * align16(rows) + align16(static_cast<int64_t>(p.seqlen_q) * 2 * rp) +
         align16(kDecodeChunk * 2 * rp) + 2 * align16(kDecodeChunk * Dp) + align16(group_rows * kDecodeChunk);
}

template <class DT>
void decode_item_t(const DecodePlan& plan, int64_t item, float* scratch) {
  using T = typename DT::T;
  const DecodeParams& p = plan.p;
  const int Hq = p.num_heads, Hkv = p.num_heads_k, G = Hq / Hkv, Sq = p.seqlen_q, D = p.head_dim;
  const int Dp = head_dim_pad_of(D), R = p.rope.rotary_dim, rp = rot_pad_of(R);
  const bool il = p.rope.interleaved;
  const int64_t cs_stride = 2 * rp;
  const int b = static_cast<int>(item / plan.num_splits), split = static_cast<int>(item % plan.num_splits);
  const int64_t n = static_cast<int64_t>(p.cache_seqlens[b]) + p.s_new;
  const int64_t ks = split * plan.split_len, ke = lmin(n, ks + plan.split_len);
  const int rows = Hq * Sq, group_rows = G * Sq;
  float* part = plan.partial + (static_cast<int64_t>(b) * plan.num_splits + split) * rows * (Dp + 2);
  if (ks >= ke) {  // this split holds no key of sequence b
    for (int r = 0; r < rows; ++r) {
      part[static_cast<int64_t>(r) * (Dp + 2) + Dp] = -kInf;
      part[static_cast<int64_t>(r) * (Dp + 2) + Dp + 1] = 0.0f;
    }
    return;
  }
  const float* table = p.rope.freqs + b * p.rope.freqs_batch_stride;
  const bool paged = p.block_table != nullptr;
  const int32_t* btab = paged ? p.block_table + b * p.block_table_batch_stride : nullptr;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;

  Bump bump{scratch};
  float* Qs = bump.take(static_cast<int64_t>(rows) * Dp);
  float* O = bump.take(static_cast<int64_t>(rows) * Dp);
  float* m = bump.take(rows);
  float* l = bump.take(rows);
  float* alpha = bump.take(rows);
  float* qcs = bump.take(static_cast<int64_t>(Sq) * cs_stride);
  float* kcs = bump.take(kDecodeChunk * cs_stride);
  float* Ks = bump.take(kDecodeChunk * Dp);
  float* Vs = bump.take(kDecodeChunk * Dp);
  float* S = bump.take(static_cast<int64_t>(group_rows) * kDecodeChunk);

  // Queries: rows r = h * Sq + i at positions n - Sq + i.
  const float scale2 = p.softmax_scale * kLog2e;
  for (int i = 0; i < Sq; ++i)
    if (R) cos_sin_row(static_cast<int32_t>(n - Sq + i), table, R / 2, p.rope.attention_factor, il, rp,
                       qcs + i * cs_stride);
  for (int h = 0; h < Hq; ++h) {
    for (int i = 0; i < Sq; ++i) {
      const int r = h * Sq + i;
      float* dst = Qs + static_cast<int64_t>(r) * Dp;
      load_row<DT>(q + i * p.q_row_stride + h * p.q_head_stride, D, Dp, dst);
      if (R) rotate_row(dst, qcs + i * cs_stride, R, rp, il);
      scale_row(dst, Dp, scale2);
      m[r] = -kInf;
      l[r] = 0.0f;
    }
  }
  zero_floats(O, static_cast<int64_t>(rows) * Dp);

  for (int64_t c0 = ks; c0 < ke; c0 += kDecodeChunk) {
    const int nc = static_cast<int>(lmin(kDecodeChunk, ke - c0));
    const int w = round8(nc);
    // cos/sin of this chunk's positions, shared by every KV head.
    if (R)
      for (int jj = 0; jj < nc; ++jj)
        cos_sin_row(static_cast<int32_t>(c0 + jj), table, R / 2, p.rope.attention_factor, il, rp,
                    kcs + jj * cs_stride);
    for (int hkv = 0; hkv < Hkv; ++hkv) {
      for (int jj = 0; jj < w; ++jj) {
        float* krow = Ks + static_cast<int64_t>(jj) * Dp;
        if (jj >= nc) {
          zero_floats(krow, Dp);
          continue;
        }
        const int64_t j = c0 + jj;
        int64_t k_off, v_off;
        if (paged) {
          const int64_t blk = btab[j / p.block_size], t = j % p.block_size;
          k_off = blk * p.kc_batch_stride + t * p.kc_row_stride;
          v_off = blk * p.vc_batch_stride + t * p.vc_row_stride;
        } else {
          k_off = b * p.kc_batch_stride + j * p.kc_row_stride;
          v_off = b * p.vc_batch_stride + j * p.vc_row_stride;
        }
        load_row<DT>(kc + k_off + hkv * p.kc_head_stride, D, Dp, krow);
        if (R) rotate_row(krow, kcs + jj * cs_stride, R, rp, il);
        load_row<DT>(vc + v_off + hkv * p.vc_head_stride, D, Dp, Vs + static_cast<int64_t>(jj) * Dp);
      }
      const int hr0 = hkv * group_rows;
      for (int rr = 0; rr < group_rows; ++rr) {
        const float* qr = Qs + static_cast<int64_t>(hr0 + rr) * Dp;
        float* srow = S + static_cast<int64_t>(rr) * kDecodeChunk;
        for (int jj0 = 0; jj0 < w; jj0 += 8) {
          V acc[8];
          for (int t = 0; t < 8; ++t) acc[t] = vzero();
          const float* kb = Ks + static_cast<int64_t>(jj0) * Dp;
          for (int d = 0; d < Dp; d += kLanes) {
            const V qv = vload(qr + d);
#pragma GCC unroll 8
            for (int t = 0; t < 8; ++t) acc[t] = vfma(qv, vload(kb + t * Dp + d), acc[t]);
          }
          vstore(srow + jj0, hsum8(acc));
        }
        int lim = nc;
        if (p.causal) lim = static_cast<int>(lmin(nc, (n - Sq + rr % Sq) - c0 + 1));
        alpha[hr0 + rr] = softmax_step(srow, nc, lim, m + hr0 + rr, l + hr0 + rr);
      }
      pv_block(S, kDecodeChunk, group_rows, Vs, Dp, nc, O + static_cast<int64_t>(hr0) * Dp, alpha + hr0);
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
  return align16(2 * rot_pad_of(job.rope.rotary_dim)) + align16(rot_pad_of(job.rope.rotary_dim));
}

template <class DT>
void rope_rows_t(const RopeJob& job, int64_t begin, int64_t end, float* scratch) {
  using T = typename DT::T;
  const RopeParams& rope = job.rope;
  const int R = rope.rotary_dim, rp = rot_pad_of(R), D = job.head_dim;
  float* cs = scratch;
  float* row = scratch + align16(2 * rp);
  for (int64_t rix = begin; rix < end; ++rix) {
    const int64_t b = rix / job.seqlen, s = rix % job.seqlen;
    if (R)
      cos_sin_row(job.positions[rix], rope.freqs + b * rope.freqs_batch_stride, R / 2, rope.attention_factor,
                  rope.interleaved, rp, cs);
    const T* x = static_cast<const T*>(job.x) + b * job.x_batch_stride + s * job.x_row_stride;
    T* out = static_cast<T*>(job.out) + b * job.o_batch_stride + s * job.o_row_stride;
    for (int h = 0; h < job.num_heads; ++h) {
      const T* src = x + h * job.x_head_stride;
      T* dst = out + h * job.o_head_stride;
      if (R) {
        load_row<DT>(src, R, R, row);
        rotate_row(row, cs, R, rp, rope.interleaved);
        store_row<DT>(dst, row, 1.0f, R);
      }
      // Pass-through channels are copied bit for bit (not through fp32).
      if (D > R) memcpy(dst + R, src + R, static_cast<size_t>(D - R) * sizeof(T));
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

}  // namespace RK_ISA

// The unit's entry points, in namespace ropekern::cpu under the name chosen by the unit.
extern const Kernels RK_KERNELS_SYMBOL;
const Kernels RK_KERNELS_SYMBOL = {
    RK_ISA_NAME,
    &RK_ISA::cos_sin_rows,
    &RK_ISA::tiled_scratch_floats,
    &RK_ISA::tiled_item,
    &RK_ISA::decode_scratch_floats,
    &RK_ISA::decode_item,
    &RK_ISA::decode_merge,
    &RK_ISA::rope_scratch_floats,
    &RK_ISA::rope_rows,
};

}  // namespace cpu
}  // namespace ropekern
