"""Ring attention (ropekern.distributed) across real processes: gloo on CPU, loopback only.

One group of processes is spawned per world size (2 and 4) and runs every case of ``CASES``; each
rank saves its shards of out, lse and the gradients. The parent gathers them (``unshard``) and
holds them to the docs/design.md §5 rule against the single-process fp64 reference on the gathered
sequence (``rope_attention`` semantics and its autograd gradients), with the single-process
baseline (dtype arithmetic, fp32 angles) as the yardstick: factor 2 forward, 3 for gradients.
A group that does not finish within ``_DEADLINE_S`` is killed and the test fails.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ropekern as rk
from ropekern.distributed import ring_rope_attention, shard, shard_indices, unshard
from ropekern.distributed.ring import _block_plan
from ropekern.testing import baseline_attention, error_check

_DEADLINE_S = 150  # a whole group (spawn + every case); ~15 s when the machine is idle
_GLOO_TIMEOUT = timedelta(seconds=60)  # a rank blocked in a transfer raises instead of hanging


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str = "zigzag"
    causal: bool = True
    dtype: torch.dtype = torch.float32
    b: int = 2
    s: int = 8  # tokens per rank
    hq: int = 4
    hkv: int = 2
    d: int = 64
    rope: dict = dataclasses.field(default_factory=dict)  # RopeConfig keyword arguments besides head_dim
    positions: str = "default"  # or "explicit": near 2**20, with repeats, travelling with K
    packed: bool = False  # q, k, v are strided views of one [B, S, Hq + 2 Hkv, D] buffer
    softmax_scale: float | None = None
    pairs: bool = False  # world 4 split into two rings of 2 (sub-groups: group ranks != global ranks)
    worlds: tuple[int, ...] = (2, 4)


CASES: dict[str, Case] = {
    "contiguous-causal-gqa2": Case(layout="contiguous", s=7, d=64),
    "zigzag-causal-mqa-interleaved-partial": Case(
        b=1, hq=4, hkv=1, d=80, rope={"rotary_dim": 40, "interleaved": True, "base": 500.0}
    ),
    "zigzag-full-yarn-scale": Case(
        causal=False,
        s=6,
        hq=2,
        hkv=2,
        d=32,
        softmax_scale=0.3,
        rope={"scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
    ),
    "contiguous-full-llama3": Case(
        layout="contiguous",
        causal=False,
        s=5,
        d=96,
        rope={
            "base": 500000.0,
            "scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ),
    "zigzag-causal-dynamic": Case(rope={"scaling": {"rope_type": "dynamic", "factor": 4.0}}),
    "contiguous-causal-longrope": Case(
        layout="contiguous",
        d=16,
        rope={
            "scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0, 2.0, 4.0] + [8.0] * 5}
        },
    ),
    "zigzag-causal-dynamic-explicit-positions": Case(
        positions="explicit", rope={"scaling": {"rope_type": "dynamic", "factor": 2.0}}
    ),
    "zigzag-causal-bf16-gqa4": Case(dtype=torch.bfloat16, hq=8, hkv=2, d=128),
    "zigzag-causal-packed-d256": Case(b=1, s=4, hq=2, hkv=1, d=256, packed=True),
    "contiguous-causal-subgroups": Case(layout="contiguous", s=6, d=32, pairs=True, worlds=(4,)),
    "zigzag-causal-empty-batch": Case(b=0, worlds=(2,)),
}


def _rope_kwargs(case: Case, n: int) -> dict:
    """RopeConfig kwargs; length-dependent types get their original/max length N/2 (N = W·S): the
    global length N selects the scaled table, while a rank's own keys may end below N/2 (contiguous
    rank 0 ends at S), so a rank that used its local length would pick the wrong table."""
    kwargs = {key: (dict(val) if isinstance(val, dict) else val) for key, val in case.rope.items()}
    scaling = kwargs.get("scaling")
    if scaling and scaling["rope_type"] == "dynamic":
        kwargs["max_position_embeddings"] = n // 2
    if scaling and scaling["rope_type"] == "longrope":
        scaling["original_max_position_embeddings"] = n // 2
    return kwargs


def inputs(name: str, world: int) -> dict:
    """The global sequence of a case (seeded by its name: every process builds the same tensors)."""
    case = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n = case.s * world
    shape_q, shape_kv = (case.b, n, case.hq, case.d), (case.b, n, case.hkv, case.d)
    g = {
        "q": torch.randn(shape_q, generator=gen),
        "k": torch.randn(shape_kv, generator=gen),
        "v": torch.randn(shape_kv, generator=gen),
        "do": torch.randn(shape_q, generator=gen),
    }
    g = {key: t.to(case.dtype) for key, t in g.items()}
    if case.positions == "explicit":
        # Positions are data: pairs of equal positions 2**15 apart, ending at 2**20 - 2**15 and
        # starting at 2**20 - N/2 * 2**15 (2**19 for N = 32). Each rank's own largest key position
        # differs from the global one by up to ~2x, so a rank using its local length for dynamic
        # NTK would pick a base off by ~2x.
        pos = 2**20 - (n // 2 - torch.arange(n) // 2) * 2**15
        g["pos"] = pos.expand(case.b, n).contiguous()
    g["rope"] = rk.RopeConfig(case.d, **_rope_kwargs(case, n))
    return g


# ------------------------------------------------------------------------------ worker side
def _run_case(name: str, rank: int, world: int, groups: dict) -> dict:
    case = CASES[name]
    group, g_rank, g_world = None, rank, world
    if case.pairs:
        g_world = 2
        group, g_rank = groups["pairs"][rank // 2], rank % 2
    g = inputs(name, g_world)
    layout = case.layout

    def mine(t):
        return shard(t, g_world, g_rank, layout)

    q, k, v = mine(g["q"]), mine(g["k"]), mine(g["v"])
    if case.packed:
        qkv = torch.cat((q, k, v), dim=2).requires_grad_()
        q, k, v = qkv[:, :, : case.hq], qkv[:, :, case.hq : case.hq + case.hkv], qkv[:, :, case.hq + case.hkv :]
        leaves = (qkv,)
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        leaves = (q, k, v)
    pos = {}
    if case.positions == "explicit":
        pos = {"q_positions": mine(g["pos"]), "k_positions": mine(g["pos"]).to(torch.int32)}
    out, lse = ring_rope_attention(
        q,
        k,
        v,
        g["rope"],
        group=group,
        causal=case.causal,
        layout=layout,
        softmax_scale=case.softmax_scale,
        return_lse=True,
        **pos,
    )
    out.backward(mine(g["do"]))
    if case.packed:
        grad = leaves[0].grad
        grads = torch.split(grad, (case.hq, case.hkv, case.hkv), dim=2)
    else:
        grads = tuple(t.grad for t in leaves)
    return {"out": out.detach(), "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def _errors_case(rank: int, world: int) -> dict:
    """Bad arguments on one rank must raise on every rank (no rank left blocked in a transfer)."""
    rope = rk.RopeConfig(16)
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16)
    seen = {}

    def attempt(name, **kwargs):
        args = {"q": q, "k": k, "v": v, **kwargs}
        try:
            ring_rope_attention(args.pop("q"), args.pop("k"), args.pop("v"), rope, **args)
            seen[name] = "no error"
        except (TypeError, ValueError) as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"

    attempt("layout_on_rank0", layout="diagonal" if rank == 0 else "zigzag")
    attempt(
        "shorter_shard_on_last",
        q=q[:, :2] if rank == world - 1 else q,
        k=k[:, :2] if rank == world - 1 else k,
        v=v[:, :2] if rank == world - 1 else v,
    )
    attempt("odd_zigzag", q=q[:, :3], k=k[:, :3], v=v[:, :3])
    attempt("q_k_lengths", k=k[:, :2], v=v[:, :2], layout="contiguous")
    attempt("backend", backend="nope")
    return seen


def _worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # W processes share 2 cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=_GLOO_TIMEOUT
    )
    try:
        groups = {}
        if world == 4:  # every rank creates every group, in the same order
            groups["pairs"] = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for name in names:
            start = time.perf_counter()
            try:
                res = _errors_case(rank, world) if name == "errors" else _run_case(name, rank, world, groups)
            except Exception:
                res = {"traceback": traceback.format_exc()}
            res["seconds"] = time.perf_counter() - start
            torch.save(res, Path(out_dir) / f"{name}.{rank}.pt")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ parent side
def _cases_for(world: int) -> list[str]:
    return [name for name, case in CASES.items() if world in case.worlds]


def _context():
    """A fork server that imports torch once and forks every rank from that clean state: spawning
    re-imports torch in each rank (~2-5 s each, far more when W ranks import at once on 2 cores),
    and forking pytest itself would copy its OpenMP thread pool, which a forked child cannot use."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "ropekern", __name__])
    return ctx


@pytest.fixture(scope="module")
def ring_results():
    """world -> the directory of saved results; each world's group is spawned once, on demand."""
    done: dict[int, Path] = {}
    tmp = tempfile.TemporaryDirectory(prefix="ropekern-ring-")

    def get(world: int) -> Path:
        if world not in done:
            out = Path(tmp.name) / f"w{world}"
            out.mkdir()
            names = [*_cases_for(world), "errors"]
            ctx = _context()
            procs = [
                ctx.Process(target=_worker, args=(r, world, str(out / "init"), str(out), names), daemon=True)
                for r in range(world)
            ]
            for p in procs:
                p.start()
            deadline = time.monotonic() + _DEADLINE_S
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            if hung:
                pytest.fail(f"world {world}: ranks {hung} still running after {_DEADLINE_S} s (hang?)")
            bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
            if bad:
                pytest.fail(f"world {world}: ranks exited with codes {bad}")
            done[world] = out
        return done[world]

    yield get
    tmp.cleanup()


def _load(directory: Path, name: str, ranks: list[int]) -> list[dict]:
    shards = []
    for r in ranks:
        res = torch.load(directory / f"{name}.{r}.pt")
        if "traceback" in res:
            pytest.fail(f"rank {r} raised:\n{res['traceback']}")
        shards.append(res)
    return shards


def _reference(case: Case, g: dict) -> dict:
    """Single-process fp64 oracle and dtype baseline on the gathered sequence, with gradients."""
    kwargs = {"causal": case.causal, "softmax_scale": case.softmax_scale}
    if case.positions == "explicit":
        kwargs.update(q_positions=g["pos"], k_positions=g["pos"])
    result = {}
    for kind in ("oracle", "baseline"):
        dt = torch.float64 if kind == "oracle" else case.dtype
        q, k, v = (g[key].detach().to(dt, copy=True).requires_grad_() for key in ("q", "k", "v"))
        if kind == "oracle":
            out, lse = rk.reference.rope_attention(q, k, v, g["rope"], return_lse=True, **kwargs)
        else:
            out, lse = baseline_attention(q, k, v, g["rope"], **kwargs)
        out.backward(g["do"].to(dt))
        result[kind] = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return result


def _assert_matches(case: Case, shards: list[dict], ref: dict) -> None:
    for key in ("out", "lse", "dq", "dk", "dv"):
        dim = 2 if key == "lse" else 1
        got = unshard([s[key] for s in shards], case.layout, dim=dim)
        assert got.shape == ref["oracle"][key].shape, key
        assert got.dtype == (torch.float32 if key == "lse" else case.dtype), key
        factor = 2.0 if key in ("out", "lse") else 3.0
        check = error_check(got, ref["oracle"][key], ref["baseline"][key], case.dtype, factor=factor)
        assert check.ok, f"{key}: {check}"


@pytest.mark.parametrize("name, world", [(n, w) for n, c in CASES.items() for w in c.worlds])
def test_ring_matches_single_process(ring_results, name, world):
    case = CASES[name]
    directory = ring_results(world)
    rings = [[0, 1], [2, 3]] if case.pairs else [list(range(world))]
    g_world = 2 if case.pairs else world
    g = inputs(name, g_world)
    ref = _reference(case, g) if case.b else None
    for ranks in rings:
        shards = _load(directory, name, ranks)
        if case.b == 0:
            for s in shards:
                assert s["out"].shape == (0, case.s, case.hq, case.d) and s["dk"].shape == (0, case.s, case.hkv, case.d)
            continue
        _assert_matches(case, shards, ref)


@pytest.mark.parametrize("world", [2, 4])
def test_errors_raise_on_every_rank(ring_results, world):
    directory = ring_results(world)
    seen = _load(directory, "errors", list(range(world)))
    for r, s in enumerate(seen):
        own = "ValueError: `layout` must be one of" if r == 0 else "ValueError: ring_rope_attention: ranks disagree"
        assert s["layout_on_rank0"].startswith(own), (r, s["layout_on_rank0"])
        assert s["shorter_shard_on_last"].startswith("ValueError: ring_rope_attention: ranks disagree"), r
        assert "zigzag layout needs an even shard length" in s["odd_zigzag"], r
        assert "`q` holds 4 tokens but `k` holds 2" in s["q_k_lengths"], r
        assert "unknown backend 'nope'" in s["backend"], r


# ------------------------------------------------------------------------------ no processes
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_block_plan_covers_exactly_the_causal_mask(layout, world):
    """The sub-blocks of every (rank, src) pair, with the mask each applies, reproduce the global
    causal mask g_j <= g_i exactly: no key seen twice, none missed."""
    s = 6
    n = s * world
    mask = torch.zeros(n, n, dtype=torch.int64)
    for rank in range(world):
        gq = shard_indices(n, world, rank, layout)
        for src in range(world):
            gk = shard_indices(n, world, src, layout)
            for qs, ks, causal in _block_plan(layout, True, rank, src, s):
                sub = torch.ones(qs.stop - qs.start, ks.stop - ks.start, dtype=torch.int64)
                if causal:
                    sub = torch.tril(sub)
                mask[gq[qs][:, None], gk[ks][None, :]] += sub
    assert torch.equal(mask, torch.tril(torch.ones(n, n, dtype=torch.int64)))


def test_zigzag_balances_causal_work():
    """Zigzag: every rank attends to exactly half a block per step; contiguous: 0 to W-1/2 blocks."""
    world, s = 4, 8

    def work(layout, rank):
        return sum(
            (qs.stop - qs.start) * (ks.stop - ks.start) / (2 if causal else 1)
            for src in range(world)
            for qs, ks, causal in _block_plan(layout, True, rank, src, s)
        )

    assert {work("zigzag", r) for r in range(world)} == {world * s * s / 2}
    assert [work("contiguous", r) / (s * s) for r in range(world)] == [0.5, 1.5, 2.5, 3.5]


def test_shard_unshard_roundtrip_and_errors():
    x = torch.arange(2 * 16 * 3).reshape(2, 16, 3)
    for layout in ("zigzag", "contiguous"):
        parts = [shard(x, 4, r, layout) for r in range(4)]
        assert torch.equal(unshard(parts, layout), x)
    assert shard_indices(16, 4, 1, "zigzag").tolist() == [2, 3, 12, 13]
    with pytest.raises(ValueError, match="multiple of 8 for the zigzag layout"):
        shard_indices(12, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="`layout` must be one of"):
        shard_indices(8, 2, 0, "ring")
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_indices(8, 2, 2, "contiguous")


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_rope_attention(q, q, q, rk.RopeConfig(16))


@pytest.fixture
def single_rank_group(tmp_path):
    """A world of one in this process (gloo, file store): the degenerate ring, no transfers."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_world_of_one_matches_and_leaves_inputs_alone(single_rank_group):
    name = "zigzag-causal-dynamic"
    case, g = CASES[name], inputs(name, 1)
    q, k, v = (g[key].clone().requires_grad_() for key in ("q", "k", "v"))
    before = [t.detach().clone() for t in (q, k, v)]
    out, lse = ring_rope_attention(q, k, v, g["rope"], return_lse=True)
    out.backward(g["do"])
    ref = _reference(case, g)
    got = {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for key, t in got.items():
        factor = 2.0 if key in ("out", "lse") else 3.0
        check = error_check(t, ref["oracle"][key], ref["baseline"][key], case.dtype, factor=factor)
        assert check.ok, f"{key}: {check}"
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, (q, k, v)))
    with torch.no_grad():
        again = ring_rope_attention(q, k, v, g["rope"])
    assert torch.equal(again, out.detach())  # deterministic, and the same without autograd


def test_example_runs_under_torchrun():
    """The documented launch path: examples/ring_attention.py under torchrun, checked against the
    single-process reference by the script itself (exit status 0 only if every check passes)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(root / "examples" / "ring_attention.py"), "--seq-len", "64", "--repeats", "1", "--check"]
    # Its own session, so that a hang kills torchrun *and* its workers (the process group).
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun still running after {_DEADLINE_S} s (hang?)")
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "check: PASS" in out
