"""The Triton KV-cache decode kernel with fewer keys than queries (n < Sq) and with small pages.

* n < Sq: query i sits at position ``n - Sq + i`` and is rotated at ``max(n - Sq + i, 0)``; under
  ``causal`` (bottom-right) the first Sq - n queries see no key and give out 0, LSE -inf, and
  without it every query sees all n keys (n = 0 included). Checked against ``formula_kvcache``, an
  independent fp64 implementation of that rule, on every path: dense and paged, one split and
  several (the merge of rows that no split serves), GQA, one M block with no key at all, fp32, bf16
  and fp16, the law's angles and a caller's table.
* Page sizes 1, 2, 4, 8 (and 16): every key looks its own page up (``decode._cache_slots``), so a
  key tile spans many pages; against the project's oracle, and bitwise against a dense cache.

Interpreter runs (tests/conftest.py): tiny shapes, key tiles of 16. Cache slots past a sequence's
length hold NaN and unused block-table entries garbage, so nothing unused may be read.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import ropekern as rk
from ropekern import reference
from ropekern._triton import decode
from ropekern._validation import KVCACHE_SCHEMA, bundle_rope, kvcache_call, rope_position
from ropekern.testing import baseline_kvcache, error_check, oracle_kvcache

from cases import paged_cache, rope_kwargs_per_type

pytestmark = pytest.mark.skipif(
    rk.available_backends()["triton"] is not True, reason="triton backend unavailable (no GPU, no interpreter)"
)

KEYS = ("cache_seqlens", "k_new", "v_new", "block_table")


def make_rope(kind="default", head_dim=16, base=100.0):
    return rk.RopeConfig(head_dim, base=base, **rope_kwargs_per_type(head_dim // 2)[kind])


def make_case(lens, s_new, sq, hq, hkv, d, dtype, block=None, seed=0):
    """Random un-rotated inputs for sequences of ``lens`` cached tokens plus ``s_new`` appended.

    Returns ``(case, keys, values)``: ``case`` holds the kernel inputs ``q [B, Sq, Hq, D]``,
    ``k_cache``/``v_cache`` (dense ``[B, Smax, Hkv, D]``, or paged ``[blocks, block, Hkv, D]`` with
    shuffled blocks and ``block_table [B, max_blocks]``), ``cache_seqlens [B]``, ``k_new``/``v_new``
    ``[B, S_new, Hkv, D]`` (None when ``s_new`` is 0); ``keys[b]``/``values[b]`` ``[n_b, Hkv, D]``
    are what sequence b holds after the append. Unused slots hold NaN, unused table entries garbage.
    """
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    smax = max(lens) + s_new + 3

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = rnd(b, sq, hq, d)
    keys = [rnd(n0 + s_new, hkv, d) for n0 in lens]
    values = [rnd(n0 + s_new, hkv, d) for n0 in lens]
    case = dict(q=q, cache_seqlens=torch.tensor(lens, dtype=torch.int32), k_new=None, v_new=None)
    if s_new:
        case["k_new"] = torch.stack([k[n0:] for k, n0 in zip(keys, lens)])
        case["v_new"] = torch.stack([v[n0:] for v, n0 in zip(values, lens)])
    kc = torch.full((b, smax, hkv, d), float("nan"), dtype=dtype)
    vc = kc.clone()
    for i, n0 in enumerate(lens):
        kc[i, :n0], vc[i, :n0] = keys[i][:n0], values[i][:n0]
    if block is None:
        return dict(case, k_cache=kc, v_cache=vc, block_table=None), keys, values
    k_pool, v_pool, table = paged_cache(kc, vc, lens, s_new, block, gen)
    return dict(case, k_cache=k_pool, v_cache=v_pool, block_table=table), keys, values


def clone_case(case):
    return {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in case.items()}


def validated(case, rope, causal=True, softmax_scale=None):
    kw = {key: case[key] for key in KEYS}
    return kvcache_call(
        case["q"], case["k_cache"], case["v_cache"], rope, causal=causal, softmax_scale=softmax_scale, **kw
    )


def _rotate(x, pos, call, b, dtype, angles):
    """Rows ``x [S, H, D]`` rotated at positions ``pos [S]`` with sequence b's table, in ``dtype``."""
    rope = call.rope
    table = call.tables()[0]
    table = table[b if table.shape[0] > 1 else 0]
    if isinstance(rope, rk.RopeTable):  # rows [P, 2, R/2] looked up by position
        rows = table[pos]
        cos, sin = rows[:, 0].to(dtype), rows[:, 1].to(dtype)
    else:
        cos, sin = reference.cos_sin(pos, table, rope.attention_factor, dtype, angles)
    return reference.rotate(x.to(dtype), cos[:, None], sin[:, None], rope.rotary_dim, rope.interleaved)


def formula_kvcache(call, keys, values, dtype=torch.float64, angles="fp64"):
    """``(out [B, Sq, Hq, D], lse [B, Hq, Sq])`` of the n < Sq rule computed in ``dtype``: query i at
    position ``p_i = n - Sq + i`` rotated at ``max(p_i, 0)``, keys at 0..n-1, causal keeps key j iff
    ``j <= p_i``; rows without a key give 0 and -inf. fp64 results stay fp64 (the oracle); in another
    ``dtype`` with ``angles="fp32"`` it is the baseline of the error rule, out in the I/O dtype."""
    _, sq, hq, _ = call.q.shape
    g = hq // call.k_cache.shape[2]
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(keys, values)):
        n = k.shape[0]
        q_pos = torch.arange(sq) + n - sq
        q = _rotate(call.q[b], q_pos.clamp_min(0), call, b, dtype, angles).transpose(0, 1)  # [Hq, Sq, D]
        k = _rotate(k, torch.arange(n), call, b, dtype, angles).repeat_interleave(g, 1).transpose(0, 1)
        v = v.to(dtype).repeat_interleave(g, 1).transpose(0, 1)  # [Hq, n, D]
        keep = torch.ones(sq, n, dtype=torch.bool)
        if call.causal:
            keep = torch.arange(n)[None, :] <= q_pos[:, None]
        s = (q @ k.transpose(1, 2) * call.softmax_scale).masked_fill(~keep, float("-inf"))
        m = s.amax(-1, keepdim=True) if n else torch.zeros(hq, sq, 1, dtype=dtype)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.where(keep, torch.exp(s - m), torch.zeros_like(s))
        l_ = p.sum(-1, keepdim=True)
        l_safe = torch.where(l_ == 0, torch.ones_like(l_), l_)
        outs.append((p @ v / l_safe).transpose(0, 1))
        lses.append(torch.where(l_ == 0, float("-inf"), m + torch.log(l_safe))[..., 0])
    fp64 = dtype == torch.float64
    out_dtype, lse_dtype = (torch.float64, torch.float64) if fp64 else (call.q.dtype, torch.float32)
    return torch.stack(outs).to(out_dtype), torch.stack(lses).to(lse_dtype)


def run_triton(case, rope, causal, num_splits, softmax_scale=None):
    """The launcher on a copy of ``case`` with ``num_splits`` key splits (the op's arguments, rope
    bundled, window included): ``(out, lse, the copy)``."""
    case = clone_case(case)
    call = validated(case, rope, causal, softmax_scale)
    out, lse = decode.run(*bundle_rope(call.op_args(num_splits), rope_position(KVCACHE_SCHEMA)))
    return out, lse, case


def check_formula(case, keys, values, rope, causal, splits=(1, 3), softmax_scale=None):
    """The kernel against ``formula_kvcache`` under the error rule, for every split count; returns
    the results, whose empty rows must be exactly 0 / -inf."""
    call = validated(case, rope, causal, softmax_scale)
    dtype = case["q"].dtype
    o_ref, l_ref = formula_kvcache(call, keys, values)
    o_base, l_base = formula_kvcache(call, keys, values, dtype, "fp32")
    results = []
    for num_splits in splits:
        out, lse, _ = run_triton(case, rope, causal, num_splits, softmax_scale)
        assert out.shape == case["q"].shape and lse.shape == l_ref.shape
        res_out = error_check(out, o_ref, o_base, dtype)
        res_lse = error_check(lse, l_ref, l_base, torch.float32)
        assert res_out.ok, f"{num_splits} splits: out {res_out}"
        assert res_lse.ok, f"{num_splits} splits: lse {res_lse}"
        empty = torch.isinf(l_ref).transpose(1, 2)  # [B, Sq, Hq]
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))
        assert not out.isnan().any() and not lse.isnan().any()
        results.append((out, lse))
    return results


# ------------------------------------------------------------------ fewer keys than queries
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [None, 4, 16], ids=["dense", "paged4", "paged16"])
@pytest.mark.parametrize("causal", [True, False])
def test_fewer_keys_than_queries(causal, block, dtype):
    """n = 2, 3 (< Sq = 5) beside n = 19 in one batch, GQA 2, dynamic NTK (each sequence its table)."""
    case, keys, values = make_case((0, 1, 17), 2, sq=5, hq=4, hkv=2, d=16, dtype=dtype, block=block, seed=1)
    check_formula(case, keys, values, make_rope("dynamic"), causal, softmax_scale=0.4)


@pytest.mark.parametrize("causal", [True, False])
def test_sequences_without_keys(causal):
    """n = 0 (nothing cached, nothing appended): every row 0 / -inf, with or without causal; and
    n = 3 < Sq = 4 beside it."""
    case, keys, values = make_case((0, 3), 0, sq=4, hq=2, hkv=1, d=16, dtype=torch.float16, block=8, seed=2)
    (out, lse), _ = check_formula(case, keys, values, make_rope("llama3"), causal)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == float("-inf")).all())
    assert bool(torch.isfinite(lse[1]).all()) != causal  # causal: query 0 of sequence 1 sees no key


def test_m_block_without_keys():
    """G x Sq = 8 x 10 rows in two M blocks of 64; with n = 1 the whole first block (queries 0..7)
    sees no key, so its programs run no key tile; in the other sequence (n = 12) it does."""
    case, keys, values = make_case((0, 11), 1, sq=10, hq=8, hkv=1, d=16, dtype=torch.float16, block=2, seed=3)
    check_formula(case, keys, values, make_rope("yarn"), causal=True, splits=(1, 2))


def test_fewer_keys_with_a_callers_table():
    """``ROPE_TABLE``: the clamped query positions look up row 0 of the caller's table."""
    base = make_rope("default")
    inv = 1.0 / (100.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    angle = torch.arange(64, dtype=torch.float64)[:, None] * inv
    table = rk.RopeTable((angle.cos() * 1.1, angle.sin() * 1.1), head_dim=base.head_dim)
    case, keys, values = make_case((1, 20), 2, sq=6, hq=2, hkv=1, d=16, dtype=torch.float32, seed=4)
    for causal in (True, False):
        check_formula(case, keys, values, table, causal)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
def test_rows_without_keys_never_see_nonfinite_values():
    """Causal, n = 2, Sq = 4: V of key 1 holds a NaN and an inf. Queries 0 and 1 see no key (exactly
    0, -inf), query 2 sees key 0 only (finite: V of key 0), query 3 both (NaN, inf where V has them)."""
    case, keys, values = make_case((0,), 2, sq=4, hq=1, hkv=1, d=16, dtype=torch.float32, seed=5)
    case["v_new"][0, 1, 0, 3] = float("nan")
    case["v_new"][0, 1, 0, 5] = float("inf")
    rope = make_rope("default")
    for num_splits in (1, 2):
        out, lse, _ = run_triton(case, rope, True, num_splits)
        assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
        assert bool((lse[0, 0, :2] == float("-inf")).all()) and bool(torch.isfinite(lse[0, 0, 2:]).all())
        torch.testing.assert_close(out[0, 2, 0], case["v_new"][0, 0, 0], rtol=0, atol=1e-6)
        assert out[0, 3, 0, 3].isnan() and out[0, 3, 0, 5] == float("inf")
        assert bool(torch.isfinite(out[0, 3, 0, [c for c in range(16) if c not in (3, 5)]]).all())


# ------------------------------------------------------------------ small pages
@pytest.mark.parametrize("block", [1, 2, 4, 8, 16])
def test_page_sizes(block):
    """Block sizes 1..16 against the oracle: through the public entry point (which asks ``limits``),
    and with 3 forced splits; appends of 3 tokens cross page boundaries."""
    rope = make_rope("dynamic")
    case, _, _ = make_case((1, 19, 40), 3, sq=3, hq=4, hkv=2, d=16, dtype=torch.float16, block=block, seed=6)
    kw = {key: case[key] for key in KEYS}
    o_ref, l_ref = oracle_kvcache(case["q"], case["k_cache"], case["v_cache"], rope, **kw)
    o_base, l_base = baseline_kvcache(case["q"], case["k_cache"], case["v_cache"], rope, **kw)
    api = clone_case(case)
    results = [rk.rope_attention_with_kvcache(rope=rope, return_lse=True, backend="triton", **api)]
    results.append(run_triton(case, rope, True, 3)[:2])
    for out, lse in results:
        assert error_check(out, o_ref, o_base, torch.float16).ok
        assert error_check(lse, l_ref, l_base, torch.float32).ok
    for b, n0 in enumerate(case["cache_seqlens"].tolist()):  # appended in place, un-rotated
        idx = torch.arange(n0, n0 + 3)
        blocks = case["block_table"][b].long()[idx // block]
        assert torch.equal(api["k_cache"][blocks, idx % block], case["k_new"][b])
        assert torch.equal(api["v_cache"][blocks, idx % block], case["v_new"][b])


def test_small_pages_equal_dense_bitwise():
    """Same keys in a dense cache and in pages of 1, 2 and 8 tokens: identical results, bit for bit."""
    rope = make_rope("yarn")
    dense, keys, values = make_case((3, 19, 50), 2, sq=2, hq=4, hkv=2, d=16, dtype=torch.bfloat16, seed=7)
    first = run_triton(dense, rope, True, 2)[:2]
    for block in (1, 2, 8):
        paged, _, _ = make_case((3, 19, 50), 2, sq=2, hq=4, hkv=2, d=16, dtype=torch.bfloat16, block=block, seed=7)
        out, lse, _ = run_triton(paged, rope, True, 2)
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])


def test_limits_take_every_power_of_two():
    q = torch.zeros(1, 1, 2, 16)
    table = torch.zeros(1, 4, dtype=torch.int32)
    for bs in (1, 2, 4, 8, 16, 256):
        assert decode.limits(q, torch.zeros(4, bs, 1, 16), table) is None
    for bs in (0, 3, 24):
        assert decode.limits(q, torch.zeros(4, bs, 1, 16), table) == f"paged block size {bs} is not a power of two"


# ------------------------------------------------------------------ GPU code generation, no GPU needed
_CHILD = r"""
import json, re, subprocess, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from ropekern._triton import decode
from ropekern._triton.host import head_constants

def report(kernel, types, constexprs, num_warps, num_stages, cc):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    # a real launch marks 16-divisible pointers and strides, which enables vectorised loads
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or "stride" in n}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    log = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", "-", "-o", "/dev/null"],
                         input=ptx, capture_output=True, text=True, check=True).stderr
    regs, spills = (int(re.search(p, log).group(1)) for p in (r"Used (\d+) registers", r"(\d+) bytes spill stores"))
    return [regs, spills, len(re.findall(r"ld\.global", ptx))]

out = []
for cc, log2_bs in json.loads(sys.argv[1]):
    head = head_constants(128, 128)
    block_m, block_n, warps, stages = decode._config(torch.float16, head["HEAD_DIM_P"], 4)
    ce = dict(G=4, **head, INTERLEAVED=False, ROTATE=True, ROPE_TABLE=False, CAUSAL=True, PAGED=True,
              LOG2_BS=log2_bs, BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=False)
    types = dict(Q="*fp16", KC="*fp16", VC="*fp16", OUT="*fp16", SEQLENS="*i32", TABLE="*i32", SPLIT="*fp32",
                 LSE="*fp32", qk_scale="fp32", attention_factor="fp32")
    out.append(["decode", cc, log2_bs, *report(decode._decode_kernel, types, ce, warps, stages, cc)])
    types = dict(KNEW="*fp16", VNEW="*fp16", KC="*fp16", VC="*fp16", SEQLENS="*i32", TABLE="*i32")
    ce = dict(HEAD_DIM=128, HEAD_DIM_P=128, BLOCK_H=16, PAGED=True, LOG2_BS=log2_bs)
    out.append(["append", cc, log2_bs, *report(decode._append_kernel, types, ce, 4, 1, cc)])
print(json.dumps(out))
"""


def test_pages_of_one_token_compile_like_large_pages(tmp_path):
    """Block size 1 (``LOG2_BS`` 0) compiles for sm_90 and sm_80 without spills and with the same
    global loads as block size 16: the per-key page lookup is the same code for every size."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = str(pathlib.Path(decode.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cases = [(cc, log2_bs) for cc in (90, 80) for log2_bs in (0, 4)]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    by_key = {(kernel, cc, log2_bs): (regs, spills, loads) for kernel, cc, log2_bs, regs, spills, loads in rows}
    for (kernel, cc, log2_bs), (regs, spills, loads) in by_key.items():
        assert regs <= 255 and spills == 0, (kernel, cc, log2_bs, regs, spills)
        assert loads == by_key[(kernel, cc, 4)][2], (kernel, cc, log2_bs, loads)
