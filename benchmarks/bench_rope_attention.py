"""Forward (prefill) benchmark of fused scaled-RoPE attention.

ropekern backends (fused, RoPE off, separate apply_rope pass) against eager RoPE + torch SDPA,
SDPA without RoPE, flash-attn and FlashInfer; ms, TFLOP/s, peak memory, ratios.
"""

import _path  # noqa: F401

from ropekern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("forward", __doc__, __file__))
