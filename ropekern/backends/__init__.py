"""The backends: one registry that knows which kernels exist and which call each can serve.

A backend is an object satisfying ``Backend`` (below): for each op it has a pair
``check_<op>(call) -> str | None`` (None when it serves the call, else the reason) and ``<op>(call)``.
The ops are ``attention``, ``kvcache``, ``rope`` (``call``: the validated objects of
``ropekern._validation``) and ``backward`` (``call``: a ``BackwardCall``). Backends live in their
own modules and are imported lazily, so a missing compiler or Triton only makes that backend
unavailable:

* ``torch``  (``backends.pytorch``) the pure-PyTorch reference, any device; its backward is the
  FlashAttention-2 recompute in PyTorch (``ropekern._autograd``).
* ``cpu``    (``backends.native``) the native CPU kernels of ``ropekern._C``.
* ``cuda``   (``backends.cuda``)   the hand-written CUDA kernels of ``ropekern._C``.
* ``triton`` (``backends.triton``) the Triton kernels, with the fused backward.

Forward kernels without a backward of their own decline calls whose inputs require grad
(``grad_reason``, one rule for every backend) except ``attention``, whose ops carry one autograd
formula that runs the ``backward`` op of the first backend serving it (``ropekern._autograd``).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol, runtime_checkable

import torch

from .._validation import (
    ATTENTION_SCHEMA,
    AttentionCall,
    KVCacheCall,
    RopeArgs,
    RopeCall,
    bundle_rope,
    rope_position,
)

__all__ = [
    "Backend",
    "BackwardCall",
    "define_op",
    "auto_order",
    "available_backends",
    "get_backend",
    "grad_reason",
    "import_module",
    "load",
    "select_backend",
]


@dataclass
class BackwardCall:
    """The gradients of one attention forward: inputs as ``rope_attention`` (dense ``[B, S, H, D]``
    or varlen ``[T, H, D]`` with ``cu_seqlens_*``), the forward's ``out`` and float32 ``lse``
    (``[B, Hq, Sq]`` / ``[Hq, Tq]``), the output gradient ``dout`` and the LSE gradient ``dlse``
    (or None).

    ``delta`` set means a *block* of a longer sequence (ring attention): ``lse`` and ``delta`` =
    rowsum(dO * O) are those of the whole sequence, ``out`` is not read, and the gradients come
    back in the compute dtype (float32; the PyTorch path fp64 for fp32/fp64 inputs). Otherwise
    they come back in the input dtype.
    """

    dout: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor | None
    lse: torch.Tensor
    dlse: torch.Tensor | None
    q_positions: torch.Tensor
    k_positions: torch.Tensor
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    rope: RopeArgs
    causal: bool
    softmax_scale: float
    window_left: int
    window_right: int
    delta: torch.Tensor | None = None

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.cu_seqlens_q is not None else self.q.shape[0]

    @classmethod
    def from_op_args(cls, dout, out, lse, dlse, *inputs) -> BackwardCall:
        """From a backward op's arguments (``BACKWARD_SCHEMA``): the output gradients and results,
        then the forward's arguments (``ATTENTION_SCHEMA``)."""
        q, k, v, *fwd = bundle_rope(inputs, rope_position(ATTENTION_SCHEMA))
        return cls(dout, q, k, v, out, lse, dlse, *fwd)

    def op_args(self) -> tuple:
        """The arguments of a backward op (``_autograd.BACKWARD_SCHEMA``)."""
        return (
            self.dout, self.out, self.lse, self.dlse, self.q, self.k, self.v, self.q_positions, self.k_positions,
            self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k, *self.rope, self.causal,
            self.softmax_scale, self.window_left, self.window_right,
        )  # fmt: skip


@runtime_checkable
class Backend(Protocol):
    """What the registry expects of a backend. ``unavailable`` (optional) says why it cannot run
    on this machine at all; an op a backend lacks has a ``check_<op>`` that always gives a reason."""

    name: str

    def check_attention(self, call: AttentionCall) -> str | None: ...
    def attention(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]: ...
    def check_kvcache(self, call: KVCacheCall) -> str | None: ...
    def kvcache(self, call: KVCacheCall) -> tuple[torch.Tensor, torch.Tensor]: ...
    def check_rope(self, call: RopeCall) -> str | None: ...
    def rope(self, call: RopeCall) -> torch.Tensor: ...
    def check_backward(self, call: BackwardCall) -> str | None: ...
    def backward(self, call: BackwardCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


# The outputs each op allocates, for the fake (meta) implementations every backend's ops register
# so that ``torch.compile`` traces them: ``out`` contiguous like q, ``lse`` float32 ``[B, Hq, Sq]``
# (varlen ``[Hq, Tq]``).
def fake_attention(q, k, v, q_positions, k_positions, cu_seqlens_q, *rest) -> tuple[torch.Tensor, torch.Tensor]:
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def fake_kvcache(q, *rest) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def fake_rope(x, *rest) -> torch.Tensor:
    return x.new_empty(x.shape)


def define_op(qualname: str, args_schema: str, returns: str, launcher: Any, fake: Any) -> None:
    """Define the op ``qualname(args_schema) -> returns`` for every device: ``launcher`` takes its
    arguments with the rope ones gathered into one ``RopeArgs`` (``bundle_rope``); ``fake`` takes
    them as they are and allocates the outputs (``torch.compile`` traces it)."""
    at = rope_position(args_schema)

    def impl(*args):
        return launcher(*bundle_rope(args, at))

    torch.library.define(qualname, f"({args_schema}) -> {returns}")
    torch.library.impl(qualname, "default", impl)
    torch.library.register_fake(qualname, fake)


# name -> "module:attribute" of the backend object. Order matters only for display.
_REGISTRY: dict[str, str] = {
    "torch": "ropekern.backends.pytorch:backend",
    "cpu": "ropekern.backends.native:cpu_backend",
    "triton": "ropekern.backends.triton:backend",
    "cuda": "ropekern.backends.cuda:backend",
}
# What `backend="auto"` tries, per device type, in order; `torch` serves every call.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
_OPS = ("attention", "kvcache", "rope", "backward")


@torch.compiler.assume_constant_result
def _import_error(module_name: str) -> str:
    """Import ``module_name``: ``""`` on success, else the error text. torch.compile runs this
    instead of tracing it (importlib cannot be traced) and folds the string as a constant."""
    try:
        importlib.import_module(module_name)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def import_module(module_name: str) -> Any:
    """``importlib.import_module`` that ``torch.compile(fullgraph=True)`` can trace."""
    error = _import_error(module_name)
    if error:
        raise ImportError(error)
    # Walk from the top-level package: torch.compile sees sys.modules as it was when tracing
    # began, but reads module attributes live, so a module imported just above is found.
    root, *parts = module_name.split(".")
    module = sys.modules[root]
    for part in parts:
        module = getattr(module, part)
    return module


@cache
def load(name: str) -> Any:
    """The backend object, or the reason (a string) why it cannot be loaded."""
    module_name, attr = _REGISTRY[name].split(":")
    try:
        module = import_module(module_name)
        backend = getattr(module, attr)
    except Exception as exc:  # an unbuilt extension or missing Triton makes only this backend unavailable
        return f"{type(exc).__name__}: {exc}"
    reason = backend.unavailable() if hasattr(backend, "unavailable") else None
    return reason if reason else backend


def grad_reason(backend: str, op: str, *tensors: torch.Tensor | None) -> str | None:
    """The one rule for ops without an autograd formula, every backend: a call whose inputs require
    grad is declined, so ``auto`` moves on to one that has a formula (``torch``: autograd through the
    reference) and a named backend raises, instead of returning an output with no gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return f"inputs require grad (the {backend} {op} kernel has no backward)"
    return None


def auto_order(device_type: str) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for tensors of ``device_type``, in order."""
    return _AUTO_ORDER.get(device_type, ("torch",))


def available_backends() -> dict[str, bool | str]:
    """Each backend name -> ``True``, or the reason it cannot run here."""
    return {name: (loaded if isinstance(loaded, str) else True) for name, loaded in ((n, load(n)) for n in _REGISTRY)}


def get_backend(name: str) -> Backend:
    """The backend object by name; ``ValueError`` if unknown or unavailable."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(_REGISTRY)}")
    loaded = load(name)
    if isinstance(loaded, str):
        raise ValueError(f"backend {name!r} is not available: {loaded}")
    return loaded


def select_backend(op: str, call: Any, device: torch.device, backend: Any) -> Backend:
    """The backend to run ``op`` for ``call``: the named one (which must serve the call) or, for
    ``"auto"``, the first of the device's preference order that is available and serves it."""
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a string, got {type(backend).__name__}")
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {_OPS}")
    if backend != "auto":
        chosen = get_backend(backend)
        why = getattr(chosen, f"check_{op}")(call)
        if why:
            raise ValueError(f"backend {backend!r} cannot run this {op} call: {why}")
        return chosen
    for name in auto_order(device.type):
        loaded = load(name)
        if not isinstance(loaded, str) and getattr(loaded, f"check_{op}")(call) is None:
            return loaded
    return get_backend("torch")
