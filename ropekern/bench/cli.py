"""Argument parsing and the run loop shared by ``ropekern bench`` and ``benchmarks/bench_*.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import (
    OPS,
    SweepConfig,
    parse_dtype,
    parse_heads,
    parse_int_list,
    parse_rope_types,
    parse_seqlens,
    preset,
    seqlen_ladder,
)

__all__ = ["add_arguments", "config_from_args", "run", "script_main"]


def add_arguments(parser: argparse.ArgumentParser, op: str | None = None, save_default: bool = False) -> None:
    """Add the sweep options; ``op`` fixes the op (the per-op scripts), else ``--op`` is added."""
    if op is None:
        parser.add_argument(
            "--op",
            choices=OPS,
            default="forward",
            help="what to time: forward (prefill), backward (forward + backward), decode (KV cache "
            "step), rope (apply_rope alone); default forward",
        )
    parser.set_defaults(fixed_op=op, save_default=save_default)
    g = parser.add_argument_group("sweep")
    g.add_argument(
        "--preset",
        choices=("quick", "full"),
        default="quick",
        help="default grid: quick (~2 min on a 2-core CPU with only the torch reference) or full "
        "(1K..32K, +64K/128K on GPU, both masks, D 64/128, MHA+GQA, every rope type)",
    )
    g.add_argument("--seqlens", help="comma-separated lengths, e.g. 512,1k,2k,4096 (decode: KV cache lengths)")
    g.add_argument(
        "--max-seqlen",
        type=int,
        help="largest length: the preset's smallest length doubled up to this (e.g. 32768); "
        "with --seqlens, drops longer ones",
    )
    g.add_argument("--dtype", default="auto", help="fp32, bf16 or fp16 (auto: fp32 on CPU, bf16 on GPU)")
    g.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="causal (bottom-right) mask or none (default: causal; --preset full: both)",
    )
    g.add_argument("--heads", help="query/key-value heads, comma-separated, e.g. 8/2 (GQA) or 8/8 (MHA)")
    g.add_argument("--head-dim", help="head dim(s), comma-separated, e.g. 64,128")
    g.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    g.add_argument("--q-len", type=int, default=1, help="decode: new tokens per step (default 1)")
    g.add_argument(
        "--rope-type",
        default=None,
        help="rope type(s), comma-separated, or 'all'; fused kernels are timed for each (the variant "
        "spread), baselines for the first (default: default)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved samples per provider (default 3 on CPU, 20 on GPU; GPU adds samples up to ~100 ms each)",
    )
    g.add_argument(
        "--no-warmup",
        action="store_true",
        help="CPU: warm up at the first point only, not before every point (saves one call per provider and "
        "point; for sweeps whose calls take seconds, e.g. the torch reference at 32K)",
    )
    g.add_argument(
        "--backends",
        help="ropekern backends to time, comma-separated (default: every available one "
        "running natively on the device; the torch reference only when it is alone)",
    )
    g.add_argument("--providers", help="only these providers, comma-separated (e.g. rk-torch,eager+sdpa)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    o = parser.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    o.add_argument("--csv", metavar="PATH", help="write the results as CSV to PATH")
    o.add_argument(
        "--plot",
        action="store_true",
        help="write JSON, CSV and PNG plots (speed-up, TFLOP/s or GB/s, memory vs seqlen) to --out",
    )
    if save_default:
        o.add_argument("--no-save", action="store_true", help="do not write JSON/CSV/PNG to --out")
    o.add_argument(
        "--out",
        metavar="DIR",
        help="results directory (default: benchmarks/results/<device-slug>/ under the current directory)",
    )
    o.add_argument("--tag", help="file stem under --out (default: the op name)")
    o.add_argument("--note", default="", help="free text stored with the results (e.g. 'preliminary: shared machine')")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(parser_error: str) -> None:
    raise ValueError(parser_error)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """A ``SweepConfig`` from parsed arguments; ``ValueError`` with a clear message on bad values."""
    op = args.fixed_op or args.op
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda requested but no CUDA device is available")
    grid = preset(args.preset, op, dev_type)
    seqlens = parse_seqlens(args.seqlens) if args.seqlens else grid["seqlens"]
    if args.max_seqlen is not None:
        if args.max_seqlen <= 0:
            _fail(f"--max-seqlen must be positive, got {args.max_seqlen}")
        if args.seqlens:
            seqlens = [s for s in seqlens if s <= args.max_seqlen]
        else:
            seqlens = seqlen_ladder(min(min(seqlens), args.max_seqlen), args.max_seqlen)
        if not seqlens:
            _fail("--max-seqlen leaves no sequence length to run")
    if args.dtype == "auto":
        dtype = "bfloat16" if dev_type == "cuda" else "float32"
    else:
        dtype = parse_dtype(args.dtype)
    causal = [args.causal] if args.causal is not None else grid["causal"]
    if args.batch <= 0 or args.q_len <= 0:
        _fail("--batch and --q-len must be positive")
    if op == "decode" and args.q_len > min(seqlens):
        _fail(f"--q-len ({args.q_len}) exceeds the shortest cache length ({min(seqlens)})")
    repeats = args.repeats if args.repeats is not None else (20 if dev_type == "cuda" else 3)
    if repeats < 1:
        _fail(f"--repeats must be >= 1, got {repeats}")
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None  # noqa: E731
    return SweepConfig(
        op=op,
        device=device,
        seqlens=seqlens,
        heads=parse_heads(args.heads) if args.heads else grid["heads"],
        head_dims=parse_int_list(args.head_dim, "--head-dim") if args.head_dim else grid["head_dims"],
        causal=causal,
        dtype=dtype,
        batch=args.batch,
        q_len=args.q_len,
        rope_types=parse_rope_types(args.rope_type) if args.rope_type else grid.get("rope_types", ["default"]),
        repeats=repeats,
        warmup=not args.no_warmup,
        backends=split(args.backends),
        providers=split(args.providers),
        memory=not args.no_memory,
    )


def _command() -> list[str]:
    """The command line as typed (``ropekern bench ...``, ``python benchmarks/bench_x.py ...``)."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "ropekern"
    if prog == "__main__.py":
        prog = "python -m ropekern"
    elif prog.endswith(".py"):
        prog = f"python {sys.argv[0]}"
    return [prog, *sys.argv[1:]]


def run(args: argparse.Namespace, command: list[str] | None = None) -> int:
    """Run the sweep, print the table, write the requested files. Exit code 1 when a provider
    failed with an error (a skip is not a failure) or nothing could be timed."""
    from .results import collect_meta, device_slug, format_table, loadavg, write_all, write_csv, write_json
    from .runner import run_sweep

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"ropekern bench: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = collect_meta(cfg.device, command or _command(), args.note)
    try:
        results = run_sweep(cfg, progress=not args.no_progress, meta=meta)
    except ValueError as exc:
        print(f"ropekern bench: error: {exc}", file=sys.stderr)
        return 2
    results.meta["loadavg_end"] = loadavg()
    print(format_table(results))
    written = []
    if args.json:
        written.append(write_json(results, args.json))
    if args.csv:
        written.append(write_csv(results, args.csv))
    save = args.plot or (args.save_default and not getattr(args, "no_save", False))
    if save:
        root = getattr(args, "results_root", None) or Path("benchmarks") / "results"
        out = Path(args.out) if args.out else Path(root) / device_slug(cfg.device)
        written += write_all(results, out, args.tag or cfg.op, plots=True)
    if written:
        print("\nwrote:\n" + "\n".join(f"  {p}" for p in written))
    ok = [r for r in results.rows if r["status"] == "ok"]
    errors = [r for r in results.rows if r["status"] == "error"]
    return 1 if errors or not ok else 0


_SCRIPT_EPILOG = (
    "Runs the shared sweep of ropekern.bench for this op and saves JSON, CSV and PNG plots under "
    "benchmarks/results/<device>/ (--no-save to only print). Same options as `ropekern bench --op <op>`; "
    "--preset full runs the full grid. Providers that need a GPU (or a library that is not installed) are "
    "skipped with the reason printed under the table."
)


def script_main(op: str, doc: str, script: str, argv: list[str] | None = None) -> int:
    """Entry point of ``benchmarks/bench_<op>.py`` (``doc`` its docstring, ``script`` its ``__file__``):
    the options of ``ropekern bench --op <op>``, results saved by default under
    ``benchmarks/results/<device-slug>/`` beside the script."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[1], epilog=_SCRIPT_EPILOG)
    add_arguments(parser, op=op, save_default=True)
    args = parser.parse_args(argv)
    args.results_root = Path(script).parent / "results"
    return run(args, None if argv is None else [f"python {sys.argv[0]}", *argv])
