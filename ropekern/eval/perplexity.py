"""Perplexity for long-context evaluation.

* ``needle_perplexity``: perplexity of the answer tokens only, given a long context (LongRoPE2's
  needle-driven perplexity). Ordinary perplexity over a long document is dominated by tokens that
  need only local context; scoring the few tokens that can be predicted only by reading far back
  measures what context extension is for.
* ``sliding_window_perplexity``: perplexity of a long token stream scored in windows of at most
  ``window`` tokens that advance by ``stride``; every token is scored once, with at least
  ``window - stride`` tokens of context (except near the start).

Both take ``logits_fn(input_ids int64 [B, S]) -> logits [B, S, V]`` (or an object with
``.logits``, e.g. a transformers model's output), where ``logits[:, i]`` predicts token ``i + 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._common import LogitsFn, as_token_ids, batches_by_length, call_logits

__all__ = ["needle_perplexity", "answer_nll", "sliding_window_perplexity"]


def _pairs(samples: Any) -> list[tuple[list[int], list[int]]]:
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)) or not samples:
        raise ValueError("`samples` must be a non-empty sequence of (context_ids, answer_ids) pairs or samples")
    out = []
    for s in samples:
        if hasattr(s, "input_ids") and hasattr(s, "answer_ids"):
            ctx, ans = s.input_ids, s.answer_ids
        elif isinstance(s, Sequence) and len(s) == 2:
            ctx, ans = s
        else:
            raise TypeError(
                "`samples` must contain (context_ids, answer_ids) pairs or objects with `input_ids` and "
                f"`answer_ids`, got {type(s).__name__}"
            )
        ctx, ans = as_token_ids("context_ids", ctx), as_token_ids("answer_ids", ans)
        if not ctx or not ans:
            raise ValueError("every sample needs at least one context token and one answer token")
        out.append((ctx, ans))
    return out


def answer_nll(logits_fn: LogitsFn, samples: Sequence[Any], *, batch_size: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the answer tokens and their count.

    ``samples``: ``PasskeySample`` objects (or anything with ``input_ids`` and ``answer_ids``) or
    ``(context_ids, answer_ids)`` pairs. The model reads context + answer (teacher forcing).
    """
    pairs = _pairs(samples)
    rows = [c + a for c, a in pairs]
    total, count = 0.0, 0
    with torch.no_grad():
        for idx, ids in batches_by_length(rows, batch_size):
            logp = torch.log_softmax(call_logits(logits_fn, ids), dim=-1).cpu()
            for row, i in enumerate(idx):
                n = len(pairs[i][1])
                start = ids.shape[1] - n
                target = ids[row, start:]
                total -= float(logp[row, start - 1 : -1].gather(-1, target[:, None]).sum())
                count += n
    return total, count


def needle_perplexity(logits_fn: LogitsFn, samples: Sequence[Any], *, batch_size: int = 8) -> float:
    """``exp(mean NLL)`` over the answer tokens of all samples (needle-driven perplexity).

    Lower is better; a model that always produces the answer with certainty scores 1.0. This is
    the objective LongRoPE2 uses to score rescale factors (``ropekern.search.longrope_search``).
    """
    total, count = answer_nll(logits_fn, samples, batch_size=batch_size)
    return math.exp(total / count)


def sliding_window_perplexity(
    logits_fn: LogitsFn,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    window: int,
    stride: int | None = None,
    batch_size: int = 1,
) -> float:
    """Perplexity of ``token_ids`` (1-D, at least 2 tokens) under windows of ``window`` tokens.

    Windows start at ``0, stride, 2·stride, ...``; each scores only the tokens no earlier window
    scored, so every token but the first is scored exactly once, with at least ``window - stride``
    tokens of context once past the first window. ``stride`` defaults to ``window // 2`` and must
    be below ``window`` (a window's first token has no context inside it). Windows of equal length
    are batched ``batch_size`` at a time.
    """
    ids = as_token_ids("token_ids", token_ids)
    for name, value in (("window", window), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if window < 2:
        raise ValueError(f"`window` must be >= 2, got {window}")
    stride = window // 2 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < window:
        raise ValueError(f"`stride` must be an int in [1, window - 1 = {window - 1}], got {stride!r}")
    if len(ids) < 2:
        raise ValueError(f"`token_ids` must hold at least 2 tokens, got {len(ids)}")

    # (window tokens, index within the window of the first token to score)
    spans: list[tuple[list[int], int]] = []
    scored_to = 1  # token 0 has no context and is never scored
    begin = 0
    while scored_to < len(ids):
        end = min(begin + window, len(ids))
        spans.append((ids[begin:end], scored_to - begin))
        scored_to = end
        begin += stride
    total, count = 0.0, 0
    with torch.no_grad():
        for idx, batch in batches_by_length([s[0] for s in spans], batch_size):
            logp = torch.log_softmax(call_logits(logits_fn, batch), dim=-1).cpu()
            for row, i in enumerate(idx):
                first = spans[i][1]
                target = batch[row, first:]
                total -= float(logp[row, first - 1 : -1].gather(-1, target[:, None]).sum())
                count += target.numel()
    return math.exp(total / count)
