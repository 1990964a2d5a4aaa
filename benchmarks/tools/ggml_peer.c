// bench_cpu.py's llama.cpp peer: ggml's CPU RoPE + flash attention on bench_cpu.py's shapes.
// Ours; includes only ggml's public headers. Built outside the repository, with ggml, by
// benchmarks/tools/build_ggml_peer.sh (which pins the ggml version).
//
// The graph is what llama.cpp builds for one attention layer (llm_graph_context::build_attn with
// flash attention on), with the projections left out:
//   prefill S:  q, k: f32 [S, H, D] (un-rotated) -> ggml_rope_ext(NEOX) each -> k cast to the
//               cache type -> ggml_flash_attn_ext(q, k, v, causal f16 mask) -> out f32 [S, Hq, D]
//   decode N:   q: f32 [1, Hq, D] -> ggml_rope_ext(NEOX) at position N-1 -> ggml_flash_attn_ext over
//               a cache of N keys rotated when they were appended (as llama.cpp's KV cache holds
//               them; rotating them is set-up, not timed) and N values, a zero f16 mask row
// GGML_ROPE_TYPE_NEOX rotates the pairs (i, i + D/2), ropekern's default half-split layout;
// theta_i = p * base^(-2i/D), scale 1/sqrt(D). The cache type (--kv f32|f16|bf16) is that of k
// and v in flash attention; q stays f32 (ggml converts it to k's dot-product type inside).
//
//   ggml_peer --info                                       # JSON: ggml version, CPU features
//   ggml_peer prefill 4096 --kv f16 --threads 2 --repeats 5  # JSON: median seconds and each run
//   ggml_peer decode 16384 --kv bf16 --threads 2 --serve     # timed runs on request, see below
//   ggml_peer prefill 256 --kv f32 --in DIR --out FILE       # numerics: DIR/{q,k,v}.f32 in, out.f32
//
// Layouts: q [S, Hq, D], k and v [S or N, Hkv, D], out [S or 1, Hq, D], raw float32, row-major,
// i.e. torch's [1, S, H, D] contiguous float32 tensors (--in reads them, --out writes out).
// Without --in the inputs are standard normal (a fixed seed).
//
// --serve: after the set-up and the warm-up runs, prints {"ready": ...} and then answers each
// line on stdin: "run" -> wakes the thread pool (a tiny untimed graph), then one timed run,
// prints its seconds; "dump PATH" -> writes the output; "quit" or end of input -> exits.
// bench_cpu.py uses this to run ggml between its in-process candidates (A B C ggml A B C ggml
// ...) with the graph and the inputs built once.
#define _POSIX_C_SOURCE 199309L  // clock_gettime under -std=c11
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

static void die(const char* msg, const char* arg) {
  fprintf(stderr, "ggml_peer: %s%s\n", msg, arg ? arg : "");
  exit(2);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double uniform01(void) {  // xorshift64*, in (0, 1)
  rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
  return ((rng_state * 2685821657736338717ull >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static void fill_normal(float* x, int64_t n) {  // Box-Muller
  for (int64_t i = 0; i < n; i += 2) {
    const double r = sqrt(-2.0 * log(uniform01())), t = 6.283185307179586 * uniform01();
    x[i] = (float)(r * cos(t));
    if (i + 1 < n) x[i + 1] = (float)(r * sin(t));
  }
}

static void read_f32(const char* dir, const char* name, float* dst, int64_t n) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.f32", dir, name);
  FILE* f = fopen(path, "rb");
  if (!f) die("cannot open ", path);
  if (fread(dst, sizeof(float), (size_t)n, f) != (size_t)n) die("short read from ", path);
  fclose(f);
}

static void write_f32(const char* path, const struct ggml_tensor* t) {
  FILE* f = fopen(path, "wb");
  if (!f) die("cannot write ", path);
  if (fwrite(t->data, 1, ggml_nbytes(t), f) != ggml_nbytes(t)) die("short write to ", path);
  fclose(f);
}

static struct ggml_tensor* leaf_copy(struct ggml_context* ctx, const struct ggml_tensor* t) {
  struct ggml_tensor* leaf = ggml_new_tensor(ctx, t->type, GGML_MAX_DIMS, t->ne);
  memcpy(leaf->data, t->data, ggml_nbytes(t));
  return leaf;
}

static int cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static void info(void) {
  printf("{\"ggml\": \"%s\", \"commit\": \"%s\", \"avx2\": %d, \"fma\": %d, \"f16c\": %d, \"avx512\": %d, "
         "\"avx512_bf16\": %d, \"avx512_vnni\": %d, \"amx_int8\": %d, \"llamafile\": %d}\n",
         ggml_version(), ggml_commit(), ggml_cpu_has_avx2(), ggml_cpu_has_fma(), ggml_cpu_has_f16c(),
         ggml_cpu_has_avx512(), ggml_cpu_has_avx512_bf16(), ggml_cpu_has_avx512_vnni(), ggml_cpu_has_amx_int8(),
         ggml_cpu_has_llamafile());
}

int main(int argc, char** argv) {
  if (argc >= 2 && strcmp(argv[1], "--info") == 0) {
    ggml_cpu_init();
    info();
    return 0;
  }
  if (argc < 3 || (strcmp(argv[1], "prefill") != 0 && strcmp(argv[1], "decode") != 0)) {
    fprintf(stderr,
            "usage: ggml_peer --info | {prefill S | decode N} [--kv f32|f16|bf16] [--threads T] [--hq H] [--hkv H]\n"
            "       [--dim D] [--theta BASE] [--repeats R] [--warmup W] [--serve] [--in DIR] [--out FILE]\n");
    return 2;
  }
  const int decode = strcmp(argv[1], "decode") == 0;
  const long len = atol(argv[2]);  // prefill: S (queries = keys); decode: N keys, 1 query
  const char *kv_name = "f16", *in_dir = NULL, *out_path = NULL;
  int threads = 2, repeats = 5, warmup = 1, serve = 0;
  int hq = decode ? 32 : 16, hkv = decode ? 8 : 4, dim = 128;
  float theta = 10000.0f;
  for (int i = 3; i < argc; ++i) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--serve") == 0) {
      serve = 1;
      continue;
    }
    if (!v) die("missing value after ", a);
    ++i;
    if (strcmp(a, "--kv") == 0) kv_name = v;
    else if (strcmp(a, "--threads") == 0) threads = atoi(v);
    else if (strcmp(a, "--hq") == 0) hq = atoi(v);
    else if (strcmp(a, "--hkv") == 0) hkv = atoi(v);
    else if (strcmp(a, "--dim") == 0) dim = atoi(v);
    else if (strcmp(a, "--theta") == 0) theta = (float)atof(v);
    else if (strcmp(a, "--repeats") == 0) repeats = atoi(v);
    else if (strcmp(a, "--warmup") == 0) warmup = atoi(v);
    else if (strcmp(a, "--in") == 0) in_dir = v;
    else if (strcmp(a, "--out") == 0) out_path = v;
    else die("unknown option ", a);
  }
  enum ggml_type kv_type;
  if (strcmp(kv_name, "f32") == 0) kv_type = GGML_TYPE_F32;
  else if (strcmp(kv_name, "f16") == 0) kv_type = GGML_TYPE_F16;
  else if (strcmp(kv_name, "bf16") == 0) kv_type = GGML_TYPE_BF16;
  else die("--kv must be f32, f16 or bf16, got ", kv_name);
  if (len < 1 || threads < 1 || repeats < 1 || warmup < 0 || hq < 1 || hkv < 1 || hq % hkv || dim < 2 || dim % 2)
    die("bad shape or counts", NULL);

  ggml_cpu_init();
  const int64_t nq = decode ? 1 : len, nkv = len, D = dim;
  const size_t esz = ggml_type_size(kv_type);
  // Every tensor is allocated in the one context: inputs, the cache (decode), the rotated q/k,
  // the cast k, the mask, the output, plus the set-up graph's; generous slack for alignment.
  const size_t bytes = (size_t)nq * hq * D * 4 * 3                 // q, rope(q), out
                       + (size_t)nkv * hkv * D * (4 * 3 + esz * 4)  // k, rope(k), v f32; cast(k), v x2, cache
                       + (size_t)nkv * nq * 2 + (size_t)nkv * 4 * 2 // mask, positions
                       + 64 * ggml_tensor_overhead() + 3 * ggml_graph_overhead() + (1 << 20);
  struct ggml_init_params ip = {.mem_size = bytes, .mem_buffer = NULL, .no_alloc = false};
  struct ggml_context* ctx = ggml_init(ip);
  if (!ctx) die("ggml_init failed", NULL);

  // Un-rotated inputs, f32, torch's [S, H, D] = ggml's ne [D, H, S].
  struct ggml_tensor* q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, hq, nq);
  struct ggml_tensor* k = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, hkv, nkv);
  struct ggml_tensor* v32 = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, hkv, nkv);
  if (in_dir) {
    read_f32(in_dir, "q", q->data, ggml_nelements(q));
    read_f32(in_dir, "k", k->data, ggml_nelements(k));
    read_f32(in_dir, "v", v32->data, ggml_nelements(v32));
  } else {
    fill_normal(q->data, ggml_nelements(q));
    fill_normal(k->data, ggml_nelements(k));
    fill_normal(v32->data, ggml_nelements(v32));
  }
  struct ggml_tensor* kpos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, nkv);
  for (int64_t i = 0; i < nkv; ++i) ((int32_t*)kpos->data)[i] = (int32_t)i;
  struct ggml_tensor* qpos = kpos;
  if (decode) {
    qpos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);
    ((int32_t*)qpos->data)[0] = (int32_t)(nkv - 1);
  }
#define ROPE(x, pos) \
  ggml_rope_ext(ctx, x, pos, NULL, (int)D, GGML_ROPE_TYPE_NEOX, 0, theta, 1.0f, 0.0f, 1.0f, 32.0f, 1.0f)

  struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
  struct ggml_threadpool* tp = ggml_threadpool_new(&tpp);
  if (!tp) die("ggml_threadpool_new failed", NULL);

  // V in the cache type (set-up); decode: also the cache of rotated keys (set-up, as in llama.cpp).
  struct ggml_cgraph* setup = ggml_new_graph(ctx);
  struct ggml_tensor* v = kv_type == GGML_TYPE_F32 ? v32 : ggml_cast(ctx, v32, kv_type);
  ggml_build_forward_expand(setup, v);
  struct ggml_tensor* k_cache = NULL;
  if (decode) {
    k_cache = ROPE(k, kpos);
    if (kv_type != GGML_TYPE_F32) k_cache = ggml_cast(ctx, k_cache, kv_type);
    ggml_build_forward_expand(setup, k_cache);
  }
  {
    struct ggml_cplan plan = ggml_graph_plan(setup, threads, tp);
    void* work = plan.work_size ? malloc(plan.work_size) : NULL;
    plan.work_data = work;
    if (ggml_graph_compute(setup, &plan) != GGML_STATUS_SUCCESS) die("set-up graph failed", NULL);
    free(work);
  }
  // Copied into leaves (tensors without an op): a graph includes every op its result depends on,
  // so the timed graph would otherwise redo the set-up on each run.
  v = leaf_copy(ctx, v);
  if (decode) k_cache = leaf_copy(ctx, k_cache);

  // The causal mask: mask[i][j] = 0 where key j <= query i (+ the offset of the cache), else -inf.
  struct ggml_tensor* mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, nkv, nq);
  {
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    ggml_fp16_t* m = mask->data;
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < nkv; ++j) m[i * nkv + j] = j <= i + (nkv - nq) ? zero : ninf;
  }

  // The timed graph.
  struct ggml_cgraph* gf = ggml_new_graph(ctx);
  struct ggml_tensor* qr = ggml_permute(ctx, ROPE(q, qpos), 0, 2, 1, 3);  // ne [D, nq, hq]
  struct ggml_tensor* kc = k_cache;
  if (!decode) {
    kc = ROPE(k, kpos);
    if (kv_type != GGML_TYPE_F32) kc = ggml_cast(ctx, kc, kv_type);
  }
  struct ggml_tensor* kp = ggml_permute(ctx, kc, 0, 2, 1, 3);  // ne [D, nkv, hkv]
  struct ggml_tensor* vp = ggml_permute(ctx, v, 0, 2, 1, 3);
  struct ggml_tensor* out = ggml_flash_attn_ext(ctx, qr, kp, vp, mask, 1.0f / sqrtf((float)D), 0.0f, 0.0f);
  ggml_build_forward_expand(gf, out);  // out: ne [D, hq, nq] = torch's [nq, hq, D]

  struct ggml_cplan plan = ggml_graph_plan(gf, threads, tp);
  void* work = plan.work_size ? malloc(plan.work_size) : NULL;
  plan.work_data = work;
  for (int i = 0; i < warmup; ++i)
    if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) die("graph failed", NULL);

  if (serve) {
    struct ggml_cgraph* wake = ggml_new_graph(ctx);
    ggml_build_forward_expand(wake, ggml_scale(ctx, ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 4096), 1.0f));
    struct ggml_cplan wake_plan = ggml_graph_plan(wake, threads, tp);
    if (wake_plan.work_size) die("wake-up graph wants a work buffer", NULL);
    printf("{\"ready\": true, \"op\": \"%s\", \"len\": %ld, \"kv\": \"%s\", \"threads\": %d, \"ggml\": \"%s\"}\n",
           argv[1], len, kv_name, threads, ggml_version());
    fflush(stdout);
    char line[4200];
    while (fgets(line, sizeof line, stdin)) {
      line[strcspn(line, "\r\n")] = 0;
      if (strcmp(line, "run") == 0) {
        // The pool's threads have slept since the last request; a tiny untimed graph wakes them
        // first, so that the timed run starts with them spinning, as between the graphs of a
        // llama.cpp decode loop.
        if (ggml_graph_compute(wake, &wake_plan) != GGML_STATUS_SUCCESS) die("wake-up graph failed", NULL);
        const double t0 = now_s();
        const enum ggml_status st = ggml_graph_compute(gf, &plan);
        const double dt = now_s() - t0;
        if (st != GGML_STATUS_SUCCESS) die("graph failed", NULL);
        printf("%.9f\n", dt);
      } else if (strncmp(line, "dump ", 5) == 0) {
        write_f32(line + 5, out);
        printf("ok\n");
      } else if (strcmp(line, "quit") == 0) {
        break;
      } else {
        printf("error: unknown command\n");
      }
      fflush(stdout);
    }
  } else {
    double* t = malloc(sizeof(double) * repeats);
    for (int i = 0; i < repeats; ++i) {
      const double t0 = now_s();
      if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) die("graph failed", NULL);
      t[i] = now_s() - t0;
    }
    if (out_path) write_f32(out_path, out);
    double* s = malloc(sizeof(double) * repeats);
    memcpy(s, t, sizeof(double) * repeats);
    qsort(s, repeats, sizeof(double), cmp_double);
    const double median = repeats % 2 ? s[repeats / 2] : 0.5 * (s[repeats / 2 - 1] + s[repeats / 2]);
    printf("{\"op\": \"%s\", \"len\": %ld, \"kv\": \"%s\", \"threads\": %d, \"hq\": %d, \"hkv\": %d, \"dim\": %d, "
           "\"ggml\": \"%s\", \"median_s\": %.9f, \"times_s\": [",
           argv[1], len, kv_name, threads, hq, hkv, dim, ggml_version(), median);
    for (int i = 0; i < repeats; ++i) printf("%s%.9f", i ? ", " : "", t[i]);
    printf("]}\n");
    free(s);
    free(t);
  }
  free(work);
  ggml_threadpool_free(tp);
  ggml_free(ctx);
  return 0;
}
