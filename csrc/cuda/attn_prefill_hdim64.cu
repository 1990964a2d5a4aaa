// Prefill (rope_attention) kernels, head dim 64.
#include "launch_template.h"

RK_INSTANTIATE_PREFILL(64)
