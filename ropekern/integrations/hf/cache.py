"""The KV-cache side: the keywords transformers passes a cache under (``cache_keyword``,
``output_cache``) and ``UnrotatedLayer``, the cache layer holding un-rotated keys and their positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

try:
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as exc:  # transformers < 4.56 has no per-layer cache objects
    raise ImportError("ropekern.integrations.hf needs transformers >= 5 (pip install 'ropekern[hf]')") from exc


# The names under which transformers has passed the KV cache to an attention module or a decoder
# stack: ``past_key_values`` (5.0-5.23), ``cache`` (5.24+, with ``past_key_values`` accepted through
# a deprecation shim until 5.40), ``layer_past`` (GPT-NeoX, and GPT-J before 5.24).
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _forward_parameters(cls: type) -> list[inspect.Parameter]:
    """The class forward's parameters after ``self`` (through ``functools.wraps`` decorators)."""
    return list(inspect.signature(cls.forward).parameters.values())[1:]


def _cache_keyword(cls: type, where: str, allowed: tuple[str, ...] = CACHE_KEYWORDS) -> str:
    """The one name among ``allowed`` under which ``cls.forward`` takes the KV cache."""
    names = [p.name for p in _forward_parameters(cls) if p.name in allowed]
    if len(names) != 1:
        raise ValueError(
            f"{where}: {cls.__name__}.forward takes the KV cache under {names or 'no known keyword'} (expected one of "
            f"{list(allowed)}) in transformers {_transformers_version()}, which ropekern does not know"
        )
    return names[0]


def _take_cache(kwargs: dict, where: str) -> Any:
    """Pop the KV cache from a forward's keyword arguments under whichever known name it came.

    Raises when two names carry one, or when a ``transformers`` ``Cache`` arrives under a keyword no
    transformers release has used for it (a rename ropekern does not know: never skipped quietly)."""
    popped = {name: kwargs.pop(name, None) for name in CACHE_KEYWORDS}
    given = {name: value for name, value in popped.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"{where}: the KV cache was passed twice, as {sorted(given)}")
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if stray:
        raise ValueError(
            f"{where}: received a KV cache under {stray}, a keyword ropekern does not know (transformers "
            f"{_transformers_version()}; known: {list(CACHE_KEYWORDS)})"
        )
    return next(iter(given.values()), None)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a KV cache in the installed transformers
    (``"cache"`` from 5.24, ``"past_key_values"`` before): ``model(ids, **{cache_keyword(model): c})``
    passes a cache without a deprecation warning on either side of the rename."""
    return _cache_keyword(type(model), f"ropekern.integrations.hf ({type(model).__name__})", CACHE_KEYWORDS[:2])


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``output.cache`` from transformers 5.24, ``past_key_values``
    before; a tuple output's second item), without touching the deprecated alias."""
    if isinstance(output, tuple):
        return output[1] if len(output) > 1 else None
    fields = getattr(type(output), "__dataclass_fields__", {})
    name = next((n for n in CACHE_KEYWORDS[:2] if n in fields), None)
    return None if name is None else getattr(output, name)


class UnrotatedLayer(DynamicLayer):
    """A ``DynamicLayer`` holding **un-rotated** keys and the position of every cached token.

    ``keys``/``values``: ``[B, Hkv, T, D]`` as in transformers; ``positions``: int32 ``[B, T]``;
    ``inputs``: the input embeddings ``[B, T, hidden]`` (first layer only, ``rescale="recompute"``
    with a length-dependent RoPE: what a recompute of the whole prefix starts from). Writes must
    come from a patched module (``update(..., positions=...)``); cache operations that reorder or
    cut the batch or the sequence keep ``positions`` and ``inputs`` aligned with the keys.
    ``sequential``: every row's positions are ``0..T-1`` (plain decoding; cropping, reordering and
    batch selection keep it), so attention may address the keys by slot.
    """

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None
        self.sequential = True

    def update(self, key_states, value_states, *args, positions: torch.Tensor | None = None, **kwargs):
        if positions is None:
            raise ValueError(
                "this cache layer holds un-rotated keys written by a ropekern-patched model; it cannot be "
                "updated by an unpatched attention module (patch the model again, or start a new cache)"
            )
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        positions = positions.to(device=keys.device, dtype=torch.int32)
        if self.sequential:  # only the new positions are compared: O(new tokens) per update
            n0 = 0 if self.positions is None else self.positions.shape[1]
            slots = torch.arange(n0, n0 + positions.shape[1], device=positions.device, dtype=torch.int32)
            self.sequential = bool((positions == slots).all())
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        return keys, values

    def _side(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("positions", "inputs"):
            value = getattr(self, name)
            if value is not None and value.shape[1]:
                setattr(self, name, fn(value))

    def crop(self, *args, **kwargs) -> None:  # the argument was renamed in transformers 5.18
        super().crop(*args, **kwargs)
        if self.is_initialized:
            n = self.keys.shape[-2]
            self._side(lambda t: t[:, :n])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._side(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._side(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._side(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        # Drop the keys (5.18+ does; 5.17 zeroes them in place, keeping the length), so the layer is
        # empty and the next update starts a new sequence.
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()
        self.positions = self.inputs = None
        self.sequential = True


def _cache_layer(cache: Any, layer_idx: int, where: str) -> UnrotatedLayer:
    """The ``UnrotatedLayer`` for ``layer_idx``, installing one in place of an empty ``DynamicLayer``."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not hasattr(cache, "update"):
        raise ValueError(f"{where}: unsupported cache {type(cache).__name__}; use transformers.DynamicCache")
    while len(layers) <= layer_idx:
        layers.append(UnrotatedLayer())
    layer = layers[layer_idx]
    if isinstance(layer, UnrotatedLayer):
        length = layer.get_seq_length()
        pos = layer.positions
        if length and (pos is None or pos.shape[1] != length or pos.shape[0] != layer.keys.shape[0]):
            raise ValueError(
                f"{where}: the cache's keys ({tuple(layer.keys.shape)}) and recorded positions "
                f"({None if pos is None else tuple(pos.shape)}) are out of step (a cache operation ropekern "
                "does not track); start a new cache"
            )
        return layer
    if type(layer) is not DynamicLayer:
        raise ValueError(
            f"{where}: unsupported cache layer {type(layer).__name__} (sliding-window, static, quantized and "
            "offloaded layers are not supported); use transformers.DynamicCache"
        )
    if layer.get_seq_length():
        raise ValueError(
            f"{where}: the cache already holds {layer.get_seq_length()} keys written by an unpatched model "
            "(rotated keys); a patched model needs a cache it filled itself"
        )
    layers[layer_idx] = UnrotatedLayer()
    return layers[layer_idx]
