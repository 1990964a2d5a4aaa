// apply_rope kernels (element types float16, bfloat16, float32; any head dim).
#include "launch_template.h"

namespace ropekern {
namespace cuda {

template std::string launch_rope<half_t>(const RopeApplyParams&, cudaStream_t);
template std::string launch_rope<bf16_t>(const RopeApplyParams&, cudaStream_t);
template std::string launch_rope<float>(const RopeApplyParams&, cudaStream_t);

}  // namespace cuda
}  // namespace ropekern
