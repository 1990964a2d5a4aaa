"""The native CPU backend (csrc/cpu, ropekern/backends/native.py) against the fp64 reference.

Every comparison uses the error-ratio rule of docs/design.md §5 (``ropekern.testing.error_check``); the
core sweeps run on every kernel unit the machine runs (AVX-512, AVX2, generic; forced by ROPEKERN_CPU_ISA).
"""

import math

import pytest
import torch

import ropekern as rk
from ropekern import backends, reference
from ropekern._validation import attention_call, kvcache_call, rope_call
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

native = pytest.importorskip("ropekern.backends.native")
if native.cpu_backend.unavailable():
    pytest.skip(native.cpu_backend.unavailable(), allow_module_level=True)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _isa_available(isa: str) -> bool:
    import os

    old = os.environ.get("ROPEKERN_CPU_ISA")
    os.environ["ROPEKERN_CPU_ISA"] = isa
    try:
        return native.cpu_isa() == isa
    except (ValueError, RuntimeError):
        return False
    finally:
        if old is None:
            del os.environ["ROPEKERN_CPU_ISA"]
        else:
            os.environ["ROPEKERN_CPU_ISA"] = old


ISAS = [isa for isa in ("amx", "avx512", "avx2", "neon", "generic") if _isa_available(isa)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("ROPEKERN_CPU_ISA", request.param)
    assert native.cpu_isa() == request.param
    return request.param


def make_rope(kind, head_dim=64, rotary_dim=None, interleaved=False, orig=24):
    r = rotary_dim or head_dim
    scaling = {
        "default": None,
        "linear": {"rope_type": "linear", "factor": 4.0},
        "ntk": {"rope_type": "ntk", "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "factor": 4.0},
        "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": orig},
        "longrope": {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(r // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(r // 2)],
            "original_max_position_embeddings": orig,
        },
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": orig,
        },
        "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5},
    }[kind]
    if kind == "proportional":
        rotary_dim = None
    mpe = orig if kind == "dynamic" else None
    return rk.RopeConfig(
        head_dim,
        base=500.0,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        scaling=scaling,
        max_position_embeddings=mpe,
    )


def check(out, oracle, baseline, dtype, what):
    res = error_check(out, oracle, baseline, dtype)
    assert res.ok, f"{what}: {res}"
    return res


def check_attention(q, k, v, rope, **kw):
    out, lse = rk.rope_attention(q, k, v, rope, backend="cpu", return_lse=True, **kw)
    o_ref, l_ref = oracle_attention(q, k, v, rope, **kw)
    o_base, l_base = baseline_attention(q, k, v, rope, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == F32
    check(out, o_ref, o_base, q.dtype, "out")
    check(lse, l_ref, l_base.float(), F32, "lse")
    return out, lse


# ---------------------------------------------------------------- forward sweep
# (batch, sq, sk, hq, hkv, d, rotary_dim, interleaved, causal, dtype, scaling)
SWEEP = [
    (2, 17, 17, 4, 2, 64, None, False, True, F32, "default"),
    (1, 113, 113, 4, 1, 80, None, True, True, BF16, "yarn"),
    (2, 129, 129, 6, 2, 96, None, False, False, F16, "llama3"),
    (1, 1, 129, 8, 2, 128, None, False, True, F32, "longrope"),
    (1, 129, 17, 4, 4, 128, 64, False, True, BF16, "linear"),
    (2, 17, 113, 2, 1, 256, None, True, False, F32, "dynamic"),
    (1, 113, 129, 4, 2, 64, 32, True, True, F16, "ntk"),
    (1, 33, 40, 3, 1, 80, None, False, True, F32, "proportional"),
    (2, 1, 1, 4, 2, 64, None, True, False, BF16, "default"),
    (1, 40, 65, 2, 2, 20, 10, False, True, F32, "default"),  # R/2 = 5 and D = 20: scalar tails
    (1, 40, 65, 2, 1, 20, 12, True, False, F16, "yarn"),
    (1, 300, 300, 8, 2, 64, None, False, True, F32, "default"),  # several query and key blocks
    (2, 30, 70, 16, 1, 64, None, True, True, BF16, "llama3"),  # MQA: 16 query heads share one KV head
]


@pytest.mark.parametrize("case", SWEEP, ids=[f"{c[9]}-{c[10]}-{c[1]}x{c[2]}-d{c[5]}" for c in SWEEP])
def test_attention_sweep(isa, case):
    b, sq, sk, hq, hkv, d, r, il, causal, dtype, kind = case
    rope = make_rope(kind, d, r, il)
    q, k, v, _ = random_qkv(b, sq, sk, hq, hkv, d, dtype, seed=sq * 7 + sk)
    check_attention(q, k, v, rope, causal=causal)


@pytest.mark.skipif("amx" not in ISAS, reason="this CPU or OS runs no AMX-BF16 tiles")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_amx_tiles_hold_the_rule(monkeypatch, d, causal):
    """bf16 inputs with D a multiple of 32 take the tile products (Q, K and P rounded to bf16): the
    result differs from the avx512 unit's (so the tiles ran) and holds the rule; with D = 80 the
    unit falls back to the avx512 code, bit for bit."""
    rope = make_rope("yarn", d)
    q, k, v, _ = random_qkv(1, 333, 333, 8, 2, d, BF16, seed=d)
    monkeypatch.setenv("ROPEKERN_CPU_ISA", "amx")
    check_attention(q, k, v, rope, causal=causal)
    tiles = rk.rope_attention(q, k, v, rope, causal=causal, backend="cpu")
    monkeypatch.setenv("ROPEKERN_CPU_ISA", "avx512")
    assert not torch.equal(tiles, rk.rope_attention(q, k, v, rope, causal=causal, backend="cpu"))
    q, k, v, _ = random_qkv(1, 100, 100, 4, 2, 80, BF16, seed=80)
    rope = make_rope("default", 80)
    vector = rk.rope_attention(q, k, v, rope, causal=causal, backend="cpu")
    monkeypatch.setenv("ROPEKERN_CPU_ISA", "amx")
    assert torch.equal(vector, rk.rope_attention(q, k, v, rope, causal=causal, backend="cpu"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_varlen(isa, causal, dtype):
    rope = make_rope("dynamic", 64)
    lens = ([17, 0, 113, 1, 5], [17, 9, 129, 1, 0])  # empty query and empty key sequences
    q, k, v, extra = random_qkv(0, 0, 0, 4, 2, 64, dtype, seed=5, varlen_lengths=lens)
    out, lse = check_attention(q, k, v, rope, causal=causal, **extra)
    assert lse.shape == (4, sum(lens[0]))
    # the sequence with no keys: zeros and LSE -inf
    s = slice(sum(lens[0][:4]), sum(lens[0][:5]))
    assert torch.equal(out[s], torch.zeros_like(out[s])) and bool((lse[:, s] == -math.inf).all())


def test_varlen_equals_dense_per_sequence():
    rope = make_rope("longrope", 64)
    lens = ([7, 30], [40, 30])
    q, k, v, extra = random_qkv(0, 0, 0, 4, 2, 64, F32, seed=2, varlen_lengths=lens)
    out = rk.rope_attention(q, k, v, rope, causal=True, backend="cpu", **extra)
    for i, (q0, k0) in enumerate(((0, 0), (7, 40))):
        nq, nk = lens[0][i], lens[1][i]
        one = rk.rope_attention(
            q[None, q0 : q0 + nq], k[None, k0 : k0 + nk], v[None, k0 : k0 + nk], rope, causal=True, backend="cpu"
        )
        assert torch.equal(out[q0 : q0 + nq], one[0])


def test_explicit_repeated_and_jumping_positions(isa):
    rope = make_rope("yarn", 64)
    q, k, v, _ = random_qkv(2, 24, 40, 4, 2, 64, F32, seed=11)
    # Parallel Context Windows: two windows sharing positions 0..19; the queries jump to 5000.
    k_pos = torch.cat([torch.arange(20), torch.arange(20)]).expand(2, 40)
    q_pos = (5000 + torch.arange(24)).expand(2, 24)
    check_attention(q, k, v, rope, causal=True, q_positions=q_pos, k_positions=k_pos)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_positions_near_2_20(isa, dtype):
    rope = make_rope("default", 128)
    q, k, v, _ = random_qkv(1, 16, 48, 4, 1, 128, dtype, seed=3)
    base = 2**20 - 30
    kw = dict(
        causal=True, q_positions=(base + 32 + torch.arange(16))[None], k_positions=(base + torch.arange(48))[None]
    )
    out, _ = check_attention(q, k, v, rope, **kw)
    if dtype == F32:
        # fp32 angles are off by ~0.06 rad here; the accurate angles are not: the kernel's error is
        # fp32 rounding, two orders below the baseline's.
        o_ref, _ = oracle_attention(q, k, v, rope, **kw)
        o_base, _ = baseline_attention(q, k, v, rope, **kw)
        err, base_err = float((out.double() - o_ref).abs().max()), float((o_base.double() - o_ref).abs().max())
        assert err < 1e-5 and err < base_err / 100, (err, base_err)


def test_strided_views_of_packed_qkv(isa):
    rope = make_rope("llama3", 64, interleaved=True)
    qkv = torch.randn(2, 50, 4 + 2 + 2, 64)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    check_attention(q, k, v, rope, causal=True)
    packed = torch.randn(70, 8, 64)  # varlen packed buffer
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    check_attention(packed[:, :4], packed[:, 4:6], packed[:, 6:], rope, causal=False, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_kernel_without_keys():
    """The op called directly with no keys (``rope_attention`` answers such calls without it)."""
    rope = make_rope("default", 64)
    q, k, v, _ = random_qkv(1, 3, 0, 4, 2, 64)
    call = attention_call(q, k, v, rope)
    out, lse = torch.ops.ropekern.fwd(*call.op_args())
    assert not out.any() and bool((lse == -math.inf).all())


def test_exact_properties():
    rope = make_rope("dynamic", 64)
    q, k, v, _ = random_qkv(3, 70, 90, 4, 2, 64, BF16, seed=4)
    copies = [t.clone() for t in (q, k, v)]
    out = rk.rope_attention(q, k, v, rope, causal=True, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies)), "inputs modified"
    assert torch.equal(out, rk.rope_attention(q, k, v, rope, causal=True, backend="cpu")), "not deterministic"
    for b in range(3):  # batch invariance: each sequence alone gives the same bits
        one = rk.rope_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], rope, causal=True, backend="cpu")
        assert torch.equal(out[b : b + 1], one)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(out, rk.rope_attention(q, k, v, rope, causal=True, backend="cpu"))
    finally:
        torch.set_num_threads(threads)


def test_position_zero_is_plain_attention():
    """Every position 0: rotation is the identity up to attention_factor**2 on the scores, so with
    the scale compensating it equals the same kernel run without rotation (``call.rotate``)."""
    rope = make_rope("yarn", 64)
    q, k, v, _ = random_qkv(1, 20, 20, 4, 2, 64, F32, seed=8)
    zeros = torch.zeros(1, 20, dtype=torch.int64)
    af2 = rope.attention_factor**2
    rot = rk.rope_attention(
        q, k, v, rope, q_positions=zeros, k_positions=zeros, softmax_scale=64**-0.5 / af2, backend="cpu"
    )
    call = attention_call(q, k, v, rope)
    call.rotate = False
    plain, _ = native.cpu_backend.attention(call)
    assert float((rot - plain).abs().max()) < 1e-5


# ---------------------------------------------------------------- decode (KV cache)
def cache_case(b, lens, s_new, sq, hq, hkv, d, dtype, paged, block=16, smax=None, seed=0):
    """Caches whose unused slots hold NaN (they must never be read) and the matching k_new/v_new."""
    gen = torch.Generator().manual_seed(seed)
    smax = smax or (max(lens) + s_new + 5)
    smax = -(-smax // block) * block
    q = torch.randn(b, sq, hq, d, generator=gen).to(dtype)
    k_new = torch.randn(b, s_new, hkv, d, generator=gen).to(dtype) if s_new else None
    v_new = torch.randn(b, s_new, hkv, d, generator=gen).to(dtype) if s_new else None
    kf = torch.full((b, smax, hkv, d), float("nan"), dtype=dtype)
    vf = kf.clone()
    for i, n in enumerate(lens):
        kf[i, :n] = torch.randn(n, hkv, d, generator=gen).to(dtype)
        vf[i, :n] = torch.randn(n, hkv, d, generator=gen).to(dtype)
    if not paged:
        return q, kf, vf, k_new, v_new, None
    nblk = smax // block
    perm = torch.randperm(b * nblk + 3, generator=gen)[: b * nblk]  # 3 blocks nobody uses (NaN)
    table = perm.view(b, nblk).to(torch.int32)
    kc = torch.full((b * nblk + 3, block, hkv, d), float("nan"), dtype=dtype)
    vc = kc.clone()
    for i in range(b):
        for j in range(nblk):
            kc[table[i, j]] = kf[i, j * block : (j + 1) * block]
            vc[table[i, j]] = vf[i, j * block : (j + 1) * block]
    return q, kc, vc, k_new, v_new, table


def check_kvcache(q, kc, vc, rope, **kw):
    o_ref, l_ref = oracle_kvcache(q, kc, vc, rope, **kw)
    o_base, l_base = baseline_kvcache(q, kc, vc, rope, **kw)
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = rk.rope_attention_with_kvcache(q, kc, vc, rope, backend="cpu", return_lse=True, **kw)
    assert not out.isnan().any(), "NaN from an unused cache slot leaked"
    check(out, o_ref, o_base, q.dtype, "out")
    check(lse, l_ref, l_base.float(), F32, "lse")
    # the append happened in place, un-rotated; nothing else in the caches changed
    want_k, want_v = kc0.clone(), vc0.clone()
    call = kvcache_call(q, want_k, want_v, rope, **{a: b for a, b in kw.items() if a != "causal"})
    reference.append_kv(call)
    assert torch.equal(kc.nan_to_num(7.0), want_k.nan_to_num(7.0)) and torch.equal(
        vc.nan_to_num(7.0), want_v.nan_to_num(7.0)
    )
    return out, lse


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize(
    "sq,s_new,causal,dtype",
    [(1, 1, True, F32), (1, 0, True, BF16), (3, 3, True, F16), (4, 2, False, F32), (40, 40, True, BF16)],
)
def test_kvcache(isa, paged, sq, s_new, causal, dtype):
    """Dense and paged caches, decode (Sq G <= 64: split-K kernel) and chunked prefill (tiled)."""
    rope = make_rope("default", 64)
    lens = [45, 5, 700] if sq <= 4 else [45, 0, 70]  # 700 keys: the decode kernel splits them (split-K)
    q, kc, vc, k_new, v_new, table = cache_case(3, lens, s_new, sq, 8, 2, 64, dtype, paged, seed=sq)
    check_kvcache(
        q,
        kc,
        vc,
        rope,
        cache_seqlens=torch.tensor(lens, dtype=torch.int32),
        k_new=k_new,
        v_new=v_new,
        block_table=table,
        causal=causal,
    )


@pytest.mark.parametrize("d", [20, 40, 72])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_kvcache_head_dims_off_16(isa, d, dtype):
    """Head dims that are not multiples of 16 take the decode kernel's V-copy path (P.V reads V in
    place from the cache only when D % 16 == 0)."""
    rope = make_rope("default", d)
    lens = [45, 300]
    for paged in (False, True):
        q, kc, vc, k_new, v_new, table = cache_case(2, lens, 1, 1, 4, 2, d, dtype, paged, seed=d)
        check_kvcache(
            q, kc, vc, rope, cache_seqlens=torch.tensor(lens, dtype=torch.int32), k_new=k_new, v_new=v_new,
            block_table=table,
        )  # fmt: skip


@pytest.mark.parametrize(
    "d,rotary_dim,interleaved",
    [(64, 40, False), (64, 40, True), (72, 24, True), (20, 12, False), (36, 20, True), (44, 44, True), (40, 2, False)],
)
@pytest.mark.parametrize("hq,hkv", [(3, 3), (6, 2), (8, 2), (10, 2)])
def test_kvcache_rotary_layouts_and_groups(isa, d, rotary_dim, interleaved, hq, hkv):
    """Decode scores rotate K in registers: full vectors of 8 pairs, scalar leftover pairs and
    channels, pass-through channels past rotary_dim, and 1-5 query rows per KV head (tiles of 4
    rows plus 1-3), both pair layouts; an odd number of keys per chunk (45 = 2 x 16 + 13)."""
    rope = make_rope("yarn", d, rotary_dim=rotary_dim, interleaved=interleaved)
    lens = [45, 300]
    q, kc, vc, k_new, v_new, table = cache_case(2, lens, 1, 1, hq, hkv, d, BF16, True, seed=d + hq)
    check_kvcache(
        q, kc, vc, rope, cache_seqlens=torch.tensor(lens, dtype=torch.int32), k_new=k_new, v_new=v_new,
        block_table=table,
    )  # fmt: skip


def test_kvcache_mqa_and_wide_groups():
    rope = make_rope("yarn", 64)
    for hq, sq in ((32, 1), (8, 8), (16, 5)):  # 32 and 64 rows per KV head: decode; 80: tiled
        q, kc, vc, k_new, v_new, table = cache_case(2, [37, 300], 2, sq, hq, 1, 64, BF16, hq == 8, seed=hq)
        check_kvcache(
            q, kc, vc, rope, cache_seqlens=torch.tensor([37, 300], dtype=torch.int32), k_new=k_new, v_new=v_new,
            block_table=table,
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_kvcache_growth_across_switch(kind):
    """Token-by-token decode across the scaling switch: every step against the fp64 oracle."""
    rope = make_rope(kind, 64, orig=24)
    total = 30
    gen = torch.Generator().manual_seed(1)
    ks, vs = torch.randn(1, total, 2, 64, generator=gen), torch.randn(1, total, 2, 64, generator=gen)
    qs = torch.randn(1, total, 4, 64, generator=gen)
    kc, vc = torch.full((1, total, 2, 64), float("nan")), torch.full((1, total, 2, 64), float("nan"))
    kc[:, :20], vc[:, :20] = ks[:, :20], vs[:, :20]
    for t in range(20, total):
        kw = dict(cache_seqlens=torch.tensor([t], dtype=torch.int32), k_new=ks[:, t : t + 1], v_new=vs[:, t : t + 1])
        check_kvcache(qs[:, t : t + 1], kc, vc, rope, **kw)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_kvcache_positions_near_2_20(isa, dtype):
    """Decode over a cache of ~2^20 keys (a paged cache whose table reuses 5 physical blocks): the
    kernel's per-chunk cos/sin (angle addition from the chunk's first position) at million-token
    positions, against the fp64 oracle."""
    d, block = 32, 256
    n = (1 << 20) - 3 if dtype == F32 else (1 << 20) + 40
    gen = torch.Generator().manual_seed(3)
    rope = rk.RopeConfig(d, base=500000.0)
    kc = torch.randn(5, block, 1, d, generator=gen).to(dtype)
    vc = torch.randn(5, block, 1, d, generator=gen).to(dtype)
    table = (torch.arange(-(-(n + 1) // block)) * 7 % 5).to(torch.int32)[None]
    q = torch.randn(1, 1, 2, d, generator=gen).to(dtype)
    check_kvcache(q, kc, vc, rope, cache_seqlens=torch.tensor([n], dtype=torch.int32), block_table=table)


def test_kvcache_split_counts():
    """Every split-K count (explicit hint; 0 = automatic) against the oracle."""
    rope = make_rope("yarn", 64)
    q, kc, vc, _, _, table = cache_case(2, [300, 1000], 0, 1, 8, 2, 64, F32, True)
    kw = dict(cache_seqlens=torch.tensor([300, 1000], dtype=torch.int32), block_table=table)
    o_ref, l_ref = oracle_kvcache(q, kc, vc, rope, **kw)
    o_base, l_base = baseline_kvcache(q, kc, vc, rope, **kw)
    call = kvcache_call(q, kc, vc, rope, **kw)
    for splits in (1, 2, 7, 64, 0):
        out, lse = torch.ops.ropekern.fwd_kvcache(*call.op_args(splits))
        check(out, o_ref, o_base, F32, f"out, {splits} splits")
        check(lse, l_ref, l_base, F32, f"lse, {splits} splits")


# ---------------------------------------------------------------- apply_rope
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 40, 12])
def test_apply_rope(isa, dtype, interleaved, rotary_dim):
    rope = make_rope("llama3", 96, rotary_dim, interleaved)
    x = torch.randn(2, 33, 3, 96).to(dtype)
    pos = torch.randint(0, 2**20, (2, 33))
    out = rk.apply_rope(x, rope, pos, backend="cpu")
    check(out, oracle_rope(x, rope, pos), baseline_rope(x, rope, pos), dtype, "apply_rope")
    r = rope.rotary_dim
    assert torch.equal(out[..., r:], x[..., r:]), "pass-through channels must be bit-exact"
    packed = x[0].clone()  # [T, H, D] with [T] positions
    out3 = rk.apply_rope(packed, rope, pos[0], backend="cpu")
    assert torch.equal(out3, out[0])


def test_apply_rope_length_dependent_and_identity():
    rope = make_rope("longrope", 64)
    x = torch.randn(3, 40, 2, 64)
    pos = torch.stack([torch.arange(40), torch.arange(40) + 5, torch.arange(40) * 3])  # per-row tables
    check(rk.apply_rope(x, rope, pos, backend="cpu"), oracle_rope(x, rope, pos), baseline_rope(x, rope, pos), F32, "")
    plain = make_rope("default", 64)
    zero = torch.zeros(3, 40, dtype=torch.int64)
    assert torch.equal(rk.apply_rope(x, plain, zero, backend="cpu"), x), "position 0 must be the identity"


def test_accurate_angles(isa):
    """cos/sin of the kernels within 2e-6 of fp64 for positions below 2**24 (docs/design.md §4): rotating
    the unit vector (1, 0) of every pair yields (cos, sin) directly."""
    rope = rk.RopeConfig(128, base=10000.0)
    pos = torch.cat([torch.tensor([2**24 - 1, 2**24 - 4096, 2**20, 12345]), torch.randint(0, 2**24, (60,))])
    x = torch.zeros(1, pos.numel(), 1, 128)
    x[..., :64] = 1.0
    out = rk.apply_rope(x, rope, pos[None], backend="cpu")[0, :, 0].double()
    angle = pos.double()[:, None] * rope.inv_freq64()[None]
    err = max(float((out[:, :64] - angle.cos()).abs().max()), float((out[:, 64:] - angle.sin()).abs().max()))
    assert err <= 2e-6, err


# ---------------------------------------------------------------- dispatch, errors, opcheck
def test_auto_picks_cpu_for_cpu_tensors():
    rope = make_rope("default", 64)
    q, k, v, _ = random_qkv(1, 4, 4, 2, 1, 64)
    assert backends.select_backend("attention", attention_call(q, k, v, rope), q.device, "auto") is native.cpu_backend
    assert backends.select_backend("rope", rope_call(q, rope), q.device, "auto") is native.cpu_backend
    kc = torch.zeros(1, 8, 1, 64)
    kv = kvcache_call(q[:, :1], kc, kc.clone(), rope, cache_seqlens=torch.tensor([4], dtype=torch.int32))
    assert backends.select_backend("kvcache", kv, q.device, "auto") is native.cpu_backend
    q64 = q.double()
    torch_backend = backends.get_backend("torch")
    assert backends.select_backend("attention", attention_call(q64, q64, q64, rope), q.device, "auto") is torch_backend
    # gradients: attention keeps the native forward (``ropekern::fwd`` has an autograd formula,
    # tests/test_backward_native.py); the forward-only rope kernel steps aside for the reference
    qg = q.clone().requires_grad_()
    assert backends.select_backend("attention", attention_call(qg, k, v, rope), q.device, "auto") is native.cpu_backend
    rk.rope_attention(qg, k, v, rope).sum().backward()
    assert qg.grad is not None
    assert backends.select_backend("rope", rope_call(qg, rope), q.device, "auto") is torch_backend
    with torch.no_grad():
        assert backends.select_backend("rope", rope_call(qg, rope), q.device, "auto") is native.cpu_backend
    assert rk.available_backends()["cpu"] is True


def test_isa_choice_and_reason(monkeypatch):
    """auto takes the widest unit the CPU and OS run, says why, and each forced unit runs as named."""
    monkeypatch.delenv("ROPEKERN_CPU_ISA", raising=False)
    assert native.cpu_isa() == ISAS[0]
    assert native.cpu_isa_reason().startswith("auto: ")
    for isa in ISAS:
        monkeypatch.setenv("ROPEKERN_CPU_ISA", isa)
        assert native.cpu_isa() == isa
        assert native.cpu_isa_reason() == f"forced by ROPEKERN_CPU_ISA={isa}"
    monkeypatch.setenv("ROPEKERN_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="ROPEKERN_CPU_ISA must be auto, .* got avx9000"):
        native.cpu_isa_reason()


def test_bad_inputs():
    rope = make_rope("default", 64)
    q, k, v, _ = random_qkv(1, 4, 4, 2, 1, 64)
    with pytest.raises(ValueError, match="cannot run this attention call: torch.float64"):
        rk.rope_attention(q.double(), k.double(), v.double(), rope, backend="cpu")
    with pytest.raises(ValueError, match="`k` shape"):
        rk.rope_attention(q, k, v[:, :3], rope, backend="cpu")
    with pytest.raises(ValueError, match="ROPEKERN_CPU_ISA"):
        import os

        os.environ["ROPEKERN_CPU_ISA"] = "avx9000"
        try:
            rk.rope_attention(q, k, v, rope, backend="cpu")
        finally:
            del os.environ["ROPEKERN_CPU_ISA"]
    # direct op calls are checked too (no memory errors behind the Python validation)
    args = list(attention_call(q, k, v, rope).op_args())
    bad = list(args)
    bad[9] = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="`freqs` must have shape"):
        torch.ops.ropekern.fwd(*bad)
    bad = list(args)
    bad[1] = k.half()
    with pytest.raises(TypeError, match="`k` dtype"):
        torch.ops.ropekern.fwd(*bad)
    bad = list(args)
    bad[3] = args[3][:, :2]
    with pytest.raises(ValueError, match="`q_pos` must have shape"):
        torch.ops.ropekern.fwd(*bad)
    kc = torch.zeros(1, 8, 1, 64)
    call = kvcache_call(q[:, :1], kc, kc.clone(), rope, cache_seqlens=torch.tensor([4], dtype=torch.int32))
    bad = list(call.op_args())
    bad[3] = torch.tensor([8], dtype=torch.int32)
    bad[4] = bad[5] = torch.zeros(1, 1, 1, 64)
    with pytest.raises(ValueError, match="does not fit the cache capacity"):
        torch.ops.ropekern.fwd_kvcache(*bad)
    paged = torch.zeros(2, 4, 1, 64)
    call = kvcache_call(
        q[:, :1],
        paged,
        paged.clone(),
        rope,
        cache_seqlens=torch.tensor([6], dtype=torch.int32),
        block_table=torch.tensor([[1, 0]], dtype=torch.int32),
    )
    bad = list(call.op_args())
    bad[6] = torch.tensor([[1, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.ropekern.fwd_kvcache(*bad)
    with pytest.raises(ValueError, match="`x` must have shape|`positions` must have shape"):
        torch.ops.ropekern.apply_rope(q, torch.zeros(3, dtype=torch.int32), rope.tables()[1], 64, False, 1.0, 0)


def test_opcheck():
    rope = make_rope("dynamic", 64)
    q, k, v, _ = random_qkv(2, 5, 7, 4, 2, 64, BF16)
    torch.library.opcheck(torch.ops.ropekern.fwd.default, attention_call(q, k, v, rope).op_args())
    qv, kv_, vv, extra = random_qkv(0, 0, 0, 4, 2, 64, F32, varlen_lengths=([3, 4], [5, 2]))
    call = attention_call(qv, kv_, vv, rope, causal=True, **extra)
    torch.library.opcheck(torch.ops.ropekern.fwd.default, call.op_args())
    qc, kc, vc, k_new, v_new, table = cache_case(2, [3, 9], 2, 2, 4, 2, 64, F32, True)
    call = kvcache_call(
        qc, kc, vc, rope, cache_seqlens=torch.tensor([3, 9], dtype=torch.int32), k_new=k_new, v_new=v_new,
        block_table=table,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.ropekern.fwd_kvcache.default, call.op_args())
    torch.library.opcheck(torch.ops.ropekern.apply_rope.default, rope_call(q, rope).op_args())


# Sliding windows on every unit: a window's left edge masks the first keys of a block (the `lo` of
# softmax_cols) and skips whole blocks and decode chunks before it; tests/test_sliding_window.py
# checks the semantics against flash-attn's formula, this the units against the reference.
WINDOW_CASES = [((16, -1), True), ((5, 3), False), ((0, -1), True)]


@pytest.mark.parametrize(("window", "causal"), WINDOW_CASES, ids=["causal-16", "band-5-3", "self-only"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_windows_on_every_unit(isa, window, causal, dtype):
    rope = rk.RopeConfig(64, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    q, k, v, _ = random_qkv(2, 150, 170, 4, 2, 64, dtype=dtype, seed=11)
    v[1, 3, 0, 2] = float("nan")  # outside every window but the first rows'
    kw = {"causal": causal, "window_size": window}
    out, lse = rk.rope_attention(q, k, v, rope, return_lse=True, backend="cpu", **kw)
    o64, l64 = oracle_attention(q, k, v, rope, **kw)
    ob, lb = baseline_attention(q, k, v, rope, **kw)
    assert error_check(out, o64, ob).ok, error_check(out, o64, ob)
    assert error_check(lse, l64, lb).ok, error_check(lse, l64, lb)
    # decode over a long cache (split-K) and a chunked prefill (the tiled path over the cache)
    gen = torch.Generator().manual_seed(12)
    k_cache, v_cache = (torch.randn(2, 900, 2, 64, generator=gen).to(dtype) for _ in range(2))
    lens = torch.tensor([850, 30], dtype=torch.int32)
    for sq in (2, 40):
        qc = torch.randn(2, sq, 4, 64, generator=gen).to(dtype)
        ckw = {"cache_seqlens": lens, "causal": causal, "window_size": window}
        out, lse = rk.rope_attention_with_kvcache(qc, k_cache, v_cache, rope, return_lse=True, backend="cpu", **ckw)
        o64, l64 = oracle_kvcache(qc, k_cache, v_cache, rope, **ckw)
        ob, lb = baseline_kvcache(qc, k_cache, v_cache, rope, **ckw)
        assert error_check(out, o64, ob).ok, (sq, error_check(out, o64, ob))
        assert error_check(lse, l64, lb).ok, (sq, error_check(lse, l64, lb))
