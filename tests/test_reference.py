"""The reference against an independent fp64 formulation, its properties, KV cache semantics."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ropekern as rk
from ropekern import reference

from cases import rope_kwargs_per_type

ROPES = rope_kwargs_per_type(8)  # head_dim 16


def make_rope(kind, head_dim=16, rotary_dim=None, interleaved=False, base=100.0):
    kw = dict(ROPES[kind])
    if kind == "longrope" and rotary_dim is not None:
        kw["scaling"] = dict(
            kw["scaling"], short_factor=[1.1] * (rotary_dim // 2), long_factor=[3.0] * (rotary_dim // 2)
        )
    return rk.RopeConfig(head_dim, base=base, rotary_dim=rotary_dim, interleaved=interleaved, **kw)


# ---------------------------------------------------------------- an independent formulation
def naive_rotate(x, pos, rope, seq_len):
    """Rotation as complex multiplication, fp64, channels >= R copied."""
    r = rope.rotary_dim
    inv = rope.inv_freq64(seq_len)
    theta = pos.double()[:, None] * inv[None]  # [S, R/2]
    z = torch.polar(torch.full_like(theta, rope.attention_factor), theta)[:, None, :]  # [S, 1, R/2]
    x = x.double()
    if rope.interleaved:
        c = torch.complex(x[..., 0:r:2], x[..., 1:r:2]) * z
        rot = torch.stack([c.real, c.imag], -1).flatten(-2)
    else:
        c = torch.complex(x[..., : r // 2], x[..., r // 2 : r]) * z
        rot = torch.cat([c.real, c.imag], -1)
    return torch.cat([rot, x[..., r:]], -1)


def naive_attention(q, k, v, rope, causal, q_pos, k_pos, scale=None):
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hkv, D]; full score matrix, repeated KV, einsum."""
    seq_len = int(k_pos.max()) + 1 if k_pos.numel() else 0
    qr, kr = naive_rotate(q, q_pos, rope, seq_len), naive_rotate(k, k_pos, rope, seq_len)
    g = q.shape[1] // k.shape[1]
    kr, vv = kr.repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.einsum("ihd,jhd->hij", qr, kr) * scale
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        mask = torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hij,jhd->ihd", p, vv)
    return out, lse


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("kind", list(ROPES))
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (5, 17), (17, 5), (13, 13)])
def test_dense_matches_naive(kind, interleaved, causal, sq, sk):
    hq, hkv, d = 4, 2, 16
    rotary = None if kind == "proportional" else 12
    rope = make_rope(kind, d, rotary, interleaved)
    q, k, v = rand(2, sq, hq, d, seed=1), rand(2, sk, hkv, d, seed=2), rand(2, sk, hkv, d, seed=3)
    out, lse = rk.rope_attention(q, k, v, rope, causal=causal, return_lse=True)
    for b in range(2):
        k_pos = torch.arange(sk)
        q_pos = (torch.arange(sq) + sk - sq).clamp_min(0)
        o, l_ = naive_attention(q[b], k[b], v[b], rope, causal, q_pos, k_pos)
        torch.testing.assert_close(out[b], o, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse[b], l_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["default", "dynamic", "longrope", "yarn"])
def test_explicit_repeated_and_jumping_positions(kind):
    rope = make_rope(kind)
    q, k, v = rand(2, 6, 2, 16, seed=4), rand(2, 9, 1, 16, seed=5), rand(2, 9, 1, 16, seed=6)
    k_pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 3, 3], [5, 6, 7, 1000, 1001, 1002, 40, 41, 42]])
    q_pos = torch.tensor([[3, 4, 5, 6, 6, 6], [1003, 7, 43, 0, 0, 99]])
    out = rk.rope_attention(q, k, v, rope, q_positions=q_pos, k_positions=k_pos, causal=True)
    for b in range(2):
        o, _ = naive_attention(q[b], k[b], v[b], rope, True, q_pos[b], k_pos[b])
        torch.testing.assert_close(out[b], o, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_per_sequence(causal):
    rope = make_rope("dynamic", interleaved=True)
    q_lens, k_lens = [3, 0, 7, 1], [5, 4, 7, 30]
    q, k, v = rand(sum(q_lens), 4, 16, seed=7), rand(sum(k_lens), 2, 16, seed=8), rand(sum(k_lens), 2, 16, seed=9)
    cu_q = torch.tensor([0, 3, 3, 10, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9, 16, 46], dtype=torch.int32)
    out, lse = rk.rope_attention(q, k, v, rope, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert lse.shape == (4, 11)
    for b in range(4):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, l_ = rk.rope_attention(q[qs][None], k[ks][None], v[ks][None], rope, causal=causal, return_lse=True)
        torch.testing.assert_close(out[qs], o[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[:, qs], l_[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- properties
def test_rotation_preserves_norm_and_identity_at_zero():
    rope = make_rope("yarn", 32, 24)
    x = rand(3, 11, 2, 32, seed=10)
    pos = torch.randint(0, 10**6, (3, 11))
    y = rk.apply_rope(x, rope, pos)
    af = rope.attention_factor
    r = rope.rotary_dim
    xr, yr = x[..., :r], y[..., :r]
    torch.testing.assert_close(yr.norm(dim=-1), xr.norm(dim=-1) * af, rtol=1e-12, atol=0)
    assert torch.equal(y[..., r:], x[..., r:])  # pass-through channels bit-exact
    rope1 = make_rope("default", 32, 24)
    y0 = rk.apply_rope(x, rope1, torch.zeros(3, 11, dtype=torch.int64))
    assert torch.equal(y0, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pass_through_bit_exact_low_precision(dtype):
    rope = make_rope("linear", 64, 16)
    x = rand(2, 9, 3, 64, seed=11, dtype=dtype)
    y = rk.apply_rope(x, rope, torch.randint(0, 5000, (2, 9)))
    assert y.dtype == dtype and torch.equal(y[..., 16:], x[..., 16:])


def test_relative_position_property():
    """<R(m) q, R(n) k> depends only on m - n for default RoPE."""
    rope = rk.RopeConfig(16, base=10000.0)
    q, k = rand(1, 1, 1, 16, seed=12), rand(1, 1, 1, 16, seed=13)
    dots = []
    for m in (5, 1005, 123456, 2**22):
        qm = rk.apply_rope(q, rope, torch.tensor([[m]]))
        kn = rk.apply_rope(k, rope, torch.tensor([[m - 3]]))
        dots.append(float((qm * kn).sum()))
    assert max(dots) - min(dots) < 1e-9


def test_inputs_not_modified_and_deterministic():
    rope = make_rope("llama3")
    q, k, v = rand(2, 8, 4, 16, seed=14), rand(2, 8, 2, 16, seed=15), rand(2, 8, 2, 16, seed=16)
    copies = [t.clone() for t in (q, k, v)]
    a = rk.rope_attention(q, k, v, rope, causal=True)
    b = rk.rope_attention(q, k, v, rope, causal=True)
    assert torch.equal(a, b)
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t, c)


def test_batch_invariance():
    rope = make_rope("dynamic")
    q, k, v = rand(3, 7, 2, 16, seed=17), rand(3, 30, 2, 16, seed=18), rand(3, 30, 2, 16, seed=19)
    full = rk.rope_attention(q, k, v, rope, causal=True)
    for b in range(3):
        single = rk.rope_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], rope, causal=True)
        assert torch.equal(full[b : b + 1], single)


def test_v_is_not_rotated():
    """With q = 0 the attention is uniform: the output is the plain mean of V."""
    rope = make_rope("default")
    v = rand(1, 6, 1, 16, seed=20)
    out = rk.rope_attention(torch.zeros(1, 2, 1, 16, dtype=torch.float64), rand(1, 6, 1, 16, seed=21), v, rope)
    torch.testing.assert_close(out[0, 0, 0], v[0, :, 0].mean(0), rtol=1e-12, atol=1e-12)


def test_rows_without_keys():
    rope = make_rope("default")
    q, k, v = rand(1, 5, 2, 16), rand(1, 2, 2, 16), rand(1, 2, 2, 16)
    out, lse = rk.rope_attention(q, k, v, rope, causal=True, return_lse=True)  # Sq > Sk: first 3 rows see nothing
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isneginf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()
    assert not out.isnan().any()
    out, lse = rk.rope_attention(q, k[:, :0], v[:, :0], rope, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_chunked_attention_equals_single_chunk(monkeypatch):
    rope = make_rope("yarn")
    q, k, v = rand(1, 37, 4, 16, seed=22), rand(1, 41, 2, 16, seed=23), rand(1, 41, 2, 16, seed=24)
    whole = rk.rope_attention(q, k, v, rope, causal=True)
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 4 * 41 * 3)  # 3 query rows per chunk
    torch.testing.assert_close(rk.rope_attention(q, k, v, rope, causal=True), whole, rtol=1e-13, atol=1e-13)


def test_low_precision_io_computes_in_fp32():
    rope = make_rope("default")
    q, k, v = (rand(1, 9, 2, 16, seed=s, dtype=torch.bfloat16) for s in (25, 26, 27))
    out, lse = rk.rope_attention(q, k, v, rope, causal=True, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    exact = rk.rope_attention(q.double(), k.double(), v.double(), rope, causal=True)
    assert (out.double() - exact).abs().max() < 2e-2


def test_gradcheck_fp64():
    rope = make_rope("yarn", 8, 6, interleaved=True)
    q, k, v = (rand(1, n, h, 8, seed=s).requires_grad_() for n, h, s in ((3, 2, 28), (4, 1, 29), (4, 1, 30)))
    assert torch.autograd.gradcheck(lambda q, k, v: rk.rope_attention(q, k, v, rope, causal=True), (q, k, v))


# ---------------------------------------------------------------- KV cache
def _cache_case(paged, seed=0, lens=(0, 5, 17), s_new=3, sq=3, smax=32, block=8):
    gen = torch.Generator().manual_seed(seed)
    b, hkv, hq, d = len(lens), 2, 4, 16
    q = torch.randn(b, sq, hq, d, generator=gen, dtype=torch.float64)
    k_new = torch.randn(b, s_new, hkv, d, generator=gen, dtype=torch.float64)
    v_new = torch.randn(b, s_new, hkv, d, generator=gen, dtype=torch.float64)
    k_full = torch.randn(b, smax, hkv, d, generator=gen, dtype=torch.float64)
    v_full = torch.randn(b, smax, hkv, d, generator=gen, dtype=torch.float64)
    for i, n in enumerate(lens):  # unused slots hold NaN: they must never leak
        k_full[i, n:] = float("nan")
        v_full[i, n:] = float("nan")
    if not paged:
        return q, k_full, v_full, k_new, v_new, None, k_full.clone(), v_full.clone()
    nblk = smax // block
    perm = torch.randperm(b * nblk, generator=gen)
    table = perm.view(b, nblk).to(torch.int32)
    kc = torch.full((b * nblk, block, hkv, d), float("nan"), dtype=torch.float64)
    vc = kc.clone()
    for i in range(b):
        for j in range(nblk):
            kc[table[i, j]] = k_full[i, j * block : (j + 1) * block]
            vc[table[i, j]] = v_full[i, j * block : (j + 1) * block]
    return q, kc, vc, k_new, v_new, table, k_full.clone(), v_full.clone()


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kind", ["default", "dynamic", "longrope", "yarn"])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_equals_full_recompute(paged, kind, causal):
    rope = make_rope(kind)
    lens = (0, 5, 17)
    q, kc, vc, k_new, v_new, table, k_full, v_full = _cache_case(paged, lens=lens)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = rk.rope_attention_with_kvcache(
        q,
        kc,
        vc,
        rope,
        cache_seqlens=seqlens,
        k_new=k_new,
        v_new=v_new,
        block_table=table,
        causal=causal,
        return_lse=True,
    )
    assert torch.equal(seqlens, torch.tensor(lens, dtype=torch.int32))  # not modified
    assert not out.isnan().any()
    for b, n0 in enumerate(lens):
        n = n0 + 3
        k = torch.cat([k_full[b, :n0], k_new[b]])[None]
        v = torch.cat([v_full[b, :n0], v_new[b]])[None]
        o, l_ = rk.rope_attention(q[b : b + 1], k, v, rope, causal=causal, return_lse=True)
        torch.testing.assert_close(out[b : b + 1], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[b : b + 1], l_, rtol=1e-12, atol=1e-12)
        # the append happened in place, un-rotated
        if paged:
            idx = torch.arange(n0, n)
            got = kc[table[b].long()[idx // 8], idx % 8]
        else:
            got = kc[b, n0:n]
        assert torch.equal(got, k_new[b])


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_growing_sequence_stays_exact_across_switch(kind):
    """Decoding token by token across the scaling switch equals recomputing the whole prefix,
    while caching *rotated* keys (what serving stacks do) does not."""
    rope = make_rope(kind)
    switch = 24 if kind == "dynamic" else 20
    total, d = switch + 6, 16
    gen = torch.Generator().manual_seed(3)
    ks = torch.randn(1, total, 1, d, generator=gen, dtype=torch.float64)
    vs = torch.randn(1, total, 1, d, generator=gen, dtype=torch.float64)
    qs = torch.randn(1, total, 2, d, generator=gen, dtype=torch.float64)
    kc, vc = torch.zeros(1, total, 1, d, dtype=torch.float64), torch.zeros(1, total, 1, d, dtype=torch.float64)
    rotated_cache = torch.zeros(1, total, 1, d, dtype=torch.float64)
    worst_rotated = 0.0
    for t in range(total):
        out = rk.rope_attention_with_kvcache(
            qs[:, t : t + 1],
            kc,
            vc,
            rope,
            cache_seqlens=torch.tensor([t]),
            k_new=ks[:, t : t + 1],
            v_new=vs[:, t : t + 1],
        )
        full = rk.rope_attention(qs[:, : t + 1], ks[:, : t + 1], vs[:, : t + 1], rope, causal=True)[:, -1:]
        torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
        # the rotated-cache way: each key rotated once, with the table of the length at its append
        rotated_cache[:, t] = rk.apply_rope(ks[:, t : t + 1], rope, torch.tensor([[t]]), seq_len=t + 1)[:, 0]
        qr = rk.apply_rope(qs[:, t : t + 1], rope, torch.tensor([[t]]), seq_len=t + 1)
        s = torch.einsum("bqhd,bkhd->bhqk", qr, rotated_cache[:, : t + 1].expand(-1, -1, 2, -1)) * d**-0.5
        stale = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vs[:, : t + 1].expand(-1, -1, 2, -1))
        worst_rotated = max(worst_rotated, float((stale - full).abs().max()))
    assert worst_rotated > 1e-3, "caching rotated keys should be visibly wrong past the switch"


def test_kvcache_without_new_tokens_and_paged_equals_dense():
    rope = make_rope("linear")
    q, kc, vc, _, _, table, k_full, v_full = _cache_case(True, lens=(4, 9, 16), s_new=0)
    seqlens = torch.tensor([4, 9, 16], dtype=torch.int32)
    paged = rk.rope_attention_with_kvcache(q, kc, vc, rope, cache_seqlens=seqlens, block_table=table)
    dense = rk.rope_attention_with_kvcache(q, k_full, v_full, rope, cache_seqlens=seqlens)
    torch.testing.assert_close(paged, dense, rtol=0, atol=0)


# ---------------------------------------------------------------- fuzzing
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3),
    sq=st.integers(1, 9),
    sk=st.integers(1, 9),
    hkv=st.integers(1, 3),
    g=st.integers(1, 3),
    half=st.integers(1, 4),
    extra=st.integers(0, 2),
    interleaved=st.booleans(),
    causal=st.booleans(),
    kind=st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_naive(b, sq, sk, hkv, g, half, extra, interleaved, causal, kind, seed):
    r = 2 * half + (2 if kind == "dynamic" and half == 1 else 0)
    d = r + 2 * extra
    rope = make_rope(kind, d, r, interleaved)
    q, k, v = rand(b, sq, hkv * g, d, seed=seed), rand(b, sk, hkv, d, seed=seed + 1), rand(b, sk, hkv, d, seed=seed + 2)
    out, lse = rk.rope_attention(q, k, v, rope, causal=causal, return_lse=True)
    for i in range(b):
        o, l_ = naive_attention(
            q[i], k[i], v[i], rope, causal, (torch.arange(sq) + sk - sq).clamp_min(0), torch.arange(sk)
        )
        torch.testing.assert_close(out[i], o, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(lse[i], l_, rtol=1e-9, atol=1e-11)
