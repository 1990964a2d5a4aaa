"""Parallel Context Windows and NBCE generation for transformers models, on ropekern's fused attention.

Both functions patch the model with ``ropekern.integrations.hf`` for the duration of the call when it is
not patched already (and unpatch it afterwards), so every attention call is one ``rk.rope_attention``
per layer on un-rotated q/k/v with explicit positions.

* ``pcw_generate`` (Ratner et al. 2023): the windows are encoded as one right-padded batch (the patched
  attention packs it into ropekern's varlen layout), each at positions ``0..n_w-1``; their caches are
  joined into one sequence of ``sum(n_w)`` keys that keep those (repeated) positions; the prompt and the
  generated tokens start at ``max(n_w)`` and, being the last rows of a bottom-right causal attention,
  see every window key and each other causally. No dense mask is ever formed.
* ``nbce_generate`` (Su 2023): the prompt alone (row 0) and each context + prompt (rows 1..n) are one
  left-padded batch; at every step the n + 1 next-token predictions are combined by ``nbce_combine`` and
  the one chosen token is appended to every row.

Decoding options (``**gen``): ``do_sample`` (default False: greedy), ``temperature``, ``top_k``,
``top_p``, ``generator`` (a ``torch.Generator`` for sampling), ``eos_token_id`` (int or list: stop
after emitting one).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .nbce import nbce_combine

__all__ = ["pcw_generate", "nbce_generate"]

_GEN_KEYS = ("do_sample", "temperature", "top_k", "top_p", "generator", "eos_token_id")


# ---------------------------------------------------------------------------------------------- helpers
def _ids(x: Any, name: str, device: torch.device, allow_empty: bool = False) -> torch.Tensor:
    """A 1-D int64 tensor of token ids from a list/tuple of ints or a 1-D (or ``[1, S]``) integer tensor."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"`{name}` must hold integer token ids, got {x.dtype}")
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1:
            raise ValueError(f"`{name}` must be 1-D token ids (or [1, S]), got shape {tuple(x.shape)}")
        t = x.to(device=device, dtype=torch.int64)
    elif isinstance(x, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
            raise TypeError(f"`{name}` must be a list of int token ids")
        t = torch.tensor(list(x), dtype=torch.int64, device=device)
    else:
        raise TypeError(f"`{name}` must be a list of ints or an integer tensor, got {type(x).__name__}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"`{name}` must not be empty")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"`{name}` holds negative token ids")
    return t


def _id_list(xs: Any, name: str, device: torch.device) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence) or isinstance(xs, str):
        raise TypeError(f"`{name}` must be a list of token-id sequences, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"`{name}` must hold at least one sequence")
    return [_ids(x, f"{name}[{i}]", device) for i, x in enumerate(xs)]


def _gen_options(gen: dict) -> dict:
    unknown = sorted(set(gen) - set(_GEN_KEYS))
    if unknown:
        raise TypeError(f"unsupported generation option(s) {unknown}; supported: {list(_GEN_KEYS)}")
    opts = {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "generator": None}
    opts.update(gen)
    t = opts["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {t!r}")
    k = opts["top_k"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"`top_k` must be an int >= 1 or None, got {k!r}")
    p = opts["top_p"]
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
        raise ValueError(f"`top_p` must be in (0, 1] or None, got {p!r}")
    eos = opts.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise TypeError(f"`eos_token_id` must be an int or a list of ints, got {opts.get('eos_token_id')!r}")
    opts["eos_token_id"] = set(eos)
    return opts


def _choose(logprobs: torch.Tensor, opts: dict) -> int:
    """One token from log-probabilities ``[V]``: arg-max (greedy), or a sample after temperature/top-k/top-p."""
    if not opts["do_sample"]:
        return int(logprobs.argmax())
    scores = logprobs.float() / opts["temperature"]
    if opts["top_k"] is not None and opts["top_k"] < scores.numel():
        kth = torch.topk(scores, opts["top_k"]).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts["top_p"] is not None and opts["top_p"] < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, -1) >= opts["top_p"]  # keep the smallest prefix reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=opts["generator"]))


@contextmanager
def _patched(model: torch.nn.Module, backend: str):
    """Patch ``model`` for the block when it is not patched already (and undo that afterwards)."""
    from ropekern.integrations import hf

    if hf.is_patched(model):
        yield hf.rope_config(model)
        return
    hf.patch(model, backend)
    try:
        yield hf.rope_config(model)
    finally:
        hf.unpatch(model)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration as exc:
        raise ValueError("`model` has no parameters") from exc


def _cache(model: torch.nn.Module, cache: Any) -> dict:
    """``{keyword: cache}`` under the name this transformers release's ``model.forward`` takes."""
    from ropekern.integrations.hf import cache_keyword

    return {cache_keyword(model): cache}


def _last_only(model: torch.nn.Module) -> dict:
    """``logits_to_keep=1`` where the model takes it: only the last position's logits are used, and a
    full ``[B, S, V]`` logits tensor is large (4 windows x 8K tokens x 128K vocab x 4 B = 16 GiB)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _check_common(model: Any, max_new_tokens: Any) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"`model` must be a transformers causal LM, got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be an int >= 0, got {max_new_tokens!r}")


def _result(tokens: list[int], scores: list[torch.Tensor], device, return_scores: bool):
    ids = torch.tensor(tokens, dtype=torch.int64, device=device)
    if not return_scores:
        return ids
    vocab = scores[0].shape[-1] if scores else 0
    return ids, torch.stack(scores) if scores else torch.empty(0, vocab)


# ---------------------------------------------------------------------------------------------- PCW
@torch.no_grad()
def pcw_generate(
    model: torch.nn.Module,
    window_ids: Sequence[Any],
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    backend: str = "auto",
    return_scores: bool = False,
    **gen: Any,
):
    """Generate with Parallel Context Windows: every window shares the positions ``0..n_w-1``.

    Args:
        model: a transformers causal LM of an architecture ``ropekern.integrations.hf`` supports (patched
            for this call when it is not already; ``backend`` is used then). RoPE types whose table depends
            on the sequence length (dynamic NTK, LongRoPE) are refused: windows and task tokens would need
            different tables within one sequence.
        window_ids: W >= 1 token-id sequences (lists of ints or 1-D integer tensors), each non-empty.
        prompt_ids: the task tokens (non-empty); they take positions ``max(n_w) .. max(n_w)+P-1``.
        max_new_tokens: tokens to generate (>= 0); fewer when ``eos_token_id`` is emitted.
        return_scores: also return the log-probabilities each token was chosen from, float32 ``[N, V]``.
        **gen: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``generator``, ``eos_token_id``.

    Returns: the generated ids, int64 ``[N]`` on the model's device (and the scores with ``return_scores``).
    With a single window this is ordinary generation on ``window + prompt``.
    """
    from transformers import DynamicCache

    from ropekern.integrations.hf import UnrotatedLayer

    _check_common(model, max_new_tokens)
    opts = _gen_options(gen)
    device = _device(model)
    windows = _id_list(window_ids, "window_ids", device)
    prompt = _ids(prompt_ids, "prompt_ids", device)
    lengths = [int(w.numel()) for w in windows]
    start = max(lengths)
    with _patched(model, backend) as rope:
        if rope.is_length_dependent:
            raise ValueError(
                f"pcw_generate: the model's RoPE ({rope.rope_type}) depends on the sequence length, so windows "
                "and task tokens would need different tables; use a static scaling (linear, ntk, yarn, llama3)"
            )
        # 1. All windows in one right-padded batch at positions 0..n_w-1; padding is masked out (the patched
        #    attention packs the valid tokens into the varlen layout), so each window attends only to itself.
        w = len(windows)
        batch = torch.zeros(w, start, dtype=torch.int64, device=device)
        valid = torch.zeros(w, start, dtype=torch.bool, device=device)
        for i, ids in enumerate(windows):
            batch[i, : ids.numel()] = ids
            valid[i, : ids.numel()] = True
        positions = torch.arange(start, device=device).expand(w, start)
        window_cache = DynamicCache()
        model(
            input_ids=batch,
            attention_mask=valid.long(),
            position_ids=positions,
            **_cache(model, window_cache),
            use_cache=True,
            **_last_only(model),
        )
        # 2. Join: one sequence holding every window's valid keys/values with their own positions.
        joined = DynamicCache()
        for layer in window_cache.layers:
            keys = layer.keys.transpose(1, 2)[valid].transpose(0, 1)[None]  # [1, Hkv, sum n_w, D]
            values = layer.values.transpose(1, 2)[valid].transpose(0, 1)[None]
            new = UnrotatedLayer()
            new.update(keys, values, positions=layer.positions[valid][None])
            joined.layers.append(new)
        del window_cache
        # 3. Task tokens from position max(n_w): the last rows of a bottom-right causal attention over
        #    [windows | task tokens], so they see every window and each other causally.
        tokens: list[int] = []
        scores: list[torch.Tensor] = []
        step = prompt[None]
        pos = start
        for _ in range(max_new_tokens):
            n = step.shape[1]
            out = model(
                input_ids=step,
                position_ids=torch.arange(pos, pos + n, device=device)[None],
                **_cache(model, joined),
                use_cache=True,
                **_last_only(model),
            )
            pos += n
            logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
            token = _choose(logprobs, opts)
            tokens.append(token)
            scores.append(logprobs.cpu())
            if token in opts["eos_token_id"]:
                break
            step = torch.tensor([[token]], dtype=torch.int64, device=device)
    return _result(tokens, scores, device, return_scores)


# ---------------------------------------------------------------------------------------------- NBCE
@torch.no_grad()
def nbce_generate(
    model: torch.nn.Module,
    context_ids: Sequence[Any],
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    beta: float = 0.25,
    pooling: str = "min_entropy",
    backend: str = "auto",
    return_scores: bool = False,
    **gen: Any,
):
    """Generate with Naive Bayes-based Context Extension over n contexts read in parallel.

    Row 0 of the batch is ``prompt`` alone (the unconditional prediction), row i is ``context_i + prompt``;
    each row keeps its own positions ``0..len-1`` (left padding is masked out). Every step combines the
    rows' next-token logits with ``nbce_combine(logits, beta, pooling)`` and appends the chosen token to
    every row, so all rows decode as one batch with one shared token.

    Args:
        model: a transformers causal LM ``ropekern.integrations.hf`` supports (patched for the call if needed).
        context_ids: n >= 1 non-empty token-id sequences.
        prompt_ids: the question/task tokens, non-empty.
        max_new_tokens: tokens to generate (>= 0); fewer when ``eos_token_id`` is emitted.
        beta, pooling: as in ``nbce_combine``.
        return_scores: also return the combined log-probabilities of every step, float32 ``[N, V]``.
        **gen: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``generator``, ``eos_token_id``.

    Returns: the generated ids, int64 ``[N]`` (and the scores with ``return_scores``).
    """
    from transformers import DynamicCache

    _check_common(model, max_new_tokens)
    opts = _gen_options(gen)
    device = _device(model)
    contexts = _id_list(context_ids, "context_ids", device)
    prompt = _ids(prompt_ids, "prompt_ids", device)
    nbce_combine(torch.zeros(2, 1), beta, pooling)  # validate beta and pooling before any model work
    rows = [prompt] + [torch.cat([c, prompt]) for c in contexts]
    width = max(int(r.numel()) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.int64, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.int64, device=device)
    for i, r in enumerate(rows):
        batch[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    tokens: list[int] = []
    scores: list[torch.Tensor] = []
    with _patched(model, backend):
        cache = DynamicCache()
        step, step_pos = batch, positions
        for _ in range(max_new_tokens):
            out = model(
                input_ids=step,
                attention_mask=mask,
                position_ids=step_pos,
                **_cache(model, cache),
                use_cache=True,
                **_last_only(model),
            )
            combined = nbce_combine(out.logits[:, -1].float(), beta=beta, pooling=pooling)
            token = _choose(combined, opts)
            tokens.append(token)
            scores.append(combined.cpu())
            if token in opts["eos_token_id"]:
                break
            step = torch.full((len(rows), 1), token, dtype=torch.int64, device=device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    return _result(tokens, scores, device, return_scores)
