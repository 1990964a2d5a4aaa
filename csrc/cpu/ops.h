// The CPU kernels of the ropekern::* ops (schemas in csrc/bindings.cpp; registered by cpu/ops.cpp).
#pragma once

namespace ropekern {
namespace cpu {

// Name of the kernel unit the next call will use: "avx2" or "generic" (ROPEKERN_CPU_ISA overrides).
const char* active_isa();

}  // namespace cpu
}  // namespace ropekern
