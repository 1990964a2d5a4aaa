// Index math of the tensor-core attention kernel: shared-memory swizzle, the row/column each lane
// hands to ldmatrix, and the accumulator coordinates of mma.m16n8k16. Pure integer functions,
// tested on the host (csrc/tests/test_cuda_layout.cpp) and run by the emulation harness.
#pragma once

#include "ropekern/macros.h"

namespace ropekern {
namespace cuda {

// Tiles are [rows][kD] row-major in 16-byte chunks of 8 elements. The chunk index is XORed with
// (row % 8): a row is kD * 2 >= 128 bytes, so without the swizzle the 8 row addresses of one
// ldmatrix phase hit the same 16-byte bank group (8-way conflict); with it they hit 8 different
// groups. cp.async writes whole chunks, so it is unaffected. Needs kD % 64 == 0 (>= 8 chunks).
template <int kD>
RK_HOST_DEVICE int smem_index(int row, int col) {
  static_assert(kD % 64 == 0, "the XOR swizzle permutes 8 chunks of 8 elements");
  return row * kD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// ldmatrix.x4 addresses. Lanes 8j..8j+7 address the 8 rows of matrix j; which 8x8 matrices are
// loaded decides which operand registers come out.
//
// A operand (16x16 block of Q at (m0, k0), row-major): matrices (rows 0-7, cols 0-7),
// (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) give a0a1, a2a3, a4a5, a6a7.
RK_HOST_DEVICE int a_ldm_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
RK_HOST_DEVICE int a_ldm_col(int lane) { return (lane >> 4) * 8; }

// B operand of S = Q K^T from K stored [key][d] (no transpose): B[k = d][n = key]. Matrices
// (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15) give
// {b0b1, b2b3} of the n8 block of keys 0-7, then of keys 8-15.
RK_HOST_DEVICE int bk_ldm_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
RK_HOST_DEVICE int bk_ldm_col(int lane) { return ((lane >> 3) & 1) * 8; }

// B operand of O = P V from V stored [key][d] with ldmatrix.trans: B[k = key][n = d]. Matrices
// (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15) give
// {b0b1, b2b3} of the n8 block of d 0-7, then of d 8-15. Same lane pattern as the A operand.
RK_HOST_DEVICE int bv_ldm_row(int lane) { return a_ldm_row(lane); }
RK_HOST_DEVICE int bv_ldm_col(int lane) { return a_ldm_col(lane); }

// Accumulator element i (0..3) of a lane in an m16n8 tile.
RK_HOST_DEVICE int acc_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
RK_HOST_DEVICE int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

}  // namespace cuda
}  // namespace ropekern
