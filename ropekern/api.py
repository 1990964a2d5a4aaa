"""Public entry points: validate, pick a backend, run (docs/design.md §1–§2)."""

from __future__ import annotations

import torch

from . import backends
from ._validation import attention_call, kvcache_call, rope_calls, rope_inplace_calls
from .scaling import RopeConfig

__all__ = ["apply_rope", "apply_rope_", "rope_attention", "rope_attention_with_kvcache", "available_backends"]

available_backends = backends.available_backends


def apply_rope(
    x: torch.Tensor,
    rope: RopeConfig,
    positions: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    seq_len: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Return a rotated copy of ``x``.

    Args:
        x: ``[B, S, H, D]`` or packed ``[T, H, D]``; fp16/bf16/fp32/fp64, contiguous last dim.
        rope: the ``RopeConfig`` (``rope.head_dim == D``).
        positions: int ``[B, S]`` (``[1, S]``: the same for every row; ``[T]`` for ``[T, H, D]``),
            >= 0; default ``arange(S)`` per row, or per sequence of ``cu_seqlens``, plus ``offsets``.
        cu_seqlens: int ``[N + 1]`` cumulative lengths of the N sequences packed in ``x [T, H, D]``:
            default positions restart at each, and length-dependent types scale each by its own length.
        offsets: int ``[B]`` (or ``[N]`` with ``cu_seqlens``), >= 0: each row / sequence starts at this
            position (flash-attn's ``seqlen_offsets``); not with ``positions``.
        seq_len: scaling length for length-dependent types (dynamic NTK, LongRoPE); default
            ``max(positions[b]) + 1`` per row / sequence (``[T]`` input without ``cu_seqlens``: one).
        backend: ``"auto"`` or a name from ``available_backends()``.
    Returns: a tensor like ``x``; channels ``>= rope.rotary_dim`` are copied bit-exact.
    """
    calls = rope_calls(x, rope, positions, seq_len, cu_seqlens, offsets)
    if x.numel() == 0:
        return x.clone()
    if len(calls) == 1 and calls[0][0] is None:
        call = calls[0][1]
        return backends.select_backend("rope", call, x.device, backend).rope(call)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for rows, call in calls:
        out[rows] = backends.select_backend("rope", call, x.device, backend).rope(call)
    return out


def apply_rope_(
    q: torch.Tensor,
    k: torch.Tensor | None,
    rope: RopeConfig,
    positions: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    seq_len: int | None = None,
    backend: str = "auto",
) -> None:
    """Rotate ``q`` and ``k`` in place (vLLM's ``rotary_embedding``, flash-attn's in-place rotary of
    a packed qkv buffer).

    Args:
        q: ``[B, S, Hq, D]`` or packed ``[T, Hq, D]``; any strides with a contiguous last dim, so
            views into one packed ``[B, S, 3, H, D]`` (or ``[T, 3, H, D]``) buffer work.
        k: like ``q`` with its own number of heads, or None to rotate ``q`` alone; must not share
            memory with ``q``.
        rope, positions, cu_seqlens, offsets, seq_len, backend: as ``apply_rope``; one set of positions
            for both.
    The values are ``apply_rope``'s bit for bit. The ``cpu`` and ``triton`` backends rotate in place
    (``torch.ops.ropekern.apply_rope_`` / ``ropekern_triton.apply_rope_``, ops that declare the
    mutation, so ``torch.compile`` keeps it); the others rotate a copy and write it back (one more
    pass over q and k). Tensors that require grad are refused (``ValueError``): an in-place rotation
    would hide them from autograd.
    """
    calls = rope_inplace_calls(q, k, rope, positions, seq_len, cu_seqlens, offsets)
    chosen = [backends.select_backend("rope", c, c.x.device, backend) for c in calls if c.x.numel()]
    calls = [c for c in calls if c.x.numel()]
    # Backends without an in-place kernel rotate into a copy; those copies are made before any write
    # because a call's positions may be a view of the memory an earlier call rotates.
    rotated = [None if hasattr(b, "rope_") else b.rope(c) for b, c in zip(chosen, calls)]
    with torch.no_grad():
        for b, call, out in zip(chosen, calls, rotated):
            if out is None:
                b.rope_(call)
            else:
                call.x.copy_(out)


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: RopeConfig,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    seq_len: int | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
):
    """Scaled-RoPE attention on **un-rotated** q and k: ``softmax(R(q) R(k)^T * scale) v``.

    Args:
        q: dense ``[B, Sq, Hq, D]`` or varlen ``[Tq, Hq, D]``.
        k, v: dense ``[B, Sk, Hkv, D]`` or varlen ``[Tk, Hkv, D]``; ``Hq % Hkv == 0`` (GQA/MQA).
        rope: the ``RopeConfig``; ``rope.head_dim == D``.
        causal: bottom-right aligned mask, query i sees key j iff ``j <= i + Sk - Sq``.
        softmax_scale: default ``D ** -0.5``.
        q_positions, k_positions: int ``[B, Sq]``/``[B, Sk]`` (``[1, S]``: the same for every row;
            varlen ``[Tq]``/``[Tk]``), >= 0; defaults ``max(Sk - Sq + i, 0)`` and ``j`` (restarting per
            varlen sequence): the queries are the last Sq tokens of the keys' sequence, and when
            Sq > Sk the first ``Sq - Sk`` queries (which see no key under ``causal``) sit at position 0
            rather than at negative ones. Repeats and jumps are allowed (they are data, not indices).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` cumulative lengths for the varlen layout.
        max_seqlen_q, max_seqlen_k: longest sequence (computed from ``cu_seqlens`` if omitted).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Sq]`` (varlen ``[Hq, Tq]``).
        seq_len: one scaling length for every sequence, for length-dependent types (dynamic NTK,
            LongRoPE; ignored by the others). Default ``max(k_positions[b]) + 1`` per sequence;
            set it to pin the table, e.g. LongRoPE's long factors for a whole serving run.
        window_size: flash-attn's sliding window ``(left, right)``: query i sees key j only if
            ``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (per sequence; -1: unbounded; under
            ``causal`` the right bound is the diagonal). Mistral's ``sliding_window`` W is ``(W - 1, 0)``.
        backend: ``"auto"`` or a name from ``available_backends()``.
    Returns: ``out`` like q, or ``(out, lse)``. Rows that see no key give zeros and LSE ``-inf``.
    """
    call = attention_call(
        q,
        k,
        v,
        rope,
        causal=causal,
        softmax_scale=softmax_scale,
        q_positions=q_positions,
        k_positions=k_positions,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        return_lse=return_lse,
        seq_len=seq_len,
        window_size=window_size,
    )
    if q.numel() == 0 or k.numel() == 0:
        out, lse = _no_keys(call)
    else:
        out, lse = backends.select_backend("attention", call, q.device, backend).attention(call)
    return (out, lse) if return_lse else out


def _no_keys(call) -> tuple[torch.Tensor, torch.Tensor]:
    """Output for calls with no queries or no keys: zeros and LSE -inf."""
    q = call.q
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = (q.shape[1], q.shape[0]) if call.varlen else (q.shape[0], q.shape[2], q.shape[1])
    return torch.zeros_like(q), torch.full(shape, float("-inf"), dtype=lse_dtype, device=q.device)


def rope_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rope: RopeConfig,
    *,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    seq_len: int | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
):
    """Attention of the last Sq tokens of each sequence against its KV cache of **un-rotated** keys.

    Args:
        q: ``[B, Sq, Hq, D]``, un-rotated; query i of sequence b sits at position ``n_b - Sq + i``
            (0 for the first ``Sq - n_b`` when ``n_b < Sq``; under ``causal`` those see no key and give
            zeros and LSE ``-inf``, flash-attn's rule).
        k_cache, v_cache: dense ``[B, Smax, Hkv, D]``, or paged ``[num_blocks, block_size, Hkv, D]``
            with ``block_table``.
        cache_seqlens: int32 ``[B]``, tokens already cached per sequence (not modified).
        k_new, v_new: ``[B, S_new, Hkv, D]`` un-rotated, written into the caches **in place** at
            ``cache_seqlens``; then ``n_b = cache_seqlens[b] + S_new``.
        block_table: int32 ``[B, max_blocks]``; token t of sequence b lives in block
            ``block_table[b, t // block_size]`` at offset ``t % block_size``.
        cache_leftpad: int32 ``[B]`` (dense caches, flash-attn's): sequence b's tokens start at slot
            ``cache_leftpad[b]`` of its cache row, so ``cache_seqlens[b]`` (the end slot) minus it are
            cached and token t (position t) sits at slot ``cache_leftpad[b] + t``.
        cache_batch_idx: int32 ``[B]`` (dense caches ``[Bc, Smax, ..]``, flash-attn's): query row b uses
            cache row ``cache_batch_idx[b]``; with ``k_new`` the rows must differ. Both read the cache
            through a paged view of the same memory (no copy).
        causal: the Sq queries are causal among themselves (chunked prefill, speculative decoding).
        softmax_scale, return_lse, backend: as in ``rope_attention`` (LSE ``[B, Hq, Sq]``).
        seq_len: as in ``rope_attention``; default ``n_b``.
        window_size: as in ``rope_attention`` with ``Sk = n_b``: a decoding query at ``n_b - 1`` sees
            the keys ``n_b - 1 - left ..``.
    Every key is rotated on read with the table of its sequence's current length ``n_b`` (or
    ``seq_len``), so dynamic NTK and LongRoPE stay exact as the sequence grows (docs/design.md §2).
    """
    call = kvcache_call(
        q,
        k_cache,
        v_cache,
        rope,
        cache_seqlens=cache_seqlens,
        k_new=k_new,
        v_new=v_new,
        block_table=block_table,
        cache_leftpad=cache_leftpad,
        cache_batch_idx=cache_batch_idx,
        causal=causal,
        softmax_scale=softmax_scale,
        return_lse=return_lse,
        seq_len=seq_len,
        window_size=window_size,
    )
    if q.shape[0] == 0 or q.shape[1] == 0:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = (
            torch.zeros_like(q),
            torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=lse_dtype, device=q.device),
        )
        if call.s_new and q.shape[0]:
            from .reference import append_kv

            append_kv(call)
    else:
        out, lse = backends.select_backend("kvcache", call, q.device, backend).kvcache(call)
    return (out, lse) if return_lse else out
