"""``exact_reference``: the stock transformers model with exact (fp64-angle) RoPE tables, an oracle
independent of the patched code path.
"""

from __future__ import annotations

import types

import torch

import ropekern as rk

from .adapters import _adapter_for, _gptj_tables
from .checks import _attention_modules, _check_stock_tables
from .patch import is_patched


def exact_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Turn an **unpatched** model, in place, into an independent oracle for the patched one.

    Everything stays transformers' own code (projections, rotate-half or rotate-every-two, partial
    rotary, masks, cache) except the RoPE tables, whose fp32 angles (``position * inv_freq`` in fp32:
    0.06 rad off at position 2^20) become exact: cos/sin from fp64 angles on ropekern's fp64
    frequencies, per row with that row's length for dynamic NTK / LongRoPE (docs/design.md §2). Attention
    runs in the model's dtype: SDPA instead of eager (whose softmax is always fp32) where the model
    supports it, and GPT-J's scores, which transformers forms in fp32, in the model's dtype. Cast
    the model to float64 first for an oracle; returns ``model``.
    """
    if is_patched(model):
        raise ValueError("exact_reference needs an unpatched model")
    rope = rk.RopeConfig.from_hf(model.config)
    _check_stock_tables(model, rope, _attention_modules(model))
    if getattr(model, "_supports_sdpa", False):
        model.config._attn_implementation = "sdpa"  # eager attention's softmax is always fp32
    for module in model.modules():
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor) and hasattr(
            module, "attention_scaling"
        ):
            module.forward = types.MethodType(_exact_rotary_forward(rope), module)
    for _, owner in _gptj_tables(model):
        if _adapter_for(owner) is not None:  # the attention module (before 5.24)
            owner._get_embed_positions = types.MethodType(_exact_gptj_table(rope), owner)
            owner._attn = types.MethodType(_gptj_attn_in_dtype, owner)
        else:  # GPTJRotaryEmbedding: (sin, cos) [B, S, R/2] of the given positions
            owner.forward = types.MethodType(_exact_gptj_forward(rope), owner)
    return model


def _exact_cos_sin(
    rope: rk.RopeConfig, positions: torch.Tensor, lengths_from: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(cos, sin)`` ``[B, S, R/2]`` times the attention factor. Row b uses the table of
    length ``max(lengths_from[b]) + 1`` (default ``positions``) for length-dependent types."""
    lengths_from = positions if lengths_from is None else lengths_from
    rows = []
    for row, ref in zip(positions.to(torch.int64), lengths_from.to(torch.int64)):
        inv = rope.inv_freq64(int(ref.max()) + 1 if rope.is_length_dependent else None).to(row.device)
        rows.append(row.to(torch.float64)[:, None] * inv[None, :])
    angle = torch.stack(rows)
    return torch.cos(angle) * rope.attention_factor, torch.sin(angle) * rope.attention_factor


def _exact_rotary_forward(rope: rk.RopeConfig):
    def forward(self, x, position_ids, layer_type=None):
        cos, sin = _exact_cos_sin(rope, position_ids)
        return torch.cat([cos, cos], dim=-1).to(x.dtype), torch.cat([sin, sin], dim=-1).to(x.dtype)

    return forward


def _exact_gptj_table(rope: rk.RopeConfig):
    def get_embed_positions(self, position_ids):
        # GPT-J gathers row p = [sin(p f) a, cos(p f) a] of this [B, max position + 1, R] table.
        n = int(position_ids.max()) + 1
        grid = torch.arange(n, device=position_ids.device).expand(position_ids.shape[0], n)
        cos, sin = _exact_cos_sin(rope, grid, lengths_from=position_ids)
        return torch.cat([sin, cos], dim=-1)

    return get_embed_positions


def _exact_gptj_forward(rope: rk.RopeConfig):
    def forward(self, x, position_ids):
        cos, sin = _exact_cos_sin(rope, position_ids)
        return sin.to(x.dtype), cos.to(x.dtype)

    return forward


def _gptj_attn_in_dtype(self, query, key, value, attention_mask=None):
    scores = torch.matmul(query, key.transpose(-1, -2)) / self.scale_attn
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.nn.functional.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(self.attn_dropout(weights), value), weights
