// The two ceilings of the CPU benchmark's machine: the AVX2 FMA peak and the read bandwidth
// (plus glibc memcpy, read + write, for comparison with bench_cpu.py's memcpy figure).
//
//   gcc -O3 -mavx2 -mfma -fopenmp benchmarks/tools/cpu_roofline.c -o /tmp/cpu_roofline
//   OMP_NUM_THREADS=2 /tmp/cpu_roofline          # best of 5 rounds; MiB of the buffer: argv[1] (512)
//
// FMA: 12 independent accumulator chains per thread (latency 4 x 2 pipes needs >= 8), 16 flops
// per 8-lane FMA. Read: 4 independent sums per thread over its half of the buffer.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double fma_gflops(void) {
  const long iters = 100000000;
  float sink = 0.0f;
  const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
    __m256 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.001f * i);
    const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(0.0001f);
    for (long it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
    __m256 s = acc[0];
    for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
    float t[8];
    _mm256_storeu_ps(t, s);
    sink += t[0];
  }
  const double dt = omp_get_wtime() - t0;
  if (sink == 12345.0f) puts("");  // keep the chains alive
  return omp_get_max_threads() * (double)iters * 12 * 16 / dt / 1e9;
}

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 512;
  const size_t n = mib * 1024 * 1024 / sizeof(float);
  float* a = aligned_alloc(64, n * sizeof(float));
  float* b = aligned_alloc(64, n * sizeof(float));
  for (size_t i = 0; i < n; ++i) a[i] = 1.0f, b[i] = 0.0f;
  double best_fma = 0, best_read = 0, best_copy = 0;
  for (int round = 0; round < 5; ++round) {
    const double g = fma_gflops();
    if (g > best_fma) best_fma = g;
    float sink = 0.0f;
    double t0 = omp_get_wtime();
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
    const double read = n * sizeof(float) / (omp_get_wtime() - t0) / 1e9;
    if (sink == 12345.0f) puts("");
    if (read > best_read) best_read = read;
    t0 = omp_get_wtime();
#pragma omp parallel
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const size_t lo = n / nt * t, hi = n / nt * (t + 1);
      memcpy(b + lo, a + lo, (hi - lo) * sizeof(float));
    }
    const double copy = 2.0 * n * sizeof(float) / (omp_get_wtime() - t0) / 1e9;
    if (copy > best_copy) best_copy = copy;
  }
  printf("threads %d: FMA peak %.1f GFLOP/s | read %.1f GB/s | memcpy %.1f GB/s (read + write), %zu MiB\n",
         omp_get_max_threads(), best_fma, best_read, best_copy, mib);
  free(a);
  free(b);
  return 0;
}
