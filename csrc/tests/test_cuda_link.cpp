// Links against the compiled CUDA kernel library (every launcher instantiation must resolve) and
// checks that the dispatch layer refuses unsupported calls with a reason before touching a device,
// so this runs on a machine without a GPU.
#include <cstdio>
#include <string>

#include "launch.h"

namespace {

int failures = 0;

void expect_refused(const std::string& reason, const char* needle, const char* what) {
  if (reason.find(needle) == std::string::npos) {
    std::printf("FAIL %s: got \"%s\"\n", what, reason.c_str());
    ++failures;
  }
}

}  // namespace

int main() {
  using namespace ropekern::cuda;
  ropekern::AttnParams p;
  p.batch = 1;
  p.seqlen_q = p.seqlen_k = 16;
  p.num_heads = p.num_heads_k = 1;
  p.head_dim = 80;
  expect_refused(run_attention(p, DType::kFloat16, nullptr), "head dim 80", "head dim 80 refused");
  p.head_dim = 128;
  expect_refused(run_attention(p, DType::kFloat32, nullptr), "float16 or bfloat16", "fp32 attention refused");
  p.num_heads = 3;
  p.num_heads_k = 2;
  expect_refused(run_attention(p, DType::kBFloat16, nullptr), "multiple of key/value heads", "GQA ratio checked");

  CacheParams c;
  c.p.batch = 1;
  c.p.seqlen_q = 1;
  c.p.num_heads = c.p.num_heads_k = 1;
  c.p.head_dim = 64;
  c.p.num_splits = 4;
  expect_refused(run_cache(c, DType::kFloat16, nullptr), "workspace", "split-K without workspace refused");
  c.p.num_splits = 1;
  c.p.rope.rotary_dim = 63;
  expect_refused(run_cache(c, DType::kFloat16, nullptr), "rotary_dim", "odd rotary_dim refused");

  RopeApplyParams r;
  r.head_dim = 64;
  r.rope.rotary_dim = 66;
  expect_refused(run_rope(r, DType::kFloat32, nullptr), "rotary_dim", "rotary_dim > head_dim refused");
  r.rope.rotary_dim = 64;
  r.rope.table_positions = -1;
  expect_refused(run_rope(r, DType::kFloat32, nullptr), "table_positions", "negative table_positions refused");

  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("CUDA library links; unsupported calls are refused before launch\n");
  return 0;
}
