"""apply_rope benchmark: the standalone rotation of q and k.

ropekern's apply_rope per backend against HF-style eager RoPE, flash-attn's apply_rotary_emb
and FlashInfer's apply_rope_pos_ids; GB/s read + written.

Runs the shared sweep of ``ropekern.bench`` for the ``rope`` op and saves JSON, CSV and PNG plots
under ``benchmarks/results/<device>/`` (``--no-save`` to only print). Same options as
``ropekern bench --op rope``; ``--preset full`` runs the issue-8 grid. Providers that need a GPU
(or a library that is not installed) are skipped with the reason printed under the table.
"""

import sys
from pathlib import Path

import _path  # noqa: F401

from ropekern.bench.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("rope", __doc__.split("\n\n")[1], results_root=Path(__file__).parent / "results"))
