"""The ``cuda`` backend (csrc/cuda, ropekern/backends/cuda.py).

* CPU tests (run everywhere): availability reasons, capability refusals, and the argument packing,
  checked end to end by running the packed arguments through an fp32 emulation of each op schema
  (the kernels' accurate angle, ``angle_turns_fp32``) and comparing with the fp64 oracle under the
  docs/design.md §5 rule. The kernel code itself is tested on the CPU by the C++ emulation harness
  (``ctest``: csrc/tests/test_cuda_emulated.cpp).
* GPU tests (``@pytest.mark.gpu``, skipped without a GPU): the docs/design.md §5 sweep of the compiled
  kernels against the reference, decode with dense and paged caches, apply_rope, refusals,
  determinism, and ``torch.library.opcheck``.
"""

from __future__ import annotations

import math

import pytest
import torch

import ropekern as rk
from ropekern import backends, reference
from ropekern._validation import RopeArgs, attention_call, kvcache_call, rope_call
from ropekern.backends import cuda as _cuda
from ropekern.scaling import angle_turns_fp32
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

HAS_CUDA = torch.cuda.is_available()
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}


def _longrope(head_dim: int) -> dict:
    half = head_dim // 2
    return {
        "rope_type": "longrope",
        "short_factor": [1.0] * half,
        "long_factor": [1.0 + i / half for i in range(half)],
        "original_max_position_embeddings": 48,
    }


# ----------------------------------------------------------------------------- op emulation (CPU)
# What each op schema computes, in fp32 with the kernels' angle: the packing tests run the packed
# arguments through these, so a wrong table, position, stride or flag in the packing shows up as
# an error against the fp64 oracle.
def _rotate(x, pos, rope, b):
    """x ``[S, H, D]`` at positions ``pos`` rotated as the kernels do, with sequence b's table."""
    x = x.to(torch.float32)
    if rope.rotary_dim == 0:
        return x
    table = rope.split[b if rope.split.shape[0] > 1 else 0]
    angle = angle_turns_fp32(pos, table) * torch.tensor(2 * math.pi, dtype=torch.float32)
    cos, sin = torch.cos(angle) * rope.attention_factor, torch.sin(angle) * rope.attention_factor
    return reference.rotate(x, cos[:, None, :], sin[:, None, :], rope.rotary_dim, rope.interleaved)


def emulate_fwd(q, k, v, q_pos, k_pos, cu_q, cu_k, max_q, max_k, *rest):
    rope, (causal, scale, window_left, window_right) = RopeArgs.take(rest)
    assert window_left < 0 and window_right < 0  # the CUDA backend refuses windows
    if cu_q is None:
        slices = [(b, b, b) for b in range(q.shape[0])]
    else:
        cq, ck = cu_q.tolist(), cu_k.tolist()
        assert max_q >= max(b - a for a, b in zip(cq, cq[1:])) and max_k >= max(b - a for a, b in zip(ck, ck[1:]))
        slices = [(b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]
    outs, lses = [], []
    for b, qs, ks in slices:
        rq = _rotate(q[qs], q_pos[qs], rope, b)
        rk_ = _rotate(k[ks], k_pos[ks], rope, b)
        out, lse = reference._attend(rq, rk_, v[ks].float(), scale, causal, rk_.shape[0] - rq.shape[0])
        outs.append(out.to(q.dtype))
        lses.append(lse)
    if cu_q is None:
        return torch.stack(outs), torch.stack(lses)
    return torch.cat(outs), torch.cat(lses, 1)


def _cache_index(cache, block_table, b, idx):
    if block_table is None:
        return (b, idx)
    bs = cache.shape[1]
    return (block_table[b].long()[idx // bs], idx % bs)


def emulate_fwd_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, *rest):
    rope, (causal, scale, window_left, window_right, num_splits) = RopeArgs.take(rest)
    assert num_splits >= 0 and window_left < 0 and window_right < 0
    s_new = 0 if k_new is None else k_new.shape[1]
    sq = q.shape[1]
    outs, lses = [], []
    for b, n0 in enumerate(cache_seqlens.tolist()):
        if s_new:
            idx = torch.arange(n0, n0 + s_new)
            k_cache[_cache_index(k_cache, block_table, b, idx)] = k_new[b]
            v_cache[_cache_index(v_cache, block_table, b, idx)] = v_new[b]
        n = n0 + s_new
        idx = torch.arange(n)
        keys = _rotate(k_cache[_cache_index(k_cache, block_table, b, idx)], idx, rope, b)
        vals = v_cache[_cache_index(v_cache, block_table, b, idx)].float()
        rq = _rotate(q[b], torch.arange(n - sq, n), rope, b)
        out, lse = reference._attend(rq, keys, vals, scale, causal, n - sq)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def emulate_apply_rope(x, positions, *rest):
    rope, _ = RopeArgs.take(rest)
    x4, pos2 = (x, positions) if x.dim() == 4 else (x[None], positions[None])
    out = torch.stack([_rotate(x4[b], pos2[b], rope, b) for b in range(x4.shape[0])]).to(x.dtype)
    return out if x.dim() == 4 else out[0]


# ----------------------------------------------------------------------------- CPU: availability
def test_unavailable_reason_names_the_missing_piece():
    status = rk.available_backends()["cuda"]
    if HAS_CUDA and _cuda._has_cuda_kernels():
        assert status is True
    else:
        assert isinstance(status, str) and ("ropekern._C" in status or "CUDA" in status)


def test_auto_never_picks_cuda_for_cpu_tensors():
    q, k, v, _ = random_qkv(1, 4, 4, 2, 2, 64)
    call = attention_call(q, k, v, rk.RopeConfig(64))
    assert backends.select_backend("attention", call, q.device, "auto").name != "cuda"
    assert "CUDA tensors" in _cuda.backend.check_attention(call)


def test_capability_reasons():
    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    assert _cuda.attention_reason(q, 64, {"q": q}) is None
    assert "float16 or bfloat16" in _cuda.attention_reason(q.float(), 64, {"q": q.float()})
    assert "head dim 80" in _cuda.attention_reason(q[..., :80], 80, {"q": q})
    wide = torch.zeros(1, 4, 2, 72, dtype=torch.float16)
    shifted = wide[..., 8:72]  # storage offset 8 elements = 16 bytes: aligned
    assert _cuda.attention_reason(shifted, 64, {"q": shifted}) is None
    odd = torch.zeros(1, 4, 2, 68, dtype=torch.float16)[..., 2:66]  # offset 4 bytes, row stride 68 * 2
    assert "16-byte aligned" in _cuda.attention_reason(odd, 64, {"q": odd})


# ----------------------------------------------------------------------------- CPU: packing
def _assert_rule(out, oracle, baseline, dtype=torch.float32):
    result = error_check(out, oracle, baseline, dtype)
    assert result.ok, str(result)


@pytest.mark.parametrize(
    "scaling,interleaved,rotary_dim,causal",
    [(None, False, 64, False), (YARN, True, 32, True), (DYNAMIC, False, 48, True)],
)
def test_attention_packing_dense(scaling, interleaved, rotary_dim, causal):
    kw = {"max_position_embeddings": 64} if scaling is DYNAMIC else {}
    rope = rk.RopeConfig(64, rotary_dim=rotary_dim, interleaved=interleaved, scaling=scaling, **kw)
    q, k, v, _ = random_qkv(2, 5, 9, 4, 2, 64)
    qp = torch.tensor([[2**20 + i for i in range(5)], [3, 3, 4, 4, 90]])
    kp = torch.tensor([[2**20 - 4 + j for j in range(9)], list(range(0, 90, 10))])
    kwargs = dict(q_positions=qp, k_positions=kp, causal=causal, softmax_scale=0.2)
    out, lse = emulate_fwd(*attention_call(q, k, v, rope, **kwargs).op_args())
    o64, l64 = oracle_attention(q, k, v, rope, **kwargs)
    ob, lb = baseline_attention(q, k, v, rope, **kwargs)
    _assert_rule(out, o64, ob)
    _assert_rule(lse, l64, lb)


def test_attention_packing_varlen_per_sequence_tables_and_rope_off():
    rope = rk.RopeConfig(64, scaling=_longrope(64))
    lens_q, lens_k = [3, 0, 7], [60, 4, 20]  # sequence 0 passes LongRoPE's switch, 2 does not
    q, k, v, extra = random_qkv(3, 0, 0, 2, 1, 64, varlen_lengths=(lens_q, lens_k))
    call = attention_call(q, k, v, rope, causal=True, **extra)
    assert call.tables()[1].shape[0] == 3
    out, lse = emulate_fwd(*call.op_args())
    o64, l64 = oracle_attention(q, k, v, rope, causal=True, **extra)
    ob, lb = baseline_attention(q, k, v, rope, causal=True, **extra)
    _assert_rule(out, o64, ob)
    _assert_rule(lse, l64, lb)
    call.rotate = False  # the benchmarks' RoPE-off variant: rotary_dim 0 in the packed call
    args = call.op_args()
    assert args[10] == 0  # rotary_dim
    torch.testing.assert_close(emulate_fwd(*args)[0], reference.attention(call)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_packing_appends_in_place(paged):
    rope = rk.RopeConfig(64, scaling=DYNAMIC, max_position_embeddings=16, interleaved=True)
    b, sq, hq, hkv, d, s_new = 2, 2, 4, 2, 64, 3
    gen = torch.Generator().manual_seed(3)
    lens = torch.tensor([5, 30], dtype=torch.int32)
    if paged:
        k_cache = torch.randn(12, 8, hkv, d, generator=gen)
        block_table = torch.randperm(12, generator=gen)[: 2 * 5].reshape(2, 5).to(torch.int32)
    else:
        k_cache = torch.randn(b, 40, hkv, d, generator=gen)
        block_table = None
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(b, sq, hq, d, generator=gen)
    k_new, v_new = torch.randn(b, s_new, hkv, d, generator=gen), torch.randn(b, s_new, hkv, d, generator=gen)
    kw = dict(cache_seqlens=lens, k_new=k_new, v_new=v_new, block_table=block_table, causal=True)
    o64, l64 = oracle_kvcache(q, k_cache, v_cache, rope, **kw)
    ob, lb = baseline_kvcache(q, k_cache, v_cache, rope, **kw)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(kvcache_call(q, want_k, want_v, rope, **kw))
    call = kvcache_call(q, k_cache, v_cache, rope, **kw)
    out, lse = emulate_fwd_kvcache(*call.op_args(3))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    _assert_rule(out, o64, ob)
    _assert_rule(lse, l64, lb)


@pytest.mark.parametrize("packed", [False, True])
def test_rope_packing(packed):
    rope = rk.RopeConfig(40, rotary_dim=24, scaling=DYNAMIC, max_position_embeddings=8)
    x = torch.randn(7, 3, 40) if packed else torch.randn(2, 7, 3, 40)
    pos = torch.arange(7) * 1000 if packed else torch.stack([torch.arange(7), torch.arange(7) * 50])
    out = emulate_apply_rope(*rope_call(x, rope, pos).op_args())
    _assert_rule(out, oracle_rope(x, rope, pos), baseline_rope(x, rope, pos))
    assert torch.equal(out[..., 24:], x[..., 24:])


# ----------------------------------------------------------------------------- GPU: the kernels
gpu = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]


def _cuda_ready():
    status = rk.available_backends()["cuda"]
    if status is not True:
        pytest.fail(f"a GPU is present but the cuda backend is not available: {status}")


def _check_attention(q, k, v, rope, **kw):
    _cuda_ready()
    out, lse = rk.rope_attention(q, k, v, rope, backend="cuda", return_lse=True, **kw)
    o64, l64 = oracle_attention(q, k, v, rope, **kw)
    ob, lb = baseline_attention(q, k, v, rope, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    res_o, res_l = error_check(out, o64, ob, q.dtype), error_check(lse, l64, lb, torch.float32)
    assert res_o.ok, f"out {res_o}"
    assert res_l.ok, f"lse {res_l}"
    return out, lse


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 129), (129, 113), (1, 129), (128, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_sweep(dtype, d, sq, sk, causal):
    q, k, v, _ = random_qkv(2, sq, sk, 4, 2, d, dtype=dtype, device="cuda")
    _check_attention(q, k, v, rk.RopeConfig(d), causal=causal)


@gpu
@pytest.mark.parametrize("hq,hkv", [(8, 1), (4, 4), (6, 2)])
@pytest.mark.parametrize("rotary_dim,interleaved,scaling", [(64, True, YARN), (32, False, None), (0, False, None)])
def test_attention_gqa_partial_interleaved(hq, hkv, rotary_dim, interleaved, scaling):
    q, k, v, _ = random_qkv(2, 33, 70, hq, hkv, 128, dtype=torch.bfloat16, device="cuda")
    rope = rk.RopeConfig(128, rotary_dim=rotary_dim, interleaved=interleaved, scaling=scaling)
    _check_attention(q, k, v, rope, causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_explicit_repeated_and_large_positions(dtype):
    q, k, v, _ = random_qkv(2, 40, 90, 4, 2, 64, dtype=dtype, device="cuda")
    kp = torch.stack([torch.arange(90) // 3, torch.arange(90) + 2**20]).to("cuda")  # repeats / near 2^20
    qp = torch.stack([torch.arange(40) // 2 + 10, torch.arange(40) + 2**20 + 50]).to("cuda")
    _check_attention(q, k, v, rk.RopeConfig(64), q_positions=qp, k_positions=kp, causal=True)


@gpu
def test_attention_strided_packed_qkv():
    qkv = torch.randn(2, 77, 4 + 2 + 2, 128, dtype=torch.float16, device="cuda")
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    assert not q.is_contiguous()
    _check_attention(q, k, v, rk.RopeConfig(128), causal=True)


@gpu
@pytest.mark.parametrize("scaling", [DYNAMIC, "longrope"])
def test_attention_varlen_per_sequence_tables(scaling):
    scaling = _longrope(64) if scaling == "longrope" else scaling
    rope = rk.RopeConfig(64, scaling=scaling, max_position_embeddings=32)
    lens_q, lens_k = [1, 0, 17, 129], [1, 5, 113, 129]
    q, k, v, extra = random_qkv(4, 0, 0, 4, 2, 64, dtype=torch.float16, device="cuda", varlen_lengths=(lens_q, lens_k))
    _check_attention(q, k, v, rope, causal=True, **extra)
    _check_attention(q, k, v, rope, causal=False, **extra)


@gpu
def test_attention_rope_off_matches_reference():
    _cuda_ready()
    q, k, v, _ = random_qkv(1, 65, 65, 2, 2, 64, dtype=torch.float16, device="cuda")
    call = attention_call(q, k, v, rk.RopeConfig(64), causal=True)
    call.rotate = False
    out, _ = _cuda.backend.attention(call)
    torch.testing.assert_close(out.float(), reference.attention(call)[0].float(), atol=2e-3, rtol=2e-3)


@gpu
def test_attention_empty_and_refusals():
    _cuda_ready()
    rope = rk.RopeConfig(64)
    q, k, v, _ = random_qkv(0, 4, 4, 2, 2, 64, dtype=torch.float16, device="cuda")
    assert rk.rope_attention(q, k, v, rope, backend="cuda").shape == q.shape
    q, k, v, _ = random_qkv(1, 4, 0, 2, 2, 64, dtype=torch.float16, device="cuda")
    out, lse = rk.rope_attention(q, k, v, rope, backend="cuda", return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q, k, v, _ = random_qkv(1, 4, 4, 2, 2, 80, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="head dim 80"):
        rk.rope_attention(q, k, v, rk.RopeConfig(80), backend="cuda")
    call = attention_call(q, k, v, rk.RopeConfig(80))
    assert backends.select_backend("attention", call, q.device, "auto").name != "cuda"


@gpu
def test_attention_deterministic_and_batch_invariant():
    _cuda_ready()
    q, k, v, _ = random_qkv(3, 70, 130, 4, 1, 128, dtype=torch.bfloat16, device="cuda")
    rope = rk.RopeConfig(128)
    a = rk.rope_attention(q, k, v, rope, causal=True, backend="cuda")
    b = rk.rope_attention(q, k, v, rope, causal=True, backend="cuda")
    one = rk.rope_attention(q[1:2], k[1:2], v[1:2], rope, causal=True, backend="cuda")
    assert torch.equal(a, b) and torch.equal(a[1:2], one)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("sq,s_new,causal", [(1, 1, True), (1, 0, False), (4, 4, True), (3, 0, False)])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_kvcache(dtype, d, paged, sq, s_new, causal, num_splits):
    _cuda_ready()
    b, hq, hkv = 3, 8, 2
    rope = rk.RopeConfig(d, scaling=DYNAMIC, max_position_embeddings=100)
    gen = torch.Generator().manual_seed(d + sq)
    lens = torch.tensor([sq, 100, 300], dtype=torch.int32)
    if paged:  # 20 blocks of 16 tokens per sequence, scattered over 64 blocks
        k_cache = torch.randn(64, 16, hkv, d, generator=gen)
        block_table = torch.randperm(64, generator=gen)[: b * 20].reshape(b, 20).to(torch.int32)
    else:
        k_cache = torch.randn(b, 320, hkv, d, generator=gen)
        block_table = None
    v_cache = torch.randn_like(k_cache)
    # Slots past each sequence's keys hold NaN: they must never reach the output.
    for i, n in enumerate(lens.tolist()):
        idx = torch.arange(n + s_new, 320)
        k_cache[_cache_index(k_cache, block_table, i, idx)] = float("nan")
        v_cache[_cache_index(v_cache, block_table, i, idx)] = float("nan")
    k_cache, v_cache = k_cache.to("cuda", dtype), v_cache.to("cuda", dtype)
    q = torch.randn(b, sq, hq, d, generator=gen).to("cuda", dtype)
    k_new = torch.randn(b, s_new, hkv, d, generator=gen).to("cuda", dtype) if s_new else None
    v_new = torch.randn(b, s_new, hkv, d, generator=gen).to("cuda", dtype) if s_new else None
    kw = dict(cache_seqlens=lens.to("cuda"), k_new=k_new, v_new=v_new, causal=causal)
    kw["block_table"] = None if block_table is None else block_table.to("cuda")
    o64, l64 = oracle_kvcache(q, k_cache, v_cache, rope, **kw)
    ob, lb = baseline_kvcache(q, k_cache, v_cache, rope, **kw)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(kvcache_call(q, want_k, want_v, rope, **kw))
    out, lse = _cuda.backend.kvcache(kvcache_call(q, k_cache, v_cache, rope, **kw), num_splits=num_splits)
    assert torch.equal(k_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))
    res_o, res_l = error_check(out, o64, ob, dtype), error_check(lse, l64, lb, torch.float32)
    assert res_o.ok, f"out {res_o}"
    assert res_l.ok, f"lse {res_l}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary_dim,interleaved", [(128, False), (96, True), (32, False)])
def test_apply_rope(dtype, packed, rotary_dim, interleaved):
    _cuda_ready()
    rope = rk.RopeConfig(128, rotary_dim=rotary_dim, interleaved=interleaved, scaling=YARN)
    x = torch.randn(2, 33, 4, 128 + 8, device="cuda", dtype=dtype)[..., :128]  # strided heads
    pos = torch.stack([torch.arange(33), torch.arange(33) + 2**20]).to("cuda")
    if packed:
        x, pos = x[0], pos[1]
    out = rk.apply_rope(x, rope, pos, backend="cuda")
    _assert_rule(out, oracle_rope(x, rope, pos), baseline_rope(x, rope, pos), dtype)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@gpu
def test_small_shapes_for_sanitizer():
    """One call of every kernel on small shapes: the target of the compute-sanitizer run (docs/cuda.md)."""
    _cuda_ready()
    for d in (64, 128, 256):
        q, k, v, _ = random_qkv(1, 17, 33, 2, 1, d, dtype=torch.float16, device="cuda")
        _check_attention(q, k, v, rk.RopeConfig(d), causal=True)
        kc = torch.randn(2, 5, 1, d, device="cuda", dtype=torch.float16)  # paged: 2 blocks of 5 tokens
        vc, qd = torch.randn_like(kc), torch.randn(1, 1, 2, d, device="cuda", dtype=torch.float16)
        kn, vn = torch.randn_like(kc[:1, :1]), torch.randn_like(kc[:1, :1])
        table = torch.tensor([[1, 0]], dtype=torch.int32, device="cuda")
        lens = torch.tensor([6], dtype=torch.int32, device="cuda")
        for splits in (1, 2):
            call = kvcache_call(qd, kc, vc, rk.RopeConfig(d), cache_seqlens=lens, k_new=kn, v_new=vn, block_table=table)
            _cuda.backend.kvcache(call, num_splits=splits)
    rk.apply_rope(torch.randn(3, 2, 64, device="cuda"), rk.RopeConfig(64), backend="cuda")
    torch.cuda.synchronize()


@gpu
def test_opcheck():
    """Schema, fake and CUDA kernel agree (the fakes are registered with the ops by ropekern.backends.native)."""
    _cuda_ready()
    q, k, v, _ = random_qkv(1, 17, 17, 2, 1, 64, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.ropekern.fwd.default, attention_call(q, k, v, rk.RopeConfig(64)).op_args())
    x = torch.randn(2, 5, 2, 64, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.ropekern.apply_rope.default, rope_call(x, rk.RopeConfig(64)).op_args())
