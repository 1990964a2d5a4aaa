"""flash-attn's sliding window in the Triton prefill kernels: varlen, GQA, block skipping and the
backward (tests/test_sliding_window.py holds the dense forward sweep of every windowed backend).

Under the interpreter the kernels tile 32 x 32, so the shapes here span several query and key
blocks: the left-edge, unmasked and right-edge key phases of the forward / dQ kernels and the
query phases of the dK/dV kernel all run. The oracle is ``ropekern.reference`` in float64, the
baseline the same formula in the input dtype (error-ratio rule, gradients with factor 3).
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern import reference
from ropekern.testing import baseline_attention, error_check, random_qkv

F32, BF16 = torch.float32, torch.bfloat16
D = 64


def _rope():
    return rk.RopeConfig(D, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})


def _grads(fn, q, k, v, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    out.backward(dout.to(dtype))
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


def check(q, k, v, **kw):
    """Triton's out, LSE and gradients against the oracle; returns Triton's ``(out, lse, dq, dk, dv)``."""
    rope = _rope()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to(q.dtype)

    def triton(*t):
        return rk.rope_attention(*t, rope, backend="triton", return_lse=True, **kw)

    def oracle(*t):
        return reference.rope_attention(*t, rope, return_lse=True, **kw)

    def baseline(*t):
        return baseline_attention(*t, rope, **kw)

    got = _grads(triton, q, k, v, dout, q.dtype)
    exact = _grads(oracle, q, k, v, dout, torch.float64)
    base = _grads(baseline, q, k, v, dout, q.dtype)
    for name, g, o, b in zip(("out", "lse", "dq", "dk", "dv"), got, exact, base):
        res = error_check(g, o, b, q.dtype, factor=2.0 if name in ("out", "lse") else 3.0)
        assert res.ok, f"{name} {res}"
    return got


# Three sequences: more queries than keys (40 / 20: with a causal window the first 20 queries see
# no key), more keys than queries across several blocks, and a short query run against 70 keys.
_VARLEN = ([40, 70, 5], [20, 100, 70])


@pytest.mark.parametrize(
    ("window", "causal", "dtype"),
    [((10, -1), True, F32), ((6, 9), False, F32), ((33, 0), False, BF16)],
    ids=["causal", "band", "left-only-bf16"],
)
def test_varlen_window(window, causal, dtype):
    q, k, v, cu = random_qkv(1, 0, 0, 4, 2, D, dtype=dtype, seed=1, varlen_lengths=_VARLEN)
    out, lse, dq, *_ = check(
        q, k, v, causal=causal, window_size=window, max_seqlen_q=70, max_seqlen_k=100, **cu
    )  # fmt: skip
    if causal:  # sequence 0: queries 0..19 are left of every key (i + Sk - Sq < 0)
        assert torch.equal(out[:20], torch.zeros_like(out[:20])) and torch.equal(dq[:20], torch.zeros_like(dq[:20]))
        assert bool(torch.isneginf(lse[:, :20]).all()) and bool(torch.isfinite(lse[:, 20:40]).all())


@pytest.mark.parametrize(
    ("shape", "window", "causal"),
    [
        ((100, 130), (35, -1), True),
        ((100, 130), (40, 40), False),
        ((70, 20), (8, -1), True),
        ((9, 100), (-1, 3), False),
    ],
    ids=["causal", "band", "rows-without-keys", "right-only"],
)
def test_gqa_window_backward(shape, window, causal):
    """GROUP 3: the dK/dV program sums every query head of its group over the query blocks that the
    window leaves it; rows that see no key (70 queries, 20 keys, causal) get no gradient."""
    sq, sk = shape
    q, k, v, _ = random_qkv(1, sq, sk, 6, 2, D, seed=2)
    _, lse, dq, _, _ = check(q, k, v, causal=causal, window_size=window)
    if shape == (70, 20):
        assert bool(torch.isneginf(lse[:, :, :50]).all()) and not bool(dq[:, :50].any())


def test_nonfinite_values_outside_the_window_backward():
    """A NaN in V of key 2 reaches, with a causal window of 4, only queries 2..6 and through their
    delta the gradients of keys 0..6: everything else stays finite (select, never 0 * NaN)."""
    q, k, v, _ = random_qkv(1, 40, 40, 2, 2, D, seed=3)
    v[0, 2, 0, 5] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = rk.rope_attention(*leaves, _rope(), causal=True, window_size=(4, -1), backend="triton")
    out.backward(torch.randn_like(out))
    dq, dk, dv = (t.grad for t in leaves)
    assert bool(torch.isfinite(out[0, 7:]).all()) and bool(torch.isfinite(out[0, :2]).all())
    assert bool(torch.isfinite(dq[0, 7:]).all()) and bool(torch.isfinite(dq[0, :2]).all())
    assert bool(torch.isfinite(dk[0, 7:]).all()) and bool(torch.isfinite(dv).all())
    assert bool(torch.isnan(dq[0, 2:7, 0]).any()) and bool(torch.isfinite(dq[0, :, 1]).all())


def test_unwindowed_calls_unchanged():
    """(-1, -1) compiles the kernels without the window code (the plain call's result, exactly); a
    window wider than the sequence runs the windowed kernel to the same result."""
    q, k, v, _ = random_qkv(1, 33, 33, 2, 2, D, seed=4)
    rope = _rope()
    plain = rk.rope_attention(q, k, v, rope, causal=True, backend="triton")
    again = rk.rope_attention(q, k, v, rope, causal=True, window_size=(-1, -1), backend="triton")
    wide = rk.rope_attention(q, k, v, rope, causal=True, window_size=(64, -1), backend="triton")
    assert torch.equal(plain, again)
    assert torch.allclose(plain, wide, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- GPU configs
def test_window_configs_leave_out_their_spills():
    """The windowed forward keeps the unwindowed configs less those it spills in
    (``_WINDOW_SPILLS``, ``_WINDOW_SPILLS_GQA``); the windowed dQ keeps (128, 16, 8, 1) alone on sm_90."""
    import triton

    from ropekern._triton import attention as A
    from ropekern._triton import backward as B

    every = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in dict.fromkeys(A._AMPERE + A._HOPPER)
    ]

    def shapes(major, d, group, window):
        kept = A.select_configs(every, major, 232448, 2, d, d, group, window=window)
        return {A.config_shape(c) for c in kept}

    for major, d, group, gone in ((9, 128, 1, (64, 64, 8, 3)), (9, 256, 1, (32, 32, 8, 2)), (8, 64, 4, (64, 64, 8, 3))):
        plain, windowed = shapes(major, d, group, False), shapes(major, d, group, True)
        assert gone in plain and windowed == plain - {gone}
    assert shapes(9, 64, 1, True) == shapes(9, 64, 1, False)

    dq = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in B._DQ]
    kept = B.select_configs(dq, "dq", 232448, 2, 128, 128, 9, window=True)
    assert {B.config_shape(c) for c in kept} == {(128, 16, 8, 1)}


# Windowed variants of the configs the pruners keep (Triton 3.9's ptxas: no spills): the largest
# sm_90 forward tile at D = 128, the only fp32 D = 256 config (which spilled 284 B per thread while
# the band's edges ran in two loops), and the spill-free backward configs.
_WINDOW_COMPILED = (
    "aot.compile_attention(90, 'bf16', 128, block=(128, 32, 8, 3), window=True)",
    "aot.compile_attention(90, 'fp32', 256, block=(32, 16, 8, 1), window=True)",
    "aot.compile_backward(90, 'bf16', 64, kernel='dkdv', group=4, window=True)",
    "aot.compile_backward(90, 'bf16', 128, kernel='dq', group=1, block=(128, 16, 8, 1), window=True)",
)


def test_windowed_kernels_compile_without_spills():
    """Compile the windowed kernels for sm_90 through Triton's real pipeline (bundled ptxas, no GPU)."""
    import ast
    import os
    import subprocess
    import sys

    import triton

    from ropekern._triton import _release

    code = "from ropekern._triton import aot\n" + "".join(f"print({call})\n" for call in _WINDOW_COMPILED)
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(_WINDOW_COMPILED), proc.stdout
    for call, line in zip(_WINDOW_COMPILED, lines):
        usage = ast.literal_eval(line)
        assert usage["registers"] > 0, (call, usage)
        if _release(triton.__version__) == (3, 9):  # the release the figures were measured with
            assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (call, usage)
