"""``ropekern bench``: the main job, a context-length sweep of the available backends against eager
RoPE + torch SDPA (and the RoPE-off and separate-pass variants, flash-attn/FlashInfer on GPU).

The default (fp32, B=1, Hq=8/Hkv=2, D=128, causal, seqlens 512..4K, 3 interleaved samples) takes
about two minutes on an idle 2-core CPU even when only the torch reference backend exists.
Everything lives in ``ropekern.bench``; this module only wires it into the CLI.
"""

from __future__ import annotations

HELP = "benchmark the available backends against eager RoPE + torch SDPA over a context-length sweep"


def add_arguments(parser) -> None:
    from .bench.cli import add_arguments as add

    add(parser)


def run(args) -> int:
    from .bench.cli import run as run_bench

    return run_bench(args, getattr(args, "_command", None))
