// Prefill (rope_attention) kernels, head dim 64. One file per head dim so the build parallelises.
#include "launch_template.h"

namespace ropekern {
namespace cuda {

template std::string launch_prefill<half_t, 64>(const AttnParams&, cudaStream_t);
template std::string launch_prefill<bf16_t, 64>(const AttnParams&, cudaStream_t);

}  // namespace cuda
}  // namespace ropekern
