"""Run a Hugging Face ``transformers`` model's RoPE + attention through ropekern.

``patch(model)`` replaces, in place, the ``forward`` of every attention module by one that keeps the
module's own projections (biases, q/k norms, fused qkv) and output projection, but hands the
**un-rotated** q, k, v to ``ropekern.rope_attention`` with explicit positions. ``unpatch(model)``
deletes those instance-level forwards, so the class's own forward runs again, bit for bit.

KV cache. Keys are stored un-rotated. Each cache layer (``transformers.DynamicLayer``) is swapped,
while still empty, for ``UnrotatedLayer``, which also records the position of every cached token
(``[B, T]``) and keeps it aligned through ``crop``, ``reorder_cache`` (beam search) and the batch
operations. Every step rotates *all* keys with the table of the sequence's current length; stock
transformers caches keys rotated with the table in force when they were written (``docs/hf.md``).
Re-rotation alone is exact for one layer only: deeper layers' cached keys/values were computed from
attention outputs under the older table. So for dynamic NTK and LongRoPE the decoder stack's
forward is wrapped too (``rescale="recompute"``, the default): when a sequence's scaling state
changes, the prefix is recomputed from input embeddings kept in the cache, and cached generation
equals a full recompute. A cache written by an unpatched model (rotated keys) is refused, and an
``UnrotatedLayer`` refuses writes from an unpatched module.

Masks. The module receives transformers' own mask (``None``, 2-D padding mask, or 4-D bool/float
mask). It is reduced to a key-validity mask ``[B, T]``; a 4-D mask is checked to be exactly
"causal + key padding" (it is not when sliding windows, packed sequences or custom masks are in
play, and those are refused). With padding, the valid tokens are packed into ropekern's varlen
layout, so left-padded batches attend exactly to their own tokens; padded query rows return zeros.

Refused with a ``ValueError`` naming the module: unknown attention classes, sliding windows,
logit soft-capping, attention sinks, per-layer RoPE parameters, 3-D (multimodal) position ids,
packed-sequence flash kwargs, attention dropout in training, ``output_attentions``, cache types
other than ``DynamicCache``'s full-attention layers, and configs whose RoPE ropekern would read
differently from the model's own rotary tables (checked at patch time).

Modules: ``adapters`` (per-architecture q/k/v layouts), ``cache`` (cache keywords, ``UnrotatedLayer``),
``masks`` (mask reduction), ``forward`` (the replacement attention forward), ``recompute`` (the
decoder-stack forward of ``rescale="recompute"``), ``checks`` (patch-time refusals), ``patch``
(``patch``, ``unpatch``, ``extend_context``) and ``reference`` (``exact_reference``).
"""

from .adapters import SUPPORTED_ARCHITECTURES
from .cache import CACHE_KEYWORDS, UnrotatedLayer, cache_keyword, output_cache
from .masks import _key_validity as _key_validity  # not public: tests/test_hf.py checks the mask reduction directly
from .patch import extend_context, is_patched, patch, rope_config, unpatch
from .reference import exact_reference

__all__ = [
    "patch",
    "unpatch",
    "extend_context",
    "is_patched",
    "rope_config",
    "exact_reference",
    "UnrotatedLayer",
    "SUPPORTED_ARCHITECTURES",
    "cache_keyword",
    "output_cache",
    "CACHE_KEYWORDS",
]
