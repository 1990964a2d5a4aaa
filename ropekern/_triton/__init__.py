"""The Triton kernels: ``attention`` (prefill / varlen forward), ``backward`` (its fused backward),
``decode`` (KV cache), ``rope`` (apply_rope alone), on the shared tile helpers ``rope_math`` /
``rope_tile`` and host constants ``host``. Each kernel module holds its kernels, their launcher
(tensors in, tensors out) and ``limits(...)``, what the kernels cannot take; ``ropekern.backends.triton``
registers them as ops behind the backend protocol.
"""

from __future__ import annotations

import re

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from .host import INTERPRET

# The oldest release the kernels compile with: 3.4/3.5 lack tl.range(disable_licm=...) (backward)
# and the ptxas helper aot.py calls. pyproject.toml's triton range starts here too.
MIN_TRITON = (3, 6)


def _release(version: str) -> tuple[int, int]:
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return major, minor


def version_reason() -> str | None:
    """Why the installed Triton (with numpy, under the interpreter) cannot run these kernels, or None."""
    if _release(triton.__version__) < MIN_TRITON:
        return (
            f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest release the "
            "kernels compile with"
        )
    if INTERPRET and _release(triton.__version__) < (3, 7):
        import numpy

        if _release(numpy.__version__) >= (2, 4):
            # 3.6's interpreter turns a scalar tensor into an index with int() of its 1-element
            # array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to
            # Python scalars"): 215 of the interpreter tests fail. 3.7 passes with numpy 2.4.
            return (
                f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (>= 2.4); "
                "use numpy < 2.4 or Triton >= 3.7"
            )
    return None
