"""Naive Bayes-based Context Extension (NBCE, Su Jianlin 2023).

A long context is cut into n pieces S_1..S_n that the model reads separately (each within its
trained window). Under a naive-Bayes independence assumption the next-token distribution given all
of them is ``log p(T|S) = (1+β)·pool_k log p(T|S_k) − β·log p(T) + const``, where ``p(T)`` is the
prediction without any context and ``pool`` combines the n per-context predictions. Su's reference
pools by taking the single context whose prediction has the **minimum entropy** (the one most sure
of the answer), which works better than averaging; β = 0.25.
"""

from __future__ import annotations

import torch

__all__ = ["nbce_combine", "POOLINGS"]

POOLINGS = ("min_entropy", "mean", "max")

# Log-probabilities are clipped here before the entropy (0·log 0 = 0, not NaN) and the
# unconditional term is ignored for tokens it puts below this (the reference implementation's
# −100 guard): subtracting β·log p(T) for a token the unconditioned model rules out (−inf for a
# masked vocabulary entry) would otherwise promote that token to +inf.
_LOG_FLOOR = -100.0


def nbce_combine(logits: torch.Tensor, beta: float = 0.25, pooling: str = "min_entropy") -> torch.Tensor:
    """Combine per-context next-token logits into one distribution (NBCE).

    Args:
        logits: ``[n + 1, V]`` (or ``[n + 1, ..., V]``, e.g. ``[n + 1, B, V]``) floating logits or
            log-probabilities; row 0 is the prediction **without** context, rows 1..n with one
            context each (n >= 1).
        beta: weight of the unconditional correction, finite and >= 0 (0 gives the pooled
            prediction alone).
        pooling: ``"min_entropy"`` (the row 1..n of lowest entropy, per remaining index),
            ``"mean"`` (mean of the log-probabilities) or ``"max"`` (element-wise max of the
            log-probabilities).
    Returns: float32 (float64 for float64 input) log-probabilities ``[V]`` (``[..., V]``),
    normalised: ``log_softmax((1+β)·pooled − β·log p(T))``, where tokens whose unconditional
    log-probability is below −100 take the pooled value alone.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"nbce_combine: `logits` must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"nbce_combine: `logits` must be a floating tensor, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[0] < 2 or logits.shape[-1] < 1:
        raise ValueError(
            f"nbce_combine: `logits` must be [n + 1, V] with n >= 1 contexts, got shape {tuple(logits.shape)}"
        )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) < float("inf"):
        raise ValueError(f"nbce_combine: `beta` must be a finite number >= 0, got {beta!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"nbce_combine: `pooling` must be one of {POOLINGS}, got {pooling!r}")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("nbce_combine: `logits` contains NaN or +inf")

    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    uncond, cond = logp[0], logp[1:]
    if pooling == "min_entropy":
        clipped = cond.clamp(min=_LOG_FLOOR)
        entropy = -(cond.exp() * clipped).sum(-1)  # [n, ...]
        k = entropy.argmin(0)  # first context on ties
        pooled = torch.gather(cond, 0, k[None, ..., None].expand(1, *cond.shape[1:]))[0]
    elif pooling == "mean":
        pooled = cond.mean(0)
    else:
        pooled = cond.amax(0)
    merged = (1.0 + beta) * pooled - beta * uncond
    merged = torch.where(uncond > _LOG_FLOOR, merged, pooled)
    return torch.log_softmax(merged, dim=-1)
