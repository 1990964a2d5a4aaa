// Torch-free host API of the CUDA kernels: validation, split-K planning and launches. The
// torch-facing launcher (bindings_cuda.cpp) fills the params structs from tensors and calls these;
// the emulation harness (csrc/tests/test_cuda_emulated.cpp) calls them with host buffers.
#pragma once

#include <string>

#include "common.h"
#include "cuda_params.h"

namespace ropekern {
namespace cuda {

// Empty when the kernels support the call, else the reason (a sentence naming the argument).
std::string check_attention(const AttnParams& p, DType dtype);
std::string check_cache(const CacheParams& p, DType dtype);
std::string check_rope(const RopeApplyParams& p, DType dtype);

// Split-K partitions for the cache kernel. `requested` > 0 is honoured up to one split per key
// tile (at most 128); 0 picks enough splits for about two waves of CTAs on `num_sms` SMs while
// keeping >= 4 key tiles (256 keys) per split.
int plan_num_splits(int batch, int num_heads, int num_heads_k, int seqlen_q, int max_seqlen_k, int num_sms,
                    int requested);

// Launch on `stream`; empty string on success, else the CUDA error. The cache launch appends
// k_new / v_new in place, runs the attention kernel and, with p.p.num_splits > 1, the merge;
// out_accum / lse_accum must then hold num_splits * B * Hq * Sq * (D | 1) floats.
std::string run_attention(const AttnParams& p, DType dtype, cudaStream_t stream);
std::string run_cache(const CacheParams& p, DType dtype, cudaStream_t stream);
std::string run_rope(const RopeApplyParams& p, DType dtype, cudaStream_t stream);

// Per-instantiation launchers (launch_template.h), explicitly instantiated in the
// attn_*_hdim*.cu / rope.cu files so that the build compiles them in parallel.
template <typename Element, int kHeadDim>
std::string launch_prefill(const AttnParams& p, cudaStream_t stream);
template <typename Element, int kHeadDim, bool kSplit>
std::string launch_cache(const CacheParams& p, cudaStream_t stream);
template <typename Element>
std::string launch_rope(const RopeApplyParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace ropekern
