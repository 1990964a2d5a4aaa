"""The benchmark layer (``ropekern.bench``, ``ropekern bench``, ``benchmarks/``): FLOP formulas, that
every provider computes the same thing as the oracle (so the timings compare equal work), the
interleaved timer, the CLI paths and the JSON/CSV/PNG/Markdown outputs. Tiny shapes, one repeat."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import ropekern as rk
from ropekern import backends, cli
from ropekern.bench import config as bconfig
from ropekern.bench.config import Shape, SweepConfig, make_rope
from ropekern.bench.metrics import attention_flops, io_bytes, op_bytes, op_flops
from ropekern.bench.providers import EagerRope, Point, Skip, build_providers, default_backends, make_inputs
from ropekern.bench.runner import run_sweep
from ropekern.bench.timing import time_interleaved
from ropekern.scaling import ROPE_TYPES

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--seqlens",
    "16,32",
    "--heads",
    "4/2",
    "--head-dim",
    "32",
    "--repeats",
    "1",
    "--no-progress",
    "--backends",
    "torch",
]


# ------------------------------------------------------------------------------------- metrics
def test_flop_formulas():
    assert attention_flops(2, 8, 1024, 512, 128, False) == 4 * 2 * 8 * 1024 * 512 * 128
    assert attention_flops(2, 8, 1024, 1024, 128, True) == 2 * 2 * 8 * 1024 * 1024 * 128  # causal halved
    fwd = Shape("forward", 1, 4096, 32, 8, 128, True, "bfloat16", "cpu")
    assert op_flops(fwd) == 4 * 32 * 4096**2 * 128 / 2  # query heads count, KV heads do not
    bwd = dataclasses.replace(fwd, op="backward")
    assert op_flops(bwd) == pytest.approx(3.5 * op_flops(fwd))  # forward + 2.5x backward, timed together
    dec = Shape("decode", 2, 8192, 32, 8, 128, True, "bfloat16", "cpu", q_len=1)
    assert op_flops(dec) == 4 * 2 * 32 * 1 * 8192 * 128  # one query sees every key: not halved
    assert op_bytes(dec) == 2 * 2 * 8192 * 8 * 128 * 2  # K and V, bf16
    rope = Shape("rope", 1, 1000, 8, 2, 64, False, "float32", "cpu")
    assert op_flops(rope) is None  # RoPE FLOPs are never counted
    assert op_bytes(rope) == 2 * 1000 * (8 + 2) * 64 * 4  # q and k, read and written
    assert op_bytes(fwd) is None
    assert io_bytes(fwd) == 2 * (2 * 4096 * 32 * 128 + 2 * 4096 * 8 * 128)


def test_parsers():
    assert bconfig.parse_seqlens("4k,512,1K,512") == [512, 1024, 4096]
    assert bconfig.parse_heads("8/2,8") == [(8, 2), (8, 8)]
    assert bconfig.parse_rope_types("all") == list(ROPE_TYPES)
    assert bconfig.seqlen_ladder(512, 32768) == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert bconfig.seqlen_ladder(1000, 3000) == [1000, 2000, 3000]
    for bad, fn in [
        ("8/3", bconfig.parse_heads),
        ("x", bconfig.parse_seqlens),
        ("-4", bconfig.parse_seqlens),
        ("nope", bconfig.parse_rope_types),
        ("fp8", bconfig.parse_dtype),
    ]:
        with pytest.raises(ValueError):
            fn(bad)
    for op in bconfig.OPS:  # every preset grid is valid on both device kinds
        for dev in ("cpu", "cuda"):
            for name in ("quick", "full"):
                grid = bconfig.preset(name, op, dev)
                assert grid["seqlens"] and grid["heads"] and grid["head_dims"]
    assert max(bconfig.preset("full", "forward", "cuda")["seqlens"]) == 131072
    assert max(bconfig.preset("full", "forward", "cpu")["seqlens"]) == 32768


# ------------------------------------------------------------------------------------- providers
@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_eager_rope_matches_reference(rope_type, interleaved):
    """The eager baseline rotates like the reference (fp32 angles: within fp32 noise at small positions)."""
    rope = make_rope(rope_type, 32)
    rope = rk.RopeConfig(**{**rope.to_dict(), "interleaved": interleaved})
    x = torch.randn(2, 40, 3, 32)
    pos = torch.arange(40)
    for seq_len in (40, 5000):  # both sides of the dynamic / longrope switch (4096)
        ref = rk.reference.apply_rope(x, rope, pos.expand(2, 40), seq_len=seq_len)
        out = EagerRope(rope, pos, torch.float32, seq_len, "bshd")(x)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    partial = rk.RopeConfig(32, rotary_dim=16, interleaved=interleaved)
    out = EagerRope(partial, pos, torch.float32, 40, "bhsd")(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, rk.reference.apply_rope(x, partial), atol=2e-5, rtol=1e-5)
    assert torch.equal(out[..., 16:], x[..., 16:])


def _first(result):
    while isinstance(result, (tuple, list)):
        result = result[0]
    return result


def _outputs(op: str, shape: Shape, rope_type: str = "default") -> dict[str, object]:
    inputs = make_inputs(shape)
    point = Point(shape, rope_type, make_rope(rope_type, shape.head_dim), inputs)
    outs = {}
    for p in build_providers(op, ["torch"]):
        try:
            fn = p.build(point)
        except Skip:
            continue
        outs[p.name] = fn()
    return outs


@pytest.mark.parametrize("rope_type", ["default", "yarn", "longrope"])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_providers_compute_the_same(rope_type, causal):
    shape = Shape("forward", 2, 24, 4, 2, 32, causal, "float32", "cpu")
    outs = {k: _first(v) for k, v in _outputs("forward", shape, rope_type).items()}
    assert {"rk-torch", "rk-torch:norope", "rk-torch:separate", "eager+sdpa", "sdpa:norope"} <= set(outs)
    for name in ("rk-torch:separate", "eager+sdpa"):
        torch.testing.assert_close(outs[name], outs["rk-torch"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs["sdpa:norope"], outs["rk-torch:norope"], atol=2e-5, rtol=1e-4)
    assert (outs["rk-torch"] - outs["rk-torch:norope"]).abs().max() > 1e-2  # the RoPE-off variant really is off


def test_backward_providers_compute_the_same():
    shape = Shape("backward", 1, 20, 4, 2, 32, True, "float32", "cpu")
    outs = _outputs("backward", shape, "yarn")
    for name in ("rk-torch:separate", "eager+sdpa"):
        for g, ref in zip(outs[name], outs["rk-torch"]):
            torch.testing.assert_close(g, ref, atol=5e-5, rtol=1e-4)
    for g, ref in zip(outs["sdpa:norope"], outs["rk-torch:norope"]):
        torch.testing.assert_close(g, ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_providers_compute_the_same(q_len):
    shape = Shape("decode", 2, 40, 4, 2, 32, True, "float32", "cpu", q_len=q_len)
    outs = {k: _first(v) for k, v in _outputs("decode", shape, "yarn").items()}
    for name in ("rk-torch:separate", "eager+sdpa", "eager+einsum"):
        torch.testing.assert_close(outs[name], outs["rk-torch"], atol=2e-5, rtol=1e-4)
    if q_len == 1:
        torch.testing.assert_close(outs["sdpa:norope"], outs["rk-torch:norope"], atol=2e-5, rtol=1e-4)


def test_rope_providers_compute_the_same():
    shape = Shape("rope", 2, 30, 4, 2, 32, False, "float32", "cpu")
    outs = _outputs("rope", shape, "llama3")
    for a, b in zip(outs["eager"], outs["rk-torch"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_gpu_providers_skip_with_a_reason_on_cpu():
    shape = Shape("forward", 1, 16, 2, 2, 32, True, "float32", "cpu")
    point = Point(shape, "default", make_rope("default", 32), make_inputs(shape))
    peers = [p for p in build_providers("forward", ["torch"]) if p.role == "peer"]
    assert {p.name for p in peers} == {"flash-attn", "flashinfer"}
    for p in peers:
        with pytest.raises(Skip, match="CUDA"):
            p.build(point)


def test_default_backends_and_new_backends_are_picked_up(monkeypatch):
    # triton on CPU tensors is the interpreter (tests set TRITON_INTERPRET=1): never a timed provider;
    # the torch reference only when no native backend exists.
    native = [n for n, ok in rk.available_backends().items() if ok is True and n in backends._AUTO_ORDER["cpu"]]
    assert "triton" not in default_backends("cpu")
    assert default_backends("cpu") == ([n for n in native if n != "torch"] or ["torch"])
    # A new native CPU backend appears in the registry: the sweep times it instead of the reference.
    monkeypatch.setitem(backends._REGISTRY, "fakecpu", "ropekern.backends.pytorch:backend")
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("fakecpu", *backends._AUTO_ORDER["cpu"]))
    backends.load.cache_clear()
    try:
        assert "fakecpu" in default_backends("cpu") and "torch" not in default_backends("cpu")
        names = [p.name for p in build_providers("forward", ["fakecpu"])]
        assert names[:3] == ["rk-fakecpu", "rk-fakecpu:norope", "rk-fakecpu:separate"]
    finally:
        backends.load.cache_clear()


# ------------------------------------------------------------------------------------- timing
def test_timing_interleaves_and_isolates_failures():
    log: list[str] = []

    def make(tag):
        return lambda: log.append(tag)

    def boom():
        raise RuntimeError("kernel exploded")

    res = time_interleaved([make("a"), boom, make("b")], repeats=3, min_sample_s=0.0)
    assert isinstance(res[1], RuntimeError)
    assert res[0].samples == res[2].samples == 3 and res[0].calls_per_sample == 1
    assert log[:2] == ["a", "b"]  # warm-up once each
    assert log[2:] == ["a", "b", "b", "a", "a", "b"]  # rounds interleave, with a rotated start
    log.clear()
    res = time_interleaved([make("a"), make("b")], repeats=2, min_sample_s=0.0, warmup=False)
    assert log == ["a", "b", "b", "a"] and res[0].samples == 2  # no warm-up calls
    with pytest.raises(ValueError):
        time_interleaved([make("a")], repeats=0)


def test_sweep_rows_ratios_and_spread():
    cfg = SweepConfig(
        op="forward",
        seqlens=[16],
        heads=[(2, 1)],
        head_dims=[32],
        rope_types=["default", "yarn"],
        repeats=1,
        memory=False,
        backends=["torch"],
        providers=["rk-torch", "rk-torch:norope", "eager+sdpa"],
    )
    res = run_sweep(cfg, progress=False)
    ok = {(r["provider"], r["rope_type"]): r for r in res.rows if r["status"] == "ok"}
    assert set(ok) == {
        ("rk-torch", "default"),
        ("rk-torch", "yarn"),
        ("rk-torch:norope", "default"),
        ("eager+sdpa", "default"),
    }
    fused = ok[("rk-torch", "default")]
    assert fused["speedup"]["eager+sdpa"] == pytest.approx(ok[("eager+sdpa", "default")]["ms"] / fused["ms"])
    assert fused["rope_tax"] == pytest.approx(fused["ms"] / ok[("rk-torch:norope", "default")]["ms"] - 1)
    assert fused["tflops"] == pytest.approx(4 * 2 * 16 * 16 * 32 / 2 / (fused["ms"] * 1e-3) / 1e12)
    (spread,) = res.spread
    assert spread["spread"] == pytest.approx(max(fused["ms"], ok[("rk-torch", "yarn")]["ms"]) / fused["ms"])
    with pytest.raises(ValueError, match="unknown provider"):
        run_sweep(dataclasses.replace(cfg, providers=["nope"]), progress=False)


# ------------------------------------------------------------------------------------- CLI
def test_cli_forward_writes_json_csv_png(tmp_path, capsys):
    out_dir = tmp_path / "res"
    rc = cli.main(
        [
            "bench",
            *TINY,
            "--json",
            str(tmp_path / "r.json"),
            "--csv",
            str(tmp_path / "r.csv"),
            "--plot",
            "--out",
            str(out_dir),
            "--tag",
            "t",
            "--no-memory",
            "--note",
            "unit test",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "rk-torch" in text and "eager+sdpa" in text and "x eager+sdpa" in text
    assert "flash-attn" in text and "needs a CUDA device" in text  # skipped providers say why
    data = json.loads((tmp_path / "r.json").read_text())
    for key in ("date", "command", "device", "device_slug", "driver", "torch", "triton", "threads", "note"):
        assert key in data["meta"]
    assert data["meta"]["note"] == "unit test" and "bench" in data["meta"]["command"]
    assert data["config"]["seqlens"] == [16, 32] and data["config"]["backends"] == ["torch"]
    assert {r["seqlen"] for r in data["rows"] if r["status"] == "ok"} == {16, 32}
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == len(data["rows"]) and "x_eager+sdpa" in rows[0]
    for kind in ("speedup", "throughput", "memory"):
        png = out_dir / f"t-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "t.json").exists() and (out_dir / "t.csv").exists()
    assert str(out_dir / "t-speedup.png") in text  # --plot says where the files are


@pytest.mark.parametrize("op", ["backward", "decode", "rope"])
def test_cli_other_ops(op, capsys):
    args = ["bench", "--op", op, *TINY, "--no-memory"]
    if op == "rope":
        args += ["--rope-type", "default,dynamic"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "rk-torch" in text
    assert ("GB/s" in text) == (op in ("decode", "rope"))
    if op == "rope":
        assert "variant spread" in text


def test_cli_measures_memory_in_a_subprocess(tmp_path, capsys):
    rc = cli.main(
        [
            "bench",
            "--seqlens",
            "64",
            "--heads",
            "2/1",
            "--head-dim",
            "32",
            "--repeats",
            "1",
            "--no-progress",
            "--backends",
            "torch",
            "--providers",
            "rk-torch,eager+sdpa",
            "--json",
            str(tmp_path / "m.json"),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert "subprocess" in data["meta"]["memory_method"]
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["peak_mb"] is not None and r["peak_mb"] >= 0 for r in ok)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heads", "8/3"], "multiple of Hkv"),
        (["--seqlens", "abc"], "cannot parse"),
        (["--providers", "nope"], "unknown provider"),
        (["--rope-type", "warp"], "unknown rope type"),
        (["--repeats", "0"], "--repeats"),
        (["--device", "cuda"], "CUDA"),
    ],
)
def test_cli_bad_arguments(args, message, capsys):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["bench", "--seqlens", "16", "--no-progress", "--no-memory", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_broken_backend(monkeypatch, capsys):
    class Broken:
        name = "broken"

        def check_attention(self, call):
            return None

        def attention(self, call):
            raise RuntimeError("kernel exploded")

    torch_backend = backends.get_backend("torch")
    monkeypatch.setattr(backends, "load", lambda name: Broken() if name == "broken" else torch_backend)
    monkeypatch.setitem(backends._REGISTRY, "broken", "x:y")
    rc = cli.main(["bench", *TINY, "--backends", "broken", "--providers", "rk-broken,eager+sdpa", "--no-memory"])
    out = capsys.readouterr().out
    assert rc == 1 and "kernel exploded" in out and "eager+sdpa" in out


def test_max_seqlen_ladder():
    parser = __import__("argparse").ArgumentParser()
    from ropekern.bench.cli import add_arguments, config_from_args

    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--max-seqlen", "32768", "--device", "cpu"]))
    assert cfg.seqlens == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert (cfg.dtype, cfg.heads, cfg.head_dims, cfg.causal, cfg.batch) == ("float32", [(8, 2)], [128], [True], 1)
    cfg = config_from_args(parser.parse_args(["--seqlens", "1k,8k,64k", "--max-seqlen", "8192", "--no-causal"]))
    assert cfg.seqlens == [1024, 8192] and cfg.causal == [False]


# ------------------------------------------------------------------------------------- scripts and report
@pytest.mark.parametrize("script", ["bench_rope_attention", "bench_backward", "bench_decode", "bench_apply_rope"])
def test_scripts_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script + ".py", "--help"])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "benchmarks" / f"{script}.py"), run_name="__main__")
    assert exc.value.code == 0
    assert "--no-save" in capsys.readouterr().out


def test_script_saves_results_and_report_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    results = tmp_path / "results"
    monkeypatch.setattr(
        sys, "argv", ["bench_decode.py", *TINY, "--no-memory", "--out", str(results / "dev"), "--note", "preliminary"]
    )
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "benchmarks" / "bench_decode.py"), run_name="__main__")
    assert exc.value.code == 0
    assert (results / "dev" / "decode.json").exists() and (results / "dev" / "decode-speedup.png").exists()
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    md_path = tmp_path / "docs" / "bench.md"
    (results / "dev" / "decode-speedup.png").unlink()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.SUMMARY_BEGIN}\nstale\n{report.SUMMARY_END}\n\nafter\n")
    # --plots redraws from the JSON
    report.main(["--results", str(results), "--out", str(md_path), "--readme", str(readme), "--plots"])
    summary = readme.read_text()
    assert "stale" not in summary and summary.endswith(f"{report.SUMMARY_END}\n\nafter\n")
    assert "| 32 | `rk-torch` |" in summary and "preliminary" in summary
    assert (results / "dev" / "decode-speedup.png").exists()
    md = md_path.read_text()
    assert "decode" in md and "rk-torch" in md and "preliminary" in md
    assert "| 32 |" in md  # a table row per seqlen
    assert "](../results/dev/decode-speedup.png)" in md  # links relative to the Markdown file
    capsys.readouterr()


@pytest.mark.skipif(backends.available_backends()["cpu"] is not True, reason="needs the native CPU extension")
def test_bench_cpu_script_tiny(tmp_path, capsys):
    """benchmarks/bench_cpu.py end to end on tiny shapes: prefill and decode rows with the ratios
    and bandwidths the README table is built from, the read-only sweep recorded in the JSON."""
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    bench_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_cpu)
    out = tmp_path / "cpu.json"
    argv = ["--prefill", "64", "--decode", "64", "--dtypes", "float32", "--repeats", "1", "--memory-seqlen", "0"]
    assert bench_cpu.main([*argv, "--sweep-mb", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sweep_mb"] == 1 and res["memcpy_gbps"] > 0
    prefill, decode = res["rows"]
    assert prefill["op"] == "prefill" and decode["op"] == "decode" and decode["cache_len"] == 64
    assert decode["speedup_vs_baseline"] > 0 and 0 < decode["pct_of_memcpy"]
    assert "decode   float32 N=    64" in capsys.readouterr().out


@pytest.mark.skipif(backends.available_backends()["cpu"] is not True, reason="needs the native CPU extension")
def test_bench_cpu_backward_rows_tiny(tmp_path, capsys):
    """bench_cpu.py's forward + backward rows and the forward + backward peak memory, on tiny shapes:
    every candidate timed, the speed-ups the README quotes recorded."""
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    bench_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_cpu)
    out = tmp_path / "cpu.json"
    argv = ["--prefill", "--decode", "--backward", "64", "--backward-heads", "4/2", "--dtypes", "float32"]
    argv += ["--repeats", "1", "--memory-seqlen", "64", "--memory-backward", "--ceilings", "none", "--ggml", "none"]
    assert bench_cpu.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    bwd = next(r for r in rows if r["op"] == "forward+backward")
    assert bwd["heads"] == "4/2" and set(bwd["ms"]) == {"rk-cpu", "rk-cpu(recompute)", "rope+sdpa", "sdpa"}
    assert bwd["speedup_vs_baseline"] > 0 and bwd["speedup_vs_recompute"] > 0
    memory = {r["which"]: r for r in rows if r["op"] == "memory"}
    assert set(memory) == {"cpu", "cpu+bwd", "baseline+bwd"} and memory["cpu+bwd"]["peak_bytes"] > 0
    assert "fwd+bwd  float32 4/2 S=    64" in capsys.readouterr().out
