"""Long-context evaluation that works with any model through ``logits_fn(input_ids) -> logits``.

* Passkey retrieval in the Position Interpolation paper's format: ``passkey_samples`` (lengths and
  depths configurable, any tokenizer), ``score_passkey`` (generated text or ids), and teacher-forced
  ``passkey_scores`` / ``passkey_accuracy``.
* ``needle_perplexity`` (perplexity of the answer tokens only) and ``sliding_window_perplexity``.

``logits_fn`` takes int64 ``[B, S]`` ids on the CPU and returns ``[B, S, V]`` logits (or an object
with ``.logits``), e.g. ``lambda ids: model(ids.to("cuda")).logits`` for a transformers model.
"""

from .passkey import (
    PasskeySample,
    PasskeyScore,
    PasskeyTemplate,
    passkey_accuracy,
    passkey_sample,
    passkey_samples,
    passkey_scores,
    score_passkey,
)
from .perplexity import answer_nll, needle_perplexity, sliding_window_perplexity

__all__ = [
    "PasskeyTemplate",
    "PasskeySample",
    "PasskeyScore",
    "passkey_sample",
    "passkey_samples",
    "score_passkey",
    "passkey_scores",
    "passkey_accuracy",
    "answer_nll",
    "needle_perplexity",
    "sliding_window_perplexity",
]
