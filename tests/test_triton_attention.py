"""The Triton fused RoPE + FlashAttention forward against the fp64 oracle (docs/design.md §5).

On a CPU-only machine the kernel runs under ``TRITON_INTERPRET=1`` (set by conftest), where the
single interpreter config uses 32 x 32 tiles: the shapes below (<= 129 tokens) are chosen to cross
several tiles, leave ragged tails and split GQA groups across tiles, while each call stays under
~1 s. With a GPU the same tests run on CUDA, plus the ``gpu``-marked 1K-16K tests.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern._validation import attention_call
from ropekern.backends import get_backend
from ropekern.testing import baseline_attention, error_check, oracle_attention, random_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def qkv(b, sq, sk, hq, hkv, d, dtype=F32, seed=0, varlen=None):
    return random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, seed=seed, varlen_lengths=varlen)


def run_triton(q, k, v, rope, **kw):
    return rk.rope_attention(q, k, v, rope, backend="triton", return_lse=True, **kw)


def check(q, k, v, rope, **kw):
    """Run the kernel and assert the error-ratio rule on out and LSE; returns (out, lse)."""
    out, lse = run_triton(q, k, v, rope, **kw)
    o, l_ = oracle_attention(q, k, v, rope, **kw)
    bo, bl = baseline_attention(q, k, v, rope, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == l_.shape and lse.dtype == torch.float32
    res = error_check(out, o, bo, q.dtype)
    assert res.ok, f"out {res}"
    res = error_check(lse, l_, bl, q.dtype)
    assert res.ok, f"lse {res}"
    return out, lse


# ---------------------------------------------------------------------------------- the sweep
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (1, 129), (113, 129), (129, 113), (40, 17)])
def test_seqlens(sq, sk, causal, dtype):
    """Lengths off the tile grid, Sq != Sk both ways (causal Sq > Sk leaves rows with no key)."""
    q, k, v, _ = qkv(1, sq, sk, 2, 1, 64, dtype)
    out, lse = check(q, k, v, rk.RopeConfig(64), causal=causal)
    if causal and sq > sk:
        assert (out[:, : sq - sk] == 0).all()
        assert torch.isneginf(lse[:, :, : sq - sk]).all()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True])
def test_fp16(causal):
    q, k, v, _ = qkv(2, 47, 71, 4, 2, 64, F16)
    check(q, k, v, rk.RopeConfig(64), causal=causal)


@pytest.mark.parametrize(
    "d,dtype",
    [(32, F32), (64, F16), (80, BF16), (80, F32), (96, BF16), (128, BF16), (256, F32), (256, BF16), (48, F16)],
)
def test_head_dims(d, dtype):
    """Non-powers of two are padded to a power of two with masked loads."""
    q, k, v, _ = qkv(1, 33, 45, 2, 1, d, dtype)
    check(q, k, v, rk.RopeConfig(d), causal=True)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d,rotary_dim", [(64, 64), (64, 32), (80, 16), (128, 96)])
def test_partial_and_interleaved(d, rotary_dim, interleaved):
    """Both pair layouts; pass-through widths 0, 32, 64 and 32 (R/2 = 8 padded to 16)."""
    rope = rk.RopeConfig(d, rotary_dim=rotary_dim, interleaved=interleaved)
    q, k, v, _ = qkv(1, 21, 35, 2, 1, d, BF16)
    check(q, k, v, rope, causal=True)


# ---------------------------------------------------------------------------------- positions
def test_position_zero_is_identity_bitwise():
    """All positions 0 (attention factor 1): cos = 1, sin = 0 exactly, so the fused kernel must
    equal the same kernel with rotation compiled out, bit for bit."""
    q, k, v, _ = qkv(1, 20, 37, 4, 2, 80, BF16)
    rope = rk.RopeConfig(80, rotary_dim=64)
    zq = torch.zeros(1, 20, dtype=torch.int32, device=DEVICE)
    zk = torch.zeros(1, 37, dtype=torch.int32, device=DEVICE)
    out, lse = run_triton(q, k, v, rope, causal=True, q_positions=zq, k_positions=zk)
    call = attention_call(q, k, v, rope, causal=True)
    call.rotate = False
    out0, lse0 = get_backend("triton").attention(call)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)


# ---------------------------------------------------------------------------------- varlen
def test_varlen_nan_in_other_sequences_does_not_leak():
    """Ragged tiles of sequence 0 overlap sequence 1's tokens; those are masked, never multiplied."""
    lens = ([9, 20], [21, 30])
    q, k, v, extra = qkv(2, 0, 0, 2, 1, 64, BF16, varlen=lens)
    k[21:], v[21:], q[9:] = float("nan"), float("nan"), float("nan")
    out, lse = run_triton(q, k, v, rk.RopeConfig(64), causal=True, **extra)
    assert torch.isfinite(out[:9]).all() and torch.isfinite(lse[:, :9]).all()
    o, l_ = oracle_attention(q[None, :9], k[None, :21], v[None, :21], rk.RopeConfig(64), causal=True)
    bo, bl = baseline_attention(q[None, :9], k[None, :21], v[None, :21], rk.RopeConfig(64), causal=True)
    assert error_check(out[None, :9], o, bo).ok and error_check(lse[None, :, :9], l_, bl, BF16).ok


# ---------------------------------------------------------------------------------- exactness, refusals
def test_batch_invariance_and_determinism():
    """Each sequence's result does not depend on its batch neighbours; reruns are bitwise equal."""
    q, k, v, _ = qkv(3, 25, 33, 4, 2, 64, BF16)
    rope = rk.RopeConfig(64, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    out, lse = run_triton(q, k, v, rope, causal=True)
    again, lse2 = run_triton(q, k, v, rope, causal=True)
    assert torch.equal(out, again) and torch.equal(lse, lse2)
    one, lse1 = run_triton(q[1:2], k[1:2], v[1:2], rope, causal=True)
    assert torch.equal(one, out[1:2]) and torch.equal(lse1, lse[1:2])


def test_inputs_not_modified():
    q, k, v, _ = qkv(1, 17, 33, 2, 1, 64, BF16)
    copies = [t.clone() for t in (q, k, v)]
    run_triton(q, k, v, rk.RopeConfig(64, interleaved=True), causal=True)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))


def test_unsupported_calls_name_the_reason():
    q, k, v, _ = qkv(1, 4, 4, 1, 1, 32, torch.float64)
    with pytest.raises(ValueError, match="float64 is not supported"):
        rk.rope_attention(q, k, v, rk.RopeConfig(32), backend="triton")
    q, k, v, _ = qkv(1, 2, 2, 1, 1, 320, F16)
    with pytest.raises(ValueError, match="head dim 320 > 256"):
        rk.rope_attention(q, k, v, rk.RopeConfig(320), backend="triton")


def test_autotune_configs():
    """One config under the interpreter; on GPUs the per-generation lists, pruned per head layout
    to the configs measured spill-free with ``ptxas -v`` (``_SPILL_FREE``, ``_SPILL_FREE_GQA``)."""
    import triton

    from ropekern._triton import attention as A
    from ropekern._triton.host import head_constants

    if A.INTERPRET:
        assert len(A._rope_attn_fwd.configs) == 1
    every = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in dict.fromkeys(A._AMPERE + A._HOPPER)
    ]

    def shapes(major, smem, elem, d, r=None, group=1):
        r = d if r is None else r
        head = head_constants(d, r)
        k_cols = 2 * head["HALF_P"] + head["PASS_P"]
        kept = A.select_configs(every, major, smem, elem, head["HEAD_DIM_P"], k_cols, group)
        return {A.config_shape(c) for c in kept}

    hopper_128 = shapes(9, 232448, 2, 128)  # H100: 227 KB shared memory per block
    assert hopper_128 <= set(A._HOPPER) and (128, 32, 8, 3) in hopper_128
    ampere_128 = shapes(8, 166912, 2, 128)  # A100: 163 KB
    assert ampere_128 <= set(A._AMPERE) and (128, 32, 8, 2) in ampere_128
    # 128 query rows on 4 warps spilled 5.8 KB per thread at D = 128 bf16 (sm_90): no 4-warp config.
    assert all(w == 8 for _, _, w, _ in A._AMPERE + A._HOPPER)
    assert (128, 64, 8, 3) not in hopper_128 and (128, 64, 8, 3) in shapes(9, 232448, 2, 64)
    assert shapes(9, 232448, 2, 256) == {(64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 1)}
    assert shapes(9, 232448, 4, 128) == {(32, 16, 8, 1)}  # fp32: 64 x 16 spilled 24 B
    assert shapes(8, 101376, 4, 256) == {(32, 16, 8, 1)}  # fp32 D = 256 on a 99 KB part
    # GQA: 64 x 64 x 8 spilled at D = 128 with GROUP 2 and 4 (472 / 412 B) but not GROUP 1.
    assert (64, 64, 8, 3) in hopper_128 and (64, 64, 8, 3) not in shapes(9, 232448, 2, 128, group=4)
    # Partial rotary can make the Q / K tile wider than the head: D = 96, R = 80 -> 2 x 64 + 16.
    assert A.head_class(128, 144) == 256 and shapes(9, 232448, 2, 96, 80) == shapes(9, 232448, 2, 256)
    for major, smem in ((9, 232448), (8, 166912), (8, 101376)):
        for elem in (2, 4):
            for d, r in ((32, 32), (64, 64), (80, 48), (96, 96), (128, 128), (128, 64), (256, 256), (256, 128)):
                head = head_constants(d, r)
                key = (major, elem, A.head_class(head["HEAD_DIM_P"], 2 * head["HALF_P"] + head["PASS_P"]))
                assert shapes(major, smem, elem, d, r) <= A._SPILL_FREE[key]
                assert shapes(major, smem, elem, d, r, group=8) <= A._SPILL_FREE_GQA[key]


# Compiled by test_kernels_compile_for_gpus (a sample of ``attention._SPILL_FREE`` /
# ``_SPILL_FREE_GQA``, whose other entries were measured the same way): per GPU generation the largest
# config kept at D = 128 with 16-bit inputs, the fp32 one, and partial interleaved rotary at D = 80
# through the varlen GQA variant.
_FWD_COMPILED = (
    "aot.compile_attention(90, 'bf16', 128, block=(128, 32, 8, 3))",
    "aot.compile_attention(80, 'fp16', 128, block=(128, 32, 8, 2))",
    "aot.compile_attention(90, 'fp32', 128, block=(32, 16, 8, 1))",
    "aot.compile_attention(90, 'bf16', 80, 48, True, True, True, 2, (32, 32, 8, 2))",
    "aot.compile_rope(80, 'fp16', 96, 64, interleaved=True)",
)


def test_kernels_compile_for_gpus():
    """The interpreter never runs the GPU compiler; compile both kernels for sm_90 / sm_80 through
    Triton's real pipeline (bundled ptxas, no GPU needed) and require no register spills. Spills
    go to the stack frame: cuobjdump's LOCAL stays 0, so the bytes come from ``ptxas -v``."""
    import ast
    import os
    import subprocess
    import sys

    code = "from ropekern._triton import aot\n" + "".join(f"print({call})\n" for call in _FWD_COMPILED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(_FWD_COMPILED), proc.stdout
    for call, line in zip(_FWD_COMPILED, lines):
        usage = ast.literal_eval(line)
        assert usage["registers"] > 0 and usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (call, usage)


# ---------------------------------------------------------------------------------- torch.library
def _op_args(q, k, v, rope, **kw):
    return attention_call(q, k, v, rope, **kw).op_args()


def test_opcheck_dense_and_varlen():
    q, k, v, _ = qkv(1, 8, 12, 2, 1, 32, BF16)
    torch.library.opcheck(torch.ops.ropekern_triton.attention_fwd.default, _op_args(q, k, v, rk.RopeConfig(32)))
    q, k, v, extra = qkv(2, 0, 0, 2, 2, 32, F32, varlen=([3, 5], [4, 6]))
    rope = rk.RopeConfig(32, rotary_dim=16, interleaved=True)
    args = _op_args(q, k, v, rope, causal=True, **extra)
    torch.library.opcheck(torch.ops.ropekern_triton.attention_fwd.default, args)


_DYNAMIC = rk.RopeConfig(32, scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=4)


@pytest.mark.parametrize("case", ["dense_causal", "varlen", "dynamic_positions"])
def test_compile_fullgraph(case):
    """torch.compile(fullgraph=True) traces the public call (validation, dispatch, tables, op);
    aot_eager runs the fake (shapes, dtypes, strides) and then the real op. Inductor itself is
    exercised by the GPU test (on CPU it spends ~1 min compiling C++ for the glue ops)."""
    if case == "dense_causal":
        q, k, v, _ = qkv(1, 9, 9, 2, 1, 32, BF16)
        args = (q, k, v)

        def f(q, k, v):
            return rk.rope_attention(q, k, v, rk.RopeConfig(32), causal=True, backend="triton", return_lse=True)

    elif case == "varlen":
        q, k, v, extra = qkv(2, 0, 0, 2, 1, 32, BF16, varlen=([3, 5], [4, 6]))
        args = (q, k, v, extra["cu_seqlens_q"], extra["cu_seqlens_k"])

        def f(q, k, v, cu_q, cu_k):
            kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=6, return_lse=True)
            return rk.rope_attention(q, k, v, rk.RopeConfig(32), causal=True, backend="triton", **kw)

    else:
        q, k, v, _ = qkv(2, 9, 9, 2, 1, 32, F32)
        args = (q, k, v, torch.arange(9, device=DEVICE).expand(2, 9) * 3)

        def f(q, k, v, pos):
            return rk.rope_attention(
                q, k, v, _DYNAMIC, q_positions=pos, k_positions=pos, backend="triton", return_lse=True
            )

    torch._dynamo.reset()
    cout, clse = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    out, lse = f(*args)
    assert torch.equal(cout, out) and torch.equal(clse, lse)


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1024, 4096, 16384])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_long(seqlen, causal):
    rope = rk.RopeConfig(
        128, base=5e5, scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048}
    )
    q, k, v, _ = qkv(1, seqlen, seqlen, 8, 2, 128, BF16)
    check(q, k, v, rope, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("d,dtype", [(64, F16), (96, BF16), (128, F32), (256, BF16)])
def test_gpu_head_dims_and_varlen(d, dtype):
    lens = ([1, 1000, 2049, 300], [1024, 1000, 2049, 4000])
    q, k, v, extra = qkv(4, 0, 0, 8, 2, d, dtype, varlen=lens)
    check(q, k, v, rk.RopeConfig(d, rotary_dim=d // 2, interleaved=True), causal=True, **extra)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """Key offsets past 2**31 elements: the last varlen sequence starts at token ~2.2M x 8 heads x 128."""
    hkv, d, total = 8, 128, 2_200_064
    q = torch.randn(32, 8, d, dtype=BF16, device=DEVICE)
    k = torch.randn(total, hkv, d, dtype=BF16, device=DEVICE)
    v = torch.randn(total, hkv, d, dtype=BF16, device=DEVICE)
    cu_q = torch.tensor([0, 16, 16, 32], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 32, total - 32, total], dtype=torch.int32, device=DEVICE)
    assert (total - 32) * hkv * d > 2**31
    rope = rk.RopeConfig(d)
    out = rk.rope_attention(q, k, v, rope, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton")
    for qs, ks in [(slice(0, 16), slice(0, 32)), (slice(16, 32), slice(total - 32, total))]:
        o, _ = oracle_attention(q[qs][None], k[ks][None], v[ks][None], rope)
        bo, _ = baseline_attention(q[qs][None], k[ks][None], v[ks][None], rope)
        res = error_check(out[qs][None], o, bo)
        assert res.ok, f"{qs}: {res}"


@pytest.mark.gpu
def test_gpu_compile_inductor():
    rope = rk.RopeConfig(128)
    q, k, v, _ = qkv(2, 512, 512, 8, 2, 128, BF16)

    def f(q, k, v):
        return rk.rope_attention(q, k, v, rope, causal=True, backend="triton")

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))
