"""Forward (prefill) benchmark of fused scaled-RoPE attention.

ropekern backends (fused, RoPE off, separate apply_rope pass) against eager RoPE + torch SDPA,
SDPA without RoPE, flash-attn and FlashInfer; ms, TFLOP/s, peak memory, ratios.

Runs the shared sweep of ``ropekern.bench`` for the ``forward`` op and saves JSON, CSV and PNG plots
under ``benchmarks/results/<device>/`` (``--no-save`` to only print). Same options as
``ropekern bench --op forward``; ``--preset full`` runs the issue-8 grid. Providers that need a GPU
(or a library that is not installed) are skipped with the reason printed under the table.
"""

import sys
from pathlib import Path

import _path  # noqa: F401

from ropekern.bench.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("forward", __doc__.split("\n\n")[1], results_root=Path(__file__).parent / "results"))
