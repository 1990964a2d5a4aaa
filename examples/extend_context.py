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
Position Interpolation and, as the control the PI paper runs, with plain extrapolation
(``--ft-methods`` adds others). With ``--reuse`` the trained weights and the search checkpoint in
``--out`` are picked up again.
Prints a table, writes ``table.md``, ``results.json`` and ``extend_context.png`` to ``--out``.

    python examples/extend_context.py --out results/extend_context            # the README table
    python examples/extend_context.py --quick --out /tmp/ec                   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import TinyConfig, TinyLM, WordTokenizer, evaluate, load, save, scaled_rope, train  # noqa: E402

from ropekern.eval import needle_perplexity, passkey_samples  # noqa: E402
from ropekern.search import longrope_search, with_scaling  # noqa: E402

LABELS = {
    "none": "extrapolation",
    "linear": "PI",
    "ntk": "NTK",
    "dynamic": "dynamic NTK",
    "yarn": "YaRN",
    "longrope": "LongRoPE (searched)",
}


def rows(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(row label, rope method, fine-tuned at the long length?) for every row of the table."""
    out = [(LABELS[m], m, False) for m in ("none", "linear", "ntk", "dynamic", "yarn", "longrope")]
    return out + [(LABELS[m] + " + FT", m, True) for m in args.ft_methods]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for table.md, results.json, the plot, weights")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny budgets; numbers meaningless)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per process (1 on a busy machine)")
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--factor", type=int, default=4, help="evaluate at factor x train-len")
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16, help="training batch at train-len")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--answer-weight", type=float, default=1.0, help="loss weight of the answer tokens (both phases)")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-batch", type=int, default=8, help="fine-tuning batch at factor x train-len")
    p.add_argument("--ft-lr", type=float, default=3e-3)
    p.add_argument("--ft-eval-every", type=int, default=60, help="fine-tuning steps between accuracy probes")
    p.add_argument(
        "--ft-methods",
        nargs="+",
        default=["none", "linear"],
        choices=["none", "linear", "ntk", "yarn"],
        help="scalings to fine-tune with (none = the direct fine-tuning control of the PI paper)",
    )
    p.add_argument(
        "--min-base-acc",
        type=float,
        default=0.9,
        help="seeds whose base model scores below this at the trained length are reported and excluded",
    )
    p.add_argument("--eval-n", type=int, default=40, help="samples per (length, depth) cell and seed")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--search-generations", type=int, default=4)
    p.add_argument("--search-population", type=int, default=8)
    p.add_argument("--backend", default="auto", help="rk.rope_attention backend")
    p.add_argument("--reuse", action="store_true", help="load base_seed<N>.pt from --out instead of training")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.train_len, args.train_steps, args.batch = 80, 12, 8
        args.ft_steps, args.ft_batch, args.ft_eval_every = 4, 2, 2
        args.eval_n, args.depths = 2, [0.0, 1.0]
        args.search_generations, args.search_population = 1, 4
        args.min_base_acc = 0.0
    if args.factor < 2:
        p.error("--factor must be >= 2")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    return args


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """Train (or load) one base model and evaluate every row; returns per-row results."""
    torch.set_num_threads(args.threads)
    tok = WordTokenizer.for_template()
    long_len = args.train_len * args.factor
    lengths = [args.train_len, long_len]
    weights = args.out / f"base_seed{seed}.pt"
    t0 = time.perf_counter()
    if args.reuse and weights.exists():
        base, _ = load(weights, backend=args.backend)
        _log(f"seed {seed}: loaded {weights}")
    else:
        torch.manual_seed(seed)
        config = TinyConfig(
            vocab_size=len(tok), n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, train_len=args.train_len
        )
        base = TinyLM(config, backend=args.backend)
        _log(f"seed {seed}: training {sum(p.numel() for p in base.parameters())} parameters, "
             f"{args.train_steps} steps at {args.train_len} tokens")  # fmt: skip
        train(base, tok, steps=args.train_steps, length=args.train_len, batch_size=args.batch, lr=args.lr, seed=seed,
              answer_weight=args.answer_weight)  # fmt: skip
        save(base, tok, weights)
        # A search checkpoint belongs to the weights it scored: a fresh model starts a fresh search.
        (args.out / f"search_seed{seed}.json").unlink(missing_ok=True)
    times = {"train": time.perf_counter() - t0}

    def run_eval(model: TinyLM) -> dict:
        # Same prompts for every row and seed (paired comparison); disjoint from the search's.
        return evaluate(model, tok, lengths=lengths, depths=args.depths, n=args.eval_n, seed=10_000)

    # A model that cannot retrieve the passkey at the length it was trained at says nothing about
    # extending it: tiny transformers learn this copy circuit abruptly, at a seed-dependent step.
    t0 = time.perf_counter()
    base.rope = scaled_rope(base.config, "none")
    results = {LABELS["none"]: run_eval(base)}
    times["eval"] = time.perf_counter() - t0
    base_acc = results[LABELS["none"]]["accuracy"][args.train_len]
    _log(f"seed {seed}: {LABELS['none']:22s} accuracy {base_acc:.3f} @ {args.train_len}, "
         f"{results[LABELS['none']]['accuracy'][long_len]:.3f} @ {long_len}")  # fmt: skip
    if base_acc < args.min_base_acc:
        _log(f"seed {seed}: base model scores {base_acc:.3f} at {args.train_len} < {args.min_base_acc}: excluded")
        return {"excluded": True, "base_acc": base_acc, "times": times}

    t0 = time.perf_counter()
    held_out = passkey_samples(tok, long_len, [0.1, 0.5, 0.9], 4 if not args.quick else 1, seed=20_000 + seed)
    scaling_base = scaled_rope(base.config, "none")

    def objective(scaling: dict) -> float:
        base.rope = with_scaling(scaling_base, scaling)
        return needle_perplexity(base, held_out, batch_size=16)

    searched = longrope_search(
        objective, scaling_base, long_len, generations=args.search_generations, population=args.search_population,
        seed=seed, checkpoint=args.out / f"search_seed{seed}.json", progress=False,
    )  # fmt: skip
    times["search"] = time.perf_counter() - t0

    curves = {}
    probe_n = max(1, args.eval_n // 4)  # fine-tuning probes: a quarter of the evaluation prompts
    for label, method, finetune in rows(args):
        t0 = time.perf_counter()
        if label in results:
            continue
        if method == "longrope":
            rope = with_scaling(scaling_base, searched)
        else:
            rope = scaled_rope(base.config, method, args.factor)
        model = copy.deepcopy(base) if finetune else base
        model.rope = rope
        if finetune:
            curve: list[tuple[int, float]] = []

            def probe(step: int, m: TinyLM, curve: list = curve) -> None:
                if step % args.ft_eval_every == 0:
                    r = evaluate(m, tok, lengths=[long_len], depths=args.depths, n=probe_n, seed=30_000)
                    curve.append((step, r["accuracy"][long_len]))

            with torch.no_grad():
                probe(0, model)

            torch.manual_seed(seed)
            train(model, tok, steps=args.ft_steps, length=long_len, batch_size=args.ft_batch, lr=args.ft_lr,
                  warmup=10, seed=1000 + seed, answer_weight=args.answer_weight, callback=probe)  # fmt: skip
            times[f"finetune {label}"] = time.perf_counter() - t0
            curves[label] = curve
        results[label] = run_eval(model)
        _log(f"seed {seed}: {label:22s} accuracy {results[label]['accuracy'][args.train_len]:.3f} @ {args.train_len}, "
             f"{results[label]['accuracy'][long_len]:.3f} @ {long_len}")  # fmt: skip
        if not finetune:
            times["eval"] += time.perf_counter() - t0
    _log(f"seed {seed}: done, " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return {"excluded": False, "base_acc": base_acc, "rows": results, "curves": curves, "searched": searched,
            "times": times}  # fmt: skip


def summarize(args: argparse.Namespace, per_seed: dict[int, dict]) -> tuple[str, dict]:
    long_len = args.train_len * args.factor
    lines = [
        f"| method | passkey acc @ {args.train_len} (trained) | passkey acc @ {long_len} ({args.factor}x) "
        f"| digit acc @ {long_len} | answer ppl @ {long_len} |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for label, _, _ in rows(args):
        results = [per_seed[s]["rows"][label] for s in per_seed]

        def stat(key: str, length: int, results: list = results) -> tuple[float, float, float]:
            vals = [r[key][length] for r in results]
            return statistics.mean(vals), min(vals), max(vals)

        short, long, digit = (
            stat("accuracy", args.train_len),
            stat("accuracy", long_len),
            stat("token_accuracy", long_len),
        )
        ppl = math.exp(statistics.mean(math.log(r["needle_ppl"][long_len]) for r in results))  # geometric mean
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
    labels = [label for label, _, _ in rows(args)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.8))
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
    for lab in labels:
        curves = [per_seed[s]["curves"][lab] for s in per_seed if lab in per_seed[s]["curves"]]
        if curves:
            steps = [step for step, _ in curves[0]]
            ax3.plot(
                steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))], marker="o", label=lab
            )
    ax3.set_xlabel(f"fine-tuning steps at {long_len} tokens")
    ax3.set_ylabel(f"accuracy at {long_len} tokens (probe set)")
    ax3.set_ylim(-0.03, 1.03)
    ax3.legend(fontsize=8)
    fig.suptitle(f"Tiny RoPE model trained at {args.train_len} tokens, passkey retrieval at {long_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.jobs > 1 and len(args.seeds) > 1:
        # Seeds are independent: one process each (spawned, so no thread pool is inherited).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(args.seeds)), mp_context=ctx) as pool:
            futures = {seed: pool.submit(run_seed, args, seed) for seed in args.seeds}
            per_seed = {seed: f.result() for seed, f in futures.items()}
    else:
        per_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    runs = per_seed
    per_seed = {s: r for s, r in runs.items() if not r["excluded"]}
    excluded = {s: r["base_acc"] for s, r in runs.items() if r["excluded"]}
    if not per_seed:
        _log(f"no seed learned the task at {args.train_len} tokens (accuracies {excluded}); nothing to compare")
        return 1
    table, summary = summarize(args, per_seed)
    elapsed = time.perf_counter() - start
    command = "python examples/extend_context.py " + " ".join(sys.argv[1:] if argv is None else argv)
    footer = (
        f"\n\n{len(per_seed)} seed(s) x {len(args.depths)} depths x {args.eval_n} prompts per cell"
        f"{'; mean (range over seeds)' if len(per_seed) > 1 else ''}. `{command}`: {elapsed:.0f} s "
        f"({args.jobs} process(es) x {args.threads} thread(s))."
    )
    if excluded:
        footer += (
            f" Seeds {sorted(excluded)} were excluded: their base models did not learn the task at the trained "
            f"length (accuracy {', '.join(f'{a:.2f}' for a in excluded.values())} < {args.min_base_acc})."
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
                "finetune_curves": d["curves"],
                "searched_long_factor": d["searched"]["long_factor"],
                "times_s": d["times"],
            }
            for s, d in per_seed.items()
        },
        "excluded_seeds": {
            s: {"base_acc": r["base_acc"], "times_s": r["times"]} for s, r in runs.items() if r["excluded"]
        },
        "elapsed_s": elapsed,
    }
    (args.out / "results.json").write_text(json.dumps(blob, indent=1))
    plot(args, per_seed, args.out / "extend_context.png")
    _log(f"wrote {args.out / 'table.md'}, results.json and extend_context.png in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
