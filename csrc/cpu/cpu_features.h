// Which CPU kernel units this machine runs: what cpuid reports and what the OS saves and grants.
// Torch-free, shared by the dispatch (ops.cpp) and the C++ harness (csrc/tests/test_cpu_kernels.cpp).
// A unit needs both: cpuid can list AVX-512 or AMX while the OS leaves their register state off
// (XCR0), and then the first zmm or tile instruction faults.
#pragma once

#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define ROPEKERN_X86_FEATURES 1
#endif

namespace ropekern {
namespace cpu {

#if defined(ROPEKERN_X86_FEATURES)
// XCR0 (xgetbv 0): the register state components the OS saves; 0 without OSXSAVE (where xgetbv
// itself faults).
inline uint64_t xcr0() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
// SSE and AVX state (bits 1, 2): ymm registers survive a context switch; plus opmask, the upper
// halves of zmm0-15 and zmm16-31 (bits 5, 6, 7) for zmm.
inline bool os_saves_ymm() { return (xcr0() & 0x6) == 0x6; }
inline bool os_saves_zmm() { return (xcr0() & 0xE6) == 0xE6; }

// kernels_avx2.cpp: AVX2, FMA, F16C.
inline bool cpu_runs_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && os_saves_ymm();
  return ok;
}
// kernels_avx512.cpp: AVX-512F/BW/VL/DQ on top of the AVX2 unit's needs.
inline bool cpu_runs_avx512() {
  static const bool ok = cpu_runs_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && os_saves_zmm();
  return ok;
}
// kernels_amx.cpp: AMX-TILE and AMX-BF16 (cpuid leaf 7, EDX bits 24 and 22) and AVX512_BF16 (its
// operand conversions; every AMX CPU has it), the tile state on in XCR0 (bits 17, 18) and Linux
// (5.16+) granting this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM), on top of the
// AVX-512 unit's needs.
inline bool cpu_runs_amx() {
#if defined(__linux__)
  static const bool ok = [] {
    if (!cpu_runs_avx512() || !__builtin_cpu_supports("avx512bf16")) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;
    if ((xcr0() & 0x60000) != 0x60000) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
#else
  return false;
#endif
}
#else
inline bool cpu_runs_avx2() { return false; }
inline bool cpu_runs_avx512() { return false; }
inline bool cpu_runs_amx() { return false; }
#endif

}  // namespace cpu
}  // namespace ropekern
