// Prefill (rope_attention) kernels, head dim 256.
#include "launch_template.h"

RK_INSTANTIATE_PREFILL(256)
