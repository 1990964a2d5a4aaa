"""flash-attn's sliding window (``window_size=(left, right)``) on both attention entry points.

The oracle is written here from flash-attn's rule (``flash_attn_func`` docstring): query i of a
sequence with Sq queries and Sk keys sees key j iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``
(-1 unbounded; ``causal`` bounds the right side at the diagonal), rows that see no key give zeros
and LSE ``-inf``. Each backend that takes windows is held to the error-ratio rule (docs/design.md
§5) against it in float64, with the same formula in float32 as the baseline; gradients with factor 3.
The backends that do not take windows refuse them, and ``auto`` moves on.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import error_check, random_qkv

F64 = torch.float64
BACKENDS = [name for name, ok in rk.available_backends().items() if ok is True]
D = 64


def _rope():
    return rk.RopeConfig(D, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})


def flash_window(q, k, v, rope, window, causal, dtype=F64):
    """flash-attn's windowed attention on dense ``[B, S, H, D]`` inputs at positions ``0..S-1``."""
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    cq, sq_ = (t.to(dtype) for t in rope.cos_sin((torch.arange(sq) + sk - sq).clamp_min(0)))
    ck, sk_ = (t.to(dtype) for t in rope.cos_sin(torch.arange(sk)))
    qr, kr = _rotate(q.to(dtype), cq, sq_), _rotate(k.to(dtype), ck, sk_)
    kr, vr = (t.repeat_interleave(hq // hkv, dim=2) for t in (kr, v.to(dtype)))
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * D**-0.5
    rows = torch.arange(sq)[:, None] + sk - sq
    keys = torch.arange(sk)[None, :]
    left, right = window
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        keep &= keys <= rows
    if left >= 0:
        keep &= keys >= rows - left
    if right >= 0:
        keep &= keys <= rows + right
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    if bool(torch.isfinite(vr).all()):
        return torch.einsum("bhqk,bkhd->bqhd", p, vr), lse
    # a key outside the window contributes nothing, even a NaN in its V (select, never 0 * NaN)
    prod = p[..., None] * vr.permute(0, 2, 1, 3)[:, :, None]  # [B, H, Sq, Sk, D]
    out = torch.where(keep[None, None, :, :, None], prod, torch.zeros_like(prod)).sum(-2)
    return out.permute(0, 2, 1, 3), lse


def _rotate(x, cos, sin):
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


WINDOWS = [
    ((16, -1), True),  # Mistral-style: the last 17 keys, causal
    ((0, -1), True),  # each query sees only its own key
    ((5, 3), False),  # a band around the diagonal
    ((-1, 2), False),  # right bound only
    ((40, 40), False),  # wider than the sequence: no key masked
]


def _windowed_backends():
    return [b for b in BACKENDS if b in ("torch", "cpu", "triton")]


@pytest.mark.parametrize("backend", _windowed_backends())
@pytest.mark.parametrize(("window", "causal"), WINDOWS, ids=[f"{w}-{'causal' if c else 'full'}" for w, c in WINDOWS])
@pytest.mark.parametrize(
    "shape", [(37, 37), (5, 70), (70, 20), (300, 333)], ids=["square", "decode-like", "more-queries", "blocks"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_attention_window(backend, window, causal, shape, dtype):
    sq, sk = shape
    q, k, v, _ = random_qkv(2, sq, sk, 4, 2, D, dtype=dtype, seed=sq + sk)
    rope = _rope()
    o64, l64 = flash_window(q, k, v, rope, window, causal)
    o32, l32 = flash_window(q, k, v, rope, window, causal, dtype)  # the baseline: all in the input dtype
    out, lse = rk.rope_attention(q, k, v, rope, causal=causal, window_size=window, return_lse=True, backend=backend)
    assert error_check(out, o64, o32).ok, error_check(out, o64, o32)
    assert error_check(lse, l64, l32).ok, error_check(lse, l64, l32)


@pytest.mark.parametrize("backend", _windowed_backends())
def test_window_with_nonfinite_values_outside_it(backend):
    """A NaN or an infinity in V of a key outside a row's window must not reach that row."""
    q, k, v, _ = random_qkv(1, 40, 40, 2, 2, D, seed=3)
    v[0, 2, 0, 5] = float("nan")
    v[0, 30, 1, 7] = float("inf")
    rope = _rope()
    o64, _ = flash_window(q, k, v, rope, (4, -1), True)
    out = rk.rope_attention(q, k, v, rope, causal=True, window_size=(4, -1), backend=backend)
    # rows 7.. do not see key 2; rows < 30 and > 34 do not see key 30
    assert torch.equal(torch.isnan(out), torch.isnan(o64)) and torch.equal(torch.isinf(out), torch.isinf(o64))
    assert bool(torch.isfinite(out[0, 7:30]).all())


@pytest.mark.parametrize("backend", _windowed_backends())
@pytest.mark.parametrize(("window", "causal"), [((8, -1), True), ((3, 2), False)], ids=["causal", "band"])
def test_kvcache_window(backend, window, causal):
    rope = _rope()
    gen = torch.Generator().manual_seed(4)
    b, smax, sq = 2, 700, 3
    k_cache, v_cache = (torch.randn(b, smax, 2, D, generator=gen) for _ in range(2))
    q = torch.randn(b, sq, 4, D, generator=gen)
    lens = torch.tensor([650, 9], dtype=torch.int32)  # 650 keys: the CPU decode splits them
    out = rk.rope_attention_with_kvcache(
        q, k_cache, v_cache, rope, cache_seqlens=lens, causal=causal, window_size=window, backend=backend
    )
    for i, n in enumerate(lens.tolist()):
        args = (q[i : i + 1], k_cache[i : i + 1, :n], v_cache[i : i + 1, :n], rope, window, causal)
        o64, _ = flash_window(*args)
        o32, _ = flash_window(*args, dtype=torch.float32)
        assert error_check(out[i : i + 1], o64, o32).ok, (i, error_check(out[i : i + 1], o64, o32))


@pytest.mark.parametrize("backend", _windowed_backends())
@pytest.mark.parametrize(("window", "causal"), [((6, -1), True), ((4, 3), False)], ids=["causal", "band"])
def test_window_gradients(backend, window, causal):
    rope = _rope()
    q, k, v, _ = random_qkv(1, 23, 29, 4, 2, D, seed=5)
    do = torch.randn_like(q)

    def grads(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        fn(*leaves)[0].backward(do.to(dtype))
        return [t.grad for t in leaves]

    got = grads(
        torch.float32, lambda *t: (rk.rope_attention(*t, rope, causal=causal, window_size=window, backend=backend),)
    )
    want = grads(F64, lambda *t: flash_window(*t, rope, window, causal))
    base = grads(torch.float32, lambda *t: flash_window(*t, rope, window, causal, torch.float32))
    for name, g, w, bl in zip("qkv", got, want, base):
        assert error_check(g, w, bl, factor=3.0).ok, (name, error_check(g, w, bl, factor=3.0))


def test_backends_without_windows_refuse_and_auto_moves_on():
    q, k, v, _ = random_qkv(1, 8, 8, 2, 2, D)
    rope = _rope()
    for name in set(BACKENDS) - set(_windowed_backends()):
        with pytest.raises(ValueError, match="sliding windows are not in"):
            rk.rope_attention(q, k, v, rope, causal=True, window_size=(2, -1), backend=name)
    out = rk.rope_attention(q, k, v, rope, causal=True, window_size=(2, -1))
    assert torch.allclose(out.double(), flash_window(q, k, v, rope, (2, -1), True)[0], atol=1e-5)


def test_window_size_errors():
    q, k, v, _ = random_qkv(1, 4, 4, 2, 2, D)
    rope = _rope()
    with pytest.raises(TypeError, match="`window_size` must be a \\(left, right\\) pair"):
        rk.rope_attention(q, k, v, rope, window_size=3)
    with pytest.raises(TypeError, match="`window_size`"):
        rk.rope_attention(q, k, v, rope, window_size=(1.0, 2))
    with pytest.raises(ValueError, match="must be >= -1"):
        rk.rope_attention(q, k, v, rope, window_size=(-2, 0))
