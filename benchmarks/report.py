"""Render the benchmark record (``docs/bench.md``) and the README's summary of it from the
recorded results.

    python benchmarks/report.py [--results benchmarks/results] [--out docs/bench.md] [--readme README.md] [--plots]

Reads every ``<results>/<device>/<stem>.json`` written by ``ropekern bench --plot`` or the
``bench_*.py`` scripts and writes, per file: how and where it was recorded (device, driver,
versions, command, date, machine load, memory method, the note such as "preliminary"), one table
per shape group (ms, TFLOP/s or GB/s, peak extra memory, speed-up against the main baseline and
the separate pass, RoPE tax), the variant spread, the providers that were not timed and why, and
links to the PNG plots. The output is generated: edit the results or this script, not the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import _path  # noqa: F401

from ropekern.bench.providers import MAIN_BASELINE

# The hand-written part of docs/bench.md: how to run the benchmarks and how to read them.
USAGE = """
## Benchmarks

`ropekern bench` is the project's main job: a context-length sweep of every available ropekern
backend against what people run today, eager RoPE + `torch.nn.functional.scaled_dot_product_attention`.

```bash
ropekern bench                                  # forward, ~2 min on an idle 2-core CPU
ropekern bench --max-seqlen 32768 --plot        # 512..32K, writes JSON/CSV/PNG, prints where
ropekern bench --op decode                      # also: backward (fwd+bwd), rope (apply_rope alone)
ropekern bench --rope-type all --json out.json  # every scaling type: the variant spread
python benchmarks/bench_rope_attention.py --preset full   # the whole grid, saved under benchmarks/results/
pytest benchmarks/ --benchmark-only             # CI-sized pytest-benchmark suite (timings only, never fails on speed)
python benchmarks/report.py                     # regenerate this file from benchmarks/results/**.json
```

Default (`--preset quick`): fp32 on CPU (bf16 on GPU), B=1, Hq=8/Hkv=2 (GPU 32/8), D=128, causal,
seqlens 512–4K (GPU 1K–16K), 3 interleaved samples (GPU: ≥20, ~100 ms each). Options: `--op`,
`--seqlens 1k,4k`, `--max-seqlen`, `--dtype`, `--causal/--no-causal`, `--heads 8/2,8/8`,
`--head-dim 64,128`, `--batch`, `--q-len` (decode), `--rope-type`, `--repeats`, `--backends`,
`--providers`, `--device`, `--threads`, `--no-memory`, `--no-warmup`, `--json`, `--csv`, `--plot`,
`--out`, `--tag`, `--note`. Exit code 1 when a provider fails with an error (a skip is not a failure).

**Providers** (`ropekern/bench/providers.py`; new backends are picked up from `rk.available_backends()`
without edits; the torch reference is timed only when no native backend exists for the device, and
Triton on CPU tensors, the interpreter, never by default):

| name | what runs |
|---|---|
| `rk-<backend>` | ropekern, RoPE fused into the kernel (backend entry point on a call validated once) |
| `rk-<backend>:norope` | the same kernel with rotation compiled out (`call.rotate = False`): the **RoPE tax** |
| `rk-<backend>:separate` | ropekern `apply_rope` on q and k, then that kernel with rotation off |
| `eager+sdpa` | HF-style RoPE (fp32 angles, cos/sin cast to the dtype, `rotate_half`) + SDPA (`enable_gqa`) |
| `sdpa:norope` | SDPA alone |
| `eager+einsum` | decode: eager RoPE + grouped einsum over a pre-rotated cache |
| `eager` | `apply_rope` alone: the HF-style rotation of q and k |
| `flash-attn` | `apply_rotary_emb` + `flash_attn_func`; decode `flash_attn_with_kvcache(rotary_cos/sin)` |
| `flashinfer` | `single_prefill/decode_with_kv_cache(pos_encoding_mode="ROPE_LLAMA")`, `apply_rope_pos_ids` |

flash-attn and FlashInfer are imported lazily on CUDA only; they were not installed where this
suite was written, so those two providers are untested. Eager baselines build cos/sin once outside
the timed region (a model does it once per forward for all layers); decode baselines keep a
pre-rotated HF-layout cache and append the rotated new key in place; every provider is checked
against the fp64 reference in `tests/test_bench.py`, so the timings compare equal work.

**Figures** (docs/design.md §6): ms (median), TFLOP/s = 4·B·Hq·Sq·Sk·D (halved when causal; the backward
benchmark times forward + backward and counts 3.5× the forward), never RoPE FLOPs; GB/s for decode
(K/V bytes read, 2·B·L·Hkv·D·elem) and `apply_rope` (q and k read + written); *extra MiB* = peak
memory beyond the live inputs — on GPU `torch.cuda.max_memory_allocated`, on CPU the resident-set
high-water mark (`/proc/self/clear_refs` reset, `VmHWM − VmRSS` around one call, after
`malloc_trim`) in a fresh subprocess per point; ratios `× R` = time of R / time of the row; RoPE tax =
fused / `:norope` − 1; variant spread = slowest rope type / `default`, same kernel and shape.

**Timing.** CPU: one warm-up call each, then every provider once per round (A B C, B C A, …),
each sample ≥ 50 ms of back-to-back calls, median of the rounds. GPU: `do_bench`-style CUDA
events, a 256 MiB buffer zeroed before each sample (cold L2), decode captured in a CUDA graph when
the provider allows it (the GPU path is written but has not run: no GPU was available).

**32K on CPU.** `--max-seqlen 32768` runs on CPU within memory with every provider (the torch
reference works over query chunks of ≤ 2^25 scores, ~0.6 GB peak). With only the torch reference
it is slow — the reference computes the full 32K × 32K score matrix, masking afterwards: ~3 minutes
per call on 2 idle cores — so restrict the providers and skip the per-point warm-up, e.g.
`ropekern bench --max-seqlen 32768 --providers rk-torch,eager+sdpa --repeats 2 --no-warmup`.
With the native `cpu` backend, the default providers are fast enough to run as is.

**When a GPU is lent** (the `device` tool: one H100/H200, ~30 minutes of device time, 10 minutes
and 8 returned files per command, no package index), `scripts/gpu_session.sh` is the whole
session in two commands, each inside one call's limit:

```bash
bash scripts/gpu_session.sh build-test   # env.txt, build.log (CUDA extension for sm_90), test.log, junit.xml
bash scripts/gpu_session.sh bench        # bench.log + fwd / bwd / decode / rope JSON (quick presets, GPU grid)
```

Each step has its own time limit, so one hang cannot take the call with it. The `bench` stage
covers the GPU bars of issues 3, 4, 5 and 7. SDPA's flash backend stands in for
FlashAttention-2, which the machine does not carry. Commit the returned JSON under
`benchmarks/results/<device>/` and run `python benchmarks/report.py`.
`tests/test_gpu_session.py` runs the `bench` stage on the CPU with a tiny grid, so that the script
keeps working between GPU sessions.
"""

ROOT = Path(__file__).resolve().parents[1]
OP_TITLES = {
    "forward": "Forward (prefill)",
    "backward": "Forward + backward",
    "decode": "Decode (one KV-cache step)",
    "rope": "apply_rope alone",
}


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _tax(v) -> str:
    return "–" if v is None else f"{v * 100:+.1f}%"


def _group_label(r: dict) -> str:
    mask = "" if r["op"] == "rope" else (", causal" if r["causal"] else ", no mask")
    q = f", {r['q_len']} new token(s)" if r["op"] == "decode" else ""
    return f"B={r['batch']}, Hq={r['hq']}, Hkv={r['hkv']}, D={r['head_dim']}{mask}, {r['dtype']}{q}"


def _table(rows: list[dict], op: str) -> list[str]:
    main = MAIN_BASELINE[op]
    rate, key = ("GB/s", "gbps") if op in ("decode", "rope") else ("TFLOP/s", "tflops")
    multi = len({r["rope_type"] for r in rows}) > 1
    own = op != "rope"
    head = ["seqlen", "provider"] + (["rope"] if multi else []) + ["ms", rate, "extra MiB", f"× {main}"]
    head += ["× separate", "RoPE tax"] if own else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: r["seqlen"]):
        sp = r.get("speedup") or {}
        cells = [str(r["seqlen"]), f"`{r['provider']}`"] + ([r["rope_type"]] if multi else [])
        cells += [_f(r["ms"], ".3f"), _f(r.get(key), ".3f" if key == "gbps" else ".4f"), _f(r.get("peak_mb"), ".1f")]
        main_ratio = sp.get(main)
        cells.append("1 (baseline)" if r["provider"] == main else _f(main_ratio, ".2f") + ("×" if main_ratio else ""))
        if own:
            sep = sp.get(f"rk-{r['backend']}:separate") if r["role"] == "fused" else None
            tax = r.get("rope_tax")
            cells += [_f(sep, ".2f") + ("×" if sep else ""), _tax(tax)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_file(path: Path, md_dir: Path) -> list[str]:
    data = json.loads(path.read_text())
    meta, cfg, rows = data["meta"], data["config"], data["rows"]
    op = cfg["op"]
    lines = [f"##### {OP_TITLES.get(op, op)} — {meta.get('device', '?')} (`{path.stem}`)", ""]
    if meta.get("note"):
        lines += [f"> **{meta['note']}**", ""]
    load = meta.get("loadavg_start"), meta.get("loadavg_end")
    lines += [
        f"Recorded {meta.get('date')} with `{meta.get('command')}`  ",
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, ropekern {meta.get('ropekern')} "
        f"(git {meta.get('git_commit')}), driver {meta.get('driver')}, {meta.get('threads')} threads; "
        f"load average at start/end {load[0]} / {load[1]}  ",
        f"backends timed: {', '.join(cfg.get('backends', []))}; {cfg.get('repeats')} interleaved samples per "
        f"provider, medians; extra MiB = peak memory beyond the inputs, {meta.get('memory_method')}.",
        "",
    ]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[_group_label(r)].append(r)
    for label, grows in groups.items():
        lines += [f"**{label}**", ""] + _table(grows, op) + [""]
    spread = data.get("spread") or []
    if spread:
        lines += ["Variant spread (slowest rope type / default, same kernel and shape):", ""]
        lines += ["| provider | seqlen | D | mask | spread | slowest |", "|---|---|---|---|---|---|"]
        for s in sorted(spread, key=lambda s: (s["provider"], s["head_dim"], s["causal"], s["seqlen"])):
            mask = "causal" if s["causal"] else "none"
            lines.append(
                f"| `{s['provider']}` | {s['seqlen']} | {s['head_dim']} | {mask} | {s['spread']:.2f}× | "
                f"{s['slowest_type']} |"
            )
        lines.append("")
    reasons: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["status"] != "ok":
            reasons[r["provider"]].add(f"{r['status']}: {r['reason']}")
    if reasons:
        lines += ["Not timed: " + "; ".join(f"`{p}` ({', '.join(sorted(w))})" for p, w in reasons.items()), ""]
    plots = [path.with_name(f"{path.stem}-{kind}.png") for kind in ("speedup", "throughput", "memory")]
    links = [f"![{p.stem}]({Path(os.path.relpath(p, md_dir)).as_posix()})" for p in plots if p.exists()]
    if links:
        lines += [" ".join(links), ""]
    return lines


def bench_files(results_dir: Path) -> list[Path]:
    """The ``ropekern bench`` result files under ``results_dir`` (other JSON there, such as
    ``benchmarks/bench_cpu.py``'s records, has its own format and is left alone)."""
    out = []
    for path in sorted(results_dir.glob("**/*.json"), key=lambda p: (p.parent.name, p.stem)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"meta", "config", "rows"} <= data.keys():
            out.append(path)
    return out


def render(results_dir: Path, md_path: Path) -> str:
    files = bench_files(results_dir)
    lines = USAGE.strip("\n").splitlines() + [
        "",
        "### Performance",
        "",
        "<!-- generated by benchmarks/report.py from benchmarks/results/**.json; do not edit by hand -->",
        "",
        "Every figure comes from one interleaved run (A B A B …, medians; docs/design.md §6), so ratios are "
        "meaningful even where absolute times are not. Reproduce with the command under each table; "
        "`python benchmarks/report.py` regenerates this file.",
        "",
    ]
    if not files:
        lines += ["No results recorded yet.", ""]
    by_device: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        by_device[f.parent.name].append(f)
    for device, paths in by_device.items():
        lines += [f"#### Device `{device}`", ""]
        for p in paths:
            lines += render_file(p, md_path.parent)
    text = "\n".join(lines).rstrip() + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text


SUMMARY_BEGIN = "<!-- bench-summary:begin (generated by benchmarks/report.py; do not edit by hand) -->"
SUMMARY_END = "<!-- bench-summary:end -->"


def summary(files: list[Path]) -> list[str]:
    """One compact table per recorded file: for each fused ropekern provider and seqlen, the
    speed-up against the main baseline, against the separate pass, and the RoPE tax."""
    lines: list[str] = []
    for path in files:
        data = json.loads(path.read_text())
        meta, cfg, rows = data["meta"], data["config"], data["rows"]
        op = cfg["op"]
        main = MAIN_BASELINE[op]
        fused = [r for r in rows if r.get("role") == "fused" and r.get("status") == "ok"]
        if not fused:
            continue
        load = meta.get("loadavg_start")
        lines += [
            f"*{OP_TITLES.get(op, op)}, {_group_label(fused[0])} — {meta.get('device', '?')}, "
            f"`{path.parent.name}/{path.stem}`, {meta.get('date', '?')[:10]}"
            + (f", load average {load[0]}" if load else "")
            + (f"; {meta['note']}" if meta.get("note") else "")
            + "*",
            "",
            f"| seqlen | provider | × {main} | × separate | RoPE tax |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(fused, key=lambda r: (r["provider"], r["seqlen"])):
            sp = r.get("speedup") or {}
            sep = sp.get(f"rk-{r['backend']}:separate")
            lines.append(
                f"| {r['seqlen']} | `{r['provider']}` | {_f(sp.get(main), '.2f')} | {_f(sep, '.2f')} | "
                f"{_tax(r.get('rope_tax'))} |"
            )
        lines.append("")
    return lines


def update_readme(results_dir: Path, readme: Path) -> bool:
    """Replace the text between the summary markers of ``readme``; False when it has none."""
    text = readme.read_text()
    if SUMMARY_BEGIN not in text or SUMMARY_END not in text:
        return False
    head, rest = text.split(SUMMARY_BEGIN, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    body = summary(bench_files(results_dir)) or ["No results recorded yet.", ""]
    readme.write_text(head + SUMMARY_BEGIN + "\n\n" + "\n".join(body) + SUMMARY_END + tail)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="results directory (default: benchmarks/results)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench.md", help="Markdown file to write")
    parser.add_argument(
        "--readme", type=Path, default=ROOT / "README.md", help="file whose bench-summary block is regenerated"
    )
    parser.add_argument("--plots", action="store_true", help="also redraw every PNG from its JSON")
    args = parser.parse_args(argv)
    if args.plots:
        from ropekern.bench.results import load_results, write_plots

        for path in bench_files(args.results):
            write_plots(load_results(path), path.parent, path.stem)
    render(args.results, args.out)
    print(f"wrote {args.out}")
    if args.readme.exists() and update_readme(args.results, args.readme):
        print(f"updated the bench summary in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
