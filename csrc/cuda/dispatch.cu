// The host API of launch.h (checks, split planning, runtime -> compile-time dispatch); the
// kernels themselves are instantiated in attn_*_hdim*.cu and rope.cu.
#include "dispatch.h"
