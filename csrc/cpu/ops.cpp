// The CPU implementations of the ropekern ops (schemas in csrc/bindings.cpp): op_args.h checks the
// arguments and fills the params; here the checks that read data on the host (cu_seqlens, cache
// bounds, block tables), the rotary tables, the choice of kernel unit (AMX, AVX-512, AVX2 or generic, by cpuid;
// NEON on aarch64),
// and threading through at::parallel_for.
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

#include <torch/library.h>


#include "../op_args.h"
#include "cpu_features.h"
#include "kernels.h"

namespace ropekern {
namespace cpu {
namespace {

// ROPEKERN_CPU_ISA = auto (default) | amx | avx512 | avx2 | generic (x86-64), auto | neon | generic
// (aarch64); read on every call so tests can switch. auto takes the widest unit this CPU and OS
// run; on aarch64 that is always neon (Advanced SIMD is part of the base ISA).
const Kernels& kernels() {
  const char* env = std::getenv("ROPEKERN_CPU_ISA");
  const std::string want = env ? env : "auto";
  if (want == "generic") return kGenericKernels;
#if defined(ROPEKERN_HAVE_AVX2_UNIT)
  if (want == "amx") {
    TORCH_CHECK(cpu_runs_amx(),
                "ROPEKERN_CPU_ISA=amx but this CPU lacks AMX-TILE/AMX-BF16 (or the avx512 unit's needs), or the OS "
                "does not enable the tile state for this process");
    return kAmxKernels;
  }
  if (want == "avx512") {
    TORCH_CHECK(cpu_runs_avx512(),
                "ROPEKERN_CPU_ISA=avx512 but this CPU lacks AVX-512F/BW/VL/DQ or the OS does not save the zmm "
                "registers (XCR0)");
    return kAvx512Kernels;
  }
  if (want == "avx2") {
    TORCH_CHECK(cpu_runs_avx2(), "ROPEKERN_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C or the OS does not save the ymm registers");
    return kAvx2Kernels;
  }
  TORCH_CHECK_VALUE(want == "auto" || want.empty(),
                    "ROPEKERN_CPU_ISA must be auto, amx, avx512, avx2 or generic, got ", want);
  if (cpu_runs_amx()) return kAmxKernels;
  if (cpu_runs_avx512()) return kAvx512Kernels;
  if (cpu_runs_avx2()) return kAvx2Kernels;
#elif defined(ROPEKERN_HAVE_NEON_UNIT)
  if (want == "neon") return kNeonKernels;
  TORCH_CHECK_VALUE(want == "auto" || want.empty(), "ROPEKERN_CPU_ISA must be auto, neon or generic here, got ", want);
  return kNeonKernels;
#else
  TORCH_CHECK_VALUE(want == "auto" || want.empty(), "ROPEKERN_CPU_ISA must be auto or generic here, got ", want);
#endif
  return kGenericKernels;
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

// Query rows per tiled item: G * block_m ~ kTileRows and a multiple of the unit's micro-kernel rows.
int choose_block_m(int G, int micro_rows) {
  int bm = std::max(1, (kTileRows + G - 1) / G);
  while ((bm * G) % micro_rows) ++bm;
  return bm;
}

// `flops`: the call's attention FLOPs (an upper bound is fine), for the thread count.
void run_tiled(const Kernels& kern, TiledPlan& plan, int64_t max_seqlen_q, double flops) {
  const int G = plan.p.num_heads / plan.p.num_heads_k;
  plan.block_m = choose_block_m(G, kern.micro_rows);
  plan.num_q_blocks = (max_seqlen_q + plan.block_m - 1) / plan.block_m;
  const int64_t items = static_cast<int64_t>(plan.p.batch) * plan.p.num_heads_k * plan.num_q_blocks;
  run_items(items, kern.tiled_scratch_floats(plan), flops, kMinFlopsPerThread,
            [&](int64_t item, float* scratch) { kern.tiled_item(plan, item, scratch); });
}

// What the CPU does with the filled params of each op (the ops themselves: op_args.h).
struct CpuDevice {
  static constexpr const char* kWho = "ropekern (cpu)";
  static constexpr bool kWindows = true;
  using DType = cpu::DType;

  static void check_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), kWho, ": `", name, "` must be a CPU tensor, got ", t.device());
  }

  // Varlen: the sequence bounds are read on the host; check them and size the work by the longest
  // (p.seqlen_q becomes the longest query sequence). Returns the longest key sequence (dense: Sk).
  static int64_t check_seqlens(args::AttnCall& c) {
    AttnParams& p = c.p;
    if (!c.varlen) return p.seqlen_k;
    const int64_t B = p.batch;
    const int32_t* cq = p.cu_seqlens_q;
    const int32_t* ck = p.cu_seqlens_k;
    TORCH_CHECK_VALUE(cq[0] == 0 && ck[0] == 0 && cq[B] == c.q.size(0) && ck[B] == c.k.size(0), kWho,
                      ": `cu_seqlens_q`/`cu_seqlens_k` must run from 0 to the token counts");
    int64_t longest = 0, longest_k = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], kWho, ": `cu_seqlens` must be non-decreasing");
      longest = std::max<int64_t>(longest, cq[b + 1] - cq[b]);
      longest_k = std::max<int64_t>(longest_k, ck[b + 1] - ck[b]);
    }
    TORCH_CHECK_VALUE(p.seqlen_q >= longest, kWho, ": `max_seqlen_q` (", p.seqlen_q,
                      ") is smaller than the longest query sequence (", longest, ")");
    p.seqlen_q = static_cast<int>(longest);
    return longest_k;
  }

  // K/V whose rows are not adjacent per head ([.., S, Hkv, D]: 64 rows of one head 2 KiB apart
  // alias into a few cache sets, and prefetching cannot keep up) are first copied head-major, in
  // their own dtype and un-rotated: one pass over K and V, +13% measured on the tile loop.
  static void head_major_kv(args::AttnCall& c) {
    AttnParams& p = c.p;
    const int kr = c.varlen ? 0 : 1;  // row dimension
    if (c.k.stride(kr) == p.head_dim && c.v.stride(kr) == p.head_dim) return;
    c.k = c.k.transpose(kr, kr + 1).contiguous().transpose(kr, kr + 1);
    c.v = c.v.transpose(kr, kr + 1).contiguous().transpose(kr, kr + 1);
    args::set_view(c.k, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    args::set_view(c.v, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  }

  // The cos/sin rows of every query and key (empty when rotation is off), and K/V head-major.
  static std::pair<at::Tensor, at::Tensor> rope_tables(const Kernels& kern, args::AttnCall& c) {
    const AttnParams& p = c.p;
    const int64_t B = p.batch, Sq = p.seqlen_q, Sk = p.seqlen_k;
    const int64_t q_rows = c.varlen ? c.q.size(0) : B * Sq;
    const int64_t k_rows = c.varlen ? c.k.size(0) : B * Sk;
    const int batch = static_cast<int>(B);
    at::Tensor q_cs = cos_sin_table(kern, p.rope, p.q_pos, p.cu_seqlens_q, Sq, q_rows, batch);
    at::Tensor k_cs = cos_sin_table(kern, p.rope, p.k_pos, p.cu_seqlens_k, Sk, k_rows, batch);
    head_major_kv(c);
    return {q_cs, k_cs};
  }

  static void attention(args::AttnCall& c, DType dtype) {
    AttnParams& p = c.p;
    check_seqlens(c);
    const at::Tensor &q = c.q, &k = c.k;
    const int64_t B = p.batch, D = p.head_dim, Sq = p.seqlen_q, Sk = p.seqlen_k;
    if (q.numel() == 0) return;
    if (k.numel() == 0) {  // no keys at all: zeros and LSE -inf (docs/design.md §2)
      c.out.zero_();
      c.lse.fill_(-std::numeric_limits<float>::infinity());
      return;
    }
    const Kernels& kern = kernels();
    const int64_t q_rows = c.varlen ? q.size(0) : B * Sq;
    const auto [q_cs, k_cs] = rope_tables(kern, c);
    TiledPlan plan;
    plan.p = p;
    plan.dtype = dtype;
    plan.q_cs = q_cs.defined() ? q_cs.data_ptr<float>() : nullptr;
    plan.k_cs = k_cs.defined() ? k_cs.data_ptr<float>() : nullptr;
    plan.k_cs_rows = Sk;
    const double tokens_q = static_cast<double>(q_rows);
    run_tiled(kern, plan, Sq, 4.0 * tokens_q * p.num_heads * static_cast<double>(Sk) * D);
  }

  // Gradients of `attention` (kernels.h: BwdPlan): the prep rows, the items (dK, dV and the
  // splits' partial sums of dQ), then the dq rows; each output row is written by exactly one task.
  static void backward(args::BwdCall& c, DType dtype) {
    args::AttnCall& a = c.a;
    AttnParams& p = a.p;
    const int64_t longest_k = check_seqlens(a);
    const at::Tensor &q = a.q, &k = a.k;
    const int64_t B = p.batch, D = p.head_dim, Sq = p.seqlen_q, Sk = p.seqlen_k;
    if (q.numel() == 0 || k.numel() == 0) {  // no query sees a key: every gradient is 0
      c.dq.zero_();
      c.dk.zero_();
      c.dv.zero_();
      return;
    }
    const Kernels& kern = kernels();
    const int64_t q_rows = a.varlen ? q.size(0) : B * Sq;
    const auto [q_cs, k_cs] = rope_tables(kern, a);
    at::Tensor delta = at::empty_like(c.lse), lse2 = at::empty_like(c.lse);
    BwdPlan plan;
    plan.p = p;
    plan.dtype = dtype;
    args::set_view(c.dout, plan.dout, plan.do_batch_stride, plan.do_row_stride, plan.do_head_stride);
    plan.dlse = c.dlse.defined() ? c.dlse.data_ptr<float>() : nullptr;
    args::set_view(c.dq, plan.dq, plan.dq_batch_stride, plan.dq_row_stride, plan.dq_head_stride);
    args::set_view(c.dk, plan.dk, plan.dk_batch_stride, plan.dk_row_stride, plan.dk_head_stride);
    plan.dv = c.dv.data_ptr();
    plan.delta = delta.data_ptr<float>();
    plan.lse2 = lse2.data_ptr<float>();
    plan.q_cs = q_cs.defined() ? q_cs.data_ptr<float>() : nullptr;
    plan.k_cs = k_cs.defined() ? k_cs.data_ptr<float>() : nullptr;
    const int64_t G = p.num_heads / p.num_heads_k, Hkv = p.num_heads_k, Dp = head_dim_pad_of(static_cast<int>(D));
    plan.block_m = choose_block_m(static_cast<int>(G), kern.micro_rows);
    plan.q_rows = q_rows;
    // Splits of the key blocks: enough items for 8 threads, at most one per block, and partial sums
    // of dQ' (one fp32 copy of dq each) within 128 MiB unless one copy is larger. A function of
    // the shape alone, so the gradients are the same for any thread count.
    const int64_t k_blocks = (longest_k + kBwdBlockN - 1) / kBwdBlockN;
    const int64_t copy_bytes = q_rows * p.num_heads * Dp * static_cast<int64_t>(sizeof(float));
    int64_t splits = std::min<int64_t>((8 + B * Hkv - 1) / (B * Hkv), std::max<int64_t>(k_blocks, 1));
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, (int64_t{128} << 20) / std::max<int64_t>(copy_bytes, 1)));
    plan.num_splits = static_cast<int>(splits);
    at::Tensor dq_part = at::zeros({splits * copy_bytes / static_cast<int64_t>(sizeof(float))}, at::kFloat);
    plan.dq_part = dq_part.data_ptr<float>();
    // ~D flops per row: 4096 rows per task keep short calls on one thread.
    at::parallel_for(0, c.lse.numel(), 4096, [&](int64_t b, int64_t e) { kern.bwd_prep_rows(plan, b, e); });
    // Five products of the forward's two: ~2.5x its flops (4 a score channel).
    const double scores = static_cast<double>(q_rows) * p.num_heads * static_cast<double>(Sk) * D;
    run_items(B * Hkv * splits, kern.bwd_scratch_floats(plan), 10.0 * scores, kMinFlopsPerThread,
              [&](int64_t item, float* buf) { kern.bwd_item(plan, item, buf); });
    at::parallel_for(0, Hkv * q_rows, 256, [&](int64_t b, int64_t e) { kern.bwd_dq_rows(plan, b, e); });
  }

  static void kvcache(args::CacheCall& c, DType dtype, int64_t num_splits) {
    DecodeParams& p = c.p;
    const at::Tensor& q = c.q;
    const int64_t B = p.batch, Sq = p.seqlen_q, Hq = p.num_heads, Hkv = p.num_heads_k, D = p.head_dim;
    const int64_t s_new = p.s_new;
    const int64_t block_size = c.k_cache.size(1);
    // Bounds: every key the kernel reads or writes must lie inside the cache.
    const int32_t* l0 = p.cache_seqlens;
    std::vector<int32_t> lens(B);
    int64_t n_max = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = static_cast<int64_t>(l0[b]) + s_new;
      TORCH_CHECK_VALUE(l0[b] >= 0 && n <= c.capacity, kWho, ": sequence ", b, ": cache_seqlens ", l0[b], " + ", s_new,
                        " new tokens does not fit the cache capacity ", c.capacity);
      lens[b] = static_cast<int32_t>(n);
      n_max = std::max(n_max, n);
      if (c.paged) {
        const int32_t* row = p.block_table + b * p.block_table_batch_stride;
        for (int64_t t = 0; t < (n + block_size - 1) / block_size; ++t)
          TORCH_CHECK_VALUE(row[t] >= 0 && row[t] < c.k_cache.size(0), kWho, ": `block_table[", b, "]` refers to ",
                            "block ", row[t], " outside [0, ", c.k_cache.size(0), ")");
      }
    }
    append(c);
    if (q.numel() == 0) return;
    const Kernels& kern = kernels();
    const int64_t G = Hq / Hkv;

    // Few query rows per KV head (decode, speculative decoding): the split-K decode kernel, which
    // computes each chunk's cos/sin once for all heads. Many (chunked prefill): the tiled kernel.
    constexpr int64_t kDecodeMaxGroupRows = 64;
    if (G * Sq <= kDecodeMaxGroupRows) {
      DecodePlan plan;
      plan.p = p;
      plan.dtype = dtype;
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
      return;
    }

    // Tiled path over the cache: queries at positions max(n_b - Sq + i, 0), keys j = 0..n_b-1.
    at::Tensor lens_t = at::from_blob(lens.data(), {B}, at::kInt).clone();
    at::Tensor q_pos =
        (lens_t.unsqueeze(1) - Sq + at::arange(Sq, at::kInt).unsqueeze(0)).clamp_min(0).to(at::kInt).contiguous();
    const int batch = static_cast<int>(B);
    const at::Tensor q_cs = cos_sin_table(kern, p.rope, q_pos.data_ptr<int32_t>(), nullptr, Sq, B * Sq, batch);
    const at::Tensor k_cs = cos_sin_table(kern, p.rope, nullptr, nullptr, n_max, B * n_max, batch);
    TiledPlan plan;
    AttnParams& a = plan.p;
    plan.dtype = dtype;
    args::set_q_out_lse(a, q, c.out, c.lse);
    args::set_view(c.k_cache, a.k, a.k_batch_stride, a.k_row_stride, a.k_head_stride);
    args::set_view(c.v_cache, a.v, a.v_batch_stride, a.v_row_stride, a.v_head_stride);
    args::set_shape(a, B, Sq, Hq, Hkv, D, p.softmax_scale, p.causal, p.rope, kWho);
    a.window_left = p.window_left;
    a.window_right = p.window_right;
    a.seqlen_k = static_cast<int>(n_max);
    plan.cache_lens = lens_t.data_ptr<int32_t>();
    plan.block_table = p.block_table;
    plan.block_table_stride = p.block_table_batch_stride;
    plan.block_size = static_cast<int>(block_size);
    plan.q_cs = q_cs.defined() ? q_cs.data_ptr<float>() : nullptr;
    plan.k_cs = k_cs.defined() ? k_cs.data_ptr<float>() : nullptr;
    plan.k_cs_rows = n_max;
    run_tiled(kern, plan, Sq, 4.0 * B * Sq * Hq * static_cast<double>(n_max) * D);
  }

  // Append the new tokens, un-rotated, in place (docs/design.md §2: keys are rotated on every read).
  static void append(const args::CacheCall& c) {
    const DecodeParams& p = c.p;
    const int64_t s_new = p.s_new;
    if (s_new == 0) return;
    const at::Tensor &k_cache = c.k_cache, &v_cache = c.v_cache, &kn = *c.k_new, &vn = *c.v_new;
    const int64_t es = c.q.element_size(), Hkv = p.num_heads_k, block_size = k_cache.size(1);
    const size_t row_bytes = static_cast<size_t>(p.head_dim) * es;
    char* kc = static_cast<char*>(k_cache.data_ptr());
    char* vc = static_cast<char*>(v_cache.data_ptr());
    const char* kp = static_cast<const char*>(kn.data_ptr());
    const char* vp = static_cast<const char*>(vn.data_ptr());
    const int32_t* bt = p.block_table;
    const int64_t bts = p.block_table_batch_stride;
    at::parallel_for(0, p.batch * s_new, 256, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / s_new, t = idx % s_new, j = p.cache_seqlens[b] + t;
        const int64_t kcache_row = bt ? bt[b * bts + j / block_size] * k_cache.stride(0) + (j % block_size) * k_cache.stride(1)
                                      : b * k_cache.stride(0) + j * k_cache.stride(1);
        const int64_t vcache_row = bt ? bt[b * bts + j / block_size] * v_cache.stride(0) + (j % block_size) * v_cache.stride(1)
                                      : b * v_cache.stride(0) + j * v_cache.stride(1);
        for (int64_t h = 0; h < Hkv; ++h) {
          std::memcpy(kc + (kcache_row + h * k_cache.stride(2)) * es,
                      kp + (b * kn.stride(0) + t * kn.stride(1) + h * kn.stride(2)) * es, row_bytes);
          std::memcpy(vc + (vcache_row + h * v_cache.stride(2)) * es,
                      vp + (b * vn.stride(0) + t * vn.stride(1) + h * vn.stride(2)) * es, row_bytes);
        }
      }
    });
  }

  static void rope(args::RopeCall& c, DType dtype) {
    const Kernels& kern = kernels();
    RopeJob job;
    job.dtype = dtype;
    args::set_view(c.x4, job.x, job.x_batch_stride, job.x_row_stride, job.x_head_stride);
    args::set_view(c.out4, job.out, job.o_batch_stride, job.o_row_stride, job.o_head_stride);
    job.positions = c.pos.data_ptr<int32_t>();
    job.batch = static_cast<int>(c.x4.size(0));
    job.seqlen = static_cast<int>(c.x4.size(1));
    job.num_heads = static_cast<int>(c.x4.size(2));
    job.head_dim = static_cast<int>(c.x4.size(3));
    job.rope = c.rope;
    const int64_t scratch = kern.rope_scratch_floats(job);
    // One cos/sin row per token serves all H heads; ~256 tokens (~0.1 ms) per task.
    at::parallel_for(0, static_cast<int64_t>(job.batch) * job.seqlen, 256, [&](int64_t b, int64_t e) {
      Scratch buf(scratch);
      kern.rope_rows(job, b, e, buf.ptr);
    });
  }
};

}  // namespace

const char* active_isa() { return kernels().name; }

std::string isa_reason() {
  const char* env = std::getenv("ROPEKERN_CPU_ISA");
  const std::string want = env ? env : "auto";
  const std::string name = kernels().name;  // raises on a bad or unsupported ROPEKERN_CPU_ISA
  if (want != "auto" && !want.empty()) return "forced by ROPEKERN_CPU_ISA=" + want;
#if defined(ROPEKERN_HAVE_AVX2_UNIT)
  if (name == "amx")
    return "auto: cpuid reports AVX-512F/BW/VL/DQ and AMX-TILE/BF16, the OS saves the zmm and tile state (XCR0) "
           "and grants the tile data";
  if (name == "avx512")
    return "auto: cpuid reports AVX-512F/BW/VL/DQ and the OS saves the zmm registers (XCR0); AMX-BF16 tiles "
           "missing or not granted";
  if (name == "avx2")
    return "auto: cpuid reports AVX2/FMA/F16C; AVX-512F/BW/VL/DQ missing or the zmm registers not saved by the OS";
  return "auto: no AVX2/FMA/F16C in cpuid, or the ymm registers not saved by the OS";
#elif defined(ROPEKERN_HAVE_NEON_UNIT)
  return "auto: aarch64, where NEON (Advanced SIMD) is part of the base ISA, so every CPU runs the neon unit";
#else
  return "auto: the only unit built for this architecture";
#endif
}

ROPEKERN_REGISTER_OPS(CPU, CpuDevice)
ROPEKERN_REGISTER_BWD(CPU, CpuDevice)

}  // namespace cpu
}  // namespace ropekern
