// The backward of the tiled forward (kernels.h: BwdPlan), written against vec.h and the forward's
// blocks (kernels_impl.h includes this inside namespace ropekern::cpu::RK_ISA, once per unit).
//
// Numerics: fp32 arithmetic (the AMX unit: bf16 operands for bf16 inputs, bwd_amx). P =
// exp2(S * scale * log2 e - lse * log2 e) from the saved LSE, with masked entries selected to 0
// (never multiplied); dS = P o (dP - delta). Scores are S^T tiles (keys x query rows) as in the
// forward, so every product is one of the forward's micro-kernels: S^T and dP^T by outer_block
// (K' or V rows against the transposed Q' or dO tile), the three gradient sums by pv_block (or
// amx_gemm). softmax_scale multiplies each finished dQ'/dK' row once, and the
// inverse rotation (the forward's with sin negated, attention factor included) is applied once per
// output row.

// delta and lse2 of rows [begin, end) of the lse layout ([B, Hq, Sq] dense, [Hq, T] varlen).
// rowsum(dO * O) sums its channels exactly as outer_block sums a dP entry (FMA chains of
// kDotChunk channels in order, the chunk sums added in order): a row that sees one key has
// O = V in every dtype, so dP - delta is exactly 0 there and so are its dq and dk, as in eager
// autograd (any other summation order left ~3e-7 where the rule's bound is 0).
template <class DT>
void bwd_prep_rows_t(const BwdPlan& plan, int64_t begin, int64_t end) {
  using T = typename DT::T;
  const AttnParams& p = plan.p;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int Hq = p.num_heads, D = p.head_dim;
  const int64_t rows_per_head = varlen ? p.lse_head_stride : p.seqlen_q;
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(plan.dout);
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t i = idx % rows_per_head, bh = idx / rows_per_head;
    const int64_t b = varlen ? 0 : bh / Hq, h = varlen ? bh : bh % Hq;
    const T* o = out + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    const T* g = dout + b * plan.do_batch_stride + i * plan.do_row_stride + h * plan.do_head_stride;
    float total = 0.0f;
    for (int d0 = 0; d0 < D; d0 += kDotChunk) {
      float acc = 0.0f;
      for (int d = d0; d < imin(D, d0 + kDotChunk); ++d)
        acc = __builtin_fmaf(DT::to_float(o[d]), DT::to_float(g[d]), acc);
      total = d0 == 0 ? acc : total + acc;
    }
    const float lse = p.lse[idx];
    plan.delta[idx] = plan.dlse ? total - plan.dlse[idx] : total;
    plan.lse2[idx] = lse == -kInf ? kInf : static_cast<float>(static_cast<double>(lse) * 1.4426950408889634074);
  }
}

void bwd_prep_rows(const BwdPlan& plan, int64_t begin, int64_t end) {
  switch (plan.dtype) {
    case DType::kFloat32: bwd_prep_rows_t<F32>(plan, begin, end); break;
    case DType::kBFloat16: bwd_prep_rows_t<BF16>(plan, begin, end); break;
    case DType::kFloat16: bwd_prep_rows_t<F16>(plan, begin, end); break;
  }
}

// P and dS of one S^T / dP^T tile pair ([nb keys][Mp query rows], ld Mp), in place: row r sees the
// block's keys [lo[r], lim[r]); l2 and dl are its base-2 LSE and delta.
static void bwd_probs(float* st, float* dpt, int Mp, int nb, const float* lim, const float* lo, float scale2,
                      const float* l2, const float* dl) {
  const W zero = wzero(), sc = wset1(scale2);
  for (int c = 0; c < Mp; c += kWide) {
    const W lv = wload(lim + c), fv = wload(lo + c), lse2 = wload(l2 + c), delta = wload(dl + c);
    for (int n = 0; n < nb; ++n) {
      const W nv = wset1(static_cast<float>(n));
      float* s = st + static_cast<int64_t>(n) * Mp + c;
      float* dp = dpt + static_cast<int64_t>(n) * Mp + c;
      const W pr = vselect_lt(nv, fv, zero, vselect_lt(nv, lv, vexp2(wload(s) * sc - lse2), zero));
      wstore(s, pr);
      // Selected, not multiplied: dP of a hidden key is dO . V of a key the row cannot see.
      wstore(dp, vselect_lt(nv, fv, zero, vselect_lt(nv, lv, pr * (wload(dp) - delta), zero)));
    }
  }
}

// One (sequence, KV head) of a backward item: its rows, lengths and tables.
template <class T>
struct BwdSeq {
  int64_t sq, sk, q_row0 = 0, k_row0 = 0, stat0;  // stat0: the sequence's first row in the lse layout
  const T *q, *dout;
  KVRows<T> kv;
  const float *q_cs, *k_cs;
  BwdSeq(const BwdPlan& plan, int b, int hkv) {
    const AttnParams& p = plan.p;
    const bool varlen = p.cu_seqlens_q != nullptr;
    const SeqRows rows = seq_rows(p, b, p.seqlen_k);
    q_row0 = rows.q0;
    sq = rows.sq;
    k_row0 = rows.k0;
    sk = rows.sk;
    stat0 = varlen ? q_row0 : b * p.lse_batch_stride;
    q = static_cast<const T*>(p.q) + (varlen ? q_row0 * p.q_row_stride : b * p.q_batch_stride);
    dout = static_cast<const T*>(plan.dout) + (varlen ? q_row0 * plan.do_row_stride : b * plan.do_batch_stride);
    kv = kv_rows<T>(p, b, hkv, k_row0);
    const int64_t cs_stride = 2 * cs_pad_of(p.rope.rotary_dim);
    const bool rot = p.rope.rotary_dim > 0;
    q_cs = rot ? plan.q_cs + (varlen ? q_row0 : b * static_cast<int64_t>(p.seqlen_q)) * cs_stride : nullptr;
    k_cs = rot ? plan.k_cs + (varlen ? k_row0 : b * static_cast<int64_t>(p.seqlen_k)) * cs_stride : nullptr;
  }
};

// The query tile of rows r = (i - i0) * G + g (i in [i0, i1), g < G), as the forward's: rotated Q'
// and dO transposed ([Dp][Mp], the B operand of outer_block; skipped when Qt is null), optionally
// also as rows ([Mp][Dp], the V operand of pv_block); their base-2 LSE and delta. Rows past M are
// zeros, LSE +inf.
template <class DT>
static void bwd_query_tile(const BwdPlan& plan, const BwdSeq<typename DT::T>& s, int hkv, int64_t i0, int M, int Mp,
                           float* Qt, float* dOt, float* Qr, float* dOr, float* l2, float* dl, float* tmp8) {
  const AttnParams& p = plan.p;
  const int G = p.num_heads / p.num_heads_k, D = p.head_dim, Dp = head_dim_pad_of(D), R = p.rope.rotary_dim;
  const int cp = cs_pad_of(R);
  const int64_t cs_stride = 2 * cp;
  for (int pass = 0; pass < 2; ++pass) {  // Q', then dO
    float* T8 = pass ? dOt : Qt;
    float* rows = pass ? dOr : Qr;
    for (int r0 = 0; r0 < Mp; r0 += 8) {
      for (int t = 0; t < 8; ++t) {
        const int r = r0 + t;
        float* row = rows ? rows + static_cast<int64_t>(r) * Dp : tmp8 + t * Dp;
        if (r >= M) {
          zero_floats(row, Dp);
          continue;
        }
        const int64_t i = i0 + r / G;
        const int h = hkv * G + r % G;
        if (pass)
          load_row<DT>(s.dout + i * plan.do_row_stride + h * plan.do_head_stride, D, Dp, row);
        else
          load_rotate_row<DT>(s.q + i * p.q_row_stride + h * p.q_head_stride, R ? s.q_cs + i * cs_stride : nullptr, R,
                              cp, p.rope.interleaved, D, Dp, row);
      }
      if (T8) transpose_rows8(rows ? rows + static_cast<int64_t>(r0) * Dp : tmp8, Dp, T8, Mp, r0);
    }
  }
  for (int r = 0; r < Mp; ++r) {
    const int64_t idx = r < M ? s.stat0 + (hkv * G + r % G) * p.lse_head_stride + i0 + r / G : -1;
    l2[r] = idx >= 0 ? plan.lse2[idx] : kInf;
    dl[r] = idx >= 0 ? plan.delta[idx] : 0.0f;
  }
}

// Keys [j0, j0 + nb): rotated K' rows and V rows (fp32, Dp apart).
template <class DT>
static void bwd_key_block(const AttnParams& p, const BwdSeq<typename DT::T>& s, int64_t j0, int nb, float* Ks,
                          float* Vs) {
  const int D = p.head_dim, Dp = head_dim_pad_of(D), R = p.rope.rotary_dim, cp = cs_pad_of(R);
  for (int jj = 0; jj < nb; ++jj) {
    const int64_t j = j0 + jj;
    load_rotate_row<DT>(s.kv.krow(j), R ? s.k_cs + j * 2 * cp : nullptr, R, cp, p.rope.interleaved, D, Dp,
                        Ks + static_cast<int64_t>(jj) * Dp);
    load_row<DT>(s.kv.vrow(j), D, Dp, Vs + static_cast<int64_t>(jj) * Dp);
  }
}

// Per-row visible keys of block [j0, j0 + nb) as floats (bwd_probs): [lo, lim), zeros past M.
RK_INLINE void bwd_limits(const KeySpan& span, int64_t i0, int G, int M, int Mp, int64_t j0, int nb, float* lim,
                          float* lo) {
  for (int r = 0; r < Mp; ++r) {
    const int64_t i = i0 + r / G;
    lim[r] = r < M ? static_cast<float>(lmin(nb, lmax_(0, span.hi(i) - j0))) : 0.0f;
    lo[r] = r < M ? static_cast<float>(lmin(nb, lmax_(0, span.lo(i) - j0))) : 0.0f;
  }
}

// S^T = K' Q'^T and dP^T = V dO^T of keys [0, nb) against the tile's Mp columns. When some rows
// do not see every key (`masked`: the causal diagonal, a window's edge), each kNR-column tile
// runs only over the keys its rows see, [lo of its first row, lim of its last): both bounds grow
// with the row. What it skips is left unset and selected away by bwd_probs.
static void bwd_scores(const float* Ks, const float* Vs, int nb, int Dp, const float* Qt, const float* dOt, int M,
                       int Mp, const float* lim, const float* lo, bool masked, float* St, float* dPt) {
  if (!masked) {
    outer_block(Ks, nb, Dp, Qt, Mp, Mp, St, Mp);
    outer_block(Vs, nb, Dp, dOt, Mp, Mp, dPt, Mp);
    return;
  }
  for (int c0 = 0; c0 < M; c0 += kNR) {
    const int k0 = static_cast<int>(lo[c0]), k1 = static_cast<int>(lim[imin(c0 + kNR, M) - 1]);
    if (k1 <= k0) continue;
    const int ncols = imin(kNR, Mp - c0);
    const int64_t at = static_cast<int64_t>(k0) * Mp + c0;
    outer_block(Ks + static_cast<int64_t>(k0) * Dp, k1 - k0, Dp, Qt + c0, Mp, ncols, St + at, Mp);
    outer_block(Vs + static_cast<int64_t>(k0) * Dp, k1 - k0, Dp, dOt + c0, Mp, ncols, dPt + at, Mp);
  }
}

// A finished gradient row of a rotated input: times softmax_scale, rotated back (the transpose of
// the forward's rotation: sin negated), stored in the input dtype.
template <class DT>
RK_INLINE void bwd_store_rotated(typename DT::T* dst, float* row, const float* cs, const RopeParams& rope, int D,
                                 float scale, float* neg_cs) {
  const int R = rope.rotary_dim, cp = cs_pad_of(R);
  if (R) {
    for (int c = 0; c < cp; ++c) {
      neg_cs[c] = cs[c];
      neg_cs[cp + c] = -cs[cp + c];
    }
    rotate_row(row, neg_cs, R, cp, rope.interleaved);
  }
  store_row<DT>(dst, row, scale, D);
}

RK_INLINE int bwd_tile_cols(const BwdPlan& plan) { return round_cols(plan.block_m * (plan.p.num_heads / plan.p.num_heads_k)); }

// An item's scratch, carved once for both passes (the dQ pass leaves Qr, dOr and dV unused): the
// query tile (Qt, dOt transposed, Qr, dOr as rows), the S^T and dP^T tiles, one key block (Ks, Vs)
// and its gradient sums (dK or dQ in `acc`, dV), per-row statistics and limits.
struct BwdScratch {
  static constexpr int kN = kBwdBlockN > kBlockN ? kBwdBlockN : kBlockN;  // keys per block
  float *Qt, *dOt, *Qr, *dOr, *St, *dPt, *Ks, *Vs, *acc, *dV, *l2, *dl, *lim, *lo, *ones, *tmp8, *neg_cs;
  // AMX unit (bf16 inputs): K', V rows (Kb, Vb) and P^T, dS^T or dS rows (Pb, dSb) in bf16; the
  // transposed pairs of the Q', dO tiles (Qp, dOp) and the pairs of rows of Q', dO, K'.
  uint16_t *Kb = nullptr, *Vb = nullptr, *Pb = nullptr, *dSb = nullptr;
  uint32_t *Qp = nullptr, *dOp = nullptr, *Qpairs = nullptr, *dOpairs = nullptr, *Kpairs = nullptr;
  uint32_t* pairs_tmp = nullptr;
  // take(n) hands out the next n floats (64-byte aligned pieces: Bump).
  template <class Take>
  int64_t layout(const BwdPlan& plan, const Take& take) {
    const int64_t Dp = head_dim_pad_of(plan.p.head_dim), Mp = bwd_tile_cols(plan);
    const int64_t rows = Mp > kN ? Mp : kN;
    float** tile[] = {&Qt, &dOt, &Qr, &dOr};
    for (float** t : tile) *t = take(Mp * Dp);
    float** scores[] = {&St, &dPt};
    for (float** t : scores) *t = take(kN * Mp);
    float** keys[] = {&Ks, &Vs, &acc, &dV};
    for (float** t : keys) *t = take(rows * Dp);
    float** per_row[] = {&l2, &dl, &lim, &lo, &ones};
    for (float** t : per_row) *t = take(rows);
    tmp8 = take(8 * Dp);
    neg_cs = take(2 * cs_pad_of(plan.p.rope.rotary_dim));
    if (kAmx) {  // bf16 operands: halves of floats
      const auto u16 = [&take](int64_t n) { return reinterpret_cast<uint16_t*>(take(n / 2)); };
      const auto u32 = [&take](int64_t n) { return reinterpret_cast<uint32_t*>(take(n / 2)); };
      Kb = u16(kN * Dp);
      Vb = u16(kN * Dp);
      Pb = u16(kN * Mp);
      dSb = u16(kN * Mp);
      Qp = u32(Mp * Dp);
      dOp = u32(Mp * Dp);
      Qpairs = u32(Mp * Dp);
      dOpairs = u32(Mp * Dp);
      Kpairs = u32(kN * Dp);
      pairs_tmp = u32(8 * Dp);
    }
    return rows;
  }
  BwdScratch(const BwdPlan& plan, float* base) {
    Bump bump{base};
    const int64_t rows = layout(plan, [&bump](int64_t n) { return bump.take(n); });
    for (int64_t c = 0; c < rows; ++c) ones[c] = 1.0f;
  }
  BwdScratch() = default;
};

int64_t bwd_scratch_floats(const BwdPlan& plan) {
  int64_t total = 0;
  BwdScratch().layout(plan, [&total](int64_t n) -> float* {
    total += align16(n);
    return nullptr;
  });
  return total;
}

// The AMX unit's bf16 inputs (D a multiple of 32, as its forward): the five products on the tile
// unit with fp32 accumulation; Q', K' rounded to bf16 once (as the forward's scores, so P matches
// its LSE), P and dS rounded to bf16 as operands (as FlashAttention-2 on GPUs), V and dO exact.
template <class DT>
RK_INLINE bool bwd_amx(const AttnParams& p) {
  return kAmx && DT::is_bf16 && p.head_dim % 32 == 0;
}

// The tile operands of the query tile's rows (Qr, dOr [Mp][Dp]; rows past M zero): transposed
// pairs (the B operand of the scores) and pairs of rows (the B operand of dK' and dV).
static void bwd_amx_query(const BwdScratch& sc, int Mp, int Dp) {
  for (int r0 = 0; r0 < Mp; r0 += 8) {
    bf16_pairs_transposed(sc.Qr + static_cast<int64_t>(r0) * Dp, Dp, Dp / 2, sc.pairs_tmp, sc.Qp, Mp, r0);
    bf16_pairs_transposed(sc.dOr + static_cast<int64_t>(r0) * Dp, Dp, Dp / 2, sc.pairs_tmp, sc.dOp, Mp, r0);
  }
  amx_v_operand(sc.Qr, Mp, Mp, Dp, sc.Qpairs);
  amx_v_operand(sc.dOr, Mp, Mp, Dp, sc.dOpairs);
}

// The key block's K' and V rows in bf16, padded with zero rows to nbk (the A operands of the scores).
static void bwd_amx_keys(const BwdScratch& sc, int nb, int nbk, int Dp) {
  amx_k_operand(sc.Ks, nb, nbk, Dp, sc.Kb);
  amx_k_operand(sc.Vs, nb, nbk, Dp, sc.Vb);
}

// S^T and dP^T ([nbk][Mp]) of the key block (bwd_amx_keys) and the query tile (bwd_amx_query).
static void bwd_amx_scores(const BwdScratch& sc, int nbk, int Dp, int Mp) {
  amx_scores(sc.Kb, nbk, Dp, sc.Qp, Mp, sc.St);
  amx_scores(sc.Vb, nbk, Dp, sc.dOp, Mp, sc.dPt);
}

// n floats rounded to bf16 operands (n a multiple of 8).
RK_INLINE void bf16_operand_rows(const float* x, int64_t n, uint16_t* out) {
  for (int64_t e = 0; e < n; e += kLanes) vstore_bf16_operand(out + e, vload(x + e));
}

// dQ' of the tile's M rows (dst, Dp apart) += dS K' over the key block (fp32). A strip of rows
// multiplies the zero dS of keys some of its rows cannot see by those keys' K' rows: when one of
// those holds a NaN or an infinity, each row runs alone over its own keys (as the forward's P.V).
static void bwd_dq_fp32(const float* dPt, const float* Ks, const float* lim, const float* lo, int M, int Mp, int nb,
                        int Dp, float* dst, const float* ones) {
  const int seen_by_all = static_cast<int>(lim[0]), seen_from = static_cast<int>(lo[M - 1]);
  const bool one_by_one =
      !all_finite(Ks + static_cast<int64_t>(seen_by_all) * Dp, static_cast<int64_t>(nb - seen_by_all) * Dp) ||
      !all_finite(Ks, static_cast<int64_t>(seen_from) * Dp);
  if (!one_by_one) {  // over the keys some row sees, [lo of the first row, lim of the last)
    const int k0 = static_cast<int>(lo[0]), k1 = static_cast<int>(lim[M - 1]);
    if (k1 > k0)
      pv_block(dPt + static_cast<int64_t>(k0) * Mp, 1, Mp, M, Ks + static_cast<int64_t>(k0) * Dp, Dp, Dp, k1 - k0, dst,
               ones);
    return;
  }
  for (int r = 0; r < M; ++r) {
    const int first = static_cast<int>(lo[r]), keys = imax(static_cast<int>(lim[r]) - first, 0);
    pv_block(dPt + r + static_cast<int64_t>(first) * Mp, 1, Mp, 1, Ks + static_cast<int64_t>(first) * Dp, Dp, Dp,
             keys, dst + static_cast<int64_t>(r) * Dp, ones);
  }
}

// Where the dQ' partial sums of split `split`, KV head hkv, start: [q rows][G][Dp] (BwdPlan::dq_part).
RK_INLINE float* bwd_dq_part(const BwdPlan& plan, int split, int hkv) {
  const AttnParams& p = plan.p;
  const int64_t rows = plan.q_rows * (p.num_heads / p.num_heads_k) * head_dim_pad_of(p.head_dim);
  return plan.dq_part + (static_cast<int64_t>(split) * p.num_heads_k + hkv) * rows;
}

template <class DT>
void bwd_item_t(const BwdPlan& plan, int64_t item, float* scratch) {
  using T = typename DT::T;
  const AttnParams& p = plan.p;
  const int Hkv = p.num_heads_k, G = p.num_heads / Hkv, D = p.head_dim, Dp = head_dim_pad_of(D);
  const int64_t bh = item / plan.num_splits;
  const int split = static_cast<int>(item % plan.num_splits);
  const int b = static_cast<int>(bh / Hkv), hkv = static_cast<int>(bh % Hkv);
  const BwdSeq<T> s(plan, b, hkv);
  const KeySpan span(p, s.sq, s.sk);
  const int Mp = bwd_tile_cols(plan);
  const float scale2 = p.softmax_scale * kLog2e;
  const bool varlen = p.cu_seqlens_q != nullptr;
  // This sequence's rows of the split's dQ' partial sums, in tile order (query i, head g of the group).
  float* dq_part = bwd_dq_part(plan, split, hkv) + (varlen ? s.q_row0 : b * static_cast<int64_t>(p.seqlen_q)) * G * Dp;
  T* dk = static_cast<T*>(plan.dk) + (varlen ? s.k_row0 * plan.dk_row_stride : b * plan.dk_batch_stride) +
          hkv * plan.dk_head_stride;
  T* dv = static_cast<T*>(plan.dv) + (varlen ? s.k_row0 * plan.dk_row_stride : b * plan.dk_batch_stride) +
          hkv * plan.dk_head_stride;
  const int64_t cs_stride = 2 * cs_pad_of(p.rope.rotary_dim);

  const BwdScratch sc(plan, scratch);
  float *Qt = sc.Qt, *dOt = sc.dOt, *Qr = sc.Qr, *dOr = sc.dOr, *St = sc.St, *dPt = sc.dPt, *Ks = sc.Ks, *Vs = sc.Vs;
  float *dK = sc.acc, *dV = sc.dV, *l2 = sc.l2, *dl = sc.dl, *lim = sc.lim, *lo = sc.lo, *ones = sc.ones;
  const bool amx = bwd_amx<DT>(p);
  if (amx) amx_begin();

  // The split's key blocks: every num_splits-th, so that under causal every split gets early
  // (long) and late (short) blocks alike.
  for (int64_t j0 = static_cast<int64_t>(split) * kBwdBlockN; j0 < s.sk; j0 += plan.num_splits * kBwdBlockN) {
    const int nb = static_cast<int>(lmin(kBwdBlockN, s.sk - j0));
    const int nbk = amx ? (nb + 31) / 32 * 32 : nb;  // AMX: keys padded to whole tiles
    bwd_key_block<DT>(p, s, j0, nb, Ks, Vs);
    zero_floats(dK, static_cast<int64_t>(nbk) * Dp);
    zero_floats(dV, static_cast<int64_t>(nbk) * Dp);
    if (amx) {
      bwd_amx_keys(sc, nb, nbk, Dp);
      amx_v_operand(Ks, nb, nbk, Dp, sc.Kpairs);
    }
    for (int64_t i0 = 0; i0 < s.sq; i0 += plan.block_m) {
      const int64_t i1 = lmin(s.sq, i0 + plan.block_m);
      if (span.lo(i0) >= j0 + nb) break;    // this and every later block starts past the keys
      if (span.hi(i1 - 1) <= j0) continue;  // ends before them
      const int M = static_cast<int>(i1 - i0) * G;
      float* dq = dq_part + i0 * G * Dp;
      bwd_query_tile<DT>(plan, s, hkv, i0, M, Mp, amx ? nullptr : Qt, amx ? nullptr : dOt, Qr, dOr, l2, dl, sc.tmp8);
      bwd_limits(span, i0, G, M, Mp, j0, nb, lim, lo);
      if (amx) {
        bwd_amx_query(sc, Mp, Dp);
        bwd_amx_scores(sc, nbk, Dp, Mp);
        bwd_probs(St, dPt, Mp, nbk, lim, lo, scale2, l2, dl);  // keys past nb: zeros (lim <= nb)
        bf16_operand_rows(St, static_cast<int64_t>(nbk) * Mp, sc.Pb);
        bf16_operand_rows(dPt, static_cast<int64_t>(nbk) * Mp, sc.dSb);
        amx_gemm(sc.Pb, Mp, sc.dOpairs, Dp, dV, Dp, nbk, Dp, Mp, true);  // dV += P^T dO
        amx_gemm(sc.dSb, Mp, sc.Qpairs, Dp, dK, Dp, nbk, Dp, Mp, true);  // dK' += dS^T Q'
        if (!all_finite(Ks, static_cast<int64_t>(nb) * Dp)) {
          bwd_dq_fp32(dPt, Ks, lim, lo, M, Mp, nb, Dp, dq, ones);  // keeps hidden non-finite K' out
          continue;
        }
        // dQ' += dS K' into a tile of its own (the tile's padding rows must not touch the next
        // tile's partial sums), then added to the M rows.
        amx_rows_of_transposed(dPt, Mp, nbk, nbk, sc.dSb);
        amx_gemm(sc.dSb, nbk, sc.Kpairs, Dp, Qt, Dp, Mp, Dp, nbk, false);
        for (int64_t e = 0; e < static_cast<int64_t>(M) * Dp; e += kLanes) vstore(dq + e, vload(dq + e) + vload(Qt + e));
        continue;
      }
      const bool masked = j0 + nb > span.hi(i0) || j0 < span.lo(i1 - 1);
      bwd_scores(Ks, Vs, nb, Dp, Qt, dOt, M, Mp, lim, lo, masked, St, dPt);
      bwd_probs(St, dPt, Mp, nb, lim, lo, scale2, l2, dl);
      // Only the rows that see some key of the block, and the keys some row sees, reach dV and dK'.
      int r0 = 0, r1 = M;
      while (r0 < r1 && lim[r0] <= lo[r0]) ++r0;
      while (r1 > r0 && lim[r1 - 1] <= lo[r1 - 1]) --r1;
      if (r0 == r1) continue;
      const int k0 = static_cast<int>(lo[r0]), k1 = static_cast<int>(lim[r1 - 1]);
      const int64_t at = static_cast<int64_t>(k0) * Mp + r0;
      const int64_t rows = static_cast<int64_t>(k0) * Dp, cols = static_cast<int64_t>(r0) * Dp;
      pv_block(St + at, Mp, 1, k1 - k0, dOr + cols, Dp, Dp, r1 - r0, dV + rows, ones);  // dV += P^T dO
      pv_block(dPt + at, Mp, 1, k1 - k0, Qr + cols, Dp, Dp, r1 - r0, dK + rows, ones);  // dK' += dS^T Q'
      bwd_dq_fp32(dPt, Ks, lim, lo, M, Mp, nb, Dp, dq, ones);                          // dQ' += dS K'
    }
    for (int jj = 0; jj < nb; ++jj) {
      const int64_t j = j0 + jj;
      store_row<DT>(dv + j * plan.dk_row_stride, dV + static_cast<int64_t>(jj) * Dp, 1.0f, D);
      bwd_store_rotated<DT>(dk + j * plan.dk_row_stride, dK + static_cast<int64_t>(jj) * Dp,
                            p.rope.rotary_dim ? s.k_cs + j * cs_stride : nullptr, p.rope, D, p.softmax_scale,
                            sc.neg_cs);
    }
  }
  if (amx) amx_end();
}

// dq rows: entries e = hkv * q_rows + row of [Hkv][q rows] (global rows: dense b * Sq + i, varlen
// the packed row), each the G heads of the group; the splits' partial sums added in split order.
template <class DT>
void bwd_dq_rows_t(const BwdPlan& plan, int64_t begin, int64_t end) {
  using T = typename DT::T;
  const AttnParams& p = plan.p;
  const int Hkv = p.num_heads_k, G = p.num_heads / Hkv, D = p.head_dim, Dp = head_dim_pad_of(D);
  const int64_t cs_stride = 2 * cs_pad_of(p.rope.rotary_dim);
  alignas(64) float row[256];  // Dp <= 256
  alignas(64) float neg_cs[256];
  for (int64_t e = begin; e < end; ++e) {
    const int hkv = static_cast<int>(e / plan.q_rows);
    const int64_t r = e % plan.q_rows;
    const int64_t b = p.cu_seqlens_q ? 0 : r / p.seqlen_q, i = p.cu_seqlens_q ? r : r % p.seqlen_q;
    T* dq = static_cast<T*>(plan.dq) + b * plan.dq_batch_stride + i * plan.dq_row_stride;
    for (int g = 0; g < G; ++g) {
      const int64_t at = (r * G + g) * Dp;
      for (int c = 0; c < Dp; c += kLanes) {
        V acc = vload(bwd_dq_part(plan, 0, hkv) + at + c);
        for (int split = 1; split < plan.num_splits; ++split) acc = acc + vload(bwd_dq_part(plan, split, hkv) + at + c);
        vstore(row + c, acc);
      }
      bwd_store_rotated<DT>(dq + (hkv * G + g) * plan.dq_head_stride, row,
                            p.rope.rotary_dim ? plan.q_cs + r * cs_stride : nullptr, p.rope, D, p.softmax_scale, neg_cs);
    }
  }
}

void bwd_item(const BwdPlan& plan, int64_t item, float* scratch) {
  switch (plan.dtype) {
    case DType::kFloat32: bwd_item_t<F32>(plan, item, scratch); break;
    case DType::kBFloat16: bwd_item_t<BF16>(plan, item, scratch); break;
    case DType::kFloat16: bwd_item_t<F16>(plan, item, scratch); break;
  }
}

void bwd_dq_rows(const BwdPlan& plan, int64_t begin, int64_t end) {
  switch (plan.dtype) {
    case DType::kFloat32: bwd_dq_rows_t<F32>(plan, begin, end); break;
    case DType::kBFloat16: bwd_dq_rows_t<BF16>(plan, begin, end); break;
    case DType::kFloat16: bwd_dq_rows_t<F16>(plan, begin, end); break;
  }
}
