"""apply_rope benchmark: the standalone rotation of q and k.

ropekern's apply_rope per backend against HF-style eager RoPE, flash-attn's apply_rotary_emb
and FlashInfer's apply_rope_pos_ids; GB/s read + written.
"""

import _path  # noqa: F401

from ropekern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("rope", __doc__, __file__))
