"""``ropekern eval passkey|ppl --model PATH``: long-context evaluation of a local transformers checkpoint.

The model (``AutoModelForCausalLM``) and its tokenizer (``AutoTokenizer``) are loaded from a local
directory (nothing is downloaded) and patched with ``ropekern.integrations.hf``; ``--rope-type`` and
``--factor`` set a RoPE scaling first (``extend_context``), ``--stock`` evaluates stock transformers
instead (with the same scaling) for comparison.

* ``passkey``: the PI paper's passkey retrieval (``ropekern.eval``), ``--n`` prompts per (length,
  depth), scored by teacher forcing (exact match of every answer token == greedy decoding's result);
  the table gives accuracy per length and depth, the answer tokens' accuracy and their perplexity.
* ``ppl``: needle-driven perplexity (answer tokens only) of passkey prompts per length, or, with
  ``--text FILE``, the sliding-window perplexity of that text (``--window``, ``--stride``).

When the tokenizer has a BOS token it is prepended to every input (so a prompt of L tokens uses
positions 0..L); ``--no-bos`` turns that off. ``--json [PATH]`` writes the results as JSON (stdout
without PATH) instead of the table. Exit codes: 0 done, 2 bad input or an unusable checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

HELP = "passkey accuracy or (needle / sliding-window) perplexity of a local transformers checkpoint"

_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "longrope", "llama3")


def add_arguments(parser) -> None:
    parser.add_argument("task", choices=("passkey", "ppl"), help="passkey: retrieval accuracy; ppl: perplexity")
    parser.add_argument("--model", required=True, help="local checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="prompt lengths in tokens (default: the model's max_position_embeddings)")  # fmt: skip
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle depths in [0, 1] (fraction of the filler before the passkey)")  # fmt: skip
    parser.add_argument("--n", type=int, default=5, help="prompts per (length, depth)")
    parser.add_argument("--digits", type=int, default=5, help="passkey digits")
    parser.add_argument("--seed", type=int, default=0, help="passkey sampling seed")
    parser.add_argument("--text", type=Path, default=None, help="ppl: sliding-window perplexity of this text file")
    parser.add_argument("--window", type=int, default=None, help="ppl --text: window (default max_position_embeddings)")
    parser.add_argument("--stride", type=int, default=None, help="ppl --text: stride (default window // 2)")
    parser.add_argument("--rope-type", choices=_ROPE_TYPES, default=None, help="RoPE scaling to apply first")
    parser.add_argument("--factor", type=float, default=None, help="scaling factor for --rope-type")
    parser.add_argument("--original-max-position-embeddings", type=int, default=None,
                        help="pretraining length for --rope-type (default: read from the config)")  # fmt: skip
    parser.add_argument("--backend", default="auto", help="ropekern backend (default auto)")
    parser.add_argument("--stock", action="store_true", help="evaluate stock transformers (not patched)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32")
    parser.add_argument("--device", default=None, help="device (default: cuda if present, else cpu)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write JSON results to PATH (stdout without PATH) instead of the table")  # fmt: skip


def _fail(msg: str) -> int:
    print(f"ropekern eval: {msg}", file=sys.stderr)
    return 2


def _validate(args) -> str | None:
    path = Path(args.model)
    if not (path / "config.json").is_file():
        return f"--model {path} is not a checkpoint directory (no config.json)"
    if args.n < 1 or args.batch_size < 1 or not 1 <= args.digits <= 18:
        return "--n and --batch-size must be >= 1, --digits in [1, 18]"
    if args.lengths is not None and any(n < 2 for n in args.lengths):
        return "--lengths must be >= 2"
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        return "--depths must lie in [0, 1]"
    if (args.rope_type is None) != (args.factor is None):
        return "--rope-type and --factor go together"
    if args.factor is not None and not args.factor >= 1.0:
        return "--factor must be >= 1"
    if args.text is not None:
        if args.task != "ppl":
            return "--text is for the ppl task"
        if not args.text.is_file():
            return f"--text {args.text} is not a file"
    return None


def _load(args):
    """(model, tokenizer, rope description) from the local checkpoint, scaled and patched as asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations import hf

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if args.rope_type is not None:
        scaling = {"rope_type": args.rope_type}
        if args.factor is not None:
            scaling["factor"] = args.factor
        if args.original_max_position_embeddings is not None:
            scaling["original_max_position_embeddings"] = args.original_max_position_embeddings
        hf.extend_context(model, scaling, backend=args.backend)
    else:
        hf.patch(model, backend=args.backend)
    rope = str(hf.rope_config(model))
    if args.stock:
        hf.unpatch(model)
    return model, tokenizer, rope, device


def _logits_fn(model, device, bos: int | None):
    import torch

    def logits_fn(ids):
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)
        logits = model(ids.to(device), use_cache=False).logits
        return logits[:, 1:] if bos is not None else logits

    return logits_fn


def _passkey(args, logits_fn, tokenizer, lengths) -> dict:
    from .eval import passkey_samples, passkey_scores

    samples = passkey_samples(tokenizer, lengths, args.depths, args.n, digits=args.digits, seed=args.seed)
    scores = passkey_scores(logits_fn, samples, batch_size=args.batch_size)
    rows = []
    for length in lengths:
        pairs = [(s, sc) for s, sc in zip(samples, scores) if s.length == length]
        by_depth = {
            str(d): sum(sc.correct for s, sc in pairs if s.depth == d) / sum(1 for s, _ in pairs if s.depth == d)
            for d in args.depths
        }
        rows.append({
            "length": length,
            "accuracy": sum(sc.correct for _, sc in pairs) / len(pairs),
            "by_depth": by_depth,
            "answer_token_accuracy": sum(sc.token_accuracy for _, sc in pairs) / len(pairs),
            "answer_ppl": math.exp(sum(sc.nll for _, sc in pairs) / sum(sc.n_tokens for _, sc in pairs)),
        })  # fmt: skip
    return {"rows": rows}


def _ppl(args, logits_fn, tokenizer, lengths, window: int) -> dict:
    from .eval import needle_perplexity, passkey_samples, sliding_window_perplexity
    from .eval._common import as_encoder

    if args.text is not None:
        ids = as_encoder(tokenizer)(args.text.read_text())
        if len(ids) < 2:
            raise ValueError(f"--text {args.text} holds fewer than 2 tokens")
        stride = args.stride if args.stride is not None else max(1, window // 2)
        ppl = sliding_window_perplexity(logits_fn, ids, window=window, stride=stride, batch_size=args.batch_size)
        return {"rows": [{"text": str(args.text), "tokens": len(ids), "window": window, "stride": stride, "ppl": ppl}]}
    rows = []
    for length in lengths:
        samples = passkey_samples(tokenizer, length, args.depths, args.n, digits=args.digits, seed=args.seed)
        rows.append({"length": length, "needle_ppl": needle_perplexity(logits_fn, samples, batch_size=args.batch_size)})
    return {"rows": rows}


def _table(args, result: dict) -> str:
    rows = result["rows"]
    if args.task == "passkey":
        head = ["length", "accuracy", *[f"depth {d:g}" for d in args.depths], "answer token acc", "answer ppl"]
        body = [
            [str(r["length"]), f"{r['accuracy']:.3f}", *[f"{v:.3f}" for v in r["by_depth"].values()],
             f"{r['answer_token_accuracy']:.3f}", f"{r['answer_ppl']:.4g}"]
            for r in rows
        ]  # fmt: skip
    elif args.text is not None:
        head = ["text", "tokens", "window", "stride", "perplexity"]
        body = [[r["text"], str(r["tokens"]), str(r["window"]), str(r["stride"]), f"{r['ppl']:.4g}"] for r in rows]
    else:
        head = ["length", "needle perplexity"]
        body = [[str(r["length"]), f"{r['needle_ppl']:.4g}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def run(args) -> int:
    problem = _validate(args)
    if problem:
        return _fail(problem)
    t0 = time.perf_counter()
    try:
        model, tokenizer, rope, device = _load(args)
    except (OSError, ValueError, TypeError) as exc:
        return _fail(f"cannot load/patch {args.model}: {exc}")
    max_pos = int(model.config.max_position_embeddings)
    lengths = args.lengths or [max_pos]
    window = args.window or max_pos
    if window < 2:
        return _fail("--window must be >= 2")
    bos = None if args.no_bos else getattr(tokenizer, "bos_token_id", None)
    logits_fn = _logits_fn(model, device, bos)
    try:
        if args.task == "passkey":
            result = _passkey(args, logits_fn, tokenizer, lengths)
        else:
            result = _ppl(args, logits_fn, tokenizer, lengths, window)
    except ValueError as exc:
        return _fail(str(exc))
    result = {
        "task": args.task,
        "model": str(args.model),
        "rope": rope,
        "patched": not args.stock,
        "backend": args.backend,
        "depths": args.depths,
        "n": args.n,
        "bos": bos is not None,
        **result,
        "seconds": time.perf_counter() - t0,
    }
    if args.json is not None:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
        return 0
    print(f"model {args.model} ({type(model).__name__}, {'stock transformers' if args.stock else 'ropekern-patched'}, "
          f"backend {args.backend}); {rope}")  # fmt: skip
    print(_table(args, result))
    print(f"({result['seconds']:.1f} s)")
    return 0
