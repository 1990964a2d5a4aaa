"""The peers' calling conventions expressed in ropekern, against the peers' own formulas written here.

* Hugging Face passes ``position_ids`` of shape ``[1, S]`` for a whole batch (its rotary module
  broadcasts them): ropekern takes them as every row's positions, on every backend, and matches
  ``apply_rotary_pos_emb`` (``q * cos + rotate_half(q) * sin`` with ``cos = cos(position_ids *
  inv_freq)`` duplicated over the two halves) computed in float64.
* The default query positions when Sq > Sk: ``max(Sk - Sq + i, 0)`` (documented in ``rope_attention``).
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import error_check

F64 = torch.float64


def _backends() -> list[str]:
    return [name for name, ok in rk.available_backends().items() if ok is True]


def _hf_rotate(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype=F64) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` on ``[B, S, H, D]`` with ``position_ids [1 or B, S]``,
    computed in ``dtype`` (float64: the oracle; float32: what transformers itself computes)."""
    freqs = position_ids.to(dtype)[..., None] * inv_freq.to(dtype)  # [1 or B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [., S, 1, D]
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return x.to(dtype) * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


@pytest.mark.parametrize("backend", _backends())
def test_hf_position_ids_for_the_whole_batch(backend):
    rope = rk.RopeConfig(32, base=10000.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 2, 32, generator=gen)
    position_ids = torch.arange(5, 14)[None]  # [1, S]: a continuation after 5 cached tokens
    out = rk.apply_rope(x, rope, position_ids, backend=backend)
    assert torch.equal(out, rk.apply_rope(x, rope, position_ids.expand(3, 9), backend=backend))
    oracle = _hf_rotate(x, position_ids, rope.inv_freq64())
    baseline = _hf_rotate(x, position_ids, rope.inv_freq64(), torch.float32)
    assert error_check(out, oracle, baseline, torch.float32, factor=3.0).ok

    q, k, v = (torch.randn(3, 9, 2, 32, generator=gen) for _ in range(3))
    shared = rk.rope_attention(q, k, v, rope, causal=True, q_positions=position_ids, k_positions=position_ids,
                               backend=backend)  # fmt: skip
    rows = position_ids.expand(3, 9)
    per_row = rk.rope_attention(q, k, v, rope, causal=True, q_positions=rows, k_positions=rows, backend=backend)
    assert torch.equal(shared, per_row)


def test_position_ids_of_another_batch_refused():
    x = torch.randn(3, 9, 2, 32)
    with pytest.raises(ValueError, match=r"`positions` must have shape \(3, 9\) or \(1, 9\)"):
        rk.apply_rope(x, rk.RopeConfig(32), torch.arange(9)[None].expand(2, 9))


@pytest.mark.parametrize("backend", _backends())
def test_default_query_positions_when_sq_exceeds_sk(backend):
    """Queries are the last Sq tokens of the keys' sequence, clamped at position 0."""
    rope = rk.RopeConfig(32)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 7, 2, 32, generator=gen)
    k, v = (torch.randn(2, 4, 2, 32, generator=gen) for _ in range(2))
    default = rk.rope_attention(q, k, v, rope, causal=False, backend=backend)
    explicit = (torch.arange(7) + 4 - 7).clamp_min(0)[None]
    assert torch.equal(default, rk.rope_attention(q, k, v, rope, causal=False, q_positions=explicit, backend=backend))
