"""Context extension without new weights, on top of ropekern's kernels.

* ``nbce_combine``: Naive Bayes-based Context Extension, combining per-context next-token
  predictions (min-entropy / mean / max pooling).
* ``nbce_generate``: NBCE decoding of a transformers model (all contexts + the unconditional row as
  one batch, one shared token per step).
* ``pcw_generate``: Parallel Context Windows decoding of a transformers model (windows share the
  positions 0..n_w-1; task tokens attend to all of them), one fused ``rk.rope_attention`` per layer.
* ``split_windows``: a long context cut into overlapping windows for either.

The generation functions import ``transformers`` (through ``ropekern.integrations.hf``) on first use.
"""

from .generate import nbce_generate, pcw_generate
from .nbce import POOLINGS, nbce_combine
from .windows import split_windows

__all__ = ["nbce_combine", "nbce_generate", "pcw_generate", "split_windows", "POOLINGS"]
