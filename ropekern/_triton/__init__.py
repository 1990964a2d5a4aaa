"""The ``triton`` backend: fused scaled-RoPE attention kernels written in Triton.

Each op lives in its own module exposing ``check(call) -> str | None`` and ``run(call)``:
``attention`` (prefill / varlen forward), ``decode`` (KV cache), ``rope`` (apply_rope alone).
Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only; the
variable must be set before triton is imported).
"""

from __future__ import annotations

import os
from typing import Any

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend:
    name = "triton"

    def unavailable(self) -> str | None:
        import torch

        if _INTERPRET or torch.cuda.is_available():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"

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
        return self._device_reason(call.q) or self._op("decode").check(call)

    def kvcache(self, call: Any):
        return self._op("decode").run(call)

    def check_rope(self, call: Any) -> str | None:
        return self._device_reason(call.x) or self._op("rope").check(call)

    def rope(self, call: Any):
        return self._op("rope").run(call)


backend = TritonBackend()
