// Torch glue for the CPU kernels: argument checks, output allocation, the rotary tables, the choice
// of kernel unit (AVX2 or generic, by cpuid), and threading through at::parallel_for.
//
// ropekern/_validation.py has already checked user inputs with readable errors; the checks here
// guard direct calls of torch.ops.ropekern.* against memory errors (shapes, dtypes, cache bounds).
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../op_args.h"
#include "kernels.h"

namespace ropekern {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(ROPEKERN_HAVE_AVX2_UNIT) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// ROPEKERN_CPU_ISA = auto (default) | avx2 | generic; read on every call so tests can switch.
const Kernels& kernels() {
  const char* env = std::getenv("ROPEKERN_CPU_ISA");
  const std::string want = env ? env : "auto";
  if (want == "generic") return kGenericKernels;
#if defined(ROPEKERN_HAVE_AVX2_UNIT)
  if (want == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "ROPEKERN_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
    return kAvx2Kernels;
  }
  TORCH_CHECK_VALUE(want == "auto" || want.empty(), "ROPEKERN_CPU_ISA must be auto, avx2 or generic, got ", want);
  if (cpu_has_avx2()) return kAvx2Kernels;
#else
  TORCH_CHECK_VALUE(want == "auto" || want.empty(), "ROPEKERN_CPU_ISA must be auto or generic here, got ", want);
#endif
  return kGenericKernels;
}

constexpr const char* kWho = "ropekern (cpu)";

// The first tensor argument (q, x) must be on the CPU; every other one on its device.
DType cpu_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kWho, ": `", name, "` must be a CPU tensor, got ", t.device());
  return args::dtype_of<DType>(t, name, kWho);
}

// A 64-byte aligned fp32 buffer private to one thread.
struct Scratch {
  float* ptr = nullptr;
  explicit Scratch(int64_t floats) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(floats, 16)) * sizeof(float) + 63) / 64 * 64;
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(ptr != nullptr, "ropekern (cpu): cannot allocate ", bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Items of very different cost (causal tiles, splits): one slot per thread pulls the next item
// from an atomic counter, so a static split of the range never leaves a thread idle. Threads are
// used only for at least `min_work` units of `work` each: waking a second thread costs ~0.1 ms on
// an idle machine and up to a scheduler slice (measured 30 ms) on a busy one, which a 64-token
// prefill (0.4 ms on one thread) must not pay.
template <class F>
void run_items(int64_t n_items, int64_t scratch_floats, double work, double min_work, const F& fn) {
  if (n_items <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t by_work = std::max<int64_t>(1, static_cast<int64_t>(work / min_work));
  const int64_t slots = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n_items, by_work});
  at::parallel_for(0, slots, 1, [&](int64_t, int64_t) {
    Scratch scratch(scratch_floats);
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) fn(i, scratch.ptr);
  });
}

// Minimum work per thread (see run_items): ~0.5 ms of one core.
constexpr double kMinFlopsPerThread = 3e7;
constexpr double kMinBytesPerThread = 4e6;

// Expanded cos/sin rows (kernels.h) for `n_rows` rows; empty when rotation is off.
at::Tensor cos_sin_table(const Kernels& kern, const RopeParams& rope, const int32_t* positions, const int32_t* cu_rows,
                         int64_t rows_per_batch, int64_t n_rows, int batch) {
  if (rope.rotary_dim == 0 || n_rows == 0) return at::Tensor();
  at::Tensor table = at::empty({n_rows, 2 * cs_pad_of(rope.rotary_dim)}, at::kFloat);
  CosSinJob job;
  job.positions = positions;
  job.cu_rows = cu_rows;
  job.rows_per_batch = std::max<int64_t>(rows_per_batch, 1);
  job.n_rows = n_rows;
  job.batch = batch;
  job.rope = rope;
  job.out = table.data_ptr<float>();
  // ~0.1 us per row (64 pairs): 2048 rows per task, so short calls stay on one thread.
  at::parallel_for(0, n_rows, 2048, [&](int64_t b, int64_t e) { kern.cos_sin_rows(job, b, e); });
  return table;
}

// Query rows per tiled item: G * block_m ~ kTileRows and a multiple of the 6-row micro-kernel.
int choose_block_m(int G) {
  int bm = std::max(1, (kTileRows + G - 1) / G);
  while ((bm * G) % 6) ++bm;
  return bm;
}

// `flops`: the call's attention FLOPs (an upper bound is fine), for the thread count.
void run_tiled(const Kernels& kern, TiledPlan& plan, int64_t max_seqlen_q, double flops) {
  const int G = plan.p.num_heads / plan.p.num_heads_k;
  plan.block_m = choose_block_m(G);
  plan.num_q_blocks = (max_seqlen_q + plan.block_m - 1) / plan.block_m;
  const int64_t items = static_cast<int64_t>(plan.p.batch) * plan.p.num_heads_k * plan.num_q_blocks;
  run_items(items, kern.tiled_scratch_floats(plan), flops, kMinFlopsPerThread,
            [&](int64_t item, float* scratch) { kern.tiled_item(plan, item, scratch); });
}

}  // namespace

const char* active_isa() { return kernels().name; }

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& q_pos, const at::Tensor& k_pos, const at::Tensor& freqs,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, int64_t rotary_dim, bool interleaved,
                                       double attention_factor, bool causal, double softmax_scale) {
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK_VALUE(varlen == cu_seqlens_k.has_value(),
                    "ropekern (cpu): `cu_seqlens_q` and `cu_seqlens_k` must be given together");
  const int64_t dim = varlen ? 3 : 4;
  const DType dtype = cpu_input(q, "q");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}})
    args::check_float(t, name, dim, q.scalar_type(), q, kWho);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "ropekern (cpu): `k` shape ", k.sizes(), " differs from `v` ", v.sizes());
  const int64_t D = q.size(-1), Hq = q.size(-2), Hkv = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == D, "ropekern (cpu): head dim of `k` (", k.size(-1), ") differs from `q` (", D, ")");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "ropekern (cpu): query heads (", Hq,
                    ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(softmax_scale == softmax_scale, "ropekern (cpu): `softmax_scale` is NaN");

  int64_t B, Sq, Sk;
  at::Tensor cu_q, cu_k;
  if (varlen) {
    B = cu_seqlens_q->numel() - 1;
    TORCH_CHECK_VALUE(B >= 0, "ropekern (cpu): `cu_seqlens_q` must have shape [batch + 1]");
    cu_q = args::int32_arg(*cu_seqlens_q, "cu_seqlens_q", {B + 1}, q, kWho);
    cu_k = args::int32_arg(*cu_seqlens_k, "cu_seqlens_k", {B + 1}, q, kWho);
    const int32_t* cq = cu_q.data_ptr<int32_t>();
    const int32_t* ck = cu_k.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(cq[0] == 0 && ck[0] == 0 && cq[B] == q.size(0) && ck[B] == k.size(0),
                      "ropekern (cpu): `cu_seqlens_q`/`cu_seqlens_k` must run from 0 to the token counts");
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], "ropekern (cpu): `cu_seqlens` must be non-decreasing");
      longest = std::max<int64_t>(longest, cq[b + 1] - cq[b]);
    }
    TORCH_CHECK_VALUE(max_seqlen_q >= longest, "ropekern (cpu): `max_seqlen_q` (", max_seqlen_q,
                      ") is smaller than the longest query sequence (", longest, ")");
    Sq = longest;
    Sk = max_seqlen_k;
  } else {
    B = q.size(0);
    Sq = q.size(1);
    Sk = k.size(1);
    TORCH_CHECK_VALUE(k.size(0) == B, "ropekern (cpu): batch of `k` (", k.size(0), ") differs from `q` (", B, ")");
  }
  const at::Tensor qp = varlen ? args::int32_arg(q_pos, "q_pos", {q.size(0)}, q, kWho)
                               : args::int32_arg(q_pos, "q_pos", {B, Sq}, q, kWho);
  const at::Tensor kp = varlen ? args::int32_arg(k_pos, "k_pos", {k.size(0)}, q, kWho)
                               : args::int32_arg(k_pos, "k_pos", {B, Sk}, q, kWho);
  const RopeParams rope = args::rope_params(freqs, rotary_dim, interleaved, attention_factor, D, B, q, kWho);

  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = varlen ? at::empty({Hq, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.numel() == 0) {  // no keys at all: zeros and LSE -inf (docs/design.md §2)
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const Kernels& kern = kernels();
  const int64_t q_rows = varlen ? q.size(0) : B * Sq;
  const int64_t k_rows = varlen ? k.size(0) : B * Sk;
  const int32_t* cq = varlen ? cu_q.data_ptr<int32_t>() : nullptr;
  const int32_t* ck = varlen ? cu_k.data_ptr<int32_t>() : nullptr;
  const at::Tensor q_cs = cos_sin_table(kern, rope, qp.data_ptr<int32_t>(), cq, Sq, q_rows, static_cast<int>(B));
  const at::Tensor k_cs = cos_sin_table(kern, rope, kp.data_ptr<int32_t>(), ck, Sk, k_rows, static_cast<int>(B));

  // K/V whose rows are not adjacent per head ([.., S, Hkv, D]: 64 rows of one head 2 KiB apart
  // alias into a few cache sets, and prefetching cannot keep up) are first copied head-major, in
  // their own dtype and un-rotated: one pass over K and V, +13% measured on the tile loop.
  const int kr = varlen ? 0 : 1;  // row dimension
  const bool repack = k.stride(kr) != D || v.stride(kr) != D;
  const at::Tensor kk = repack ? k.transpose(kr, kr + 1).contiguous().transpose(kr, kr + 1) : k;
  const at::Tensor vv = repack ? v.transpose(kr, kr + 1).contiguous().transpose(kr, kr + 1) : v;

  TiledPlan plan;
  AttnParams& p = plan.p;
  plan.dtype = dtype;
  args::set_q_out_lse(p, q, out, lse);
  p.k = kk.data_ptr();
  p.v = vv.data_ptr();
  args::set_strides(kk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  args::set_strides(vv, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  p.cu_seqlens_q = cq;
  p.cu_seqlens_k = ck;
  args::set_shape(p, B, Sq, Hq, Hkv, D, softmax_scale, causal, rope, kWho);
  p.seqlen_k = static_cast<int>(Sk);
  plan.q_cs = q_cs.defined() ? q_cs.data_ptr<float>() : nullptr;
  plan.k_cs = k_cs.defined() ? k_cs.data_ptr<float>() : nullptr;
  plan.k_cs_rows = Sk;
  const double tokens_q = varlen ? static_cast<double>(q.size(0)) : static_cast<double>(B) * Sq;
  run_tiled(kern, plan, Sq, 4.0 * tokens_q * Hq * static_cast<double>(Sk) * D);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                               const std::optional<at::Tensor>& k_new,
                                               const std::optional<at::Tensor>& v_new,
                                               const std::optional<at::Tensor>& block_table, const at::Tensor& freqs,
                                               int64_t rotary_dim, bool interleaved, double attention_factor,
                                               bool causal, double softmax_scale, int64_t num_splits) {
  const DType dtype = cpu_input(q, "q");
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{q, "q"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}})
    args::check_float(t, name, 4, q.scalar_type(), q, kWho);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "ropekern (cpu): `k_cache` shape ", k_cache.sizes(),
                    " differs from `v_cache` ", v_cache.sizes());
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "ropekern (cpu): head dim of `k_cache` differs from `q`");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "ropekern (cpu): query heads (", Hq,
                    ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "ropekern (cpu): `k_new` and `v_new` go together");
  const bool paged = block_table.has_value();
  const int64_t block_size = k_cache.size(1);
  int64_t s_new = 0;
  if (k_new) {
    args::check_float(*k_new, "k_new", 4, q.scalar_type(), q, kWho);
    args::check_float(*v_new, "v_new", 4, q.scalar_type(), q, kWho);
    TORCH_CHECK_VALUE(k_new->sizes() == v_new->sizes() && k_new->size(0) == B && k_new->size(2) == Hkv &&
                          k_new->size(3) == D,
                      "ropekern (cpu): `k_new`/`v_new` must have shape [", B, ", S_new, ", Hkv, ", ", D, "]");
    s_new = k_new->size(1);
  }
  const at::Tensor lens0 = args::int32_arg(cache_seqlens, "cache_seqlens", {B}, q, kWho);
  at::Tensor btab;
  int64_t capacity = k_cache.size(1);
  if (paged) {
    args::check_same_device(*block_table, "block_table", q, kWho);
    TORCH_CHECK_TYPE(block_table->scalar_type() == at::kInt, "ropekern (cpu): `block_table` must be int32");
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == B,
                      "ropekern (cpu): `block_table` must have shape [", B, ", max_blocks], got ",
                      block_table->sizes());
    btab = block_table->contiguous();
    capacity = btab.size(1) * block_size;
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, "ropekern (cpu): dense `k_cache` batch (", k_cache.size(0),
                      ") differs from `q` batch (", B, ")");
  }
  // Bounds: every key the kernel reads or writes must lie inside the cache.
  const int32_t* l0 = lens0.data_ptr<int32_t>();
  std::vector<int32_t> lens(B);
  int64_t n_max = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = static_cast<int64_t>(l0[b]) + s_new;
    TORCH_CHECK_VALUE(l0[b] >= 0 && n <= capacity, "ropekern (cpu): sequence ", b, ": cache_seqlens ", l0[b], " + ",
                      s_new, " new tokens does not fit the cache capacity ", capacity);
    TORCH_CHECK_VALUE(n >= Sq, "ropekern (cpu): sequence ", b, " holds ", n, " keys but has ", Sq, " queries");
    lens[b] = static_cast<int32_t>(n);
    n_max = std::max(n_max, n);
    if (paged) {
      const int32_t* row = btab.data_ptr<int32_t>() + b * btab.size(1);
      for (int64_t t = 0; t < (n + block_size - 1) / block_size; ++t)
        TORCH_CHECK_VALUE(row[t] >= 0 && row[t] < k_cache.size(0), "ropekern (cpu): `block_table[", b, "]` refers to ",
                          "block ", row[t], " outside [0, ", k_cache.size(0), ")");
    }
  }
  const RopeParams rope = args::rope_params(freqs, rotary_dim, interleaved, attention_factor, D, B, q, kWho);

  // Append the new tokens, un-rotated, in place (docs/design.md §2: keys are rotated on every read).
  if (s_new > 0) {
    const size_t row_bytes = static_cast<size_t>(D) * q.element_size();
    const at::Tensor kn = *k_new, vn = *v_new;
    char* kc = static_cast<char*>(k_cache.data_ptr());
    char* vc = static_cast<char*>(v_cache.data_ptr());
    const char* kp = static_cast<const char*>(kn.data_ptr());
    const char* vp = static_cast<const char*>(vn.data_ptr());
    const int64_t es = q.element_size();
    const int32_t* bt = paged ? btab.data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, B * s_new, 256, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / s_new, t = idx % s_new, j = l0[b] + t;
        const int64_t cache_row = paged ? bt[b * btab.size(1) + j / block_size] * k_cache.stride(0) +
                                              (j % block_size) * k_cache.stride(1)
                                        : b * k_cache.stride(0) + j * k_cache.stride(1);
        const int64_t vcache_row = paged ? bt[b * btab.size(1) + j / block_size] * v_cache.stride(0) +
                                               (j % block_size) * v_cache.stride(1)
                                         : b * v_cache.stride(0) + j * v_cache.stride(1);
        for (int64_t h = 0; h < Hkv; ++h) {
          std::memcpy(kc + (cache_row + h * k_cache.stride(2)) * es,
                      kp + (b * kn.stride(0) + t * kn.stride(1) + h * kn.stride(2)) * es, row_bytes);
          std::memcpy(vc + (vcache_row + h * v_cache.stride(2)) * es,
                      vp + (b * vn.stride(0) + t * vn.stride(1) + h * vn.stride(2)) * es, row_bytes);
        }
      }
    });
  }

  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const Kernels& kern = kernels();
  const int64_t G = Hq / Hkv;

  // Few query rows per KV head (decode, speculative decoding): the split-K decode kernel, which
  // computes each chunk's cos/sin once for all heads. Many (chunked prefill): the tiled kernel.
  constexpr int64_t kDecodeMaxGroupRows = 64;
  if (G * Sq <= kDecodeMaxGroupRows) {
    DecodePlan plan;
    DecodeParams& p = plan.p;
    plan.dtype = dtype;
    args::set_q_out_lse(p, q, out, lse);
    p.k_cache = k_cache.data_ptr();
    p.v_cache = v_cache.data_ptr();
    args::set_strides(k_cache, p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
    args::set_strides(v_cache, p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
    p.cache_seqlens = l0;
    p.block_table = paged ? btab.data_ptr<int32_t>() : nullptr;
    p.block_table_batch_stride = paged ? btab.size(1) : 0;
    p.block_size = static_cast<int>(block_size);
    args::set_shape(p, B, Sq, Hq, Hkv, D, softmax_scale, causal, rope, kWho);
    p.s_new = static_cast<int>(s_new);
    // Split the keys so that there are ~4 items per thread, each of at least 16 chunks (256 keys)
    // to amortise the query setup and the merge; an explicit num_splits > 0 is honoured.
    const int64_t chunks = std::max<int64_t>(1, (n_max + kDecodeChunk - 1) / kDecodeChunk);
    int64_t splits;
    if (num_splits > 0) {
      splits = std::min(num_splits, chunks);
    } else {
      splits = std::max<int64_t>(1, (4 * at::get_num_threads() + B - 1) / B);
      splits = std::min(splits, std::max<int64_t>(1, chunks / 16));
    }
    const int64_t chunks_per_split = (chunks + splits - 1) / splits;
    plan.split_len = chunks_per_split * kDecodeChunk;
    plan.num_splits = static_cast<int>((chunks + chunks_per_split - 1) / chunks_per_split);
    const int64_t Dp = head_dim_pad_of(static_cast<int>(D));
    at::Tensor partial = at::empty({B * plan.num_splits * Hq * Sq * (Dp + 2)}, at::kFloat);
    plan.partial = partial.data_ptr<float>();
    const double kv_bytes = 2.0 * B * static_cast<double>(n_max) * Hkv * D * q.element_size();
    run_items(B * plan.num_splits, kern.decode_scratch_floats(plan), kv_bytes, kMinBytesPerThread,
              [&](int64_t item, float* scratch) { kern.decode_item(plan, item, scratch); });
    at::parallel_for(0, B * Hq * Sq, 256, [&](int64_t b, int64_t e) { kern.decode_merge(plan, b, e); });
    return {out, lse};
  }

  // Tiled path over the cache: queries at positions n_b - Sq + i, keys j = 0..n_b-1.
  at::Tensor lens_t = at::from_blob(lens.data(), {B}, at::kInt).clone();
  at::Tensor q_pos = (lens_t.unsqueeze(1) - Sq + at::arange(Sq, at::kInt).unsqueeze(0)).to(at::kInt).contiguous();
  const at::Tensor q_cs =
      cos_sin_table(kern, rope, q_pos.data_ptr<int32_t>(), nullptr, Sq, B * Sq, static_cast<int>(B));
  const at::Tensor k_cs = cos_sin_table(kern, rope, nullptr, nullptr, n_max, B * n_max, static_cast<int>(B));
  TiledPlan plan;
  AttnParams& p = plan.p;
  plan.dtype = dtype;
  args::set_q_out_lse(p, q, out, lse);
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  args::set_strides(k_cache, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  args::set_strides(v_cache, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  args::set_shape(p, B, Sq, Hq, Hkv, D, softmax_scale, causal, rope, kWho);
  p.seqlen_k = static_cast<int>(n_max);
  plan.cache_lens = lens_t.data_ptr<int32_t>();
  plan.block_table = paged ? btab.data_ptr<int32_t>() : nullptr;
  plan.block_table_stride = paged ? btab.size(1) : 0;
  plan.block_size = static_cast<int>(block_size);
  plan.q_cs = q_cs.defined() ? q_cs.data_ptr<float>() : nullptr;
  plan.k_cs = k_cs.defined() ? k_cs.data_ptr<float>() : nullptr;
  plan.k_cs_rows = n_max;
  run_tiled(kern, plan, Sq, 4.0 * B * Sq * Hq * static_cast<double>(n_max) * D);
  return {out, lse};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& freqs, int64_t rotary_dim,
                      bool interleaved, double attention_factor) {
  const DType dtype = cpu_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, "ropekern (cpu): `x` must be [B, S, H, D] or [T, H, D], got ",
                    x.sizes());
  args::check_float(x, "x", x.dim(), x.scalar_type(), x, kWho);
  const bool packed = x.dim() == 3;
  const int64_t B = packed ? 1 : x.size(0), S = x.size(-3), H = x.size(-2), D = x.size(-1);
  const at::Tensor pos = packed ? args::int32_arg(positions, "positions", {S}, x, kWho)
                                : args::int32_arg(positions, "positions", {B, S}, x, kWho);
  const RopeParams rope = args::rope_params(freqs, rotary_dim, interleaved, attention_factor, D, B, x, kWho);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  const Kernels& kern = kernels();
  RopeJob job;
  job.x = x.data_ptr();
  job.out = out.data_ptr();
  job.dtype = dtype;
  args::set_strides(x, job.x_batch_stride, job.x_row_stride, job.x_head_stride);
  args::set_strides(out, job.o_batch_stride, job.o_row_stride, job.o_head_stride);
  job.positions = pos.data_ptr<int32_t>();
  job.batch = static_cast<int>(B);
  job.seqlen = static_cast<int>(S);
  job.num_heads = static_cast<int>(H);
  job.head_dim = static_cast<int>(D);
  job.rope = rope;
  const int64_t scratch = kern.rope_scratch_floats(job);
  // One cos/sin row per token serves all H heads; ~256 tokens (~0.1 ms) per task.
  at::parallel_for(0, B * S, 256, [&](int64_t b, int64_t e) {
    Scratch buf(scratch);
    kern.rope_rows(job, b, e, buf.ptr);
  });
  return out;
}

}  // namespace cpu
}  // namespace ropekern
