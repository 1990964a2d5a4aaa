// One POD parameter struct per op, shared by the CPU and CUDA kernels (no torch headers here).
// Strides are in elements; every offset computed from them must be int64 (B*S*H*D can pass 2^31).
#pragma once

#include <stdint.h>

#include "macros.h"

namespace ropekern {

// Host-computed rotary data (ropekern/scaling.py). Scaling laws never reach the kernels.
struct RopeParams {
  const float* freqs = nullptr;     // [nT, kSplitRows, rotary_dim / 2] turn split (f1..f4 rows), or
                                    // with table_positions P > 0 a caller's [P, 2, rotary_dim / 2]
                                    // table: row p = cos then sin of position p (ropekern.RopeTable)
  int64_t freqs_batch_stride = 0;   // 0: one table for all sequences; 4 * rotary_dim / 2: one per sequence
  int rotary_dim = 0;               // R; 0 disables rotation (the "RoPE off" benchmark variant)
  bool interleaved = false;         // pairs (2i, 2i+1) instead of (i, i + R/2)
  float attention_factor = 1.0f;    // multiplies cos and sin
  int table_positions = 0;          // 0: freqs is the split; P: a caller's table (positions clamped to P - 1)
};

// Row of position `pos` in a caller's table of `rows` positions: positions past it read the last
// row (the host refuses them before the call; this keeps unchecked calls inside the table).
RK_HOST_DEVICE int64_t table_row(int32_t pos, int rows) {
  return pos < 0 ? 0 : (pos >= rows ? rows - 1 : pos);
}

// rope_attention forward. Dense: q [B, Sq, Hq, D]; varlen: q [Tq, Hq, D] with cu_seqlens_q.
struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // [B, Hq, Sq] dense, [Hq, Tq] varlen; may be null

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse row stride is 1

  const int32_t* q_pos = nullptr;  // [B, Sq] / [Tq]
  const int32_t* k_pos = nullptr;  // [B, Sk] / [Tk]
  int64_t q_pos_batch_stride = 0, k_pos_batch_stride = 0;

  const int32_t* cu_seqlens_q = nullptr;  // [B + 1], null for the dense layout
  const int32_t* cu_seqlens_k = nullptr;

  int batch = 0;
  int seqlen_q = 0;  // dense length, or max_seqlen_q for varlen
  int seqlen_k = 0;
  int num_heads = 0;
  int num_heads_k = 0;
  int head_dim = 0;
  float softmax_scale = 1.0f;
  bool causal = false;  // bottom-right: key j visible to query i iff j <= i + Sk - Sq
  // Sliding window (flash-attn's window_size): key j visible to query i only if
  // i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right; -1 is unbounded.
  int window_left = -1;
  int window_right = -1;

  RopeParams rope;
};

// rope_attention_with_kvcache. q [B, Sq, Hq, D]; cache dense [B, Smax, Hkv, D] or paged
// [num_blocks, block_size, Hkv, D] with block_table [B, max_blocks]. After appending k_new/v_new
// at cache_seqlens[b], sequence b holds n_b = cache_seqlens[b] + s_new keys at positions 0..n_b-1
// and query i sits at position max(n_b - Sq + i, 0) (n_b < Sq: under causal the first Sq - n_b
// queries see no key).
struct DecodeParams {
  const void* q = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k_new = nullptr;  // [B, s_new, Hkv, D] or null
  const void* v_new = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // [B, Hq, Sq]

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t kc_batch_stride = 0, kc_row_stride = 0, kc_head_stride = 0;  // batch = block for paged caches
  int64_t vc_batch_stride = 0, vc_row_stride = 0, vc_head_stride = 0;
  int64_t kn_batch_stride = 0, kn_row_stride = 0, kn_head_stride = 0;
  int64_t vn_batch_stride = 0, vn_row_stride = 0, vn_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  const int32_t* cache_seqlens = nullptr;  // [B], tokens cached before the append
  const int32_t* block_table = nullptr;    // [B, max_blocks] or null (dense)
  int64_t block_table_batch_stride = 0;
  int block_size = 0;  // tokens per block (paged)

  int batch = 0;
  int seqlen_q = 0;
  int s_new = 0;
  int num_heads = 0;
  int num_heads_k = 0;
  int head_dim = 0;
  float softmax_scale = 1.0f;
  bool causal = true;
  int window_left = -1;  // as in AttnParams, with Sk = n_b
  int window_right = -1;
  int num_splits = 1;  // split-K partitions of the cache (flash-decoding)

  RopeParams rope;
};

}  // namespace ropekern
