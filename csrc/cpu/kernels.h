// Interface between the torch glue (ops.cpp) and the CPU kernel units, which are compiled once per
// instruction set (kernels_amx.cpp with AVX-512 and the AMX-BF16 tiles, kernels_avx512.cpp with
// AVX-512F/BW/VL, kernels_avx2.cpp with AVX2/FMA/F16C, kernels_neon.cpp on aarch64,
// kernels_generic.cpp for any CPU) and chosen at run time. Torch-free: raw pointers, the shared POD
// params of params.h, and a few CPU-only plan fields (precomputed rotary tables, block sizes,
// split-K buffers).
//
// Work is cut into independent items (ops.cpp hands them to threads through at::parallel_for and
// an atomic counter); each item gets a private fp32 scratch buffer of *_scratch_floats() floats.
#pragma once

#include <stdint.h>

#include "ropekern/params.h"

namespace ropekern {
namespace cpu {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Tile sizes. A K/V block of 64 keys (2 x 32 KiB in fp32 at D = 128) is converted and rotated
// once and then serves ~192 query rows: G * block_m, all heads of a GQA group. 192 rows keep the
// item's scratch (~300 KiB) inside a 512 KiB L2; 96 rows were 14% slower on a 2K prefill (twice
// the K/V work per row); 288 and 384 measured within -2%..+5% of 192 (noise on a shared host).
// Decode steps through 16 keys at a time (8 and 32 measured slower), computing their cos/sin once
// for all KV heads.
constexpr int kBlockN = 64;
constexpr int kTileRows = 192;
constexpr int kDecodeChunk = 16;

// Rotary data as the kernels use it: per row (one position of one sequence) the cos and sin of the
// R/2 pair angles, times attention_factor, as [cos: cs_pad][sin: cs_pad] with cs_pad = R/2 rounded
// up to 8 (512 bytes a row for R = 128: as much as a bf16 K row, so the row is read, not
// recomputed, by every tile that needs it). The kernels apply it to either pair layout.
// (static: internal linkage, so the units never share a compiled copy)
static inline int cs_pad_of(int rotary_dim) { return (rotary_dim / 2 + 7) / 8 * 8; }
static inline int head_dim_pad_of(int head_dim) { return (head_dim + 15) / 16 * 16; }

// Precompute the tables of `n_rows` rows. Row r belongs to batch element b (cu_rows[b] <= r <
// cu_rows[b+1] when cu_rows is set, else b = r / rows_per_batch) and sits at position
// positions[r] (or r - first row of b when positions is null); it uses table b of rope.freqs.
struct CosSinJob {
  const int32_t* positions = nullptr;
  const int32_t* cu_rows = nullptr;
  int64_t rows_per_batch = 1;
  int64_t n_rows = 0;
  int batch = 0;
  RopeParams rope;
  float* out = nullptr;  // [n_rows][2 * cs_pad]
};

// Tiled forward (prefill, varlen, and the KV-cache path when many queries attend at once).
// Work item = (sequence b, KV head, block of block_m queries x all G query heads of the group).
struct TiledPlan {
  AttnParams p;  // q/k/v/out/lse, strides, cu_seqlens (varlen) or batch strides (dense)
  DType dtype = DType::kFloat32;
  // KV-cache mode (cache_lens set): sequence b has cache_lens[b] keys 0..n-1 in k/v (the caches,
  // k_batch_stride = per-sequence or per-block stride) and Sq queries at positions n - Sq + i.
  const int32_t* cache_lens = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int block_size = 0;
  const float* q_cs = nullptr;       // per q row (dense b * Sq + i, varlen global row)
  const float* k_cs = nullptr;       // per k row (dense/cache b * k_cs_rows + j, varlen global row)
  int64_t k_cs_rows = 0;             // rows per sequence in k_cs for the dense and cache layouts
  int block_m = 0;                   // queries per item
  int64_t num_q_blocks = 0;          // per (b, kv head): ceil(max Sq / block_m); items = B * Hkv * this
};

// Decode (few queries per sequence against a long cache): item = (sequence, split of its keys);
// every item walks its keys in chunks of kDecodeChunk, computes their cos/sin once and uses them
// for all KV heads. Partial results (unnormalised out, running max, sum) go to `partial`
// [B][num_splits][Hq * Sq][head_dim_pad + 2], merged by decode_merge over rows (b, h, i).
struct DecodePlan {
  DecodeParams p;  // caches already hold the appended tokens: n_b = cache_seqlens[b] + s_new
  DType dtype = DType::kFloat32;
  int num_splits = 1;
  int64_t split_len = 0;  // keys per split, a multiple of kDecodeChunk
  float* partial = nullptr;
};

// Backward of the tiled forward (FlashAttention-2 from the saved LSE), with no atomics, so the
// gradients do not depend on the thread count:
//   prep:  per forward output row, delta = rowsum(dO * O) - dlse and the base-2 LSE;
//   items: (sequence b, KV head, split s of its key blocks): each block of kBwdBlockN keys is
//          rotated once, walks the query blocks that see it (all G heads of the group) and sums
//          dV = P^T dO and dK' = dS^T Q' (rows written once, rotated back), and adds
//          dQ' = dS K' to the split's own partial sums of dQ' (dq_part);
//   dq:    per query row, the splits' partial sums added in split order, rotated back.
// The number of splits depends on the shape only (ops.cpp), never on the threads.
// q, k, v, out, lse and the layout are the forward's (p); dq, dk, dv are contiguous with the
// shapes of q, k, v (dk and dv share the dk strides); delta and lse2 have the layout of lse.
struct BwdPlan {
  AttnParams p;
  DType dtype = DType::kFloat32;
  const void* dout = nullptr;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  const float* dlse = nullptr;  // the layout of lse, or null
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  float* delta = nullptr;  // prep's outputs
  float* lse2 = nullptr;   // lse * log2(e); +inf for a row that saw no key (lse -inf), so its P is 0
  const float* q_cs = nullptr;
  const float* k_cs = nullptr;
  int block_m = 0;             // queries per query block (the forward's, choose_block_m)
  int num_splits = 1;          // splits of each sequence's key blocks
  int64_t q_rows = 0;          // query rows: B * Sq dense, the packed total varlen
  float* dq_part = nullptr;    // [num_splits][Hkv][q_rows][G][Dp] fp32, zeroed
};
constexpr int kBwdBlockN = 128;

// apply_rope: rows (b, s) of x [B, S, H, D]; out has the same shape.
struct RopeJob {
  const void* x = nullptr;
  void* out = nullptr;
  DType dtype = DType::kFloat32;
  int64_t x_batch_stride = 0, x_row_stride = 0, x_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  const int32_t* positions = nullptr;  // [B, S] contiguous
  int batch = 0, seqlen = 0, num_heads = 0, head_dim = 0;
  RopeParams rope;
};

struct Kernels {
  const char* name;
  int micro_rows;  // rows of the unit's matrix micro-kernel: tiled items hold a multiple of them
  void (*cos_sin_rows)(const CosSinJob& job, int64_t begin, int64_t end);
  int64_t (*tiled_scratch_floats)(const TiledPlan& plan);
  void (*tiled_item)(const TiledPlan& plan, int64_t item, float* scratch);
  int64_t (*decode_scratch_floats)(const DecodePlan& plan);
  void (*decode_item)(const DecodePlan& plan, int64_t item, float* scratch);
  void (*decode_merge)(const DecodePlan& plan, int64_t begin, int64_t end);
  int64_t (*rope_scratch_floats)(const RopeJob& job);
  void (*rope_rows)(const RopeJob& job, int64_t begin, int64_t end, float* scratch);
  void (*bwd_prep_rows)(const BwdPlan& plan, int64_t begin, int64_t end);  // rows of the lse layout
  int64_t (*bwd_scratch_floats)(const BwdPlan& plan);
  void (*bwd_item)(const BwdPlan& plan, int64_t item, float* scratch);  // item (b, kv head, split)
  void (*bwd_dq_rows)(const BwdPlan& plan, int64_t begin, int64_t end);  // entries (kv head, q row)
};

#if defined(__x86_64__) || defined(_M_X64)
#define ROPEKERN_HAVE_AVX2_UNIT 1
#define ROPEKERN_HAVE_AVX512_UNIT 1
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
extern const Kernels kAmxKernels;
#endif
#if defined(__aarch64__)
#define ROPEKERN_HAVE_NEON_UNIT 1
extern const Kernels kNeonKernels;
#endif
extern const Kernels kGenericKernels;

}  // namespace cpu
}  // namespace ropekern
