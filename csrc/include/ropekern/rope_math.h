// Accurate RoPE angles in fp32 (docs/design.md §4), shared by the CPU and CUDA kernels.
//
// The host splits each frequency, in turns per position, into f1 + f2 + f3 + f4 where f1, f2 and
// f3 carry 12 significant bits and f4 is the fp32 remainder (ropekern/scaling.py: split_turns; the
// four rows together hold the frequency to ~2^-60 relative). The position is split into
// 12-bit chunks, P2 = (pos >> 24) << 24 (7 bits), P1 = ((pos >> 12) & 4095) << 12 and P0 = pos & 4095,
// so every product that can exceed a turn is exact in fp32 and is reduced to [-0.5, 0.5] turn with
// nothing lost. Only the additions of reduced values round (<= 2^-25 turn each), the products of
// the small terms (< 0.2 turn together) round at ~2^-28, and the final multiplication by 2*pi
// rounds once: |error| <= ~1.6e-6 rad for every position below 2^31 (measured worst: 8.4e-7 rad),
// where the plain fp32 product pos * inv_freq is 0.06 rad off at position 1M and the previous
// two-chunk split of this file was wrong by up to pi from 2^28.
//
// The terms of P2 and P1 come first (`angle_turns_high`), so that kernels rotating consecutive
// positions that share pos >> 12 compute them once. This is operation for operation the fp32
// specification `angle_turns_fp32` in scaling.py; keep them identical (the C++ harness and the
// Python tests check both against exact angles).
#pragma once

#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace ropekern {

// Rows of the split frequency table: float[kSplitRows][half] per sequence (f1, f2, f3, f4).
constexpr int kSplitRows = 4;

// x - nearest integer (halves up): [-0.5, 0.5] for the values here; exact when x is.
RK_HOST_DEVICE float reduce_turn(float x) { return x - floorf(x + 0.5f); }

// The position-chunk terms shared by all positions with the same pos >> 12: `high` is the reduced
// sum of the exact large products, `small` the sum of the small high-chunk products.
struct AngleHigh {
  float high, small;
};

RK_HOST_DEVICE AngleHigh angle_turns_high(int32_t pos, float f1, float f2, float f3, float f4) {
  const float p2 = static_cast<float>(pos >> 24) * 16777216.0f;
  const float p1 = static_cast<float>((pos >> 12) & 4095) * 4096.0f;
  float h = reduce_turn(p2 * f1);  // 7 x 12 bits: exact, and so is its reduction
  h = reduce_turn(h + reduce_turn(p2 * f2));
  h = reduce_turn(h + reduce_turn(p2 * f3));
  h = reduce_turn(h + reduce_turn(p1 * f1));  // 12 x 12 bits: exact
  h = reduce_turn(h + reduce_turn(p1 * f2));
  return {h, p1 * f3 + (p2 * f4 + p1 * f4)};
}

// Angle in turns, reduced to [-0.5, 0.5], from the high terms and the low chunk of the position.
RK_HOST_DEVICE float angle_turns_low(AngleHigh hi, int32_t pos, float f1, float f2, float f3, float f4) {
  const float p0 = static_cast<float>(pos & 4095);
  const float s = reduce_turn(hi.high + reduce_turn(p0 * f1));
  return reduce_turn(s + (hi.small + (p0 * f2 + (p0 * f3 + p0 * f4))));
}

// Angle in turns, reduced to [-0.5, 0.5], for `pos` (0 <= pos < 2^31) and one split frequency.
RK_HOST_DEVICE float angle_turns(int32_t pos, float f1, float f2, float f3, float f4) {
  return angle_turns_low(angle_turns_high(pos, f1, f2, f3, f4), pos, f1, f2, f3, f4);
}

// cos and sin of the angle of pair `i`, times the attention factor.
// `split` points at one sequence's table: float[kSplitRows][half] (f1, f2, f3, f4 rows).
RK_HOST_DEVICE void rope_cos_sin(int32_t pos, const float* split, int half, int i, float attention_factor,
                                 float* cos_out, float* sin_out) {
  const float t = angle_turns(pos, split[i], split[half + i], split[2 * half + i], split[3 * half + i]);
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
