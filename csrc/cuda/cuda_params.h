// Parameter structs of the CUDA kernels beyond the shared ones in ropekern/params.h. Kept here,
// not in params.h, because only the CUDA path needs them: the split-K workspace of the decode
// kernel and the standalone apply_rope op; and how the kernels read RopeParams' two sources of
// cos/sin (a law's split frequencies, or a caller's table).
#pragma once

#include <stdint.h>

#include "ropekern/params.h"

namespace ropekern {
namespace cuda {

// The `freqs` that sequence b reads: its own split when the law gives one per sequence; a caller's
// table (table_positions > 0) is one table for every sequence, whatever freqs_batch_stride says.
RK_HOST_DEVICE const float* sequence_freqs(const RopeParams& rope, int b) {
  if (rope.freqs == nullptr || rope.table_positions > 0) return rope.freqs;
  return rope.freqs + b * rope.freqs_batch_stride;
}

// cos and sin of pair `pair` at `pos` from a caller's table [rows, 2, rotary_dim / 2]: row
// table_row(pos, rows) holds the rotary_dim / 2 cosines, then the sines. Used as given: the table
// already holds the magnitude, so no attention factor and no angle arithmetic.
RK_HOST_DEVICE void table_cos_sin(const float* table, int rotary_dim, int rows, int32_t pos, int pair, float* cos_out,
                                  float* sin_out) {
  const float* row = table + table_row(pos, rows) * rotary_dim + pair;
  *cos_out = row[0];
  *sin_out = row[rotary_dim / 2];
}

// rope_attention_with_kvcache on the GPU: the shared DecodeParams plus the split-K workspace.
struct CacheParams {
  DecodeParams p;
  int max_seqlen_k = 0;          // cache capacity per sequence (dense: Smax; paged: max_blocks * block_size)
  float* out_accum = nullptr;    // [num_splits, B, Hq, Sq, D] fp32, each split normalised by its own sum
  float* lse_accum = nullptr;    // [num_splits, B, Hq, Sq]; -inf for a split that saw no key
};

// apply_rope: x [B, S, H, D] (a packed [T, H, D] input is passed as B = 1); out is contiguous.
struct RopeApplyParams {
  const void* x = nullptr;
  void* out = nullptr;
  int64_t x_batch_stride = 0, x_row_stride = 0, x_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  const int32_t* positions = nullptr;  // [B, S]
  int64_t pos_batch_stride = 0;
  int batch = 0, seqlen = 0, num_heads = 0, head_dim = 0;
  RopeParams rope;  // freqs_batch_stride != 0: one table per batch row
};

}  // namespace cuda
}  // namespace ropekern
