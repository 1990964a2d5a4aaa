"""The native backends: ``torch.ops.ropekern.*`` (schemas in ``csrc/bindings.cpp``, the argument
order of ``ropekern._validation``'s ``*_SCHEMA``) behind the backend protocol.

* ``NativeBackend(device_type)`` is a backend over those ops; ``backends.cuda`` subclasses it with
  its extension and GPU limits.
* ``cpu_backend`` serves CPU tensors with ``ropekern._C`` (csrc/cpu): fp32/bf16/fp16 inputs,
  fp32 compute. float64 inputs are left to the ``torch`` reference.

The fake (meta) implementations registered here let ``torch.compile`` trace the ops and make
``torch.library.opcheck`` pass; they allocate what the kernels return: ``out`` contiguous with
q's shape and dtype, ``lse`` float32 ``[B, Hq, Sq]`` (varlen ``[Hq, Tq]``).

Gradients: ``fwd`` gets the one attention autograd formula (``ropekern._autograd``) for every device
it has kernels for: the backward of the first backend serving the call (``ropekern::bwd``, the
native CPU backward, for CPU tensors; the fused Triton kernels for CUDA tensors; else the PyTorch
recompute). ``fwd_kvcache``, ``apply_rope`` and ``apply_rope_`` (in
place, declaring the mutation of ``x``) have no formula: their
calls that require grad are declined (``backends.grad_reason``) and fall back to ``torch``.
"""

from __future__ import annotations

import torch

from .._validation import AttentionCall, KVCacheCall, RopeCall
from . import BackwardCall, fake_attention, fake_kvcache, fake_rope, grad_reason

__all__ = ["NativeBackend", "cpu_backend", "cpu_isa", "cpu_isa_reason"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LOAD_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # not built: the backend reports why, the package still works
    _LOAD_ERROR = (
        f"the native extension ropekern._C is not built ({exc}); "
        "build it with `python setup.py build_ext --inplace` or `pip install -e .`"
    )


class NativeBackend:
    """A backend over ``torch.ops.ropekern`` for tensors of one device type."""

    def __init__(self, device_type: str, name: str | None = None) -> None:
        self.device_type = device_type
        self.name = name or device_type

    def unavailable(self) -> str | None:
        return _LOAD_ERROR

    def check_device(self, tensor: torch.Tensor) -> str | None:
        """None if the kernels take this tensor's device and dtype, else the reason."""
        if tensor.device.type != self.device_type:
            return f"tensors on {tensor.device} (the {self.name} backend runs on {self.device_type} tensors)"
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"{tensor.dtype} inputs (the {self.name} kernels take float32, bfloat16 and float16)"
        return None

    def check_attention(self, call: AttentionCall) -> str | None:
        if call.windowed and self.device_type != "cpu":
            return f"sliding windows are not in the {self.name} kernels"
        return self.check_device(call.q)

    def attention(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.ropekern.fwd(*call.op_args())

    def check_kvcache(self, call: KVCacheCall) -> str | None:
        if call.windowed and self.device_type != "cpu":
            return f"sliding windows are not in the {self.name} kernels"
        return self.check_device(call.q) or grad_reason(self.name, "kv-cache", *call.inputs)

    def kvcache(self, call: KVCacheCall, num_splits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_splits``: split-K partitions of the cache; 0 lets the kernel choose."""
        return torch.ops.ropekern.fwd_kvcache(*call.op_args(num_splits))

    def check_rope(self, call: RopeCall) -> str | None:
        return self.check_device(call.x) or grad_reason(self.name, "rope", call.x)

    def rope(self, call: RopeCall) -> torch.Tensor:
        return torch.ops.ropekern.apply_rope(*call.op_args())

    def rope_(self, call: RopeCall) -> None:
        """``call.x`` rotated in place (``ropekern::apply_rope_``, which declares the mutation)."""
        torch.ops.ropekern.apply_rope_(*call.op_args())

    def check_backward(self, call: BackwardCall) -> str | None:
        if self.device_type != "cpu":
            return f"the {self.name} backend has no backward kernel"
        if call.delta is not None:
            return "blocks of a longer sequence (ring attention) are left to the PyTorch recompute"
        return self.check_device(call.q)

    def backward(self, call: BackwardCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` in the input dtype (``ropekern::bwd``, csrc/cpu/kernels_bwd.h)."""
        return torch.ops.ropekern.bwd(*call.op_args())


cpu_backend = NativeBackend("cpu")


def cpu_isa() -> str:
    """The CPU kernel unit in use, the widest the machine runs: on x86-64 ``"amx"`` (the avx512
    unit plus AMX-BF16 tiles for bf16 prefill), ``"avx512"`` (AVX-512F/BW/VL/DQ, with the OS
    saving the zmm registers), ``"avx2"`` (AVX2 + FMA + F16C); on aarch64 ``"neon"``; anywhere
    ``"generic"`` (vectorised by the compiler). ``ROPEKERN_CPU_ISA`` forces one (read on every
    call; a unit the CPU cannot run raises ``RuntimeError``, an unknown name ``ValueError``)."""
    if _LOAD_ERROR:
        raise RuntimeError(_LOAD_ERROR)
    return _C.cpu_isa()


def cpu_isa_reason() -> str:
    """Why :func:`cpu_isa` is that unit: what cpuid and the OS report, or the override."""
    if _LOAD_ERROR:
        raise RuntimeError(_LOAD_ERROR)
    return _C.cpu_isa_reason()


if _LOAD_ERROR is None:
    torch.library.register_fake("ropekern::fwd", fake_attention)
    torch.library.register_fake("ropekern::fwd_kvcache", fake_kvcache)
    torch.library.register_fake("ropekern::apply_rope", fake_rope)
    torch.library.register_fake("ropekern::apply_rope_", lambda *args: None)
    torch.library.register_fake(
        "ropekern::bwd",
        lambda dout, out, lse, dlse, q, k, v, *rest: tuple(
            torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v)
        ),
    )
    # ``ropekern::fwd`` is differentiable on every device it has kernels for (the CPU ones here,
    # the CUDA ones in a CUDA build).
    from .._autograd import register_attention_autograd

    register_attention_autograd("ropekern::fwd")
