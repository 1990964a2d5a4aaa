"""Caller-supplied cos/sin tables (``rk.RopeTable``) on every entry point and every backend here.

The table used is not a law's: each row is a law's cos/sin times ``1 + 0.1 * noise`` (a "learned"
table), so a kernel that fell back to computing angles would fail. Every op is compared with the
fp64 reference on the same table under the error-ratio rule (docs/design.md §5); gradients with
factor 3 against fp64 autograd through the reference.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import (
    baseline_attention,
    baseline_kvcache,
    baseline_rope,
    error_check,
    oracle_attention,
    oracle_kvcache,
    oracle_rope,
    random_qkv,
)

BACKENDS = [name for name, ok in rk.available_backends().items() if ok is True]
P = 96  # table positions


def learned_table(head_dim: int = 64, rotary_dim: int | None = None, interleaved: bool = False, rows: int = P):
    """A table no law gives: YaRN's cos/sin, each entry times ``1 + 0.1 * noise`` (fixed seed)."""
    r = rotary_dim or head_dim
    law = rk.RopeConfig(
        head_dim, rotary_dim=r, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    )
    cos, sin = law.cos_sin(torch.arange(rows))
    gen = torch.Generator().manual_seed(1)
    jitter = 1 + 0.1 * torch.randn(2, rows, r // 2, generator=gen)
    return rk.RopeTable((cos * jitter[0], sin * jitter[1]), head_dim=head_dim, interleaved=interleaved)


TABLES = {
    "half": lambda: learned_table(),
    "interleaved": lambda: learned_table(interleaved=True),
    "partial": lambda: learned_table(rotary_dim=32),
}


def _check(out, oracle, baseline, what, factor=2.0):
    res = error_check(out, oracle, baseline, factor=factor)
    assert res.ok, f"{what}: {res}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention(backend, table, dtype):
    rope = TABLES[table]()
    q, k, v, _ = random_qkv(2, 37, 37, 4, 2, 64, dtype=dtype, seed=3)
    for kwargs in (
        {"causal": True},
        {"causal": False, "q_positions": torch.tensor([[5, 5, 90, 0, 36]] * 2), "k_positions": None},
    ):
        qq = q if "q_positions" not in kwargs else q[:, :5]
        kwargs = {key: val for key, val in kwargs.items() if val is not None}
        out, lse = rk.rope_attention(qq, k, v, rope, return_lse=True, backend=backend, **kwargs)
        o64, l64 = oracle_attention(qq, k, v, rope, **kwargs)
        ob, lb = baseline_attention(qq, k, v, rope, **kwargs)
        _check(out, o64, ob, f"out {kwargs}")
        _check(lse, l64, lb, f"lse {kwargs}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen(backend):
    rope = TABLES["half"]()
    q, k, v, extra = random_qkv(0, 0, 0, 4, 2, 64, seed=4, varlen_lengths=([3, 20, 1], [10, 25, 40]))
    out, lse = rk.rope_attention(q, k, v, rope, causal=True, return_lse=True, backend=backend, **extra)
    o64, l64 = oracle_attention(q, k, v, rope, causal=True, **extra)
    ob, lb = baseline_attention(q, k, v, rope, causal=True, **extra)
    _check(out, o64, ob, "out")
    _check(lse, l64, lb, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("table", ["half", "partial"])
def test_kvcache(backend, paged, table):
    rope = TABLES[table]()
    b, smax, hkv, d, sq = 2, 64, 2, 64, 2
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn(b, smax, hkv, d, generator=gen) for _ in range(2))
    q = torch.randn(b, sq, 4, d, generator=gen)
    k_new, v_new = (torch.randn(b, sq, hkv, d, generator=gen) for _ in range(2))
    kwargs = {"cache_seqlens": torch.tensor([30, 61], dtype=torch.int32), "k_new": k_new, "v_new": v_new}
    if paged:
        bs = 16
        k_cache, v_cache = (c.reshape(b * smax // bs, bs, hkv, d) for c in (k_cache, v_cache))
        perm = torch.randperm(b * smax // bs, generator=gen).to(torch.int32)
        kwargs["block_table"] = perm.reshape(b, smax // bs)
    o64, l64 = oracle_kvcache(q, k_cache, v_cache, rope, **kwargs)
    ob, lb = baseline_kvcache(q, k_cache, v_cache, rope, **kwargs)
    out, lse = rk.rope_attention_with_kvcache(q, k_cache, v_cache, rope, return_lse=True, backend=backend, **kwargs)
    _check(out, o64, ob, "out")
    _check(lse, l64, lb, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table", TABLES)
def test_apply_rope_and_in_place(backend, table):
    rope = TABLES[table]()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 33, 3, 64, generator=gen)
    pos = torch.randint(0, P, (2, 33), generator=gen)
    _check(rk.apply_rope(x, rope, pos, backend=backend), oracle_rope(x, rope, pos), baseline_rope(x, rope, pos), "x")
    # a packed [T, 3, H, D] qkv buffer rotated in place, with cu_seqlens and offsets
    qkv = torch.randn(30, 3, 2, 64, generator=gen)
    cu, offsets = torch.tensor([0, 12, 30], dtype=torch.int32), torch.tensor([0, 70])
    want = [oracle_rope(qkv[:, i], rope, torch.cat((torch.arange(12), torch.arange(18) + 70))) for i in range(2)]
    v_before = qkv[:, 2].clone()
    rk.apply_rope_(qkv[:, 0], qkv[:, 1], rope, cu_seqlens=cu, offsets=offsets, backend=backend)
    for i in range(2):
        err = (qkv[:, i].double() - want[i]).abs().max().item()
        assert err < 2e-6, (i, err)
    assert torch.equal(qkv[:, 2], v_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table", ["half", "interleaved"])
def test_backward(backend, table):
    rope = TABLES[table]()
    q, k, v, _ = random_qkv(1, 21, 29, 4, 2, 64, seed=7)
    do = torch.randn_like(q)

    def grads(dtype, run):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        run(*leaves).backward(do.to(dtype))
        return [t.grad for t in leaves]

    got = grads(torch.float32, lambda *t: rk.rope_attention(*t, rope, causal=True, backend=backend))
    want = grads(torch.float64, lambda *t: rk.reference.rope_attention(*t, rope, causal=True))
    base = grads(torch.float32, lambda *t: rk.reference.rope_attention(*t, rope, causal=True))
    for name, g, w, b in zip("qkv", got, want, base):
        _check(g, w, b, f"d{name}", factor=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_law_as_a_table_gives_the_law(backend):
    """The table of a law (YaRN, with its attention factor) gives the law's result to fp32 rounding
    of cos/sin: the two paths differ only by how cos/sin reach the kernel."""
    law = rk.RopeConfig(64, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    rope = rk.RopeTable(law.cos_sin(torch.arange(P)), head_dim=64)
    q, k, v, _ = random_qkv(2, 40, 40, 4, 2, 64, seed=8)
    a = rk.rope_attention(q, k, v, law, causal=True, backend=backend)
    t = rk.rope_attention(q, k, v, rope, causal=True, backend=backend)
    assert (a - t).abs().max().item() < 1e-5


def test_callable_table_is_built_per_batch_length():
    """A callable is called with the call's scaling length: ``seq_len=``, else ``max(k_positions) + 1``
    over the whole batch (transformers' rule), and its tables are reused per length."""
    law = rk.RopeConfig(64, scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32)
    asked = []

    def build(n):
        asked.append(n)
        return law.cos_sin(torch.arange(n), seq_len=n)

    rope = rk.RopeTable(build, head_dim=64, rotary_dim=64)
    q, k, v, _ = random_qkv(2, 50, 50, 4, 2, 64, seed=9)
    kpos = torch.stack((torch.arange(50), torch.arange(50) + 10))
    out = rk.rope_attention(q, k, v, rope, causal=True, k_positions=kpos, q_positions=kpos)
    assert asked == [60]
    rk.rope_attention(q, k, v, rope, causal=True, k_positions=kpos, q_positions=kpos)
    assert asked == [60]
    want = rk.rope_attention(q, k, v, law, causal=True, k_positions=kpos, q_positions=kpos, seq_len=60)
    assert (out - want).abs().max().item() < 1e-5
    rk.rope_attention(q, k, v, rope, causal=True, seq_len=70)
    assert asked == [60, 70]


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_past_the_table_are_refused(backend):
    rope = learned_table(rows=40)
    q, k, v, _ = random_qkv(1, 41, 41, 2, 2, 64)
    with pytest.raises(ValueError, match="position 40 is past the end of the `rope` table"):
        rk.rope_attention(q, k, v, rope, backend=backend)
    with pytest.raises(ValueError, match="position 40"):
        rk.apply_rope(q, rope, backend=backend)
    with pytest.raises(ValueError, match="position 40"):
        rk.apply_rope_(q.clone(), None, rope, backend=backend)
    cache = torch.zeros(1, 64, 2, 64)
    with pytest.raises(ValueError, match="position 40"):
        rk.rope_attention_with_kvcache(
            q[:, :1], cache, cache.clone(), rope, cache_seqlens=torch.tensor([41], dtype=torch.int32), backend=backend
        )
    rk.rope_attention(q[:, :40], k[:, :40], v[:, :40], rope, backend=backend)  # the last row is in


def test_bad_tables_name_the_argument():
    cos = torch.ones(8, 16)
    with pytest.raises(TypeError, match="cos_sin"):
        rk.RopeTable(cos, head_dim=64)
    with pytest.raises(ValueError, match="rotary_dim"):
        rk.RopeTable((torch.ones(8, 40), torch.ones(8, 40)), head_dim=64)
    with pytest.raises(ValueError, match=r"shape \[P >= 1, rotary_dim / 2 = 16\]"):
        rk.RopeTable((cos, torch.ones(8, 15)), head_dim=64, rotary_dim=32)
    with pytest.raises(ValueError, match="cos and sin differ"):
        rk.RopeTable((cos, torch.ones(9, 16)), head_dim=64)
    with pytest.raises(TypeError, match="float tensor"):
        rk.RopeTable((cos, torch.ones(8, 16, dtype=torch.int32)), head_dim=64)
    with pytest.raises(ValueError, match="rotary_dim"):
        rk.RopeTable(lambda n: (cos, cos), head_dim=64)
    with pytest.raises(TypeError, match="head_dim"):
        rk.RopeTable((cos, cos), head_dim="64")
    rope = rk.RopeTable(lambda n: (cos, cos), head_dim=64, rotary_dim=64)
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(ValueError, match=r"cos_sin\(4\)"):
        rk.apply_rope(q, rope)
    with pytest.raises(ValueError, match="head dim 32"):
        rk.apply_rope(torch.randn(1, 4, 1, 32), rk.RopeTable((cos, cos), head_dim=64))
