"""The ``cuda`` backend: the hand-written CUDA kernels of ``csrc/cuda`` behind ``torch.ops.ropekern``.

The kernels are registered for the CUDA dispatch key of the ops that ``csrc/bindings.cpp``
defines (``fwd``, ``fwd_kvcache``, ``apply_rope``); they exist when ``ropekern._C`` was built as a
CUDA extension (``setup.py``: nvcc and a CUDA build of torch, or ``ROPEKERN_BUILD_CUDA=1``).
This module states, per call, what the kernels cannot serve so that ``backend="auto"`` falls back
to Triton; the ops and their arguments are ``backends.native``'s.

Gradients: ``ropekern::fwd`` is made differentiable once for every device when ``backends.native``
loads the extension (``ropekern._autograd``): the fused Triton backward for CUDA tensors, from the saved
out and LSE.

What the kernels serve: CUDA tensors on compute capability 8.0+, float16 / bfloat16 (``apply_rope``
also float32), head dims 64 / 128 / 256, q / k / v / caches 16-byte aligned with batch, row and
head strides that are multiples of 8 elements (cp.async moves 16-byte chunks).
"""

from __future__ import annotations

import torch

from .._validation import AttentionCall, KVCacheCall, RopeCall
from . import grad_reason
from .native import NativeBackend

__all__ = ["backend", "CudaBackend", "HEAD_DIMS"]

HEAD_DIMS = (64, 128, 256)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
ROPE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA grid limits: query heads and sequences index grid.y / grid.z (prefill), batch * kv heads
# indexes grid.z (cache kernel).
_GRID_YZ = 65535


def _has_cuda_kernels() -> bool:
    """True when a CUDA implementation of ``ropekern::fwd`` is registered."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("ropekern::fwd", "CUDA"))
    except RuntimeError:  # the op itself is not registered
        return False


def _aligned_reason(name: str, t: torch.Tensor) -> str | None:
    """cp.async moves 16-byte chunks: base address 16-byte aligned, leading strides multiples of 8."""
    if t.numel() == 0:
        return None
    if t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]):
        return (
            f"`{name}` is not 16-byte aligned with strides that are multiples of 8 elements "
            f"(strides {t.stride()}, storage offset {t.storage_offset()}); pass it as .contiguous()"
        )
    return None


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type != "cuda":
        return f"tensors on {t.device} (the cuda backend runs on CUDA tensors)"
    major, minor = torch.cuda.get_device_capability(t.device)
    if major < 8:
        return f"compute capability {major}.{minor}; the CUDA kernels need 8.0+ (mma.sync bf16, cp.async)"
    return None


def attention_reason(q: torch.Tensor, head_dim: int, named: dict[str, torch.Tensor]) -> str | None:
    """Why the attention kernels cannot take these tensors (device not checked), or None."""
    if q.dtype not in ATTENTION_DTYPES:
        return f"dtype {q.dtype}; the CUDA attention kernels take float16 or bfloat16"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} has no CUDA kernel (compiled: {', '.join(map(str, HEAD_DIMS))})"
    for name, t in named.items():
        why = _aligned_reason(name, t)
        if why:
            return why
    return None


class CudaBackend(NativeBackend):
    """The native ops on CUDA tensors (see the module docstring for what the kernels serve)."""

    def __init__(self) -> None:
        super().__init__("cuda")

    def unavailable(self) -> str | None:
        try:
            import ropekern._C  # noqa: F401  (registers the ops and, in a CUDA build, their kernels)
        except ImportError as exc:
            return f"the native extension ropekern._C is not built ({exc})"
        if not _has_cuda_kernels():
            return (
                "ropekern._C was built without CUDA kernels (build with nvcc and a CUDA build of torch, "
                "or ROPEKERN_BUILD_CUDA=1)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def check_attention(self, call: AttentionCall) -> str | None:
        if call.windowed:
            return "sliding windows are not in the CUDA kernels"
        why = _device_reason(call.q)
        if why:
            return why
        hq = call.q.shape[-2]
        if hq > _GRID_YZ or call.batch > _GRID_YZ:
            return f"{hq} query heads / {call.batch} sequences exceed the CUDA grid limit of {_GRID_YZ}"
        return attention_reason(call.q, call.q.shape[-1], {"q": call.q, "k": call.k, "v": call.v})

    def check_kvcache(self, call: KVCacheCall) -> str | None:
        why = _device_reason(call.q)
        if why:
            return why
        if call.fewer_keys:
            return "a sequence holds fewer keys than there are queries (n < Sq): not in the CUDA kernels"
        if call.windowed:
            return "sliding windows are not in the CUDA kernels"
        if call.q.shape[0] * call.k_cache.shape[2] > _GRID_YZ:
            return f"batch * kv heads exceeds the CUDA grid limit of {_GRID_YZ}"
        named = {"q": call.q, "k_cache": call.k_cache, "v_cache": call.v_cache}
        return attention_reason(call.q, call.q.shape[-1], named) or grad_reason("cuda", "kv-cache", *call.inputs)

    def check_rope(self, call: RopeCall) -> str | None:
        why = _device_reason(call.x)
        if why:
            return why
        if call.x.dtype not in ROPE_DTYPES:
            return f"dtype {call.x.dtype}; apply_rope on CUDA takes float16, bfloat16 or float32"
        return grad_reason("cuda", "rope", call.x)


backend = CudaBackend()
