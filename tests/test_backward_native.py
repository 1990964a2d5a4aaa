"""Gradients of ``rk.rope_attention(..., backend="cpu")``: the native CPU forward (``ropekern::fwd``)
with the autograd formula that ``ropekern.backends.native`` registers on the op, whose backward is
the native CPU kernel ``ropekern::bwd`` (csrc/cpu/kernels_bwd.h); the PyTorch FA2-style recompute
(``ropekern._autograd``) stays as the fallback and is tested here too.

Held to the docs/design.md §5 rule with factor 3 against fp64 autograd through the reference, with autograd
through the reference in the test dtype with fp32 angles as the yardstick. The backend-neutral sweep
(lengths, head dims, GQA, every law, partial / interleaved, positions, varlen, strided views, the LSE
gradient) runs the native kernel too, in tests/test_triton_backward.py; here: shapes that cross the
kernel's own tiles (64 keys, ~192 query rows x heads), every ISA unit, thread-count invariance,
windows, the op's checks and the recompute fallback.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern import backends, reference
from ropekern._validation import attention_call
from ropekern.testing import baseline_attention, error_check, random_qkv

native = pytest.importorskip("ropekern.backends.native")
if native.cpu_backend.unavailable():
    pytest.skip(native.cpu_backend.unavailable(), allow_module_level=True)

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _randn_like(x, seed):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)


def grads(fn, q, k, v, dout, dtype=None, dlse=None):
    """``(out, dq, dk, dv)`` of ``fn(q, k, v) -> (out, lse)`` with leaves cast to ``dtype``."""
    dtype = dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    outputs, cotangents = [out], [dout.to(dtype)]
    if dlse is not None:
        outputs.append(lse)
        cotangents.append(dlse.to(lse.dtype))
    torch.autograd.backward(outputs, cotangents)
    return (out.detach(), *(t.grad for t in leaves))


def check(q, k, v, rope, *, with_lse=False, **kw):
    """cpu-backend gradients of q, k, v against the oracle under the factor-3 rule."""
    dout = _randn_like(q, 7)
    dlse = None
    if with_lse:
        shape = (q.shape[1], q.shape[0]) if "cu_seqlens_q" in kw else (q.shape[0], q.shape[2], q.shape[1])
        dlse = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    got = grads(lambda *a: rk.rope_attention(*a, rope, backend="cpu", return_lse=True, **kw), q, k, v, dout, dlse=dlse)
    exact = grads(lambda *a: reference.rope_attention(*a, rope, return_lse=True, **kw), q, k, v, dout, F64, dlse)
    base = grads(lambda *a: baseline_attention(*a, rope, **kw), q, k, v, dout, dlse=dlse)
    for name, g, o, b, x in zip(("dq", "dk", "dv"), got[1:], exact[1:], base[1:], (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        res = error_check(g, o, b, q.dtype, factor=3.0)
        assert res.ok, f"{name} {res}"
    return got


_DYNAMIC = {"rope_type": "dynamic", "factor": 3.0}
_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    "sq,sk,hq,hkv,d,causal,dtype",
    [
        (17, 17, 2, 2, 64, True, F32),
        (1, 33, 4, 2, 64, True, BF16),
        (40, 17, 6, 2, 64, True, F16),  # Sq > Sk causal: the first 23 rows see no key
        (19, 37, 8, 1, 128, False, BF16),
        (23, 23, 2, 1, 80, False, F32),
    ],
)
def test_dense(sq, sk, hq, hkv, d, causal, dtype):
    q, k, v, _ = random_qkv(2, sq, sk, hq, hkv, d, dtype=dtype, seed=1)
    _, dq, _, _ = check(q, k, v, rk.RopeConfig(d, scaling=_YARN, base=5e5), causal=causal)
    if causal and sq > sk:
        assert (dq[:, : sq - sk] == 0).all()


@pytest.mark.parametrize("sq,sk,hq", [(1, 1, 1), (1, 1, 2), (1, 5, 4), (3, 2, 2)])
def test_few_keys_fp32(sq, sk, hq):
    """Rows that see one or a few keys, fp32: the eager baseline's softmax is then (nearly) exact,
    so P must not carry the forward's rounding of the LSE (exp(S - lse) put dv at 2.7x the bound in
    a random case) and dq, exactly 0 with one key, must come out 0 (it was 4e-16)."""
    q, k, v, _ = random_qkv(1, sq, sk, hq, 1, 128, dtype=F32, seed=9)
    check(q, k, v, rk.RopeConfig(128, scaling={"rope_type": "linear", "factor": 4.0}), causal=True)


@pytest.fixture
def recompute(monkeypatch):
    """Route the cpu forward's gradients to the PyTorch recompute (the fallback)."""
    monkeypatch.setattr(native.cpu_backend, "check_backward", lambda call: "forced off by the test")


@pytest.mark.parametrize("causal", [False, True])
def test_recompute_query_chunks(monkeypatch, recompute, causal):
    """The fallback recompute walks query chunks (each against the keys its last row sees when
    causal): a score budget of 3 rows x 40 keys x 2 heads forces 3-row chunks, Sq > Sk and Sq < Sk."""
    from ropekern import _autograd

    monkeypatch.setattr(_autograd, "_SCORE_BUDGET", 3 * 40 * 2)
    for sq, sk in ((29, 40), (40, 23)):
        q, k, v, _ = random_qkv(1, sq, sk, 2, 1, 64, dtype=F32, seed=10)
        check(q, k, v, rk.RopeConfig(64, scaling=_YARN, base=5e5), causal=causal)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary(interleaved):
    q, k, v, _ = random_qkv(1, 21, 35, 4, 2, 64, dtype=BF16, seed=2)
    check(q, k, v, rk.RopeConfig(64, rotary_dim=32, interleaved=interleaved), causal=not interleaved)


def test_length_dependent_type_with_positions():
    """Dynamic NTK: one table per sequence (sequence 1 passes the trained length 32)."""
    q, k, v, _ = random_qkv(2, 9, 24, 2, 1, 64, dtype=F32, seed=3)
    k_pos = torch.stack([torch.arange(24), torch.arange(24) + 40])
    rope = rk.RopeConfig(64, scaling=_DYNAMIC, max_position_embeddings=32)
    check(q, k, v, rope, causal=True, q_positions=k_pos[:, -9:], k_positions=k_pos)


@pytest.mark.parametrize("causal,dtype", [(False, F32), (True, BF16)])
def test_varlen(causal, dtype):
    """Packed sequences, an empty query sequence, an empty key sequence, Sq > Sk; the LSE output
    takes a gradient too (delta = rowsum(dO * O) - dlse)."""
    lens = ([1, 17, 0, 40, 9], [5, 17, 6, 40, 0])
    q, k, v, extra = random_qkv(5, 0, 0, 2, 1, 64, dtype=dtype, seed=4, varlen_lengths=lens)
    rope = rk.RopeConfig(64, scaling=_DYNAMIC, max_position_embeddings=32)
    _, dq, dk, dv = check(q, k, v, rope, causal=causal, with_lse=not causal, **extra)
    assert (dq[-9:] == 0).all()  # no keys
    assert (dk[22:28] == 0).all() and (dv[22:28] == 0).all()  # keys of the sequence with no queries


def test_auto_keeps_the_native_forward_under_grad():
    """``auto`` picks the cpu kernels for calls that require grad, and the graph holds ``fwd``."""
    rope = rk.RopeConfig(32)
    q, k, v, _ = random_qkv(1, 5, 7, 2, 1, 32, seed=5)
    q.requires_grad_()
    assert backends.select_backend("attention", attention_call(q, k, v, rope), q.device, "auto") is native.cpu_backend
    out = rk.rope_attention(q, k, v, rope, causal=True)
    assert "ropekern_fwd" in type(out.grad_fn).__name__, type(out.grad_fn).__name__
    out.square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and bool(q.grad.abs().sum() > 0)


def test_compiled_training_step():
    """fullgraph torch.compile (aot_eager) of a loss through the cpu backend: the backward graph
    holds the native backward op (with its fake); gradients equal the eager ones bit for bit."""
    rope = rk.RopeConfig(32, scaling=_YARN)
    q, k, v, _ = random_qkv(2, 9, 9, 2, 1, 32, seed=6)

    def loss(q_, k_, v_):
        return rk.rope_attention(q_, k_, v_, rope, causal=True, backend="cpu").square().sum()

    one = torch.ones(())
    torch._dynamo.reset()
    eager = grads(lambda *a: (loss(*a), None), q, k, v, one)
    compiled = grads(lambda *a: (torch.compile(loss, fullgraph=True, backend="aot_eager")(*a), None), q, k, v, one)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# ---------------------------------------------------------------------------------- the native kernel
def _bwd_ran(fn) -> bool:
    """Whether ``fn()`` ran the native backward op."""
    with torch.profiler.profile() as prof:
        fn()
    return any(e.name == "ropekern::bwd" for e in prof.events())


def test_native_kernel_is_the_default():
    q, k, v, _ = random_qkv(1, 9, 9, 2, 1, 32, seed=11)
    q.requires_grad_()
    assert _bwd_ran(lambda: rk.rope_attention(q, k, v, rk.RopeConfig(32), causal=True).sum().backward())


@pytest.mark.parametrize(
    "sq,sk,hq,hkv,d,causal,dtype",
    [
        (200, 200, 2, 2, 64, True, F32),  # G 1: 192-row query blocks, 64-key blocks, ragged tails of both
        (130, 300, 8, 2, 128, True, BF16),  # G 4: 48-query blocks; Sq < Sk
        (300, 130, 6, 2, 80, True, F16),  # G 3, D 80 (not a multiple of 32); causal Sq > Sk: rows without keys
        (300, 130, 6, 2, 80, False, F32),
        (70, 257, 8, 1, 256, False, BF16),  # MQA, D 256
    ],
)
def test_tile_crossing_shapes(sq, sk, hq, hkv, d, causal, dtype):
    q, k, v, _ = random_qkv(2, sq, sk, hq, hkv, d, dtype=dtype, seed=12)
    _, dq, dk, dv = check(q, k, v, rk.RopeConfig(d, scaling=_YARN, base=5e5), causal=causal)
    if causal and sq > sk:
        assert (dq[:, : sq - sk] == 0).all()


@pytest.mark.parametrize("window,causal", [((50, 0), True), ((20, 70), False), ((100, -1), False)])
def test_windows_across_tiles(window, causal):
    """Sliding windows whose edges cut through key blocks and query blocks; keys no query sees get 0."""
    q, k, v, _ = random_qkv(1, 260, 260, 4, 2, 64, dtype=F32, seed=13)
    check(q, k, v, rk.RopeConfig(64, scaling=_YARN), causal=causal, window_size=window)


def _units() -> list[str]:
    units = []
    for unit in ("generic", "avx2", "avx512", "amx", "neon"):
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("ROPEKERN_CPU_ISA", unit)
                native.cpu_isa()
        except (RuntimeError, ValueError):
            continue
        units.append(unit)
    return units


@pytest.mark.parametrize("unit", _units())
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_every_isa_unit(monkeypatch, unit, dtype):
    """Each kernel unit this CPU runs (ROPEKERN_CPU_ISA) computes the backward under the rule."""
    monkeypatch.setenv("ROPEKERN_CPU_ISA", unit)
    q, k, v, _ = random_qkv(1, 150, 150, 4, 2, 128, dtype=dtype, seed=14)
    check(q, k, v, rk.RopeConfig(128, rotary_dim=64, interleaved=True, scaling=_YARN), causal=True)


def test_same_result_for_any_thread_count():
    """No atomics, items fixed by the shape: 1 and 2 threads give bitwise equal gradients."""
    q, k, v, _ = random_qkv(2, 150, 170, 4, 2, 64, dtype=BF16, seed=15)
    rope = rk.RopeConfig(64, scaling=_YARN)
    dout = _randn_like(q, 3)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(
                grads(
                    lambda *a: rk.rope_attention(*a, rope, causal=True, backend="cpu", return_lse=True), q, k, v, dout
                )
            )
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_opcheck_backward_op_and_autograd():
    """opcheck of ``ropekern::bwd`` itself, and of ``ropekern::fwd`` with inputs that require grad
    (its autograd formula eagerly and under AOTAutograd)."""
    rope = rk.RopeConfig(32, rotary_dim=16, interleaved=True)
    q, k, v, extra = random_qkv(2, 0, 0, 2, 2, 32, dtype=BF16, seed=16, varlen_lengths=([3, 5], [4, 6]))
    args = attention_call(q, k, v, rope, **extra).op_args()
    out, lse = torch.ops.ropekern.fwd(*args)
    torch.library.opcheck(torch.ops.ropekern.bwd.default, (_randn_like(out, 1), out, lse, torch.randn_like(lse), *args))
    q, k, v, _ = random_qkv(1, 8, 12, 2, 1, 32, seed=17)
    args = attention_call(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), rope, causal=True).op_args()
    torch.library.opcheck(torch.ops.ropekern.fwd.default, args)


def test_backward_op_argument_errors():
    rope = rk.RopeConfig(32)
    q, k, v, _ = random_qkv(1, 8, 12, 2, 1, 32, seed=18)
    args = attention_call(q, k, v, rope, causal=True).op_args()
    out, lse = torch.ops.ropekern.fwd(*args)
    with pytest.raises(ValueError, match="`dout`"):
        torch.ops.ropekern.bwd(out[:, :4], out, lse, None, *args)
    with pytest.raises(ValueError, match="`lse`"):
        torch.ops.ropekern.bwd(out, out, lse[:, :1], None, *args)
    with pytest.raises(TypeError, match="`dlse`"):
        torch.ops.ropekern.bwd(out, out, lse, lse.double(), *args)
    # an expanded output gradient (the backward of a sum) is read as the dense tensor it stands for
    dq, _, _ = torch.ops.ropekern.bwd(torch.ones(()).expand_as(out), out, lse, None, *args)
    dq_dense, _, _ = torch.ops.ropekern.bwd(torch.ones_like(out), out, lse, None, *args)
    assert torch.equal(dq, dq_dense)
