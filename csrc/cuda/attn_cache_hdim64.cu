// KV-cache (rope_attention_with_kvcache) kernels, head dim 64.
#include "launch_template.h"

RK_INSTANTIATE_CACHE(64)
