"""Render the README's performance section (``docs/bench.md``) from the recorded results.

    python benchmarks/report.py [--results benchmarks/results] [--out docs/bench.md]

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

ROOT = Path(__file__).resolve().parents[1]
OP_TITLES = {
    "forward": "Forward (prefill)",
    "backward": "Forward + backward",
    "decode": "Decode (one KV-cache step)",
    "rope": "apply_rope alone",
}


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


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
            cells += [_f(sep, ".2f") + ("×" if sep else ""), "–" if tax is None else f"{tax * 100:+.1f}%"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_file(path: Path, md_dir: Path) -> list[str]:
    data = json.loads(path.read_text())
    meta, cfg, rows = data["meta"], data["config"], data["rows"]
    op = cfg["op"]
    lines = [f"#### {OP_TITLES.get(op, op)} — {meta.get('device', '?')} (`{path.stem}`)", ""]
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


def render(results_dir: Path, md_path: Path) -> str:
    files = sorted(results_dir.glob("**/*.json"), key=lambda p: (p.parent.name, p.stem))
    lines = [
        "## Performance",
        "",
        "<!-- generated by benchmarks/report.py from benchmarks/results/**.json; do not edit by hand -->",
        "",
        "Every figure comes from one interleaved run (A B A B …, medians after warm-up; DESIGN §6), so "
        "ratios are meaningful even where absolute times are not. `rk-<backend>` is ropekern with RoPE "
        "fused into the kernel, `:norope` the same kernel with rotation compiled out (the RoPE tax), "
        "`:separate` ropekern's `apply_rope` followed by that kernel; `eager+sdpa` is HF-style eager "
        "RoPE + `torch.nn.functional.scaled_dot_product_attention`. TFLOP/s count 4·B·Hq·Sq·Sk·D "
        "(halved when causal; forward + backward = 3.5× that), never the RoPE FLOPs; decode and "
        "`apply_rope` are in GB/s. Reproduce with the command under each table; "
        "`python benchmarks/report.py` regenerates this section.",
        "",
    ]
    if not files:
        lines += ["No results recorded yet.", ""]
    by_device: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        by_device[f.parent.name].append(f)
    for device, paths in by_device.items():
        lines += [f"### Device `{device}`", ""]
        for p in paths:
            lines += render_file(p, md_path.parent)
    text = "\n".join(lines).rstrip() + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="results directory (default: benchmarks/results)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench.md", help="Markdown file to write")
    args = parser.parse_args(argv)
    render(args.results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
