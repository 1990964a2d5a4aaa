// Host emulation of the parts of the CUDA execution model that ropekern's kernels use, so that the
// kernel source itself (not a re-implementation) runs and is tested on a machine without a GPU.
//
// Compiled only with -DRK_EMULATE by a host C++ compiler (csrc/tests/test_cuda_emulated.cpp).
// Every CUDA thread is a fiber (ucontext) with its own stack. The scheduler models independent
// warps: it repeatedly picks a random warp and runs its lanes until each reaches its next
// synchronisation point, releasing any barrier as soon as it completes, so one warp can run far
// ahead of another exactly where the kernel allows it:
//   * __syncthreads: a CTA barrier; a barrier reached after some threads returned, or a warp
//     collective executed by part of a warp, is reported as an error (deadlock/divergence);
//   * warp collectives (shuffle, ldmatrix, mma.sync): each lane deposits its operands, the warp
//     waits for all 32 lanes, then each lane computes its result from everyone's operands with the
//     fragment layouts of the PTX ISA (mma.m16n8k16 .f16/.bf16, ldmatrix .m8n8 .x4 [.trans]);
//   * cp.async: copies are queued per thread; a committed group lands after a random number of the
//     issuing thread's synchronisation points (half of the groups within 3, the others within 400)
//     or when cp.async.wait_group retires it. A read of a tile that was not waited for sees stale
//     data, and an early landing overwrites a buffer another warp may still read, so both kinds of
//     missing synchronisation show up as wrong results.
// Shared memory starts as 0xFF bytes (NaN in fp16/bf16), so reads of unwritten smem poison results.
// The scheduling seed varies the interleaving (test_cuda_emulated [seed]). This models semantics,
// not performance: bank conflicts, occupancy and timing are not modelled.
#pragma once

#if !defined(RK_EMULATE)
#error "emu/simt.h is the host emulation of CUDA; compile with -DRK_EMULATE"
#endif

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace rk_emu {

// ------------------------------------------------------------------ 16-bit float storage types
// Bit-exact IEEE binary16 / bfloat16 with round-to-nearest-even conversions (as __float2half_rn,
// __float2bfloat16_rn), so rounding in the emulated kernels matches the device.
struct half {
  uint16_t bits;
};
struct bfloat16 {
  uint16_t bits;
};

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exp = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (exp == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (e <= 0) {  // subnormal half: value = h * 2^-24
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may reach the exponent / inf
  return static_cast<uint16_t>(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((x >> 16) & 0x8000u) | 0x7fc0u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// ------------------------------------------------------------------ fibers and the CTA scheduler
enum class Wait { kRunnable, kCta, kWarp, kExited };

struct PendingCopy {
  void* dst;
  const void* src;
  bool zero_fill;
};

struct CopyGroup {
  std::vector<PendingCopy> copies;
  int lands_after = 0;  // synchronisation points of the issuing thread until the copies land
};

struct Fiber {
  ucontext_t ctx;
  dim3 thread_idx;
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::kRunnable;
  unsigned collective_seq = 0;
  std::vector<CopyGroup> committed;
  std::vector<PendingCopy> open_group;
};

// Operands deposited by the lanes of one warp for one collective; two phases so that a lane that
// runs ahead to the next collective never overwrites operands another lane is still reading.
struct WarpExchange {
  uint32_t words[2][32][10];
  const void* ptr[2][32];
  int kind[2][32];
  int arrived = 0;
};

struct Cta {
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> warps;
  std::vector<unsigned char> smem;
  dim3 block_idx, block_dim, grid_dim;
  std::function<void()> body;
  int arrived_cta = 0, exited = 0, live = 0;
  std::mt19937_64 rng;
  std::string error;
};

inline Cta*& current_cta() {
  static Cta* cta = nullptr;
  return cta;
}
inline Fiber*& current_fiber() {
  static Fiber* fiber = nullptr;
  return fiber;
}
inline ucontext_t& scheduler_context() {
  static ucontext_t ctx;
  return ctx;
}
// Launch options shared by every emulated launch (tests set the seed to vary the interleaving).
struct Options {
  uint64_t seed = 1;
  size_t stack_bytes = 256 * 1024;
};
inline Options& options() {
  static Options o;
  return o;
}

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("emulated kernel: " + what); }

inline void complete_group(const CopyGroup& group) {
  for (const PendingCopy& c : group.copies) {
    if (c.zero_fill) {
      std::memset(c.dst, 0, 16);
    } else {
      std::memcpy(c.dst, c.src, 16);
    }
  }
}

// Suspend the current fiber until the scheduler releases it; its in-flight copies age by one step.
inline void yield(Wait why) {
  Cta& cta = *current_cta();
  Fiber& f = *current_fiber();
  f.wait = why;
  if (why == Wait::kCta) ++cta.arrived_cta;
  if (why == Wait::kWarp) ++cta.warps[f.warp].arrived;
  for (size_t g = 0; g < f.committed.size();) {
    if (--f.committed[g].lands_after <= 0) {
      complete_group(f.committed[g]);
      f.committed.erase(f.committed.begin() + static_cast<long>(g));
    } else {
      ++g;
    }
  }
  swapcontext(&f.ctx, &scheduler_context());
}

inline void fiber_entry() {
  try {
    current_cta()->body();
  } catch (const std::exception& e) {  // an exception cannot unwind past a fiber's stack
    current_cta()->error = e.what();
  }
  Fiber& f = *current_fiber();
  f.wait = Wait::kExited;
  ++current_cta()->exited;
  --current_cta()->live;
}  // returns through uc_link to the scheduler

// Release whatever barrier is complete; false when nothing can run (a deadlock).
inline bool release(Cta& cta) {
  bool any = false;
  if (cta.live > 0 && cta.arrived_cta == cta.live) {
    if (cta.exited > 0) fail("__syncthreads reached after some threads of the block returned");
    for (Fiber& f : cta.fibers) {
      if (f.wait == Wait::kCta) f.wait = Wait::kRunnable;
    }
    cta.arrived_cta = 0;
    any = true;
  }
  for (size_t w = 0; w < cta.warps.size(); ++w) {
    WarpExchange& ex = cta.warps[w];
    if (ex.arrived == 32) {
      for (int l = 0; l < 32; ++l) cta.fibers[w * 32 + l].wait = Wait::kRunnable;
      ex.arrived = 0;
      any = true;
    } else if (ex.arrived > 0) {
      for (int l = 0; l < 32; ++l) {
        if (cta.fibers[w * 32 + l].wait == Wait::kExited) {
          fail("warp collective executed after some lanes of the warp returned");
        }
      }
    }
  }
  return any;
}

// Run one CTA of `threads` threads to completion.
inline void run_cta(dim3 block_idx, dim3 block_dim, dim3 grid_dim, size_t smem_bytes, const std::function<void()>& body,
                    uint64_t seed) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (threads % 32 != 0) fail("block size must be a multiple of 32");
  Cta cta;
  cta.block_idx = block_idx;
  cta.block_dim = block_dim;
  cta.grid_dim = grid_dim;
  cta.body = body;
  cta.smem.assign(smem_bytes + 16, 0xff);
  cta.fibers.resize(threads);
  cta.warps.resize(threads / 32);
  cta.live = threads;
  cta.rng.seed(seed);
  static std::vector<std::unique_ptr<char[]>> stacks;  // reused across CTAs
  const size_t stack_bytes = options().stack_bytes;
  while (stacks.size() < static_cast<size_t>(threads)) stacks.emplace_back(new char[stack_bytes]);
  current_cta() = &cta;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = cta.fibers[t];
    f.linear = t;
    f.warp = t / 32;
    f.lane = t % 32;
    f.thread_idx = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[t].get();
    f.ctx.uc_stack.ss_size = stack_bytes;
    f.ctx.uc_link = &scheduler_context();
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> warps, lanes;
  while (cta.live > 0) {
    warps.clear();
    for (int w = 0; w < threads / 32; ++w) {
      for (int l = 0; l < 32; ++l) {
        if (cta.fibers[w * 32 + l].wait == Wait::kRunnable) {
          warps.push_back(w);
          break;
        }
      }
    }
    if (warps.empty()) fail("deadlock: threads wait at different barriers (divergent __syncthreads or collective)");
    // One step of a random warp: each runnable lane runs to its next synchronisation point.
    const int w = warps[std::uniform_int_distribution<size_t>(0, warps.size() - 1)(cta.rng)];
    lanes.clear();
    for (int l = 0; l < 32; ++l) {
      if (cta.fibers[w * 32 + l].wait == Wait::kRunnable) lanes.push_back(w * 32 + l);
    }
    std::shuffle(lanes.begin(), lanes.end(), cta.rng);
    for (int t : lanes) {
      current_fiber() = &cta.fibers[t];
      swapcontext(&scheduler_context(), &cta.fibers[t].ctx);
      if (!cta.error.empty()) {
        current_cta() = nullptr;
        throw std::runtime_error(cta.error);
      }
    }
    release(cta);
  }
  current_cta() = nullptr;
  current_fiber() = nullptr;
}

// Emulated kernel launch: every CTA of the grid, one after the other.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  uint64_t seed = options().seed;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        run_cta(dim3(x, y, z), block, grid, smem_bytes, body, seed++);
      }
    }
  }
}

inline unsigned char* shared_memory() {
  // 16-byte aligned like the device's dynamic shared memory.
  auto p = reinterpret_cast<uintptr_t>(current_cta()->smem.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

// ------------------------------------------------------------------ synchronisation and collectives
inline void syncthreads() { yield(Wait::kCta); }

enum Kind { kShfl = 1, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBf16 };

// Deposit this lane's operands, wait for the whole warp, return the phase to read.
inline int exchange(int kind, const uint32_t* words, int n, const void* ptr) {
  Fiber& f = *current_fiber();
  WarpExchange& ex = current_cta()->warps[f.warp];
  const int phase = static_cast<int>(f.collective_seq++ & 1u);
  for (int i = 0; i < n; ++i) ex.words[phase][f.lane][i] = words[i];
  ex.ptr[phase][f.lane] = ptr;
  ex.kind[phase][f.lane] = kind;
  yield(Wait::kWarp);
  for (int l = 0; l < 32; ++l) {
    if (ex.kind[phase][l] != kind) fail("lanes of a warp executed different collectives");
  }
  return phase;
}

inline uint32_t shfl_xor(uint32_t v, int mask) {
  const int phase = exchange(kShfl, &v, 1, nullptr);
  return current_cta()->warps[current_fiber()->warp].words[phase][current_fiber()->lane ^ mask][0];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 give the row addresses of
// matrix j; register j of lane l holds row l/4, elements 2(l%4) and 2(l%4)+1 of matrix j (lower
// column in the low half), or with .trans the same elements of the transposed matrix.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr, bool trans) {
  const uintptr_t smem_lo = reinterpret_cast<uintptr_t>(current_cta()->smem.data());
  const uintptr_t smem_hi = smem_lo + current_cta()->smem.size();
  const auto p = reinterpret_cast<uintptr_t>(row_ptr);
  if (p < smem_lo || p + 16 > smem_hi) fail("ldmatrix address outside shared memory");
  if (p % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  const int phase = exchange(trans ? kLdmatrixTrans : kLdmatrix, nullptr, 0, row_ptr);
  const int lane = current_fiber()->lane;
  const WarpExchange& ex = current_cta()->warps[current_fiber()->warp];
  for (int j = 0; j < 4; ++j) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      if (!trans) {
        const auto* row = static_cast<const uint16_t*>(ex.ptr[phase][8 * j + lane / 4]);
        e[h] = row[2 * (lane % 4) + h];
      } else {
        const auto* row = static_cast<const uint16_t*>(ex.ptr[phase][8 * j + 2 * (lane % 4) + h]);
        e[h] = row[lane / 4];
      }
    }
    r[j] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d = a * b + c.
// A (16x16): a_i of lane l: row g = l/4 (+8 for i in {2,3,6,7}), col 2(l%4) + (i&1) (+8 for i >= 4),
// packed two per register. B (16x8): b_i: row 2(l%4) + (i&1) (+8 for i >= 2), col g.
// C/D (16x8): c_i: row g (+8 for i >= 2), col 2(l%4) + (i&1).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  uint32_t words[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const int phase = exchange(bf16 ? kMmaBf16 : kMmaF16, words, 6, nullptr);
  const WarpExchange& ex = current_cta()->warps[current_fiber()->warp];
  auto element = [&](int lane, int word, int half_idx) {
    const uint16_t bits = static_cast<uint16_t>(ex.words[phase][lane][word] >> (16 * half_idx));
    return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
  };
  auto A = [&](int row, int k) {
    const int lane = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row / 8) + 2 * (k / 8);
    return element(lane, reg, k % 2);
  };
  auto B = [&](int k, int col) {
    const int lane = col * 4 + (k % 8) / 2;
    return element(lane, 4 + k / 8, k % 2);
  };
  const int lane = current_fiber()->lane;
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
}

// cp.async.cg.shared.global 16 bytes (src-size 0 zero-fills), commit_group, wait_group N.
inline void copy_async_16(void* dst, const void* src, bool valid) {
  const uintptr_t smem_lo = reinterpret_cast<uintptr_t>(current_cta()->smem.data());
  const uintptr_t smem_hi = smem_lo + current_cta()->smem.size();
  const auto p = reinterpret_cast<uintptr_t>(dst);
  if (p < smem_lo || p + 16 > smem_hi) fail("cp.async destination outside shared memory");
  if (p % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)) fail("cp.async address not 16-byte aligned");
  current_fiber()->open_group.push_back({dst, src, !valid});
}
inline void cp_async_commit() {
  Fiber& f = *current_fiber();
  std::mt19937_64& rng = current_cta()->rng;
  const int horizon = std::uniform_int_distribution<int>(0, 1)(rng) ? 3 : 400;
  f.committed.push_back({std::move(f.open_group), std::uniform_int_distribution<int>(1, horizon)(rng)});
  f.open_group.clear();
}
inline void cp_async_wait(int n) {
  Fiber& f = *current_fiber();
  while (static_cast<int>(f.committed.size()) > n) {  // groups retire in commit order
    complete_group(f.committed.front());
    f.committed.erase(f.committed.begin());
  }
}

}  // namespace rk_emu

// CUDA built-in variables, per emulated thread / block.
#define threadIdx (::rk_emu::current_fiber()->thread_idx)
#define blockIdx (::rk_emu::current_cta()->block_idx)
#define blockDim (::rk_emu::current_cta()->block_dim)
#define gridDim (::rk_emu::current_cta()->grid_dim)
