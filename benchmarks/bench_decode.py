"""Decode benchmark: one KV-cache step with keys rotated on read.

ropekern backends (append + attention over un-rotated keys) against a pre-rotated HF-layout cache
with eager RoPE + SDPA or a grouped einsum, flash-attn (flash_attn_with_kvcache) and FlashInfer;
GB/s of K/V read.

Runs the shared sweep of ``ropekern.bench`` for the ``decode`` op and saves JSON, CSV and PNG plots
under ``benchmarks/results/<device>/`` (``--no-save`` to only print). Same options as
``ropekern bench --op decode``; ``--preset full`` runs the issue-8 grid. Providers that need a GPU
(or a library that is not installed) are skipped with the reason printed under the table.
"""

import sys
from pathlib import Path

import _path  # noqa: F401

from ropekern.bench.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("decode", __doc__.split("\n\n")[1], results_root=Path(__file__).parent / "results"))
