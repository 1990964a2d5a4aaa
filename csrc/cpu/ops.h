// The CPU kernels of the ropekern::* ops (schemas in csrc/bindings.cpp; registered by cpu/ops.cpp).
#pragma once

#include <string>

namespace ropekern {
namespace cpu {

// Name of the kernel unit the next call will use: "avx512", "avx2" or "generic" (ROPEKERN_CPU_ISA
// overrides), and why it is that one (what the CPU and OS report, or the override).
const char* active_isa();
std::string isa_reason();

}  // namespace cpu
}  // namespace ropekern
