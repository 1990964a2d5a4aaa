"""The replacement attention forward: query positions, the cache update, the key-validity mask and the
``rk.rope_attention`` call (padded batches packed into the varlen layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import ropekern as rk

from .adapters import _Adapter
from .cache import _cache_layer, _take_cache
from .masks import _key_validity

_STATE = "_ropekern_state"
_FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class _ModuleState:
    """What a patched attention module needs at run time (stored on the module)."""

    name: str
    adapter: _Adapter
    rope: rk.RopeConfig
    backend: str
    params: tuple[str, ...]  # the class forward's positional parameters after hidden_states


def _query_positions(position_ids: Any, b: int, s: int, past: int, device: torch.device, where: str) -> torch.Tensor:
    """Positions of the new tokens, int ``[B, S]``; transformers passes ``[1, S]`` or ``[B, S]``."""
    if position_ids is None:
        return torch.arange(past, past + s, device=device, dtype=torch.int32).expand(b, s)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise TypeError(f"{where}: position_ids must be an integer tensor")
    if position_ids.dim() != 2:
        raise ValueError(
            f"{where}: position_ids must be [batch, seq] (got shape {tuple(position_ids.shape)}; multimodal "
            "3-D positions are not supported)"
        )
    if position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
        raise ValueError(f"{where}: position_ids has shape {tuple(position_ids.shape)}, expected ({b}, {s})")
    return position_ids.to(device).expand(b, s)


def _attend(q, k, v, q_pos, k_pos, valid, state: _ModuleState, scale: float) -> torch.Tensor:
    """Causal scaled-RoPE attention of q ``[B, Sq, Hq, D]`` against k/v ``[B, T, Hkv, D]`` (un-rotated).

    ``valid`` (bool ``[B, T]`` or None) marks real tokens; with padding, the real tokens are packed
    into the varlen layout (queries are the last Sq tokens of each row, so after packing they are
    still the last tokens of their sequence and the bottom-right causal mask is exact)."""
    if valid is None:
        return rk.rope_attention(
            q,
            k,
            v,
            state.rope,
            causal=True,
            softmax_scale=scale,
            q_positions=q_pos,
            k_positions=k_pos,
            backend=state.backend,
        )
    sq, t = q.shape[1], k.shape[1]
    q_valid = valid[:, t - sq :]
    cu_k = torch.nn.functional.pad(valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.nn.functional.pad(q_valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    packed = rk.rope_attention(
        q[q_valid],
        k[valid],
        v[valid],
        state.rope,
        causal=True,
        softmax_scale=scale,
        q_positions=q_pos[q_valid],
        k_positions=k_pos[valid],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        backend=state.backend,
    )
    out = q.new_zeros(q.shape)
    out[q_valid] = packed
    return out


def _patched_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Replacement ``forward`` of a supported attention module (bound to the instance by ``patch``)."""
    state: _ModuleState = getattr(self, _STATE)
    where = f"ropekern ({state.name}, {type(self).__name__})"
    if len(args) > len(state.params):
        raise TypeError(f"{where}: too many positional arguments ({len(args)})")
    for name, value in zip(state.params, args):
        kwargs[name] = value
    adapter = state.adapter
    if kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False):
        raise ValueError(f"{where}: output_attentions is not supported (ropekern never forms attention weights)")
    if self.training and adapter.dropout(self) > 0:
        raise ValueError(f"{where}: attention dropout in training is not supported")
    if any(kwargs.get(key) is not None for key in _FLASH_VARLEN_KWARGS):
        raise ValueError(f"{where}: packed-sequence (padding-free) flash-attention kwargs are not supported")

    cache = _take_cache(kwargs, where)
    q, k, v = adapter.project(self, hidden_states)  # [B, S, H, D], un-rotated
    b, s = q.shape[:2]
    layer = None
    past = 0
    if cache is not None:
        if self.layer_idx is None:
            raise ValueError(f"{where}: the module has no layer_idx, so it cannot use a KV cache")
        layer = _cache_layer(cache, self.layer_idx, where)
        past = layer.get_seq_length()
    q_pos = _query_positions(kwargs.get("position_ids"), b, s, past, q.device, where)
    if layer is not None:
        keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, positions=q_pos)
        k, v, k_pos = keys.transpose(1, 2), values.transpose(1, 2), layer.positions
    else:
        k_pos = q_pos
    valid = _key_validity(kwargs.get("attention_mask"), b, s, k.shape[1], where)
    if past and valid is None and layer.sequential:
        # Decoding after a prefix at positions 0..T-1: the KV-cache entry point addresses the keys by
        # slot and runs the split-K decode kernel (cos/sin once per key chunk for all heads), where
        # explicit positions would run the tiled kernel for a single query row and build one cos/sin
        # row per key: the same result, 12x slower per call at 4K keys (9/3 heads, D 64, fp32).
        seqlens = torch.full((b,), k.shape[1], dtype=torch.int32, device=q.device)
        out = rk.rope_attention_with_kvcache(
            q, k, v, state.rope, cache_seqlens=seqlens, softmax_scale=adapter.scale(self), backend=state.backend
        )
    else:
        out = _attend(q, k, v, q_pos, k_pos, valid, state, adapter.scale(self))
    return adapter.out(self, out.reshape(b, s, -1)), None
