// The CUDA op registrations (csrc/cuda/bindings_cuda.cpp) against the agreed op schemas, on a
// machine without a CUDA build of torch: the dispatcher infers each C++ kernel's schema when it
// meets the definition below and throws "Inferred operator schema ... doesn't match" on any
// difference. The definitions are the schemas agreed with csrc/bindings.cpp, verbatim.
// Built only with -DROPEKERN_CUDA=ON -DROPEKERN_CUDA_SCHEMA_CHECK=ON (CMakeLists.txt).
#include <cstdio>

#include "bindings_cuda.cpp"

TORCH_LIBRARY(ropekern, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor freqs, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int rotary_dim, bool interleaved, "
      "float attention_factor, bool causal, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
      "Tensor? v_new, Tensor? block_table, Tensor freqs, int rotary_dim, bool interleaved, float attention_factor, "
      "bool causal, float softmax_scale, int num_splits) -> (Tensor out, Tensor lse)");
  m.def(
      "apply_rope(Tensor x, Tensor positions, Tensor freqs, int rotary_dim, bool interleaved, "
      "float attention_factor) -> Tensor");
}

int main() {
  for (const char* name : {"ropekern::fwd", "ropekern::fwd_kvcache", "ropekern::apply_rope"}) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
      std::printf("FAIL %s has no CUDA kernel\n", name);
      return 1;
    }
    std::printf("ok %s\n", c10::toString(op->schema()).c_str());
  }
  return 0;
}
