"""torch.library registration of the Triton kernels, so ``torch.compile(fullgraph=True)`` traces
``rk.rope_attention(..., backend="triton")`` / ``rk.apply_rope(..., backend="triton")`` as single
opaque ops and ``torch.library.opcheck`` passes.

``attention_fwd`` is differentiable: ``register_autograd`` saves q, k, v, out and the LSE and runs
``attention_bwd`` (the fused backward, ``ropekern._triton.backward``), itself an op with a fake so
that AOTAutograd traces the backward graph of a compiled training step.

``custom_op`` + ``register_fake`` rather than ``triton_op``: the op stays opaque to Inductor, so
the same graph runs on CUDA and on CPU tensors under ``TRITON_INTERPRET=1`` (CI), and the
autotuner keeps its own config cache. The namespace ``ropekern_triton`` keeps clear of the C++
``TORCH_LIBRARY(ropekern, ...)`` schemas.
"""

from __future__ import annotations

import torch

from . import attention as _attention
from . import backward as _backward
from . import rope as _rope

__all__ = ["attention_fwd", "attention_bwd", "apply_rope"]


@torch.library.custom_op("ropekern_triton::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    split: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    attention_factor: float,
    rotary_dim: int,
    interleaved: bool,
    causal: bool,
    rotate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RoPE attention forward; arguments as ``ropekern._triton.attention.forward``."""
    return _attention.forward(
        q, k, v, q_positions, k_positions, split, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, attention_factor, rotary_dim, interleaved, causal, rotate,
    )  # fmt: skip


@attention_fwd.register_fake
def _attention_fwd_fake(
    q, k, v, q_positions, k_positions, split, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    softmax_scale, attention_factor, rotary_dim, interleaved, causal, rotate,
):  # fmt: skip
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return out, torch.empty(lse_shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("ropekern_triton::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    split: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    attention_factor: float,
    rotary_dim: int,
    interleaved: bool,
    causal: bool,
    rotate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the un-rotated inputs (contiguous, input dtype) from the forward's
    ``out`` and ``lse``, the output gradient ``dout`` and optionally the LSE gradient ``dlse``."""
    delta = _backward.preprocess(out, dout, lse, dlse, cu_seqlens_q is not None)
    return _backward.backward(
        dout, q, k, v, lse, delta, q_positions, k_positions, split, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, softmax_scale, attention_factor, rotary_dim, interleaved, causal, rotate,
    )  # fmt: skip


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, *rest):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_positions, k_positions, split, cu_seqlens_q, cu_seqlens_k = inputs[:8]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_positions, k_positions, split, cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = inputs[8:]  # max_seqlen_q/k, softmax_scale, factor, rotary_dim, interleaved, causal, rotate


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, q_positions, k_positions, split, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(
        dout, q, k, v, out, lse, dlse, q_positions, k_positions, split, cu_seqlens_q, cu_seqlens_k, *ctx.scalars
    )
    return (dq, dk, dv) + (None,) * 13


attention_fwd.register_autograd(_attention_backward, setup_context=_setup_context)


@torch.library.custom_op("ropekern_triton::apply_rope", mutates_args=())
def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    split: torch.Tensor,
    attention_factor: float,
    rotary_dim: int,
    interleaved: bool,
) -> torch.Tensor:
    """Rotated copy of ``x``; arguments as ``ropekern._triton.rope.forward``."""
    return _rope.forward(x, positions, split, attention_factor, rotary_dim, interleaved)


@apply_rope.register_fake
def _apply_rope_fake(x, positions, split, attention_factor, rotary_dim, interleaved):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
