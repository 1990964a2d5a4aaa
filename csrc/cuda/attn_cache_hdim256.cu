// KV-cache (rope_attention_with_kvcache) kernels, head dim 256: without and with split-K (the
// latter also instantiates the split merge). One file per head dim so the build parallelises.
#include "launch_template.h"

namespace ropekern {
namespace cuda {

template std::string launch_cache<half_t, 256, false>(const CacheParams&, cudaStream_t);
template std::string launch_cache<half_t, 256, true>(const CacheParams&, cudaStream_t);
template std::string launch_cache<bf16_t, 256, false>(const CacheParams&, cudaStream_t);
template std::string launch_cache<bf16_t, 256, true>(const CacheParams&, cudaStream_t);

}  // namespace cuda
}  // namespace ropekern
