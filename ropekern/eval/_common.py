"""Shared plumbing of the evaluation helpers: tokenizers, ``logits_fn`` calls, batching by length."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["LogitsFn", "as_encoder", "as_token_ids", "call_logits", "batches_by_length"]

# logits_fn(input_ids int64 [B, S]) -> logits [B, S, V] (or an object with a `.logits` attribute,
# e.g. a transformers CausalLMOutput), where logits[b, i] predicts token i + 1.
LogitsFn = Callable[[torch.Tensor], Any]


def as_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """A function text -> token ids from a tokenizer-like object.

    Accepts an object with ``encode(text)`` (transformers tokenizers are called with
    ``add_special_tokens=False`` so no BOS is inserted mid-prompt) or a plain callable.
    """
    if hasattr(tokenizer, "encode"):
        encode = tokenizer.encode

        def enc(text: str) -> Any:
            try:
                return encode(text, add_special_tokens=False)
            except TypeError:  # a tokenizer whose encode takes only the text
                return encode(text)

    elif callable(tokenizer):
        enc = tokenizer
    else:
        raise TypeError(
            f"`tokenizer` must have an encode(text) method or be a callable text -> ids, got {type(tokenizer).__name__}"
        )

    def encoder(text: str) -> list[int]:
        return as_token_ids("tokenizer output", enc(text))

    return encoder


def as_token_ids(name: str, ids: Any) -> list[int]:
    """A list of Python ints from a list/tuple/1-D tensor of integer token ids."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"`{name}` must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        return [int(t) for t in ids.tolist()]
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        raise TypeError(f"`{name}` must be a sequence of token ids, got {type(ids).__name__}")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"`{name}` must contain integer token ids, got {type(t).__name__}")
        out.append(int(t))
    return out


def call_logits(logits_fn: LogitsFn, ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """``logits_fn(ids)`` checked to be ``[B, S, V]`` (a ``.logits`` attribute is unwrapped), as
    float32 (float64 kept) so that log-softmax is never taken in half precision.

    With ``last``, the caller reads only the last ``last`` positions: ``logits_fn`` may then return
    ``[B, k, V]`` for the last ``k >= last`` positions (transformers' ``logits_to_keep=k``; at 32K
    tokens full logits over a 49K vocabulary are 6 GB), and ``[B, last, V]`` is returned."""
    if not callable(logits_fn):
        raise TypeError(f"`logits_fn` must be callable input_ids -> logits, got {type(logits_fn).__name__}")
    out = logits_fn(ids)
    if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"`logits_fn` must return a tensor [B, S, V], got {type(out).__name__}")
    tail = last is not None and out.dim() == 3 and out.shape[0] == ids.shape[0] and last <= out.shape[1] <= ids.shape[1]
    if not tail and (out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape)):
        want = "[B, S, V]" if last is None else f"[B, k, V] with {last} <= k <= S"
        raise ValueError(f"`logits_fn` returned shape {tuple(out.shape)} for input_ids {tuple(ids.shape)}; want {want}")
    if last is not None:
        out = out[:, out.shape[1] - last :]
    if not out.dtype.is_floating_point:
        raise TypeError(f"`logits_fn` must return floating logits, got {out.dtype}")
    return out if out.dtype == torch.float64 else out.float()


def batches_by_length(rows: Sequence[list[int]], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, ids int64 [b, S])``: rows of equal length stacked, at most ``batch_size`` each."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(len(row), []).append(i)
    for length in sorted(groups):
        idx = groups[length]
        for j in range(0, len(idx), batch_size):
            chunk = idx[j : j + batch_size]
            yield chunk, torch.tensor([rows[i] for i in chunk], dtype=torch.int64)
