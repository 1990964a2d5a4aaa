"""The backend registry: one place that knows which kernels exist and which call each can serve.

A backend is an object with a ``name`` and, for each op it implements, a pair of methods:
``check_<op>(call) -> str | None`` (None when the call is supported, else the reason) and
``<op>(call)``, where ``<op>`` is ``attention``, ``kvcache`` or ``rope`` and ``call`` is the
validated object from ``ropekern._validation``. Backends live in their own modules and are
imported lazily, so a missing compiler or Triton only makes that backend unavailable.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from typing import Any

import torch

from . import reference

__all__ = ["available_backends", "get_backend", "select_backend", "BACKEND_NAMES"]


class TorchBackend:
    """The pure-PyTorch reference (any device, differentiable by autograd)."""

    name = "torch"

    def check_attention(self, call: Any) -> str | None:
        return None

    def attention(self, call: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.attention(call)

    def check_kvcache(self, call: Any) -> str | None:
        return None

    def kvcache(self, call: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.kvcache(call)

    def check_rope(self, call: Any) -> str | None:
        return None

    def rope(self, call: Any) -> torch.Tensor:
        return reference.rotate_call(call)


# name -> "module:attribute" of the backend object. Order matters only for display.
_REGISTRY: dict[str, str] = {
    "torch": "ropekern.ops:TORCH",
    "cpu": "ropekern._native:cpu_backend",
    "triton": "ropekern._triton:backend",
    "cuda": "ropekern._cuda:backend",
}
# What `backend="auto"` tries, per device type, in order.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}

TORCH = TorchBackend()
BACKEND_NAMES = tuple(_REGISTRY)


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
def _load(name: str) -> Any:
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


def available_backends() -> dict[str, bool | str]:
    """Each backend name -> ``True``, or the reason it cannot run here."""
    return {name: (loaded if isinstance(loaded, str) else True) for name, loaded in ((n, _load(n)) for n in _REGISTRY)}


def get_backend(name: str) -> Any:
    """The backend object by name; ``ValueError`` if unknown or unavailable."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(_REGISTRY)}")
    loaded = _load(name)
    if isinstance(loaded, str):
        raise ValueError(f"backend {name!r} is not available: {loaded}")
    return loaded


def select_backend(op: str, call: Any, device: torch.device, backend: Any) -> Any:
    """The backend to run ``op`` for ``call``: the named one (which must support the call) or,
    for ``"auto"``, the first of the device's preference order that is available and supports it."""
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a string, got {type(backend).__name__}")
    if backend != "auto":
        chosen = get_backend(backend)
        reason = getattr(chosen, f"check_{op}", None)
        if reason is None:
            raise ValueError(f"backend {backend!r} does not implement {op}")
        why = reason(call)
        if why:
            raise ValueError(f"backend {backend!r} cannot run this {op} call: {why}")
        return chosen
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if name not in _REGISTRY:
            continue
        loaded = _load(name)
        if isinstance(loaded, str):
            continue
        check = getattr(loaded, f"check_{op}", None)
        if check is not None and check(call) is None:
            return loaded
    return TORCH
