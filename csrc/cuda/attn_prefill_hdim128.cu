// Prefill (rope_attention) kernels, head dim 128.
#include "launch_template.h"

RK_INSTANTIATE_PREFILL(128)
