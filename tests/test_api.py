"""Public API: every bad input gets a clear ValueError/TypeError naming the argument; dispatch."""

import pytest
import torch

import ropekern as rk

ROPE = rk.RopeConfig(16)


def qkv(b=2, sq=5, sk=7, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (
        torch.randn(b, sq, hq, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
    )


def varlen():
    q, k, v = torch.randn(6, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    return q, k, v, torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)


def expect(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_attention_errors():
    q, k, v = qkv()
    f = rk.rope_attention
    expect(TypeError, "`q` must be a torch.Tensor", f, q.numpy(), k, v, ROPE)
    expect(ValueError, "`k` must have 4 dimensions", f, q, k[0], v, ROPE)
    expect(TypeError, "`q` must be float16", f, q.to(torch.int32), k, v, ROPE)
    expect(ValueError, "`k` dtype", f, q, k.double(), v, ROPE)
    expect(ValueError, "`k` shape", f, q, k, v[:, :3], ROPE)
    expect(ValueError, "head dim of `q`", f, q[..., :8], k, v, ROPE)
    expect(ValueError, "rope.head_dim", f, *qkv(d=32), ROPE)
    expect(ValueError, "multiple of key/value heads", f, *qkv(hq=3, hkv=2), ROPE)
    expect(TypeError, "`rope` must be a ropekern.RopeConfig", f, q, k, v, {"head_dim": 16})
    expect(ValueError, "batch size", f, q[:1], k, v, ROPE)
    expect(ValueError, "contiguous last dimension", f, q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, ROPE)
    expect(TypeError, "`causal` must be a bool", f, q, k, v, ROPE, causal=1)
    expect(ValueError, "`softmax_scale` must be finite", f, q, k, v, ROPE, softmax_scale=float("inf"))
    expect(TypeError, "`softmax_scale` must be a float", f, q, k, v, ROPE, softmax_scale="0.1")
    expect(ValueError, "unknown backend 'cuda-fast'", f, q, k, v, ROPE, backend="cuda-fast")
    expect(TypeError, "`backend` must be a string", f, q, k, v, ROPE, backend=None)


def test_position_errors():
    q, k, v = qkv()
    f = rk.rope_attention
    expect(TypeError, "`q_positions` must be an integer", f, q, k, v, ROPE, q_positions=torch.zeros(2, 5))
    expect(TypeError, "`k_positions` must be an integer torch.Tensor", f, q, k, v, ROPE, k_positions=[0] * 7)
    expect(
        ValueError,
        r"`k_positions` must have shape \(2, 7\)",
        f,
        q,
        k,
        v,
        ROPE,
        k_positions=torch.zeros(2, 6, dtype=torch.int64),
    )
    expect(
        ValueError,
        "`q_positions` must be >= 0",
        f,
        q,
        k,
        v,
        ROPE,
        q_positions=torch.full((2, 5), -1, dtype=torch.int64),
    )
    expect(
        ValueError,
        "`k_positions` must be < 2",
        f,
        q,
        k,
        v,
        ROPE,
        k_positions=torch.full((2, 7), 2**31, dtype=torch.int64),
    )


def test_varlen_errors():
    q, k, v, cq, ck = varlen()
    f = rk.rope_attention
    expect(ValueError, "given together", f, q, k, v, ROPE, cu_seqlens_q=cq)
    expect(TypeError, "`cu_seqlens_q` must be int32", f, q, k, v, ROPE, cu_seqlens_q=cq.float(), cu_seqlens_k=ck)
    expect(
        ValueError,
        "`cu_seqlens_k` must be non-decreasing",
        f,
        q,
        k,
        v,
        ROPE,
        cu_seqlens_q=cq,
        cu_seqlens_k=torch.tensor([0, 6, 5], dtype=torch.int32),
    )
    expect(
        ValueError,
        "must end at the token count 6",
        f,
        q,
        k,
        v,
        ROPE,
        cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
        cu_seqlens_k=ck,
    )
    expect(
        ValueError,
        "must start at 0",
        f,
        q,
        k,
        v,
        ROPE,
        cu_seqlens_q=torch.tensor([1, 2, 6], dtype=torch.int32),
        cu_seqlens_k=ck,
    )
    expect(
        ValueError,
        "has 3 entries but",
        f,
        q,
        k,
        v,
        ROPE,
        cu_seqlens_q=cq,
        cu_seqlens_k=torch.tensor([0, 4, 8, 9], dtype=torch.int32),
    )
    expect(
        ValueError,
        "`max_seqlen_q` .* smaller than the longest",
        f,
        q,
        k,
        v,
        ROPE,
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
        max_seqlen_q=3,
    )
    expect(ValueError, "only meaningful", rk.rope_attention, *qkv(), ROPE, max_seqlen_q=4)
    expect(
        ValueError,
        r"`k_positions` must have shape \(9,\)",
        f,
        q,
        k,
        v,
        ROPE,
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
        k_positions=torch.zeros(2, 9, dtype=torch.int64),
    )


def test_kvcache_errors():
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    f = rk.rope_attention_with_kvcache
    lens = torch.tensor([3, 7], dtype=torch.int32)
    expect(
        ValueError,
        "cache overflow in sequence 1",
        f,
        q,
        kc,
        vc,
        ROPE,
        cache_seqlens=torch.tensor([3, 8]),
        k_new=kn,
        v_new=vn,
    )
    expect(ValueError, "given together", f, q, kc, vc, ROPE, cache_seqlens=lens, k_new=kn)
    expect(ValueError, "`k_new` dtype", f, q, kc, vc, ROPE, cache_seqlens=lens, k_new=kn.half(), v_new=vn.half())
    expect(TypeError, "`cache_seqlens` must be int32", f, q, kc, vc, ROPE, cache_seqlens=lens.float())
    expect(ValueError, r"`cache_seqlens` must have shape \[2\]", f, q, kc, vc, ROPE, cache_seqlens=lens[:1])
    expect(
        ValueError,
        "`cache_seqlens\\[0\\]` must be >= 0",
        f,
        q,
        kc,
        vc,
        ROPE,
        cache_seqlens=torch.tensor([-1, 2]),
        k_new=kn,
        v_new=vn,
    )
    # fewer keys than queries is flash-attn's rule, not an error: sequence 0 has none (zeros, -inf)
    out, lse = f(q, kc.clone(), vc.clone(), ROPE, cache_seqlens=torch.tensor([0, 2]), return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
    expect(ValueError, "pass `block_table`", f, q, kc[:1], vc[:1], ROPE, cache_seqlens=lens)
    pc, pv = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)
    expect(
        ValueError,
        "cache overflow in sequence 0",
        f,
        q,
        pc,
        pv,
        ROPE,
        cache_seqlens=torch.tensor([16, 1]),
        block_table=torch.tensor([[0], [1]], dtype=torch.int32),
        k_new=kn,
        v_new=vn,
    )
    expect(
        ValueError,
        "refers to block 9",
        f,
        q,
        pc,
        pv,
        ROPE,
        cache_seqlens=torch.tensor([3, 1]),
        block_table=torch.tensor([[9, 0], [1, 2]], dtype=torch.int32),
        k_new=kn,
        v_new=vn,
    )
    expect(
        ValueError,
        r"`block_table` must have shape \[2, max_blocks\]",
        f,
        q,
        pc,
        pv,
        ROPE,
        cache_seqlens=lens,
        block_table=torch.tensor([0, 1], dtype=torch.int32),
    )


def test_aliased_caches_refused_when_appending():
    """The in-place append must not overwrite other data: one tensor as both caches, an expand()ed
    cache, overlapping K and V views, and (paged) a block that another sequence also uses are refused
    before anything is written; disjoint views of one buffer and reads without an append are fine."""
    q = torch.randn(2, 1, 4, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    f = rk.rope_attention_with_kvcache
    lens = torch.tensor([3, 5], dtype=torch.int32)
    kc = torch.zeros(2, 8, 2, 16)
    expect(
        ValueError, "`k_cache` and `v_cache` share memory", f, q, kc, kc, ROPE, cache_seqlens=lens, k_new=kn, v_new=vn
    )
    f(q, kc, kc, ROPE, cache_seqlens=lens)  # reading only: K = V is unusual but writes nothing
    wide = torch.zeros(2, 8, 2, 24)
    expect(
        ValueError, "share memory", f, q, wide[..., :16], wide[..., 8:], ROPE, cache_seqlens=lens, k_new=kn, v_new=vn
    )
    one = torch.zeros(1, 8, 2, 16)
    expect(ValueError, "`k_cache` has stride 0 in dimension 0", f, q, one.expand(2, -1, -1, -1), kc.clone(), ROPE,
           cache_seqlens=lens, k_new=kn, v_new=vn)  # fmt: skip
    for kv in (torch.zeros(2, 2, 8, 2, 16), torch.zeros(2, 8, 2, 2, 16)):  # stacked, interleaved per token
        k_view, v_view = (kv[0], kv[1]) if kv.shape[0] == 2 and kv.shape[1] == 2 else (kv[:, :, 0], kv[:, :, 1])
        before = kv.clone()
        f(q, k_view, v_view, ROPE, cache_seqlens=lens, k_new=kn, v_new=vn, backend="torch")
        assert torch.equal(k_view[0, 3], kn[0, 0]) and torch.equal(v_view[1, 5], vn[1, 0])
        assert int((kv != before).sum()) == 2 * 2 * 2 * 16  # exactly the two appended tokens of K and V
    pc, pv = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    shared = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)  # block 0: a shared prefix
    expect(ValueError, r"rows 0 and 1 share block 0, into which sequence 0 appends", f, q, pc, pv, ROPE,
           cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), block_table=shared, k_new=kn, v_new=vn)  # fmt: skip
    f(q, pc, pv, ROPE, cache_seqlens=torch.tensor([4, 5], dtype=torch.int32), block_table=shared, k_new=kn, v_new=vn)
    f(q, pc, pv, ROPE, cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), block_table=shared)  # no append


def test_overlap_decision_matches_brute_force():
    """The metadata test of ``_validation._elements_may_meet`` against the element addresses of random
    strided views of one small buffer: it never says disjoint when an element is shared."""
    from ropekern._validation import _elements_may_meet

    gen = torch.Generator().manual_seed(0)
    base = torch.arange(600.0)
    for trial in range(800):
        shape = tuple(int(x) for x in torch.randint(1, 4, (3,), generator=gen))
        # half the trials: b with its own extents (the q / k heads of a packed GQA buffer)
        shape_b = tuple(int(x) for x in torch.randint(1, 4, (3,), generator=gen)) if trial % 2 else shape
        stride = tuple(int(x) for x in torch.randint(0, 40, (3,), generator=gen))
        span = sum((max(n, m) - 1) * st for n, m, st in zip(shape, shape_b, stride)) + 1
        if span > 300:
            continue
        oa, ob = (int(x) for x in torch.randint(0, 600 - span, (2,), generator=gen))
        a, b = base.as_strided(shape, stride, oa), base.as_strided(shape_b, stride, ob)
        shared = bool(set(a.flatten().tolist()) & set(b.flatten().tolist()))
        assert _elements_may_meet(a, b) or not shared, (shape, shape_b, stride, oa, ob)
        if all(st > 0 for st in stride) and len({st for st in stride}) == 3:
            dims = sorted((st, max(n, m)) for st, n, m in zip(stride, shape, shape_b))
            if all(dims[i][0] > sum((n - 1) * st for st, n in dims[:i]) for i in range(3)):
                exact = _elements_may_meet(a, b) == shared  # exact when decidable
                assert exact, (shape, shape_b, stride, oa, ob)


def test_no_backward_means_declined_under_grad(monkeypatch):
    """One grad rule for every backend (``backends.grad_reason``): a kernel without a backward (the cpu and
    cuda kv-cache and rope kernels, the triton kv-cache kernel) declines a call whose inputs require
    grad, so ``auto`` gives an output with a gradient and a named backend raises, never an output
    without one."""
    from ropekern._validation import kvcache_call, rope_call
    from ropekern.backends import cuda as _cuda

    q = torch.randn(1, 2, 4, 16, requires_grad=True)
    kc, vc = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    lens = torch.tensor([5], dtype=torch.int32)
    f = rk.rope_attention_with_kvcache
    named = [b for b in ("cpu", "triton") if rk.available_backends().get(b) is True]
    for backend in named:
        expect(ValueError, "the .* kv-cache kernel has no backward", f, q, kc, vc, ROPE, cache_seqlens=lens,
               backend=backend)  # fmt: skip
    out = f(q, kc, vc, ROPE, cache_seqlens=lens)
    assert out.requires_grad and torch.autograd.grad(out.sum(), q)[0].abs().sum() > 0
    with torch.no_grad():  # no grad wanted: the kernels serve the call
        for backend in named:
            f(q, kc, vc, ROPE, cache_seqlens=lens, backend=backend)
    x = torch.randn(1, 3, 2, 16, requires_grad=True)
    expect(ValueError, "the cpu rope kernel has no backward", rk.apply_rope, x, ROPE, backend="cpu")
    assert rk.apply_rope(x, ROPE).requires_grad
    # The CUDA backend's checks, without a GPU: its device and layout checks pass, the grad rule remains.
    monkeypatch.setattr(_cuda, "_device_reason", lambda t: None)
    monkeypatch.setattr(_cuda, "attention_reason", lambda *a: None)
    assert "cuda kv-cache kernel has no backward" in _cuda.backend.check_kvcache(
        kvcache_call(q, kc, vc, ROPE, cache_seqlens=lens)
    )
    assert "cuda rope kernel has no backward" in _cuda.backend.check_rope(rope_call(x.half(), ROPE))


def test_apply_rope_errors():
    x = torch.randn(2, 5, 3, 16)
    expect(ValueError, "`x` must have 3 or 4 dimensions", rk.apply_rope, x[0, 0], ROPE)
    expect(
        ValueError, r"`positions` must have shape \(2, 5\)", rk.apply_rope, x, ROPE, torch.zeros(5, dtype=torch.int64)
    )
    expect(ValueError, "`seq_len` must be a non-negative int", rk.apply_rope, x, ROPE, seq_len=-3)
    expect(ValueError, "rope.head_dim", rk.apply_rope, torch.randn(2, 5, 3, 8), ROPE)


def test_backends_and_dispatch():
    backends = rk.available_backends()
    assert backends["torch"] is True
    for name, status in backends.items():
        assert status is True or (isinstance(status, str) and status), name
    q, k, v = qkv()
    torch.testing.assert_close(
        rk.rope_attention(q, k, v, ROPE, backend="torch"), rk.reference.rope_attention(q, k, v, ROPE)
    )


def test_skip_data_checks_env(monkeypatch):
    """ROPEKERN_SKIP_DATA_CHECKS=1 drops the host-synchronising checks (decode loops, CUDA graphs)
    and nothing else: the same valid call gives the same result, shape errors still raise."""
    from ropekern import _validation

    q = torch.randn(1, 1, 4, 16)
    kc, vc = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    lens = torch.tensor([5], dtype=torch.int32)
    want = rk.rope_attention_with_kvcache(q, kc, vc, ROPE, cache_seqlens=lens, backend="torch")
    assert _validation._checking()
    monkeypatch.setenv("ROPEKERN_SKIP_DATA_CHECKS", "1")
    assert not _validation._checking()
    got = rk.rope_attention_with_kvcache(q, kc, vc, ROPE, cache_seqlens=lens, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    expect(
        ValueError,
        r"`cache_seqlens` must have shape \[1\]",
        rk.rope_attention_with_kvcache,
        q,
        kc,
        vc,
        ROPE,
        cache_seqlens=torch.tensor([1, 2], dtype=torch.int32),
    )


def test_readme_usage_runs():
    """The README's usage example, run as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python", text.index("## Usage")) + len("```python")
    exec(compile(text[start : text.index("```", start)], "README.md", "exec"), {})


def _pinned_oracle(q, k, v, rope, seq_len, causal):
    """fp64 attention with q and k rotated by the tables of `seq_len` (RopeConfig.cos_sin),
    independent of the kernels' table plumbing. Dense [B, S, H, D], default positions."""
    sq, sk = q.shape[1], k.shape[1]
    rot = []
    for x, pos in ((q, torch.arange(sk - sq, sk)), (k, torch.arange(sk))):
        cos, sin = (t.double()[None, :, None, :] for t in rope.cos_sin(pos, seq_len=seq_len))
        h = rope.rotary_dim // 2
        x = x.double()
        x1, x2 = x[..., :h], x[..., h : 2 * h]
        rot.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * h :]], dim=-1))
    qr, kr = rot
    g = q.shape[2] // k.shape[2]
    kr, vr = kr.repeat_interleave(g, dim=2), v.double().repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qr, kr) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vr)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_seq_len_pins_the_scaling_table(backend):
    """`seq_len` on rope_attention / rope_attention_with_kvcache selects the length-dependent table
    (here LongRoPE's long factors for a 10-token sequence), on every backend that runs here (Triton
    through its interpreter in CI)."""
    if rk.available_backends()[backend] is not True:
        pytest.skip(f"backend {backend} unavailable")
    half = 8
    rope = rk.RopeConfig(
        16,
        scaling={
            "rope_type": "longrope",
            "short_factor": [1.0] * half,
            "long_factor": [1.0 + 2.0 * i for i in range(half)],
            "original_max_position_embeddings": 24,
        },
    )
    torch.manual_seed(0)
    q, k, v = qkv(b=2, sq=3, sk=10)
    for seq_len in (None, 10, 24, 25, 5000):
        want = _pinned_oracle(q, k, v, rope, seq_len or 10, causal=True)
        out = rk.rope_attention(q, k, v, rope, causal=True, seq_len=seq_len, backend=backend)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)
        # the same keys in a cache (the last 3 appended now): n_b = 10
        kc, vc = torch.zeros(2, 12, 2, 16), torch.zeros(2, 12, 2, 16)
        kc[:, :7], vc[:, :7] = k[:, :7], v[:, :7]
        out = rk.rope_attention_with_kvcache(
            q, kc, vc, rope, cache_seqlens=torch.tensor([7, 7], dtype=torch.int32), k_new=k[:, 7:], v_new=v[:, 7:],
            seq_len=seq_len, backend=backend,
        )  # fmt: skip
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)
    long_out = rk.rope_attention(q, k, v, rope, causal=True, seq_len=25, backend=backend)
    assert not torch.allclose(long_out, rk.rope_attention(q, k, v, rope, causal=True, backend=backend), atol=1e-3)
    # a type that does not depend on the length ignores it
    torch.testing.assert_close(
        rk.rope_attention(q, k, v, ROPE, seq_len=99, backend=backend), rk.rope_attention(q, k, v, ROPE, backend=backend)
    )


def test_seq_len_errors():
    q, k, v = qkv()
    cache = dict(cache_seqlens=torch.tensor([7, 7], dtype=torch.int32))
    for bad in (-1, True, 2.5, "10", torch.tensor(10)):
        expect(ValueError, "`seq_len` must be a non-negative int", rk.rope_attention, q, k, v, ROPE, seq_len=bad)
        expect(
            ValueError, "`seq_len` must be a non-negative int", rk.rope_attention_with_kvcache, q, k, v, ROPE,
            seq_len=bad, **cache,
        )  # fmt: skip
        expect(ValueError, "`seq_len` must be a non-negative int", rk.apply_rope, q, ROPE, seq_len=bad)
