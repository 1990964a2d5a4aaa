"""Cutting a long context into overlapping windows for NBCE and Parallel Context Windows."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["split_windows"]

T = TypeVar("T")


def split_windows(context: Sequence[T], size: int, overlap: int) -> list[Sequence[T]]:
    """Windows of ``size`` items starting every ``size - overlap`` items, covering ``context``.

    Any span of at most ``overlap`` items (a needle, a fact) lies whole inside at least one window,
    so ``overlap`` is set to the length of what must not be cut. The last window ends at the end of
    ``context`` and may be shorter; an empty context gives one empty window.

    Args:
        context: token ids (a list, tuple or 1-D tensor; windows are slices of it).
        size: window length, >= 1.
        overlap: items shared by consecutive windows, ``0 <= overlap < size``.
    Returns: the windows in order.
    """
    for name, value in (("size", size), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"split_windows: `{name}` must be an int, got {type(value).__name__}")
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"split_windows: need size >= 1 and 0 <= overlap < size, got size {size}, overlap {overlap}")
    stride, out, start = size - overlap, [], 0
    while True:
        out.append(context[start : start + size])
        if start + size >= len(context):
            return out
        start += stride
