"""The peers' calling conventions expressed in ropekern, against the peers' own formulas written here.

* Hugging Face passes ``position_ids`` of shape ``[1, S]`` for a whole batch (its rotary module
  broadcasts them): ropekern takes them as every row's positions, on every backend, and matches
  ``apply_rotary_pos_emb`` (``q * cos + rotate_half(q) * sin`` with ``cos = cos(position_ids *
  inv_freq)`` duplicated over the two halves) computed in float64.
* vLLM's ``rotary_embedding(positions, query, key, ...)`` and flash-attn's in-place rotary rotate q and
  k in place inside one packed qkv buffer: ``rk.apply_rope_`` does, on every backend, matching the
  neox-style formula of vLLM's ``forward_native`` (``cos_sin_cache[positions]``, then ``x1 * cos - x2
  * sin``, ``x2 * cos + x1 * sin`` on the two halves) and leaving v and the pass-through channels alone.
* flash-attn's ``apply_rotary_emb(x, cos, sin, seqlen_offsets, cu_seqlens)``: sequences packed in
  ``[T, H, D]``, each starting at its own offset; ``rk.apply_rope(x, rope, cu_seqlens=, offsets=)``, and
  a length-dependent law scales each sequence by its own length.
* The default query positions when Sq > Sk: ``max(Sk - Sq + i, 0)`` (documented in ``rope_attention``).
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern._validation import RopeArgs
from ropekern.backends import get_backend
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


def _vllm_neox(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int, dtype=F64):
    """vLLM's ``RotaryEmbedding.forward_native`` (is_neox_style): a cos/sin cache indexed by position,
    the first ``rotary_dim`` channels rotated as two halves, the rest passed through. ``x [T, H, D]``."""
    t = torch.arange(int(positions.max()) + 1, dtype=dtype)
    freqs = torch.outer(t, inv_freq.to(dtype))
    cos, sin = freqs.cos()[positions][:, None, :], freqs.sin()[positions][:, None, :]
    rot, rest = x.to(dtype)[..., :rotary_dim], x.to(dtype)[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vllm_inplace_rotation_of_a_packed_qkv_buffer(backend, dtype):
    rope = rk.RopeConfig(64, rotary_dim=32, base=10000.0)  # partial rotary: 32 channels pass through
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(13, 3, 4, 64, generator=gen).to(dtype)  # [T, 3, H, D], q/k/v interleaved per token
    positions = torch.tensor([0, 1, 2, 3, 7, 7, 8, 100, 101, 5000, 5001, 5002, 3], dtype=torch.int64)
    before = qkv.clone()
    rk.apply_rope_(qkv[:, 0], qkv[:, 1], rope, positions, backend=backend)
    assert torch.equal(qkv[:, 2], before[:, 2])  # v untouched
    assert torch.equal(qkv[..., 32:], before[..., 32:])  # pass-through channels bit-exact
    for i in (0, 1):
        assert torch.equal(qkv[:, i], rk.apply_rope(before[:, i], rope, positions, backend=backend))
        oracle = _vllm_neox(before[:, i], positions, rope.inv_freq64(), 32)
        baseline = _vllm_neox(before[:, i], positions, rope.inv_freq64(), 32, torch.float32).to(dtype)
        assert error_check(qkv[:, i], oracle, baseline, dtype, factor=3.0).ok


@pytest.mark.parametrize("backend", _backends())
def test_inplace_batched_views_and_q_alone(backend):
    rope = rk.RopeConfig(32, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 9, 3, 2, 32, generator=gen)  # [B, S, 3, H, D]
    before = qkv.clone()
    rk.apply_rope_(qkv[:, :, 0], None, rope, torch.arange(20, 29)[None], backend=backend)
    expected = rk.apply_rope(before[:, :, 0], rope, torch.arange(20, 29)[None], backend=backend)
    assert torch.equal(qkv[:, :, 0], expected) and torch.equal(qkv[:, :, 1:], before[:, :, 1:])


@pytest.mark.parametrize("backend", _backends())
def test_inplace_gqa_heads_of_one_packed_projection(backend):
    """vLLM's layout: q, k and v heads side by side in one ``[T, (Hq + 2 Hkv) D]`` projection output;
    q (4 heads) and k (2 heads) are disjoint views of it with the same strides."""
    rope = rk.RopeConfig(32)
    qkv = torch.randn(7, (4 + 2 * 2) * 32, generator=torch.Generator().manual_seed(7))
    q, k = qkv[:, : 4 * 32].view(7, 4, 32), qkv[:, 4 * 32 : 6 * 32].view(7, 2, 32)
    before = qkv.clone()
    rk.apply_rope_(q, k, rope, torch.arange(7) + 3, backend=backend)
    assert torch.equal(q, rk.apply_rope(before[:, : 4 * 32].view(7, 4, 32), rope, torch.arange(7) + 3, backend=backend))
    assert torch.equal(qkv[:, 6 * 32 :], before[:, 6 * 32 :])  # v untouched


def _inplace_backends() -> list[str]:
    """The backends whose ``apply_rope_`` is an op that mutates its input (no copy back)."""
    return [name for name in _backends() if hasattr(get_backend(name), "rope_")]


@pytest.mark.parametrize("backend", _inplace_backends())
def test_inplace_op_declares_its_mutation(backend, monkeypatch):
    """The in-place rotation is one registered op that mutates ``x`` (opcheck: schema, fake, the
    mutation and aliasing declared); it writes into the views directly (no rotated copy is made), and
    ``torch.compile(fullgraph=True)`` keeps the writes into a packed buffer."""
    be = get_backend(backend)
    op = {"cpu": torch.ops.ropekern.apply_rope_}.get(backend) or torch.ops.ropekern_triton.apply_rope_
    rope = rk.RopeConfig(64, rotary_dim=32, scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32})  # fmt: skip
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 9, 3, 4, 64, generator=gen)
    pos = torch.randint(0, 5000, (2, 9), dtype=torch.int32, generator=gen)
    torch.library.opcheck(op, (qkv[:, :, 0], pos, *RopeArgs.of(rope, rope.tables()[1])))

    def no_copy(call):
        raise AssertionError("apply_rope_ made a rotated copy")

    monkeypatch.setattr(be, "rope", no_copy)
    before = qkv.clone()
    rk.apply_rope_(qkv[:, :, 0], qkv[:, :, 1], rope, pos, backend=backend)
    monkeypatch.undo()
    for i in (0, 1):
        assert torch.equal(qkv[:, :, i], rk.apply_rope(before[:, :, i], rope, pos, backend=backend))
    assert torch.equal(qkv[:, :, 2], before[:, :, 2])

    @torch.compile(fullgraph=True, backend="eager")
    def step(buf, positions):
        rk.apply_rope_(buf[:, :, 0], buf[:, :, 1], rope, positions, backend=backend)
        return buf.sum()

    compiled = before.clone()
    step(compiled, pos)
    assert torch.equal(compiled, qkv)


def test_inplace_refusals():
    rope = rk.RopeConfig(32)
    q, k = torch.randn(2, 5, 2, 32), torch.randn(2, 5, 1, 32)
    with pytest.raises(ValueError, match="`q` and `k` share memory"):
        rk.apply_rope_(q, q[:, :, :1], rope)
    with pytest.raises(ValueError, match="`k` must have the leading dimensions of `q`"):
        rk.apply_rope_(q, k[:, :4], rope)
    with pytest.raises(ValueError, match="`q` requires grad"):
        rk.apply_rope_(q.requires_grad_(), k, rope)
    with torch.no_grad():  # no graph is recorded: allowed
        rk.apply_rope_(q, k, rope)


def _flash_varlen_positions(cu: list[int], offsets: list[int]) -> torch.Tensor:
    """flash-attn's varlen rotary: token i of sequence b reads row ``seqlen_offsets[b] + i`` of cos/sin."""
    return torch.cat([torch.arange(b - a) + o for a, b, o in zip(cu, cu[1:], offsets)])


@pytest.mark.parametrize("backend", _backends())
def test_flash_attn_varlen_offsets(backend):
    rope = rk.RopeConfig(32, base=10000.0, interleaved=True)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(13, 2, 32, generator=gen)
    cu, offsets = [0, 3, 8, 13], [0, 5, 100]
    out = rk.apply_rope(x, rope, cu_seqlens=torch.tensor(cu, dtype=torch.int32), offsets=torch.tensor(offsets),
                        backend=backend)  # fmt: skip
    positions = _flash_varlen_positions(cu, offsets)
    assert torch.equal(out, rk.apply_rope(x, rope, positions, backend=backend))
    # the peer's formula (GPT-J pairs, as flash-attn's interleaved=True), fp64 and fp32
    angles = positions.to(F64)[:, None] * rope.inv_freq64()
    pairs = x.to(F64).view(13, 2, 16, 2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    oracle = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin), -1)
    angles32 = positions.float()[:, None] * rope.inv_freq64().float()
    p32, c32, s32 = x.view(13, 2, 16, 2), angles32.cos()[:, None], angles32.sin()[:, None]
    baseline = torch.stack((p32[..., 0] * c32 - p32[..., 1] * s32, p32[..., 1] * c32 + p32[..., 0] * s32), -1)
    assert error_check(out, oracle.view(13, 2, 32), baseline.view(13, 2, 32), torch.float32, factor=3.0).ok

    qkv = torch.randn(13, 3, 2, 32, generator=gen)
    before = qkv.clone()
    rk.apply_rope_(qkv[:, 0], qkv[:, 1], rope, cu_seqlens=torch.tensor(cu), offsets=torch.tensor(offsets),
                   backend=backend)  # fmt: skip
    assert torch.equal(qkv[:, 0], rk.apply_rope(before[:, 0], rope, positions, backend=backend))
    assert torch.equal(qkv[:, 2], before[:, 2])


@pytest.mark.parametrize("backend", _backends())
def test_varlen_length_dependent_law_scales_each_sequence(backend):
    """Dynamic NTK over packed sequences: each by its own length, as separate calls would be."""
    rope = rk.RopeConfig(32, scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    x = torch.randn(60, 2, 32, generator=torch.Generator().manual_seed(9))
    cu = [0, 10, 10, 60]  # a short sequence, an empty one, one past the trained 16
    out = rk.apply_rope(x, rope, cu_seqlens=torch.tensor(cu), backend=backend)
    for a, b in zip(cu, cu[1:]):
        assert torch.equal(out[a:b], rk.apply_rope(x[a:b], rope, backend=backend))
    one_table = rk.apply_rope(x, rope, _flash_varlen_positions(cu, [0, 0, 0]), backend=backend)
    assert not torch.equal(out[:10], one_table[:10])  # one table for all would scale the short one too


@pytest.mark.parametrize("backend", _backends())
def test_dense_offsets(backend):
    rope = rk.RopeConfig(16)
    x = torch.randn(3, 5, 1, 16, generator=torch.Generator().manual_seed(10))
    out = rk.apply_rope(x, rope, offsets=torch.tensor([0, 7, 2**20]), backend=backend)
    expected = rk.apply_rope(x, rope, torch.tensor([0, 7, 2**20])[:, None] + torch.arange(5), backend=backend)
    assert torch.equal(out, expected)


def test_varlen_argument_errors():
    rope, x = rk.RopeConfig(16), torch.randn(6, 1, 16)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="`cu_seqlens` goes with a packed x"):
        rk.apply_rope(x[None], rope, cu_seqlens=cu)
    with pytest.raises(ValueError, match="`positions` or `offsets`, not both"):
        rk.apply_rope(x, rope, torch.arange(6), offsets=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"`offsets` must have shape \(2,\)"):
        rk.apply_rope(x, rope, cu_seqlens=cu, offsets=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="`offsets` must be >= 0"):
        rk.apply_rope(x, rope, cu_seqlens=cu, offsets=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="`cu_seqlens` must end at the token count 6"):
        rk.apply_rope(x, rope, cu_seqlens=torch.tensor([0, 2, 5]))
