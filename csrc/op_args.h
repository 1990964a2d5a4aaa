// Torch-side glue shared by the CPU ops (csrc/cpu/ops.cpp) and the CUDA registrations
// (csrc/cuda/bindings_cuda.cpp): the op functions themselves, whose signatures follow the schemas
// of csrc/bindings.cpp, the argument checks that raise ValueError / TypeError naming the argument,
// and the one fill of each op's params struct (ropekern/params.h) from its tensors. A device
// supplies only what it does with the filled params (`Device` below). `who` prefixes every message
// ("ropekern (cpu)").
//
// ropekern/_validation.py checks user inputs first with readable errors; these checks guard
// direct calls of torch.ops.ropekern.* against memory errors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "ropekern/params.h"
#include "ropekern/rope_math.h"
#include "schemas.h"

namespace ropekern {
namespace args {

// A backend's dtype enum (kFloat32, kBFloat16, kFloat16) for a floating input.
template <class DTypeEnum>
DTypeEnum dtype_of(const at::Tensor& t, const char* name, const char* who) {
  switch (t.scalar_type()) {
    case at::kFloat: return DTypeEnum::kFloat32;
    case at::kBFloat16: return DTypeEnum::kBFloat16;
    case at::kHalf: return DTypeEnum::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, who, ": `", name, "` must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DTypeEnum::kFloat32;
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* who) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), who, ": `", name, "` is on ", t.device(), " but `q` is on ",
                    ref.device());
}

// A floating input: on ref's device, `dim` dimensions, dtype `dtype`, contiguous last dimension.
inline void check_float(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype,
                        const at::Tensor& ref, const char* who) {
  check_same_device(t, name, ref, who);
  TORCH_CHECK_VALUE(t.dim() == dim, who, ": `", name, "` must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, who, ": `", name, "` dtype ", t.scalar_type(), " differs from ", dtype);
  TORCH_CHECK_VALUE(t.numel() == 0 || t.stride(-1) == 1, who, ": `", name,
                    "` must have a contiguous last dimension, got strides ", t.strides());
}

// An int32 input of exactly `shape` on ref's device, returned contiguous.
inline at::Tensor int32_arg(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref,
                            const char* who) {
  check_same_device(t, name, ref, who);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, who, ": `", name, "` must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, who, ": `", name, "` must have shape ", shape, ", got ", t.sizes());
  return t.contiguous();
}

// The rotary params from the split table `freqs`, float32 [nT, kSplitRows, R/2] with nT in {1, batch}
// (ropekern.scaling.split_turns), or a caller's cos/sin table [table_positions, 2, R/2]
// (ropekern.RopeTable). rotary_dim 0 turns rotation off; the table is then not read.
inline RopeParams rope_params(ROPEKERN_ROPE_PARAMS,
                              int64_t head_dim, int64_t batch, const at::Tensor& ref, const char* who) {
  TORCH_CHECK_VALUE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, who,
                    ": `rotary_dim` must be even and in [0, head_dim=", head_dim, "], got ", rotary_dim);
  RopeParams rope;
  rope.rotary_dim = static_cast<int>(rotary_dim);
  rope.interleaved = interleaved;
  rope.attention_factor = static_cast<float>(attention_factor);
  TORCH_CHECK_VALUE(table_positions >= 0 && table_positions < (int64_t{1} << 31), who,
                    ": `table_positions` must be in [0, 2^31), got ", table_positions);
  rope.table_positions = static_cast<int>(table_positions);
  if (table_positions) rope.attention_factor = 1.0f;  // a caller's table holds the magnitude
  if (rotary_dim == 0) return rope;
  check_same_device(freqs, "freqs", ref, who);
  TORCH_CHECK_TYPE(freqs.scalar_type() == at::kFloat, who, ": `freqs` must be float32, got ", freqs.scalar_type());
  TORCH_CHECK_VALUE(freqs.is_contiguous(), who, ": `freqs` must be contiguous");
  rope.freqs = freqs.data_ptr<float>();
  if (table_positions) {
    TORCH_CHECK_VALUE(freqs.dim() == 3 && freqs.size(0) == table_positions && freqs.size(1) == 2 &&
                          freqs.size(2) == rotary_dim / 2,
                      who, ": `freqs` (a caller's table) must have shape [", table_positions, ", 2, ", rotary_dim / 2,
                      "], got ", freqs.sizes());
    return rope;
  }
  TORCH_CHECK_VALUE(freqs.dim() == 3 && freqs.size(1) == kSplitRows && freqs.size(2) == rotary_dim / 2 &&
                        (freqs.size(0) == 1 || freqs.size(0) == batch),
                    who, ": `freqs` must have shape [1 or ", batch, ", ", kSplitRows, ", ", rotary_dim / 2, "], got ",
                    freqs.sizes());
  rope.freqs_batch_stride = freqs.size(0) == 1 ? 0 : kSplitRows * (rotary_dim / 2);
  return rope;
}

// The batch, row and head strides of a [B, S, H, D] tensor, or of a varlen [T, H, D] one (batch
// stride 0: its sequences are found through cu_seqlens).
inline void set_strides(const at::Tensor& t, int64_t& batch, int64_t& row, int64_t& head) {
  const int64_t r = t.dim() == 4 ? 1 : 0;
  batch = r ? t.stride(0) : 0;
  row = t.stride(r);
  head = t.stride(r + 1);
}

// A tensor's data pointer and its batch, row and head strides (set_strides) into a params struct.
template <class Ptr>
void set_view(const at::Tensor& t, Ptr& ptr, int64_t& batch, int64_t& row, int64_t& head) {
  ptr = static_cast<Ptr>(t.data_ptr());
  set_strides(t, batch, row, head);
}

// The fields every attention op's params share (AttnParams, DecodeParams): q, out and lse, with
// lse [B, H, S] (dense) or [H, T] (varlen).
template <class P>
void set_q_out_lse(P& p, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  set_view(q, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_view(out, p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.dim() == 3 ? lse.stride(0) : 0;
  p.lse_head_stride = lse.stride(lse.dim() - 2);
}

// A size as the int the params structs hold; the kernels' int64 offsets cover the products.
inline int to_int(int64_t v, const char* what, const char* who) {
  TORCH_CHECK_VALUE(v >= 0 && v < (int64_t{1} << 31), who, ": ", what, " must be in [0, 2^31), got ", v);
  return static_cast<int>(v);
}

// The sizes and scalars every attention op's params share (AttnParams, DecodeParams).
template <class P>
void set_shape(P& p, int64_t batch, int64_t seqlen_q, int64_t num_heads, int64_t num_heads_k, int64_t head_dim,
               double softmax_scale, bool causal, const RopeParams& rope, const char* who) {
  p.batch = to_int(batch, "batch", who);
  p.seqlen_q = to_int(seqlen_q, "seqlen_q", who);
  p.num_heads = to_int(num_heads, "query heads", who);
  p.num_heads_k = to_int(num_heads_k, "key/value heads", who);
  p.head_dim = to_int(head_dim, "head dim", who);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.rope = rope;
}

// The sliding window (AttnParams::window_left / right; -1 unbounded), refused by a device whose
// kernels have none (Device::kWindows false).
template <class Device, class P>
void set_window(P& p, int64_t left, int64_t right) {
  const char* who = Device::kWho;
  TORCH_CHECK_VALUE(left >= -1 && right >= -1 && left < (int64_t{1} << 31) && right < (int64_t{1} << 31), who,
                    ": `window_left`/`window_right` must be in [-1, 2^31), got ", left, ", ", right);
  TORCH_CHECK_VALUE(Device::kWindows || (left < 0 && right < 0), who, ": sliding windows are not in these kernels");
  p.window_left = static_cast<int>(left);
  p.window_right = static_cast<int>(right);
}

// ---------------------------------------------------------------------------------- the ops
// ropekern::fwd: inputs checked, outputs allocated, AttnParams filled. The int32 tensors are the
// contiguous views the params point into, alive until the launch.
struct AttnCall {
  AttnParams p;
  at::Tensor q, k, v, out, lse, q_pos, k_pos, cu_q, cu_k;
  bool varlen = false;
};

// ropekern::fwd_kvcache: DecodeParams filled (num_splits left to the device); `capacity` is the
// cache length per sequence (dense: Smax; paged: max_blocks * block_size).
struct CacheCall {
  DecodeParams p;
  at::Tensor q, k_cache, v_cache, lens, block_table, out, lse;
  std::optional<at::Tensor> k_new, v_new;
  int64_t capacity = 0;
  bool paged = false;
};

// ropekern::apply_rope: x as [B, S, H, D] (a packed [T, H, D] input as B = 1), its positions
// [B, S] contiguous int32, and the output (`out` in x's shape, `out4` its [B, S, H, D] view).
struct RopeCall {
  at::Tensor x4, pos, out, out4;
  RopeParams rope;
};

// What a native backend provides (csrc/cpu/ops.cpp, csrc/cuda/bindings_cuda.cpp):
//   static constexpr const char* kWho;
//   static constexpr bool kWindows;                     its kernels take a sliding window
//   using DType = ...;                                  its dtype enum (kFloat32, kBFloat16, kFloat16)
//   static void check_device(const at::Tensor& first, const char* name);  the first tensor is on its device
//   static void attention(AttnCall&, DType);            runs the kernels on the filled params
//   static void backward(BwdCall&, DType);              (CPU only: ROPEKERN_REGISTER_BWD)
//   static void kvcache(CacheCall&, DType, int64_t num_splits);
//   static void rope(RopeCall&, DType);
template <class Device>
typename Device::DType first_input(const at::Tensor& t, const char* name) {
  Device::check_device(t, name);
  return dtype_of<typename Device::DType>(t, name, Device::kWho);
}

// The forward's inputs checked and AttnParams filled but for out and lse (ropekern::fwd, ropekern::bwd).
template <class Device>
typename Device::DType attention_inputs(AttnCall& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& q_pos, const at::Tensor& k_pos,
                                        const std::optional<at::Tensor>& cu_seqlens_q,
                                        const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                        int64_t max_seqlen_k, ROPEKERN_ROPE_PARAMS, bool causal, double softmax_scale,
                                        int64_t window_left, int64_t window_right) {
  const char* who = Device::kWho;
  const auto dtype = first_input<Device>(q, "q");
  c.varlen = cu_seqlens_q.has_value();
  TORCH_CHECK_VALUE(c.varlen == cu_seqlens_k.has_value(), who, ": `cu_seqlens_q` and `cu_seqlens_k` go together");
  const int64_t dims = c.varlen ? 3 : 4;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}})
    check_float(t, name, dims, q.scalar_type(), q, who);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), who, ": `k` shape ", k.sizes(), " differs from `v` ", v.sizes());
  const int64_t D = q.size(-1), Hq = q.size(-2), Hkv = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == D, who, ": head dim of `k` (", k.size(-1), ") differs from `q` (", D, ")");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, who, ": query heads (", Hq, ") must be a multiple of key/value heads (",
                    Hkv, ")");
  TORCH_CHECK_VALUE(softmax_scale == softmax_scale, who, ": `softmax_scale` is NaN");
  int64_t B;
  if (c.varlen) {
    B = cu_seqlens_q->numel() - 1;
    TORCH_CHECK_VALUE(B >= 0, who, ": `cu_seqlens_q` must have shape [batch + 1]");
    c.cu_q = int32_arg(*cu_seqlens_q, "cu_seqlens_q", {B + 1}, q, who);
    c.cu_k = int32_arg(*cu_seqlens_k, "cu_seqlens_k", {B + 1}, q, who);
    c.q_pos = int32_arg(q_pos, "q_pos", {q.size(0)}, q, who);
    c.k_pos = int32_arg(k_pos, "k_pos", {k.size(0)}, q, who);
  } else {
    B = q.size(0);
    TORCH_CHECK_VALUE(k.size(0) == B, who, ": batch of `k` (", k.size(0), ") differs from `q` (", B, ")");
    c.q_pos = int32_arg(q_pos, "q_pos", {B, q.size(1)}, q, who);
    c.k_pos = int32_arg(k_pos, "k_pos", {B, k.size(1)}, q, who);
  }
  const RopeParams rope = rope_params(ROPEKERN_ROPE_ARGS, D, B, q, who);
  c.q = q;
  c.k = k;
  c.v = v;
  AttnParams& p = c.p;
  set_view(q, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_view(k, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_view(v, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  p.q_pos = c.q_pos.data_ptr<int32_t>();
  p.k_pos = c.k_pos.data_ptr<int32_t>();
  if (c.varlen) {
    p.cu_seqlens_q = c.cu_q.data_ptr<int32_t>();
    p.cu_seqlens_k = c.cu_k.data_ptr<int32_t>();
  } else {
    p.q_pos_batch_stride = c.q_pos.stride(0);
    p.k_pos_batch_stride = c.k_pos.stride(0);
  }
  set_shape(p, B, c.varlen ? max_seqlen_q : q.size(1), Hq, Hkv, D, softmax_scale, causal, rope, who);
  set_window<Device>(p, window_left, window_right);
  p.seqlen_k = to_int(c.varlen ? max_seqlen_k : k.size(1), "seqlen_k", who);
  return dtype;
}

#define ROPEKERN_ATTENTION_PARAMS                                                                              \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &q_pos, const at::Tensor &k_pos, \
      const std::optional<at::Tensor>&cu_seqlens_q, const std::optional<at::Tensor>&cu_seqlens_k,                 \
      int64_t max_seqlen_q, int64_t max_seqlen_k, ROPEKERN_ROPE_PARAMS, bool causal, double softmax_scale,       \
      int64_t window_left, int64_t window_right
#define ROPEKERN_ATTENTION_ARGS                                                                                  \
  q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ROPEKERN_ROPE_ARGS, causal, \
      softmax_scale, window_left, window_right

template <class Device>
std::tuple<at::Tensor, at::Tensor> fwd(ROPEKERN_ATTENTION_PARAMS) {
  AttnCall c;
  const auto dtype = attention_inputs<Device>(c, ROPEKERN_ATTENTION_ARGS);
  const int64_t Hq = q.size(-2);
  c.out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  c.lse = c.varlen ? at::empty({Hq, q.size(0)}, q.options().dtype(at::kFloat))
                   : at::empty({c.p.batch, Hq, q.size(1)}, q.options().dtype(at::kFloat));
  set_q_out_lse(c.p, q, c.out, c.lse);
  Device::attention(c, dtype);
  return {c.out, c.lse};
}

// ropekern::bwd: the forward's call and its saved out / lse with the output gradients; dq, dk, dv
// allocated contiguous (q, k, v shapes and dtype). lse and dlse are made contiguous.
struct BwdCall {
  AttnCall a;
  at::Tensor dout, lse, dlse, dq, dk, dv;
};

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& out,
                                                   const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                                                   ROPEKERN_ATTENTION_PARAMS) {
  const char* who = Device::kWho;
  BwdCall c;
  const auto dtype = attention_inputs<Device>(c.a, ROPEKERN_ATTENTION_ARGS);
  // The output gradient of a sum or a mean comes expanded (all strides 0): the kernels read rows.
  const at::Tensor d_out = dout.numel() && dout.stride(-1) != 1 ? dout.contiguous() : dout;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{d_out, "dout"}, {out, "out"}}) {
    check_float(t, name, q.dim(), q.scalar_type(), q, who);
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), who, ": `", name, "` shape ", t.sizes(), " differs from `q` ", q.sizes());
  }
  const int64_t Hq = q.size(-2);
  const std::vector<int64_t> lse_shape =
      c.a.varlen ? std::vector<int64_t>{Hq, q.size(0)} : std::vector<int64_t>{c.a.p.batch, Hq, q.size(1)};
  const auto stats = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, name, q, who);
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, who, ": `", name, "` must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(lse_shape), who, ": `", name, "` must have shape ",
                      at::IntArrayRef(lse_shape), ", got ", t.sizes());
    return t.contiguous();
  };
  c.lse = stats(lse, "lse");
  if (dlse) c.dlse = stats(*dlse, "dlse");
  c.dout = d_out;
  c.a.out = out;
  set_q_out_lse(c.a.p, q, out, c.lse);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  c.dq = at::empty(q.sizes(), opts);
  c.dk = at::empty(k.sizes(), opts);
  c.dv = at::empty(v.sizes(), opts);
  Device::backward(c, dtype);
  return {c.dq, c.dk, c.dv};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor> fwd_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                               const std::optional<at::Tensor>& k_new,
                                               const std::optional<at::Tensor>& v_new,
                                               const std::optional<at::Tensor>& block_table, ROPEKERN_ROPE_PARAMS,
                                               bool causal, double softmax_scale, int64_t window_left,
                                               int64_t window_right, int64_t num_splits) {
  const char* who = Device::kWho;
  const auto dtype = first_input<Device>(q, "q");
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{q, "q"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}})
    check_float(t, name, 4, q.scalar_type(), q, who);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), who, ": `k_cache` shape ", k_cache.sizes(),
                    " differs from `v_cache` ", v_cache.sizes());
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, who, ": head dim of `k_cache` differs from `q`");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, who, ": query heads (", Hq, ") must be a multiple of key/value heads (",
                    Hkv, ")");
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), who, ": `k_new` and `v_new` go together");
  TORCH_CHECK_VALUE(num_splits >= 0, who, ": `num_splits` must be >= 0 (0 = heuristic), got ", num_splits);
  CacheCall c;
  DecodeParams& p = c.p;
  if (k_new) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k_new, "k_new"}, {*v_new, "v_new"}}) {
      check_float(t, name, 4, q.scalar_type(), q, who);
      TORCH_CHECK_VALUE(t.size(0) == B && t.size(2) == Hkv && t.size(3) == D, who, ": `", name,
                        "` must have shape [", B, ", S_new, ", Hkv, ", ", D, "], got ", t.sizes());
    }
    TORCH_CHECK_VALUE(v_new->sizes() == k_new->sizes(), who, ": `k_new` and `v_new` shapes differ");
    c.k_new = k_new;
    c.v_new = v_new;
    p.s_new = to_int(k_new->size(1), "S_new", who);
    set_view(*k_new, p.k_new, p.kn_batch_stride, p.kn_row_stride, p.kn_head_stride);
    set_view(*v_new, p.v_new, p.vn_batch_stride, p.vn_row_stride, p.vn_head_stride);
  }
  c.lens = int32_arg(cache_seqlens, "cache_seqlens", {B}, q, who);
  c.paged = block_table.has_value();
  c.capacity = k_cache.size(1);
  if (c.paged) {
    check_same_device(*block_table, "block_table", q, who);
    TORCH_CHECK_TYPE(block_table->scalar_type() == at::kInt, who, ": `block_table` must be int32, got ",
                     block_table->scalar_type());
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == B, who, ": `block_table` must have shape [",
                      B, ", max_blocks], got ", block_table->sizes());
    c.block_table = block_table->contiguous();
    c.capacity = c.block_table.size(1) * k_cache.size(1);
    p.block_table = c.block_table.data_ptr<int32_t>();
    p.block_table_batch_stride = c.block_table.size(1);
    p.block_size = to_int(k_cache.size(1), "block size", who);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, who, ": dense `k_cache` batch (", k_cache.size(0),
                      ") differs from `q` batch (", B, ")");
  }
  c.q = q;
  c.k_cache = k_cache;
  c.v_cache = v_cache;
  c.out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  c.lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  set_q_out_lse(p, q, c.out, c.lse);
  set_view(k_cache, p.k_cache, p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
  set_view(v_cache, p.v_cache, p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
  p.cache_seqlens = c.lens.data_ptr<int32_t>();
  const RopeParams rope = rope_params(ROPEKERN_ROPE_ARGS, D, B, q, who);
  set_shape(p, B, Sq, Hq, Hkv, D, softmax_scale, causal, rope, who);
  set_window<Device>(p, window_left, window_right);
  Device::kvcache(c, dtype, num_splits);
  return {c.out, c.lse};
}

// x rotated into `out` (x's shape; x itself for the in-place op: the kernels read a head's row
// before writing it).
template <class Device>
void rope_into(const at::Tensor& x, const at::Tensor& positions, ROPEKERN_ROPE_PARAMS, const at::Tensor& out) {
  const char* who = Device::kWho;
  const auto dtype = first_input<Device>(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, who, ": `x` must be [B, S, H, D] or [T, H, D], got ", x.sizes());
  check_float(x, "x", x.dim(), x.scalar_type(), x, who);
  RopeCall c;
  c.x4 = x.dim() == 4 ? x : x.unsqueeze(0);
  const int64_t B = c.x4.size(0), S = c.x4.size(1);
  c.pos = x.dim() == 4 ? int32_arg(positions, "positions", {B, S}, x, who)
                       : int32_arg(positions, "positions", {S}, x, who).unsqueeze(0);
  c.rope = rope_params(ROPEKERN_ROPE_ARGS, x.size(-1), B, x, who);
  c.out = out;
  c.out4 = x.dim() == 4 ? c.out : c.out.unsqueeze(0);
  if (x.numel() > 0) Device::rope(c, dtype);
}

template <class Device>
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, ROPEKERN_ROPE_PARAMS) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  rope_into<Device>(x, positions, ROPEKERN_ROPE_ARGS, out);
  return out;
}

template <class Device>
void apply_rope_inplace(const at::Tensor& x, const at::Tensor& positions, ROPEKERN_ROPE_PARAMS) {
  rope_into<Device>(x, positions, ROPEKERN_ROPE_ARGS, x);
}

}  // namespace args
}  // namespace ropekern

// Registers the three op templates for one dispatch key (CPU, CUDA) with their device part.
#define ROPEKERN_REGISTER_OPS(KEY, Device)                                     \
  TORCH_LIBRARY_IMPL(ropekern, KEY, m) {                                       \
    m.impl("fwd", &::ropekern::args::fwd<Device>);                             \
    m.impl("fwd_kvcache", &::ropekern::args::fwd_kvcache<Device>);             \
    m.impl("apply_rope", &::ropekern::args::apply_rope<Device>);               \
    m.impl("apply_rope_", &::ropekern::args::apply_rope_inplace<Device>);      \
  }
#define ROPEKERN_REGISTER_BWD(KEY, Device) \
  TORCH_LIBRARY_IMPL(ropekern, KEY, m) { m.impl("bwd", &::ropekern::args::bwd<Device>); }
