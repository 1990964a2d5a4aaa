"""ropekern: scaled rotary position embeddings fused into FlashAttention-style kernels.

Public API (docs/design.md §1): ``RopeConfig`` (or a caller's ``RopeTable``), ``apply_rope``
(``apply_rope_`` in place), ``rope_attention``, ``rope_attention_with_kvcache``, ``available_backends``
and ``reference`` (the fp64-angle oracle).
"""

from . import reference
from .api import apply_rope, apply_rope_, available_backends, rope_attention, rope_attention_with_kvcache
from .scaling import ROPE_TYPES, RopeConfig, RopeTable

__version__ = "0.1.0"

__all__ = [
    "RopeConfig",
    "RopeTable",
    "ROPE_TYPES",
    "apply_rope",
    "apply_rope_",
    "rope_attention",
    "rope_attention_with_kvcache",
    "available_backends",
    "reference",
    "__version__",
]
