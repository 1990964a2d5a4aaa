"""The ``triton`` backend: fused scaled-RoPE attention kernels written in Triton.

Each op lives in its own module exposing ``check(call) -> str | None`` and ``run(call)``:
``attention`` (prefill / varlen forward), ``decode`` (KV cache), ``rope`` (apply_rope alone).
Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only; the
variable must be set before triton is imported).
"""

from __future__ import annotations

import os
import re
from typing import Any

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
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
    if _INTERPRET and _release(triton.__version__) < (3, 7):
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


class TritonBackend:
    name = "triton"

    def unavailable(self) -> str | None:
        import torch

        if not (_INTERPRET or torch.cuda.is_available()):
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
        return version_reason()

    @staticmethod
    def _device_reason(tensor: Any) -> str | None:
        if tensor.device.type == "cuda":
            return None
        if tensor.device.type == "cpu" and _INTERPRET:
            return None
        return f"tensors on {tensor.device} (triton runs on CUDA, or on CPU under TRITON_INTERPRET=1)"

    def _op(self, name: str) -> Any:
        from ..ops import import_module  # traceable by torch.compile, unlike importlib's

        return import_module(f"{__name__}.{name}")

    def check_attention(self, call: Any) -> str | None:
        return self._device_reason(call.q) or self._op("attention").check(call)

    def attention(self, call: Any):
        return self._op("attention").run(call)

    def check_kvcache(self, call: Any) -> str | None:
        from ..ops import grad_reason

        why = self._device_reason(call.q) or self._op("decode").check(call)
        return why or grad_reason(self.name, "kv-cache", *call.inputs)

    def kvcache(self, call: Any):
        return self._op("decode").run(call)

    def check_rope(self, call: Any) -> str | None:
        return self._device_reason(call.x) or self._op("rope").check(call)

    def rope(self, call: Any):
        return self._op("rope").run(call)


backend = TritonBackend()
