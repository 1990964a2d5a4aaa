// Torch-free test of the CPU kernel units (csrc/cpu/kernels_*.cpp, the `Kernels` tables of
// csrc/cpu/kernels.h) against an fp64 reference computed here. The plans are filled as
// csrc/cpu/ops.cpp fills them (cos/sin tables through cos_sin_rows, block_m, decode splits and the
// partial buffer, 64-byte aligned scratch per item), so this runs exactly the code the torch
// extension runs, on any machine, without torch:
//
//   test_cpu_kernels [--quick] [--case SUBSTRING] [--verbose] [--list] [UNIT...]
//
// Every unit linked in (the compile-time list `kUnits` below: generic, avx2, avx512, amx on x86-64;
// generic (and neon on aarch64) elsewhere; avx512_simde alone in the SIMDe build) runs when
// the CPU and OS support it, or only the UNITs named. --quick (or ROPEKERN_CPU_TEST_QUICK=1) runs the smaller case list meant
// for emulated runs (the SIMDe build of the AVX-512 unit, qemu-user on aarch64). Exit status:
// 0 all passed, 1 a failure (each one named: unit, case, dtype, element), 2 bad usage, 77 no
// requested unit can run on this CPU (ctest's SKIP_RETURN_CODE).
//
// Reference (fp64, inputs first rounded to the I/O dtype): exact angles pos * inv_freq reduced mod
// 2 pi (to ~1e-15 rad: exact_cos_sin); q and k rotated (half-split pairs (i, i + R/2) or interleaved
// (2i, 2i + 1); channels >= R pass through), cos and sin times attention_factor; softmax attention
// with softmax_scale, causal bottom-right (query i sees key j iff j <= i + Sk - Sq), GQA (query
// head h reads KV head h / (Hq / Hkv)); natural-log LSE; a row that sees no key gives zeros and
// LSE -inf.
//
// Besides the values, every run checks: no write outside the outputs or an item's scratch (guard
// bytes), every output element written (outputs start as NaN), no use of uninitialised scratch
// (scratch starts as NaN), NaN/inf in V rows that a causal query cannot see (and in cache rows past
// a sequence's length) never reaching its output, and (full list) the same bits when the items
// run on two threads.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../cpu/cpu_features.h"
#include "../cpu/kernels.h"
#include "ropekern/rope_math.h"  // kSplitRows

using ropekern::AttnParams;
using ropekern::DecodeParams;
using ropekern::kSplitRows;
using ropekern::RopeParams;
using namespace ropekern::cpu;

#if defined(RK_TEST_SIMDE)
// The AVX-512 unit compiled a second time with RK_SIMDE (SIMDe's portable intrinsics): same source,
// table renamed so that it can sit beside the native one.
namespace ropekern {
namespace cpu {
extern const Kernels kAvx512SimdeKernels;
}
}  // namespace ropekern
#endif

namespace {

// ============================================================================ CPU features
// cpu_runs_avx2/avx512/amx (cpu_features.h): the same checks as the dispatch (ops.cpp).
[[maybe_unused]] bool cpu_any() { return true; }

// ============================================================================ the units
struct Unit {
  const char* name;
  const Kernels* kern;
  bool (*supported)();
  const char* needs;
  // The unit's tiled kernel rounds the rotated Q/K and the probabilities to bf16 (fp32
  // accumulation) for bf16 I/O with head dims a multiple of 32 (the AMX unit's tile path): those
  // checks add the bf16-intermediate terms of `Problem::tile_out_tol` to the bounds.
  bool bf16_tiles = false;
};

const Unit kUnits[] = {
#if defined(RK_TEST_SIMDE)
    // compiled with -mavx2 -mfma -mf16c (SIMDe emulates only the AVX-512 part): needs AVX2 to run
    {"avx512_simde", &kAvx512SimdeKernels, cpu_runs_avx2, "AVX2, FMA and F16C (the SIMDe object is built with them)"},
#else
    {"generic", &kGenericKernels, cpu_any, ""},
#if defined(ROPEKERN_HAVE_AVX2_UNIT)
    {"avx2", &kAvx2Kernels, cpu_runs_avx2, "AVX2, FMA, F16C and OS ymm state"},
#endif
#if defined(ROPEKERN_HAVE_AVX512_UNIT)
    {"avx512", &kAvx512Kernels, cpu_runs_avx512, "AVX-512F/BW/VL/DQ, AVX2/FMA/F16C and OS zmm state"},
#endif
#if defined(ROPEKERN_HAVE_AMX_UNIT) || defined(ROPEKERN_HAVE_AVX512_UNIT)  // kernels.h declares both together
    {"amx", &kAmxKernels, cpu_runs_amx, "AMX-TILE/BF16 (+ the avx512 unit's needs), OS tile state and permission", true},
#endif
#if defined(ROPEKERN_HAVE_NEON_UNIT)
    {"neon", &kNeonKernels, cpu_any, ""},
#endif
#endif
};
constexpr int kNumUnits = static_cast<int>(sizeof(kUnits) / sizeof(kUnits[0]));

// ops.cpp choose_block_m: G * block_m ~ kTileRows, a multiple of the unit's micro-kernel rows
// (Kernels::micro_rows).
int choose_block_m(int G, int micro) {
  int bm = std::max(1, (kTileRows + G - 1) / G);
  while ((bm * G) % micro) ++bm;
  return bm;
}
// The smallest block_m with at least `rows` query rows per item (more items, more block edges
// in a small case), same multiple rule.
int small_block_m(int G, int micro, int rows) {
  int bm = std::max(1, (rows + G - 1) / G);
  while ((bm * G) % micro) ++bm;
  return bm;
}

// ============================================================================ dtypes
const char* const kDtypeNames[3] = {"f32", "bf16", "f16"};

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
uint16_t to_bf16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // nearest, ties to even
}
double from_bf16(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }
// IEEE binary16, nearest-even, written by value (not bit tricks) to be independent of vec.h.
uint16_t to_f16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (f != f) return 0x7E00;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7C00;  // rounds to inf (and inf)
  if (a < 0x1p-14) return sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24));  // 1024: smallest normal
  int e = 0;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e)
  const double ulp = std::ldexp(1.0, e - 1 - 10);
  const double r = std::nearbyint(a / ulp) * ulp;
  std::frexp(r, &e);
  const int E = e - 1;
  const int mant = static_cast<int>(r / std::ldexp(1.0, E - 10)) - 1024;
  return static_cast<uint16_t>(sign | ((E + 15) << 10) | mant);
}
double from_f16(uint16_t h) {
  const int exp = (h >> 10) & 31, mant = h & 1023;
  double v;
  if (exp == 0)
    v = std::ldexp(static_cast<double>(mant), -24);
  else if (exp == 31)
    v = mant ? NAN : INFINITY;
  else
    v = std::ldexp(static_cast<double>(1024 + mant), exp - 25);
  return (h & 0x8000) ? -v : v;
}

// A typed I/O buffer (fp32, or bf16/fp16 bits) with guard elements after its n elements. Outputs
// start as NaN (every element must be written) and the guard must survive.
struct Buf {
  DType dt = DType::kFloat32;
  size_t n = 0;
  std::vector<unsigned char> mem;
  static constexpr size_t kGuard = 64;

  Buf() = default;
  Buf(DType t, size_t count) : dt(t), n(count), mem((count + kGuard) * es()) { poison(); }
  size_t es() const { return dt == DType::kFloat32 ? 4 : 2; }
  void* data() { return mem.data(); }
  // NaN in every dtype: fp32 0x7FA5A5A5, bf16 / fp16 0x7FA5.
  void poison() {
    if (es() == 4) {
      for (size_t i = 0; i < n + kGuard; ++i) std::memcpy(&mem[i * 4], "\xA5\xA5\xA5\x7F", 4);
    } else {
      for (size_t i = 0; i < n + kGuard; ++i) std::memcpy(&mem[i * 2], "\xA5\x7F", 2);
    }
  }
  bool guard_ok() const {
    for (size_t i = n; i < n + kGuard; ++i) {
      if (es() == 4 ? std::memcmp(&mem[i * 4], "\xA5\xA5\xA5\x7F", 4) : std::memcmp(&mem[i * 2], "\xA5\x7F", 2))
        return false;
    }
    return true;
  }
  // Stores x rounded to the dtype; returns the stored value.
  double set(size_t i, double x) {
    const float f = static_cast<float>(x);
    switch (dt) {
      case DType::kFloat32: std::memcpy(&mem[i * 4], &f, 4); return f;
      case DType::kBFloat16: {
        const uint16_t h = to_bf16(f);
        std::memcpy(&mem[i * 2], &h, 2);
        return from_bf16(h);
      }
      case DType::kFloat16: {
        const uint16_t h = to_f16(f);
        std::memcpy(&mem[i * 2], &h, 2);
        return from_f16(h);
      }
    }
    return 0.0;
  }
  double get(size_t i) const {
    if (dt == DType::kFloat32) {
      float f;
      std::memcpy(&f, &mem[i * 4], 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, &mem[i * 2], 2);
    return dt == DType::kBFloat16 ? from_bf16(h) : from_f16(h);
  }
};

// fp32 buffer with a guard, poisoned with NaN (LSE, partial).
struct FBuf {
  std::vector<float> v;
  size_t n = 0;
  static constexpr size_t kGuard = 32;
  explicit FBuf(size_t count = 0) : v(count + kGuard, bits_float(0x7FA5A5A5u)), n(count) {}
  float* data() { return v.data(); }
  bool guard_ok() const {
    for (size_t i = n; i < n + kGuard; ++i)
      if (float_bits(v[i]) != 0x7FA5A5A5u) return false;
    return true;
  }
};

// A 64-byte aligned scratch buffer as ops.cpp's Scratch (at least 16 floats, rounded to 64 bytes),
// followed by 256 guard bytes; refilled with NaN before every item.
struct Scratch {
  float* ptr = nullptr;
  size_t bytes = 0;
  static constexpr size_t kGuardBytes = 256;
  explicit Scratch(int64_t floats) {
    bytes = (static_cast<size_t>(std::max<int64_t>(floats, 16)) * sizeof(float) + 63) / 64 * 64;
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes + kGuardBytes));
    if (!ptr) {
      std::printf("cannot allocate %zu bytes of scratch\n", bytes);
      std::exit(1);
    }
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void poison() {
    const uint32_t nan = 0x7FA5A5A5u;
    for (size_t i = 0; i < (bytes + kGuardBytes) / 4; ++i) std::memcpy(reinterpret_cast<char*>(ptr) + 4 * i, &nan, 4);
  }
  bool guard_ok() const {
    const unsigned char* g = reinterpret_cast<const unsigned char*>(ptr) + bytes;
    for (size_t i = 0; i < kGuardBytes; i += 4)
      if (g[i] != 0xA5 || g[i + 1] != 0xA5 || g[i + 2] != 0xA5 || g[i + 3] != 0x7F) return false;
    return true;
  }
};

// Run items 0..n-1 on `threads` threads (1 or 2) pulling from an atomic counter, each thread with
// its own scratch (as ops.cpp's run_items). False if an item wrote past its scratch.
template <class F>
bool run_items(int64_t n_items, int64_t scratch_floats, int threads, const F& fn) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  auto worker = [&]() {
    Scratch s(scratch_floats);
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) {
      s.poison();
      fn(i, s.ptr);
      if (!s.guard_ok()) ok = false;
    }
  };
  if (threads <= 1 || n_items < 2) {
    worker();
  } else {
    std::thread t(worker);
    worker();
    t.join();
  }
  return ok;
}

// ============================================================================ the cases
enum class Mode { kDense, kVarlen, kCache, kDecode, kRope };
enum class Pos { kDefault, kNearMax, kRandom, kRepeated };
const char* const kModeNames[] = {"dense", "varlen", "cache", "decode", "rope"};

struct Case {
  std::string name;
  Mode mode = Mode::kDense;
  std::vector<int> sq, sk;  // per sequence: queries, keys (cache/decode: keys = n_b); rope: sq = S
  int hq = 4, hkv = 4, d = 64, r = 64;
  bool causal = true, interleaved = false;
  float af = 1.0f;
  double scale = 0.0;  // 0: 1/sqrt(D)
  double q_amp = 1.0;  // q ~ N(0, q_amp^2): sharper softmax
  Pos pos = Pos::kDefault;
  bool per_seq_freqs = false;
  bool paged = false;
  int block_size = 16;
  int num_splits = 1;
  int s_new = 0;         // decode: cache_seqlens = n_b - s_new (the kernel adds it back)
  bool nan_v = false;    // NaN / inf in V rows that some causal queries cannot see
  bool kv_rows = false;  // K/V in their [.., S, Hkv, D] layout instead of ops.cpp's head-major copy
  bool no_lse = false;
  bool strided_out = false;  // rope: out rows/heads with a gap (the gap must stay untouched)
  int small_bm_rows = 0;     // tiled: block_m for about this many query rows instead of ops.cpp's
  bool quick = false;        // also in the --quick list
  int wl = -1, wr = -1;      // sliding window (AttnParams::window_left / right); wr unused under causal

  Case(std::string n, Mode m) : name(std::move(n)), mode(m) {}
  Case& window(int left, int right) {
    wl = left;
    wr = right;
    return *this;
  }
  Case& seqs(std::vector<int> q, std::vector<int> k) {
    sq = std::move(q);
    sk = std::move(k);
    return *this;
  }
  Case& heads(int q, int k) {
    hq = q;
    hkv = k;
    return *this;
  }
  Case& dims(int head_dim, int rotary_dim) {
    d = head_dim;
    r = rotary_dim;
    return *this;
  }
  Case& noncausal() {
    causal = false;
    return *this;
  }
  Case& il() {
    interleaved = true;
    return *this;
  }
  Case& factor(float f) {
    af = f;
    return *this;
  }
  Case& positions(Pos p) {
    pos = p;
    return *this;
  }
  Case& freqs_per_seq() {
    per_seq_freqs = true;
    return *this;
  }
  Case& page(int bs) {
    paged = true;
    block_size = bs;
    return *this;
  }
  Case& splits(int n) {
    num_splits = n;
    return *this;
  }
  Case& nan() {
    nan_v = true;
    return *this;
  }
  Case& rows_layout() {
    kv_rows = true;
    return *this;
  }
  Case& lse_off() {
    no_lse = true;
    return *this;
  }
  Case& sharp(double a) {
    q_amp = a;
    return *this;
  }
  Case& small_bm(int rows) {
    small_bm_rows = rows;
    return *this;
  }
  Case& new_tokens(int n) {
    s_new = n;
    return *this;
  }
  Case& strided() {
    strided_out = true;
    return *this;
  }
  Case& q() {
    quick = true;
    return *this;
  }
};

std::vector<Case> make_cases() {
  using M = Mode;
  std::vector<Case> c;
  // ---- dense prefill
  c.push_back(Case("dense causal D128 GQA4 200", M::kDense).seqs({200, 200}, {200, 200}).heads(8, 2).dims(128, 128));
  c.push_back(Case("dense causal D128 GQA4 70", M::kDense).seqs({70, 70}, {70, 70}).heads(8, 2).dims(128, 128).q());
  c.push_back(Case("dense non-causal D64 MHA 65", M::kDense).seqs({65}, {65}).heads(4, 4).dims(64, 64).noncausal().q());
  c.push_back(Case("dense non-causal D128 GQA3 200x333", M::kDense).seqs({200}, {333}).heads(6, 2).dims(128, 128)
                  .noncausal());
  c.push_back(Case("dense causal Sq<Sk 65x333 GQA3", M::kDense).seqs({65}, {333}).heads(6, 2).dims(64, 64));
  c.push_back(Case("dense causal Sq<Sk 7x65 GQA3", M::kDense).seqs({7}, {65}).heads(3, 1).dims(64, 64).q());
  c.push_back(Case("dense causal Sq>Sk 200x7 GQA8", M::kDense).seqs({200}, {7}).heads(8, 1).dims(64, 64).q());
  c.push_back(Case("dense causal Sq>Sk 333x200 GQA4", M::kDense).seqs({333}, {200}).heads(4, 1).dims(64, 64));
  c.push_back(Case("dense causal len 1", M::kDense).seqs({1, 1}, {1, 1}).heads(4, 1).dims(64, 64).q());
  c.push_back(Case("dense non-causal 1x200", M::kDense).seqs({1}, {200}).heads(8, 8).dims(64, 64).noncausal().q());
  c.push_back(Case("dense causal 333 D80 GQA3", M::kDense).seqs({333}, {333}).heads(3, 1).dims(80, 80));
  c.push_back(Case("dense causal 65 D80 GQA3", M::kDense).seqs({65}, {65}).heads(3, 1).dims(80, 80).q());
  c.push_back(Case("dense causal 130 D96 interleaved af1.3", M::kDense).seqs({130}, {130}).heads(4, 1).dims(96, 96)
                  .il().factor(1.3f).q());
  c.push_back(Case("dense causal 200 D64 R32 (partial)", M::kDense).seqs({200}, {200}).heads(4, 2).dims(64, 32).q());
  c.push_back(Case("dense causal 65 D64 R24 interleaved (partial)", M::kDense).seqs({65}, {65}).heads(4, 2)
                  .dims(64, 24).il().q());
  c.push_back(Case("dense causal 65 D64 R24 half-split (partial)", M::kDense).seqs({65}, {65}).heads(2, 2)
                  .dims(64, 24));
  c.push_back(Case("dense causal 200 R0 (no rotation)", M::kDense).seqs({200}, {200}).heads(4, 4).dims(64, 0).q());
  c.push_back(Case("dense causal D40 R40 (padded to 48)", M::kDense).seqs({65}, {65}).heads(4, 1).dims(40, 40).q());
  c.push_back(Case("dense non-causal D36 R20 interleaved af0.8", M::kDense).seqs({33}, {70}).heads(4, 2).dims(36, 20)
                  .il().factor(0.8f).noncausal());
  c.push_back(Case("dense causal positions near 2^31-1", M::kDense).seqs({65, 65}, {65, 65}).heads(4, 1)
                  .dims(128, 128).positions(Pos::kNearMax).freqs_per_seq().q());
  c.push_back(Case("dense non-causal random positions", M::kDense).seqs({65}, {200}).heads(4, 2).dims(64, 64)
                  .positions(Pos::kRandom).noncausal());
  c.push_back(Case("dense causal repeated positions", M::kDense).seqs({65}, {65}).heads(4, 4).dims(64, 64)
                  .positions(Pos::kRepeated).q());
  c.push_back(Case("dense causal sharp softmax (q x4) af1.5", M::kDense).seqs({200}, {200}).heads(4, 1).dims(128, 128)
                  .sharp(4.0).factor(1.5f));
  c.push_back(Case("dense causal GQA8 small block_m", M::kDense).seqs({65}, {65}).heads(8, 1).dims(64, 64)
                  .small_bm(24).q());
  c.push_back(Case("dense causal 333 MHA small block_m", M::kDense).seqs({333}, {333}).heads(2, 2).dims(64, 64)
                  .small_bm(12));
  c.push_back(Case("dense causal K/V rows layout, no LSE", M::kDense).seqs({65, 65}, {65, 65}).heads(4, 2).dims(64, 64)
                  .rows_layout().lse_off().q());
  c.push_back(Case("dense causal NaN/inf in masked V", M::kDense).seqs({100}, {100}).heads(4, 2).dims(64, 64).nan().q());
  c.push_back(Case("dense causal NaN/inf in masked V, D40, GQA3", M::kDense).seqs({70}, {100}).heads(3, 1).dims(40, 40)
                  .nan());
  c.push_back(Case("dense causal NaN/inf in masked V small block_m", M::kDense).seqs({100}, {100}).heads(2, 1)
                  .dims(64, 64).nan().small_bm(18));
  // ---- varlen (with empty sequences and sequences without keys)
  // Sliding windows: the left edge masks the first keys of blocks and skips whole blocks / chunks.
  c.push_back(Case("dense causal window 16 GQA4 200", M::kDense).seqs({200}, {200}).heads(8, 2).dims(64, 64)
                  .window(16, -1).q());
  c.push_back(Case("dense non-causal window 5/3 333x200", M::kDense).seqs({333}, {200}).heads(4, 1).dims(64, 64)
                  .noncausal().window(5, 3));
  c.push_back(Case("dense causal window 0 NaN/inf in masked V", M::kDense).seqs({100}, {100}).heads(4, 2)
                  .dims(64, 64).window(0, -1).nan().q());
  c.push_back(Case("varlen causal window 7", M::kVarlen).seqs({65, 0, 7, 200}, {65, 3, 70, 200}).heads(4, 1)
                  .dims(64, 64).window(7, -1));
  c.push_back(Case("cache causal paged window 20", M::kCache).seqs({40, 40}, {150, 67}).heads(8, 2).dims(64, 64)
                  .page(16).window(20, -1));
  c.push_back(Case("decode Sq3 causal window 30 splits3", M::kDecode).seqs({3, 3}, {300, 20}).heads(32, 8)
                  .dims(64, 64).splits(3).window(30, -1).q());
  c.push_back(Case("decode Sq3 non-causal window 4/1 NaN in masked V", M::kDecode).seqs({3}, {40}).heads(8, 2)
                  .dims(64, 64).noncausal().window(4, 1).nan());
  c.push_back(Case("varlen causal GQA4 per-seq freqs", M::kVarlen).seqs({65, 0, 7, 1, 200, 5}, {65, 0, 70, 1, 200, 0})
                  .heads(8, 2).dims(64, 64).freqs_per_seq().q());
  c.push_back(Case("varlen non-causal GQA4", M::kVarlen).seqs({33, 0, 7, 0}, {65, 3, 0, 0}).heads(4, 1).dims(64, 64)
                  .noncausal().q());
  c.push_back(Case("varlen causal D128 interleaved random positions", M::kVarlen).seqs({100, 33}, {200, 33}).heads(4, 4)
                  .dims(128, 128).il().positions(Pos::kRandom));
  c.push_back(Case("varlen causal K/V rows layout D96 R64", M::kVarlen).seqs({20, 65}, {20, 99}).heads(6, 2).dims(96, 64)
                  .rows_layout());
  // ---- KV-cache mode of the tiled kernel (cache_lens; dense or paged by block_table)
  c.push_back(Case("cache causal dense GQA8", M::kCache).seqs({40, 40}, {150, 67}).heads(8, 1).dims(64, 64).q());
  c.push_back(Case("cache causal paged bs16 GQA4 per-seq freqs", M::kCache).seqs({24, 24}, {150, 24}).heads(8, 2)
                  .dims(128, 128).page(16).freqs_per_seq().q());
  c.push_back(Case("cache non-causal paged bs16 D80", M::kCache).seqs({17}, {90}).heads(3, 1).dims(80, 80).page(16)
                  .noncausal());
  c.push_back(Case("cache causal paged NaN in masked V, interleaved R32", M::kCache).seqs({30, 30}, {100, 31})
                  .heads(4, 2).dims(64, 32).il().page(16).nan());
  // ---- decode (DecodePlan, split-K)
  c.push_back(Case("decode Sq1 GQA 32/8 D64 splits1", M::kDecode).seqs({1, 1}, {300, 20}).heads(32, 8).dims(64, 64).q());
  c.push_back(Case("decode Sq1 GQA 32/8 D32 splits3", M::kDecode).seqs({1, 1}, {300, 20}).heads(32, 8).dims(32, 32)
                  .splits(3));
  c.push_back(Case("decode Sq1 GQA 32/8 D64 splits3 paged", M::kDecode).seqs({1, 1}, {300, 20}).heads(32, 8).dims(64, 64)
                  .splits(3).page(16).q());
  c.push_back(Case("decode Sq3 causal GQA 32/8 D64 splits3", M::kDecode).seqs({3, 3}, {300, 20}).heads(32, 8)
                  .dims(64, 64).splits(3).freqs_per_seq().q());
  c.push_back(Case("decode Sq3 causal paged splits1 D128 s_new2", M::kDecode).seqs({3, 3}, {77, 3}).heads(8, 2)
                  .dims(128, 128).page(16).new_tokens(2));
  c.push_back(Case("decode Sq3 non-causal D40 R24 interleaved splits3", M::kDecode).seqs({3}, {90}).heads(8, 8).dims(40, 24)
                  .il().noncausal().splits(3));
  c.push_back(Case("decode Sq1 D96 R0 af2 splits3", M::kDecode).seqs({1, 1, 1}, {1, 33, 64}).heads(4, 1).dims(96, 0)
                  .splits(3).factor(2.0f));
  c.push_back(Case("decode Sq3 causal NaN in masked V (direct V) splits3", M::kDecode).seqs({3, 3}, {40, 17}).heads(8, 2)
                  .dims(64, 64).splits(3).nan().q());
  c.push_back(Case("decode Sq3 causal NaN in masked V (padded D40) paged", M::kDecode).seqs({3}, {40}).heads(8, 2)
                  .dims(40, 40).page(16).nan().q());
  c.push_back(Case("decode Sq3 causal sharp af1.3 no LSE", M::kDecode).seqs({3}, {200}).heads(4, 4).dims(64, 64)
                  .sharp(4.0).factor(1.3f).lse_off());
  // ---- apply_rope (rope_rows)
  c.push_back(Case("rope D128 R128", M::kRope).seqs({70, 70}, {}).heads(4, 4).dims(128, 128).q());
  c.push_back(Case("rope D64 R64 interleaved af1.5 per-seq freqs", M::kRope).seqs({33, 33}, {}).heads(3, 3).dims(64, 64)
                  .il().factor(1.5f).freqs_per_seq().q());
  c.push_back(Case("rope D64 R24 half-split (partial) strided out", M::kRope).seqs({33}, {}).heads(2, 2).dims(64, 24)
                  .strided().q());
  c.push_back(Case("rope D64 R24 interleaved (partial)", M::kRope).seqs({33}, {}).heads(2, 2).dims(64, 24).il().q());
  c.push_back(Case("rope D80 R32 positions near 2^31-1", M::kRope).seqs({65}, {}).heads(2, 2).dims(80, 32)
                  .positions(Pos::kNearMax).q());
  c.push_back(Case("rope D36 R0 (copy)", M::kRope).seqs({7}, {}).heads(2, 2).dims(36, 0).q());
  return c;
}

// ============================================================================ the problem
// Everything the reference needs, in a logical layout: q [Tq][Hq][D], k/v [Tk][Hkv][D] (sequence
// b's rows from qoff[b] / koff[b]), values already rounded to the dtype.
struct Problem {
  const Case* c = nullptr;
  DType dt = DType::kFloat32;
  int B = 0, Hq = 0, Hkv = 0, D = 0, R = 0, half = 0;
  double scale = 0.0;
  std::vector<int64_t> qoff, koff;
  int64_t Tq = 0, Tk = 0;
  std::vector<int32_t> qpos, kpos;  // [Tq], [Tk]
  int nT = 1;                       // rotary tables: 1 or B
  std::vector<double> inv;          // [nT][half]
  std::vector<float> split;         // [nT][kSplitRows][half]
  std::vector<double> q, k, v;      // rounded inputs
  std::vector<double> ref_out, ref_lse;  // [Tq][Hq][D], [Tq][Hq]
  // First-order bounds on what bf16 intermediates add (Unit::bf16_tiles; filled for bf16 only):
  // rotated q and k rounded to bf16 change score j by up to e_s * a_j, a_j = scale * sum_d |q_d k_d|,
  // e_s = 2^-7 + 2^-16 (two roundings of 2^-8 relative each), so the output moves by up to
  // sum_j w_j e_s a_j |v_j - out| and the LSE by sum_j w_j e_s a_j; each probability rounded to bf16
  // (2^-8 relative) moves the output by up to 2^-8 sum_j w_j (|v_j| + |out|) (either normalisation).
  std::vector<double> tile_out_tol, tile_lse_tol;
};

// Same split as ropekern/scaling.py split_turns (and csrc/tests/test_rope_math.cpp): 12 + 12 + 12
// bits and the fp32 remainder of the frequency in turns, from long double.
double round_bits(long double x, int bits) {
  int e = 0;
  const long double m = std::frexp(x, &e);
  return static_cast<double>(std::ldexp(std::nearbyint(std::ldexp(m, bits)), e - bits));
}
void split_freq(double inv_freq, float* out, int half) {
  long double r = inv_freq / (2.0L * std::acos(-1.0L));
  for (int k = 0; k + 1 < kSplitRows; ++k) {
    const double part = round_bits(r, 12);
    out[k * half] = static_cast<float>(part);
    r -= part;
  }
  out[(kSplitRows - 1) * half] = static_cast<float>(r);
}
// cos/sin of pos * inv_freq, the angle reduced mod 2 pi without long double (binary128 in software
// on aarch64, which made the qemu run several times slower): the product exactly as hi + lo
// (fma), 2 pi as P1 + P2 + P3 (Cody-Waite; P1 and P2 have 24 significant bits, so k * P1 and
// k * P2 are exact for k < 2^29, which covers pos < 2^31 with inv_freq <= 1; P3 leaves 3e-31
// relative): |angle error| ~1e-15 rad, against the kernels' ~1e-6.
constexpr double kTwoPiP1 = 0x1.921fb6p+2, kTwoPiP2 = -0x1.777a5cp-23, kTwoPiP3 = -0x1.ee59d9cceba4p-48;
constexpr double kInvTwoPi = 0x1.45f306dc9c883p-3;
void exact_cos_sin(int32_t pos, double inv_freq, double* c, double* s) {
  if (!(inv_freq <= 1.0)) {
    std::printf("internal: inv_freq %g > 1 is outside the reference's angle reduction\n", inv_freq);
    std::exit(2);
  }
  const double x = static_cast<double>(pos);
  const double hi = x * inv_freq, lo = std::fma(x, inv_freq, -hi);
  const double k = std::nearbyint(hi * kInvTwoPi);
  double r = hi - k * kTwoPiP1;
  r -= k * kTwoPiP2;
  r -= k * kTwoPiP3;
  r += lo;
  *c = std::cos(r);
  *s = std::sin(r);
}
// The exact cos/sin of every pair of one position: [half][2].
void row_cos_sin(int32_t pos, const double* inv, int half, double* cs) {
  for (int i = 0; i < half; ++i) exact_cos_sin(pos, inv[i], &cs[2 * i], &cs[2 * i + 1]);
}
int pair_a(int i, bool il) { return il ? 2 * i : i; }
int pair_b(int i, int R, bool il) { return il ? 2 * i + 1 : i + R / 2; }

// y = x rotated by the row's exact cos/sin `cs` ([R/2][2], row_cos_sin), times af on the rotated
// channels (the first R); the others pass through.
void rotate_ref(const double* x, double* y, int D, int R, bool il, double af, const double* cs) {
  for (int d = 0; d < D; ++d) y[d] = x[d];
  for (int i = 0; i < R / 2; ++i) {
    const double c = cs[2 * i], s = cs[2 * i + 1];
    const int ia = pair_a(i, il), ib = pair_b(i, R, il);
    const double a = x[ia], b = x[ib];
    y[ia] = af * (a * c - b * s);
    y[ib] = af * (b * c + a * s);
  }
}

void build_positions(Problem& P, std::mt19937_64& rng) {
  const Case& c = *P.c;
  P.qpos.assign(P.Tq, 0);
  P.kpos.assign(P.Tk, 0);
  for (int b = 0; b < P.B; ++b) {
    const int sq = c.sq[b], sk = c.sk[b];
    if (c.mode == Mode::kCache || c.mode == Mode::kDecode) {  // fixed by the op: keys 0..n-1, queries n - Sq + i
      for (int i = 0; i < sq; ++i) P.qpos[P.qoff[b] + i] = sk - sq + i;
      for (int j = 0; j < sk; ++j) P.kpos[P.koff[b] + j] = j;
      continue;
    }
    const int64_t base = std::max(0, sq - sk);
    int64_t shift = 0;
    if (c.pos == Pos::kNearMax) shift = INT32_MAX - (base + sk - 1);  // the last key / query at 2^31 - 1
    std::uniform_int_distribution<int32_t> any(0, INT32_MAX);
    for (int i = 0; i < sq; ++i) {
      int64_t p = base + i + sk - sq + shift;
      if (c.pos == Pos::kRandom) p = any(rng);
      if (c.pos == Pos::kRepeated) p = (base + i + sk - sq) / 3;
      P.qpos[P.qoff[b] + i] = static_cast<int32_t>(p);
    }
    for (int j = 0; j < sk; ++j) {
      int64_t p = base + j + shift;
      if (c.pos == Pos::kRandom) p = any(rng);
      if (c.pos == Pos::kRepeated) p = (base + j) / 3;
      P.kpos[P.koff[b] + j] = static_cast<int32_t>(p);
    }
  }
  if (c.pos == Pos::kNearMax) {  // the largest position must be exactly 2^31 - 1
    int32_t mx = 0;
    for (int32_t p : P.qpos) mx = std::max(mx, p);
    for (int32_t p : P.kpos) mx = std::max(mx, p);
    if (mx != INT32_MAX) {
      std::printf("internal: near-max positions reach %d\n", mx);
      std::exit(2);
    }
  }
}

// Inputs (rounded to dt), positions, rotary tables and the fp64 reference for one case and dtype.
Problem make_problem(const Case& c, DType dt, uint64_t seed) {
  Problem P;
  P.c = &c;
  P.dt = dt;
  P.B = static_cast<int>(c.sq.size());
  P.Hq = c.hq;
  P.Hkv = c.hkv;
  P.D = c.d;
  P.R = c.r;
  P.half = c.r / 2;
  P.scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(c.d));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  P.qoff.assign(P.B + 1, 0);
  P.koff.assign(P.B + 1, 0);
  for (int b = 0; b < P.B; ++b) {
    P.qoff[b + 1] = P.qoff[b] + c.sq[b];
    P.koff[b + 1] = P.koff[b] + (c.mode == Mode::kRope ? 0 : c.sk[b]);
  }
  P.Tq = P.qoff[P.B];
  P.Tk = P.koff[P.B];
  if (c.mode == Mode::kRope) {
    std::uniform_int_distribution<int32_t> small(0, 5000);
    P.qpos.resize(P.Tq);
    for (int b = 0; b < P.B; ++b)
      for (int i = 0; i < c.sq[b]; ++i)
        P.qpos[P.qoff[b] + i] = c.pos == Pos::kNearMax ? INT32_MAX - (c.sq[b] - 1) + i : small(rng);
  } else {
    build_positions(P, rng);
  }

  P.nT = c.per_seq_freqs ? P.B : 1;
  P.inv.assign(static_cast<size_t>(P.nT) * P.half, 0.0);
  P.split.assign(static_cast<size_t>(P.nT) * kSplitRows * P.half, 0.0f);
  for (int t = 0; t < P.nT; ++t) {
    const double factor = 1.0 / (1.0 + 0.37 * t);  // a per-sequence scaling law, as e.g. dynamic NTK
    for (int i = 0; i < P.half; ++i) {
      const double inv = factor * std::pow(10000.0, -2.0 * i / P.R);
      P.inv[t * P.half + i] = inv;
      split_freq(inv, &P.split[static_cast<size_t>(t) * kSplitRows * P.half + i], P.half);
    }
  }

  // Inputs: N(0, 1) (q: N(0, q_amp^2)) rounded to the dtype through a scratch buffer.
  Buf tmp(dt, 1);
  auto draw = [&](double amp) { return tmp.set(0, amp * normal(rng)); };
  P.q.resize(static_cast<size_t>(P.Tq) * P.Hq * P.D);
  for (double& x : P.q) x = draw(c.mode == Mode::kRope ? 1.0 : c.q_amp);
  if (c.mode == Mode::kRope) return P;
  P.k.resize(static_cast<size_t>(P.Tk) * P.Hkv * P.D);
  P.v.resize(P.k.size());
  for (double& x : P.k) x = draw(1.0);
  for (double& x : P.v) x = draw(1.0);
  if (c.nan_v) {
    // Sequence 0 (and, if there, sequence 1): NaN in one whole V row of KV head 0 and +inf in one
    // channel of the last KV head, at keys that the first queries cannot see.
    for (int b = 0; b < std::min(P.B, 2); ++b) {
      const int sq = c.sq[b], sk = c.sk[b];
      if (sk < 3) continue;
      const int off = sk - sq;
      const int j_nan = (c.mode == Mode::kDecode || c.mode == Mode::kCache) ? sk - 1 : std::max(off + 1, (2 * sk) / 3);
      const int j_inf = std::max(off + 1, sk - 2);
      if (j_nan < sk)
        for (int d = 0; d < P.D; ++d) P.v[((P.koff[b] + j_nan) * P.Hkv + 0) * P.D + d] = NAN;
      if (j_inf < sk) P.v[((P.koff[b] + j_inf) * P.Hkv + (P.Hkv - 1)) * P.D + std::min(3, P.D - 1)] = INFINITY;
      // a window's left edge: key 0, which only the first queries see
      if (c.wl >= 0) P.v[((P.koff[b] + 0) * P.Hkv + 0) * P.D + 1] = NAN;
    }
  }

  // ---- reference
  const int G = P.Hq / P.Hkv, D = P.D;
  std::vector<double> qr(P.q.size()), kr(P.k.size()), cs(2 * P.half + 2);
  for (int b = 0; b < P.B; ++b) {
    const double* inv = P.inv.data() + static_cast<size_t>(c.per_seq_freqs ? b : 0) * P.half;
    for (int64_t t = P.qoff[b]; t < P.qoff[b + 1]; ++t) {
      row_cos_sin(P.qpos[t], inv, P.half, cs.data());
      for (int h = 0; h < P.Hq; ++h)
        rotate_ref(&P.q[(t * P.Hq + h) * D], &qr[(t * P.Hq + h) * D], D, P.R, c.interleaved, c.af, cs.data());
    }
    for (int64_t t = P.koff[b]; t < P.koff[b + 1]; ++t) {
      row_cos_sin(P.kpos[t], inv, P.half, cs.data());
      for (int h = 0; h < P.Hkv; ++h)
        rotate_ref(&P.k[(t * P.Hkv + h) * D], &kr[(t * P.Hkv + h) * D], D, P.R, c.interleaved, c.af, cs.data());
    }
  }
  P.ref_out.assign(P.q.size(), 0.0);
  P.ref_lse.assign(static_cast<size_t>(P.Tq) * P.Hq, -INFINITY);
  if (dt == DType::kBFloat16) {
    P.tile_out_tol.assign(P.q.size(), 0.0);
    P.tile_lse_tol.assign(P.ref_lse.size(), 0.0);
  }
  std::vector<double> sc, sabs, acc(D);
  for (int b = 0; b < P.B; ++b) {
    const int sq = c.sq[b], sk = c.sk[b];
    for (int i = 0; i < sq; ++i) {
      // query i sees keys [j0, jn): the causal diagonal and the sliding window
      int jn = c.causal ? std::min(sk, std::max(0, i + sk - sq + 1)) : sk;
      if (!c.causal && c.wr >= 0) jn = std::min(jn, std::max(0, i + sk - sq + c.wr + 1));
      const int j0 = c.wl >= 0 ? std::min(jn, std::max(0, i + sk - sq - c.wl)) : 0;
      for (int h = 0; h < P.Hq; ++h) {
        const int hk = h / G;
        const int64_t qt = P.qoff[b] + i;
        if (jn == j0) continue;  // zeros, LSE -inf
        const double* qrow = &qr[(qt * P.Hq + h) * D];
        sc.assign(jn, -INFINITY);
        sabs.assign(jn, 0.0);
        double mx = -INFINITY;
        for (int j = j0; j < jn; ++j) {
          const double* krow = &kr[((P.koff[b] + j) * P.Hkv + hk) * D];
          double s = 0.0, sa = 0.0;
          for (int d = 0; d < D; ++d) {
            s += qrow[d] * krow[d];
            sa += std::fabs(qrow[d] * krow[d]);
          }
          sc[j] = s * P.scale;
          sabs[j] = sa * P.scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int j = j0; j < jn; ++j) {
          const double w = std::exp(sc[j] - mx);
          sum += w;
          const double* vrow = &P.v[((P.koff[b] + j) * P.Hkv + hk) * D];
          for (int d = 0; d < D; ++d) acc[d] += w * vrow[d];
        }
        double* out = &P.ref_out[(qt * P.Hq + h) * D];
        for (int d = 0; d < D; ++d) out[d] = acc[d] / sum;
        P.ref_lse[qt * P.Hq + h] = mx + std::log(sum);
        if (dt == DType::kBFloat16) {
          constexpr double es = 0x1p-7 + 0x1p-16, ep = 0x1p-8;
          double* tol = &P.tile_out_tol[(qt * P.Hq + h) * D];
          double lse_tol = 0.0;
          for (int j = j0; j < jn; ++j) {
            const double w = std::exp(sc[j] - mx) / sum, ds = es * sabs[j];
            lse_tol += w * ds;
            const double* vrow = &P.v[((P.koff[b] + j) * P.Hkv + hk) * D];
            for (int d = 0; d < D; ++d)
              tol[d] += w * (ds * std::fabs(vrow[d] - out[d]) + ep * (std::fabs(vrow[d]) + std::fabs(out[d])));
          }
          P.tile_lse_tol[qt * P.Hq + h] = lse_tol;
        }
      }
    }
  }
  return P;
}

// ============================================================================ bounds
// Absolute error bounds against the fp64 reference, for N(0, 1) inputs: V entries are O(1), so the
// outputs (convex combinations of V rows) are too. fp32 rounding errors of the scores grow with
// their size, so the attention bounds scale with cond = max(1, q_amp * attention_factor^2), the
// factor by which a case enlarges the scores (q_amp: q ~ N(0, q_amp^2); q and k both carry the
// factor). Worst measured over the full list (x86-64: avx2, avx512 and avx512_simde identical;
// generic where larger; aarch64 generic under qemu like avx2):
//   fp32 out   1.0e-5 (x86-64 generic 1.8e-5) in "sharp softmax" (cond 9); elsewhere <= 1.5e-6
//   fp32 LSE   8.7e-6 (x86-64 generic 9.4e-6) in "sharp softmax" (|LSE| ~ 30); elsewhere <= 1.5e-6
//   rope       3.4e-7 * (|a| + |b|) * attention_factor per pair (fp32)
//   cos/sin    5.6e-7 (the tables, / max(1, attention_factor))
// and the bounds below keep ~3-7x headroom over those (3x only for the x86-64 generic unit's
// sharp case, whose fp32 multiply-adds round twice: no FMA at the x86-64 baseline).
constexpr double kOutF32 = 6e-6;  // times cond
constexpr double kLseF32 = 4e-6;  // times cond, plus kLseRel * |LSE|
constexpr double kLseRel = 4e-7;
constexpr double kRopeRel = 2e-6;  // times (|a| + |b|) * attention_factor
constexpr double kCosSin = 3e-6;   // times max(1, attention_factor)
double cond_of(const Case& c) { return std::max(1.0, c.q_amp * c.af * c.af); }
// Output rounding of a 16-bit dtype: half an ulp, <= 2^-8 |x| (bf16, 8 significant bits) or
// 2^-11 |x| (fp16, 11 bits; 2^-25 absolute below 2^-14, half the subnormal spacing). So the
// 16-bit bounds are the fp32 ones plus the rounding of the output, and err/bound near 1 there only
// says that some output sat near a rounding tie; the ulps column says more: distance from the
// correctly rounded reference, in ulps of the dtype, over outputs with |ref| >= 1/16.
double half_ulp_rel(DType dt) { return dt == DType::kBFloat16 ? 0x1p-8 : dt == DType::kFloat16 ? 0x1p-11 : 0.0; }
double half_ulp_abs(DType dt) { return dt == DType::kFloat16 ? 0x1p-25 : 0.0; }
double out_bound(DType dt, double ref, double f32_bound) {
  return f32_bound + half_ulp_rel(dt) * (std::fabs(ref) + f32_bound) + half_ulp_abs(dt);
}
// |got - round(ref)| in ulps of round(ref) (normal range only; callers pass |ref| >= 1/16).
double ulps_off(DType dt, double got, double ref) {
  if (dt == DType::kFloat32) return 0.0;
  Buf one(dt, 1);
  const double r = one.set(0, ref);
  int e = 0;
  std::frexp(r, &e);
  const double ulp = std::ldexp(1.0, e - 1 - (dt == DType::kBFloat16 ? 7 : 10));
  return std::fabs(got - r) / ulp;
}

// ============================================================================ per-unit stats
struct Stats {
  int checks = 0, failures = 0;
  double out_err[3] = {0, 0, 0}, lse_err[3] = {0, 0, 0}, rope_err[3] = {0, 0, 0}, ratio[3] = {0, 0, 0};
  double ulps[3] = {0, 0, 0};
  int tile_checks = 0;  // bf16 checks bounded with the bf16-intermediate terms (Unit::bf16_tiles)
  double cs_err = 0.0;
  double kernel_s = 0.0;
};

struct Checker {
  const char* unit;
  const Case* c;
  DType dt;
  Stats* st;
  int printed = 0;
  bool failed = false;
  double out_err = 0.0, lse_err = 0.0, ratio = 0.0;  // this case's worst
  void fail(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
};
void Checker::fail(const char* fmt, ...) {
  failed = true;
  if (printed++ >= 5) return;
  std::printf("FAIL [%s] %s (%s, %s): ", unit, c->name.c_str(), kModeNames[static_cast<int>(c->mode)],
              kDtypeNames[static_cast<int>(dt)]);
  va_list ap;
  va_start(ap, fmt);
  std::vprintf(fmt, ap);
  va_end(ap);
  std::printf("\n");
}

// Compare an output element and an LSE value against the reference.
void check_out(Checker& ck, double got, double want, const char* what, int b, int64_t i, int h, int d,
               double extra = 0.0) {
  if (!std::isfinite(want)) return;  // the row sees a NaN / inf in V: anything goes
  const double err = std::fabs(got - want);
  const double bound = out_bound(ck.dt, want, kOutF32 * cond_of(*ck.c) + extra);
  const int t = static_cast<int>(ck.dt);
  if (!(err <= bound)) {  // also catches NaN (unwritten output, masked NaN leaking in)
    ck.fail("%s[b=%d i=%lld h=%d d=%d] = %.9g, want %.9g (|err| %.3g > bound %.3g)", what, b,
            static_cast<long long>(i), h, d, got, want, err, bound);
    return;
  }
  ck.st->out_err[t] = std::max(ck.st->out_err[t], err);
  ck.st->ratio[t] = std::max(ck.st->ratio[t], err / bound);
  ck.out_err = std::max(ck.out_err, err);
  ck.ratio = std::max(ck.ratio, err / bound);
  if (std::fabs(want) >= 0.0625) ck.st->ulps[t] = std::max(ck.st->ulps[t], ulps_off(ck.dt, got, want));
}
void check_lse(Checker& ck, double got, double want, int b, int64_t i, int h, double extra = 0.0) {
  const int t = static_cast<int>(ck.dt);
  if (want == -INFINITY) {
    if (got != -INFINITY) ck.fail("lse[b=%d i=%lld h=%d] = %.9g, want -inf (no visible key)", b, static_cast<long long>(i), h, got);
    return;
  }
  const double err = std::fabs(got - want), bound = kLseF32 * cond_of(*ck.c) + kLseRel * std::fabs(want) + extra;
  if (!(err <= bound)) {
    ck.fail("lse[b=%d i=%lld h=%d] = %.9g, want %.9g (|err| %.3g > bound %.3g)", b, static_cast<long long>(i), h, got,
            want, err, bound);
    return;
  }
  ck.st->lse_err[t] = std::max(ck.st->lse_err[t], err);
  ck.st->ratio[t] = std::max(ck.st->ratio[t], err / bound);
  ck.lse_err = std::max(ck.lse_err, err);
  ck.ratio = std::max(ck.ratio, err / bound);
}

// ============================================================================ running one unit
// Strides of a [.., S, H, D]-like view.
struct View {
  int64_t batch = 0, row = 0, head = 0;
};

// The cos/sin table of n_rows rows through the unit (ops.cpp cos_sin_table), in two calls to
// exercise [begin, end); checked against the exact values once per case (fp32 pass).
std::vector<float> cos_sin_table(const Kernels& kern, const Problem& P, const RopeParams& rope, const int32_t* positions,
                                 const int32_t* cu_rows, int64_t rows_per_batch, int64_t n_rows, Checker* ck,
                                 const std::vector<int32_t>& pos_of_row, const std::vector<int>& seq_of_row) {
  if (rope.rotary_dim == 0 || n_rows == 0) return {};
  const int cp = cs_pad_of(rope.rotary_dim);
  std::vector<float> table(static_cast<size_t>(n_rows) * 2 * cp + 64, bits_float(0x7FA5A5A5u));
  CosSinJob job;
  job.positions = positions;
  job.cu_rows = cu_rows;
  job.rows_per_batch = std::max<int64_t>(rows_per_batch, 1);
  job.n_rows = n_rows;
  job.batch = P.B;
  job.rope = rope;
  job.out = table.data();
  const int64_t mid = n_rows / 2;
  kern.cos_sin_rows(job, 0, mid);
  kern.cos_sin_rows(job, mid, n_rows);
  for (size_t i = static_cast<size_t>(n_rows) * 2 * cp; i < table.size(); ++i)
    if (float_bits(table[i]) != 0x7FA5A5A5u) {
      ck->fail("cos_sin_rows wrote past its %lld rows", static_cast<long long>(n_rows));
      break;
    }
  if (ck && ck->dt == DType::kFloat32) {
    const double af = rope.attention_factor;
    for (int64_t r = 0; r < n_rows; ++r) {
      const int b = seq_of_row[r];
      if (b < 0) continue;  // a padding row of the cache table (no key there)
      const double* inv = P.inv.data() + static_cast<size_t>(rope.freqs_batch_stride ? b : 0) * P.half;
      for (int i = 0; i < P.half; ++i) {
        double c, s;
        exact_cos_sin(pos_of_row[r], inv[i], &c, &s);
        const double ec = std::fabs(table[r * 2 * cp + i] - af * c), es = std::fabs(table[r * 2 * cp + cp + i] - af * s);
        const double err = std::max(ec, es), bound = kCosSin * std::max(1.0, af);
        if (!(err <= bound)) {
          ck->fail("cos/sin table row %lld (pos %d) pair %d: |err| %.3g > %.3g", static_cast<long long>(r),
                   pos_of_row[r], i, err, bound);
          return table;
        }
        ck->st->cs_err = std::max(ck->st->cs_err, err / std::max(1.0, af));
      }
    }
  }
  return table;
}

RopeParams rope_params(const Problem& P) {
  RopeParams rope;
  rope.rotary_dim = P.R;
  rope.interleaved = P.c->interleaved;
  rope.attention_factor = P.c->af;
  rope.freqs = P.R ? P.split.data() : nullptr;
  rope.freqs_batch_stride = P.nT > 1 ? kSplitRows * P.half : 0;
  return rope;
}

// The outputs of one run, for comparing two runs bit for bit.
struct Outputs {
  Buf out;
  FBuf lse;
};

// Prefill (dense / varlen) and the KV-cache mode of the tiled kernel.
Outputs run_tiled_case(const Unit& u, const Problem& P, int threads, Checker& ck) {
  const Case& c = *P.c;
  const Kernels& kern = *u.kern;
  const int B = P.B, Hq = P.Hq, Hkv = P.Hkv, D = P.D;
  const bool varlen = c.mode == Mode::kVarlen, cache = c.mode == Mode::kCache;
  const int max_sq = *std::max_element(c.sq.begin(), c.sq.end());
  const int max_sk = *std::max_element(c.sk.begin(), c.sk.end());
  const RopeParams rope = rope_params(P);

  // Q and out: [B, Sq, Hq, D] (dense, cache; every sequence has max_sq rows) or [Tq, Hq, D].
  Outputs res;
  const int64_t q_rows = varlen ? P.Tq : static_cast<int64_t>(B) * max_sq;
  Buf qb(P.dt, static_cast<size_t>(q_rows) * Hq * D);
  res.out = Buf(P.dt, qb.n);
  const View qv{varlen ? 0 : static_cast<int64_t>(max_sq) * Hq * D, static_cast<int64_t>(Hq) * D, D};
  auto q_index = [&](int b, int64_t i, int h) {
    return (varlen ? (P.qoff[b] + i) * qv.row : b * qv.batch + i * qv.row) + h * qv.head;
  };
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < c.sq[b]; ++i)
      for (int h = 0; h < Hq; ++h)
        for (int d = 0; d < D; ++d) qb.set(q_index(b, i, h) + d, P.q[((P.qoff[b] + i) * Hq + h) * D + d]);

  // K/V.
  Buf kb, vb;
  View kvv;
  std::vector<int32_t> block_table, cache_lens;
  int64_t bt_stride = 0;
  auto kv_at = [&](int b, int j) -> int64_t {
    if (cache && c.paged) {
      const int32_t blk = block_table[static_cast<size_t>(b) * bt_stride + j / c.block_size];
      return blk * kvv.batch + (j % c.block_size) * kvv.row;
    }
    if (varlen) return (P.koff[b] + j) * kvv.row;
    return b * kvv.batch + static_cast<int64_t>(j) * kvv.row;
  };
  int64_t kv_elems = 0;
  if (cache) {
    // [B, Smax, Hkv, D] with 5 spare rows, or paged [num_blocks, bs, Hkv, D]: every row that is not
    // a sequence's key holds NaN (the kernels must never use it).
    if (c.paged) {
      std::vector<int32_t> blocks;
      int64_t max_blocks = 0, used = 0;
      for (int b = 0; b < B; ++b) {
        max_blocks = std::max<int64_t>(max_blocks, (c.sk[b] + c.block_size - 1) / c.block_size);
        used += (c.sk[b] + c.block_size - 1) / c.block_size;
      }
      const int64_t num_blocks = used + 3;
      bt_stride = max_blocks + 1;
      std::vector<int32_t> perm(num_blocks);
      std::iota(perm.begin(), perm.end(), 0);
      std::mt19937_64 rng(77);
      std::shuffle(perm.begin(), perm.end(), rng);
      // unused entries: a block far past the cache (a read of one would fault)
      block_table.assign(static_cast<size_t>(B) * bt_stride, 1 << 30);
      int64_t next = 0;
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < (c.sk[b] + c.block_size - 1) / c.block_size; ++t)
          block_table[static_cast<size_t>(b) * bt_stride + t] = perm[next++];
      kvv = {static_cast<int64_t>(c.block_size) * Hkv * D, static_cast<int64_t>(Hkv) * D, D};
      kv_elems = num_blocks * kvv.batch;
    } else {
      const int64_t smax = max_sk + 5;
      kvv = {smax * Hkv * D, static_cast<int64_t>(Hkv) * D, D};
      kv_elems = B * kvv.batch;
    }
  } else if (c.kv_rows) {  // [B, Sk, Hkv, D] / [Tk, Hkv, D] as given (ops.cpp copies these when Hkv > 1)
    kvv = {varlen ? 0 : static_cast<int64_t>(max_sk) * Hkv * D, static_cast<int64_t>(Hkv) * D, D};
    kv_elems = (varlen ? P.Tk : static_cast<int64_t>(B) * max_sk) * Hkv * D;
  } else {  // ops.cpp's head-major copy: rows D apart, heads S * D apart
    const int64_t rows = varlen ? P.Tk : max_sk;
    kvv = {varlen ? 0 : rows * Hkv * D, D, rows * D};
    kv_elems = (varlen ? P.Tk : static_cast<int64_t>(B) * max_sk) * Hkv * D;
  }
  kb = Buf(P.dt, static_cast<size_t>(kv_elems));
  vb = Buf(P.dt, static_cast<size_t>(kv_elems));
  for (size_t e = 0; e < kb.n; ++e) {
    kb.set(e, NAN);
    vb.set(e, NAN);
  }
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < c.sk[b]; ++j)
      for (int h = 0; h < Hkv; ++h)
        for (int d = 0; d < D; ++d) {
          const size_t src = static_cast<size_t>(((P.koff[b] + j) * Hkv + h) * D + d);
          kb.set(kv_at(b, j) + h * kvv.head + d, P.k[src]);
          vb.set(kv_at(b, j) + h * kvv.head + d, P.v[src]);
        }

  // LSE: [B, Hq, Sq] or [Hq, Tq].
  res.lse = FBuf(static_cast<size_t>(q_rows) * Hq);
  const int64_t lse_b = varlen ? 0 : static_cast<int64_t>(Hq) * max_sq, lse_h = varlen ? P.Tq : max_sq;

  AttnParams p;
  p.q = qb.data();
  p.k = kb.data();
  p.v = vb.data();
  p.out = res.out.data();
  p.lse = c.no_lse ? nullptr : res.lse.data();
  p.q_batch_stride = qv.batch;
  p.q_row_stride = qv.row;
  p.q_head_stride = qv.head;
  p.o_batch_stride = qv.batch;
  p.o_row_stride = qv.row;
  p.o_head_stride = qv.head;
  p.k_batch_stride = p.v_batch_stride = kvv.batch;
  p.k_row_stride = p.v_row_stride = kvv.row;
  p.k_head_stride = p.v_head_stride = kvv.head;
  p.lse_batch_stride = lse_b;
  p.lse_head_stride = lse_h;
  std::vector<int32_t> cu_q(B + 1), cu_k(B + 1);
  for (int b = 0; b <= B; ++b) {
    cu_q[b] = static_cast<int32_t>(P.qoff[b]);
    cu_k[b] = static_cast<int32_t>(P.koff[b]);
  }
  // Positions as the kernels' tables read them: [Tq] / [Tk] or [B * Sq] / [B * Sk] contiguous.
  std::vector<int32_t> qpos_rows, kpos_rows;
  std::vector<int> qseq_rows, kseq_rows;
  if (varlen) {
    qpos_rows = P.qpos;
    kpos_rows = P.kpos;
    for (int b = 0; b < B; ++b) {
      for (int64_t t = P.qoff[b]; t < P.qoff[b + 1]; ++t) qseq_rows.push_back(b);
      for (int64_t t = P.koff[b]; t < P.koff[b + 1]; ++t) kseq_rows.push_back(b);
    }
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
  } else {
    qpos_rows.assign(static_cast<size_t>(B) * max_sq, 0);
    qseq_rows.assign(qpos_rows.size(), -1);
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < c.sq[b]; ++i) {
        qpos_rows[static_cast<size_t>(b) * max_sq + i] = P.qpos[P.qoff[b] + i];
        qseq_rows[static_cast<size_t>(b) * max_sq + i] = b;
      }
    kpos_rows.assign(static_cast<size_t>(B) * max_sk, 0);
    kseq_rows.assign(kpos_rows.size(), -1);
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < max_sk; ++j) {
        kpos_rows[static_cast<size_t>(b) * max_sk + j] = j < c.sk[b] ? P.kpos[P.koff[b] + j] : j;
        kseq_rows[static_cast<size_t>(b) * max_sk + j] = cache || j < c.sk[b] ? b : -1;
      }
  }
  p.batch = B;
  p.seqlen_q = max_sq;
  p.seqlen_k = max_sk;
  p.num_heads = Hq;
  p.num_heads_k = Hkv;
  p.head_dim = D;
  p.softmax_scale = static_cast<float>(P.scale);
  p.causal = c.causal;
  p.window_left = c.wl;
  p.window_right = c.causal ? -1 : c.wr;
  p.rope = rope;

  TiledPlan plan;
  plan.p = p;
  plan.dtype = P.dt;
  std::vector<float> q_cs, k_cs;
  if (cache) {
    // ops.cpp kvcache, tiled path: query positions n_b - Sq + i in a table, keys by row index.
    cache_lens.assign(c.sk.begin(), c.sk.end());
    q_cs = cos_sin_table(kern, P, rope, qpos_rows.data(), nullptr, max_sq, static_cast<int64_t>(B) * max_sq, &ck,
                         qpos_rows, qseq_rows);
    k_cs = cos_sin_table(kern, P, rope, nullptr, nullptr, max_sk, static_cast<int64_t>(B) * max_sk, &ck, kpos_rows,
                         kseq_rows);
    plan.cache_lens = cache_lens.data();
    if (c.paged) {
      plan.block_table = block_table.data();
      plan.block_table_stride = bt_stride;
      plan.block_size = c.block_size;
    } else {
      plan.block_size = static_cast<int>(max_sk + 5);  // ops.cpp passes k_cache.size(1); unused when dense
    }
  } else {
    q_cs = cos_sin_table(kern, P, rope, qpos_rows.data(), varlen ? cu_q.data() : nullptr, max_sq, q_rows, &ck,
                         qpos_rows, qseq_rows);
    k_cs = cos_sin_table(kern, P, rope, kpos_rows.data(), varlen ? cu_k.data() : nullptr, max_sk,
                         varlen ? P.Tk : static_cast<int64_t>(B) * max_sk, &ck, kpos_rows, kseq_rows);
  }
  plan.q_cs = q_cs.empty() ? nullptr : q_cs.data();
  plan.k_cs = k_cs.empty() ? nullptr : k_cs.data();
  plan.k_cs_rows = max_sk;
  const int G = Hq / Hkv, micro = kern.micro_rows;
  if (micro < 1) {
    ck.fail("Kernels::micro_rows is %d", micro);
    return res;
  }
  plan.block_m = c.small_bm_rows ? small_block_m(G, micro, c.small_bm_rows) : choose_block_m(G, micro);
  plan.num_q_blocks = (max_sq + plan.block_m - 1) / plan.block_m;
  const int64_t items = static_cast<int64_t>(B) * Hkv * plan.num_q_blocks;

  const auto t0 = std::chrono::steady_clock::now();
  const bool scratch_ok = run_items(items, kern.tiled_scratch_floats(plan), threads,
                                    [&](int64_t item, float* s) { kern.tiled_item(plan, item, s); });
  ck.st->kernel_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!scratch_ok) ck.fail("tiled_item wrote past tiled_scratch_floats");
  if (!res.out.guard_ok()) ck.fail("wrote past the output");
  if (!res.lse.guard_ok()) ck.fail("wrote past the LSE");
  if (!qb.guard_ok() || !kb.guard_ok() || !vb.guard_ok()) ck.fail("wrote into an input's guard");

  // Compare (valid rows only; the dense layout's rows past a sequence's length are not outputs).
  const bool tiles = u.bf16_tiles && P.dt == DType::kBFloat16 && D % 32 == 0;
  if (tiles) ck.st->tile_checks++;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < c.sq[b]; ++i)
      for (int h = 0; h < Hq; ++h) {
        const int64_t t = P.qoff[b] + i;
        for (int d = 0; d < D; ++d) {
          const size_t e = static_cast<size_t>((t * Hq + h) * D + d);
          check_out(ck, res.out.get(q_index(b, i, h) + d), P.ref_out[e], "out", b, i, h, d,
                    tiles ? P.tile_out_tol[e] : 0.0);
        }
        if (!c.no_lse) {
          const int64_t li = varlen ? h * lse_h + t : b * lse_b + h * lse_h + i;
          check_lse(ck, res.lse.v[li], P.ref_lse[t * Hq + h], b, i, h, tiles ? P.tile_lse_tol[t * Hq + h] : 0.0);
        }
      }
  return res;
}

// Decode: DecodePlan, split-K items, then decode_merge (ops.cpp kvcache, decode path).
Outputs run_decode_case(const Unit& u, const Problem& P, int threads, Checker& ck) {
  const Case& c = *P.c;
  const Kernels& kern = *u.kern;
  const int B = P.B, Hq = P.Hq, Hkv = P.Hkv, D = P.D, Sq = c.sq[0];
  for (int b = 0; b < B; ++b)
    if (c.sq[b] != Sq) {
      std::printf("internal: decode cases need one Sq\n");
      std::exit(2);
    }
  const int max_n = *std::max_element(c.sk.begin(), c.sk.end());
  const RopeParams rope = rope_params(P);
  Outputs res;
  const View qv{static_cast<int64_t>(Sq) * Hq * D, static_cast<int64_t>(Hq) * D, D};
  Buf qb(P.dt, static_cast<size_t>(B) * Sq * Hq * D);
  res.out = Buf(P.dt, qb.n);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Sq; ++i)
      for (int h = 0; h < Hq; ++h)
        for (int d = 0; d < D; ++d) qb.set(b * qv.batch + i * qv.row + h * qv.head + d, P.q[((P.qoff[b] + i) * Hq + h) * D + d]);
  // Caches [B, Smax, Hkv, D] or paged [num_blocks, bs, Hkv, D]; NaN wherever no key lives.
  View kvv;
  std::vector<int32_t> block_table;
  int64_t bt_stride = 0, elems = 0;
  if (c.paged) {
    int64_t max_blocks = 0, used = 0;
    for (int b = 0; b < B; ++b) {
      max_blocks = std::max<int64_t>(max_blocks, (c.sk[b] + c.block_size - 1) / c.block_size);
      used += (c.sk[b] + c.block_size - 1) / c.block_size;
    }
    const int64_t num_blocks = used + 2;
    bt_stride = max_blocks + 2;
    std::vector<int32_t> perm(num_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937_64 rng(99);
    std::shuffle(perm.begin(), perm.end(), rng);
    block_table.assign(static_cast<size_t>(B) * bt_stride, 1 << 30);
    int64_t next = 0;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < (c.sk[b] + c.block_size - 1) / c.block_size; ++t)
        block_table[static_cast<size_t>(b) * bt_stride + t] = perm[next++];
    kvv = {static_cast<int64_t>(c.block_size) * Hkv * D, static_cast<int64_t>(Hkv) * D, D};
    elems = num_blocks * kvv.batch;
  } else {
    kvv = {static_cast<int64_t>(max_n + 3) * Hkv * D, static_cast<int64_t>(Hkv) * D, D};
    elems = B * kvv.batch;
  }
  auto kv_at = [&](int b, int j) -> int64_t {
    if (c.paged) {
      const int32_t blk = block_table[static_cast<size_t>(b) * bt_stride + j / c.block_size];
      return blk * kvv.batch + (j % c.block_size) * kvv.row;
    }
    return b * kvv.batch + static_cast<int64_t>(j) * kvv.row;
  };
  Buf kb(P.dt, static_cast<size_t>(elems)), vb(P.dt, static_cast<size_t>(elems));
  for (size_t e = 0; e < kb.n; ++e) {
    kb.set(e, NAN);
    vb.set(e, NAN);
  }
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < c.sk[b]; ++j)
      for (int h = 0; h < Hkv; ++h)
        for (int d = 0; d < D; ++d) {
          const size_t src = static_cast<size_t>(((P.koff[b] + j) * Hkv + h) * D + d);
          kb.set(kv_at(b, j) + h * kvv.head + d, P.k[src]);
          vb.set(kv_at(b, j) + h * kvv.head + d, P.v[src]);
        }
  res.lse = FBuf(static_cast<size_t>(B) * Hq * Sq);
  std::vector<int32_t> lens(B);
  for (int b = 0; b < B; ++b) lens[b] = c.sk[b] - c.s_new;

  DecodePlan plan;
  DecodeParams& p = plan.p;
  p.q = qb.data();
  p.k_cache = kb.data();
  p.v_cache = vb.data();
  p.out = res.out.data();
  p.lse = c.no_lse ? nullptr : res.lse.data();
  p.q_batch_stride = p.o_batch_stride = qv.batch;
  p.q_row_stride = p.o_row_stride = qv.row;
  p.q_head_stride = p.o_head_stride = qv.head;
  p.kc_batch_stride = p.vc_batch_stride = kvv.batch;
  p.kc_row_stride = p.vc_row_stride = kvv.row;
  p.kc_head_stride = p.vc_head_stride = kvv.head;
  p.lse_batch_stride = static_cast<int64_t>(Hq) * Sq;
  p.lse_head_stride = Sq;
  p.cache_seqlens = lens.data();
  p.block_table = c.paged ? block_table.data() : nullptr;
  p.block_table_batch_stride = bt_stride;
  p.block_size = c.paged ? c.block_size : max_n + 3;
  p.batch = B;
  p.seqlen_q = Sq;
  p.s_new = c.s_new;
  p.num_heads = Hq;
  p.num_heads_k = Hkv;
  p.head_dim = D;
  p.softmax_scale = static_cast<float>(P.scale);
  p.causal = c.causal;
  p.window_left = c.wl;
  p.window_right = c.causal ? -1 : c.wr;
  p.num_splits = c.num_splits;
  p.rope = rope;
  plan.dtype = P.dt;
  // ops.cpp: an explicit num_splits, capped by the chunks; split_len a multiple of kDecodeChunk.
  const int64_t chunks = std::max<int64_t>(1, (max_n + kDecodeChunk - 1) / kDecodeChunk);
  const int64_t splits = std::min<int64_t>(c.num_splits, chunks);
  const int64_t chunks_per_split = (chunks + splits - 1) / splits;
  plan.split_len = chunks_per_split * kDecodeChunk;
  plan.num_splits = static_cast<int>((chunks + chunks_per_split - 1) / chunks_per_split);
  const int64_t Dp = head_dim_pad_of(D);
  FBuf partial(static_cast<size_t>(B) * plan.num_splits * Hq * Sq * (Dp + 2));
  plan.partial = partial.data();

  const auto t0 = std::chrono::steady_clock::now();
  const bool scratch_ok = run_items(static_cast<int64_t>(B) * plan.num_splits, kern.decode_scratch_floats(plan), threads,
                                    [&](int64_t item, float* s) { kern.decode_item(plan, item, s); });
  const int64_t rows = static_cast<int64_t>(B) * Hq * Sq, mid = rows / 3;
  kern.decode_merge(plan, 0, mid);
  kern.decode_merge(plan, mid, rows);
  ck.st->kernel_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!scratch_ok) ck.fail("decode_item wrote past decode_scratch_floats");
  if (!partial.guard_ok()) ck.fail("wrote past the partial buffer");
  if (!res.out.guard_ok()) ck.fail("wrote past the output");
  if (!res.lse.guard_ok()) ck.fail("wrote past the LSE");
  if (!qb.guard_ok() || !kb.guard_ok() || !vb.guard_ok()) ck.fail("wrote into an input's guard");
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Sq; ++i)
      for (int h = 0; h < Hq; ++h) {
        const int64_t t = P.qoff[b] + i;
        for (int d = 0; d < D; ++d)
          check_out(ck, res.out.get(b * qv.batch + i * qv.row + h * qv.head + d), P.ref_out[(t * Hq + h) * D + d], "out",
                    b, i, h, d);
        if (!c.no_lse) check_lse(ck, res.lse.v[b * p.lse_batch_stride + h * Sq + i], P.ref_lse[t * Hq + h], b, i, h);
      }
  return res;
}

// apply_rope: rope_rows over x [B, S, H, D] (out with a gap between rows/heads when strided).
Outputs run_rope_case(const Unit& u, const Problem& P, int threads, Checker& ck) {
  const Case& c = *P.c;
  const Kernels& kern = *u.kern;
  const int B = P.B, S = c.sq[0], H = P.Hq, D = P.D, R = P.R;
  const View xv{static_cast<int64_t>(S) * H * D, static_cast<int64_t>(H) * D, D};
  const View ov = c.strided_out ? View{static_cast<int64_t>(S) * (H * (D + 8) + 4), static_cast<int64_t>(H) * (D + 8) + 4, D + 8}
                                : xv;
  Buf xb(P.dt, static_cast<size_t>(B) * xv.batch);
  Outputs res;
  res.out = Buf(P.dt, static_cast<size_t>(B) * ov.batch);
  for (int b = 0; b < B; ++b)
    for (int s = 0; s < S; ++s)
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < D; ++d) xb.set(b * xv.batch + s * xv.row + h * xv.head + d, P.q[((P.qoff[b] + s) * H + h) * D + d]);
  RopeJob job;
  job.x = xb.data();
  job.out = res.out.data();
  job.dtype = P.dt;
  job.x_batch_stride = xv.batch;
  job.x_row_stride = xv.row;
  job.x_head_stride = xv.head;
  job.o_batch_stride = ov.batch;
  job.o_row_stride = ov.row;
  job.o_head_stride = ov.head;
  job.positions = P.qpos.data();
  job.batch = B;
  job.seqlen = S;
  job.num_heads = H;
  job.head_dim = D;
  job.rope = rope_params(P);
  const int64_t n_rows = static_cast<int64_t>(B) * S;
  // rows in ranges of 16 (ops.cpp: 256 per task), each range with its own scratch
  const int64_t ranges = (n_rows + 15) / 16;
  const auto t0 = std::chrono::steady_clock::now();
  const bool scratch_ok = run_items(ranges, kern.rope_scratch_floats(job), threads, [&](int64_t r, float* s) {
    kern.rope_rows(job, r * 16, std::min<int64_t>(n_rows, r * 16 + 16), s);
  });
  ck.st->kernel_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!scratch_ok) ck.fail("rope_rows wrote past rope_scratch_floats");
  if (!res.out.guard_ok()) ck.fail("wrote past the output");
  const int t = static_cast<int>(P.dt);
  std::vector<double> y(D), cs(2 * P.half + 2);
  for (int b = 0; b < B; ++b) {
    const double* inv = P.inv.data() + static_cast<size_t>(c.per_seq_freqs ? b : 0) * P.half;
    for (int s = 0; s < S; ++s) {
      row_cos_sin(P.qpos[P.qoff[b] + s], inv, P.half, cs.data());
      for (int h = 0; h < H; ++h) {
        const double* x = &P.q[((P.qoff[b] + s) * H + h) * D];
        rotate_ref(x, y.data(), D, R, c.interleaved, c.af, cs.data());
        const int64_t o = b * ov.batch + s * ov.row + h * ov.head;
        const int64_t xi = b * xv.batch + s * xv.row + h * xv.head;
        for (int d = 0; d < D; ++d) {
          if (d >= R) {  // pass-through: the same bits
            if (std::memcmp(&res.out.mem[(o + d) * res.out.es()], &xb.mem[(xi + d) * xb.es()], xb.es()) != 0) {
              ck.fail("out[b=%d s=%d h=%d d=%d]: pass-through channel changed", b, s, h, d);
              return res;
            }
            continue;
          }
          const int i = c.interleaved ? d / 2 : d % (R / 2);
          const double mag = std::fabs(x[pair_a(i, c.interleaved)]) + std::fabs(x[pair_b(i, R, c.interleaved)]);
          const double f32 = kRopeRel * mag * c.af + 1e-30;
          const double got = res.out.get(o + d), err = std::fabs(got - y[d]);
          const double bound = out_bound(P.dt, y[d], f32);
          if (!(err <= bound)) {
            ck.fail("out[b=%d s=%d h=%d d=%d] = %.9g, want %.9g (|err| %.3g > bound %.3g)", b, s, h, d, got, y[d], err,
                    bound);
            return res;
          }
          ck.st->rope_err[t] = std::max(ck.st->rope_err[t], P.dt == DType::kFloat32 ? err / (mag * c.af + 1e-30) : err);
          if (std::fabs(y[d]) >= 0.0625) ck.st->ulps[t] = std::max(ck.st->ulps[t], ulps_off(P.dt, got, y[d]));
          ck.st->ratio[t] = std::max(ck.st->ratio[t], err / bound);
          ck.out_err = std::max(ck.out_err, err);
          ck.ratio = std::max(ck.ratio, err / bound);
        }
      }
    }
  }
  // the gaps of a strided out stay untouched
  if (c.strided_out) {
    std::vector<char> written(res.out.n, 0);
    for (int b = 0; b < B; ++b)
      for (int s = 0; s < S; ++s)
        for (int h = 0; h < H; ++h)
          for (int d = 0; d < D; ++d) written[b * ov.batch + s * ov.row + h * ov.head + d] = 1;
    for (size_t e = 0; e < res.out.n; ++e)
      if (!written[e] && !std::isnan(res.out.get(e))) {
        ck.fail("rope_rows wrote element %zu between rows/heads of a strided out", e);
        break;
      }
  }
  return res;
}

Outputs run_case(const Unit& u, const Problem& P, int threads, Checker& ck) {
  switch (P.c->mode) {
    case Mode::kDecode: return run_decode_case(u, P, threads, ck);
    case Mode::kRope: return run_rope_case(u, P, threads, ck);
    default: return run_tiled_case(u, P, threads, ck);
  }
}

bool same_bits(const Outputs& a, const Outputs& b) {
  return a.out.mem == b.out.mem && std::memcmp(a.lse.v.data(), b.lse.v.data(), a.lse.v.size() * sizeof(float)) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, verbose = false, list = false;
  const char* env = std::getenv("ROPEKERN_CPU_TEST_QUICK");
  if (env && *env && std::strcmp(env, "0") != 0) quick = true;
  std::string filter;
  std::vector<std::string> want;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--full") {
      quick = false;
    } else if (a == "--verbose" || a == "-v") {
      verbose = true;
    } else if (a == "--list") {
      list = true;
    } else if (a == "--case" && i + 1 < argc) {
      filter = argv[++i];
    } else if (a == "--help" || a == "-h") {
      std::printf("usage: %s [--quick|--full] [--case SUBSTRING] [--verbose] [--list] [UNIT...]\nunits:", argv[0]);
      for (const Unit& u : kUnits) std::printf(" %s", u.name);
      std::printf("\n");
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      std::printf("unknown option %s (see --help)\n", a.c_str());
      return 2;
    } else {
      want.push_back(a);
    }
  }
  for (const std::string& w : want) {
    bool known = false;
    for (const Unit& u : kUnits) known = known || w == u.name;
    if (!known) {
      std::printf("unknown unit '%s'; this build has:", w.c_str());
      for (const Unit& u : kUnits) std::printf(" %s", u.name);
      std::printf("\n");
      return 2;
    }
  }

  std::vector<Case> all = make_cases();
  std::vector<const Case*> cases;
  for (const Case& c : all)
    if ((!quick || c.quick) && (filter.empty() || c.name.find(filter) != std::string::npos)) cases.push_back(&c);
  if (list) {
    for (const Case* c : cases) std::printf("%s%s\n", c->name.c_str(), c->quick ? "  [quick]" : "");
    return 0;
  }

  std::vector<const Unit*> units;
  for (const Unit& u : kUnits) {
    const bool named = want.empty() || std::find(want.begin(), want.end(), u.name) != want.end();
    if (!named) continue;
    if (std::strcmp(u.kern->name, u.name) != 0) {  // a table wired under the wrong name
      std::printf("FAIL unit %s: its table calls itself '%s'\n", u.name, u.kern->name);
      return 1;
    }
    if (!u.supported()) {
      std::printf("unit %-12s skipped: this CPU lacks %s\n", u.name, u.needs);
      continue;
    }
    units.push_back(&u);
  }
  if (units.empty()) {
    std::printf("no unit to run on this CPU\n");
    return 77;
  }

  const auto start = std::chrono::steady_clock::now();
  std::vector<Stats> stats(units.size());
  int total_checks = 0, total_fail = 0;
  uint64_t seed = 1000;
  for (const Case* c : cases) {
    for (int t = 0; t < 3; ++t) {
      const DType dt = static_cast<DType>(t);
      const Problem P = make_problem(*c, dt, ++seed);
      for (size_t ui = 0; ui < units.size(); ++ui) {
        Checker ck{units[ui]->name, c, dt, &stats[ui]};
        Outputs one = run_case(*units[ui], P, 1, ck);
        if (!quick && !ck.failed) {  // thread independence: two threads pulling items, same bits
          Checker ck2{units[ui]->name, c, dt, &stats[ui]};
          Outputs two = run_case(*units[ui], P, 2, ck2);
          if (ck2.failed) ck.failed = true;
          if (!same_bits(one, two)) ck.fail("items on two threads give different bits than on one");
        }
        ++stats[ui].checks;
        ++total_checks;
        if (ck.failed) {
          ++stats[ui].failures;
          ++total_fail;
        } else if (verbose) {
          std::printf("ok   [%s] %s (%s): |err| out %.2g lse %.2g, err/bound %.2f\n", units[ui]->name,
                      c->name.c_str(), kDtypeNames[t], ck.out_err, ck.lse_err, ck.ratio);
        }
      }
    }
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (size_t ui = 0; ui < units.size(); ++ui) {
    const Stats& s = stats[ui];
    std::printf("unit %-12s %s: %d checks (%zu cases x 3 dtypes), %d failed, kernels %.2f s; worst |err|: "
                "f32 out %.2g lse %.2g rope %.2g*|x| (err/bound %.2f) | bf16 out %.2g lse %.2g (%.0f ulp) | "
                "f16 out %.2g lse %.2g (%.0f ulp) | cos/sin %.2g\n",
                units[ui]->name, s.failures ? "FAILED" : "passed", s.checks, cases.size(), s.failures, s.kernel_s,
                s.out_err[0], s.lse_err[0], s.rope_err[0], s.ratio[0], s.out_err[1], s.lse_err[1], s.ulps[1],
                s.out_err[2], s.lse_err[2], s.ulps[2], s.cs_err);
    if (s.tile_checks)
      std::printf("unit %-12s %d bf16 tiled checks bounded with the bf16-intermediate terms (rotated Q/K and "
                  "probabilities rounded to bf16)\n", units[ui]->name, s.tile_checks / (quick ? 1 : 2));
  }
  std::printf("cpu kernels: %s list, %zu unit(s), %.1f s\n", quick ? "quick" : "full", units.size(), wall);
  std::printf("cpu_kernels: %d passed, %d failed\n", total_checks - total_fail, total_fail);
  return total_fail ? 1 : 0;
}
