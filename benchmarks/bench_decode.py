"""Decode benchmark: one KV-cache step with keys rotated on read.

ropekern backends (append + attention over un-rotated keys) against a pre-rotated HF-layout cache
with eager RoPE + SDPA or a grouped einsum, flash-attn (flash_attn_with_kvcache) and FlashInfer;
GB/s of K/V read.
"""

import _path  # noqa: F401

from ropekern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("decode", __doc__, __file__))
