// Accurate RoPE angles in fp32 (DESIGN §4), shared by the CPU and CUDA kernels.
//
// The host splits each frequency, in turns per position, into f1 + f2 + f3 where f1 and f2 carry
// 12 significant bits (ropekern/scaling.py: split_turns). The position is split into two 12-bit
// chunks, so every partial product that can be large is exact in fp32 and reducing it modulo one
// turn loses nothing. Only three additions of values below 2 round (<= 2^-24 turns each), and the
// final multiplication by 2*pi rounds once: |error| <= ~1.4e-6 rad for positions < 2^24, against
// ~0.06 rad for the plain fp32 product pos * inv_freq at position 1M.
//
// This is operation for operation the fp32 specification `angle_turns_fp32` in scaling.py; keep
// them identical (the C++ harness and the Python tests check both against fp64).
#pragma once

#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace ropekern {

RK_HOST_DEVICE float frac_turn(float x) { return x - floorf(x); }

// Angle in turns, reduced to [-0.5, 0.5], for `pos` (0 <= pos < 2^31) and one split frequency.
RK_HOST_DEVICE float angle_turns(int32_t pos, float f1, float f2, float f3) {
  const float ph = static_cast<float>(pos >> 12);
  const float pl = static_cast<float>(pos & 4095);
  const float a = frac_turn(ph * f1 * 4096.0f);  // 12 x 12 bits: exact
  const float b = frac_turn(ph * f2 * 4096.0f);  // exact
  const float c = frac_turn(pl * f1);            // exact
  float s = frac_turn(a + b);
  s = frac_turn(s + c);
  s = s + (ph * 4096.0f * f3 + pl * f2 + pl * f3);  // < 0.1 turn in total
  return s - floorf(s + 0.5f);
}

// cos and sin of the angle of pair `i`, times the attention factor.
// `split` points at one sequence's table: float[3][half] (f1 row, f2 row, f3 row).
RK_HOST_DEVICE void rope_cos_sin(int32_t pos, const float* split, int half, int i, float attention_factor,
                                 float* cos_out, float* sin_out) {
  const float t = angle_turns(pos, split[i], split[half + i], split[2 * half + i]);
  const float angle = t * 6.28318530717958647692f;
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(angle, &s, &c);
#else
  const float s = sinf(angle);
  const float c = cosf(angle);
#endif
  *cos_out = c * attention_factor;
  *sin_out = s * attention_factor;
}

// Channel index of the two members of pair `i` for a rotary width `rotary_dim`.
RK_HOST_DEVICE int pair_first(int i, bool interleaved) { return interleaved ? 2 * i : i; }
RK_HOST_DEVICE int pair_second(int i, int rotary_dim, bool interleaved) {
  return interleaved ? 2 * i + 1 : i + rotary_dim / 2;
}

// Rotate one pair in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
RK_HOST_DEVICE void rotate_pair(float* x1, float* x2, float c, float s) {
  const float a = *x1, b = *x2;
  *x1 = a * c - b * s;
  *x2 = b * c + a * s;
}

}  // namespace ropekern
