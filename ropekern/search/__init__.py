"""Search of RoPE scaling parameters against a user-supplied objective.

* ``longrope_search``: LongRoPE/LongRoPE2-style evolutionary search of per-dimension rescale
  factors (>= 1, non-decreasing, bounded), seeded from PI, NTK and YaRN, deterministic for a seed,
  resumable from a JSON checkpoint. Returns a ``longrope`` scaling dict for ``RopeConfig``.
* ``seed_factors``: the per-dimension factors that PI, NTK and YaRN imply.
* ``with_scaling``: a ``RopeConfig`` with its scaling replaced.
"""

from .longrope import longrope_search, seed_factors, with_scaling

__all__ = ["longrope_search", "seed_factors", "with_scaling"]
