"""ropekern's benchmark layer: one setup, provider registry, timing and results path shared by
``ropekern bench`` and the scripts in ``benchmarks/`` (docs/design.md §6).

* ``config``     shapes, rope presets, sweep grids (``SweepConfig``, ``preset``)
* ``metrics``    FLOP and byte counts (``attention_flops``, ``op_flops``, ``op_bytes``)
* ``providers``  what can be timed per op (ropekern backends fused / RoPE off / separate pass,
                 eager RoPE + SDPA, flash-attn, FlashInfer), each building a callable or a ``Skip``
* ``timing``     interleaved medians on CPU, CUDA events + L2 flush + CUDA graphs on GPU
* ``memory``     peak extra memory (RSS high-water in a fresh subprocess on CPU, CUDA allocator)
* ``runner``     ``run_sweep(cfg) -> Results`` with ratios, RoPE tax and variant spread
* ``results``    metadata, JSON/CSV, the text table, PNG plots
* ``cli``        argument parsing shared by the CLI and the scripts

New backends appear here without edits: the sweep times whatever ``rk.available_backends()``
reports for the device.
"""

from .config import Shape, SweepConfig, make_rope, preset
from .metrics import attention_flops, op_bytes, op_flops
from .providers import Provider, Skip, build_providers, default_backends
from .runner import Results, run_sweep

__all__ = [
    "Shape",
    "SweepConfig",
    "make_rope",
    "preset",
    "attention_flops",
    "op_flops",
    "op_bytes",
    "Provider",
    "Skip",
    "build_providers",
    "default_backends",
    "Results",
    "run_sweep",
]
