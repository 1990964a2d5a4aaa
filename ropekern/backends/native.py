"""The native backends: ``torch.ops.ropekern.*`` (schemas in ``csrc/bindings.cpp``) behind the
backend interface of ``ropekern.ops``.

* ``attention_args`` / ``kvcache_args`` / ``rope_args`` turn a validated call
  (``ropekern._validation``) into the op's positional arguments; every native backend uses them.
* ``NativeBackend(device_type)`` is a backend object over those ops; subclasses override
  ``unavailable`` and ``check_device`` (the CUDA backend: its extension and GPU limits).
* ``cpu_backend`` serves CPU tensors with ``ropekern._C`` (csrc/cpu): fp32/bf16/fp16 inputs,
  fp32 compute. float64 inputs are left to the ``torch`` reference.

The fake (meta) implementations registered here let ``torch.compile`` trace the ops and make
``torch.library.opcheck`` pass; they allocate what the kernels return: ``out`` contiguous with
q's shape and dtype, ``lse`` float32 ``[B, Hq, Sq]`` (varlen ``[Hq, Tq]``).

Gradients: ``fwd`` gets one autograd formula (``ropekern._autograd.register_native_autograd``),
shared by its CPU and CUDA kernels: q, k, v, out and the LSE are saved and the backward recomputes
P from the LSE (FlashAttention-2) with the inverse rotation on dq/dk: the fused Triton kernels for
CUDA tensors, else a PyTorch recompute (fp32 compute for fp16/bf16 inputs, fp64 for fp32). So
``backend="auto"`` keeps the native forward under grad. ``fwd_kvcache`` and ``apply_rope`` have no
formula: their calls that require grad are declined (``ops.grad_reason``, one rule for every
backend) and fall back to ``torch``.
"""

from __future__ import annotations

from typing import Any

import torch

from .ops import grad_reason

__all__ = ["NativeBackend", "attention_args", "kvcache_args", "rope_args", "cpu_backend", "cpu_isa"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # not built: the backend reports why, the package still works
    _LOAD_ERROR = (
        f"the native extension ropekern._C is not built ({exc}); "
        "build it with `python setup.py build_ext --inplace` or `pip install -e .`"
    )


def _rotary(call: Any) -> tuple[torch.Tensor, int]:
    """The split table ``[nT, 4, R/2]`` and the rotary width the kernel should apply (0: no rotation)."""
    _, split = call.tables()
    return split.contiguous(), (call.rope.rotary_dim if getattr(call, "rotate", True) else 0)


def attention_args(call: Any) -> tuple:
    """Positional arguments of ``ropekern::fwd`` for a validated ``AttentionCall``."""
    split, rotary_dim = _rotary(call)
    return (
        call.q,
        call.k,
        call.v,
        call.q_positions,
        call.k_positions,
        split,
        call.cu_seqlens_q,
        call.cu_seqlens_k,
        int(call.max_seqlen_q),
        int(call.max_seqlen_k),
        rotary_dim,
        bool(call.rope.interleaved),
        float(call.rope.attention_factor),
        bool(call.causal),
        float(call.softmax_scale),
    )


def kvcache_args(call: Any, num_splits: int = 0) -> tuple:
    """Positional arguments of ``ropekern::fwd_kvcache`` for a validated ``KVCacheCall``.

    ``num_splits`` is the split-K hint (0: let the kernel choose)."""
    split, rotary_dim = _rotary(call)
    return (
        call.q,
        call.k_cache,
        call.v_cache,
        call.cache_seqlens,
        call.k_new,
        call.v_new,
        call.block_table,
        split,
        rotary_dim,
        bool(call.rope.interleaved),
        float(call.rope.attention_factor),
        bool(call.causal),
        float(call.softmax_scale),
        int(num_splits),
    )


def rope_args(call: Any) -> tuple:
    """Positional arguments of ``ropekern::apply_rope`` for a validated ``RopeCall``."""
    split, rotary_dim = _rotary(call)
    return (call.x, call.positions, split, rotary_dim, bool(call.rope.interleaved), float(call.rope.attention_factor))


class NativeBackend:
    """A backend over ``torch.ops.ropekern`` for tensors of one device type."""

    def __init__(self, device_type: str, name: str | None = None) -> None:
        self.device_type = device_type
        self.name = name or device_type

    def unavailable(self) -> str | None:
        return _LOAD_ERROR

    def check_device(self, tensor: torch.Tensor) -> str | None:
        """None if the kernels take this tensor's device and dtype, else the reason."""
        if tensor.device.type != self.device_type:
            return f"tensors on {tensor.device} (the {self.name} backend runs on {self.device_type} tensors)"
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"{tensor.dtype} inputs (the {self.name} kernels take float32, bfloat16 and float16)"
        return None

    def check_attention(self, call: Any) -> str | None:
        return self.check_device(call.q)

    def attention(self, call: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.ropekern.fwd(*attention_args(call))

    def check_kvcache(self, call: Any) -> str | None:
        return self.check_device(call.q) or grad_reason(self.name, "kv-cache", *call.inputs)

    def kvcache(self, call: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.ropekern.fwd_kvcache(*kvcache_args(call))

    def check_rope(self, call: Any) -> str | None:
        return self.check_device(call.x) or grad_reason(self.name, "rope", call.x)

    def rope(self, call: Any) -> torch.Tensor:
        return torch.ops.ropekern.apply_rope(*rope_args(call))


cpu_backend = NativeBackend("cpu")


def cpu_isa() -> str:
    """The CPU kernel unit in use: ``"avx2"`` (AVX2 + FMA + F16C, chosen by cpuid) or ``"generic"``;
    the environment variable ``ROPEKERN_CPU_ISA=generic`` forces the portable one."""
    if _LOAD_ERROR:
        raise RuntimeError(_LOAD_ERROR)
    return _C.cpu_isa()


def _register_fakes() -> None:
    @torch.library.register_fake("ropekern::fwd")
    def _fwd_fake(q, k, v, q_pos, k_pos, freqs, cu_seqlens_q, cu_seqlens_k, *rest):
        if cu_seqlens_q is not None:
            lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        else:
            lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
        return q.new_empty(q.shape), lse

    @torch.library.register_fake("ropekern::fwd_kvcache")
    def _fwd_kvcache_fake(q, k_cache, v_cache, cache_seqlens, *rest):
        return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("ropekern::apply_rope")
    def _apply_rope_fake(x, positions, freqs, rotary_dim, interleaved, attention_factor):
        return x.new_empty(x.shape)


if _LOAD_ERROR is None:
    _register_fakes()
    # ``ropekern::fwd`` is differentiable on every device it has kernels for (the CPU ones here,
    # the CUDA ones in a CUDA build): the backward recomputes P from the saved out and LSE (the
    # fused Triton kernels for CUDA tensors, the PyTorch FA2-style recompute otherwise).
    from ._autograd import register_native_autograd

    register_native_autograd("ropekern::fwd")
