"""RoPE scaling laws as host-side data (docs/design.md §3).

Every scaling type reduces to a vector of inverse frequencies (radians per position) and one
magnitude factor. They are computed here in float64, once per (config, scaling state), and handed
to the kernels as data, so a new scaling law never needs a new kernel.

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

__all__ = [
    "ROPE_TYPES",
    "RopeConfig",
    "split_turns",
    "SPLIT_ROWS",
    "angle_turns_fp32",
    "MAX_POSITION",
]

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3", "proportional")

# Positions are carried as int32 by every kernel; the accurate-angle scheme keeps cos/sin within
# 2e-6 of exact up to this bound (angle_turns_fp32).
MAX_POSITION = 2**31 - 1

_TYPE_ALIASES = {"su": "longrope"}  # Phi-3's pre-release name for LongRoPE.

_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_TYPE_KEYS: dict[str, set[str]] = {
    "default": set(),
    "linear": {"factor"},
    "ntk": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "longrope": {
        "short_factor",
        "long_factor",
        "original_max_position_embeddings",
        "factor",
        "attention_factor",
    },
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "proportional": {"factor"},
}
_REQUIRED_KEYS: dict[str, set[str]] = {
    "linear": {"factor"},
    "ntk": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor"},
    "longrope": {"short_factor", "long_factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor"},
}

_TWO_PI = 2.0 * math.pi
_TABLE_CACHE_SIZE = 64
_LENGTH_CACHE_SIZE = 8


def _err(field: str, msg: str) -> ValueError:
    return ValueError(f"RopeConfig: `{field}` {msg}")


def _real(field: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise _err(field, "is required")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _err(field, f"must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _err(field, f"must be finite, got {value!r}")
    return value


def _int(field: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None:
        if allow_none:
            return None
        raise _err(field, "is required")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _err(field, f"must be an integer, got {value!r}")
    return int(value)


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
        rope_type = _TYPE_ALIASES.get(rope_type, rope_type)
        if rope_type not in ROPE_TYPES:
            raise _err("scaling.rope_type", f"is unknown: {rope_type!r}; expected one of {ROPE_TYPES}")
        self.rope_type = rope_type
        unknown = set(params) - _COMMON_KEYS - _TYPE_KEYS[rope_type]
        if unknown:
            allowed = sorted(_COMMON_KEYS | _TYPE_KEYS[rope_type])
            raise _err(
                f"scaling.{sorted(unknown)[0]}", f"is not a parameter of rope_type {rope_type!r}; allowed: {allowed}"
            )
        missing = _REQUIRED_KEYS.get(rope_type, set()) - set(params)
        if missing:
            raise _err(f"scaling.{sorted(missing)[0]}", f"is required for rope_type {rope_type!r}")

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
        if rope_type == "proportional":
            # transformers defines proportional RoPE over the whole head: the first
            # int(prf * D // 2) frequencies rotate, the rest are zero (identity rotations).
            if rotary_dim is not None and rotary_dim != self.head_dim:
                raise _err("rotary_dim", "must be None or head_dim for proportional RoPE (use partial_rotary_factor)")
            self._rope_angles = int((prf if prf is not None else 1.0) * self.head_dim // 2)
            rotary_dim = self.head_dim
        elif prf is not None:
            implied = int(self.head_dim * prf)
            if rotary_dim is not None and rotary_dim != implied:
                raise _err(
                    "rotary_dim", f"({rotary_dim}) contradicts partial_rotary_factor {prf} (rotary_dim {implied})"
                )
            rotary_dim = implied
        if rotary_dim is None:
            rotary_dim = self.head_dim
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > self.head_dim:
            raise _err("rotary_dim", f"must be even and in [2, head_dim={self.head_dim}], got {rotary_dim}")
        self.rotary_dim = rotary_dim
        if rope_type in ("ntk", "dynamic") and rotary_dim < 4:
            raise _err("rotary_dim", f"must be >= 4 for {rope_type} (its exponent is R/(R-2)), got {rotary_dim}")

        self.scaling = self._validate_params(rope_type, params)
        self._cache: OrderedDict[Any, torch.Tensor] = OrderedDict()
        # Device copies of constant tables, keyed by (what, device): built once, so that a decode
        # step on a GPU issues no host-to-device copy for them.
        self._device_cache: dict[tuple[str, str], Any] = {}
        # Per-call tables of length-dependent types for host-side lengths, keyed by the lengths:
        # every layer of a model's step asks for the same ones (see tables()).
        self._length_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    # ------------------------------------------------------------------ validation
    def _original_len(self, params: Mapping[str, Any]) -> int:
        value = params.get("original_max_position_embeddings")
        if value is None:
            value = self.max_position_embeddings
        if value is None:
            raise _err(
                "scaling.original_max_position_embeddings",
                f"is required for rope_type {self.rope_type!r} (or pass max_position_embeddings)",
            )
        value = _int("scaling.original_max_position_embeddings", value)
        if value <= 0:
            raise _err("scaling.original_max_position_embeddings", f"must be positive, got {value}")
        return value

    def _factor(self, params: Mapping[str, Any], original: int | None = None) -> float:
        factor = params.get("factor")
        if factor is None and original is not None and self.max_position_embeddings is not None:
            # transformers: DeepSeek-V3 / Phi-3 derive the factor from the two lengths.
            return self.max_position_embeddings / original
        factor = _real("scaling.factor", factor)
        if factor < 1.0:
            raise _err("scaling.factor", f"must be >= 1, got {factor}")
        return factor

    def _validate_params(self, rope_type: str, params: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": rope_type}
        half = self.rotary_dim // 2
        if rope_type in ("linear", "ntk"):
            out["factor"] = self._factor(params)
        elif rope_type == "dynamic":
            out["factor"] = self._factor(params)
            length = self.max_position_embeddings
            if length is None and params.get("original_max_position_embeddings") is not None:
                length = self._original_len(params)
            if length is None:
                raise _err("max_position_embeddings", "is required for dynamic NTK (its L)")
            out["max_position_embeddings"] = length
        elif rope_type == "yarn":
            original = self._original_len(params)
            out["original_max_position_embeddings"] = original
            out["factor"] = self._factor(params, original)
            af = _real("scaling.attention_factor", params.get("attention_factor"), allow_none=True)
            if af is not None and af < 0:
                raise _err("scaling.attention_factor", f"must be >= 0, got {af}")
            # transformers reads beta_fast/beta_slow with `or`: 0 and None both mean the default.
            beta_fast = _real("scaling.beta_fast", params.get("beta_fast"), allow_none=True) or 32.0
            beta_slow = _real("scaling.beta_slow", params.get("beta_slow"), allow_none=True) or 1.0
            if beta_fast < beta_slow:
                raise _err("scaling.beta_fast", f"({beta_fast}) must be >= beta_slow ({beta_slow})")
            mscale = _real("scaling.mscale", params.get("mscale"), allow_none=True)
            mscale_all_dim = _real("scaling.mscale_all_dim", params.get("mscale_all_dim"), allow_none=True)
            truncate = params.get("truncate", True)
            if not isinstance(truncate, bool):
                raise _err("scaling.truncate", f"must be a bool, got {truncate!r}")
            out.update(
                attention_factor=af,
                beta_fast=beta_fast,
                beta_slow=beta_slow,
                mscale=mscale,
                mscale_all_dim=mscale_all_dim,
                truncate=truncate,
            )
        elif rope_type == "longrope":
            original = self._original_len(params)
            out["original_max_position_embeddings"] = original
            for key in ("short_factor", "long_factor"):
                values = params[key]
                if isinstance(values, torch.Tensor):
                    values = values.tolist()
                if not isinstance(values, (list, tuple)):
                    raise _err(f"scaling.{key}", f"must be a list of numbers, got {type(values).__name__}")
                if len(values) != half:
                    raise _err(f"scaling.{key}", f"must have rotary_dim/2 = {half} entries, got {len(values)}")
                values = [_real(f"scaling.{key}", v) for v in values]
                if any(v <= 0 for v in values):
                    raise _err(f"scaling.{key}", "entries must be positive")
                out[key] = tuple(values)
            if params.get("factor") is None and self.max_position_embeddings is None:
                factor = None  # transformers would fail; the magnitude factor then defaults to 1.
            else:
                factor = self._factor(params, original)
            out["factor"] = factor
            af = _real("scaling.attention_factor", params.get("attention_factor"), allow_none=True)
            if af is not None and af < 0:
                raise _err("scaling.attention_factor", f"must be >= 0, got {af}")
            out["attention_factor"] = af
        elif rope_type == "llama3":
            out["original_max_position_embeddings"] = self._original_len(params)
            out["factor"] = self._factor(params)
            low = _real("scaling.low_freq_factor", params["low_freq_factor"])
            high = _real("scaling.high_freq_factor", params["high_freq_factor"])
            if low <= 0:
                raise _err("scaling.low_freq_factor", f"must be positive, got {low}")
            if high <= low:
                raise _err("scaling.high_freq_factor", f"({high}) must be > low_freq_factor ({low})")
            out.update(low_freq_factor=low, high_freq_factor=high)
        elif rope_type == "proportional":
            factor = _real("scaling.factor", params.get("factor", 1.0))
            if factor < 1.0:
                raise _err("scaling.factor", f"must be >= 1, got {factor}")
            out["factor"] = factor
        return out

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
        rope_type = _TYPE_ALIASES.get(
            params.get("rope_type", params.get("type")), params.get("rope_type", params.get("type"))
        )
        original = get("original_max_position_embeddings")
        if rope_type in ("llama3", "yarn", "longrope") and original is not None:
            params["original_max_position_embeddings"] = original  # Phi-3: the top-level value wins
        if rope_type is None or rope_type == "default":
            params = {k: v for k, v in params.items() if k in _COMMON_KEYS and k != "type"}
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
        return self.rope_type in ("dynamic", "longrope")

    @property
    def attention_factor(self) -> float:
        """Magnitude factor multiplying cos and sin (YaRN, LongRoPE); 1.0 for other types."""
        s = self.scaling
        if self.rope_type == "yarn":
            if s["attention_factor"] is not None:
                return s["attention_factor"]
            factor = s["factor"]

            def mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if s["mscale"] and s["mscale_all_dim"]:
                return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
            return mscale(factor)
        if self.rope_type == "longrope":
            if s["attention_factor"] is not None:
                return s["attention_factor"]
            factor = s["factor"]
            if factor is None or factor <= 1.0:
                return 1.0
            return math.sqrt(1.0 + math.log(factor) / math.log(s["original_max_position_embeddings"]))
        return 1.0

    def state_key(self, seq_len: int | None = None) -> Any:
        """The scaling state a sequence of length ``seq_len`` uses (equal keys, equal tables)."""
        if self.rope_type == "dynamic":
            length = self.scaling["max_position_embeddings"]
            return length if seq_len is None else max(int(seq_len), length)
        if self.rope_type == "longrope":
            return bool(seq_len) and seq_len > self.scaling["original_max_position_embeddings"]
        return None

    # ------------------------------------------------------------------ tables
    def inv_freq64(self, seq_len: int | None = None) -> torch.Tensor:
        """Inverse frequencies in float64 ``[rotary_dim // 2]`` on the CPU (cached per state)."""
        key = self.state_key(seq_len)
        table = self._cache.get(key)
        if table is None:
            table = self._compute_inv_freq(key)
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

    def _exponents(self, dim: int, count: int) -> torch.Tensor:
        return torch.arange(0, 2 * count, 2, dtype=torch.float64) / dim

    def _compute_inv_freq(self, key: Any) -> torch.Tensor:
        s, R, base = self.scaling, self.rotary_dim, self.base
        half = R // 2
        t = self.rope_type
        if t == "proportional":
            inv = torch.zeros(half, dtype=torch.float64)
            n = self._rope_angles
            inv[:n] = 1.0 / torch.pow(torch.tensor(base, dtype=torch.float64), self._exponents(self.head_dim, n))
            return inv / s["factor"]
        exps = self._exponents(R, half)
        if t == "ntk":
            base = base * s["factor"] ** (R / (R - 2))
        elif t == "dynamic":
            length = s["max_position_embeddings"]
            base = base * (s["factor"] * key / length - (s["factor"] - 1)) ** (R / (R - 2))
        inv = 1.0 / torch.pow(torch.tensor(base, dtype=torch.float64), exps)
        if t == "linear":
            inv = inv / s["factor"]
        elif t == "yarn":
            inv = self._yarn(inv, base)
        elif t == "longrope":
            ext = torch.tensor(s["long_factor"] if key else s["short_factor"], dtype=torch.float64)
            inv = inv / ext
        elif t == "llama3":
            inv = self._llama3(inv)
        return inv

    def _yarn(self, inv: torch.Tensor, base: float) -> torch.Tensor:
        s, R = self.scaling, self.rotary_dim
        original = s["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:
            return (R * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
        if s["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, R - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = ((torch.arange(R // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1.0 - ramp
        return (inv / s["factor"]) * ramp + inv * extrapolation

    def _llama3(self, inv: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        original = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smoothed, scaled)

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
        """float64 ``[B, R/2]`` for length-dependent types, computed with device tensor ops."""
        s, R, dev = self.scaling, self.rotary_dim, seq_lens.device
        if self.rope_type == "longrope":
            orig = s["original_max_position_embeddings"]
            short, long = self._on_device(
                "longrope", dev, lambda: (self.inv_freq64(None).to(dev), self.inv_freq64(orig + 1).to(dev))
            )
            return torch.where((seq_lens > orig)[:, None], long, short)
        length = s["max_position_embeddings"]
        ell = seq_lens.clamp_min(length).to(torch.float64)
        base = self.base * (s["factor"] * ell / length - (s["factor"] - 1)) ** (R / (R - 2))
        exps = self._on_device("exponents", dev, lambda: self._exponents(R, R // 2).to(dev))
        return 1.0 / torch.pow(base[:, None], exps[None, :])

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
        scaling = None
        if self.rope_type != "default":
            scaling = {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in self.scaling.items()
                if v is not None and k != "max_position_embeddings"
            }
            if self.rope_type == "proportional":
                scaling["partial_rotary_factor"] = 2 * self._rope_angles / self.head_dim
        return {
            "head_dim": self.head_dim,
            "base": self.base,
            "rotary_dim": None if self.rope_type == "proportional" else self.rotary_dim,
            "interleaved": self.interleaved,
            "scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings
            if self.rope_type != "dynamic"
            else self.scaling["max_position_embeddings"],
        }

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
            getattr(self, "_rope_angles", None),
        )
