"""Results: the metadata recorded with every run, JSON/CSV files, the text table and the plots.

Files go to ``benchmarks/results/<device-slug>/<stem>.{json,csv}`` and
``<stem>-{speedup,throughput,memory}.png`` (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .providers import MAIN_BASELINE
from .runner import Results

__all__ = [
    "collect_meta",
    "device_name",
    "device_slug",
    "format_table",
    "load_results",
    "loadavg",
    "write_csv",
    "write_json",
    "write_plots",
    "write_all",
]

PLOT_KINDS = ("speedup", "throughput", "memory")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: str) -> str:
    """A directory name for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2c``."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu {_cpu_model()} {os.cpu_count()}c"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return slug[:60] or "unknown-device"


def _driver(device: str) -> str:
    if torch.device(device).type != "cuda":
        return f"{platform.system()} {platform.release()}"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return f"NVIDIA {out.stdout.strip().splitlines()[0]}, CUDA runtime {torch.version.cuda}"
    except (OSError, IndexError, subprocess.SubprocessError):
        return f"unknown, CUDA runtime {torch.version.cuda}"


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except Exception:  # recorded as absent; never fails a run
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (other jobs on a shared machine show up here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def collect_meta(device: str, command: list[str] | None = None, note: str = "") -> dict[str, Any]:
    """Device, driver, versions, command line, date and machine load (recorded with every file)."""
    import ropekern

    command = list(command if command is not None else sys.argv)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # the program part may hold spaces ("python -m ropekern"); the arguments are quoted
        "command": " ".join([command[0], shlex.join(command[1:])]).strip() if command else "",
        "device": device_name(device),
        "device_slug": device_slug(device),
        "driver": _driver(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "ropekern": ropekern.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "backends_available": {k: (v if v is True else str(v)) for k, v in ropekern.available_backends().items()},
        "loadavg_start": loadavg(),
        "note": note,
    }


# ------------------------------------------------------------------------------------- files
def write_json(results: Results, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.to_dict(), indent=1, default=str) + "\n")
    return path


def load_results(path: str | Path) -> Results:
    return Results.from_dict(json.loads(Path(path).read_text()))


_CSV_FIELDS = [
    "op", "provider", "role", "backend", "rope_type", "batch", "seqlen", "q_len", "hq", "hkv", "head_dim", "causal",
    "dtype", "device", "status", "ms", "min_ms", "q1_ms", "q3_ms", "samples", "calls_per_sample", "cuda_graph",
    "tflops", "gbps", "peak_mb", "io_mb", "rope_tax", "reason",
]  # fmt: skip


def write_csv(results: Results, path: str | Path) -> Path:
    """One line per row; ratios flattened to ``x_<reference>`` columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refs = sorted({k for r in results.rows for k in (r.get("speedup") or {})})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_CSV_FIELDS + [f"x_{r}" for r in refs])
        for row in results.rows:
            sp = row.get("speedup") or {}
            w.writerow([_csv_value(row.get(k)) for k in _CSV_FIELDS] + [_csv_value(sp.get(r)) for r in refs])
    return path


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_all(results: Results, out_dir: str | Path, stem: str, plots: bool = True) -> list[Path]:
    """JSON + CSV (+ PNG plots) under ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    paths = [write_json(results, out_dir / f"{stem}.json"), write_csv(results, out_dir / f"{stem}.csv")]
    if plots:
        paths += write_plots(results, out_dir, stem)
    return paths


# ------------------------------------------------------------------------------------- table
def _fmt(v: float | None, spec: str) -> str:
    """``format(v, spec)``, or a dash padded to the same width when there is no value."""
    if v is None:
        return format("-", re.match(r"[<>^]?\d*", spec).group(0))
    return format(v, spec)


def _group_label(row: dict[str, Any]) -> str:
    mask = "" if row["op"] == "rope" else (" causal" if row["causal"] else " full")
    q = f" q_len={row['q_len']}" if row["op"] == "decode" else ""
    return (
        f"{row['op']}: B={row['batch']} Hq={row['hq']} Hkv={row['hkv']} D={row['head_dim']}{mask} "
        f"{row['dtype']} {row['device']}{q}"
    )


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[_group_label(row)].append(row)
    return out


def format_table(results: Results) -> str:
    """The text table ``ropekern bench`` prints: one block per shape group, one line per
    (seqlen, provider, rope type), speed-ups against every baseline/peer present."""
    op = results.op
    main = MAIN_BASELINE[op]
    rate = "GB/s" if op in ("decode", "rope") else "TFLOP/s"
    lines = []
    ok_rows = [r for r in results.rows if r["status"] == "ok"]
    for label, rows in _groups(ok_rows).items():
        refs = [main] + sorted({k for r in rows for k in r.get("speedup", {})} - {main})
        refs = [r for r in refs if not r.startswith("rk-")]  # own-variant ratios get the "x sep" column
        own = op != "rope"  # apply_rope alone has no separate pass and no RoPE-off variant
        multi_type = len({r["rope_type"] for r in rows}) > 1
        head = f"{'seqlen':>7}  {'provider':<22}" + (f"{'rope':<13}" if multi_type else "")
        head += f"{'ms':>10} {'±%':>5} {rate:>9} {'extra MB':>9}"
        head += "".join(f" {'x ' + r:>14}" for r in refs) + (f" {'x separate':>11} {'RoPE tax':>9}" if own else "")
        lines += ["", label, head, "-" * len(head)]
        for row in sorted(rows, key=lambda r: r["seqlen"]):
            spread = (row["q3_ms"] - row["q1_ms"]) / 2 / row["ms"] * 100 if row["ms"] else 0.0
            value = row["gbps"] if rate == "GB/s" else row["tflops"]
            sp = row.get("speedup", {})
            line = f"{row['seqlen']:>7}  {row['provider']:<22}" + (f"{row['rope_type']:<13}" if multi_type else "")
            line += f"{row['ms']:>10.3f} {spread:>5.1f} {_fmt(value, '>9.3f' if rate == 'GB/s' else '>9.4f')}"
            line += f" {_fmt(row.get('peak_mb'), '>9.1f')}"
            line += "".join(f" {_fmt(sp.get(r), '>13.2f') + ('x' if sp.get(r) is not None else ' '):>14}" for r in refs)
            if own:
                sep = sp.get(f"rk-{row['backend']}:separate") if row["role"] == "fused" else None
                line += f" {_fmt(sep, '>10.2f') + ('x' if sep is not None else ' '):>11}"
                tax = row.get("rope_tax")
                line += f" {('-' if tax is None else f'{tax * 100:+.1f}%'):>9}"
            lines.append(line)
    if results.spread:
        lines += ["", "variant spread (slowest rope type / default, same kernel and shape):"]
        for s in sorted(results.spread, key=lambda s: (s["provider"], s["head_dim"], s["seqlen"])):
            lines.append(
                f"  {s['provider']:<12} seqlen {s['seqlen']:>6} D={s['head_dim']} "
                f"{'causal' if s['causal'] else 'full'}: {s['spread']:.2f}x (slowest: {s['slowest_type']})"
            )
    reasons: dict[str, set[str]] = defaultdict(set)
    for row in results.rows:
        if row["status"] != "ok":
            reasons[row["provider"]].add(f"{row['status']}: {row['reason']}")
    if reasons:
        lines += ["", "not timed:"]
        for name, why in reasons.items():
            for w in sorted(why):
                lines.append(f"  {name:<22} {w[:150]}")
    m = results.meta
    lines += [
        "",
        f"ms: median of {results.config['repeats']} interleaved samples; ±%: half the interquartile range; "
        f"x R: time of R / time of this row (>1 = faster than R); RoPE tax: fused / same kernel without RoPE - 1.",
        f"extra MB: peak memory beyond the inputs, {m.get('memory_method', 'off')}.",
        f"device: {m.get('device')}; torch {m.get('torch')}; backends timed: {', '.join(results.config['backends'])}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plots
def _series(rows: list[dict[str, Any]], key) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    multi = len({r["rope_type"] for r in rows}) > 1
    for row in sorted(rows, key=lambda r: r["seqlen"]):
        value = key(row)
        if value is None:
            continue
        name = row["provider"] + (f" [{row['rope_type']}]" if multi and row["role"] == "fused" else "")
        xs, ys = out.setdefault(name, ([], []))
        xs.append(row["seqlen"])
        ys.append(value)
    return out


def _size_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def write_plots(results: Results, out_dir: str | Path, stem: str) -> list[Path]:
    """Three PNGs: speed-up vs seqlen (against the op's main baseline), TFLOP/s or GB/s vs seqlen,
    peak extra memory vs seqlen. One panel per shape group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op, main = results.op, MAIN_BASELINE[results.op]
    rate_key, rate_label = ("gbps", "GB/s") if op in ("decode", "rope") else ("tflops", "TFLOP/s")
    groups = _groups([r for r in results.rows if r["status"] == "ok"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = {
        "speedup": (lambda r: (r.get("speedup") or {}).get(main), f"speed-up vs {main} (x)"),
        "throughput": (lambda r: r.get(rate_key), rate_label),
        "memory": (lambda r: r.get("peak_mb"), "peak extra memory (MiB)"),
    }
    paths = []
    device = results.meta.get("device", "")
    for kind, (key, ylabel) in specs.items():
        n = max(1, len(groups))
        cols = min(2, n)
        fig, axes = plt.subplots(
            (n + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.2 * ((n + cols - 1) // cols)), squeeze=False
        )
        for ax, (label, rows) in zip(axes.flat, groups.items()):
            series = _series(rows, key)
            for name, (xs, ys) in series.items():
                style = "--" if ":" in name or name in ("eager", "eager+sdpa", "eager+einsum") else "-"
                ax.plot(xs, ys, style, marker="o", label=name)
            if not series:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            if kind == "speedup":
                ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ticks = sorted({r["seqlen"] for r in rows})
            ax.set_xticks(ticks, [_size_label(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("sequence length" if op != "decode" else "KV cache length")
            ax.set_ylabel(ylabel)
            ax.set_title(label, fontsize=9)
            ax.grid(True, alpha=0.3)
            if series:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(groups) :]:
            ax.axis("off")
        fig.suptitle(f"ropekern {op}: {ylabel} — {device}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
