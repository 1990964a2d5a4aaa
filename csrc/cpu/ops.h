// CPU implementations of the ropekern::* ops (schemas in csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ropekern {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& q_pos, const at::Tensor& k_pos, const at::Tensor& freqs,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, int64_t rotary_dim, bool interleaved,
                                       double attention_factor, bool causal, double softmax_scale);

std::tuple<at::Tensor, at::Tensor> fwd_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                               const std::optional<at::Tensor>& k_new,
                                               const std::optional<at::Tensor>& v_new,
                                               const std::optional<at::Tensor>& block_table, const at::Tensor& freqs,
                                               int64_t rotary_dim, bool interleaved, double attention_factor,
                                               bool causal, double softmax_scale, int64_t num_splits);

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& freqs, int64_t rotary_dim,
                      bool interleaved, double attention_factor);

// Name of the kernel unit the next call will use: "avx2" or "generic" (ROPEKERN_CPU_ISA overrides).
const char* active_isa();

}  // namespace cpu
}  // namespace ropekern
