// The schemas of the native ops (torch.ops.ropekern.*), written once: csrc/bindings.cpp defines
// them for the extension, csrc/tests/test_cuda_schemas.cpp for the check of the CUDA registrations.
// Shapes and semantics: csrc/bindings.cpp; the argument order is ropekern/_validation.py's.
#pragma once

#include <torch/library.h>

// RopeParams as op arguments, in the order of every op (ropekern._validation.RopeArgs): in the
// schemas, as the C++ parameters of the ops (csrc/op_args.h), and as the arguments that pass them on.
#define ROPEKERN_ROPE_SCHEMA \
  "Tensor freqs, int rotary_dim, bool interleaved, float attention_factor, int table_positions"
#define ROPEKERN_ROPE_PARAMS \
  const at::Tensor &freqs, int64_t rotary_dim, bool interleaved, double attention_factor, int64_t table_positions
#define ROPEKERN_ROPE_ARGS freqs, rotary_dim, interleaved, attention_factor, table_positions

namespace ropekern {

inline void define_schemas(torch::Library& m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, " ROPEKERN_ROPE_SCHEMA
        ", bool causal, float softmax_scale, int window_left, int window_right) -> (Tensor out, Tensor lse)");
  m.def("fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
        "Tensor? v_new, Tensor? block_table, " ROPEKERN_ROPE_SCHEMA
        ", bool causal, float softmax_scale, int window_left, int window_right, int num_splits) -> (Tensor out, "
        "Tensor lse)");
  m.def("bwd(Tensor dout, Tensor out, Tensor lse, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor q_pos, "
        "Tensor k_pos, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
        ROPEKERN_ROPE_SCHEMA ", bool causal, float softmax_scale, int window_left, int window_right) -> (Tensor dq, "
        "Tensor dk, Tensor dv)");
  m.def("apply_rope(Tensor x, Tensor positions, " ROPEKERN_ROPE_SCHEMA ") -> Tensor");
  m.def("apply_rope_(Tensor(a!) x, Tensor positions, " ROPEKERN_ROPE_SCHEMA ") -> ()");
}

}  // namespace ropekern
