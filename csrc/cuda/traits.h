// Compile-time configuration of the attention kernels and the one predicate that decides which
// combinations are instantiated (the dispatch layer in dispatch.h consults it).
#pragma once

#include "common.h"

namespace ropekern {
namespace cuda {

enum class Kind {
  kPrefill,  // rope_attention: dense or varlen q/k/v, one CTA per (query block, query head, sequence)
  kCache,    // rope_attention_with_kvcache: dense or paged cache, GQA groups packed into the query rows
};

// Head dims with compiled kernels. 80 and 96 would need a non-power-of-two swizzle and tile
// loops; they are refused with a clear error (the Triton backend serves them).
RK_HOST_DEVICE constexpr bool head_dim_compiled(int d) { return d == 64 || d == 128 || d == 256; }

// The pruning predicate: split-K exists only for the cache kernel (prefill has enough CTAs
// along the query axis to fill the GPU), and only the compiled head dims exist.
RK_HOST_DEVICE constexpr bool instantiated(Kind kind, int head_dim, bool split) {
  return head_dim_compiled(head_dim) && !(kind == Kind::kPrefill && split);
}

template <typename Element_, int kHeadDim_, Kind kKind_>
struct AttnTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr Kind kKind = kKind_;
  // One m16 row tile per warp. Prefill uses 8 warps (128 query rows) so that each K/V tile read
  // from L2 feeds 128 rows; D = 256 and the cache kernel use 4 warps: 256 needs 128 fp32
  // accumulators per thread, and a decode CTA has only Sq * Hq / Hkv useful rows (often 1-8).
  static constexpr int kNWarps = (kKind == Kind::kCache || kHeadDim == 256) ? 4 : 8;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kBlockM = 16 * kNWarps;
  static constexpr int kBlockN = 64;
  // Q, K and V tiles, single-buffered: 32 / 64 / 96 KiB for prefill D = 64 / 128 / 256,
  // 24 / 48 / 96 KiB for the cache kernel. <= 99 KiB so that every sm80+ part (sm86/sm89 allow
  // 99 KiB per block, A100 163 KiB, H100 227 KiB) can run at least one CTA per SM.
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * static_cast<int>(sizeof(Element));
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte cp.async chunks
  static constexpr int kRopeSlots = kHeadDim / 2;     // rotation pass: one pair slot per thread

  static_assert(head_dim_compiled(kHeadDim), "head dim without a compiled kernel");
  static_assert(kSmemBytes <= 99 * 1024, "tile does not fit the smallest sm80+ shared memory");
  static_assert(kNThreads % kRopeSlots == 0, "each thread must own one fixed rotary pair slot");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "mma.m16n8k16 tiles");
};

}  // namespace cuda
}  // namespace ropekern
