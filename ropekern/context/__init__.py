"""Context extension without new weights, on top of ropekern's kernels.

* ``nbce_combine``: Naive Bayes-based Context Extension, combining per-context next-token
  predictions (min-entropy / mean / max pooling).

``nbce_generate`` and ``pcw_generate`` (Parallel Context Windows) drive a transformers model and
build on the Hugging Face integration (``ropekern.integrations.hf``); they are not in this module yet.
"""

from .nbce import POOLINGS, nbce_combine

__all__ = ["nbce_combine", "POOLINGS"]
