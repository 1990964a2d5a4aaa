"""``rescale="recompute"``: the decoder-stack forward that recomputes the prefix whenever a
length-dependent RoPE (dynamic NTK, LongRoPE) changes a sequence's scaling state.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import ropekern as rk

from .cache import UnrotatedLayer, _take_cache, output_cache
from .forward import _STATE, _query_positions

RESCALE_MODES = ("recompute", "rotate")


@dataclass
class _StackState:
    """State of a patched decoder stack (``rescale="recompute"`` with a length-dependent RoPE)."""

    rope: rk.RopeConfig
    params: tuple[str, ...]
    cache_arg: str  # the name the class forward takes the cache under
    # The class's forward, looked up at patch time: inside a compiled module dynamo resolves
    # type(self).forward to the instance attribute, i.e. to the wrapper itself (infinite recursion).
    forward: Callable[..., Any]


def _sequence_lengths(positions: torch.Tensor, valid: torch.Tensor | None) -> list[int]:
    """``max(positions[b])`` over real tokens, plus one, per row (0 for a row without any)."""
    pos = positions.to(torch.int64)
    if valid is not None:
        pos = torch.where(valid, pos, torch.full_like(pos, -1))
    if not pos.shape[1]:
        return [0] * pos.shape[0]
    return (pos.amax(dim=1) + 1).clamp_min(0).tolist()


def _first_layer(cache: Any) -> UnrotatedLayer | None:
    layers = getattr(cache, "layers", None)
    if not layers or not isinstance(layers[0], UnrotatedLayer) or not layers[0].get_seq_length():
        return None
    return layers[0]


def _patched_stack_forward(self, *args, **kwargs):
    """Replacement ``forward`` of the decoder stack when the RoPE is length-dependent.

    Un-rotated keys make every step rotate all keys with the current table, but in a model with
    more than one layer the cached keys and values of deeper layers were computed from attention
    outputs of the table in force when their token was processed. Whenever a sequence's scaling
    state changes (LongRoPE: once, at the switch; dynamic NTK: every step past L), this forward
    therefore recomputes the whole prefix from the input embeddings kept in the cache, so cached
    generation equals a full recompute at every depth. Other steps append to the cache as usual.
    """
    state: _StackState = getattr(self, _STATE)
    for name, value in zip(state.params, args):
        kwargs[name] = value
    forward = types.MethodType(state.forward, self)
    where = f"ropekern ({type(self).__name__})"
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if kwargs.get("input_ids") is None:
            return forward(**kwargs)
        embeds = self.get_input_embeddings()(kwargs["input_ids"])
        kwargs.update(input_ids=None, inputs_embeds=embeds)
    if kwargs.get("token_type_ids") is not None:
        raise ValueError(f"{where}: token_type_ids are not supported with rescale='recompute'")
    cache = _take_cache(kwargs, where)
    if cache is not None:
        kwargs[state.cache_arg] = cache
    b, s = embeds.shape[:2]
    first = _first_layer(cache)
    recompute = False
    if first is not None:
        past = first.get_seq_length()
        if first.inputs is None or tuple(first.inputs.shape[:2]) != (b, past):
            raise ValueError(
                f"{where}: the cache holds {past} tokens but no matching input history (it was filled with "
                "rescale='rotate' or changed by an operation ropekern does not track); start a new cache"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, past + s)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{where}: rescale='recompute' needs a 2-D attention mask {(b, past + s)}, got {shape}")
        new_pos = _query_positions(kwargs.get("position_ids"), b, s, past, embeds.device, where)
        all_pos = torch.cat([first.positions, new_pos.to(torch.int32)], dim=1)
        valid = None if mask is None else mask.bool()
        before = _sequence_lengths(first.positions, None if valid is None else valid[:, :past])
        after = _sequence_lengths(all_pos, valid)
        if any(state.rope.state_key(x) != state.rope.state_key(y) for x, y in zip(before, after)):
            recompute = True
            history = first.inputs
            for layer in cache.layers:
                layer.reset()
            kwargs.update(inputs_embeds=torch.cat([history, embeds], dim=1), position_ids=all_pos.to(torch.int64))
    out = forward(**kwargs)
    if isinstance(out, tuple):
        if len(out) > 2:
            raise ValueError(f"{where}: tuple outputs with hidden states are not supported; use return_dict=True")
        if recompute:
            out = (out[0][:, -s:], *out[1:])
    elif recompute:
        out.last_hidden_state = out.last_hidden_state[:, -s:]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, -s:] for h in out.hidden_states)
    out_cache = output_cache(out)
    layers = getattr(cache if out_cache is None else out_cache, "layers", None)
    if layers and isinstance(layers[0], UnrotatedLayer):
        held = layers[0].inputs
        full = kwargs["inputs_embeds"]
        layers[0].inputs = full if recompute or held is None else torch.cat([held, full], dim=1)
    return out
