"""Long-context evaluation that works with any model through ``logits_fn(input_ids) -> logits``.

* Passkey retrieval in the Position Interpolation paper's format: ``passkey_samples`` (lengths and
  depths configurable, any tokenizer), ``score_passkey`` (generated text or ids), and teacher-forced
  ``passkey_scores`` / ``passkey_accuracy``.
* ``needle_perplexity`` (perplexity of the answer tokens only) and ``sliding_window_perplexity``.

``logits_fn`` takes int64 ``[B, S]`` ids on the CPU and returns ``[B, S, V]`` logits (or an object
with ``.logits``), e.g. ``lambda ids: model(ids.to("cuda")).logits`` for a transformers model.
"""

from . import passkey, perplexity
from .passkey import *  # noqa: F403  (the names of passkey.__all__)
from .perplexity import *  # noqa: F403  (the names of perplexity.__all__)

__all__ = [*passkey.__all__, *perplexity.__all__]
