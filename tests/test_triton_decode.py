"""The Triton KV-cache decode kernel (RoPE on read) against the fp64 oracle that recomputes the prefix.

Runs through the Triton interpreter when there is no GPU (tests/conftest.py), so shapes are tiny
and the interpreter tile size is 16 keys: lengths 17, 113, 129 cross tile and split boundaries.
Every cache slot at or past a sequence's length holds NaN, and unused block-table entries hold
garbage, so every case also checks that neither can leak.
"""

import pytest
import torch

import ropekern as rk
from ropekern import reference
from ropekern._triton import decode
from ropekern._triton.rope_math import load_split
from ropekern._validation import KVCACHE_SCHEMA, bundle_rope, kvcache_call, rope_position
from ropekern.backends import get_backend
from ropekern.testing import baseline_kvcache, error_check, exact_angle, oracle_kvcache

from cases import GARBAGE_BLOCK, paged_cache, rope_kwargs_per_type

pytestmark = pytest.mark.skipif(
    rk.available_backends()["triton"] is not True, reason="triton backend unavailable (no GPU, no interpreter)"
)

ROPES = rope_kwargs_per_type(16)  # head_dim 32


def make_rope(kind="default", head_dim=32, rotary_dim=None, interleaved=False, base=100.0):
    kw = dict(ROPES[kind])
    if kind == "longrope":
        half = (rotary_dim or head_dim) // 2
        kw["scaling"] = dict(kw["scaling"], short_factor=[1.1] * half, long_factor=[1.0 + i for i in range(half)])
    return rk.RopeConfig(head_dim, base=base, rotary_dim=rotary_dim, interleaved=interleaved, **kw)


def make_cache(lens, s_new, sq, hq, hkv, d, dtype, block=None, smax=None, seed=0):
    """Random un-rotated inputs; slots >= the cached length hold NaN.

    Returns ``dict(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)``; paged when
    ``block`` is given (shuffled blocks, spare NaN blocks, garbage in unused table entries).
    """
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    smax = smax or max(lens) + s_new + 5

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k_new, v_new = rnd(b, sq, hq, d), rnd(b, s_new, hkv, d), rnd(b, s_new, hkv, d)
    k_full, v_full = rnd(b, smax, hkv, d), rnd(b, smax, hkv, d)
    for i, n in enumerate(lens):
        k_full[i, n:] = float("nan")
        v_full[i, n:] = float("nan")
    case = dict(q=q, cache_seqlens=torch.tensor(lens, dtype=torch.int32), k_new=k_new, v_new=v_new)
    if s_new == 0:
        case.update(k_new=None, v_new=None)
    if block is None:
        return dict(case, k_cache=k_full, v_cache=v_full, block_table=None)
    k_pool, v_pool, table = paged_cache(k_full, v_full, lens, s_new, block, gen)
    return dict(case, k_cache=k_pool, v_cache=v_pool, block_table=table)


def clone_case(case):
    return {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in case.items()}


def check_against_oracle(case, rope, causal=True, softmax_scale=None):
    """Run the triton backend on ``case`` and assert the docs/design.md §5 rule on out and LSE."""
    q, kc, vc = case["q"], case["k_cache"], case["v_cache"]
    kw = {key: case[key] for key in ("cache_seqlens", "k_new", "v_new", "block_table")}
    kw.update(causal=causal, softmax_scale=softmax_scale)
    o_ref, l_ref = oracle_kvcache(q, kc, vc, rope, **kw)
    o_base, l_base = baseline_kvcache(q, kc, vc, rope, **kw)
    lens_before = case["cache_seqlens"].clone()
    out, lse = rk.rope_attention_with_kvcache(q, kc, vc, rope, return_lse=True, backend="triton", **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any() and not lse.isnan().any()
    res_out = error_check(out, o_ref, o_base, q.dtype)
    res_lse = error_check(lse, l_ref, l_base, torch.float32)
    assert res_out.ok, f"out {res_out}"
    assert res_lse.ok, f"lse {res_lse}"
    assert torch.equal(case["cache_seqlens"], lens_before)
    if case["k_new"] is not None:  # appended in place, un-rotated
        s_new = case["k_new"].shape[1]
        for b, n0 in enumerate(lens_before.tolist()):
            idx = torch.arange(n0, n0 + s_new)
            if case["block_table"] is None:
                got_k, got_v = kc[b, idx], vc[b, idx]
            else:
                bs = kc.shape[1]
                blocks = case["block_table"][b].long()[idx // bs]
                got_k, got_v = kc[blocks, idx % bs], vc[blocks, idx % bs]
            assert torch.equal(got_k, case["k_new"][b]) and torch.equal(got_v, case["v_new"][b])
    return out, lse


# ------------------------------------------------------------------ coverage of the sweep
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_dtypes_and_causal(dtype, causal):
    case = make_cache((9, 30), s_new=3, sq=4, hq=4, hkv=1, d=32, dtype=dtype, seed=1)
    check_against_oracle(case, make_rope("llama3"), causal=causal, softmax_scale=0.3)


@pytest.mark.parametrize(
    "d, rotary_dim, interleaved, dtype",
    [
        (64, None, False, torch.bfloat16),
        (80, 40, True, torch.float16),
        (96, None, True, torch.bfloat16),
        (128, 64, False, torch.float16),
        (256, None, False, torch.bfloat16),
    ],
)
def test_head_dims_partial_and_interleaved(d, rotary_dim, interleaved, dtype):
    case = make_cache((3, 20), s_new=1, sq=1, hq=2, hkv=1, d=d, dtype=dtype, block=16, seed=2)
    check_against_oracle(case, make_rope("yarn", d, rotary_dim, interleaved, base=10000.0))


@pytest.mark.parametrize("sq", [1, 3])
def test_per_sequence_lengths_across_tiles(sq):
    """Lengths 1 (or Sq), 17, 113, 129 in one batch, each with its own dynamic-NTK table."""
    lens = (max(1, sq), 17, 113, 129)
    case = make_cache(tuple(n - sq for n in lens), s_new=sq, sq=sq, hq=2, hkv=2, d=16, dtype=torch.float16, seed=3)
    check_against_oracle(case, make_rope("dynamic", 16))


@pytest.mark.parametrize("hq, hkv, sq", [(2, 2, 2), (4, 2, 3), (8, 1, 1), (6, 2, 5), (8, 1, 9)])
def test_gqa(hq, hkv, sq):
    """GQA ratios 1, 2, 3, 8; G x Sq = 72 rows takes two M blocks of 64."""
    case = make_cache((4, 25), s_new=sq, sq=sq, hq=hq, hkv=hkv, d=16, dtype=torch.float16, block=16, seed=4)
    check_against_oracle(case, make_rope("default", 16))


# ------------------------------------------------------------------ exactness of rotation on read
@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_growing_sequence_across_switch_stays_exact(kind):
    """Prefill into an empty cache, then decode token by token across the scaling switch: every
    step equals the fp64 recomputation of the whole prefix, while a cache of keys rotated at
    append time (what serving stacks keep) drifts visibly once the table changes."""
    rope = make_rope(kind, 16)
    switch = 24 if kind == "dynamic" else 20
    prefill, total, d = switch - 3, switch + 6, 16
    gen = torch.Generator().manual_seed(8)
    ks = torch.randn(1, total, 1, d, generator=gen)
    vs = torch.randn(1, total, 1, d, generator=gen)
    qs = torch.randn(1, total, 2, d, generator=gen) * 3.0  # peaked attention: table changes show
    kc = torch.full((1, total, 1, d), float("nan"))
    vc = kc.clone()
    rotated_cache = torch.zeros(1, total, 1, d, dtype=torch.float64)
    worst_kernel = worst_rotated = 0.0
    t = 0
    while t < total:
        s = prefill if t == 0 else 1
        out = rk.rope_attention_with_kvcache(
            qs[:, t : t + s],
            kc,
            vc,
            rope,
            cache_seqlens=torch.tensor([t], dtype=torch.int32),
            k_new=ks[:, t : t + s],
            v_new=vs[:, t : t + s],
            backend="triton",
        )
        n = t + s
        exact = reference.rope_attention(qs[:, :n].double(), ks[:, :n].double(), vs[:, :n].double(), rope, causal=True)
        worst_kernel = max(worst_kernel, float((out.double() - exact[:, t:n]).abs().max()))
        # the rotated-cache way: each key rotated once, with the table of the length at its append
        for j in range(t, n):
            rotated_cache[:, j] = rk.apply_rope(ks[:, j : j + 1].double(), rope, torch.tensor([[j]]), seq_len=n)[:, 0]
        qr = rk.apply_rope(qs[:, n - 1 : n].double(), rope, torch.tensor([[n - 1]]), seq_len=n)
        scores = torch.einsum("bqhd,bkhd->bhqk", qr, rotated_cache[:, :n].expand(-1, -1, 2, -1)) * d**-0.5
        stale = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vs[:, :n].double().expand(-1, -1, 2, -1))
        worst_rotated = max(worst_rotated, float((stale - exact[:, n - 1 : n]).abs().max()))
        t = n
    print(f"{kind}: kernel {worst_kernel:.2e}, rotated cache {worst_rotated:.2e}")
    assert worst_kernel < 2e-5, worst_kernel
    assert worst_rotated > 1e-2, "caching rotated keys should be visibly wrong past the switch"


def test_positions_near_2_pow_20():
    """Keys up to position 2**20 + 40 (one shared physical block set, so memory stays small): the
    accurate angles keep fp32 within 1e-5 of fp64 where fp32 angles are off by ~0.06 rad."""
    n0, s_new, block, d = 2**20 + 37, 3, 16384, 16  # 65 tiles of 16K keys: ~5 s in the interpreter
    nblk = -(-(n0 + s_new) // block)
    gen = torch.Generator().manual_seed(9)
    pool = torch.randn(4, block, 1, d, generator=gen)
    vpool = torch.randn(4, block, 1, d, generator=gen)
    table = (torch.arange(nblk, dtype=torch.int32) % 3)[None]  # block 3 stays untouched
    table[0, -1] = 3  # the last block (37 cached tokens, then the append) is its own
    pool[3, 40:], vpool[3, 40:] = float("nan"), float("nan")
    q = torch.randn(1, 2, 2, d, generator=gen)
    k_new, v_new = torch.randn(1, s_new, 1, d, generator=gen), torch.randn(1, s_new, 1, d, generator=gen)
    rope = make_rope("default", d, base=10000.0)
    kw = dict(cache_seqlens=torch.tensor([n0], dtype=torch.int32), k_new=k_new, v_new=v_new, block_table=table)
    o_ref, l_ref = oracle_kvcache(q, pool, vpool, rope, **kw)
    o_base, _ = baseline_kvcache(q, pool, vpool, rope, **kw)
    call = kvcache_call(q, pool, vpool, rope, **kw)
    out, lse = decode.run(*_launch_args(call, 2), block_n=block)
    err = float((out.double() - o_ref).abs().max())
    assert err < 1e-5 and float((lse.double() - l_ref).abs().max()) < 1e-5
    assert float((o_base.double() - o_ref).abs().max()) > 100 * err  # the fp32-angle baseline is far off


def test_composed_angles_accurate():
    """The kernel rotates by R(base) R(j) (base = tile start, j < BLOCK_N); the composed cos/sin
    stay within 2e-6 of exact angles at every int32 position."""
    import triton
    import triton.language as tl

    @triton.jit
    def composed(SPLIT, POS, COS, SIN, HALF: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr):
        pair = tl.arange(0, HP)
        ok = pair < HALF
        f1, f2, f3, f4 = load_split(SPLIT, pair, ok, HALF)
        j = tl.arange(0, BLOCK)
        base = tl.load(POS + tl.program_id(0) * BLOCK + j * 0)  # the tile start, broadcast
        cb, sb = decode._cos_sin(base, f1, f2, f3, f4)
        cj, sj = decode._cos_sin(j, f1, f2, f3, f4)
        offs = (tl.program_id(0) * BLOCK + j)[:, None] * HALF + pair[None, :]
        tl.store(COS + offs, cb * cj - sb * sj, mask=ok[None, :])
        tl.store(SIN + offs, sb * cj + cb * sj, mask=ok[None, :])

    block = 64
    starts = [0, 2**20 - 64 * 5, 2**24 - 64 * 3, 2**28 + 17, 2**31 - 64 * 3]
    tiles = torch.tensor([s + 64 * t for s in starts for t in range(3)], dtype=torch.int32)
    for rope in (rk.RopeConfig(128, base=10000.0), rk.RopeConfig(64, base=1e6)):
        inv64, split = rope.tables()
        half = rope.rotary_dim // 2
        pos = tiles.repeat_interleave(block)
        cos = torch.empty(pos.numel(), half)
        sin = torch.empty_like(cos)
        composed[(tiles.numel(),)](split[0].contiguous(), pos, cos, sin, HALF=half, HP=half, BLOCK=block)
        exact = exact_angle(pos + torch.arange(block).repeat(tiles.numel()), inv64[0])
        err = max(float((cos - exact.cos()).abs().max()), float((sin - exact.sin()).abs().max()))
        print(f"D {rope.head_dim} base {rope.base:g}: composed cos/sin max error {err:.3g}")
        assert err <= 2e-6, err


# ------------------------------------------------------------------ kernel structure
def _call(case, rope, causal=True):
    kw = {key: case[key] for key in ("cache_seqlens", "k_new", "v_new", "block_table")}
    return kvcache_call(case["q"], case["k_cache"], case["v_cache"], rope, causal=causal, **kw)


def _launch_args(call, num_splits=0):
    """The arguments of ``decode.run`` for a validated call: the op's, rope bundled."""
    return bundle_rope(call.op_args(num_splits), rope_position(KVCACHE_SCHEMA))


def test_split_k_matches_single_pass():
    """Forced 1, 3 and 8 splits agree (empty splits of the shorter sequences included)."""
    rope = make_rope("dynamic", 16)
    case = make_cache((2, 70, 128), s_new=1, sq=2, hq=2, hkv=1, d=16, dtype=torch.float32, block=32, seed=10)
    kw = {key: case[key] for key in ("cache_seqlens", "k_new", "v_new", "block_table")}
    o_ref, l_ref = oracle_kvcache(case["q"], case["k_cache"], case["v_cache"], rope, **kw)
    call = _call(case, rope)
    results = [decode.run(*_launch_args(call, s)) for s in (1, 3, 8)]
    for out, lse in results:
        assert float((out.double() - o_ref).abs().max()) < 1e-5
        assert float((lse.double() - l_ref).abs().max()) < 1e-5
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=2e-6)
        torch.testing.assert_close(lse, results[0][1], rtol=0, atol=2e-6)


def test_num_splits_heuristic():
    h = decode.num_splits_heuristic
    assert h(batch=64, hkv=8, m_blocks=1, capacity=32768, num_sms=132) == 1  # 512 programs: no split
    assert h(batch=1, hkv=8, m_blocks=1, capacity=32768, num_sms=132) == 33  # ~2 programs per SM
    assert h(batch=1, hkv=8, m_blocks=1, capacity=1024, num_sms=132) == 4  # >= 256 keys per split
    assert h(batch=1, hkv=1, m_blocks=1, capacity=1 << 20, num_sms=132) == 64  # capped
    assert h(batch=2, hkv=2, m_blocks=1, capacity=100, num_sms=132) == 1


def test_paged_equals_dense_bitwise():
    rope = make_rope("longrope", 16)
    dense = make_cache((3, 19, 50), s_new=2, sq=2, hq=4, hkv=2, d=16, dtype=torch.bfloat16, smax=64, seed=11)
    results = [rk.rope_attention_with_kvcache(return_lse=True, backend="triton", rope=rope, **clone_case(dense))]
    for block in (16, 32):
        paged = make_cache((3, 19, 50), s_new=2, sq=2, hq=4, hkv=2, d=16, dtype=torch.bfloat16, block=block, smax=64)
        paged = dict(paged, q=dense["q"], k_new=dense["k_new"], v_new=dense["v_new"])
        for i, n in enumerate((3, 19, 50)):  # same cached tokens as the dense case
            for t in range(n):
                paged["k_cache"][paged["block_table"][i, t // block], t % block] = dense["k_cache"][i, t]
                paged["v_cache"][paged["block_table"][i, t // block], t % block] = dense["v_cache"][i, t]
        results.append(rk.rope_attention_with_kvcache(return_lse=True, backend="triton", rope=rope, **paged))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_nan_and_garbage_never_leak():
    """NaN fills every slot past the length (and spare blocks); unused table entries point far out
    of the pool. A kernel that loaded them would read NaN or fault."""
    case = make_cache((1, 16, 33), s_new=1, sq=1, hq=2, hkv=1, d=16, dtype=torch.float16, block=16, seed=12)
    assert (case["block_table"] == GARBAGE_BLOCK).any()
    out, lse = check_against_oracle(case, make_rope("default", 16), causal=False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_deterministic_and_inputs_untouched():
    rope = make_rope("default", 16)
    case = make_cache((6, 20), s_new=2, sq=2, hq=4, hkv=2, d=16, dtype=torch.float16, block=16, seed=14)
    q, k_new = case["q"].clone(), case["k_new"].clone()
    first = rk.rope_attention_with_kvcache(rope=rope, backend="triton", **case)
    second = rk.rope_attention_with_kvcache(rope=rope, backend="triton", **case)  # re-appends the same tokens
    assert torch.equal(first, second)
    assert torch.equal(case["q"], q) and torch.equal(case["k_new"], k_new)


# ------------------------------------------------------------------ errors and dispatch
def test_unsupported_calls_raise_with_reason():
    rope = make_rope("default", 16)
    base = make_cache((4, 9), s_new=1, sq=1, hq=2, hkv=1, d=16, dtype=torch.float16, block=16)

    def with_block(bs):
        n = -(-16 // bs) + 1
        pool = torch.zeros(2 * n, bs, 1, 16, dtype=torch.float16)
        table = torch.arange(2 * n, dtype=torch.int32).view(2, n)  # distinct blocks: no shared append
        return dict(base, k_cache=pool, v_cache=pool.clone(), block_table=table)

    f = rk.rope_attention_with_kvcache
    with pytest.raises(ValueError, match="block size 24 is not a power of two"):
        f(rope=rope, backend="triton", **with_block(24))
    with pytest.raises(ValueError, match="block size 3 is not a power of two"):
        f(rope=rope, backend="triton", **with_block(3))
    doubles = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in base.items()}
    with pytest.raises(ValueError, match="dtype torch.float64"):
        f(rope=rope, backend="triton", **doubles)
    big = make_cache((2,), s_new=1, sq=1, hq=1, hkv=1, d=288, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 288 > 256"):
        f(rope=make_rope("default", 288), backend="triton", **big)
    # `auto` skips triton for these (check returns the reason) and the torch backend serves them.
    assert get_backend("triton").check_kvcache(_call(with_block(24), rope)) is not None
    out = f(rope=rope, **with_block(24))
    assert out.shape == base["q"].shape


def test_opcheck_declares_the_cache_mutation():
    """The kv-cache kernel is a ``torch.library`` op like its siblings: schema (the appends into
    ``k_cache``/``v_cache`` declared), fake and autograd registration pass ``opcheck``, dense and paged."""
    gen = torch.Generator().manual_seed(21)
    rope = make_rope("dynamic", 16)
    for table in (None, torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)):
        shape = (2, 32, 1, 16) if table is None else (4, 16, 1, 16)
        kc, vc = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        kn, vn = torch.randn(2, 2, 1, 16, generator=gen), torch.randn(2, 2, 1, 16, generator=gen)
        q = torch.randn(2, 2, 2, 16, generator=gen)
        lens = torch.tensor([3, 20], dtype=torch.int32)
        call = kvcache_call(q, kc, vc, rope, cache_seqlens=lens, k_new=kn, v_new=vn, block_table=table)
        torch.library.opcheck(torch.ops.ropekern_triton.kvcache.default, call.op_args())


# ------------------------------------------------------------------ GPU code generation, no GPU needed
_SM90_CHILD = r"""
import json, re, subprocess, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from ropekern._triton import decode
from ropekern._triton.host import head_constants

def report(kernel, types, constexprs, num_warps, num_stages):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    # a real launch marks 16-divisible pointers and strides, which enables vectorised loads
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or "stride" in n}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", "-", "-o", "/dev/null"],
                         input=compiled.asm["ptx"], capture_output=True, text=True, check=True).stderr
    return [int(re.search(p, log).group(1)) for p in (r"Used (\d+) registers", r"(\d+) bytes spill stores")]

out = []
for dtype_name, d, rotary_dim, interleaved, rows in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    ptr = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}[dtype_name]
    head = head_constants(d, rotary_dim)
    dp = head["HEAD_DIM_P"]
    block_m, block_n, warps, stages = decode._config(dtype, dp, rows)
    ce = dict(G=4, **head, INTERLEAVED=interleaved, ROTATE=True, ROPE_TABLE=False, CAUSAL=True, PAGED=True,
              LOG2_BS=4, BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=dtype == torch.float32)
    types = dict(Q=ptr, KC=ptr, VC=ptr, OUT=ptr, SEQLENS="*i32", TABLE="*i32", SPLIT="*fp32", LSE="*fp32",
                 qk_scale="fp32", attention_factor="fp32")
    out.append(["decode", dtype_name, d, *report(decode._decode_kernel, types, ce, warps, stages)])
    types = dict(OPART="*fp32", LPART="*fp32", OUT=ptr, LSE="*fp32")
    ce = dict(HEAD_DIM=d, HEAD_DIM_P=dp, SP=64)
    out.append(["merge", dtype_name, d, *report(decode._merge_kernel, types, ce, 4, 1)])
    types = dict(KNEW=ptr, VNEW=ptr, KC=ptr, VC=ptr, SEQLENS="*i32", TABLE="*i32")
    ce = dict(HEAD_DIM=d, HEAD_DIM_P=dp, BLOCK_H=16, PAGED=True, LOG2_BS=4)
    out.append(["append", dtype_name, d, *report(decode._append_kernel, types, ce, 4, 1)])
print(json.dumps(out))
"""


def test_compiles_for_sm90_without_spills(tmp_path):
    """The interpreter accepts code that a GPU compile rejects (a plain float global inside a jit
    function did exactly that), so the production configurations (paged, rotated: the most
    registers) are compiled for an H100 here, in a process without TRITON_INTERPRET, and ptxas
    must fit them in registers without spilling."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    cases = [("float16", 128, 128, False, 4), ("bfloat16", 256, 256, False, 64), ("float32", 80, 40, True, 64)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = str(pathlib.Path(decode.__file__).resolve().parents[2])  # the checkout that holds ropekern/
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_CHILD, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import triton

    from ropekern._triton import _release

    # Triton 3.8's ptxas has no spill-free configuration for the D 256 bf16 program (decode._config).
    known = {(3, 8): {("decode", "bfloat16", 256): 20}}.get(_release(triton.__version__), {})
    for kernel, dtype, d, regs, spills in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert regs <= 255 and spills == known.get((kernel, dtype, d), 0), (kernel, dtype, d, regs, spills)
