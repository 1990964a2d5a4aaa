"""Attention masks: transformers' mask reduced to the key-validity mask ``[B, T]`` that ropekern's causal
attention reproduces (anything but causal + key padding is refused).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

# The last mask reduced, by identity: every layer of one forward receives the same mask object, and
# checking a 4-D mask costs B * Sq * T comparisons (64M per layer for an 8K-token prefill).
_LAST_MASK: list[Any] = [None, None, None]  # [weakref to the mask, (b, sq, t, version), validity]


def _key_validity(mask: Any, b: int, sq: int, t: int, where: str) -> torch.Tensor | None:
    """Reduce transformers' attention mask to key validity, bool ``[B, T]``; None when nothing is masked
    beyond causality. A 4-D mask must be exactly causal (bottom-right) & key padding."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"{where}: unsupported attention mask {type(mask).__name__} (flex attention block masks are not "
            "supported; use attn_implementation='eager' or 'sdpa')"
        )
    checking = not torch.compiler.is_compiling()
    key = (b, sq, t, mask._version)  # the version counter moves on any in-place change
    if checking and _LAST_MASK[0] is not None and _LAST_MASK[0]() is mask and _LAST_MASK[1] == key:
        return _LAST_MASK[2]
    valid = _reduce_mask(mask, b, sq, t, where, checking)
    if checking:
        _LAST_MASK[:] = [weakref.ref(mask), key, valid]
    return valid


def _reduce_mask(mask: torch.Tensor, b: int, sq: int, t: int, where: str, checking: bool) -> torch.Tensor | None:
    if mask.dim() == 2:
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"{where}: 2-D attention mask has shape {tuple(mask.shape)}, expected {(b, t)}")
        valid = mask.bool()
    elif mask.dim() == 4:
        if mask.shape[0] != b or mask.shape[1] != 1 or mask.shape[2] != sq or mask.shape[3] != t:
            raise ValueError(f"{where}: 4-D attention mask has shape {tuple(mask.shape)}, expected {(b, 1, sq, t)}")
        allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]  # eager: 0 keeps, dtype-min masks
        valid = allowed[:, -1, :]  # the last query sees every key that is not padding
        if checking:
            i = torch.arange(sq, device=mask.device)[:, None]
            j = torch.arange(t, device=mask.device)[None, :]
            # Every row, padded queries included: transformers masks padding by key column only, and a
            # row check limited to "real" queries would accept a block-diagonal (packed) mask, whose
            # last row marks the first documents' tokens as padding.
            expected = (j <= i + (t - sq))[None] & valid[:, None, :]
            if bool((expected != allowed).any()):
                raise ValueError(
                    f"{where}: the attention mask is not causal + padding (sliding window, packed sequences or a "
                    "custom mask), which ropekern's causal attention cannot reproduce"
                )
    else:
        raise ValueError(f"{where}: attention mask must have 2 or 4 dimensions, got shape {tuple(mask.shape)}")
    if checking and bool(valid.all()):
        return None
    return valid
