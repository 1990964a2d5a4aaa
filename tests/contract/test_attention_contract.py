"""The contract of ``rope_attention``, held by every registered backend (dense and varlen layouts).

* every scaling law's example, fp32 and bf16, under the docs/design.md §5 error-ratio rule on out
  and LSE, with per-sequence tables for the length-dependent laws;
* explicit positions with repeats and jumps, and large positions up to ``MAX_POSITION`` (an
  absolute bound there: the rule's fp32-angle baseline is as wrong as a broken kernel);
* q, k, v as strided views of one packed buffer whose padding holds NaN;
* GQA / MQA, partial rotary and interleaved pairs;
* empty inputs, and rows that see no key (causal Sq > Sk, varlen sequences without keys): zeros
  and LSE -inf;
* rotation off (``call.rotate = False``, the benchmarks' switch) is plain attention.

Shapes stay within one or two 32 x 32 tiles: the Triton backend runs them in its interpreter here.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern import reference
from ropekern._validation import attention_call
from ropekern.testing import baseline_attention, oracle_attention

from contract_support import (
    BF16,
    DTYPES,
    F32,
    HEAD_LAYOUTS,
    LARGE_POSITIONS,
    D,
    assert_rule,
    check_attention,
    check_large_positions,
    exact_angle_attention,
    law_rope,
    param_id,
    yarn_rope,
)


def _no_key_rows(out, lse, rows) -> None:
    """Rows ``rows`` (a slice of the token axis of out) saw no key: exact zeros and LSE -inf."""
    if out.dim() == 4:
        assert (out[:, rows] == 0).all() and torch.isneginf(lse[:, :, rows]).all()
    else:
        assert (out[rows] == 0).all() and torch.isneginf(lse[:, rows]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("rope_type", rk.ROPE_TYPES)
def test_every_law(backend, rope_type, dtype):
    """Dense: sequence 0 stays below the trained length, sequence 1 goes past it, so the
    length-dependent laws need one table per sequence. Varlen: default positions restarting per
    sequence, lengths on both sides of it, Sq < Sk."""
    rope = law_rope(rope_type)
    q, k, v, _ = backend.qkv(2, 9, 24, 2, 1, dtype=dtype)
    k_pos = backend.ints([list(range(24)), list(range(40, 64))])
    check_attention(backend, q, k, v, rope, causal=True, q_positions=k_pos[:, -9:], k_positions=k_pos)
    q, k, v, extra = backend.qkv(2, 0, 0, 2, 1, dtype=dtype, seed=1, varlen=([5, 9], [12, 40]))
    check_attention(backend, q, k, v, rope, causal=True, **extra)


@pytest.mark.parametrize("hq,hkv,rotary_dim,interleaved,dtype", HEAD_LAYOUTS, ids=param_id)
def test_heads_and_rotary_layouts(backend, hq, hkv, rotary_dim, interleaved, dtype):
    """GQA groups split across tiles, pass-through channels (copied, never rotated), both pair
    layouts; dense causal and varlen non-causal."""
    rope = yarn_rope(rotary_dim=rotary_dim, interleaved=interleaved)
    q, k, v, _ = backend.qkv(2, 19, 37, hq, hkv, dtype=dtype)
    check_attention(backend, q, k, v, rope, causal=True)
    q, k, v, extra = backend.qkv(2, 0, 0, hq, hkv, dtype=dtype, seed=1, varlen=([7, 13], [20, 9]))
    check_attention(backend, q, k, v, rope, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_repeated_and_jumping_positions(backend, dtype):
    """Positions are data: parallel context windows (two windows sharing positions 0..19) and a
    prefix-reuse jump to 5000; queries after both. Dynamic NTK: each sequence's table follows its
    largest key position (20 and 5030)."""
    rope = law_rope("dynamic", rotary_dim=48)
    windows = list(range(20)) * 2
    jump = list(range(10)) + list(range(5000, 5030))
    k_pos = backend.ints([windows, jump])
    q_pos = backend.ints([list(range(20, 32)), list(range(5030, 5042))])
    q, k, v, _ = backend.qkv(2, 12, 40, 2, 2, dtype=dtype)
    for causal in (False, True):
        check_attention(backend, q, k, v, rope, causal=causal, q_positions=q_pos, k_positions=k_pos)
    # varlen: the same two sequences packed, with a repeated query position
    q, k, v, extra = backend.qkv(2, 0, 0, 2, 2, dtype=dtype, seed=1, varlen=([12, 12], [40, 40]))
    q_pos = backend.ints(list(range(20, 32)) + [5030] * 4 + list(range(5031, 5039)))
    check_attention(
        backend, q, k, v, rope, causal=True, q_positions=q_pos, k_positions=backend.ints(windows + jump), **extra
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("causal", [False, True])
def test_large_positions(backend, causal, dtype):
    """Explicit positions spread over the whole accepted range (with repeats and a jump of 2**30)."""
    sq, sk = 6, len(LARGE_POSITIONS)
    q, k, v, _ = backend.qkv(2, sq, sk, 2, 1, dtype=dtype, seed=1)
    top = rk.scaling.MAX_POSITION
    k_pos = backend.ints([LARGE_POSITIONS, [top - 11 + j // 2 for j in range(sk)]])
    q_pos = torch.cat([k_pos[:, -sq:-1], backend.ints([[top], [top]])], dim=1)
    rope = rk.RopeConfig(D, base=500000.0, scaling={"rope_type": "linear", "factor": 4.0})
    dense = dict(causal=causal, q_positions=q_pos, k_positions=k_pos)
    varlen = dict(
        causal=causal,
        q_positions=q_pos.flatten(),
        k_positions=k_pos.flatten(),
        cu_seqlens_q=backend.ints([0, sq, 2 * sq]).int(),
        cu_seqlens_k=backend.ints([0, sk, 2 * sk]).int(),
    )
    for kw, (qq, kk, vv) in ((dense, (q, k, v)), (varlen, (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)))):
        out, _ = backend.attention(qq, kk, vv, rope, **kw)
        oracle, _ = oracle_attention(qq, kk, vv, rope, **kw)
        fp32_angles, _ = baseline_attention(qq, kk, vv, rope, **kw)
        exact, _ = exact_angle_attention(qq, kk, vv, rope, **kw)
        check_large_positions(out, oracle, fp32_angles, exact, dtype)


@pytest.mark.parametrize("d,dtype", [(D, F32), (D, BF16), (80, BF16)], ids=param_id)
def test_strided_views_of_packed_qkv(backend, d, dtype):
    """q, k, v are head slices of one packed [.., Hq + 2 Hkv, 96] buffer (non-contiguous, last dim
    dense) whose padding columns and padding tokens hold NaN: never read, never leaked (D 80 is
    also what kernels pad to a power of two)."""
    rope = yarn_rope(d, rotary_dim=48, interleaved=True)
    hq, hkv, s = 4, 2, 37
    gen = torch.Generator().manual_seed(2)
    buf = torch.full((2, s + 3, hq + 2 * hkv, 96), float("nan"), dtype=dtype)
    buf[:, :s, :, :d] = torch.randn(2, s, hq + 2 * hkv, d, generator=gen).to(dtype)
    buf = buf.to(backend.device)
    q, k, v = buf[:, :s, :hq, :d], buf[:, :s, hq : hq + hkv, :d], buf[:, :s, hq + hkv :, :d]
    assert not q.is_contiguous() and k.stride(1) == (hq + 2 * hkv) * 96
    out, lse = check_attention(backend, q, k, v, rope, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # varlen: the tokens of both sequences in one packed buffer
    packed = buf[:, :s].flatten(0, 1)
    q, k, v = packed[:, :hq, :d], packed[:, hq : hq + hkv, :d], packed[:, hq + hkv :, :d]
    cu = backend.ints([0, 20, 2 * s]).int()
    out, lse = check_attention(backend, q, k, v, rope, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_empty_inputs(backend):
    """Batch 0, Sq 0, Sk 0 and an empty varlen batch: the right shapes, zeros and LSE -inf."""
    rope = law_rope("dynamic")
    for b, sq, sk in ((0, 5, 5), (2, 0, 5), (2, 5, 0)):
        q, k, v, _ = backend.qkv(b, sq, sk, 4, 2, dtype=BF16)
        out, lse = backend.attention(q, k, v, rope, causal=True)
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, 4, sq) and lse.dtype == F32
        assert (out == 0).all() and torch.isneginf(lse).all()
    for lens in (([], []), ([0, 0], [0, 3]), ([0, 4], [0, 0])):
        q, k, v, extra = backend.qkv(0, 0, 0, 4, 2, dtype=BF16, varlen=lens)
        out, lse = backend.attention(q, k, v, rope, **extra)
        assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and lse.dtype == F32
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_rows_without_keys(backend, dtype):
    """Bottom-right causal with Sq > Sk leaves the first Sq - Sk rows without a key; a varlen
    sequence with queries but no keys sees none at all. Those rows: zeros and LSE -inf, never NaN;
    the other rows: the rule."""
    rope = yarn_rope()
    q, k, v, _ = backend.qkv(2, 9, 4, 2, 1, dtype=dtype)
    out, lse = check_attention(backend, q, k, v, rope, causal=True)
    _no_key_rows(out, lse, slice(0, 5))
    assert torch.isfinite(lse[:, :, 5:]).all()
    # sequences: keys but no queries; Sq 7 > Sk 3; queries but no keys
    lens = ([0, 7, 4], [6, 3, 0])
    q, k, v, extra = backend.qkv(3, 0, 0, 2, 1, dtype=dtype, seed=1, varlen=lens)
    for causal in (False, True):
        out, lse = check_attention(backend, q, k, v, rope, causal=causal, **extra)
        _no_key_rows(out, lse, slice(7, 11))
        if causal:
            _no_key_rows(out, lse, slice(0, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_rotation_off_is_plain_attention(backend, dtype):
    """``call.rotate = False`` runs the backend's kernel without RoPE (nor its attention factor):
    the rule against plain fp64 attention, with plain attention in the test dtype as baseline."""
    rope = yarn_rope()
    for varlen in (None, ([9, 20], [30, 20])):
        q, k, v, extra = backend.qkv(2, 20, 30, 4, 2, dtype=dtype, varlen=varlen)
        call = attention_call(q, k, v, rope, causal=True, **extra)
        call.rotate = False
        out, lse = backend.run_call(call)
        plain = attention_call(q.double(), k.double(), v.double(), rope, causal=True, **extra)
        plain.rotate = False
        o64, l64 = reference.attention(plain)
        ob, lb = reference.attention(call, compute_dtype=dtype)
        assert_rule(out, o64, ob, dtype, "out")
        assert_rule(lse, l64, lb.float(), F32, "lse")
        rotated, _ = oracle_attention(q, k, v, rope, causal=True, **extra)
        assert float((rotated - o64).abs().max()) > 0.1  # rotation matters here: the test can fail
