// Host tests of the CUDA kernels' index math (csrc/cuda/layout.h) and split planning: the smem
// swizzle is a bijection and conflict-free for every ldmatrix phase, and the lane addresses
// produce exactly the mma.m16n8k16 operand fragments of the PTX ISA (checked against the
// fragment formulas directly, independently of the emulator). Runs in milliseconds.
#include <cstdio>
#include <set>
#include <vector>

#include "layout.h"
#include "ropekern/rope_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

template <int kD>
void test_swizzle() {
  constexpr int kRows = 128;
  std::vector<int> seen(kRows * kD, 0);
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kD; ++c) {
      const int i = ropekern::cuda::smem_index<kD>(r, c);
      if (i < 0 || i >= kRows * kD || i / kD != r) {
        expect(false, "swizzle stays inside its row");
        return;
      }
      ++seen[i];
      // Chunks stay contiguous: 8 consecutive columns of a chunk are 8 consecutive elements.
      if (c % 8 != 0 && i != ropekern::cuda::smem_index<kD>(r, c - 1) + 1) expect(false, "chunks stay contiguous");
    }
  }
  for (int n : seen) {
    if (n != 1) {
      expect(false, "swizzle is a bijection");
      return;
    }
  }
  // An ldmatrix phase reads 8 rows (8 consecutive tile rows, one 16-byte chunk each). Shared memory
  // has 32 banks of 4 bytes = 8 groups of 16 bytes; conflict-free means 8 distinct groups.
  for (int r0 = 0; r0 + 8 <= kRows; ++r0) {
    for (int c = 0; c < kD; c += 8) {
      std::set<int> groups;
      for (int r = r0; r < r0 + 8; ++r) groups.insert((ropekern::cuda::smem_index<kD>(r, c) * 2 / 16) % 8);
      if (groups.size() != 8) {
        expect(false, "ldmatrix phase is bank-conflict free");
        return;
      }
    }
  }
}

// The (row, col) of each operand element that a lane receives from ldmatrix.x4 when lane l
// addresses (row0 + row(l), col0 + col(l)): register j comes from matrix j (lanes 8j..8j+7),
// element e of it is row l/4, column 2(l%4)+e of that matrix (transposed for .trans).
struct Coord {
  int row, col;
};

Coord ldm_element(int lane, int reg, int e, bool trans, int (*row_of)(int), int (*col_of)(int)) {
  if (!trans) {
    const int src = 8 * reg + lane / 4;
    return {row_of(src), col_of(src) + 2 * (lane % 4) + e};
  }
  const int src = 8 * reg + 2 * (lane % 4) + e;
  return {row_of(src), col_of(src) + lane / 4};
}

void test_fragments() {
  using namespace ropekern::cuda;
  bool a_ok = true, bk_ok = true, bv_ok = true, acc_ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int reg = 0; reg < 4; ++reg) {
      for (int e = 0; e < 2; ++e) {
        // A fragment (PTX: a_i, i = 2 reg + e: row g (+8 for i in 2,3,6,7), col 2t + e (+8 for i >= 4)).
        const int i = 2 * reg + e;
        const Coord a = ldm_element(lane, reg, e, false, a_ldm_row, a_ldm_col);
        a_ok &= a.row == g + ((i == 2 || i == 3 || i >= 6) ? 8 : 0) && a.col == 2 * t + e + (i >= 4 ? 8 : 0);
        // K as B (no transpose), matrix rows = keys (n), columns = d (k): registers 0,1 are b0b1, b2b3
        // of the n8 block of keys 0-7; 2,3 of keys 8-15. PTX: b_i row(k) 2t + (i&1) (+8 for i >= 2), col(n) g.
        const Coord bk = ldm_element(lane, reg, e, false, bk_ldm_row, bk_ldm_col);
        const int bi = 2 * (reg % 2) + e;
        bk_ok &= bk.row == g + 8 * (reg / 2) && bk.col == 2 * t + (bi & 1) + (bi >= 2 ? 8 : 0);
        // V as B (transposed load), matrix rows = keys (k), columns = d (n): registers 0,1 serve the
        // n8 block of d 0-7, 2,3 of d 8-15.
        const Coord bv = ldm_element(lane, reg, e, true, bv_ldm_row, bv_ldm_col);
        bv_ok &= bv.row == 2 * t + e + 8 * (reg % 2) && bv.col == g + 8 * (reg / 2);
      }
    }
    for (int i = 0; i < 4; ++i) {
      acc_ok &= acc_row(lane, i) == g + (i >= 2 ? 8 : 0) && acc_col(lane, i) == 2 * t + (i & 1);
    }
  }
  expect(a_ok, "ldmatrix lane addresses give the PTX A fragment");
  expect(bk_ok, "ldmatrix lane addresses give the PTX B fragment for K");
  expect(bv_ok, "ldmatrix.trans lane addresses give the PTX B fragment for V");
  expect(acc_ok, "accumulator coordinates follow the PTX C layout");
  // The S accumulators of n8 tiles 2kk, 2kk+1 re-used as the A fragment of P: A register j holds
  // (row g + 8 (j % 2), cols 2t, 2t+1 + 8 (j / 2)) = tile 2kk + j / 2, elements 2 (j % 2), +1.
  bool p_ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 4; ++j) {
      for (int e = 0; e < 2; ++e) {
        const int tile = j / 2, i = 2 * (j % 2) + e;  // accumulator element used for A reg j, half e
        const Coord a = ldm_element(lane, j, e, false, a_ldm_row, a_ldm_col);
        p_ok &= acc_row(lane, i) == a.row && 8 * tile + acc_col(lane, i) == a.col;
      }
    }
  }
  expect(p_ok, "S accumulators are the A fragment of P V");
}

void test_rope_slots() {
  // Every (row, pair) of a tile is rotated exactly once by the slot/row-step mapping of
  // rotate_tile: slot = tid % (D/2), rows tid / (D/2) + k * (NT / (D/2)).
  const int configs[][2] = {{64, 256}, {128, 256}, {256, 128}, {64, 128}, {128, 128}};
  for (const auto& c : configs) {
    const int d = c[0], nt = c[1], rows = 64;
    for (int rotary = 0; rotary <= d; rotary += 16) {
      for (int interleaved = 0; interleaved < 2; ++interleaved) {
        std::vector<int> hits(rows * d, 0);
        for (int tid = 0; tid < nt; ++tid) {
          const int slot = tid % (d / 2);
          if (slot >= rotary / 2) continue;
          for (int r = tid / (d / 2); r < rows; r += nt / (d / 2)) {
            ++hits[r * d + ropekern::pair_first(slot, interleaved)];
            ++hits[r * d + ropekern::pair_second(slot, rotary, interleaved)];
          }
        }
        for (int r = 0; r < rows; ++r) {
          for (int ch = 0; ch < d; ++ch) {
            const int want = ch < rotary ? 1 : 0;
            if (hits[r * d + ch] != want) {
              expect(false, "rotation pass covers each rotary channel once and no pass-through channel");
              return;
            }
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  test_swizzle<64>();
  test_swizzle<128>();
  test_swizzle<256>();
  test_fragments();
  test_rope_slots();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all CUDA layout tests passed\n");
  return 0;
}
