// The ceilings of the CPU benchmark's machine: FMA peaks at each vector width it has (ymm with
// AVX2/FMA, zmm with AVX-512F, bf16 dot products with AVX512_BF16, AMX-BF16 tiles), the read
// bandwidth, and glibc
// memcpy (read + write) for comparison with bench_cpu.py's memcpy figure.
//
//   gcc -O3 -fopenmp benchmarks/tools/cpu_roofline.c -o /tmp/cpu_roofline
//   OMP_NUM_THREADS=2 /tmp/cpu_roofline          # best of 5 rounds; MiB of the buffer: argv[1] (512)
//   OMP_NUM_THREADS=2 /tmp/cpu_roofline 512 --json   # one JSON object (bench_cpu.py reads it)
//
// Each peak: 12 independent accumulator chains per thread (FMA latency 4 x 2 pipes needs >= 8);
// 2 flops per lane per FMA (16 per ymm, 32 per zmm); vdpbf16ps does two multiply-adds per fp32
// lane (64 flops per zmm instruction). Each width is compiled for its own target and run only
// when cpuid reports it, so the program runs on any x86-64. Read: 4 independent sums per thread
// over its share of the buffer.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

static const long kIters = 50000000;

#define PEAK_LOOP(TYPE, SET1, OP, STORE, LANES)                                \
  float sink = 0.0f;                                                            \
  const double t0 = omp_get_wtime();                                            \
  _Pragma("omp parallel reduction(+ : sink)") {                                 \
    TYPE acc[12];                                                               \
    for (int i = 0; i < 12; ++i) acc[i] = SET1(0.001f * i);                     \
    const TYPE b = SET1(0.9999f), c = SET1(0.0001f);                            \
    for (long it = 0; it < kIters; ++it)                                        \
      for (int i = 0; i < 12; ++i) acc[i] = OP;                                 \
    float t[LANES];                                                             \
    for (int i = 0; i < 12; ++i) STORE(t, acc[i]), sink += t[0];                \
  }                                                                             \
  const double dt = omp_get_wtime() - t0;                                       \
  if (sink == 12345.0f) puts("");

__attribute__((target("avx2,fma"))) static double fma_ymm(void) {
  PEAK_LOOP(__m256, _mm256_set1_ps, _mm256_fmadd_ps(acc[i], b, c), _mm256_storeu_ps, 8)
  return omp_get_max_threads() * (double)kIters * 12 * 16 / dt / 1e9;
}

__attribute__((target("avx512f"))) static double fma_zmm(void) {
  PEAK_LOOP(__m512, _mm512_set1_ps, _mm512_fmadd_ps(acc[i], b, c), _mm512_storeu_ps, 16)
  return omp_get_max_threads() * (double)kIters * 12 * 32 / dt / 1e9;
}

// b and c reinterpreted as 32 bf16 each: acc += b[2i] c[2i] + b[2i+1] c[2i+1] per fp32 lane.
__attribute__((target("avx512f,avx512bf16"))) static double dot_bf16(void) {
  PEAK_LOOP(__m512, _mm512_set1_ps,
            _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_castps_si512(b), (__m512bh)_mm512_castps_si512(c)),
            _mm512_storeu_ps, 16)
  return omp_get_max_threads() * (double)kIters * 12 * 64 / dt / 1e9;
}

// AMX-BF16: tdpbf16ps multiplies 16 x 32 bf16 by 32 x 16 into 16 x 16 fp32 (16,384 flops); four
// independent accumulator tiles from two A and two B tiles, as a 2 x 2 blocked kernel runs them.
// Linux must grant the process the tile data first (arch_prctl ARCH_REQ_XCOMP_PERM).
struct tile_config {
  unsigned char palette, start_row, reserved[14];
  unsigned short colsb[16];
  unsigned char rows[16];
};

static int amx_permitted(void) {
#if defined(__linux__)
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
  return 0;
#endif
}

__attribute__((target("amx-tile,amx-bf16"))) static double amx_bf16(void) {
  const long iters = kIters / 4;
  const double t0 = omp_get_wtime();
#pragma omp parallel
  {
    static __thread unsigned short a[16 * 32] __attribute__((aligned(64)));
    static __thread float c[16 * 16] __attribute__((aligned(64)));
    struct tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a, 64);
    _tile_loadd(6, a, 64);
    _tile_loadd(7, a, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long it = 0; it < iters; ++it) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, 64);
    _tile_release();
  }
  const double dt = omp_get_wtime() - t0;
  return omp_get_max_threads() * (double)iters * 4 * 16384 / dt / 1e9;
}

__attribute__((target("avx2"))) static double read_gbs(const float* a, size_t n) {
  float sink = 0.0f;
  const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const size_t lo = n / nt * t, hi = n / nt * (t + 1);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = lo; i + 32 <= hi; i += 32) {
      s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
      s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
      s2 = _mm256_add_ps(s2, _mm256_load_ps(a + i + 16));
      s3 = _mm256_add_ps(s3, _mm256_load_ps(a + i + 24));
    }
    float tt[8];
    _mm256_storeu_ps(tt, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    sink += tt[0];
  }
  const double dt = omp_get_wtime() - t0;
  if (sink == 12345.0f) puts("");
  return n * sizeof(float) / dt / 1e9;
}

static double best(double a, double b) { return a > b ? a : b; }

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 512;
  const int json = argc > 2 && strcmp(argv[2], "--json") == 0;
  __builtin_cpu_init();
  const int has_ymm = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const int has_zmm = __builtin_cpu_supports("avx512f");
  const int has_bf16 = has_zmm && __builtin_cpu_supports("avx512bf16");
  const int has_amx = __builtin_cpu_supports("amx-bf16") && amx_permitted();
  const size_t n = mib * 1024 * 1024 / sizeof(float);
  float* a = aligned_alloc(64, n * sizeof(float));
  float* b = aligned_alloc(64, n * sizeof(float));
  for (size_t i = 0; i < n; ++i) a[i] = 1.0f, b[i] = 0.0f;
  double ymm = 0, zmm = 0, bf16 = 0, amx = 0, read = 0, copy = 0;
  for (int round = 0; round < 5; ++round) {
    if (has_ymm) ymm = best(ymm, fma_ymm());
    if (has_zmm) zmm = best(zmm, fma_zmm());
    if (has_bf16) bf16 = best(bf16, dot_bf16());
    if (has_amx) amx = best(amx, amx_bf16());
    if (has_ymm) read = best(read, read_gbs(a, n));
    const double t0 = omp_get_wtime();
#pragma omp parallel
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const size_t lo = n / nt * t, hi = n / nt * (t + 1);
      memcpy(b + lo, a + lo, (hi - lo) * sizeof(float));
    }
    copy = best(copy, 2.0 * n * sizeof(float) / (omp_get_wtime() - t0) / 1e9);
  }
  if (json) {
    printf("{\"threads\": %d, \"fma_ymm_gflops\": %.1f, \"fma_zmm_gflops\": %.1f, \"dot_bf16_gflops\": %.1f, "
           "\"amx_bf16_gflops\": %.1f, \"read_gbs\": %.1f, \"memcpy_gbs\": %.1f, \"buffer_mib\": %zu}\n",
           omp_get_max_threads(), ymm, zmm, bf16, amx, read, copy, mib);
  } else {
    printf("threads %d: FMA peak %.1f GFLOP/s (ymm) | %.1f (zmm) | %.1f (bf16 dot, vdpbf16ps) | %.1f (AMX-BF16 tiles) | "
           "read %.1f GB/s | memcpy %.1f GB/s (read + write), %zu MiB  (0 = not on this CPU)\n",
           omp_get_max_threads(), ymm, zmm, bf16, amx, read, copy, mib);
  }
  free(a);
  free(b);
  return 0;
}
