// The CUDA kernels, run on the CPU: the kernel and launcher source of csrc/cuda compiled with
// -DRK_EMULATE (fibers for threads, emulated ldmatrix / mma.sync / cp.async, see emu/simt.h) and
// compared with an fp64 host reference. It exercises the real index math, masking, online
// softmax, rotation pass, split-K merge, paged addressing and in-place append; what it cannot
// check is the hardware itself (inline PTX syntax is checked by nvcc, timing not at all).
//
// Tolerance: |kernel - fp64| <= 4 eps (1 + |ref|) with eps = 2^-10 (fp16) / 2^-7 (bf16): the
// kernel rounds the rotated Q / K and P to the I/O dtype once each. A kernel with plain fp32
// angles misses this by ~10x at positions near 2^20, a wrong index by far more.
//
// Table mode (RopeParams::table_positions > 0): the cases marked "table" hand the kernels a
// caller's cos/sin table built here in fp64 from the same frequencies times the attention factor
// (rounded once to fp32), so the reference is the law's, with positions past the table clamped to
// its last row.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dispatch.h"
#include "launch_template.h"

namespace {

using ropekern::cuda::bf16_t;
using ropekern::cuda::Convert;
using ropekern::cuda::DType;
using ropekern::cuda::half_t;

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

template <typename E>
constexpr DType dtype_of() {
  return std::is_same<E, half_t>::value ? DType::kFloat16 : (std::is_same<E, bf16_t>::value ? DType::kBFloat16 : DType::kFloat32);
}
template <typename E>
double eps_of() {
  return std::is_same<E, half_t>::value ? 1.0 / 1024 : (std::is_same<E, bf16_t>::value ? 1.0 / 128 : 1.0 / (1 << 23));
}
template <typename E>
const char* name_of() {
  return std::is_same<E, half_t>::value ? "fp16" : (std::is_same<E, bf16_t>::value ? "bf16" : "fp32");
}

template <typename E>
double f(E x) {
  return Convert<E>::to_float(x);
}

// ------------------------------------------------------------------ rotary tables
// inv_freq per sequence (fp64) and its kernel form: [4][R/2] split turns (ropekern/scaling.py split_turns).
double round_bits(double x, int bits) {
  int e = 0;
  const double m = std::frexp(x, &e);
  return std::ldexp(std::nearbyint(std::ldexp(m, bits)), e - bits);
}

// Rows of NaN after a caller's table: a kernel that skipped the clamp would read them (the cases
// keep their positions below table_positions + kTableGuardRows), never memory outside the buffer.
constexpr int kTableGuardRows = 128;

struct Rope {
  int rotary_dim = 0;
  bool interleaved = false;
  double factor = 1.0;
  std::vector<std::vector<double>> inv;  // [nT][R/2]
  std::vector<float> split;              // [nT][4][R/2]
  int table_positions = 0;               // > 0: the kernels read `table` instead of `split`
  std::vector<float> table;              // [table_positions + kTableGuardRows][2][R/2]

  Rope(int rotary, bool il, double af, std::vector<double> bases) : rotary_dim(rotary), interleaved(il), factor(af) {
    const int half = rotary / 2;
    for (double base : bases) {
      std::vector<double> row(half);
      for (int i = 0; i < half; ++i) row[i] = std::pow(base, -2.0 * i / rotary);
      inv.push_back(row);
      std::vector<float> s(ropekern::kSplitRows * half);
      for (int i = 0; i < half; ++i) {
        double r = row[i] / (2.0 * M_PI);  // 12 + 12 + 12 bits + the fp32 remainder
        for (int k = 0; k + 1 < ropekern::kSplitRows; ++k) {
          const double part = round_bits(r, 12);
          s[k * half + i] = static_cast<float>(part);
          r -= part;
        }
        s[(ropekern::kSplitRows - 1) * half + i] = static_cast<float>(r);
      }
      split.insert(split.end(), s.begin(), s.end());
    }
  }
  // Table mode with `positions` rows: row p = cos(p * inv_freq) * factor, then sin (one table, so
  // one base).
  Rope& with_table(int positions) {
    const int half = rotary_dim / 2;
    table_positions = positions;
    table.assign(static_cast<size_t>(positions + kTableGuardRows) * 2 * half, NAN);
    for (int p = 0; p < positions; ++p) {
      for (int i = 0; i < half; ++i) {
        const double a = static_cast<double>(p) * inv[0][i];
        table[(static_cast<size_t>(p) * 2) * half + i] = static_cast<float>(std::cos(a) * factor);
        table[(static_cast<size_t>(p) * 2 + 1) * half + i] = static_cast<float>(std::sin(a) * factor);
      }
    }
    return *this;
  }
  // As the host fills them (csrc/op_args.h rope_params): a caller's table is shared by every
  // sequence and carries the factor itself.
  ropekern::RopeParams params() const {
    ropekern::RopeParams p;
    p.rotary_dim = rotary_dim;
    p.interleaved = interleaved;
    if (table_positions > 0) {
      p.freqs = rotary_dim ? table.data() : nullptr;
      p.table_positions = table_positions;
      return p;
    }
    p.freqs = rotary_dim ? split.data() : nullptr;
    p.freqs_batch_stride = inv.size() > 1 ? ropekern::kSplitRows * (rotary_dim / 2) : 0;
    p.attention_factor = static_cast<float>(factor);
    return p;
  }
  // Rotated copy (fp64) of one head vector x[D] at `pos` with the table of sequence `b` (in table
  // mode: at the table row of `pos`, the last one past its end).
  std::vector<double> rotate(const std::vector<double>& x, int64_t pos, int b) const {
    std::vector<double> y = x;
    const int half = rotary_dim / 2;
    const auto& row = inv[inv.size() > 1 ? b : 0];
    if (table_positions > 0) pos = std::min<int64_t>(pos, table_positions - 1);
    for (int i = 0; i < half; ++i) {
      const int c1 = interleaved ? 2 * i : i, c2 = interleaved ? 2 * i + 1 : i + half;
      const double a = static_cast<double>(pos) * row[i], c = std::cos(a) * factor, s = std::sin(a) * factor;
      y[c1] = x[c1] * c - x[c2] * s;
      y[c2] = x[c2] * c + x[c1] * s;
    }
    return y;
  }
};

template <typename E>
std::vector<E> random_tensor(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<E> v(n);
  for (auto& x : v) x = Convert<E>::from_float(d(rng));
  return v;
}

// fp64 attention of one query row against keys [0, n_keys): returns out[D] and lse.
struct RowResult {
  std::vector<double> out;
  double lse;
};
RowResult attend(const std::vector<double>& q, const std::vector<std::vector<double>>& k,
                 const std::vector<std::vector<double>>& v, int visible, double scale) {
  const size_t d = q.size();
  RowResult r{std::vector<double>(d, 0.0), -INFINITY};
  if (visible <= 0) return r;
  std::vector<double> s(visible);
  double m = -INFINITY;
  for (int j = 0; j < visible; ++j) {
    double acc = 0;
    for (size_t c = 0; c < d; ++c) acc += q[c] * k[j][c];
    s[j] = acc * scale;
    m = std::fmax(m, s[j]);
  }
  double l = 0;
  for (int j = 0; j < visible; ++j) l += std::exp(s[j] - m);
  for (int j = 0; j < visible; ++j) {
    const double p = std::exp(s[j] - m) / l;
    for (size_t c = 0; c < d; ++c) r.out[c] += p * v[j][c];
  }
  r.lse = m + std::log(l);
  return r;
}

// Relative error of each element; where the fp64 result is a NaN or an infinity (non-finite V
// values a row sees), the kernel must give exactly that (else the error is infinite).
template <typename E>
void compare_row(const E* got, const std::vector<double>& want, double* worst) {
  for (size_t c = 0; c < want.size(); ++c) {
    const double g = f(got[c]);
    if (!std::isfinite(want[c])) {
      if (!(std::isnan(want[c]) ? std::isnan(g) : g == want[c])) *worst = INFINITY;
      continue;
    }
    const double err = std::fabs(g - want[c]) / (1.0 + std::fabs(want[c]));
    *worst = std::isnan(err) ? INFINITY : std::fmax(*worst, err);
  }
}

// A value written into V before the kernel runs: (token, channel of every kv head, value).
struct Poison {
  int token, channel;
  float value;
};

void check_lse(float got, double want, double* worst_lse, bool* inf_ok) {
  if (std::isinf(want)) {
    *inf_ok &= std::isinf(got) && got < 0;
    return;
  }
  const double err = std::fabs(got - want) / (1.0 + std::fabs(want));
  *worst_lse = std::isnan(err) ? INFINITY : std::fmax(*worst_lse, err);
}

// ------------------------------------------------------------------ prefill
struct PrefillCase {
  const char* name;
  int batch, hq, hkv, d, rotary;
  std::vector<int> q_lens, k_lens;  // per sequence; dense when all equal and !varlen
  bool varlen, causal, interleaved, packed_qkv;
  double factor;
  std::vector<double> bases;  // one (shared) or one per sequence
  int64_t position_base;      // added to the default positions (k: j, q: Sk - Sq + i)
  bool repeat_positions;      // k positions j / 2 (Parallel Context Windows style)
  std::vector<Poison> poison = {};  // non-finite V values (must reach only the rows that see them)
  int64_t position_stride = 1;       // positions base + stride * p: far apart, over the int32 range
  int table_positions = 0;           // > 0: a caller's cos/sin table of that many positions
};

template <typename E>
void run_prefill(const PrefillCase& c, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const int B = c.batch, hq = c.hq, hkv = c.hkv, d = c.d;
  std::vector<int> cq(B + 1, 0), ck(B + 1, 0);
  for (int b = 0; b < B; ++b) {
    cq[b + 1] = cq[b] + c.q_lens[b];
    ck[b + 1] = ck[b] + c.k_lens[b];
  }
  const int sq = c.q_lens[0], sk = c.k_lens[0];  // dense lengths
  const int tq = c.varlen ? cq[B] : B * sq, tk = c.varlen ? ck[B] : B * sk;
  // Token t of a packed layout: rows of [T, H, D]; dense [B, S, H, D] is the same memory.
  const int q_heads_row = c.packed_qkv ? hq + 2 * hkv : hq;
  const int64_t q_row = static_cast<int64_t>(q_heads_row) * d;
  std::vector<E> qkv, kbuf, vbuf;
  const E *qp, *kp, *vp;
  int64_t k_row, v_row;
  if (c.packed_qkv) {  // one [T, Hq + 2 Hkv, D] buffer; q, k, v are strided views (needs tq == tk)
    qkv = random_tensor<E>(static_cast<size_t>(tq) * q_row, rng);
    qp = qkv.data();
    kp = qkv.data() + hq * d;
    vp = qkv.data() + (hq + hkv) * d;
    k_row = v_row = q_row;
  } else {
    qkv = random_tensor<E>(static_cast<size_t>(tq) * q_row, rng);
    kbuf = random_tensor<E>(static_cast<size_t>(tk) * hkv * d, rng);
    vbuf = random_tensor<E>(static_cast<size_t>(tk) * hkv * d, rng);
    qp = qkv.data();
    kp = kbuf.data();
    vp = vbuf.data();
    k_row = v_row = static_cast<int64_t>(hkv) * d;
  }
  for (const Poison& x : c.poison) {
    E* v = c.packed_qkv ? qkv.data() + (hq + hkv) * d : vbuf.data();
    for (int h = 0; h < hkv; ++h) v[x.token * v_row + h * d + x.channel] = Convert<E>::from_float(x.value);
  }
  std::vector<int32_t> q_pos(tq), k_pos(tk);
  for (int b = 0; b < B; ++b) {
    const int nq = c.q_lens[b], nk = c.k_lens[b];
    const int q0 = c.varlen ? cq[b] : b * sq, k0 = c.varlen ? ck[b] : b * sk;
    for (int j = 0; j < nk; ++j)
      k_pos[k0 + j] = static_cast<int32_t>(c.position_base + c.position_stride * (c.repeat_positions ? j / 2 : j));
    for (int i = 0; i < nq; ++i) {
      const int64_t p = nk - nq + i;
      q_pos[q0 + i] =
          static_cast<int32_t>(c.position_base + c.position_stride * (p < 0 ? 0 : (c.repeat_positions ? p / 2 : p)));
    }
  }
  Rope rope(c.rotary, c.interleaved, c.factor, c.bases);
  if (c.table_positions > 0) rope.with_table(c.table_positions);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  constexpr int kGuard = 64;
  std::vector<E> out(static_cast<size_t>(tq) * hq * d + kGuard, Convert<E>::from_float(4096.f));
  std::vector<float> lse(static_cast<size_t>(hq) * tq + kGuard, 777.f);

  ropekern::AttnParams p;
  p.q = qp;
  p.k = kp;
  p.v = vp;
  p.out = out.data();
  p.lse = lse.data();
  p.q_row_stride = q_row;
  p.q_head_stride = d;
  p.k_row_stride = k_row;
  p.k_head_stride = d;
  p.v_row_stride = v_row;
  p.v_head_stride = d;
  p.o_row_stride = static_cast<int64_t>(hq) * d;
  p.o_head_stride = d;
  p.q_pos = q_pos.data();
  p.k_pos = k_pos.data();
  p.batch = B;
  p.num_heads = hq;
  p.num_heads_k = hkv;
  p.head_dim = d;
  p.softmax_scale = static_cast<float>(scale);
  p.causal = c.causal;
  p.rope = rope.params();
  if (c.varlen) {
    p.cu_seqlens_q = cq.data();
    p.cu_seqlens_k = ck.data();
    p.seqlen_q = 0;
    for (int n : c.q_lens) p.seqlen_q = std::max(p.seqlen_q, n);
    p.seqlen_k = 0;
    for (int n : c.k_lens) p.seqlen_k = std::max(p.seqlen_k, n);
    p.lse_head_stride = tq;
  } else {
    p.seqlen_q = sq;
    p.seqlen_k = sk;
    p.q_batch_stride = sq * q_row;
    p.k_batch_stride = sk * k_row;
    p.v_batch_stride = sk * v_row;
    p.o_batch_stride = static_cast<int64_t>(sq) * hq * d;
    p.lse_batch_stride = static_cast<int64_t>(hq) * sq;
    p.lse_head_stride = sq;
    p.q_pos_batch_stride = sq;
    p.k_pos_batch_stride = sk;
  }
  const std::string err = ropekern::cuda::run_attention(p, dtype_of<E>(), nullptr);
  const std::string label = std::string("prefill ") + c.name + " " + name_of<E>();
  expect(err.empty(), label + ": launch: " + err);

  double worst = 0, worst_lse = 0;
  bool inf_ok = true;
  auto head_vec = [&](const E* base, int64_t row_stride, int token, int h) {
    std::vector<double> x(d);
    for (int ch = 0; ch < d; ++ch) x[ch] = f(base[token * row_stride + static_cast<int64_t>(h) * d + ch]);
    return x;
  };
  for (int b = 0; b < B; ++b) {
    const int nq = c.q_lens[b], nk = c.k_lens[b];
    const int q0 = c.varlen ? cq[b] : b * sq, k0 = c.varlen ? ck[b] : b * sk;
    for (int h = 0; h < hq; ++h) {
      const int hk = h / (hq / hkv);
      std::vector<std::vector<double>> ks(nk), vs(nk);
      for (int j = 0; j < nk; ++j) {
        ks[j] = rope.rotate(head_vec(kp, k_row, k0 + j, hk), k_pos[k0 + j], b);
        vs[j] = head_vec(vp, v_row, k0 + j, hk);
      }
      for (int i = 0; i < nq; ++i) {
        const auto qr = rope.rotate(head_vec(qp, q_row, q0 + i, h), q_pos[q0 + i], b);
        const int visible = c.causal ? std::min(nk, std::max(0, i + nk - nq + 1)) : nk;
        const RowResult r = attend(qr, ks, vs, visible, scale);
        compare_row(out.data() + (static_cast<int64_t>(q0 + i) * hq + h) * d, r.out, &worst);
        const int64_t li = c.varlen ? static_cast<int64_t>(h) * tq + q0 + i : (static_cast<int64_t>(b) * hq + h) * sq + i;
        check_lse(lse[li], r.lse, &worst_lse, &inf_ok);
      }
    }
  }
  bool guard_ok = true;
  for (int g = 0; g < kGuard; ++g) {
    guard_ok &= f(out[out.size() - kGuard + g]) == 4096.0;
    guard_ok &= lse[lse.size() - kGuard + g] == 777.f;
  }
  const double tol = 4 * eps_of<E>();
  std::printf("%-52s max rel err %.2e (tol %.1e), lse %.2e\n", label.c_str(), worst, tol, worst_lse);
  expect(worst <= tol, label + ": output within tolerance");
  expect(worst_lse <= tol, label + ": LSE within tolerance");
  expect(inf_ok, label + ": rows without keys give LSE -inf");
  expect(guard_ok, label + ": nothing written past the outputs");
}

// ------------------------------------------------------------------ KV cache
struct CacheCase {
  const char* name;
  int batch, sq, hq, hkv, d, rotary;
  std::vector<int> cache_lens;  // tokens before the append
  int s_new;
  int capacity;                 // per sequence
  int block_size;               // 0: dense
  bool causal, interleaved;
  int num_splits;
  std::vector<double> bases;
  double factor = 1.0;
  int table_positions = 0;  // > 0: a caller's cos/sin table of that many positions
};

template <typename E>
void run_cache(const CacheCase& c, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const int B = c.batch, sq = c.sq, hq = c.hq, hkv = c.hkv, d = c.d;
  const int64_t row = static_cast<int64_t>(hkv) * d;
  const bool paged = c.block_size > 0;
  const int blocks_per_seq = paged ? (c.capacity + c.block_size - 1) / c.block_size : 0;
  const int num_blocks = paged ? B * blocks_per_seq + 3 : B;  // spare blocks never referenced
  const int slot_rows = paged ? c.block_size : c.capacity;
  // Unused cache slots hold NaN: they must never reach the output.
  const E nan = Convert<E>::from_float(NAN);
  std::vector<E> kc(static_cast<size_t>(num_blocks) * slot_rows * row, nan), vc = kc;
  std::vector<int32_t> table;
  if (paged) {  // a shuffled assignment of blocks to (sequence, block index)
    std::vector<int32_t> ids(num_blocks);
    for (int i = 0; i < num_blocks; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    table.assign(ids.begin(), ids.begin() + B * blocks_per_seq);
  }
  auto slot = [&](int b, int t) -> int64_t {  // element offset of token t of sequence b
    if (!paged) return (static_cast<int64_t>(b) * slot_rows + t) * row;
    return (static_cast<int64_t>(table[b * blocks_per_seq + t / c.block_size]) * slot_rows + t % c.block_size) * row;
  };
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < c.cache_lens[b]; ++t) {
      for (int e = 0; e < row; ++e) {
        kc[slot(b, t) + e] = Convert<E>::from_float(nd(rng));
        vc[slot(b, t) + e] = Convert<E>::from_float(nd(rng));
      }
    }
  }
  std::vector<E> q = random_tensor<E>(static_cast<size_t>(B) * sq * hq * d, rng);
  std::vector<E> kn = random_tensor<E>(static_cast<size_t>(B) * c.s_new * row, rng);
  std::vector<E> vn = random_tensor<E>(static_cast<size_t>(B) * c.s_new * row, rng);
  std::vector<int32_t> lens(c.cache_lens.begin(), c.cache_lens.end());
  Rope rope(c.rotary, c.interleaved, c.factor, c.bases);
  if (c.table_positions > 0) rope.with_table(c.table_positions);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<E> out(static_cast<size_t>(B) * sq * hq * d, Convert<E>::from_float(4096.f));
  std::vector<float> lse(static_cast<size_t>(B) * hq * sq, 777.f);

  ropekern::cuda::CacheParams cp;
  ropekern::DecodeParams& p = cp.p;
  p.q = q.data();
  p.k_cache = kc.data();
  p.v_cache = vc.data();
  p.k_new = c.s_new ? kn.data() : nullptr;
  p.v_new = c.s_new ? vn.data() : nullptr;
  p.out = out.data();
  p.lse = lse.data();
  p.q_batch_stride = static_cast<int64_t>(sq) * hq * d;
  p.q_row_stride = static_cast<int64_t>(hq) * d;
  p.q_head_stride = d;
  p.kc_batch_stride = p.vc_batch_stride = slot_rows * row;
  p.kc_row_stride = p.vc_row_stride = row;
  p.kc_head_stride = p.vc_head_stride = d;
  p.kn_batch_stride = p.vn_batch_stride = c.s_new * row;
  p.kn_row_stride = p.vn_row_stride = row;
  p.kn_head_stride = p.vn_head_stride = d;
  p.o_batch_stride = p.q_batch_stride;
  p.o_row_stride = p.q_row_stride;
  p.o_head_stride = d;
  p.lse_batch_stride = static_cast<int64_t>(hq) * sq;
  p.lse_head_stride = sq;
  p.cache_seqlens = lens.data();
  p.block_table = paged ? table.data() : nullptr;
  p.block_table_batch_stride = blocks_per_seq;
  p.block_size = c.block_size;
  p.batch = B;
  p.seqlen_q = sq;
  p.s_new = c.s_new;
  p.num_heads = hq;
  p.num_heads_k = hkv;
  p.head_dim = d;
  p.softmax_scale = static_cast<float>(scale);
  p.causal = c.causal;
  p.rope = rope.params();
  cp.max_seqlen_k = c.capacity;
  p.num_splits = ropekern::cuda::plan_num_splits(B, hq, hkv, sq, c.capacity, 132, c.num_splits);
  std::vector<float> ws_out, ws_lse;
  if (p.num_splits > 1) {
    ws_out.assign(static_cast<size_t>(p.num_splits) * B * hq * sq * d, NAN);
    ws_lse.assign(static_cast<size_t>(p.num_splits) * B * hq * sq, NAN);
    cp.out_accum = ws_out.data();
    cp.lse_accum = ws_lse.data();
  }
  const std::string err = ropekern::cuda::run_cache(cp, dtype_of<E>(), nullptr);
  const std::string label = std::string("cache ") + c.name + " " + name_of<E>() + " splits=" + std::to_string(p.num_splits);
  expect(err.empty(), label + ": launch: " + err);

  // The append: new tokens land bit-exact (un-rotated) at cache_seqlens[b] + s.
  bool append_ok = true;
  for (int b = 0; b < B; ++b) {
    for (int s = 0; s < c.s_new; ++s) {
      const int64_t src = (static_cast<int64_t>(b) * c.s_new + s) * row;
      append_ok &= std::memcmp(&kc[slot(b, c.cache_lens[b] + s)], &kn[src], row * sizeof(E)) == 0;
      append_ok &= std::memcmp(&vc[slot(b, c.cache_lens[b] + s)], &vn[src], row * sizeof(E)) == 0;
    }
  }
  double worst = 0, worst_lse = 0;
  bool inf_ok = true;
  for (int b = 0; b < B; ++b) {
    const int n = c.cache_lens[b] + c.s_new;
    for (int h = 0; h < hq; ++h) {
      const int hk = h / (hq / hkv);
      std::vector<std::vector<double>> ks(n), vs(n);
      for (int j = 0; j < n; ++j) {
        std::vector<double> kv(d), vv(d);
        for (int ch = 0; ch < d; ++ch) {
          kv[ch] = f(kc[slot(b, j) + static_cast<int64_t>(hk) * d + ch]);
          vv[ch] = f(vc[slot(b, j) + static_cast<int64_t>(hk) * d + ch]);
        }
        ks[j] = rope.rotate(kv, j, b);
        vs[j] = vv;
      }
      for (int i = 0; i < sq; ++i) {
        std::vector<double> qv(d);
        for (int ch = 0; ch < d; ++ch) qv[ch] = f(q[((static_cast<int64_t>(b) * sq + i) * hq + h) * d + ch]);
        const auto qr = rope.rotate(qv, n - sq + i, b);
        const int visible = c.causal ? n - sq + i + 1 : n;
        const RowResult r = attend(qr, ks, vs, visible, scale);
        compare_row(out.data() + ((static_cast<int64_t>(b) * sq + i) * hq + h) * d, r.out, &worst);
        check_lse(lse[(static_cast<int64_t>(b) * hq + h) * sq + i], r.lse, &worst_lse, &inf_ok);
      }
    }
  }
  const double tol = 4 * eps_of<E>();
  std::printf("%-52s max rel err %.2e (tol %.1e), lse %.2e\n", label.c_str(), worst, tol, worst_lse);
  expect(append_ok, label + ": k_new / v_new appended in place, bit-exact");
  expect(worst <= tol, label + ": output within tolerance");
  expect(worst_lse <= tol, label + ": LSE within tolerance");
  expect(inf_ok, label + ": LSE finite");
}

// ------------------------------------------------------------------ apply_rope
// table_positions > 0: a caller's table of that many positions (1.1 times cos/sin) and positions
// 3 * token, past its end from token table_positions / 3 on.
template <typename E>
void run_rope(int d, int rotary, bool interleaved, uint64_t seed, int table_positions = 0) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const int B = 2, S = 5, H = 3;
  // x is a strided view: heads padded to d + 6 elements, as if sliced out of a wider buffer.
  const int64_t hs = d + 6, rs = H * hs, bs = S * rs;
  std::vector<E> x = random_tensor<E>(static_cast<size_t>(B) * bs, rng);
  std::vector<int32_t> pos(B * S);
  for (int i = 0; i < B * S; ++i) pos[i] = table_positions > 0 ? 3 * i : (1 << 20) + 37 * i;
  Rope rope = table_positions > 0 ? Rope(rotary, interleaved, 1.1, {10000.0}).with_table(table_positions)
                                  : Rope(rotary, interleaved, 0.9, {10000.0, 500000.0});  // one table per batch row
  std::vector<E> out(static_cast<size_t>(B) * S * H * d);
  ropekern::cuda::RopeApplyParams p;
  p.x = x.data();
  p.out = out.data();
  p.x_batch_stride = bs;
  p.x_row_stride = rs;
  p.x_head_stride = hs;
  p.o_batch_stride = static_cast<int64_t>(S) * H * d;
  p.o_row_stride = static_cast<int64_t>(H) * d;
  p.o_head_stride = d;
  p.positions = pos.data();
  p.pos_batch_stride = S;
  p.batch = B;
  p.seqlen = S;
  p.num_heads = H;
  p.head_dim = d;
  p.rope = rope.params();
  const std::string err = ropekern::cuda::run_rope(p, dtype_of<E>(), nullptr);
  const std::string label = std::string("apply_rope D=") + std::to_string(d) + " R=" + std::to_string(rotary) +
                            (interleaved ? " interleaved " : " half-split ") +
                            (table_positions > 0 ? "table P=" + std::to_string(table_positions) + " " : "") +
                            name_of<E>();
  expect(err.empty(), label + ": launch: " + err);
  double worst = 0;
  bool passthrough_exact = true;
  for (int b = 0; b < B; ++b) {
    for (int s = 0; s < S; ++s) {
      for (int h = 0; h < H; ++h) {
        const E* xi = x.data() + b * bs + s * rs + h * hs;
        const E* oi = out.data() + ((static_cast<int64_t>(b) * S + s) * H + h) * d;
        std::vector<double> xv(d);
        for (int c = 0; c < d; ++c) xv[c] = f(xi[c]);
        const auto want = rope.rotate(xv, pos[b * S + s], b);
        for (int c = 0; c < d; ++c) {
          if (c >= rotary) {
            passthrough_exact &= std::memcmp(&xi[c], &oi[c], sizeof(E)) == 0;
          } else {
            worst = std::fmax(worst, std::fabs(f(oi[c]) - want[c]) / (1.0 + std::fabs(want[c])));
          }
        }
      }
    }
  }
  // fp32: the accurate angle is within ~2e-6 rad of fp64 (docs/design.md §4), so allow 1e-5.
  const double tol = std::is_same<E, float>::value ? 1e-5 : 2 * eps_of<E>();
  std::printf("%-52s max rel err %.2e (tol %.1e)\n", label.c_str(), worst, tol);
  expect(worst <= tol, label + ": within tolerance");
  expect(passthrough_exact, label + ": pass-through channels bit-exact");
}

void test_plan_and_refusals() {
  using ropekern::cuda::plan_num_splits;
  expect(plan_num_splits(1, 32, 8, 1, 16384, 132, 0) > 1, "decode with few CTAs splits the keys");
  expect(plan_num_splits(64, 32, 8, 1, 16384, 132, 0) == 1, "a full wave of CTAs is not split");
  expect(plan_num_splits(1, 8, 8, 1, 64, 132, 0) == 1, "a one-tile cache is not split");
  expect(plan_num_splits(1, 8, 8, 1, 4096, 132, 0) <= 4096 / 64 / 4, "each split keeps >= 4 key tiles");
  expect(plan_num_splits(1, 8, 8, 1, 200, 132, 7) == 4, "a requested split count is capped at the key tiles");
  ropekern::AttnParams p;
  p.head_dim = 96;
  p.num_heads = p.num_heads_k = 1;
  expect(ropekern::cuda::run_attention(p, DType::kFloat16, nullptr).find("head dim 96") != std::string::npos,
         "head dim 96 is refused by name");
}

}  // namespace

int main(int argc, char** argv) {
  // Optional argument: the emulator's scheduling seed (the interleaving of threads).
  rk_emu::options().seed = argc > 1 ? std::stoull(argv[1]) : 1;
  const uint64_t seed = rk_emu::options().seed;
  try {
    test_plan_and_refusals();
    // name, B, Hq, Hkv, D, R, q_lens, k_lens, varlen, causal, interleaved, packed, factor, bases, pos base, repeat
    run_prefill<half_t>({"D64 B2 17x17 GQA2 packed-qkv", 2, 4, 2, 64, 64, {17, 17}, {17, 17}, false, false, false, true,
                         1.0, {10000.0}, 0, false},
                        seed);
    run_prefill<bf16_t>({"D128 129x113 causal(Sq>Sk) partial il pos~2^20", 1, 2, 1, 128, 64, {129}, {113}, false, true,
                         true, false, 1.25, {10000.0}, (1 << 20) - 60, false},
                        seed + 1);
    run_prefill<half_t>({"D64 varlen causal per-seq tables pos~2^22", 4, 2, 2, 64, 32, {1, 17, 0, 2}, {5, 70, 3, 0}, true,
                         true, false, false, 1.0, {10000.0, 80000.0, 3000.0, 10.0}, 1 << 22, false},
                        seed + 2);
    run_prefill<half_t>({"D256 1x65 MQA4 repeated positions", 1, 4, 1, 256, 256, {1}, {65}, false, false, false, false,
                         1.0, {500000.0}, 3, true},
                        seed + 3);
    run_prefill<bf16_t>({"D64 17x129 causal rope off", 1, 1, 1, 64, 0, {17}, {129}, false, true, false, false, 1.0,
                         {10000.0}, 0, false},
                        seed + 4);
    // Positions spread over the whole int32 range, 30M apart (the two-chunk angle was arbitrary past
    // 2^28; nearby positions would hide it: their rounding errors cancel in q.k).
    run_prefill<half_t>({"D64 40x70 causal positions 0..2^31", 1, 2, 1, 64, 64, {40}, {70}, false, true, false, false,
                         1.0, {10000.0}, 11, false, {}, 30000001},
                        seed + 15);
    // NaN / infinities in V at keys that earlier rows of the same tile cannot see: only the rows
    // that see them may turn non-finite (the mma multiplies masked zeros by V).
    run_prefill<half_t>({"D64 70x70 causal NaN/inf in masked V", 1, 2, 1, 64, 64, {70}, {70}, false, true, false, false,
                         1.0, {10000.0}, 0, false, {{5, 0, NAN}, {40, 3, INFINITY}, {41, 3, -INFINITY}, {66, 9, INFINITY}}},
                        seed + 13);
    run_prefill<bf16_t>({"D128 varlen causal Sq<Sk inf in masked V", 2, 4, 2, 128, 128, {20, 9}, {30, 60}, true, true,
                         false, false, 1.0, {10000.0}, 0, false, {{25, 1, -INFINITY}, {85, 100, NAN}}},
                        seed + 14);
    // A caller's cos/sin table (1.1 x the law's): partial interleaved rotation with keys 70..79 and
    // the last queries past the table's 70 positions (they read its last row); varlen sequences
    // sharing one table, positions 2 + 3p, the later ones past the table.
    run_prefill<bf16_t>({"table D128 B2 33x80 causal partial il P=70", 2, 4, 2, 128, 64, {33, 33}, {80, 80}, false,
                         true, true, false, 1.1, {10000.0}, 0, false, {}, 1, 70},
                        seed + 16);
    run_prefill<half_t>({"table D64 varlen causal positions 2+3p P=100", 3, 2, 1, 64, 64, {1, 17, 40}, {5, 40, 60},
                         true, true, false, false, 1.1, {10000.0}, 2, false, {}, 3, 100},
                        seed + 17);
    // name, B, Sq, Hq, Hkv, D, R, cache_lens, s_new, capacity, block_size, causal, interleaved, splits, bases
    // [, factor, table positions]
    run_cache<half_t>({"dense D64 GQA4 append 1", 2, 1, 8, 2, 64, 64, {5, 70}, 1, 96, 0, true, false, 1, {10000.0}},
                      seed + 5);
    run_cache<bf16_t>({"paged(bs16) D128 Sq3 causal il", 2, 3, 4, 2, 128, 96, {0, 100}, 3, 112, 16, true, true, 3,
                       {10000.0, 40000.0}},
                      seed + 6);
    run_cache<half_t>({"dense D256 non-causal Sq2 rope off", 1, 2, 2, 1, 256, 0, {60}, 0, 130, 0, false, false, 2,
                       {10000.0}},
                      seed + 7);
    run_cache<half_t>({"paged(bs5) D64 MQA8 split 4", 1, 1, 8, 1, 64, 64, {200}, 1, 256, 5, true, false, 4,
                       {10000.0}},
                      seed + 8);
    // Caller's tables (1.1 x the law's): the second sequence's positions 40..70 past a 40-row
    // table; a table longer than the cache (no clamp) under split-K; partial rotation, clamped
    // positions 150..200 and split-K on D 256.
    run_cache<half_t>({"table dense D64 GQA4 append 1 P=40", 2, 1, 8, 2, 64, 64, {5, 70}, 1, 96, 0, true, false, 1,
                       {10000.0}, 1.1, 40},
                      seed + 18);
    run_cache<bf16_t>({"table paged(bs16) D128 Sq3 il partial P=200", 2, 3, 4, 2, 128, 96, {0, 100}, 3, 112, 16, true,
                       true, 3, {10000.0}, 1.1, 200},
                      seed + 19);
    run_cache<half_t>({"table paged(bs5) D256 MQA4 partial P=150", 1, 1, 4, 1, 256, 128, {200}, 1, 256, 5, true, false,
                       4, {10000.0}, 1.1, 150},
                      seed + 20);
    run_rope<half_t>(64, 48, false, seed + 9);
    run_rope<bf16_t>(128, 128, true, seed + 10);
    run_rope<float>(10, 6, true, seed + 11);
    run_rope<float>(96, 32, false, seed + 12);
    run_rope<half_t>(64, 48, false, seed + 21, 20);
    run_rope<bf16_t>(128, 128, true, seed + 22, 20);
    run_rope<float>(10, 6, true, seed + 23, 20);
  } catch (const std::exception& e) {
    std::printf("FAIL (exception) %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::printf("%d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("all %d emulated CUDA kernel checks passed\n", checks);
  return 0;
}
