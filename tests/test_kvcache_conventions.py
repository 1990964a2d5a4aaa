"""flash-attn's KV-cache conventions expressed in ``rk.rope_attention_with_kvcache``, on every backend.

Each test writes flash-attn's rule (``flash_attn_with_kvcache``'s docstring and kernels) as a formula
over the raw cache in float64 (the oracle) and float32 (the baseline), and holds ropekern to the
error-ratio rule (docs/design.md §5) against them:

* ``cache_leftpad[b]``: row b's tokens start at that slot; ``cache_seqlens[b]`` is the end slot, so
  ``cache_seqlens - cache_leftpad`` tokens are cached, token t (position t) at slot ``pad + t``, and
  the new ones are appended at ``cache_seqlens[b]``.
* ``cache_batch_idx[b]``: query row b reads (and appends into) cache row ``cache_batch_idx[b]``.
* ``n < Sq``: fewer keys than queries. Causal: query i sees keys ``j <= i + n - Sq``, so the first
  ``Sq - n`` see none (zeros, LSE ``-inf``); queries sit at ``max(n - Sq + i, 0)``.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import error_check

F64 = torch.float64
BACKENDS = [name for name, ok in rk.available_backends().items() if ok is True]
D, HQ, HKV = 64, 4, 2


def _rope():
    return rk.RopeConfig(D, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})


def flash_kvcache(q, k_cache, v_cache, rope, seqlens, *, k_new=None, v_new=None, leftpad=None, batch_idx=None,
                  causal=True, dtype=F64):  # fmt: skip
    """flash-attn's rule on copies of the caches, in ``dtype``: ``(out, lse)``, LSE ``[B, Hq, Sq]``."""
    k_cache, v_cache = k_cache.clone().to(dtype), v_cache.clone().to(dtype)
    b, sq = q.shape[:2]
    outs, lses = [], []
    for i in range(b):
        row = int(batch_idx[i]) if batch_idx is not None else i
        pad = int(leftpad[i]) if leftpad is not None else 0
        end = int(seqlens[i])
        if k_new is not None:
            s_new = k_new.shape[1]
            k_cache[row, end : end + s_new] = k_new[i].to(dtype)
            v_cache[row, end : end + s_new] = v_new[i].to(dtype)
            end += s_new
        n = end - pad
        k, v = k_cache[row, pad:end], v_cache[row, pad:end]  # token t at slot pad + t
        cos, sin = rope.cos_sin(torch.arange(max(n, sq)))
        cos, sin = cos.to(dtype), sin.to(dtype)
        q_pos = (torch.arange(sq) + n - sq).clamp_min(0)
        qr = _rotate(q[i].to(dtype), cos[q_pos], sin[q_pos])
        kr = _rotate(k, cos[:n], sin[:n])
        kr, vr = (t.repeat_interleave(HQ // HKV, dim=1) for t in (kr, v))
        s = torch.einsum("qhd,khd->hqk", qr, kr) * D**-0.5
        if causal:
            keep = torch.arange(n)[None, :] <= torch.arange(sq)[:, None] + n - sq
            s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
        outs.append(torch.einsum("hqk,khd->qhd", p, vr))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _rotate(x, cos, sin):
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _case(b, cache_rows, smax, sq, s_new, seed):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(cache_rows, smax, HKV, D, generator=gen) for _ in range(2))
    q = torch.randn(b, sq, HQ, D, generator=gen)
    kv_new = [torch.randn(b, s_new, HKV, D, generator=gen) for _ in range(2)] if s_new else [None, None]
    return q, k_cache, v_cache, *kv_new


def _check(backend, q, k_cache, v_cache, seqlens, k_new=None, v_new=None, **kw):
    rope = _rope()
    flash = {
        "leftpad": kw.get("cache_leftpad"),
        "batch_idx": kw.get("cache_batch_idx"),
        "causal": kw.get("causal", True),
    }
    o64, l64 = flash_kvcache(q, k_cache, v_cache, rope, seqlens, k_new=k_new, v_new=v_new, **flash)
    o32, l32 = flash_kvcache(q, k_cache, v_cache, rope, seqlens, k_new=k_new, v_new=v_new, dtype=torch.float32, **flash)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = rk.rope_attention_with_kvcache(
        q, kc, vc, rope, cache_seqlens=seqlens, k_new=k_new, v_new=v_new, return_lse=True, backend=backend, **kw
    )
    assert error_check(out, o64, o32).ok, error_check(out, o64, o32)
    assert error_check(lse, l64, l32).ok, error_check(lse, l64, l32)
    return kc, vc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq", [1, 3])
def test_cache_leftpad(backend, sq):
    q, k_cache, v_cache, k_new, v_new = _case(3, 3, 48, sq, sq, seed=1)
    seqlens = torch.tensor([20, 33, 7], dtype=torch.int32)
    pad = torch.tensor([5, 0, 7], dtype=torch.int32)  # row 2: no cached token, only the new ones
    kc, vc = _check(backend, q, k_cache, v_cache, seqlens, k_new, v_new, cache_leftpad=pad)
    for i, end in enumerate(seqlens.tolist()):  # appended at the end slot, nothing else written
        assert torch.equal(kc[i, end : end + sq], k_new[i]) and torch.equal(vc[i, end : end + sq], v_new[i])
        assert torch.equal(kc[i, :end], k_cache[i, :end]) and torch.equal(kc[i, end + sq :], k_cache[i, end + sq :])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_leftpad_pages_of_its_power_of_two(backend):
    """Pads that are multiples of 16 (and Smax 64) read the cache in pages of 16, which every
    backend's paged path takes; odd pads give one-token pages."""
    q, k_cache, v_cache, k_new, v_new = _case(2, 2, 64, 1, 1, seed=2)
    seqlens = torch.tensor([40, 17], dtype=torch.int32)
    _check(backend, q, k_cache, v_cache, seqlens, k_new, v_new, cache_leftpad=torch.tensor([16, 0], dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_batch_idx(backend):
    q, k_cache, v_cache, k_new, v_new = _case(2, 5, 32, 2, 2, seed=3)
    idx = torch.tensor([4, 1], dtype=torch.int32)
    seqlens = torch.tensor([9, 30], dtype=torch.int32)
    kc, _ = _check(backend, q, k_cache, v_cache, seqlens, k_new, v_new, cache_batch_idx=idx)
    assert torch.equal(kc[4, 9:11], k_new[0]) and torch.equal(kc[1, 30:32], k_new[1])
    untouched = [0, 2, 3]
    assert torch.equal(kc[untouched], k_cache[untouched])
    # without an append, two query rows may read one cache row; with leftpad too
    q, k_cache, v_cache, _, _ = _case(3, 2, 48, 1, 0, seed=4)
    _check(
        backend, q, k_cache, v_cache, torch.tensor([10, 10, 40], dtype=torch.int32),
        cache_batch_idx=torch.tensor([1, 1, 0], dtype=torch.int32),
        cache_leftpad=torch.tensor([3, 0, 9], dtype=torch.int32),
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fewer_keys_than_queries(backend, causal):
    q, k_cache, v_cache, k_new, v_new = _case(2, 2, 32, 5, 1, seed=5)
    seqlens = torch.tensor([1, 0], dtype=torch.int32)  # n = 2 and 1 keys for 5 queries
    _check(backend, q, k_cache, v_cache, seqlens, k_new, v_new, causal=causal)
    # no keys at all: every row zeros and -inf
    out, lse = rk.rope_attention_with_kvcache(
        q, k_cache, v_cache, _rope(), cache_seqlens=torch.zeros(2, dtype=torch.int32), return_lse=True, backend=backend
    )
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_refusals_name_the_argument():
    q, k_cache, v_cache, k_new, v_new = _case(2, 3, 16, 1, 1, seed=6)
    rope, lens = _rope(), torch.tensor([3, 4], dtype=torch.int32)

    def call(rows=3, **kw):
        return rk.rope_attention_with_kvcache(
            q, k_cache[:rows].clone(), v_cache[:rows].clone(), rope, cache_seqlens=lens, **kw
        )

    with pytest.raises(ValueError, match=r"`cache_leftpad\[1\]` must be in \[0, cache_seqlens\[1\] = 4\]"):
        call(2, cache_leftpad=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="`cache_batch_idx` refers to cache row 3"):
        call(cache_batch_idx=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="repeats a cache row and `k_new` is given"):
        call(cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32), k_new=k_new, v_new=v_new)
    with pytest.raises(ValueError, match="cannot be combined with `block_table`"):
        call(cache_leftpad=torch.zeros(2, dtype=torch.int32), block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="`cache_leftpad` must be an int32"):
        call(2, cache_leftpad=torch.zeros(2))
    with pytest.raises(ValueError, match=r"`cache_batch_idx` must have shape \[2\]"):
        call(cache_batch_idx=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="dense `k_cache` batch"):
        call()
