"""Context extension in miniature: train at L, evaluate passkey retrieval at 4L.

For each seed a tiny RoPE transformer (examples/tiny_model.py, attention = ``rk.rope_attention``)
is trained from scratch on passkey retrieval at ``--train-len`` tokens, then evaluated, with the
same weights, at the trained length and at ``--factor`` times it under:

  none       plain extrapolation (positions past the trained length)
  linear     Position Interpolation (positions divided by the factor)
  ntk        NTK-aware base scaling
  dynamic    dynamic NTK (base grows with the sequence length)
  yarn       YaRN (per-band interpolation + attention temperature)
  longrope   per-dimension factors found by ``ropekern.search.longrope_search``, scored by the
             needle-driven perplexity (``ropekern.eval``) of held-out prompts at the long length

and after a short fine-tune at the long length (through ``rk.rope_attention``'s backward) with
Position Interpolation and, as the control the PI paper runs, with plain extrapolation.
Prints a table, writes ``table.md``, ``results.json`` and ``extend_context.png`` to ``--out``.

    python examples/extend_context.py --out results/extend_context            # the README table
    python examples/extend_context.py --quick --out /tmp/ec                   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import TinyConfig, TinyLM, WordTokenizer, evaluate, load, save, scaled_rope, train  # noqa: E402

from ropekern.eval import needle_perplexity, passkey_samples  # noqa: E402
from ropekern.search import longrope_search, with_scaling  # noqa: E402

# (row label, rope method, fine-tuned at the long length?)
ROWS = [
    ("extrapolation", "none", False),
    ("PI", "linear", False),
    ("NTK", "ntk", False),
    ("dynamic NTK", "dynamic", False),
    ("YaRN", "yarn", False),
    ("LongRoPE (searched)", "longrope", False),
    ("extrapolation + FT", "none", True),
    ("PI + FT", "linear", True),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for table.md, results.json, the plot, weights")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny budgets; numbers meaningless)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--factor", type=int, default=4, help="evaluate at factor x train-len")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32, help="training batch at train-len (fine-tune: batch/factor)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ft-steps", type=int, default=120)
    p.add_argument("--ft-lr", type=float, default=3e-3)
    p.add_argument("--eval-n", type=int, default=40, help="samples per (length, depth) cell and seed")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--search-generations", type=int, default=4)
    p.add_argument("--search-population", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    p.add_argument("--backend", default="auto", help="rk.rope_attention backend")
    p.add_argument("--reuse", action="store_true", help="load base_seed<N>.pt from --out instead of training")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1] if args.seeds != [0, 1, 2] else [0]
        args.train_len, args.train_steps, args.batch, args.ft_steps = 80, 12, 8, 3
        args.eval_n, args.depths = 2, [0.0, 1.0]
        args.search_generations, args.search_population = 1, 4
    if args.factor < 2:
        p.error("--factor must be >= 2")
    return args


def run_seed(args: argparse.Namespace, seed: int, tok: WordTokenizer, log) -> dict:
    """Train (or load) one base model and evaluate every row; returns per-row results."""
    long_len = args.train_len * args.factor
    lengths = [args.train_len, long_len]
    weights = args.out / f"base_seed{seed}.pt"
    t0 = time.perf_counter()
    if args.reuse and weights.exists():
        base, _ = load(weights, backend=args.backend)
        log(f"seed {seed}: loaded {weights}")
    else:
        torch.manual_seed(seed)
        base = TinyLM(TinyConfig(vocab_size=len(tok), train_len=args.train_len), backend=args.backend)
        log(f"seed {seed}: training {sum(p.numel() for p in base.parameters())} parameters, "
            f"{args.train_steps} steps at {args.train_len} tokens")  # fmt: skip
        train(base, tok, steps=args.train_steps, length=args.train_len, batch_size=args.batch, lr=args.lr, seed=seed,
              log_every=0 if args.quick else 100)  # fmt: skip
        save(base, tok, weights)
    times = {"train": time.perf_counter() - t0}

    def run_eval(model: TinyLM) -> dict:
        # Same prompts for every row and seed (paired comparison); disjoint from the search's.
        return evaluate(model, tok, lengths=lengths, depths=args.depths, n=args.eval_n, seed=10_000)

    t0 = time.perf_counter()
    held_out = passkey_samples(tok, long_len, [0.1, 0.5, 0.9], 4 if not args.quick else 1, seed=20_000 + seed)

    def objective(scaling: dict) -> float:
        base.rope = with_scaling(scaling_base, scaling)
        return needle_perplexity(base, held_out, batch_size=16)

    scaling_base = scaled_rope(base.config, "none")
    searched = longrope_search(
        objective, scaling_base, long_len, generations=args.search_generations, population=args.search_population,
        seed=seed, checkpoint=args.out / f"search_seed{seed}.json", progress=False,
    )  # fmt: skip
    times["search"] = time.perf_counter() - t0

    results = {}
    for label, method, finetune in ROWS:
        t0 = time.perf_counter()
        rope = (
            with_scaling(scaling_base, searched)
            if method == "longrope"
            else scaled_rope(base.config, method, args.factor)
        )
        model = copy.deepcopy(base) if finetune else base
        model.rope = rope
        if finetune:
            torch.manual_seed(seed)
            train(model, tok, steps=args.ft_steps, length=long_len, batch_size=max(1, args.batch // args.factor),
                  lr=args.ft_lr, warmup=10, seed=1000 + seed)  # fmt: skip
            times[f"finetune {label}"] = time.perf_counter() - t0
        results[label] = run_eval(model)
        log(f"seed {seed}: {label:22s} accuracy {results[label]['accuracy'][args.train_len]:.3f} @ {args.train_len}, "
            f"{results[label]['accuracy'][long_len]:.3f} @ {long_len}")  # fmt: skip
    return {"rows": results, "searched": searched, "times": times}


def summarize(args: argparse.Namespace, per_seed: dict[int, dict]) -> tuple[str, dict]:
    long_len = args.train_len * args.factor
    lines = [
        f"| method | passkey acc @ {args.train_len} (trained) | passkey acc @ {long_len} ({args.factor}x) "
        f"| digit acc @ {long_len} | answer ppl @ {long_len} |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for label, _, _ in ROWS:
        rows = [per_seed[s]["rows"][label] for s in per_seed]

        def stat(key: str, length: int, rows: list = rows) -> tuple[float, float, float]:
            vals = [r[key][length] for r in rows]
            return statistics.mean(vals), min(vals), max(vals)

        short, long, digit = (
            stat("accuracy", args.train_len),
            stat("accuracy", long_len),
            stat("token_accuracy", long_len),
        )
        ppl = math.exp(statistics.mean(math.log(r["needle_ppl"][long_len]) for r in rows))  # geometric mean
        summary[label] = {"acc_short": short, "acc_long": long, "digit_acc_long": digit, "answer_ppl_long": ppl}

        def fmt(t: tuple[float, float, float]) -> str:
            return f"{t[0]:.2f}" if len(per_seed) == 1 else f"{t[0]:.2f} ({t[1]:.2f}–{t[2]:.2f})"

        lines.append(f"| {label} | {fmt(short)} | {fmt(long)} | {fmt(digit)} | {ppl:.3g} |")
    return "\n".join(lines), summary


def plot(args: argparse.Namespace, per_seed: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long_len = args.train_len * args.factor
    labels = [label for label, _, _ in ROWS]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.38
    for j, (length, name) in enumerate([(args.train_len, "trained length"), (long_len, f"{args.factor}x")]):
        means = [statistics.mean(per_seed[s]["rows"][lab]["accuracy"][length] for s in per_seed) for lab in labels]
        ax1.bar([i + (j - 0.5) * width for i in range(len(labels))], means, width, label=f"{name} ({length} tokens)")
    ax1.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax1.set_ylabel("passkey accuracy (exact match)")
    ax1.set_ylim(0, 1.05)
    ax1.legend()
    ax1.set_title(f"mean over seeds {list(per_seed)}")
    for lab in labels:
        accs = [
            statistics.mean(per_seed[s]["rows"][lab]["by_depth"][(long_len, d)] for s in per_seed) for d in args.depths
        ]
        ax2.plot(args.depths, accs, marker="o", label=lab)
    ax2.set_xlabel("passkey depth (fraction of filler before it)")
    ax2.set_ylabel(f"accuracy at {long_len} tokens")
    ax2.set_ylim(-0.03, 1.03)
    ax2.legend(fontsize=7)
    fig.suptitle(f"Tiny RoPE model trained at {args.train_len} tokens, passkey retrieval at {long_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)

    tok = WordTokenizer.for_template()
    per_seed = {seed: run_seed(args, seed, tok, log) for seed in args.seeds}
    table, summary = summarize(args, per_seed)
    elapsed = time.perf_counter() - start
    command = "python examples/extend_context.py " + " ".join(sys.argv[1:] if argv is None else argv)
    footer = (
        f"\n\n{len(args.seeds)} seed(s) x {len(args.depths)} depths x {args.eval_n} prompts per cell; "
        f"range over seeds in parentheses. `{command}`: {elapsed:.0f} s "
        f"({torch.get_num_threads()} threads)."
    )
    print("\n" + table + footer)
    (args.out / "table.md").write_text(table + footer + "\n")
    blob = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "per_seed": {
            s: {
                "rows": {
                    lab: {k: {str(kk): vv for kk, vv in v.items()} for k, v in r.items()}
                    for lab, r in d["rows"].items()
                },
                "searched_long_factor": d["searched"]["long_factor"],
                "times_s": d["times"],
            }
            for s, d in per_seed.items()
        },
        "elapsed_s": elapsed,
    }
    (args.out / "results.json").write_text(json.dumps(blob, indent=1))
    plot(args, per_seed, args.out / "extend_context.png")
    log(f"wrote {args.out / 'table.md'}, results.json and extend_context.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
