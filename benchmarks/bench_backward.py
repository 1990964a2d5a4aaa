"""Backward benchmark: forward + backward through autograd.

ropekern backends (fused, RoPE off, separate apply_rope pass) against eager RoPE + torch SDPA,
SDPA without RoPE and flash-attn; TFLOP/s count forward + backward as 3.5x the forward FLOPs.
"""

import _path  # noqa: F401

from ropekern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("backward", __doc__, __file__))
