// Cost of the CPU kernels' accurate angle: cos_sin_row (one position, R/2 = 64 pairs) and
// cos_sin_chunk (16 consecutive positions), the AVX2 unit, best of 30 rounds. Build it against two
// checkouts to compare their angle code with the same compiler and flags:
//
//   g++ -O3 -std=c++17 -I$TREE/csrc/include -I$TREE/csrc/cpu -I$TREE/csrc \
//       benchmarks/tools/angle_cost.cpp -o /tmp/angle_cost && /tmp/angle_cost
//
// The table is filled with 4 rows (an older three-row tree reads the first three).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <chrono>
#include <cstdio>
#include <vector>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define RK_VEC_AVX2 1
#define RK_ISA avx2
#define RK_ISA_NAME "avx2"
#define RK_KERNELS_SYMBOL kAvx2Kernels
#include "kernels_impl.h"
#pragma GCC pop_options
using namespace ropekern::cpu::avx2;
int main() {
  const int half = 64, cp = 64;
  std::vector<float> split(4 * half);
  for (int i = 0; i < 4 * half; ++i) split[i] = 1e-3f / (1 + i);
  alignas(64) static float out[16 * 2 * 64];
  double best_row = 1e9, best_chunk = 1e9;
  volatile float sink = 0;
  for (int rep = 0; rep < 30; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int p = 0; p < 20000; ++p) { cos_sin_row(p * 7 + 12345, split.data(), half, 1.0f, cp, out); sink = sink + out[3]; }
    auto t1 = std::chrono::steady_clock::now();
    for (int p = 0; p < 2000; ++p) { cos_sin_chunk(p * 16, 16, split.data(), half, 1.0f, cp, out, 2 * cp); sink = sink + out[5]; }
    auto t2 = std::chrono::steady_clock::now();
    best_row = std::min(best_row, std::chrono::duration<double, std::nano>(t1 - t0).count() / 20000);
    best_chunk = std::min(best_chunk, std::chrono::duration<double, std::nano>(t2 - t1).count() / 2000);
  }
  std::printf("cos_sin_row %.1f ns, cos_sin_chunk(16) %.1f ns\n", best_row, best_chunk);
}
