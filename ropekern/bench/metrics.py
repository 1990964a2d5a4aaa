"""FLOP and byte counts of docs/design.md §6 (RoPE FLOPs are never counted).

* forward: ``4·B·Hq·Sq·Sk·D`` (two GEMMs of 2·Sq·Sk·D each per head), halved when causal;
* backward: 2.5x the forward; the backward benchmark times forward + backward together, so its
  figure uses ``(1 + 2.5)`` x the forward;
* decode: the same count for the Sq new queries over the whole cache (not halved: a decode query
  sees every cached key), but reported mainly in GB/s of K/V read: ``2·B·L·Hkv·D·elem``;
* rope: GB/s of q and k read and written: ``2·(B·S·Hq·D + B·S·Hkv·D)·elem``.
"""

from __future__ import annotations

import torch

from .config import Shape

__all__ = ["BACKWARD_FACTOR", "attention_flops", "op_flops", "op_bytes", "io_bytes"]

BACKWARD_FACTOR = 2.5


def attention_flops(batch: int, hq: int, sq: int, sk: int, head_dim: int, causal: bool) -> float:
    """Forward attention FLOPs: ``4·B·Hq·Sq·Sk·D``, halved for causal (docs/design.md §6)."""
    flops = 4.0 * batch * hq * sq * sk * head_dim
    return flops / 2 if causal else flops


def _elem(shape: Shape) -> int:
    return torch.empty((), dtype=shape.torch_dtype).element_size()


def op_flops(shape: Shape) -> float | None:
    """FLOPs of one timed call of ``shape.op`` (None for rope: it is measured in GB/s only)."""
    s = shape
    if s.op == "forward":
        return attention_flops(s.batch, s.hq, s.seqlen, s.seqlen, s.head_dim, s.causal)
    if s.op == "backward":
        return (1.0 + BACKWARD_FACTOR) * attention_flops(s.batch, s.hq, s.seqlen, s.seqlen, s.head_dim, s.causal)
    if s.op == "decode":
        return attention_flops(s.batch, s.hq, s.q_len, s.seqlen, s.head_dim, False)
    return None


def op_bytes(shape: Shape) -> float | None:
    """Bytes a call must move, for the GB/s figure (decode: K/V read; rope: q, k read + written)."""
    s, e = shape, _elem(shape)
    if s.op == "decode":
        return 2.0 * s.batch * s.seqlen * s.hkv * s.head_dim * e
    if s.op == "rope":
        return 2.0 * s.batch * s.seqlen * (s.hq + s.hkv) * s.head_dim * e
    return None


def io_bytes(shape: Shape) -> float:
    """Bytes of the op's inputs and outputs (q, k, v, out; decode: q, out, the K/V cache).

    The scale against which peak extra memory is judged (e.g. the CPU bar: a 32K prefill's
    peak <= 2x bytes(q, k, v, out)).
    """
    s, e = shape, _elem(shape)
    if s.op == "decode":
        return e * s.batch * (2 * s.q_len * s.hq * s.head_dim + 2 * s.seqlen * s.hkv * s.head_dim)
    if s.op == "rope":
        return 2.0 * e * s.batch * s.seqlen * (s.hq + s.hkv) * s.head_dim
    qo = 2 * s.batch * s.seqlen * s.hq * s.head_dim
    kv = 2 * s.batch * s.seqlen * s.hkv * s.head_dim
    factor = 2 if s.op == "backward" else 1  # gradients of q, k, v and dout
    return float(e * factor * (qo + kv))
