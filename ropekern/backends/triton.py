"""The ``triton`` backend: the Triton kernels of ``ropekern._triton`` behind the backend protocol.

The kernels are registered as ``torch.library`` ops (namespace ``ropekern_triton``, clear of the C++
``ropekern`` schemas) with the argument order of every backend (``ropekern._validation``'s
``*_SCHEMA``), so ``torch.compile(fullgraph=True)`` traces each as one opaque node and
``torch.library.opcheck`` passes:

* ``attention_fwd`` (prefill / varlen, sliding windows included), differentiable through the one
  attention autograd formula (``ropekern._autograd``), whose backward here is the fused
  ``attention_bwd``;
* ``kvcache``, which appends into the caches in place (declared in its schema) and attends;
* ``apply_rope``.

``torch.library.define`` + ``impl`` rather than ``triton_op``: the ops stay opaque to Inductor, so
the same graph runs on CUDA tensors and on CPU tensors under ``TRITON_INTERPRET=1`` (CI), and the
autotuner keeps its own config cache.
"""

from __future__ import annotations

import torch

from .. import _triton
from .._autograd import fake_grads, register_attention_autograd
from .._triton import attention as _attention
from .._triton import backward as _backward
from .._triton import decode as _decode
from .._triton import rope as _rope
from .._triton.host import INTERPRET
from .._validation import (
    APPLY_ROPE_INPLACE_SCHEMA,
    APPLY_ROPE_SCHEMA,
    ATTENTION_SCHEMA,
    BACKWARD_SCHEMA,
    KVCACHE_SCHEMA,
    AttentionCall,
    KVCacheCall,
    RopeCall,
)
from . import BackwardCall, define_op, fake_attention, fake_kvcache, fake_rope, grad_reason

__all__ = ["TritonBackend", "backend"]


define_op(
    "ropekern_triton::attention_fwd", ATTENTION_SCHEMA, "(Tensor out, Tensor lse)", _attention.forward, fake_attention
)
define_op("ropekern_triton::attention_bwd", BACKWARD_SCHEMA, "(Tensor, Tensor, Tensor)", _backward.run, fake_grads)
define_op("ropekern_triton::kvcache", KVCACHE_SCHEMA, "(Tensor out, Tensor lse)", _decode.run, fake_kvcache)
define_op("ropekern_triton::apply_rope", APPLY_ROPE_SCHEMA, "Tensor", _rope.forward, fake_rope)
define_op("ropekern_triton::apply_rope_", APPLY_ROPE_INPLACE_SCHEMA, "()", _rope.in_place, lambda *args: None)
register_attention_autograd("ropekern_triton::attention_fwd", prefer="triton")


def _device_reason(tensor: torch.Tensor) -> str | None:
    if tensor.device.type == "cuda":
        return None
    if tensor.device.type == "cpu" and INTERPRET:
        return None
    return f"tensors on {tensor.device} (triton runs on CUDA, or on CPU under TRITON_INTERPRET=1)"


class TritonBackend:
    """Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only; the
    variable must be set before triton is imported)."""

    name = "triton"

    def unavailable(self) -> str | None:
        if not (INTERPRET or torch.cuda.is_available()):
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
        return _triton.version_reason()

    def check_attention(self, call: AttentionCall) -> str | None:
        return _device_reason(call.q) or _attention.limits(call.q, call.k, call.batch)

    def attention(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.ropekern_triton.attention_fwd(*call.op_args())

    def check_kvcache(self, call: KVCacheCall) -> str | None:
        why = _device_reason(call.q) or _decode.limits(call.q, call.k_cache, call.block_table)
        return why or grad_reason(self.name, "kv-cache", *call.inputs)

    def kvcache(self, call: KVCacheCall, num_splits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_splits``: split-K partitions of the cache; 0 lets the launcher choose."""
        return torch.ops.ropekern_triton.kvcache(*call.op_args(num_splits))

    def check_rope(self, call: RopeCall) -> str | None:
        return _device_reason(call.x) or _rope.limits(call.x)

    def rope(self, call: RopeCall) -> torch.Tensor:
        return torch.ops.ropekern_triton.apply_rope(*call.op_args())

    def rope_(self, call: RopeCall) -> None:
        """``call.x`` rotated in place (an op that declares the mutation)."""
        torch.ops.ropekern_triton.apply_rope_(*call.op_args())

    def check_backward(self, call: BackwardCall) -> str | None:
        return _device_reason(call.q) or _backward.limits(call.q, call.k, call.batch)

    def backward(self, call: BackwardCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if call.delta is None:
            return torch.ops.ropekern_triton.attention_bwd(*call.op_args())
        # A block of a longer sequence: the global LSE and delta are given; float32 gradients.
        return _backward.backward(
            call.dout, call.lse.to(torch.float32), call.delta.to(torch.float32), call.q, call.k, call.v,
            call.q_positions.to(torch.int32), call.k_positions.to(torch.int32), call.cu_seqlens_q, call.cu_seqlens_k,
            call.max_seqlen_q, call.max_seqlen_k, call.rope, call.causal, call.softmax_scale, call.window_left,
            call.window_right, grad_dtype=torch.float32,
        )  # fmt: skip


backend = TritonBackend()
