"""The fine-tuning of examples/extend_context.py at its default budget, timed with the cpu backend's
native backward (``ropekern::bwd``) and with the PyTorch recompute it replaced, in one run.

Both runs start from the same weights (a fresh tiny model, seed 0: the timing does not depend on
what the weights have learnt) and draw the same batches: --ft-steps steps of --ft-batch passkey
prompts at 4 x 128 tokens, Position Interpolation, as ``extend_context.py`` fine-tunes. The
accuracy probes are not run. Prints the seconds of each and the final losses (which must agree to
float noise: the two backwards compute the same gradients), and with --json writes them.

    python benchmarks/bench_finetune.py --json benchmarks/results/cpu-xeon-2c/finetune.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

from tiny_model import TinyConfig, TinyLM, WordTokenizer, scaled_rope, train  # noqa: E402

from ropekern.backends import native  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ft-steps", type=int, default=300, help="extend_context.py's default")
    p.add_argument("--ft-batch", type=int, default=8, help="extend_context.py's default")
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = WordTokenizer.for_template()
    torch.manual_seed(0)
    config = TinyConfig(vocab_size=len(tok), n_heads=4, n_kv_heads=2, train_len=args.train_len)
    base = TinyLM(config, backend="cpu")
    base.rope = scaled_rope(config, "linear", args.factor)

    def finetune(recompute: bool) -> tuple[float, list[float]]:
        model = copy.deepcopy(base)
        check = native.cpu_backend.check_backward
        if recompute:
            native.cpu_backend.check_backward = lambda call: "the recompute, for comparison"
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            losses = train(model, tok, steps=args.ft_steps, length=args.train_len * args.factor,
                           batch_size=args.ft_batch, lr=3e-3, warmup=10, seed=1000)  # fmt: skip
        finally:
            native.cpu_backend.check_backward = check
        return time.perf_counter() - t0, losses

    print(f"cpu unit {native.cpu_isa()}, {args.threads} threads; {args.ft_steps} steps x {args.ft_batch} x "
          f"{args.train_len * args.factor} tokens", flush=True)  # fmt: skip
    results = {}
    for name, recompute in (("native", False), ("recompute", True)):
        seconds, losses = finetune(recompute)
        results[name] = {"seconds": seconds, "final_loss": sum(losses[-10:]) / len(losses[-10:])}
        print(
            f"{name:>10}: {seconds:7.1f} s, mean loss of the last 10 steps {results[name]['final_loss']:.4f}",
            flush=True,
        )
    speedup = results["recompute"]["seconds"] / results["native"]["seconds"]
    print(f"native backward: {speedup:.2f}x faster fine-tuning than the recompute", flush=True)
    if args.json:
        record = {
            "cpu": platform.processor() or platform.machine(),
            "unit": native.cpu_isa(),
            "threads": args.threads,
            "ft_steps": args.ft_steps,
            "ft_batch": args.ft_batch,
            "tokens": args.train_len * args.factor,
            "results": results,
            "speedup": speedup,
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
