// FlashAttention-2-style forward kernel with RoPE fused into the tile loads (sm80+, mma.sync).
//
// One CTA owns kBlockM query rows (16 per warp) and walks the key axis in tiles of kBlockN:
//   Q tile  --cp.async--> smem --rotate in place (fp32, accurate angles)--> ldmatrix per k-step
//   K tile  --cp.async--> smem --rotate in place--> ldmatrix --> S = Q K^T (mma, fp32 acc)
//   mask (sequence index, bottom-right causal), online softmax in fp32 (ropekern/online_softmax.h)
//   V tile  --cp.async--> smem --ldmatrix.trans--> O += P V (P re-used from the S registers)
// The V load of tile n overlaps S = Q K_n^T and the K load of tile n+1 overlaps O += P V_n.
//
// RoPE: each thread owns one pair slot (channel pair) for the whole kernel and keeps that slot's
// split frequency (f1..f4) in registers; a rotation pass over a tile computes, per row, the
// angle from the row's position with ropekern::rope_cos_sin (the error-free split of
// rope_math.h), rotates the pair in fp32 and stores it back in the I/O dtype. With a caller's
// cos/sin table (RopeParams::table_positions > 0) the slot reads the row's cos and sin from the
// table instead: one CTA-uniform branch per row, no angle arithmetic. Pass-through channels
// (>= rotary_dim) are never touched, so they reach the tensor cores bit-exact.
//
// The same kernel serves two problems (the Problem template): PrefillProblem (dense/varlen
// q, k, v with explicit positions) and CacheProblem (dense/paged KV cache, positions implied by
// the cache length, the GQA group of a KV head packed into the query rows so each K/V tile is
// read once per group, optional split-K over the key axis merged by combine_kernel).
#pragma once

#include "common.h"
#include "cuda_params.h"
#include "layout.h"
#include "primitives.h"
#include "ropekern/online_softmax.h"
#include "ropekern/params.h"
#include "ropekern/rope_math.h"
#include "traits.h"

namespace ropekern {
namespace cuda {

// Store two packed 16-bit values to a 4-byte aligned address.
template <typename Element>
RK_DEVICE void store_pair(Element* dst, uint32_t packed) {
#if defined(RK_EMULATE)
  std::memcpy(dst, &packed, 4);
#else
  *reinterpret_cast<uint32_t*>(dst) = packed;
#endif
}

// ------------------------------------------------------------------------------------ problems
// A problem maps the CTA's rows r in [0, rows) and keys j in [0, seqlen_k) to addresses and
// positions. Row r is query i = query(r); key j is visible to it iff j <= i + causal_offset
// (when causal), i.e. causal masks sequence indices, bottom-right aligned.

template <typename Element>
struct PrefillProblem {
  using Params = AttnParams;
  // blockIdx: x = query block, y = query head, z = sequence.
  const Element *q, *k, *v;
  Element* out;
  float* lse;
  int64_t q_row_stride, k_row_stride, v_row_stride, o_row_stride;
  const int32_t *q_pos, *k_pos;
  const float* freqs;  // this sequence's split, or the caller's table (sequence_freqs)
  int rows, seqlen_k, causal_offset;
  bool causal;
  float softmax_scale;
  static constexpr int split = 0, num_splits = 1;

  // The kernel's rotary params, read where they are (the parameter space) by the rotation pass.
  static RK_DEVICE const RopeParams& rope(const AttnParams& p) { return p.rope; }

  RK_DEVICE explicit PrefillProblem(const AttnParams& p) {
    const int b = static_cast<int>(blockIdx.z), h = static_cast<int>(blockIdx.y);
    const int hk = h / (p.num_heads / p.num_heads_k);
    int64_t q_off, k_off, v_off, o_off, lse_off;
    if (p.cu_seqlens_q != nullptr) {  // varlen: sequences are row ranges of packed [T, H, D] tensors
      const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
      rows = p.cu_seqlens_q[b + 1] - q0;
      seqlen_k = p.cu_seqlens_k[b + 1] - k0;
      q_off = q0 * p.q_row_stride;
      k_off = k0 * p.k_row_stride;
      v_off = k0 * p.v_row_stride;
      o_off = q0 * p.o_row_stride;
      lse_off = q0;
      q_pos = p.q_pos + q0;
      k_pos = p.k_pos + k0;
    } else {
      rows = p.seqlen_q;
      seqlen_k = p.seqlen_k;
      q_off = b * p.q_batch_stride;
      k_off = b * p.k_batch_stride;
      v_off = b * p.v_batch_stride;
      o_off = b * p.o_batch_stride;
      lse_off = b * p.lse_batch_stride;
      q_pos = p.q_pos + b * p.q_pos_batch_stride;
      k_pos = p.k_pos + b * p.k_pos_batch_stride;
    }
    q = static_cast<const Element*>(p.q) + q_off + h * p.q_head_stride;
    k = static_cast<const Element*>(p.k) + k_off + hk * p.k_head_stride;
    v = static_cast<const Element*>(p.v) + v_off + hk * p.v_head_stride;
    out = static_cast<Element*>(p.out) + o_off + h * p.o_head_stride;
    lse = p.lse == nullptr ? nullptr : p.lse + lse_off + h * p.lse_head_stride;
    q_row_stride = p.q_row_stride;
    k_row_stride = p.k_row_stride;
    v_row_stride = p.v_row_stride;
    o_row_stride = p.o_row_stride;
    freqs = sequence_freqs(p.rope, b);
    causal = p.causal;
    causal_offset = seqlen_k - rows;
    softmax_scale = p.softmax_scale;
  }

  RK_DEVICE int query(int r) const { return r; }
  RK_DEVICE const Element* q_row(int r) const { return q + r * q_row_stride; }
  RK_DEVICE const Element* k_row(int j) const { return k + j * k_row_stride; }
  RK_DEVICE const Element* v_row(int j) const { return v + j * v_row_stride; }
  RK_DEVICE int q_position(int r) const { return q_pos[r]; }
  RK_DEVICE int k_position(int j) const { return k_pos[j]; }
  RK_DEVICE Element* out_row(int r) const { return out + r * o_row_stride; }
  RK_DEVICE float* lse_at(int r) const { return lse == nullptr ? nullptr : lse + r; }
  RK_DEVICE float* accum_row(int) const { return nullptr; }
  RK_DEVICE float* accum_lse_at(int) const { return nullptr; }
};

template <typename Element>
struct CacheProblem {
  using Params = CacheParams;
  // blockIdx: x = row block of the packed (query, head-in-group) rows, y = split, z = b * Hkv + hk.
  // Row r = i * group + g is query i of head hk * group + g; its position is n - Sq + i.
  const Element* q;
  Element *k, *v, *out;
  float *lse, *accum, *accum_lse;
  const int32_t* block_table;
  int64_t q_row_stride, q_head_stride, k_row_stride, v_row_stride, k_block_stride, v_block_stride;
  int64_t o_row_stride, o_head_stride, lse_head_stride;
  const float* freqs;  // this sequence's split, or the caller's table (sequence_freqs)
  int rows, group, seqlen_q, seqlen_k, causal_offset, block_size, head_dim, split, num_splits;
  bool causal;
  float softmax_scale;

  // The kernel's rotary params, read where they are (the parameter space) by the rotation pass.
  static RK_DEVICE const RopeParams& rope(const CacheParams& cp) { return cp.p.rope; }

  RK_DEVICE explicit CacheProblem(const CacheParams& cp) {
    const DecodeParams& p = cp.p;
    const int bz = static_cast<int>(blockIdx.z);
    const int b = bz / p.num_heads_k, hk = bz % p.num_heads_k;
    group = p.num_heads / p.num_heads_k;
    const int head0 = hk * group;
    seqlen_q = p.seqlen_q;
    rows = seqlen_q * group;
    seqlen_k = p.cache_seqlens[b] + p.s_new;  // keys after the append
    causal = p.causal;
    causal_offset = seqlen_k - seqlen_q;
    q = static_cast<const Element*>(p.q) + b * p.q_batch_stride + head0 * p.q_head_stride;
    q_row_stride = p.q_row_stride;
    q_head_stride = p.q_head_stride;
    block_size = p.block_size;
    block_table = p.block_table == nullptr ? nullptr : p.block_table + b * p.block_table_batch_stride;
    const int64_t kv_seq = block_table == nullptr ? b : 0;  // a paged cache's batch axis is the block axis
    k = static_cast<Element*>(p.k_cache) + kv_seq * p.kc_batch_stride + hk * p.kc_head_stride;
    v = static_cast<Element*>(p.v_cache) + kv_seq * p.vc_batch_stride + hk * p.vc_head_stride;
    k_row_stride = p.kc_row_stride;
    v_row_stride = p.vc_row_stride;
    k_block_stride = p.kc_batch_stride;
    v_block_stride = p.vc_batch_stride;
    out = static_cast<Element*>(p.out) + b * p.o_batch_stride + head0 * p.o_head_stride;
    o_row_stride = p.o_row_stride;
    o_head_stride = p.o_head_stride;
    lse = p.lse == nullptr ? nullptr : p.lse + b * p.lse_batch_stride + head0 * p.lse_head_stride;
    lse_head_stride = p.lse_head_stride;
    split = static_cast<int>(blockIdx.y);
    num_splits = p.num_splits;
    head_dim = p.head_dim;
    // Split workspace [num_splits, B, Hq, Sq, (D)]: this CTA's first element is (split, b, head0, 0).
    const int64_t ws_row = ((static_cast<int64_t>(split) * p.batch + b) * p.num_heads + head0) * seqlen_q;
    accum = cp.out_accum == nullptr ? nullptr : cp.out_accum + ws_row * p.head_dim;
    accum_lse = cp.lse_accum == nullptr ? nullptr : cp.lse_accum + ws_row;
    freqs = sequence_freqs(p.rope, b);
    softmax_scale = p.softmax_scale;
  }

  RK_DEVICE int query(int r) const { return r / group; }
  RK_DEVICE const Element* q_row(int r) const { return q + (r / group) * q_row_stride + (r % group) * q_head_stride; }
  RK_DEVICE const Element* k_row(int j) const {
    if (block_table == nullptr) return k + j * k_row_stride;
    return k + static_cast<int64_t>(block_table[j / block_size]) * k_block_stride + (j % block_size) * k_row_stride;
  }
  RK_DEVICE const Element* v_row(int j) const {
    if (block_table == nullptr) return v + j * v_row_stride;
    return v + static_cast<int64_t>(block_table[j / block_size]) * v_block_stride + (j % block_size) * v_row_stride;
  }
  RK_DEVICE int q_position(int r) const { return causal_offset + r / group; }
  RK_DEVICE int k_position(int j) const { return j; }
  RK_DEVICE Element* out_row(int r) const { return out + (r / group) * o_row_stride + (r % group) * o_head_stride; }
  RK_DEVICE float* lse_at(int r) const {
    return lse == nullptr ? nullptr : lse + (r % group) * lse_head_stride + r / group;
  }
  // Workspace rows are [head-in-group][query] inside the CTA's (split, b, head0) slab.
  RK_DEVICE float* accum_row(int r) const {
    return accum + ((r % group) * static_cast<int64_t>(seqlen_q) + r / group) * head_dim;
  }
  RK_DEVICE float* accum_lse_at(int r) const { return accum_lse + (r % group) * seqlen_q + r / group; }
};

// ------------------------------------------------------------------------------------ RoPE pass
// The rotary pair slot a thread owns: slot = tid % (D / 2), rows tid / (D / 2) + k * (NT / (D / 2)).
// A law's split frequency is kept in registers. A caller's table is read per row at the slot's
// column of the row's cos and sin halves (consecutive slots, so a warp's loads coalesce); its
// pointer, size and the mode come from the kernel's RopeParams, which stay in the parameter space,
// and the column from c1: table mode costs the law's kernels no register across the main loop.
struct RopeSlot {
  bool active = false;
  int c1 = 0, c2 = 0;              // channels of the pair
  float freq[kSplitRows] = {};  // split frequency (turns per position): f1, f2, f3, f4
  float factor = 1.0f;
};

// `freqs` is the sequence's (sequence_freqs): its split, or the caller's table.
template <int kD>
RK_DEVICE RopeSlot make_rope_slot(int tid, const RopeParams& rope, const float* freqs) {
  RopeSlot s;
  const int slot = tid % (kD / 2), half = rope.rotary_dim / 2;
  if (rope.rotary_dim > 0 && slot < half) {
    s.active = true;
    s.c1 = pair_first(slot, rope.interleaved);
    s.c2 = pair_second(slot, rope.rotary_dim, rope.interleaved);
    if (rope.table_positions > 0) return s;  // rotate_tile reads the caller's table
    for (int r = 0; r < kSplitRows; ++r) s.freq[r] = freqs[r * half + slot];
    s.factor = rope.attention_factor;
  }
  return s;
}

// Rotate rows [0, valid_rows) of a swizzled [rows][kD] smem tile in place; position(r) gives
// row r's position. Rows past valid_rows hold zero padding and are left alone. `rope` is the
// kernel's (Problem::rope(params)).
template <int kD, int kNThreads, typename Element, typename PositionFn>
RK_DEVICE void rotate_tile(Element* tile, int valid_rows, const RopeSlot& slot, const RopeParams& rope,
                           PositionFn position) {
  constexpr int kSlots = kD / 2, kRowStep = kNThreads / kSlots;
  if (!slot.active) return;
  for (int r = static_cast<int>(threadIdx.x) / kSlots; r < valid_rows; r += kRowStep) {
    float c, s;
    if (rope.table_positions > 0) {
      const int pair = rope.interleaved ? slot.c1 / 2 : slot.c1;  // pair_first inverted
      table_cos_sin(rope.freqs, rope.rotary_dim, rope.table_positions, position(r), pair, &c, &s);
    } else {
      rope_cos_sin(position(r), slot.freq, 1, 0, slot.factor, &c, &s);
    }
    const int i1 = smem_index<kD>(r, slot.c1), i2 = smem_index<kD>(r, slot.c2);
    float x1 = Convert<Element>::to_float(tile[i1]);
    float x2 = Convert<Element>::to_float(tile[i2]);
    rotate_pair(&x1, &x2, c, s);
    tile[i1] = Convert<Element>::from_float(x1);
    tile[i2] = Convert<Element>::from_float(x2);
  }
}

// ------------------------------------------------------------------------------------ non-finite V
// Whether the [kBN][kD] V tile holds a NaN or an infinity (x * 0 is NaN exactly for those); the
// lanes share the scan and the answer (butterfly over the warp).
template <int kD, int kBN, typename Element>
RK_DEVICE bool warp_any_nonfinite(const Element* tile, int lane) {
  float bad = 0.0f;
  for (int c = lane; c < kBN * kD; c += 32) bad += Convert<Element>::to_float(tile[smem_index<kD>(c / kD, c % kD)]) * 0.0f;
  float flag = bad == bad ? 0.0f : 1.0f;
  for (int mask = 1; mask < 32; mask <<= 1) flag = fmaxf(flag, shfl_xor(flag, mask));
  return flag > 0.0f;
}

// Add to this lane's O accumulators (rows lane / 4 and lane / 4 + 8 of the warp's tile) what the
// non-finite V values of the keys j0 .. key_limit[row] contribute: p > 0 times a NaN or an
// infinity is that value, so a NaN (or infinities of both signs) gives NaN, else the infinity.
template <int kD, int kBN, typename Element>
RK_DEVICE void add_visible_nonfinite(float (&acc_o)[kD / 8][4], const Element* tile, int j0, const int (&key_limit)[2],
                                     int lane) {
  for (int t = 0; t < kD / 8; ++t) {
    for (int i = 0; i < 4; ++i) {
      const int col = t * 8 + 2 * (lane & 3) + (i & 1);
      bool nan = false, pos_inf = false, neg_inf = false;
      for (int jj = 0; jj < kBN && j0 + jj <= key_limit[i >> 1]; ++jj) {
        const float x = Convert<Element>::to_float(tile[smem_index<kD>(jj, col)]);
        nan = nan || x != x;
        pos_inf = pos_inf || x == INFINITY;
        neg_inf = neg_inf || x == -INFINITY;
      }
      if (nan || (pos_inf && neg_inf))
        acc_o[t][i] = NAN;
      else if (pos_inf || neg_inf)
        acc_o[t][i] += pos_inf ? INFINITY : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------------ kernel
template <typename Traits, typename Problem, bool kSplit>
RK_GLOBAL void RK_LAUNCH_BOUNDS(Traits::kNThreads) attention_kernel(const typename Problem::Params params) {
  using Element = typename Traits::Element;
  using Cvt = Convert<Element>;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN, kNT = Traits::kNThreads;
  constexpr int kChunks = Traits::kChunksPerRow;
  constexpr int kTilesS = kBN / 8, kTilesO = kD / 8;  // n8 accumulator tiles of S and O per warp

#if defined(RK_EMULATE)
  unsigned char* smem = rk_emu::shared_memory();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  Element* sQ = reinterpret_cast<Element*>(smem);
  Element* sK = sQ + kBM * kD;
  Element* sV = sK + kBN * kD;

  const Problem prob(params);
  const int row0 = static_cast<int>(blockIdx.x) * kBM;
  if (row0 >= prob.rows) return;  // varlen / short sequences: whole CTA leaves together
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;

  // Keys this CTA can see: all of them, or (causal) up to its last query's diagonal; may be none.
  const int last_query = prob.query(imin(row0 + kBM, prob.rows) - 1);
  int key_end = prob.seqlen_k;
  if (prob.causal) key_end = imin(key_end, last_query + prob.causal_offset + 1);
  const int n_blocks = key_end > 0 ? ceil_div(key_end, kBN) : 0;
  int nb_begin = 0, nb_end = n_blocks;
  if constexpr (kSplit) {
    const int per_split = ceil_div(n_blocks, prob.num_splits);
    nb_begin = imin(n_blocks, prob.split * per_split);
    nb_end = imin(n_blocks, nb_begin + per_split);
  }

  // Last visible key of this thread's two rows (lane / 4 and lane / 4 + 8 of the warp's tile),
  // and the CTA's smallest such limit: tiles entirely below it need no mask.
  int key_limit[2];
  for (int rr = 0; rr < 2; ++rr) {
    const int r = imin(row0 + warp * 16 + lane / 4 + 8 * rr, prob.rows - 1);
    key_limit[rr] = prob.causal ? imin(prob.seqlen_k - 1, prob.query(r) + prob.causal_offset) : prob.seqlen_k - 1;
  }
  const int block_limit =
      prob.causal ? imin(prob.seqlen_k - 1, prob.query(row0) + prob.causal_offset) : prob.seqlen_k - 1;

  SoftmaxRow row_state[2];
  float acc_o[kTilesO][4];
  for (int t = 0; t < kTilesO; ++t) {
    for (int i = 0; i < 4; ++i) acc_o[t][i] = 0.0f;
  }

  if (nb_begin < nb_end) {
    // Rows past the end of the sequence are zero-filled by cp.async (src-size 0): no NaN from
    // unused cache slots can reach the tensor cores.
    for (int c = tid; c < kBM * kChunks; c += kNT) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool ok = row0 + r < prob.rows;
      cp_async_16(&sQ[smem_index<kD>(r, col)], (ok ? prob.q_row(row0 + r) : prob.q_row(row0)) + col, ok);
    }
    cp_async_commit();
    auto load_kv = [&](Element* tile, bool is_v, int nb) {
      const int j0 = nb * kBN;
      for (int c = tid; c < kBN * kChunks; c += kNT) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const int j = j0 + r;
        const bool ok = j < prob.seqlen_k;
        const int jj = ok ? j : j0;
        cp_async_16(&tile[smem_index<kD>(r, col)], (is_v ? prob.v_row(jj) : prob.k_row(jj)) + col, ok);
      }
      cp_async_commit();
    };
    load_kv(sK, false, nb_begin);

    const RopeParams& rope = Problem::rope(params);
    const RopeSlot slot = make_rope_slot<kD>(tid, rope, prob.freqs);
    cp_async_wait<1>();  // Q landed (K may still be in flight)
    syncthreads();
    rotate_tile<kD, kNT>(sQ, imin(kBM, prob.rows - row0), slot, rope, [&](int r) { return prob.q_position(row0 + r); });

    for (int nb = nb_begin; nb < nb_end; ++nb) {
      const int j0 = nb * kBN;
      cp_async_wait<0>();  // K_nb landed
      syncthreads();       // ... for every thread; and every warp is done with V_{nb-1} and Q's rotation
      load_kv(sV, true, nb);
      if (rope.rotary_dim > 0) {  // CTA-uniform, so the barrier below is reached by every thread
        rotate_tile<kD, kNT>(sK, imin(kBN, prob.seqlen_k - j0), slot, rope,
                             [&](int r) { return prob.k_position(j0 + r); });
        syncthreads();
      }

      // S = Q K^T for the warp's 16 rows x kBN keys.
      float acc_s[kTilesS][4];
      for (int t = 0; t < kTilesS; ++t) {
        for (int i = 0; i < 4; ++i) acc_s[t][i] = 0.0f;
      }
      for (int kd = 0; kd < kD / 16; ++kd) {
        uint32_t a[4];
        ldmatrix_x4(a, &sQ[smem_index<kD>(warp * 16 + a_ldm_row(lane), kd * 16 + a_ldm_col(lane))]);
        for (int nn = 0; nn < kBN / 16; ++nn) {
          uint32_t b[4];
          ldmatrix_x4(b, &sK[smem_index<kD>(nn * 16 + bk_ldm_row(lane), kd * 16 + bk_ldm_col(lane))]);
          mma_16816<Element>(acc_s[2 * nn], a, b[0], b[1]);
          mma_16816<Element>(acc_s[2 * nn + 1], a, b[2], b[3]);
        }
      }

      // Scale, then mask by selection (after scaling, so a zero or negative scale cannot turn a
      // masked -inf into NaN); only tiles that reach past the CTA's smallest limit are checked.
      const bool need_mask = j0 + kBN - 1 > block_limit;
      for (int t = 0; t < kTilesS; ++t) {
        for (int i = 0; i < 4; ++i) {
          const float s = acc_s[t][i] * prob.softmax_scale;
          const int j = j0 + t * 8 + acc_col(lane, i);
          acc_s[t][i] = (need_mask && j > key_limit[i >> 1]) ? -INFINITY : s;
        }
      }

      // Online softmax per row; a row's max is reduced over the quad of lanes that share it.
      for (int rr = 0; rr < 2; ++rr) {
        float mx = -INFINITY;
        for (int t = 0; t < kTilesS; ++t) mx = fmaxf(mx, fmaxf(acc_s[t][2 * rr], acc_s[t][2 * rr + 1]));
        const float alpha = row_state[rr].update_max(quad_max(mx));
        for (int t = 0; t < kTilesO; ++t) {
          acc_o[t][2 * rr] *= alpha;
          acc_o[t][2 * rr + 1] *= alpha;
        }
        float sum = 0.0f;
        for (int t = 0; t < kTilesS; ++t) {
          for (int e = 0; e < 2; ++e) {
            const float p = row_state[rr].prob(acc_s[t][2 * rr + e]);
            acc_s[t][2 * rr + e] = p;
            sum += p;
          }
        }
        row_state[rr].l += sum;  // this lane's partial; the quad is summed once at the end
      }

      cp_async_wait<0>();  // V_nb landed
      syncthreads();       // ... for every thread; and every warp is done reading K_nb
      if (nb + 1 < nb_end) load_kv(sK, false, nb + 1);

      // A key a row cannot see has probability 0, which the tensor cores still multiply by the
      // key's V row: a NaN or an infinity there would reach the row (0 * NaN = NaN). In a masked
      // tile whose V holds one (rare), the warp zeroes such elements in its B fragments and then
      // adds to each O element the non-finite values of the keys that row does see.
      const bool nonfinite_v = need_mask && warp_any_nonfinite<kD, kBN>(sV, lane);

      // O += P V: the S accumulators of n8 tiles 2kk and 2kk+1 are exactly the A fragment of
      // the k16 step kk (rows g / g+8, columns 2t, 2t+1 and 8+2t, 8+2t+1).
      for (int kk = 0; kk < kBN / 16; ++kk) {
        const uint32_t a[4] = {Cvt::pack2(acc_s[2 * kk][0], acc_s[2 * kk][1]),
                               Cvt::pack2(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                               Cvt::pack2(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                               Cvt::pack2(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
        for (int dd = 0; dd < kD / 16; ++dd) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, &sV[smem_index<kD>(kk * 16 + bv_ldm_row(lane), dd * 16 + bv_ldm_col(lane))]);
          if (nonfinite_v) {
            for (uint32_t& w : b) w = zero_nonfinite2<Element>(w);
          }
          mma_16816<Element>(acc_o[2 * dd], a, b[0], b[1]);
          mma_16816<Element>(acc_o[2 * dd + 1], a, b[2], b[3]);
        }
      }
      if (nonfinite_v) add_visible_nonfinite<kD, kBN>(acc_o, sV, j0, key_limit, lane);
    }
  }

  // Epilogue: normalise and store straight from registers. A row that saw no key (l == 0)
  // stores zeros and LSE -inf (SoftmaxRow::inv_sum / lse select, never divide by zero).
  for (int rr = 0; rr < 2; ++rr) {
    row_state[rr].l = quad_sum(row_state[rr].l);
    const float inv = row_state[rr].inv_sum();
    const float lse = row_state[rr].lse();
    const int r = row0 + warp * 16 + lane / 4 + 8 * rr;
    if (r >= prob.rows) continue;
    const int col0 = 2 * (lane & 3);
    if constexpr (kSplit) {
      float* o = prob.accum_row(r);
      for (int t = 0; t < kTilesO; ++t) {
        o[t * 8 + col0] = acc_o[t][2 * rr] * inv;
        o[t * 8 + col0 + 1] = acc_o[t][2 * rr + 1] * inv;
      }
      if ((lane & 3) == 0) *prob.accum_lse_at(r) = lse;
    } else {
      Element* o = prob.out_row(r);
      for (int t = 0; t < kTilesO; ++t) {
        store_pair(o + t * 8 + col0, Cvt::pack2(acc_o[t][2 * rr] * inv, acc_o[t][2 * rr + 1] * inv));
      }
      float* l = prob.lse_at(r);
      if ((lane & 3) == 0 && l != nullptr) *l = lse;
    }
  }
}

// ------------------------------------------------------------------------------------ split-K merge
// One warp per output row (b, h, i): folds the splits' (O_s, LSE_s) pairwise with
// ropekern::merge_weights, which gives empty splits (LSE -inf) weight 0 by selection.
template <typename Element, int kHeadDim>
RK_GLOBAL void RK_LAUNCH_BOUNDS(128) combine_kernel(const CacheParams params) {
  const DecodeParams& p = params.p;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.num_heads * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (row >= rows_total) return;  // warp-uniform; this kernel has no CTA barrier
  const int i = static_cast<int>(row % p.seqlen_q);
  const int h = static_cast<int>((row / p.seqlen_q) % p.num_heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.seqlen_q) * p.num_heads));
  constexpr int kPerLane = kHeadDim / 32;
  float acc[kPerLane];
  for (int c = 0; c < kPerLane; ++c) acc[c] = 0.0f;
  float lse = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t idx = s * rows_total + row;
    float w_acc, w_part, lse_new;
    merge_weights(lse, params.lse_accum[idx], &w_acc, &w_part, &lse_new);
    const float* part = params.out_accum + idx * kHeadDim;
    for (int c = 0; c < kPerLane; ++c) acc[c] = w_acc * acc[c] + w_part * part[lane + 32 * c];
    lse = lse_new;
  }
  Element* o = static_cast<Element*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  for (int c = 0; c < kPerLane; ++c) o[lane + 32 * c] = Convert<Element>::from_float(acc[c]);
  if (lane == 0 && p.lse != nullptr) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
}

// ------------------------------------------------------------------------------------ in-place append
// k_new / v_new [B, s_new, Hkv, D] are copied, un-rotated, to cache slots cache_seqlens[b] + s
// (through block_table for a paged cache). Runs before the attention kernel on the same stream.
template <typename Element>
RK_GLOBAL void append_kernel(const CacheParams params) {
  const DecodeParams& p = params.p;
  const int64_t total = static_cast<int64_t>(p.batch) * p.s_new * p.num_heads_k * p.head_dim;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int d = static_cast<int>(e % p.head_dim);
    int64_t rest = e / p.head_dim;
    const int hk = static_cast<int>(rest % p.num_heads_k);
    rest /= p.num_heads_k;
    const int s = static_cast<int>(rest % p.s_new);
    const int b = static_cast<int>(rest / p.s_new);
    const int t = p.cache_seqlens[b] + s;
    int64_t kc, vc;
    if (p.block_table != nullptr) {
      const int64_t blk = p.block_table[b * p.block_table_batch_stride + t / p.block_size];
      kc = blk * p.kc_batch_stride + (t % p.block_size) * p.kc_row_stride;
      vc = blk * p.vc_batch_stride + (t % p.block_size) * p.vc_row_stride;
    } else {
      kc = b * p.kc_batch_stride + t * p.kc_row_stride;
      vc = b * p.vc_batch_stride + t * p.vc_row_stride;
    }
    const Element* kn = static_cast<const Element*>(p.k_new);
    const Element* vn = static_cast<const Element*>(p.v_new);
    static_cast<Element*>(p.k_cache)[kc + hk * p.kc_head_stride + d] =
        kn[b * p.kn_batch_stride + s * p.kn_row_stride + hk * p.kn_head_stride + d];
    static_cast<Element*>(p.v_cache)[vc + hk * p.vc_head_stride + d] =
        vn[b * p.vn_batch_stride + s * p.vn_row_stride + hk * p.vn_head_stride + d];
  }
}

}  // namespace cuda
}  // namespace ropekern
