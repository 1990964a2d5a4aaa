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
// split table [nT, 3, R/2] float32 (ropekern.scaling.split_turns) with nT = 1 or one per sequence.
// Positions, cu_seqlens, cache_seqlens and block_table are int32 (ropekern._validation makes them so).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "launch.h"

namespace ropekern {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    default:
      TORCH_CHECK(false, "ropekern CUDA: unsupported dtype ", t.scalar_type());
  }
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "ropekern CUDA: `", name, "` must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "ropekern CUDA: `", name, "` is on ", t.device(), " but the inputs are on ",
              ref.device());
}

void check_last_dim(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "ropekern CUDA: `", name,
              "` must have a contiguous last dimension, got strides ", t.strides());
}

void check_int32(const at::Tensor& t, const char* name, int64_t dims, const at::Tensor& ref) {
  check_device(t, name, ref);
  TORCH_CHECK(t.scalar_type() == at::kInt, "ropekern CUDA: `", name, "` must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "ropekern CUDA: `", name, "` must have ", dims, " dimensions, got ", t.sizes());
  check_last_dim(t, name);
}

int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v < (int64_t{1} << 31), "ropekern CUDA: ", what, " must be in [0, 2^31), got ", v);
  return static_cast<int>(v);
}

int device_attribute(const at::Tensor& t, cudaDeviceAttr attr) {
  int value = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&value, attr, t.get_device());
  TORCH_CHECK(e == cudaSuccess, "ropekern CUDA: cudaDeviceGetAttribute failed: ", cudaGetErrorString(e));
  return value;
}

void check_arch(const at::Tensor& t) {
  const int major = device_attribute(t, cudaDevAttrComputeCapabilityMajor);
  TORCH_CHECK(major >= 8, "ropekern CUDA kernels need compute capability 8.0+ (mma.sync bf16, cp.async), got ", major,
              ".", device_attribute(t, cudaDevAttrComputeCapabilityMinor));
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

RopeParams rope_params(const at::Tensor& freqs, int64_t rotary_dim, bool interleaved, double attention_factor,
                       int64_t batch, const at::Tensor& ref) {
  RopeParams r;
  r.rotary_dim = static_cast<int>(rotary_dim);
  r.interleaved = interleaved;
  r.attention_factor = static_cast<float>(attention_factor);
  if (rotary_dim == 0) return r;  // rotation off: the table is not read
  check_device(freqs, "freqs", ref);
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 3 && freqs.size(1) == 3 &&
                  freqs.size(2) == rotary_dim / 2,
              "ropekern CUDA: `freqs` must be float32 [nT, 3, rotary_dim / 2], got ", freqs.scalar_type(), " ",
              freqs.sizes());
  TORCH_CHECK(freqs.is_contiguous(), "ropekern CUDA: `freqs` must be contiguous");
  TORCH_CHECK(freqs.size(0) == 1 || freqs.size(0) == batch, "ropekern CUDA: `freqs` must hold 1 or ", batch,
              " tables, got ", freqs.size(0));
  r.freqs = freqs.data_ptr<float>();
  r.freqs_batch_stride = freqs.size(0) > 1 ? 3 * (rotary_dim / 2) : 0;
  return r;
}

void raise_if(const std::string& err, const char* op) { TORCH_CHECK(err.empty(), "ropekern.", op, " (CUDA): ", err); }

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& q_pos, const at::Tensor& k_pos, const at::Tensor& freqs,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, int64_t rotary_dim, bool interleaved,
                                       double attention_factor, bool causal, double softmax_scale) {
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "ropekern CUDA: `cu_seqlens_q` and `cu_seqlens_k` go together");
  const int64_t dims = varlen ? 3 : 4;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_device(t, name, q);
    TORCH_CHECK(t.dim() == dims, "ropekern CUDA: `", name, "` must have ", dims, " dimensions, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "ropekern CUDA: `", name, "` dtype differs from `q`");
    check_last_dim(t, name);
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "ropekern CUDA: `k` and `v` shapes differ");
  check_arch(q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = varlen ? cu_seqlens_q->size(0) - 1 : q.size(0);

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = varlen ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  AttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const int r = varlen ? 0 : 1;  // index of the row (sequence) dimension
  p.q_row_stride = q.stride(r);
  p.q_head_stride = q.stride(r + 1);
  p.k_row_stride = k.stride(r);
  p.k_head_stride = k.stride(r + 1);
  p.v_row_stride = v.stride(r);
  p.v_head_stride = v.stride(r + 1);
  p.o_row_stride = out.stride(r);
  p.o_head_stride = out.stride(r + 1);
  p.batch = to_int(batch, "batch");
  p.num_heads = to_int(q.size(-2), "query heads");
  p.num_heads_k = to_int(k.size(-2), "key/value heads");
  p.head_dim = to_int(q.size(-1), "head dim");
  TORCH_CHECK(k.size(-1) == q.size(-1), "ropekern CUDA: head dims of `q` and `k` differ");
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.rope = rope_params(freqs, rotary_dim, interleaved, attention_factor, batch, q);
  if (varlen) {
    check_int32(*cu_seqlens_q, "cu_seqlens_q", 1, q);
    check_int32(*cu_seqlens_k, "cu_seqlens_k", 1, q);
    TORCH_CHECK(cu_seqlens_k->size(0) == batch + 1, "ropekern CUDA: `cu_seqlens_k` must have ", batch + 1, " entries");
    check_int32(q_pos, "q_pos", 1, q);
    check_int32(k_pos, "k_pos", 1, q);
    TORCH_CHECK(q_pos.size(0) == q.size(0) && k_pos.size(0) == k.size(0), "ropekern CUDA: positions must be [Tq] / [Tk]");
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
    p.seqlen_q = to_int(max_seqlen_q, "max_seqlen_q");
    p.seqlen_k = to_int(max_seqlen_k, "max_seqlen_k");
    p.lse_head_stride = lse.stride(0);
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), "ropekern CUDA: batch sizes of `q` and `k` differ");
    check_int32(q_pos, "q_pos", 2, q);
    check_int32(k_pos, "k_pos", 2, q);
    TORCH_CHECK(q_pos.size(0) == batch && q_pos.size(1) == q.size(1) && k_pos.size(0) == batch &&
                    k_pos.size(1) == k.size(1),
                "ropekern CUDA: positions must be [B, Sq] / [B, Sk]");
    p.q_batch_stride = q.stride(0);
    p.k_batch_stride = k.stride(0);
    p.v_batch_stride = v.stride(0);
    p.o_batch_stride = out.stride(0);
    p.q_pos_batch_stride = q_pos.stride(0);
    p.k_pos_batch_stride = k_pos.stride(0);
    p.seqlen_q = to_int(q.size(1), "Sq");
    p.seqlen_k = to_int(k.size(1), "Sk");
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
  }
  p.q_pos = q_pos.data_ptr<int32_t>();
  p.k_pos = k_pos.data_ptr<int32_t>();
  if (out.numel() == 0) return {out, lse};
  raise_if(run_attention(p, dtype_of(q), current_stream(q)), "fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                               const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                               const std::optional<at::Tensor>& v_new,
                                               const std::optional<at::Tensor>& block_table, const at::Tensor& freqs,
                                               int64_t rotary_dim, bool interleaved, double attention_factor,
                                               bool causal, double softmax_scale, int64_t num_splits) {
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{q, "q"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    check_device(t, name, q);
    TORCH_CHECK(t.dim() == 4, "ropekern CUDA: `", name, "` must have 4 dimensions, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "ropekern CUDA: `", name, "` dtype differs from `q`");
    check_last_dim(t, name);
  }
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "ropekern CUDA: `k_new` and `v_new` go together");
  check_arch(q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0);
  check_int32(cache_seqlens, "cache_seqlens", 1, q);
  TORCH_CHECK(cache_seqlens.size(0) == batch, "ropekern CUDA: `cache_seqlens` must have ", batch, " entries");

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  CacheParams cp;
  DecodeParams& p = cp.p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.kc_batch_stride = k_cache.stride(0);
  p.kc_row_stride = k_cache.stride(1);
  p.kc_head_stride = k_cache.stride(2);
  p.vc_batch_stride = v_cache.stride(0);
  p.vc_row_stride = v_cache.stride(1);
  p.vc_head_stride = v_cache.stride(2);
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.batch = to_int(batch, "batch");
  p.seqlen_q = to_int(q.size(1), "Sq");
  p.num_heads = to_int(q.size(2), "query heads");
  p.num_heads_k = to_int(k_cache.size(2), "key/value heads");
  p.head_dim = to_int(q.size(3), "head dim");
  TORCH_CHECK(k_cache.size(3) == q.size(3) && v_cache.sizes() == k_cache.sizes(),
              "ropekern CUDA: cache shapes must be [*, *, Hkv, D] and equal");
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.rope = rope_params(freqs, rotary_dim, interleaved, attention_factor, batch, q);
  if (k_new.has_value()) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k_new, "k_new"}, {*v_new, "v_new"}}) {
      check_device(t, name, q);
      TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(2) == k_cache.size(2) && t.size(3) == q.size(3),
                  "ropekern CUDA: `", name, "` must be [B, S_new, Hkv, D], got ", t.sizes());
      TORCH_CHECK(t.scalar_type() == q.scalar_type(), "ropekern CUDA: `", name, "` dtype differs from `q`");
      check_last_dim(t, name);
    }
    TORCH_CHECK(v_new->sizes() == k_new->sizes(), "ropekern CUDA: `k_new` and `v_new` shapes differ");
    p.k_new = k_new->data_ptr();
    p.v_new = v_new->data_ptr();
    p.s_new = to_int(k_new->size(1), "S_new");
    p.kn_batch_stride = k_new->stride(0);
    p.kn_row_stride = k_new->stride(1);
    p.kn_head_stride = k_new->stride(2);
    p.vn_batch_stride = v_new->stride(0);
    p.vn_row_stride = v_new->stride(1);
    p.vn_head_stride = v_new->stride(2);
  }
  int64_t capacity = k_cache.size(1);
  if (block_table.has_value()) {
    check_int32(*block_table, "block_table", 2, q);
    TORCH_CHECK(block_table->size(0) == batch, "ropekern CUDA: `block_table` must be [B, max_blocks]");
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_batch_stride = block_table->stride(0);
    p.block_size = to_int(k_cache.size(1), "block size");
    capacity = block_table->size(1) * k_cache.size(1);
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, "ropekern CUDA: dense cache batch differs from `q` batch");
  }
  cp.max_seqlen_k = to_int(capacity, "cache capacity");
  TORCH_CHECK(num_splits >= 0, "ropekern CUDA: `num_splits` must be >= 0 (0 = heuristic), got ", num_splits);
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
  raise_if(run_cache(cp, dtype_of(q), current_stream(q)), "fwd_kvcache");
  return {out, lse};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& freqs, int64_t rotary_dim,
                      bool interleaved, double attention_factor) {
  TORCH_CHECK(x.is_cuda() && (x.dim() == 3 || x.dim() == 4), "ropekern CUDA: `x` must be a 3-d or 4-d CUDA tensor");
  check_last_dim(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  // A packed [T, H, D] input is one batch row of T tokens.
  const at::Tensor x4 = x.dim() == 4 ? x : x.unsqueeze(0);
  const at::Tensor pos2 = positions.dim() == 2 ? positions : positions.unsqueeze(0);
  check_int32(pos2, "positions", 2, x);
  TORCH_CHECK(pos2.size(0) == x4.size(0) && pos2.size(1) == x4.size(1), "ropekern CUDA: `positions` must be [B, S] / [T]");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const at::Tensor o4 = x.dim() == 4 ? out : out.unsqueeze(0);
  RopeApplyParams p;
  p.x = x4.data_ptr();
  p.out = o4.data_ptr();
  p.x_batch_stride = x4.stride(0);
  p.x_row_stride = x4.stride(1);
  p.x_head_stride = x4.stride(2);
  p.o_batch_stride = o4.stride(0);
  p.o_row_stride = o4.stride(1);
  p.o_head_stride = o4.stride(2);
  p.positions = pos2.data_ptr<int32_t>();
  p.pos_batch_stride = pos2.stride(0);
  p.batch = to_int(x4.size(0), "batch");
  p.seqlen = to_int(x4.size(1), "sequence length");
  p.num_heads = to_int(x4.size(2), "heads");
  p.head_dim = to_int(x4.size(3), "head dim");
  p.rope = rope_params(freqs, rotary_dim, interleaved, attention_factor, x4.size(0), x);
  if (out.numel() == 0) return out;
  raise_if(run_rope(p, dtype_of(x), current_stream(x)), "apply_rope");
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
