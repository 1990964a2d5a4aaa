// Torch-side glue shared by the CPU ops (csrc/cpu/ops.cpp) and the CUDA registrations
// (csrc/cuda/bindings_cuda.cpp): argument checks that raise ValueError / TypeError naming the
// argument, the rotary params, and the strides of [B, S, H, D] / [T, H, D] views written into the
// params structs of ropekern/params.h. `who` prefixes every message ("ropekern (cpu)").
//
// ropekern/_validation.py checks user inputs first with readable errors; these checks guard
// direct calls of torch.ops.ropekern.* against memory errors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "ropekern/params.h"
#include "ropekern/rope_math.h"

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
// (ropekern.scaling.split_turns). rotary_dim 0 turns rotation off; the table is then not read.
inline RopeParams rope_params(const at::Tensor& freqs, int64_t rotary_dim, bool interleaved, double attention_factor,
                              int64_t head_dim, int64_t batch, const at::Tensor& ref, const char* who) {
  TORCH_CHECK_VALUE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, who,
                    ": `rotary_dim` must be even and in [0, head_dim=", head_dim, "], got ", rotary_dim);
  RopeParams rope;
  rope.rotary_dim = static_cast<int>(rotary_dim);
  rope.interleaved = interleaved;
  rope.attention_factor = static_cast<float>(attention_factor);
  if (rotary_dim == 0) return rope;
  check_same_device(freqs, "freqs", ref, who);
  TORCH_CHECK_TYPE(freqs.scalar_type() == at::kFloat, who, ": `freqs` must be float32, got ", freqs.scalar_type());
  TORCH_CHECK_VALUE(freqs.dim() == 3 && freqs.size(1) == kSplitRows && freqs.size(2) == rotary_dim / 2 &&
                        (freqs.size(0) == 1 || freqs.size(0) == batch),
                    who, ": `freqs` must have shape [1 or ", batch, ", ", kSplitRows, ", ", rotary_dim / 2, "], got ",
                    freqs.sizes());
  TORCH_CHECK_VALUE(freqs.is_contiguous(), who, ": `freqs` must be contiguous");
  rope.freqs = freqs.data_ptr<float>();
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

// The fields every attention op's params share (AttnParams, DecodeParams): q, out and lse, with
// lse [B, H, S] (dense) or [H, T] (varlen).
template <class P>
void set_q_out_lse(P& p, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
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

}  // namespace args
}  // namespace ropekern
