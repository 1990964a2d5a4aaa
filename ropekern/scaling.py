"""RoPE scaling laws as host-side data (docs/design.md §3).

Every scaling type reduces to a vector of inverse frequencies (radians per position) and one
magnitude factor, which its law (``ropekern.laws``, one class per ``rope_type``) computes in
float64. ``RopeConfig`` computes them once per (config, scaling state) and hands them to the
kernels as data, so a new scaling law never needs a new kernel.

Kernels receive the frequencies as a *turn split* (``split_turns``): each frequency in turns
(``inv_freq / 2π``) is cut into three 12-bit pieces and an fp32 remainder, so that every partial
product with a 12-bit chunk of the position that can exceed a turn is exact in fp32 (see
``angle_turns_fp32``, the executable specification that the Triton, CPU and CUDA kernels
reproduce operation by operation): cos/sin within 2e-6 of exact for every int32 position.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .laws import ROPE_TYPES, ScalingLaw, _err, _int, _real, law_class

__all__ = [
    "ROPE_TYPES",
    "RopeConfig",
    "RopeTable",
    "split_turns",
    "SPLIT_ROWS",
    "angle_turns_fp32",
    "MAX_POSITION",
]

# Positions are carried as int32 by every kernel; the accurate-angle scheme keeps cos/sin within
# 2e-6 of exact up to this bound (angle_turns_fp32).
MAX_POSITION = 2**31 - 1

_TWO_PI = 2.0 * math.pi
_TABLE_CACHE_SIZE = 64
_LENGTH_CACHE_SIZE = 8


SPLIT_ROWS = 4  # rows of the split table: f1, f2, f3 (12 significant bits each) and the remainder f4


def split_turns(inv_freq: torch.Tensor) -> torch.Tensor:
    """Split frequencies (radians per position, float64 ``[..., n]``) into the kernel form.

    Returns float32 ``[..., 4, n]``: ``f1 + f2 + f3 + f4 == inv_freq / 2π`` (turns per position)
    exactly for the fp64 value of ``inv_freq / 2π`` (~2**-53 relative to the true one), where
    ``f1``, ``f2`` and ``f3`` carry 12 significant bits each, so their products with a 12-bit
    chunk of the position are exact in fp32, and ``f4`` is the fp32 remainder.
    """
    r = inv_freq.to(torch.float64) / _TWO_PI
    rows = []
    for _ in range(SPLIT_ROWS - 1):
        part = _round_bits(r, 12)
        rows.append(part)
        r = r - part  # exact: part holds the leading 12 bits of r
    rows.append(r)
    return torch.stack(rows, dim=-2).to(torch.float32)


def _round_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    mantissa, exponent = torch.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(bits))), exponent - bits)


def _reduce_turn(x: torch.Tensor) -> torch.Tensor:
    return x - torch.floor(x + 0.5)


def angle_turns_fp32(positions: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    """Reference implementation of the kernels' accurate angle, in fp32 operations only.

    ``positions`` int ``[...]`` (0 <= p < 2**31), ``split`` float32 ``[4, n]`` from ``split_turns``.
    Returns the angle in turns, reduced to [-0.5, 0.5], float32 ``[..., n]``. Multiply by 2π (in
    fp32) and take cos/sin. Every kernel performs exactly these fp32 operations (C++:
    ``rope_math.h``, ``angle_turns_high`` then ``angle_turns_low``).

    The position is cut into 12-bit chunks ``P2 = (p >> 24) << 24`` (7 bits), ``P1 = ((p >> 12) &
    4095) << 12`` and ``P0 = p & 4095``: every product of a chunk with f1, f2 or f3 that can exceed a
    turn has at most 24 significant bits, so it is exact, and so is its reduction to [-0.5, 0.5]
    turn. Only the 7 additions of reduced values round (<= 2**-25 turn each), the small products
    (< 0.2 turn together) at ~2**-28, and the final multiplication by 2π once: <= ~1.6e-6 rad in
    the worst case for every position below 2**31; measured 8.4e-7 rad (cos/sin 8.3e-7) over
    positions up to 2**31 - 1 and frequencies up to 1, against exact angles (``tests/test_scaling.py``).
    The terms of P2 and P1 come first so that kernels rotating consecutive positions that share
    ``p >> 12`` compute them once.
    """
    p = positions.to(torch.int64)
    p2 = ((p >> 24).to(torch.float32) * 16777216.0)[..., None]
    p1 = (((p >> 12) & 4095).to(torch.float32) * 4096.0)[..., None]
    p0 = (p & 4095).to(torch.float32)[..., None]
    f1, f2, f3, f4 = split[0], split[1], split[2], split[3]
    h = _reduce_turn(p2 * f1)
    h = _reduce_turn(h + _reduce_turn(p2 * f2))
    h = _reduce_turn(h + _reduce_turn(p2 * f3))
    h = _reduce_turn(h + _reduce_turn(p1 * f1))
    h = _reduce_turn(h + _reduce_turn(p1 * f2))
    small = p1 * f3 + (p2 * f4 + p1 * f4)
    s = _reduce_turn(h + _reduce_turn(p0 * f1))
    return _reduce_turn(s + (small + (p0 * f2 + (p0 * f3 + p0 * f4))))


class RopeConfig:
    """A rotary embedding and its scaling law.

    Args:
        head_dim: size D of each attention head.
        base: rotary base (``rope_theta``); default 10000, or ``scaling["rope_theta"]``.
        rotary_dim: number R of rotated channels (even, <= D); channels ``>= R`` pass through.
            Defaults to ``int(D * scaling["partial_rotary_factor"])`` or D.
        interleaved: pair channels (2i, 2i+1) (GPT-J/Meta) instead of (i, i + R/2) (HF/NeoX).
        scaling: ``None`` or a Hugging Face ``rope_parameters`` dict, e.g.
            ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}``.
        max_position_embeddings: the model's ``max_position_embeddings``; dynamic NTK's L, and the
            fallback for ``original_max_position_embeddings`` as in transformers.

    Raises ``ValueError`` naming the field for every invalid or unknown parameter.
    """

    def __init__(
        self,
        head_dim: int,
        base: float | None = None,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        scaling: Mapping[str, Any] | None = None,
        max_position_embeddings: int | None = None,
    ):
        self.head_dim = _int("head_dim", head_dim)
        if self.head_dim <= 0:
            raise _err("head_dim", f"must be positive, got {self.head_dim}")
        if not isinstance(interleaved, bool):
            raise TypeError(f"RopeConfig: `interleaved` must be a bool, got {interleaved!r}")
        self.interleaved = interleaved
        self.max_position_embeddings = _int("max_position_embeddings", max_position_embeddings, allow_none=True)
        if self.max_position_embeddings is not None and self.max_position_embeddings <= 0:
            raise _err("max_position_embeddings", f"must be positive, got {max_position_embeddings}")

        if scaling is not None and not isinstance(scaling, Mapping):
            raise TypeError(f"RopeConfig: `scaling` must be None or a dict, got {type(scaling).__name__}")
        params = dict(scaling or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if "rope_type" in params and "type" in params and params["type"] != params["rope_type"]:
            raise _err("scaling.type", f"{params['type']!r} contradicts rope_type {params['rope_type']!r}")
        law = law_class(rope_type)
        self.rope_type = law.rope_type
        law.check_keys(params)

        theta = _real("scaling.rope_theta", params.get("rope_theta"), allow_none=True)
        base = _real("base", base, allow_none=True)
        if base is not None and theta is not None and base != theta:
            raise _err("base", f"({base}) contradicts scaling.rope_theta ({theta})")
        self.base = base if base is not None else (theta if theta is not None else 10000.0)
        if self.base <= 0:
            raise _err("base", f"must be positive, got {self.base}")

        prf = _real("scaling.partial_rotary_factor", params.get("partial_rotary_factor"), allow_none=True)
        if prf is not None and not 0.0 < prf <= 1.0:
            raise _err("scaling.partial_rotary_factor", f"must be in (0, 1], got {prf}")
        rotary_dim = _int("rotary_dim", rotary_dim, allow_none=True)
        self.rotary_dim = law.resolve_rotary_dim(self.head_dim, rotary_dim, prf)

        # Every per-type decision (parameters, frequencies, magnitude, length dependence) is the law's.
        self._law: ScalingLaw = law(
            params,
            head_dim=self.head_dim,
            rotary_dim=self.rotary_dim,
            base=self.base,
            max_position_embeddings=self.max_position_embeddings,
            partial_rotary_factor=prf,
        )
        self.scaling = self._law.scaling
        self._cache: OrderedDict[Any, torch.Tensor] = OrderedDict()
        # Device copies of constant tables, keyed by (what, device): built once, so that a decode
        # step on a GPU issues no host-to-device copy for them.
        self._device_cache: dict[tuple[str, str], Any] = {}
        # Per-call tables of length-dependent types for host-side lengths, keyed by the lengths:
        # every layer of a model's step asks for the same ones (see tables()).
        self._length_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, config: Any) -> RopeConfig:
        """Build from a transformers ``PretrainedConfig`` or its dict (v4 or v5 form).

        Reads ``rope_parameters`` (v5) or ``rope_scaling`` + ``rope_theta`` (v4, ``type`` alias),
        ``partial_rotary_factor`` (or GPT-NeoX ``rotary_pct``, GPT-J ``rotary_dim``), ``head_dim``
        (or ``hidden_size // num_attention_heads``), ``max_position_embeddings`` and Phi-3's
        top-level ``original_max_position_embeddings``. GPT-J / CodeGen get interleaved pairs.
        """
        if isinstance(config, Mapping):
            data = dict(config)

            def get(key: str) -> Any:
                return data.get(key)
        else:

            def get(key: str) -> Any:
                return getattr(config, key, None)

        def positive(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"RopeConfig.from_hf: config `{key}` must be a positive integer, got {value!r}")
            return int(value)

        head_dim = get("head_dim")
        if head_dim is not None:
            head_dim = positive("head_dim", head_dim)
        else:
            # GPT-2 style names (GPT-J / CodeGen config.json): a config object maps them, a dict does not.
            hidden = get("hidden_size") if get("hidden_size") is not None else get("n_embd")
            heads = get("num_attention_heads") if get("num_attention_heads") is not None else get("n_head")
            if hidden is None or heads is None:
                raise ValueError(
                    "RopeConfig.from_hf: config needs `head_dim` or `hidden_size` and `num_attention_heads`"
                )
            hidden, heads = positive("hidden_size", hidden), positive("num_attention_heads", heads)
            if hidden % heads:
                raise ValueError(
                    f"RopeConfig.from_hf: config `hidden_size` ({hidden}) is not a multiple of "
                    f"`num_attention_heads` ({heads}), and there is no `head_dim`"
                )
            head_dim = hidden // heads
        model_type = get("model_type") or ""
        params = get("rope_parameters") or get("rope_scaling")
        params = dict(params) if params else {}
        if params and all(isinstance(v, Mapping) or v is None for v in params.values()):
            raise ValueError(
                "RopeConfig.from_hf: per-layer-type rope_parameters are not supported; pass one layer's dict"
            )
        if "rope_theta" not in params:
            theta = get("rope_theta")
            if theta is None:
                theta = get("rotary_emb_base")  # GPT-NeoX
            if theta is not None:
                params["rope_theta"] = theta
        if "partial_rotary_factor" not in params:
            prf = get("partial_rotary_factor")
            if prf is None:
                prf = get("rotary_pct")  # GPT-NeoX
            if prf is not None and prf != 1.0:
                params["partial_rotary_factor"] = prf
        rotary_dim = None
        interleaved = model_type in ("gptj", "codegen")
        if interleaved and get("rotary_dim") is not None:
            rotary_dim = get("rotary_dim")
        max_pos = get("max_position_embeddings")
        if max_pos is None:
            max_pos = get("n_positions")  # GPT-J
        rope_type = params.get("rope_type", params.get("type"))
        with contextlib.suppress(ValueError):  # an unknown type: the constructor names it
            params = law_class("default" if rope_type is None else rope_type).hf_params(params, get)
        return cls(
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            interleaved=interleaved,
            scaling=params or None,
            max_position_embeddings=max_pos,
        )

    # ------------------------------------------------------------------ properties
    @property
    def is_length_dependent(self) -> bool:
        """True when the frequencies depend on the sequence length (dynamic NTK, LongRoPE)."""
        return self._law.is_length_dependent

    @property
    def attention_factor(self) -> float:
        """Magnitude factor multiplying cos and sin (YaRN, LongRoPE); 1.0 for other types."""
        return self._law.attention_factor

    def state_key(self, seq_len: int | None = None) -> Any:
        """The scaling state a sequence of length ``seq_len`` uses (equal keys, equal tables)."""
        return self._law.state_key(seq_len)

    # ------------------------------------------------------------------ tables
    def inv_freq64(self, seq_len: int | None = None) -> torch.Tensor:
        """Inverse frequencies in float64 ``[rotary_dim // 2]`` on the CPU (cached per state)."""
        key = self.state_key(seq_len)
        table = self._cache.get(key)
        if table is None:
            table = self._law.inv_freq(key)
            self._cache[key] = table
            if len(self._cache) > _TABLE_CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):  # another thread may have evicted it meanwhile
                self._cache.move_to_end(key)
        return table

    def inv_freq(self, seq_len: int | None = None) -> torch.Tensor:
        """Inverse frequencies, float32 ``[rotary_dim // 2]`` on the CPU (as transformers stores them)."""
        return self.inv_freq64(seq_len).to(torch.float32)

    def tables(
        self, seq_lens: torch.Tensor | list[int] | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-call tables for the kernels and the reference.

        ``seq_lens``: the scaling length of each sequence (int ``[B]`` tensor or list), consulted
        only by length-dependent types; ``None`` means the type's base state. Returns
        ``(inv_freq64 [nT, R/2] float64, split [nT, 4, R/2] float32)`` on ``device`` with nT = 1
        (shared) or B (one table per sequence). A tensor ``seq_lens`` is turned into tables with
        device ops (no host synchronisation, traceable by torch.compile); shared tables are cached,
        and so are the per-sequence ones of lengths held on the host (a list or a CPU tensor) outside
        torch.compile, keyed by the lengths (the last ``_LENGTH_CACHE_SIZE`` sets, first in first out).
        """
        device = torch.device(device)
        if self.is_length_dependent and seq_lens is not None:
            if not isinstance(seq_lens, torch.Tensor):
                seq_lens = torch.tensor(list(seq_lens), dtype=torch.int64)

            def per_sequence():
                inv = self._inv_freq_per_sequence(seq_lens.to(device=device, dtype=torch.int64))
                return inv, split_turns(inv)

            if seq_lens.device.type != "cpu" or torch.compiler.is_compiling():
                return per_sequence()  # reading device lengths would synchronise
            # Every layer of a step asks for the same lengths; building the tables costs ~140 us
            # (dynamic NTK) / ~100 us (LongRoPE) of small tensor ops per call on a 2-core CPU.
            # First in, first out: the layers of a step use a set of lengths back to back, and no
            # get-then-reorder sequence can race with another thread's eviction.
            key = (str(device), tuple(seq_lens.tolist()))
            hit = self._length_cache.get(key)
            if hit is None:
                hit = self._length_cache[key] = per_sequence()
                if len(self._length_cache) > _LENGTH_CACHE_SIZE:
                    self._length_cache.popitem(last=False)
            return hit

        def shared():
            inv = self.inv_freq64(None)[None]
            return inv.to(device), split_turns(inv).to(device)

        return self._on_device("shared", device, shared)

    def _on_device(self, what: str, device: torch.device, build: Callable[[], Any]) -> Any:
        """``build()`` (tensors already on ``device``) once per (what, device)."""
        key = (what, str(device))
        hit = self._device_cache.get(key)
        if hit is None:
            hit = self._device_cache[key] = build()
        return hit

    def _inv_freq_per_sequence(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """float64 ``[B, R/2]``: the law's frequencies for the lengths int64 ``[B]`` (length-dependent types)."""
        device = seq_lens.device
        return self._law.inv_freq_per_sequence(seq_lens, lambda what, build: self._on_device(what, device, build))

    def cos_sin(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` of shape ``[*positions.shape, rotary_dim // 2]``, times ``attention_factor``.

        Angles are formed in float64, so the result is within fp32 rounding of the exact value at
        any position. For length-dependent types ``seq_len`` defaults to ``max(positions) + 1``.
        """
        if not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(positions)
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"cos_sin: `positions` must be an integer tensor, got {positions.dtype}")
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError("cos_sin: `positions` must be >= 0")
        if seq_len is None and self.is_length_dependent:
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
        inv = self.inv_freq64(seq_len)
        angle = positions.cpu().to(torch.float64)[..., None] * inv
        af = self.attention_factor
        cos, sin = torch.cos(angle) * af, torch.sin(angle) * af
        return cos.to(torch.float32).to(positions.device), sin.to(torch.float32).to(positions.device)

    # ------------------------------------------------------------------ misc
    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments, so ``RopeConfig(**cfg.to_dict())`` round-trips."""
        args = {
            "head_dim": self.head_dim,
            "base": self.base,
            "rotary_dim": self.rotary_dim,
            "interleaved": self.interleaved,
            "scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
        }
        return self._law.to_dict(args)

    def __repr__(self) -> str:
        extra = {k: v for k, v in self.scaling.items() if k != "rope_type" and not isinstance(v, tuple)}
        return (
            f"RopeConfig(type={self.rope_type!r}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"base={self.base:g}, interleaved={self.interleaved}, {extra})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RopeConfig) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def _identity(self) -> tuple:
        return (
            self.head_dim,
            self.rotary_dim,
            self.base,
            self.interleaved,
            tuple(sorted((k, v) for k, v in self.scaling.items())),
            self._law.identity(),
        )


class RopeTable:
    """A caller-supplied rotary table: cos/sin looked up by position instead of a named law.

    What flash-attn (``rotary_cos``/``rotary_sin``), FlashInfer (``apply_rope_with_cos_sin_cache``)
    and vLLM (``cos_sin_cache``) accept, for any law ropekern does not name (DeepSeek-YaRN's extra
    ``mscale``, vLLM's fixed "ntk", learned or multimodal tables). Every entry point takes it in
    place of a ``RopeConfig``; every backend indexes it by position (row ``p`` for position ``p``).

    Args:
        cos_sin: ``(cos, sin)``, float tensors ``[P, R/2]`` each, row p the cos/sin of every pair's
            angle at position p, already times any magnitude factor (nothing multiplies them); or a
            callable ``fn(seq_len: int) -> (cos, sin)`` for a length-dependent table, called with the
            call's scaling length (``seq_len=``, default ``max(k_positions) + 1`` over the whole
            batch, as transformers does) and cached per length (the last 8). Kept in float32 for the
            kernels (float64 tables also stay as given for the float64 reference path).
        head_dim: size D of each attention head.
        rotary_dim: R, default ``2 * cos.shape[1]``; required with a callable.
        interleaved: pairs (2i, 2i+1) (GPT-J/Meta) instead of (i, i + R/2) (HF/NeoX).

    Positions must be below the table's length P: every call checks it on the host (``ValueError``
    naming the position), except while ``torch.compile`` traces, when a position >= P is
    undefined behaviour as in the peers. Raises ``TypeError``/``ValueError`` naming the argument.
    """

    rope_type = "table"
    attention_factor = 1.0  # the table holds the magnitude
    scaling: Mapping[str, Any] = {"rope_type": "table"}

    def __init__(
        self,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        *,
        head_dim: int,
        rotary_dim: int | None = None,
        interleaved: bool = False,
    ):
        self.head_dim = _table_int("head_dim", head_dim)
        if self.head_dim <= 0:
            raise _table_err("head_dim", f"must be positive, got {self.head_dim}")
        if not isinstance(interleaved, bool):
            raise TypeError(f"RopeTable: `interleaved` must be a bool, got {interleaved!r}")
        self.interleaved = interleaved
        rotary_dim = None if rotary_dim is None else _table_int("rotary_dim", rotary_dim)
        self._fn: Callable[[int], Any] | None = None
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        if callable(cos_sin):
            if rotary_dim is None:
                raise _table_err("rotary_dim", "is required with a callable `cos_sin`")
            self._fn = cos_sin
        else:
            if not isinstance(cos_sin, (tuple, list)) or len(cos_sin) != 2:
                raise TypeError(
                    f"RopeTable: `cos_sin` must be a (cos, sin) pair of tensors or a callable, got "
                    f"{type(cos_sin).__name__}"
                )
            if rotary_dim is None and isinstance(cos_sin[0], torch.Tensor) and cos_sin[0].dim() == 2:
                rotary_dim = 2 * cos_sin[0].shape[1]
        if rotary_dim is None or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > self.head_dim:
            raise _table_err("rotary_dim", f"must be even and in [2, head_dim={self.head_dim}], got {rotary_dim}")
        self.rotary_dim = rotary_dim
        if self._fn is None:
            self._fixed = self._checked(cos_sin, "cos_sin")
        self._device_cache: dict[tuple[str, Any], tuple[torch.Tensor, torch.Tensor]] = {}
        self._length_cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _checked(self, pair: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` validated: float ``[P, R/2]`` each, P >= 1, same shape and device."""
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"RopeTable: `{what}` must give a (cos, sin) pair, got {type(pair).__name__}")
        cos, sin = pair
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RopeTable: `{what}` {name} must be a tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"RopeTable: `{what}` {name} must be a float tensor, got {t.dtype}")
            if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != self.rotary_dim // 2:
                raise ValueError(
                    f"RopeTable: `{what}` {name} must have shape [P >= 1, rotary_dim / 2 = {self.rotary_dim // 2}], "
                    f"got {list(t.shape)}"
                )
        if cos.shape != sin.shape or cos.device != sin.device:
            raise ValueError(
                f"RopeTable: `{what}` cos and sin differ: {list(cos.shape)} on {cos.device} vs "
                f"{list(sin.shape)} on {sin.device}"
            )
        dtype = torch.float64 if torch.float64 in (cos.dtype, sin.dtype) else torch.float32
        return cos.detach().to(dtype), sin.detach().to(dtype)

    @property
    def is_length_dependent(self) -> bool:
        """True for a callable table (built per scaling length)."""
        return self._fn is not None

    def state_key(self, seq_len: int | None = None) -> Any:
        return seq_len if self._fn is not None else None

    def _pair(self, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fn is None:
            return self._fixed
        n = int(seq_len or 0)
        hit = self._length_cache.get(n)
        if hit is None:
            hit = self._length_cache[n] = self._checked(self._fn(n), f"cos_sin({n})")
            if len(self._length_cache) > _LENGTH_CACHE_SIZE:
                self._length_cache.popitem(last=False)
        return hit

    def tables(
        self, seq_lens: torch.Tensor | list[int] | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reference [1, P, 2, R/2], kernel [P, 2, R/2] float32)`` on ``device``: row p holds the
        cos then the sin of position p. The reference table is float64 when the caller's was.

        A callable table is built once for the longest of ``seq_lens`` (one host read)."""
        device = torch.device(device)
        seq_len = None
        if self._fn is not None and seq_lens is not None:
            seq_len = max(seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens), default=0)
        key = (str(device), seq_len)
        hit = self._device_cache.get(key)
        if hit is None:
            cos, sin = self._pair(seq_len)
            ref = torch.stack((cos, sin), dim=1).to(device)
            hit = (ref[None], ref.to(torch.float32).contiguous())
            if self._fn is not None:
                self._device_cache.clear()  # one length at a time per device: tables can be large
            self._device_cache[key] = hit
        return hit

    def cos_sin(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` of shape ``[*positions.shape, rotary_dim // 2]`` (the table's rows)."""
        if not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(positions)
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"cos_sin: `positions` must be an integer tensor, got {positions.dtype}")
        if seq_len is None and self._fn is not None:
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = self._pair(seq_len)
        if positions.numel():
            check_table_positions(cos.shape[0], int(positions.max()), int(positions.min()))
        idx = positions.to(cos.device, torch.int64)
        return cos[idx].float().to(positions.device), sin[idx].float().to(positions.device)

    def __repr__(self) -> str:
        rows = "callable" if self._fn is not None else f"{self._fixed[0].shape[0]} positions"
        return (
            f"RopeTable({rows}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, interleaved={self.interleaved})"
        )


def check_table_positions(rows: int, max_position: int, min_position: int = 0) -> None:
    """``ValueError`` unless ``0 <= positions < rows`` (a caller's table has ``rows`` positions)."""
    if min_position < 0:
        raise ValueError(f"positions must be >= 0, got {min_position}")
    if max_position >= rows:
        raise ValueError(
            f"position {max_position} is past the end of the `rope` table ({rows} positions): "
            "pass a longer table, or a callable that builds one per length"
        )


def _table_err(field: str, msg: str) -> ValueError:
    return ValueError(f"RopeTable: `{field}` {msg}")


def _table_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"RopeTable: `{field}` must be an integer, got {value!r}")
    return int(value)
