"""Training-free long context by windows: NBCE and Parallel Context Windows on the tiny model.

Loads the base models that ``examples/extend_context.py`` trained at ``train_len`` tokens and
scores the same passkey prompts at ``factor x train_len`` tokens, without any fine-tuning, by:

  extrapolation    the whole prompt in one pass (positions past the trained length; reference)
  NBCE             the context cut into overlapping windows that fit the trained length; each
                   window (instructions + a piece of the context) + question is read separately,
                   plus instructions + question alone (the unconditional row), and the
                   next-token predictions are combined by ``ropekern.context.nbce_combine``
                   (min-entropy pooling, beta 0.25; also mean pooling)
  PCW              Parallel Context Windows: the same windows, each at positions 0..n_w-1, and the
                   question attending to all of them (``TinyLM.forward_windows``: one
                   ``rk.rope_attention`` call per layer with explicit positions, no dense mask)

Windows overlap by the needle's length, so the needle is whole in at least one of them. A prompt
is solved when every answer digit is the arg-max of the combined prediction (the same event as
greedy decoding with a shared token). Writes ``table.md``, ``results.json`` and
``context_windows.png`` to ``--out``.

    python examples/context_windows.py --models examples/results/extend_context --out examples/results/context_windows
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import TinyLM, load  # noqa: E402

from ropekern.context import nbce_combine, split_windows  # noqa: E402
from ropekern.eval import PasskeySample, PasskeyTemplate, passkey_samples  # noqa: E402

METHODS = ("extrapolation", "NBCE (min-entropy)", "NBCE (mean)", "PCW")


def score(
    model: TinyLM, sample: PasskeySample, n_prefix: int, n_question: int, needle_len: int, beta: float
) -> dict[str, tuple]:
    """(correct, digit accuracy) of each method on one sample."""
    n_ans = len(sample.answer_ids)
    prefix = sample.input_ids[:n_prefix]  # the instructions open every window, as in a normal prompt
    task = sample.input_ids[-n_question:] + sample.answer_ids
    context = sample.input_ids[n_prefix:-n_question]
    size = model.config.train_len - n_prefix - len(task)  # prefix + window + task fit the trained positions
    wins = [prefix + w for w in split_windows(context, size, needle_len)]
    answer = torch.tensor(sample.answer_ids)

    def verdict(logits: torch.Tensor) -> tuple[bool, float]:
        hits = logits.argmax(-1) == answer
        return bool(hits.all()), float(hits.float().mean())

    def answer_logits(seq: list[int]) -> torch.Tensor:
        return model(torch.tensor([seq]))[0, len(seq) - n_ans - 1 : len(seq) - 1]

    out = {"extrapolation": verdict(answer_logits(sample.full_ids))}
    per_window = torch.stack([answer_logits(prefix + task)] + [answer_logits(w + task) for w in wins])  # [n+1, A, V]
    out["NBCE (min-entropy)"] = verdict(nbce_combine(per_window, beta=beta, pooling="min_entropy"))
    out["NBCE (mean)"] = verdict(nbce_combine(per_window, beta=beta, pooling="mean"))
    pcw = model.forward_windows([torch.tensor(w) for w in wins], torch.tensor(task))
    out["PCW"] = verdict(pcw[len(task) - n_ans - 1 : len(task) - 1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, required=True, help="directory with base_seed<N>.pt (extend_context --out)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--eval-n", type=int, default=40, help="prompts per depth and seed")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--beta", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # Only the seeds extend_context kept (base model >= --min-base-acc at the trained length).
    summary = args.models / "results.json"
    seeds = sorted(int(s) for s in json.loads(summary.read_text())["per_seed"]) if summary.exists() else None
    paths = sorted(args.models.glob("base_seed*.pt"), key=lambda q: int(q.stem.removeprefix("base_seed")))
    paths = [q for q in paths if seeds is None or int(q.stem.removeprefix("base_seed")) in seeds]
    if not paths:
        p.error(f"no base_seed<N>.pt models in {args.models}")
    args.out.mkdir(parents=True, exist_ok=True)
    template = PasskeyTemplate()
    per_seed = {}
    for path in paths:
        model, tok = load(path)
        train_len = model.config.train_len
        long_len = train_len * args.factor
        n_question = len(tok.encode(template.question))
        n_prefix = len(tok.encode(template.prefix))
        # extend_context's evaluation prompts (same seed and lengths), the long ones.
        samples = passkey_samples(tok, [train_len, long_len], args.depths, args.eval_n, seed=10_000)
        samples = [s for s in samples if s.length == long_len]
        cells: dict[str, dict[float, list]] = {m: {} for m in METHODS}
        with torch.no_grad():
            for s in samples:
                needle_len = len(tok.encode(template.needle.format(passkey=s.passkey)))
                for method, result in score(model, s, n_prefix, n_question, needle_len, args.beta).items():
                    cells[method].setdefault(s.depth, []).append(result)
        per_seed[path.stem] = {
            m: {
                "accuracy": statistics.mean(r[0] for v in cells[m].values() for r in v),
                "digit_accuracy": statistics.mean(r[1] for v in cells[m].values() for r in v),
                "by_depth": {str(d): statistics.mean(r[0] for r in v) for d, v in cells[m].items()},
            }
            for m in METHODS
        }
        print(
            f"{path.name}: " + ", ".join(f"{m} {per_seed[path.stem][m]['accuracy']:.3f}" for m in METHODS), flush=True
        )

    def stat(m: str, key: str) -> str:
        vals = [r[m][key] for r in per_seed.values()]
        mean = statistics.mean(vals)
        return f"{mean:.2f}" if len(vals) == 1 else f"{mean:.2f} ({min(vals):.2f}–{max(vals):.2f})"

    lines = [f"| method (no fine-tuning) | passkey acc @ {long_len} ({args.factor}x) | digit acc @ {long_len} |"]
    lines.append("|---|---|---|")
    lines += [f"| {m} | {stat(m, 'accuracy')} | {stat(m, 'digit_accuracy')} |" for m in METHODS]
    elapsed = time.perf_counter() - start
    command = "python examples/context_windows.py " + " ".join(sys.argv[1:] if argv is None else argv)
    footer = (
        f"\n\n{len(per_seed)} model(s) ({', '.join(per_seed)}) x {len(args.depths)} depths x {args.eval_n} prompts; "
        f"each window is the instructions ({n_prefix} tokens) + {train_len - n_prefix - n_question - 5} context tokens "
        f"(consecutive windows overlap by the needle's length) + question and answer ({n_question} + 5 tokens). "
        f"`{command}`: {elapsed:.0f} s ({args.threads} threads)."
    )
    table = "\n".join(lines) + footer
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"args": meta, "per_seed": per_seed}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in METHODS:
        accs = [statistics.mean(r[m]["by_depth"][str(d)] for r in per_seed.values()) for d in args.depths]
        ax.plot(args.depths, accs, marker="o", label=m)
    ax.set_xlabel("passkey depth (fraction of filler before it)")
    ax.set_ylabel(f"passkey accuracy at {long_len} tokens")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Trained at {train_len} tokens, no fine-tuning: windows vs extrapolation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "context_windows.png", dpi=120)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
