"""The ``torch`` backend: the pure-PyTorch reference (``ropekern.reference``), any device and dtype.

Its forward ops are differentiable through autograd; its ``backward`` is the FlashAttention-2
recompute in PyTorch (``ropekern._autograd``), the one every fused forward without a backward
kernel of its own falls back to.
"""

from __future__ import annotations

import torch

from .. import _autograd, reference
from .._validation import AttentionCall, KVCacheCall, RopeCall
from . import BackwardCall

__all__ = ["TorchBackend", "backend"]


class TorchBackend:
    """The reference; serves every call."""

    name = "torch"

    def check_attention(self, call: AttentionCall) -> str | None:
        return None

    def attention(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.attention(call)

    def check_kvcache(self, call: KVCacheCall) -> str | None:
        return None

    def kvcache(self, call: KVCacheCall) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.kvcache(call)

    def check_rope(self, call: RopeCall) -> str | None:
        return None

    def rope(self, call: RopeCall) -> torch.Tensor:
        return reference.rotate_call(call)

    def check_backward(self, call: BackwardCall) -> str | None:
        return None

    def backward(self, call: BackwardCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if call.delta is not None:
            return _autograd.dense_backward(
                call.q, call.k, call.v, call.dout, call.lse, call.delta, call.q_positions, call.k_positions,
                call.rope, call.causal, call.softmax_scale, False, (call.window_left, call.window_right),
            )  # fmt: skip
        return _autograd.recompute_backward(*call.op_args())


backend = TorchBackend()
