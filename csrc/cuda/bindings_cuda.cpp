// Torch-facing launcher of the CUDA kernels: CUDA implementations of the ropekern ops whose
// schemas csrc/bindings.cpp defines with TORCH_LIBRARY(ropekern, m) (fwd, fwd_kvcache, apply_rope).
//
// op_args.h checks the arguments, allocates the outputs and fills the POD params of
// ropekern/params.h; this file adds the CUDA-only parts (cuda_params.h: the split-K workspace, the
// apply_rope params) and calls the torch-free host API (launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

#include "../op_args.h"
#include "launch.h"

namespace ropekern {
namespace cuda {
namespace {

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

// What the GPU does with the filled params of each op (the ops themselves: op_args.h).
struct CudaDevice {
  static constexpr const char* kWho = "ropekern (cuda)";
  static constexpr bool kWindows = false;  // sliding windows: not in the CUDA kernels (the backend refuses them)
  using DType = cuda::DType;

  static void check_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.is_cuda(), kWho, ": `", name, "` must be a CUDA tensor, got ", t.device());
    check_arch(t);
  }

  static void attention(args::AttnCall& c, DType dtype) {
    const c10::cuda::CUDAGuard guard(c.q.device());
    if (c.out.numel() == 0) return;
    raise_if(run_attention(c.p, dtype, current_stream(c.q)), "fwd");
  }

  static void kvcache(args::CacheCall& c, DType dtype, int64_t num_splits) {
    const c10::cuda::CUDAGuard guard(c.q.device());
    CacheParams cp;
    cp.p = c.p;
    DecodeParams& p = cp.p;
    cp.max_seqlen_k = args::to_int(c.capacity, "cache capacity", kWho);
    const int sms = device_attribute(c.q, cudaDevAttrMultiProcessorCount);
    p.num_splits = plan_num_splits(p.batch, p.num_heads, p.num_heads_k, p.seqlen_q, cp.max_seqlen_k, sms,
                                   static_cast<int>(num_splits < 128 ? num_splits : 128));
    at::Tensor out_accum, lse_accum;
    if (p.num_splits > 1) {
      const at::Tensor& q = c.q;
      const auto f32 = q.options().dtype(at::kFloat);
      out_accum = at::empty({p.num_splits, q.size(0), q.size(2), q.size(1), q.size(3)}, f32);
      lse_accum = at::empty({p.num_splits, q.size(0), q.size(2), q.size(1)}, f32);
      cp.out_accum = out_accum.data_ptr<float>();
      cp.lse_accum = lse_accum.data_ptr<float>();
    }
    raise_if(run_cache(cp, dtype, current_stream(c.q)), "fwd_kvcache");
  }

  static void rope(args::RopeCall& c, DType dtype) {
    const c10::cuda::CUDAGuard guard(c.x4.device());
    RopeApplyParams p;
    args::set_view(c.x4, p.x, p.x_batch_stride, p.x_row_stride, p.x_head_stride);
    args::set_view(c.out4, p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
    p.positions = c.pos.data_ptr<int32_t>();
    p.pos_batch_stride = c.pos.stride(0);
    p.batch = args::to_int(c.x4.size(0), "batch", kWho);
    p.seqlen = args::to_int(c.x4.size(1), "sequence length", kWho);
    p.num_heads = args::to_int(c.x4.size(2), "heads", kWho);
    p.head_dim = args::to_int(c.x4.size(3), "head dim", kWho);
    p.rope = c.rope;
    raise_if(run_rope(p, dtype, current_stream(c.x4)), "apply_rope");
  }
};

}  // namespace

ROPEKERN_REGISTER_OPS(CUDA, CudaDevice)

}  // namespace cuda
}  // namespace ropekern
