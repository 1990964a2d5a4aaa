// The one dispatch layer: runtime arguments -> compile-time kernel instantiations.
//
// Compile-time: element type, head dim, kernel kind (prefill / cache) and split-K. Everything
// else is a runtime argument because it is uniform across a CTA and costs nothing in the inner
// loop: causal (changes only the key range and which tiles are masked), rotation on/off and the
// pair layout (one branch per tile in the rotation pass), varlen and paged addressing (per-row
// address arithmetic). That keeps the build to 18 attention kernels + 6 merge + 2 append + 3
// rope kernels per architecture.
//
// This file DEFINES the host API of launch.h; exactly one translation unit per build includes
// it: dispatch.cu in the CUDA library, the emulation harness in the tests.
#pragma once

#include <initializer_list>
#include <string>

#include "launch.h"
#include "traits.h"

namespace ropekern {
namespace cuda {

// Each switch runs a lambda with a compile-time name bound to the runtime value.
#define RK_FP16_BF16_SWITCH(DTYPE, ELEMENT, ...)                         \
  [&]() -> std::string {                                                 \
    if ((DTYPE) == DType::kFloat16) {                                    \
      using ELEMENT = half_t;                                            \
      return __VA_ARGS__();                                              \
    }                                                                    \
    if ((DTYPE) == DType::kBFloat16) {                                   \
      using ELEMENT = bf16_t;                                            \
      return __VA_ARGS__();                                              \
    }                                                                    \
    return "the CUDA attention kernels take float16 or bfloat16 tensors"; \
  }()

#define RK_FLOAT_SWITCH(DTYPE, ELEMENT, ...)                                \
  [&]() -> std::string {                                                    \
    if ((DTYPE) == DType::kFloat32) {                                       \
      using ELEMENT = float;                                                \
      return __VA_ARGS__();                                                 \
    }                                                                       \
    return RK_FP16_BF16_SWITCH(DTYPE, ELEMENT, __VA_ARGS__);                \
  }()

#define RK_HEADDIM_SWITCH(HEAD_DIM, KHEADDIM, ...)                                                    \
  [&]() -> std::string {                                                                              \
    switch (HEAD_DIM) {                                                                               \
      case 64: {                                                                                      \
        constexpr int KHEADDIM = 64;                                                                  \
        return __VA_ARGS__();                                                                         \
      }                                                                                               \
      case 128: {                                                                                     \
        constexpr int KHEADDIM = 128;                                                                 \
        return __VA_ARGS__();                                                                         \
      }                                                                                               \
      case 256: {                                                                                     \
        constexpr int KHEADDIM = 256;                                                                 \
        return __VA_ARGS__();                                                                         \
      }                                                                                               \
      default:                                                                                        \
        return "head dim " + std::to_string(HEAD_DIM) + " has no CUDA kernel (compiled: 64, 128, 256)"; \
    }                                                                                                 \
  }()

#define RK_BOOL_SWITCH(COND, NAME, ...)  \
  [&]() -> std::string {                 \
    if (COND) {                          \
      constexpr bool NAME = true;        \
      return __VA_ARGS__();              \
    }                                    \
    constexpr bool NAME = false;         \
    return __VA_ARGS__();                \
  }()

// Every attention launch passes through here; `instantiated` (traits.h) prunes combinations that
// have no kernel, so the switches above can be written as a full product.
template <Kind kKind, typename Element, int kHeadDim, bool kSplit, typename Params>
std::string launch_instantiated(const Params& p, cudaStream_t stream) {
  if constexpr (!instantiated(kKind, kHeadDim, kSplit)) {
    return "no CUDA kernel is instantiated for this combination";
  } else if constexpr (kKind == Kind::kPrefill) {
    return launch_prefill<Element, kHeadDim>(p, stream);
  } else {
    return launch_cache<Element, kHeadDim, kSplit>(p, stream);
  }
}

namespace detail {

inline bool misaligned(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return true;
  for (int64_t s : strides) {
    if (s % 8 != 0) return true;
  }
  return false;
}

// cp.async moves 16-byte chunks: base pointers 16-byte aligned, strides multiples of 8 elements.
inline std::string alignment_error(const char* name) {
  return std::string("`") + name +
         "` must be 16-byte aligned with batch/row/head strides that are multiples of 8 elements "
         "(a strided view can be passed as .contiguous())";
}

// `freqs` is a law's split or, with table_positions > 0, a caller's table: required either way.
inline std::string rope_error(const RopeParams& rope, int head_dim) {
  if (rope.rotary_dim < 0 || rope.rotary_dim % 2 != 0 || rope.rotary_dim > head_dim) {
    return "`rotary_dim` must be even and in [0, head_dim], got " + std::to_string(rope.rotary_dim);
  }
  if (rope.table_positions < 0) return "`table_positions` must be >= 0, got " + std::to_string(rope.table_positions);
  if (rope.rotary_dim > 0 && rope.freqs == nullptr) return "`freqs` is required when rotary_dim > 0";
  return {};
}

inline std::string common_error(DType dtype, int head_dim, int num_heads, int num_heads_k, const RopeParams& rope) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    return "the CUDA attention kernels take float16 or bfloat16 tensors";
  }
  if (!head_dim_compiled(head_dim)) {
    return "head dim " + std::to_string(head_dim) + " has no CUDA kernel (compiled: 64, 128, 256)";
  }
  if (num_heads_k <= 0 || num_heads % num_heads_k != 0) {
    return "query heads (" + std::to_string(num_heads) + ") must be a multiple of key/value heads (" +
           std::to_string(num_heads_k) + ")";
  }
  return rope_error(rope, head_dim);
}

}  // namespace detail

std::string check_attention(const AttnParams& p, DType dtype) {
  std::string err = detail::common_error(dtype, p.head_dim, p.num_heads, p.num_heads_k, p.rope);
  if (!err.empty()) return err;
  if (p.num_heads > 65535 || p.batch > 65535) return "at most 65535 query heads and 65535 sequences per call";
  if (detail::misaligned(p.q, {p.q_batch_stride, p.q_row_stride, p.q_head_stride})) return detail::alignment_error("q");
  if (detail::misaligned(p.k, {p.k_batch_stride, p.k_row_stride, p.k_head_stride})) return detail::alignment_error("k");
  if (detail::misaligned(p.v, {p.v_batch_stride, p.v_row_stride, p.v_head_stride})) return detail::alignment_error("v");
  if (detail::misaligned(p.out, {p.o_batch_stride, p.o_row_stride, p.o_head_stride})) {
    return detail::alignment_error("out");
  }
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) {
    return "`cu_seqlens_q` and `cu_seqlens_k` must be given together";
  }
  if ((p.q_pos == nullptr && p.seqlen_q > 0) || (p.k_pos == nullptr && p.seqlen_k > 0)) {
    return "`q_pos` and `k_pos` are required";
  }
  return {};
}

std::string check_cache(const CacheParams& cp, DType dtype) {
  const DecodeParams& p = cp.p;
  std::string err = detail::common_error(dtype, p.head_dim, p.num_heads, p.num_heads_k, p.rope);
  if (!err.empty()) return err;
  if (static_cast<int64_t>(p.batch) * p.num_heads_k > 65535) return "batch * kv heads must be at most 65535";
  if (p.num_splits < 1 || p.num_splits > 128) return "`num_splits` must be in [1, 128]";
  if (p.num_splits > 1 && (cp.out_accum == nullptr || cp.lse_accum == nullptr)) {
    return "split-K needs the out_accum / lse_accum workspace";
  }
  if (detail::misaligned(p.q, {p.q_batch_stride, p.q_row_stride, p.q_head_stride})) return detail::alignment_error("q");
  if (detail::misaligned(p.k_cache, {p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride})) {
    return detail::alignment_error("k_cache");
  }
  if (detail::misaligned(p.v_cache, {p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride})) {
    return detail::alignment_error("v_cache");
  }
  if (detail::misaligned(p.out, {p.o_batch_stride, p.o_row_stride, p.o_head_stride})) {
    return detail::alignment_error("out");
  }
  if (p.block_table != nullptr && p.block_size <= 0) return "a paged cache needs block_size > 0";
  if (p.s_new > 0 && (p.k_new == nullptr || p.v_new == nullptr)) return "`k_new` and `v_new` must be given together";
  if (p.cache_seqlens == nullptr) return "`cache_seqlens` is required";
  return {};
}

std::string check_rope(const RopeApplyParams& p, DType dtype) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16 && dtype != DType::kFloat32) {
    return "apply_rope on CUDA takes float16, bfloat16 or float32 tensors";
  }
  std::string err = detail::rope_error(p.rope, p.head_dim);
  if (!err.empty()) return err;
  if (p.positions == nullptr && p.batch * p.seqlen > 0) return "`positions` is required";
  return {};
}

int plan_num_splits(int batch, int num_heads, int num_heads_k, int seqlen_q, int max_seqlen_k, int num_sms,
                    int requested) {
  using Traits = AttnTraits<half_t, 64, Kind::kCache>;  // block sizes do not depend on the dtype / head dim
  const int n_blocks = imax(1, ceil_div(max_seqlen_k, Traits::kBlockN));
  const int max_splits = imin(128, n_blocks);
  if (requested > 0) return imin(requested, max_splits);
  if (num_heads_k <= 0 || seqlen_q <= 0) return 1;
  const int64_t ctas = static_cast<int64_t>(batch) * num_heads_k *
                       ceil_div(seqlen_q * (num_heads / num_heads_k), Traits::kBlockM);
  if (ctas == 0 || ctas >= num_sms) return 1;  // one full wave already: splitting only adds the merge
  const int64_t want = (2 * static_cast<int64_t>(num_sms) + ctas - 1) / ctas;
  const int splits = static_cast<int>(want < max_splits ? want : max_splits);
  return imax(1, imin(splits, n_blocks / 4));
}

std::string run_attention(const AttnParams& p, DType dtype, cudaStream_t stream) {
  std::string err = check_attention(p, dtype);
  if (!err.empty()) return err;
  return RK_FP16_BF16_SWITCH(dtype, Element, [&] {
    return RK_HEADDIM_SWITCH(p.head_dim, kHeadDim,
                             [&] { return launch_instantiated<Kind::kPrefill, Element, kHeadDim, false>(p, stream); });
  });
}

std::string run_cache(const CacheParams& p, DType dtype, cudaStream_t stream) {
  std::string err = check_cache(p, dtype);
  if (!err.empty()) return err;
  return RK_FP16_BF16_SWITCH(dtype, Element, [&] {
    return RK_HEADDIM_SWITCH(p.p.head_dim, kHeadDim, [&] {
      return RK_BOOL_SWITCH(p.p.num_splits > 1, kSplit,
                            [&] { return launch_instantiated<Kind::kCache, Element, kHeadDim, kSplit>(p, stream); });
    });
  });
}

std::string run_rope(const RopeApplyParams& p, DType dtype, cudaStream_t stream) {
  std::string err = check_rope(p, dtype);
  if (!err.empty()) return err;
  return RK_FLOAT_SWITCH(dtype, Element, [&] { return launch_rope<Element>(p, stream); });
}

}  // namespace cuda
}  // namespace ropekern
