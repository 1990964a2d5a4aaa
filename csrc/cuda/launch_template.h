// Definitions of the per-instantiation launchers declared in launch.h: grid shapes, the dynamic
// shared-memory opt-in and the kernel launches. Included by the instantiation .cu files (and by
// the emulation harness, where RK_LAUNCH runs the grid on the CPU).
#pragma once

#include <string>

#include "attention.h"
#include "launch.h"
#include "rope_apply.h"

namespace ropekern {
namespace cuda {

#if defined(RK_EMULATE)
#define RK_LAUNCH(kernel, grid, block, smem, stream, arg) \
  ((void)(stream), ::rk_emu::launch(grid, block, smem, [&] { kernel(arg); }))
inline std::string last_launch_error() { return {}; }
template <typename Kernel>
std::string allow_smem(Kernel, int) {
  return {};
}
#else
#define RK_LAUNCH(kernel, grid, block, smem, stream, arg) kernel<<<grid, block, smem, stream>>>(arg)
inline std::string last_launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string("CUDA launch failed: ") + cudaGetErrorString(e);
}
// Above 48 KiB of dynamic shared memory a kernel must opt in (per device, so on every launch).
template <typename Kernel>
std::string allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return {};
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  return e == cudaSuccess ? std::string() : std::string("cudaFuncSetAttribute failed: ") + cudaGetErrorString(e);
}
#endif

template <typename Element, int kHeadDim>
std::string launch_prefill(const AttnParams& p, cudaStream_t stream) {
  using Traits = AttnTraits<Element, kHeadDim, Kind::kPrefill>;
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads == 0) return {};
  auto kernel = &attention_kernel<Traits, PrefillProblem<Element>, false>;
  std::string err = allow_smem(kernel, Traits::kSmemBytes);
  if (!err.empty()) return err;
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.num_heads, p.batch);
  RK_LAUNCH(kernel, grid, dim3(Traits::kNThreads), Traits::kSmemBytes, stream, p);
  return last_launch_error();
}

template <typename Element, int kHeadDim, bool kSplit>
std::string launch_cache(const CacheParams& cp, cudaStream_t stream) {
  using Traits = AttnTraits<Element, kHeadDim, Kind::kCache>;
  const DecodeParams& p = cp.p;
  if (p.batch == 0 || p.num_heads == 0) return {};
  if (p.s_new > 0) {
    auto append = &append_kernel<Element>;
    const int64_t total = static_cast<int64_t>(p.batch) * p.s_new * p.num_heads_k * p.head_dim;
    const int blocks = static_cast<int>((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
    RK_LAUNCH(append, dim3(blocks), dim3(256), 0, stream, cp);
    std::string err = last_launch_error();
    if (!err.empty()) return err;
  }
  if (p.seqlen_q == 0) return {};
  auto kernel = &attention_kernel<Traits, CacheProblem<Element>, kSplit>;
  std::string err = allow_smem(kernel, Traits::kSmemBytes);
  if (!err.empty()) return err;
  const int group = p.num_heads / p.num_heads_k;
  const dim3 grid(ceil_div(p.seqlen_q * group, Traits::kBlockM), kSplit ? p.num_splits : 1, p.batch * p.num_heads_k);
  RK_LAUNCH(kernel, grid, dim3(Traits::kNThreads), Traits::kSmemBytes, stream, cp);
  err = last_launch_error();
  if (!err.empty() || !kSplit) return err;
  auto combine = &combine_kernel<Element, kHeadDim>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_heads * p.seqlen_q;
  RK_LAUNCH(combine, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(128), 0, stream, cp);
  return last_launch_error();
}

template <typename Element>
std::string launch_rope(const RopeApplyParams& p, cudaStream_t stream) {
  const int slots = p.rope.rotary_dim / 2 + (p.head_dim - p.rope.rotary_dim + 1) / 2;
  const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen * slots;
  if (total == 0 || p.num_heads == 0) return {};
  auto kernel = &apply_rope_kernel<Element>;
  const int blocks = static_cast<int>((total + 255) / 256 < 65536 ? (total + 255) / 256 : 65536);
  RK_LAUNCH(kernel, dim3(blocks), dim3(256), 0, stream, p);
  return last_launch_error();
}

}  // namespace cuda
}  // namespace ropekern

// The explicit instantiations of one head dim (one attn_{prefill,cache}_hdim<D>.cu file per head dim,
// so that the build parallelises): fp16 and bf16, and for the cache kernel without and with split-K
// (the latter also instantiates the split merge).
#define RK_INSTANTIATE_PREFILL(D)                                                                      \
  namespace ropekern {                                                                                 \
  namespace cuda {                                                                                     \
  template std::string launch_prefill<half_t, D>(const AttnParams&, cudaStream_t);                    \
  template std::string launch_prefill<bf16_t, D>(const AttnParams&, cudaStream_t);                    \
  }                                                                                                    \
  }
#define RK_INSTANTIATE_CACHE(D)                                                                        \
  namespace ropekern {                                                                                 \
  namespace cuda {                                                                                     \
  template std::string launch_cache<half_t, D, false>(const CacheParams&, cudaStream_t);              \
  template std::string launch_cache<half_t, D, true>(const CacheParams&, cudaStream_t);               \
  template std::string launch_cache<bf16_t, D, false>(const CacheParams&, cudaStream_t);              \
  template std::string launch_cache<bf16_t, D, true>(const CacheParams&, cudaStream_t);               \
  }                                                                                                    \
  }
