"""A NaN or an infinity in V at a key a row cannot see never reaches that row (README, "Numerics": masked
probabilities are selected, never multiplied), on every backend that runs here, forward and backward.

The poisoned runs are compared with the same call where the poisoned V entries are 0: rows that see
no poisoned key must be identical and finite; rows that see one must be non-finite exactly where the
fp64 oracle is (NaN where a row sees a NaN or infinities of both signs in a channel, else the
infinity). NaN in K, in other varlen sequences and in unused cache slots is tested with each
backend. The CUDA kernel's P·V is tested the same way under the emulator
(``csrc/tests/test_cuda_emulated.cpp``, "NaN/inf in masked V").
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import oracle_attention, oracle_kvcache

NAN, INF = float("nan"), float("inf")


def _backends():
    ok = rk.available_backends()
    return [b for b in ("torch", "cpu", "triton") if ok.get(b) is True]


BACKENDS = _backends()


def _poison(v: torch.Tensor, entries) -> tuple[torch.Tensor, torch.Tensor]:
    """(poisoned copy, copy with those entries 0); entries: (token index tuple, channel, value)."""
    bad, clean = v.clone(), v.clone()
    for index, channel, value in entries:
        bad[index + (..., channel)] = value
        clean[index + (..., channel)] = 0.0
    return bad, clean


def _same_nonfinite(out: torch.Tensor, oracle: torch.Tensor) -> bool:
    o, r = out.double(), oracle.double()
    return bool(torch.equal(torch.isnan(o), torch.isnan(r)) and torch.equal(torch.isinf(o), torch.isinf(r))) and bool(
        (o[torch.isinf(r)] == r[torch.isinf(r)]).all()
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sq,sk", [(40, 40), (17, 70), (70, 70)])
def test_dense_causal(backend, dtype, sq, sk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, sq, 4, 32), torch.randn(2, sk, 2, 32), torch.randn(2, sk, 2, 32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    off = sk - sq
    # keys that the first rows cannot see: NaN, +inf next to -inf in one channel, +inf alone
    first = off + 3
    entries = [((0, first), 3, NAN), ((0, off + 10), 7, INF), ((0, off + 11), 7, -INF), ((1, sk - 2), 9, INF)]
    bad, clean = _poison(v, entries)
    rope = rk.RopeConfig(32)
    out = rk.rope_attention(q, k, bad, rope, causal=True, backend=backend)
    ref = rk.rope_attention(q, k, clean, rope, causal=True, backend=backend)
    assert torch.equal(out[0, :3], ref[0, :3]) and bool(torch.isfinite(out[0, :3]).all())
    assert torch.equal(out[1, : sq - 2], ref[1, : sq - 2])
    oracle, _ = oracle_attention(q, k, bad, rope, causal=True)
    assert _same_nonfinite(out, oracle)
    assert out[0, 3:, :, 3].isnan().all() and out[0, 11:, :, 7].isnan().all() and (out[0, 10, :, 7] == INF).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_causal(backend):
    torch.manual_seed(1)
    lens_q, lens_k = [5, 30], [9, 60]
    q, k, v = torch.randn(sum(lens_q), 2, 64), torch.randn(sum(lens_k), 1, 64), torch.randn(sum(lens_k), 1, 64)
    cu_q = torch.tensor([0, 5, 35], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 69], dtype=torch.int32)
    # sequence 1 (keys 9..68, queries see keys j <= i + 30): key 40 of the sequence is hidden from rows 0..9
    bad, clean = _poison(v, [((9 + 40,), 5, NAN), ((8,), 1, -INF)])
    rope = rk.RopeConfig(64)
    kw = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=30, max_seqlen_k=60)
    out = rk.rope_attention(q, k, bad, rope, backend=backend, **kw)
    ref = rk.rope_attention(q, k, clean, rope, backend=backend, **kw)
    assert torch.equal(out[5:15], ref[5:15]) and bool(torch.isfinite(out[5:15]).all())
    assert torch.equal(out[:4], ref[:4])  # sequence 0: key 8 is seen only by its last row
    assert _same_nonfinite(out, oracle_attention(q, k, bad, rope, **kw)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_causal_several_queries(backend, paged):
    """Sq = 6 new tokens appended and attended causally: query i sees keys <= n - 6 + i."""
    torch.manual_seed(2)
    kc, vc = torch.randn(2, 32, 2, 32), torch.randn(2, 32, 2, 32)
    q, kn, vn = torch.randn(2, 6, 4, 32), torch.randn(2, 6, 2, 32), torch.randn(2, 6, 2, 32)
    lens = torch.tensor([0, 10], dtype=torch.int32)
    bad, clean = _poison(vn, [((0, 2), 0, NAN), ((1, 4), 31, INF)])
    rope = rk.RopeConfig(32)
    kw = dict(cache_seqlens=lens, k_new=kn)
    if paged:  # 4 blocks of 16 slots, sequence 1 in blocks 3 and 0
        kc, vc = kc.reshape(4, 16, 2, 32), vc.reshape(4, 16, 2, 32)
        kw["block_table"] = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)

    def run(v_new):
        return rk.rope_attention_with_kvcache(q, kc.clone(), vc.clone(), rope, v_new=v_new, backend=backend, **kw)

    out, ref = run(bad), run(clean)
    assert torch.equal(out[0, :2], ref[0, :2]) and torch.equal(out[1, :4], ref[1, :4])
    oracle, _ = oracle_kvcache(q, kc, vc, rope, v_new=bad, **kw)
    assert _same_nonfinite(out, oracle)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"] + ["torch"])
def test_backward(backend):
    """Loss over the rows that cannot see the NaN key: their dQ and every dV are finite and equal
    those of the run with that V entry 0 (dK and the other rows' dQ legitimately carry the NaN:
    dO . V is NaN for the rows that see it)."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 40, 2, 32), torch.randn(1, 40, 1, 32), torch.randn(1, 40, 1, 32)
    bad, clean = _poison(v, [((0, 5), 3, NAN)])
    rope = rk.RopeConfig(32)

    def grads(vv):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, vv))
        out = rk.rope_attention(qq, kk, vv, rope, causal=True, backend=backend)
        out[:, :5].sum().backward()
        return qq.grad, vv.grad

    (dq, dv), (dq0, dv0) = grads(bad), grads(clean)
    assert torch.equal(dq[:, :5], dq0[:, :5]) and bool(torch.isfinite(dq[:, :5]).all())
    assert torch.equal(dv, dv0) and bool(torch.isfinite(dv).all())
