// Torch-facing launcher of the CUDA kernels: CUDA implementations of the ropekern ops whose
// schemas csrc/bindings.cpp defines with TORCH_LIBRARY(ropekern, m):
//
//   fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor freqs, Tensor? cu_seqlens_q,
//       Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int rotary_dim, bool interleaved,
//       float attention_factor, bool causal, float softmax_scale) -> (Tensor out, Tensor lse)
//   fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new,
//       Tensor? v_new, Tensor? block_table, Tensor freqs, int rotary_dim, bool interleaved,
//       float attention_factor, bool causal, float softmax_scale, int num_splits) -> (Tensor out, Tensor lse)
//   apply_rope(Tensor x, Tensor positions, Tensor freqs, int rotary_dim, bool interleaved,
//       float attention_factor) -> Tensor
//
// This file turns tensors into the POD params of ropekern/params.h and cuda_params.h, allocates
// outputs and the split-K workspace, and calls the torch-free host API (launch.h). `freqs` is the
// split table [nT, 4, R/2] float32 (ropekern.scaling.split_turns) with nT = 1 or one per sequence.
// Positions, cu_seqlens, cache_seqlens and block_table are int32 (ropekern._validation makes them so).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "../op_args.h"
#include "launch.h"

namespace ropekern {
namespace cuda {
namespace {

constexpr const char* kWho = "ropekern (cuda)";

// The first tensor argument (q, x) must be a CUDA tensor; every other one on its device.
DType cuda_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), kWho, ": `", name, "` must be a CUDA tensor, got ", t.device());
  return args::dtype_of<DType>(t, name, kWho);
}

int to_int(int64_t v, const char* what) { return args::to_int(v, what, kWho); }

int device_attribute(const at::Tensor& t, cudaDeviceAttr attr) {
  int value = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&value, attr, t.get_device());
  TORCH_CHECK(e == cudaSuccess, "ropekern (cuda): cudaDeviceGetAttribute failed: ", cudaGetErrorString(e));
  return value;
}

void check_arch(const at::Tensor& t) {
  const int major = device_attribute(t, cudaDevAttrComputeCapabilityMajor);
  TORCH_CHECK(major >= 8, "ropekern CUDA kernels need compute capability 8.0+ (mma.sync bf16, cp.async), got ", major,
              ".", device_attribute(t, cudaDevAttrComputeCapabilityMinor));
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void raise_if(const std::string& err, const char* op) { TORCH_CHECK(err.empty(), "ropekern.", op, " (CUDA): ", err); }

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& q_pos, const at::Tensor& k_pos, const at::Tensor& freqs,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, int64_t rotary_dim, bool interleaved,
                                       double attention_factor, bool causal, double softmax_scale) {
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK_VALUE(varlen == cu_seqlens_k.has_value(),
                    "ropekern (cuda): `cu_seqlens_q` and `cu_seqlens_k` go together");
  const int64_t dims = varlen ? 3 : 4;
  const DType dtype = cuda_input(q, "q");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}})
    args::check_float(t, name, dims, q.scalar_type(), q, kWho);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "ropekern (cuda): `k` and `v` shapes differ");
  check_arch(q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = varlen ? cu_seqlens_q->size(0) - 1 : q.size(0);

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = varlen ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  AttnParams p;
  args::set_q_out_lse(p, q, out, lse);
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  args::set_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  args::set_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "ropekern (cuda): head dims of `q` and `k` differ");
  const RopeParams rope =
      args::rope_params(freqs, rotary_dim, interleaved, attention_factor, q.size(-1), batch, q, kWho);
  args::set_shape(p, batch, varlen ? max_seqlen_q : q.size(1), q.size(-2), k.size(-2), q.size(-1), softmax_scale,
                  causal, rope, kWho);
  at::Tensor qp, kp, cu_q, cu_k;  // contiguous int32 views, alive until the launch
  if (varlen) {
    cu_q = args::int32_arg(*cu_seqlens_q, "cu_seqlens_q", {batch + 1}, q, kWho);
    cu_k = args::int32_arg(*cu_seqlens_k, "cu_seqlens_k", {batch + 1}, q, kWho);
    qp = args::int32_arg(q_pos, "q_pos", {q.size(0)}, q, kWho);
    kp = args::int32_arg(k_pos, "k_pos", {k.size(0)}, q, kWho);
    p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
    p.seqlen_k = to_int(max_seqlen_k, "max_seqlen_k");
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "ropekern (cuda): batch sizes of `q` and `k` differ");
    qp = args::int32_arg(q_pos, "q_pos", {batch, q.size(1)}, q, kWho);
    kp = args::int32_arg(k_pos, "k_pos", {batch, k.size(1)}, q, kWho);
    p.q_pos_batch_stride = qp.stride(0);
    p.k_pos_batch_stride = kp.stride(0);
    p.seqlen_k = to_int(k.size(1), "Sk");
  }
  p.q_pos = qp.data_ptr<int32_t>();
  p.k_pos = kp.data_ptr<int32_t>();
  if (out.numel() == 0) return {out, lse};
  raise_if(run_attention(p, dtype, current_stream(q)), "fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                               const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                               const std::optional<at::Tensor>& v_new,
                                               const std::optional<at::Tensor>& block_table, const at::Tensor& freqs,
                                               int64_t rotary_dim, bool interleaved, double attention_factor,
                                               bool causal, double softmax_scale, int64_t num_splits) {
  const DType dtype = cuda_input(q, "q");
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{q, "q"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}})
    args::check_float(t, name, 4, q.scalar_type(), q, kWho);
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "ropekern (cuda): `k_new` and `v_new` go together");
  check_arch(q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0);
  const at::Tensor lens = args::int32_arg(cache_seqlens, "cache_seqlens", {batch}, q, kWho);

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  CacheParams cp;
  DecodeParams& p = cp.p;
  args::set_q_out_lse(p, q, out, lse);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  args::set_strides(k_cache, p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
  args::set_strides(v_cache, p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
  p.cache_seqlens = lens.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(k_cache.size(3) == q.size(3) && v_cache.sizes() == k_cache.sizes(),
                    "ropekern (cuda): cache shapes must be [*, *, Hkv, D] and equal");
  const RopeParams rope =
      args::rope_params(freqs, rotary_dim, interleaved, attention_factor, q.size(3), batch, q, kWho);
  args::set_shape(p, batch, q.size(1), q.size(2), k_cache.size(2), q.size(3), softmax_scale, causal, rope, kWho);
  if (k_new.has_value()) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k_new, "k_new"}, {*v_new, "v_new"}}) {
      args::check_float(t, name, 4, q.scalar_type(), q, kWho);
      TORCH_CHECK_VALUE(t.size(0) == batch && t.size(2) == k_cache.size(2) && t.size(3) == q.size(3),
                        "ropekern (cuda): `", name, "` must be [B, S_new, Hkv, D], got ", t.sizes());
    }
    TORCH_CHECK_VALUE(v_new->sizes() == k_new->sizes(), "ropekern (cuda): `k_new` and `v_new` shapes differ");
    p.k_new = k_new->data_ptr();
    p.v_new = v_new->data_ptr();
    p.s_new = to_int(k_new->size(1), "S_new");
    args::set_strides(*k_new, p.kn_batch_stride, p.kn_row_stride, p.kn_head_stride);
    args::set_strides(*v_new, p.vn_batch_stride, p.vn_row_stride, p.vn_head_stride);
  }
  int64_t capacity = k_cache.size(1);
  at::Tensor btab;
  if (block_table.has_value()) {
    TORCH_CHECK_VALUE(block_table->dim() == 2, "ropekern (cuda): `block_table` must be [B, max_blocks], got ",
                      block_table->sizes());
    btab = args::int32_arg(*block_table, "block_table", {batch, block_table->size(1)}, q, kWho);
    p.block_table = btab.data_ptr<int32_t>();
    p.block_table_batch_stride = btab.stride(0);
    p.block_size = to_int(k_cache.size(1), "block size");
    capacity = block_table->size(1) * k_cache.size(1);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == batch, "ropekern (cuda): dense cache batch differs from `q` batch");
  }
  cp.max_seqlen_k = to_int(capacity, "cache capacity");
  TORCH_CHECK_VALUE(num_splits >= 0, "ropekern (cuda): `num_splits` must be >= 0 (0 = heuristic), got ", num_splits);
  const int sms = device_attribute(q, cudaDevAttrMultiProcessorCount);
  p.num_splits = plan_num_splits(p.batch, p.num_heads, p.num_heads_k, p.seqlen_q, cp.max_seqlen_k, sms,
                                 static_cast<int>(num_splits < 128 ? num_splits : 128));
  at::Tensor out_accum, lse_accum;
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_accum = at::empty({p.num_splits, q.size(0), q.size(2), q.size(1), q.size(3)}, f32);
    lse_accum = at::empty({p.num_splits, q.size(0), q.size(2), q.size(1)}, f32);
    cp.out_accum = out_accum.data_ptr<float>();
    cp.lse_accum = lse_accum.data_ptr<float>();
  }
  raise_if(run_cache(cp, dtype, current_stream(q)), "fwd_kvcache");
  return {out, lse};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& freqs, int64_t rotary_dim,
                      bool interleaved, double attention_factor) {
  const DType dtype = cuda_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, "ropekern (cuda): `x` must be [B, S, H, D] or [T, H, D], got ",
                    x.sizes());
  args::check_float(x, "x", x.dim(), x.scalar_type(), x, kWho);
  const c10::cuda::CUDAGuard guard(x.device());
  // A packed [T, H, D] input is one batch row of T tokens.
  const at::Tensor x4 = x.dim() == 4 ? x : x.unsqueeze(0);
  const at::Tensor pos2 = args::int32_arg(positions.dim() == 2 ? positions : positions.unsqueeze(0), "positions",
                                         {x4.size(0), x4.size(1)}, x, kWho);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const at::Tensor o4 = x.dim() == 4 ? out : out.unsqueeze(0);
  RopeApplyParams p;
  p.x = x4.data_ptr();
  p.out = o4.data_ptr();
  args::set_strides(x4, p.x_batch_stride, p.x_row_stride, p.x_head_stride);
  args::set_strides(o4, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.positions = pos2.data_ptr<int32_t>();
  p.pos_batch_stride = pos2.stride(0);
  p.batch = to_int(x4.size(0), "batch");
  p.seqlen = to_int(x4.size(1), "sequence length");
  p.num_heads = to_int(x4.size(2), "heads");
  p.head_dim = to_int(x4.size(3), "head dim");
  p.rope = args::rope_params(freqs, rotary_dim, interleaved, attention_factor, x4.size(3), x4.size(0), x, kWho);
  if (out.numel() == 0) return out;
  raise_if(run_rope(p, dtype, current_stream(x)), "apply_rope");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ropekern, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("fwd_kvcache", &fwd_kvcache);
  m.impl("apply_rope", &apply_rope);
}

}  // namespace cuda
}  // namespace ropekern
