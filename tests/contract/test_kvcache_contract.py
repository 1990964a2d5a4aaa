"""The contract of ``rope_attention_with_kvcache``, held by every registered backend (dense and
paged caches).

* every scaling law's example, fp32 and bf16, under the docs/design.md §5 rule on out and LSE,
  with cached lengths on both sides of the law's switch (each key rotated with the table of its
  sequence's current length);
* the new tokens written in place, un-rotated, at ``cache_seqlens`` (which is not modified), and
  nothing else in the caches touched; slots past a sequence's length hold NaN and never leak;
* GQA / MQA, partial rotary and interleaved pairs; q / k_new / v_new and the caches as strided
  views of packed buffers;
* empty inputs: batch 0, no queries (with and without new tokens), empty caches filled by the call;
* rotation off (``call.rotate = False``) is plain attention over the cache.

Positions here are implicit (key j of sequence b sits at j, queries at the last Sq slots), so large
positions need caches of ~2**20 keys: the per-backend files test those.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern import reference
from ropekern._validation import kvcache_call

from contract_support import BF16, DTYPES, F32, HEAD_LAYOUTS, assert_rule, check_kvcache, law_rope, param_id, yarn_rope

BLOCK = 16  # paged block size (the Triton decode kernel takes powers of two)
PAGED = [None, BLOCK]


def _ids(block):
    return "paged" if block else "dense"


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("rope_type", rk.ROPE_TYPES)
def test_every_law(backend, rope_type, dtype):
    """Sequences of 5 and 22 keys after a 2-token append: below and past the switch at 16."""
    rope = law_rope(rope_type, length=16)
    for block in PAGED:
        case = backend.cache((3, 20), s_new=2, sq=2, hq=4, hkv=2, dtype=dtype, block=block, seed=1)
        check_kvcache(backend, rope, **case)


@pytest.mark.parametrize("block", PAGED, ids=_ids)
@pytest.mark.parametrize("hq,hkv,rotary_dim,interleaved,dtype", HEAD_LAYOUTS, ids=param_id)
def test_heads_and_rotary_layouts(backend, hq, hkv, rotary_dim, interleaved, dtype, block):
    """Decode (Sq 1) over a cache that already holds the query's token (no new tokens), and a
    causal chunk of 3 appended queries; GQA groups of 1 to 8 rows per KV head."""
    rope = yarn_rope(rotary_dim=rotary_dim, interleaved=interleaved)
    for sq, s_new in ((1, 0), (3, 3)):
        case = backend.cache((4, 25), s_new=s_new, sq=sq, hq=hq, hkv=hkv, dtype=dtype, block=block, seed=sq)
        check_kvcache(backend, rope, **case)


@pytest.mark.parametrize("block", PAGED, ids=_ids)
def test_strided_views_of_packed_buffers(backend, block):
    """q / k_new / v_new are head slices of one packed qkv buffer, the caches the two halves of one
    [.., 2, Hkv, D + 8] buffer; padding columns hold NaN. The append lands through the views."""
    case = backend.cache((11, 30), s_new=2, sq=2, hq=4, hkv=2, dtype=BF16, block=block, seed=3)
    q, kc = case["q"], case["k_cache"]
    b, sq, hq, d = q.shape
    hkv = kc.shape[2]
    qkv = torch.full((b, sq, hq + 2 * hkv, d + 8), float("nan"), dtype=q.dtype, device=q.device)
    qkv[..., :d] = torch.cat([q, case["k_new"], case["v_new"]], dim=2)
    kv = torch.full((*kc.shape[:2], 2, hkv, d + 8), float("nan"), dtype=q.dtype, device=q.device)
    kv[:, :, 0, :, :d], kv[:, :, 1, :, :d] = kc, case["v_cache"]
    views = dict(
        q=qkv[..., :hq, :d],
        k_new=qkv[..., hq : hq + hkv, :d],
        v_new=qkv[..., hq + hkv :, :d],
        k_cache=kv[:, :, 0, :, :d],
        v_cache=kv[:, :, 1, :, :d],
    )
    assert not any(t.is_contiguous() for t in views.values())
    out, lse = check_kvcache(backend, yarn_rope(), **dict(case, **views))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", PAGED, ids=_ids)
def test_empty_caches_and_inputs(backend, block, causal):
    """Empty caches filled by the call (a chunked prefill), then calls with nothing to attend:
    batch 0, and Sq 0 with and without new tokens (those are still appended)."""
    rope = law_rope("longrope", length=16)
    case = backend.cache((0, 0), s_new=6, sq=6, hq=4, hkv=2, dtype=BF16, block=block, seed=5)
    check_kvcache(backend, rope, causal=causal, **case)
    empty = backend.cache((), s_new=1, sq=1, hq=4, hkv=2, dtype=BF16)
    out, lse = backend.kvcache(rope=rope, causal=causal, **empty)
    assert out.shape == (0, 1, 4, rope.head_dim) and lse.shape == (0, 4, 1) and lse.dtype == F32
    for s_new in (0, 2):
        case = backend.cache((3, 9), s_new=s_new, sq=1, hq=4, hkv=2, dtype=BF16, block=block, seed=6)
        case["q"] = case["q"][:, :0]
        kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
        if s_new:
            reference.append_kv(kvcache_call(case["q"], kc, vc, rope, **_cache_args(case)))
        out, lse = backend.kvcache(rope=rope, causal=causal, **case)
        assert out.shape == (2, 0, 4, rope.head_dim) and lse.shape == (2, 4, 0) and lse.dtype == F32
        assert torch.equal(case["k_cache"].nan_to_num(7.0), kc.nan_to_num(7.0))
        assert torch.equal(case["v_cache"].nan_to_num(7.0), vc.nan_to_num(7.0))


def _cache_args(case):
    return {key: case[key] for key in ("cache_seqlens", "k_new", "v_new", "block_table")}


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("block", PAGED, ids=_ids)
def test_rotation_off_is_plain_attention(backend, block, dtype):
    """``call.rotate = False`` runs the backend's cache kernel without RoPE (nor its attention
    factor): the rule against plain fp64 attention over the cache."""
    rope = yarn_rope()
    case = backend.cache((5, 21), s_new=1, sq=2, hq=4, hkv=2, dtype=dtype, block=block, seed=7)

    def call(dt=None, rotate=False):
        cast = {k: v.to(dt) if dt and v is not None and v.is_floating_point() else v for k, v in case.items()}
        cast = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cast.items()}
        c = kvcache_call(cast.pop("q"), cast.pop("k_cache"), cast.pop("v_cache"), rope, **cast)
        c.rotate = rotate
        return c

    out, lse = backend.run_call(call())
    o64, l64 = reference.kvcache(call(torch.float64))
    ob, lb = reference.kvcache(call(), compute_dtype=dtype)
    assert_rule(out, o64, ob, dtype, "out")
    assert_rule(lse, l64, lb.float(), F32, "lse")
    rotated, _ = reference.kvcache(call(torch.float64, rotate=True))
    assert float((rotated - o64).abs().max()) > 0.1  # rotation matters here: the test can fail
