"""The RoPE scaling laws, one class per ``rope_type`` (docs/design.md §3).

A law owns everything that differs between scaling types: its parameter keys and their
validation, its float64 inverse frequencies, its magnitude (attention) factor, whether and how it
depends on the sequence length, its ``to_dict`` / ``from_hf`` specifics and a canonical example.
``RopeConfig`` validates what is common to every type (head size, base, rotary channels) and asks
its law for the rest; the kernels see only the resulting tables, so a new law is one subclass of
``ScalingLaw`` (it registers itself under its ``rope_type``) and no kernel change.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

__all__ = ["COMMON_KEYS", "LAWS", "ROPE_TYPES", "ScalingLaw", "law_class"]

# Keys every rope_type accepts: the type itself (``type`` is transformers v4's name), the base and
# the rotated fraction of the head.
COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})

LAWS: dict[str, type[ScalingLaw]] = {}  # rope_type -> law, filled by ScalingLaw.__init_subclass__
_TYPE_ALIASES: dict[str, str] = {}  # other names of a rope_type (ScalingLaw.aliases)


def _err(field: str, msg: str) -> ValueError:
    return ValueError(f"RopeConfig: `{field}` {msg}")


def _absent(field: str, value: Any, allow_none: bool) -> bool:
    """True when ``value`` is None and may be; ``ValueError`` when it is None and may not."""
    if value is None and not allow_none:
        raise _err(field, "is required")
    return value is None


def _real(field: str, value: Any, *, allow_none: bool = False) -> float | None:
    if _absent(field, value, allow_none):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _err(field, f"must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _err(field, f"must be finite, got {value!r}")
    return value


def _int(field: str, value: Any, *, allow_none: bool = False) -> int | None:
    if _absent(field, value, allow_none):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _err(field, f"must be an integer, got {value!r}")
    return int(value)


def _exponents(dim: int, count: int) -> torch.Tensor:
    """float64 ``[count]``: ``2i / dim``, the exponent of the base for frequency i."""
    return torch.arange(0, 2 * count, 2, dtype=torch.float64) / dim


def _power_inv_freq(base: float, exponents: torch.Tensor) -> torch.Tensor:
    """float64 ``base ** -exponents``, the unscaled RoPE frequencies (radians per position)."""
    return 1.0 / torch.pow(torch.tensor(base, dtype=torch.float64), exponents)


def _ramp(count: int, start: float, stop: float) -> list[float]:
    """``count`` values rising linearly from ``start`` to ``stop`` (``[start]`` when count is 1)."""
    return [start + (stop - start) * i / max(1, count - 1) for i in range(count)]


def law_class(rope_type: Any) -> type[ScalingLaw]:
    """The law registered under ``rope_type`` (or one of its aliases); ``ValueError`` if none is."""
    rope_type = _TYPE_ALIASES.get(rope_type, rope_type)
    if rope_type not in LAWS:
        raise _err("scaling.rope_type", f"is unknown: {rope_type!r}; expected one of {tuple(LAWS)}")
    return LAWS[rope_type]


class ScalingLaw:
    """One RoPE scaling law, bound to a config's geometry and validated parameters.

    A subclass that sets ``rope_type`` registers itself in ``LAWS`` on definition. It declares its
    parameter ``keys`` (and the ``required`` ones), validates them in ``validate``, computes its
    frequencies in ``inv_freq`` and, where they apply, overrides ``magnitude``,
    ``state_key`` (with ``is_length_dependent``), ``inv_freq_per_sequence``, ``to_dict``,
    ``hf_params`` and ``resolve_rotary_dim``. ``example`` gives the canonical configuration used
    by the tests, ``ropekern check`` and the benchmarks.

    Args (all validated by ``RopeConfig`` beforehand):
        params: the ``scaling`` dict as passed (keys already checked by ``check_keys``).
        head_dim: D; rotary_dim: R (even, 2 <= R <= D); base: the rotary base (> 0).
        max_position_embeddings: the model's length, or None.
        partial_rotary_factor: ``scaling["partial_rotary_factor"]`` as a float, or None.

    Attributes: the arguments above but ``params``, and ``scaling``, the validated parameters
    (``{"rope_type": ..., **validate(params)}``; ``RopeConfig.scaling`` is this dict).
    """

    rope_type: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    keys: ClassVar[frozenset[str]] = frozenset()  # parameters beside COMMON_KEYS
    required: ClassVar[frozenset[str]] = frozenset()
    is_length_dependent: ClassVar[bool] = False
    # transformers' from_hf reads a top-level `original_max_position_embeddings` (Phi-3) into
    # these laws' parameters, where it wins over the one in rope_parameters.
    top_level_original: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "rope_type" not in cls.__dict__:
            return  # an abstract helper class: nothing to register
        aliases = cls.__dict__.get("aliases", ())  # a subclass of a registered law has its own names
        for name in (cls.rope_type, *aliases):
            if not isinstance(name, str) or not name:
                raise TypeError(f"{cls.__name__}: `rope_type` and `aliases` must be non-empty strings, got {name!r}")
            if name in LAWS or name in _TYPE_ALIASES:
                raise ValueError(f"{cls.__name__}: `rope_type` {name!r} is already registered")
        LAWS[cls.rope_type] = cls
        _TYPE_ALIASES.update(dict.fromkeys(aliases, cls.rope_type))

    def __init__(
        self,
        params: Mapping[str, Any],
        *,
        head_dim: int,
        rotary_dim: int,
        base: float,
        max_position_embeddings: int | None,
        partial_rotary_factor: float | None,
    ):
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = base
        self.max_position_embeddings = max_position_embeddings
        self.partial_rotary_factor = partial_rotary_factor
        self.scaling: dict[str, Any] = {"rope_type": self.rope_type, **self.validate(params)}

    # ------------------------------------------------------------------ parameters
    @classmethod
    def check_keys(cls, params: Mapping[str, Any]) -> None:
        """``ValueError`` naming the first unknown key of ``params``, else the first missing one."""
        unknown = set(params) - COMMON_KEYS - cls.keys
        if unknown:
            allowed = sorted(COMMON_KEYS | cls.keys)
            raise _err(
                f"scaling.{sorted(unknown)[0]}",
                f"is not a parameter of rope_type {cls.rope_type!r}; allowed: {allowed}",
            )
        missing = cls.required - set(params)
        if missing:
            raise _err(f"scaling.{sorted(missing)[0]}", f"is required for rope_type {cls.rope_type!r}")

    @classmethod
    def resolve_rotary_dim(cls, head_dim: int, rotary_dim: int | None, partial_rotary_factor: float | None) -> int:
        """The rotated channels R from the ``rotary_dim`` argument (None: unset) and the partial
        rotary factor: R = int(D * factor), else D; ``ValueError`` if they disagree or R is odd,
        below 2 or above D."""
        if partial_rotary_factor is not None:
            implied = int(head_dim * partial_rotary_factor)
            if rotary_dim is not None and rotary_dim != implied:
                raise _err(
                    "rotary_dim",
                    f"({rotary_dim}) contradicts partial_rotary_factor {partial_rotary_factor} (rotary_dim {implied})",
                )
            rotary_dim = implied
        if rotary_dim is None:
            rotary_dim = head_dim
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise _err("rotary_dim", f"must be even and in [2, head_dim={head_dim}], got {rotary_dim}")
        return rotary_dim

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """This law's validated parameters (normalised types, defaults filled in), in the order
        ``RopeConfig.scaling`` lists them; ``ValueError`` naming the first invalid one."""
        return {}

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

    @staticmethod
    def _valid_attention_factor(params: Mapping[str, Any]) -> float | None:
        af = _real("scaling.attention_factor", params.get("attention_factor"), allow_none=True)
        if af is not None and af < 0:
            raise _err("scaling.attention_factor", f"must be >= 0, got {af}")
        return af

    # ------------------------------------------------------------------ frequencies
    def inv_freq(self, key: Any) -> torch.Tensor:
        """float64 ``[R/2]`` inverse frequencies (radians per position) of scaling state ``key``."""
        raise NotImplementedError(f"{type(self).__name__} must define inv_freq")

    def _rotary_inv_freq(self, base: float | None = None) -> torch.Tensor:
        """float64 ``[R/2]``: ``base ** (-2i/R)``, the unscaled frequencies (``base``: the config's)."""
        return _power_inv_freq(self.base if base is None else base, _exponents(self.rotary_dim, self.rotary_dim // 2))

    @property
    def attention_factor(self) -> float:
        """Magnitude factor multiplying cos and sin: the ``attention_factor`` parameter where the
        law has one and it is set (transformers' override), else ``magnitude()``."""
        explicit = self.scaling.get("attention_factor")
        return explicit if explicit is not None else self.magnitude()

    def magnitude(self) -> float:
        """The law's own magnitude factor; 1.0 unless it rescales cos and sin."""
        return 1.0

    def state_key(self, seq_len: int | None) -> Any:
        """The scaling state of a sequence of length ``seq_len`` (None: the base state); equal
        keys give equal frequencies. Length-independent laws have one state, ``None``."""
        return None

    def inv_freq_per_sequence(
        self, seq_lens: torch.Tensor, on_device: Callable[[str, Callable[[], Any]], Any]
    ) -> torch.Tensor:
        """float64 ``[B, R/2]`` for the lengths int64 ``[B]`` (length-dependent laws only).

        ``on_device(name, build)`` returns ``build()`` (tensors on ``seq_lens.device``), built once
        per config and device. This fallback reads the lengths on the host; the built-in laws
        override it with device ops, which need no synchronisation and trace under torch.compile.
        """
        rows = [self.inv_freq(self.state_key(n)) for n in seq_lens.tolist()]
        table = torch.stack(rows) if rows else torch.empty(0, self.rotary_dim // 2, dtype=torch.float64)
        return table.to(seq_lens.device)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args``: the config's constructor arguments without the law's part; fills in
        ``args["scaling"]`` (and whatever else the law stores differently) and returns it."""
        args["scaling"] = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in self.scaling.items() if v is not None
        }
        return args

    @classmethod
    def hf_params(cls, params: dict[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
        """The ``scaling`` dict from a transformers config: ``params`` is its ``rope_parameters``
        (with ``rope_theta`` and ``partial_rotary_factor`` filled in), ``get(key)`` reads the config."""
        original = get("original_max_position_embeddings")
        if cls.top_level_original and original is not None:
            params["original_max_position_embeddings"] = original  # Phi-3: the top-level value wins
        return params

    def identity(self) -> Any:
        """What, beyond ``scaling`` and the geometry, tells two configs of this law apart."""
        return None

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        """``RopeConfig`` keyword arguments (``scaling``, and ``max_position_embeddings`` where
        the law reads it) of the canonical example for ``rotary_dim`` rotated channels, whose
        behaviour changes at ``length`` tokens; pass head_dim, base, rotary_dim and interleaved
        beside them."""
        raise NotImplementedError(f"{cls.__name__} must define example")


class Default(ScalingLaw):
    """Plain RoPE: ``base ** (-2i/R)``."""

    rope_type = "default"

    def inv_freq(self, key: Any) -> torch.Tensor:
        return self._rotary_inv_freq()

    def to_dict(self, args: dict[str, Any]) -> dict[str, Any]:
        args["scaling"] = None
        return args

    @classmethod
    def hf_params(cls, params: dict[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
        # Plain RoPE has no parameters of its own: whatever else rope_parameters carries (the v4
        # `type` included) does not apply to it.
        return {k: v for k, v in params.items() if k in COMMON_KEYS and k != "type"}

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        return {}


class Linear(ScalingLaw):
    """Position Interpolation: every frequency divided by ``factor``."""

    rope_type = "linear"
    keys = required = frozenset({"factor"})

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"factor": self._factor(params)}

    def inv_freq(self, key: Any) -> torch.Tensor:
        return self._rotary_inv_freq() / self.scaling["factor"]

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        return {"scaling": {"rope_type": cls.rope_type, "factor": 4.0}}


class Ntk(ScalingLaw):
    """Static NTK-aware scaling: the base becomes ``base * factor ** (R / (R - 2))``."""

    rope_type = "ntk"
    keys = required = frozenset({"factor"})

    @classmethod
    def resolve_rotary_dim(cls, head_dim: int, rotary_dim: int | None, partial_rotary_factor: float | None) -> int:
        rotary_dim = super().resolve_rotary_dim(head_dim, rotary_dim, partial_rotary_factor)
        if rotary_dim < 4:
            raise _err("rotary_dim", f"must be >= 4 for {cls.rope_type} (its exponent is R/(R-2)), got {rotary_dim}")
        return rotary_dim

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"factor": self._factor(params)}

    def inv_freq(self, key: Any) -> torch.Tensor:
        R = self.rotary_dim
        return self._rotary_inv_freq(self.base * self.scaling["factor"] ** (R / (R - 2)))

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        return {"scaling": {"rope_type": cls.rope_type, "factor": 4.0}}


class Dynamic(Ntk):
    """Dynamic NTK: NTK's base grows with the length ℓ = max(seq_len, L) past the model's L,
    ``base * (factor * ℓ / L - (factor - 1)) ** (R / (R - 2))``; the state key is ℓ."""

    rope_type = "dynamic"
    keys = frozenset({"factor", "original_max_position_embeddings"})
    required = frozenset({"factor"})
    is_length_dependent = True

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        factor = self._factor(params)
        length = self.max_position_embeddings
        if length is None and params.get("original_max_position_embeddings") is not None:
            length = self._original_len(params)
        if length is None:
            raise _err("max_position_embeddings", "is required for dynamic NTK (its L)")
        return {"factor": factor, "max_position_embeddings": length}

    def state_key(self, seq_len: int | None) -> Any:
        length = self.scaling["max_position_embeddings"]
        return length if seq_len is None else max(int(seq_len), length)

    def _scaled_base(self, ell: Any) -> Any:
        """The base at length ``ell`` (a float, or a float64 tensor of lengths)."""
        s, R = self.scaling, self.rotary_dim
        return self.base * (s["factor"] * ell / s["max_position_embeddings"] - (s["factor"] - 1)) ** (R / (R - 2))

    def inv_freq(self, key: Any) -> torch.Tensor:
        return self._rotary_inv_freq(self._scaled_base(key))

    def inv_freq_per_sequence(
        self, seq_lens: torch.Tensor, on_device: Callable[[str, Callable[[], Any]], Any]
    ) -> torch.Tensor:
        ell = seq_lens.clamp_min(self.scaling["max_position_embeddings"]).to(torch.float64)
        R, dev = self.rotary_dim, seq_lens.device
        exps = on_device("exponents", lambda: _exponents(R, R // 2).to(dev))
        return 1.0 / torch.pow(self._scaled_base(ell)[:, None], exps[None, :])

    def to_dict(self, args: dict[str, Any]) -> dict[str, Any]:
        args = super().to_dict(args)
        args["max_position_embeddings"] = args["scaling"].pop("max_position_embeddings")  # its L
        return args

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        return {"scaling": {"rope_type": cls.rope_type, "factor": 4.0}, "max_position_embeddings": length}


class Yarn(ScalingLaw):
    """YaRN: frequencies blend from unscaled (fast, > ``beta_fast`` turns over the original
    length) to divided by ``factor`` (slow, < ``beta_slow`` turns) along a linear ramp, and the
    magnitude grows as ``0.1 ln(factor) + 1``."""

    rope_type = "yarn"
    keys = frozenset(
        {
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        }
    )
    required = frozenset({"factor"})
    top_level_original = True

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        original = self._original_len(params)
        out: dict[str, Any] = {"original_max_position_embeddings": original, "factor": self._factor(params, original)}
        af = self._valid_attention_factor(params)
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
        return out

    def inv_freq(self, key: Any) -> torch.Tensor:
        s, R, base = self.scaling, self.rotary_dim, self.base
        inv = self._rotary_inv_freq()
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

    def magnitude(self) -> float:
        s = self.scaling
        factor = s["factor"]

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if s["mscale"] and s["mscale_all_dim"]:
            return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        return mscale(factor)

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        return {"scaling": {"rope_type": cls.rope_type, "factor": 8.0, "original_max_position_embeddings": length}}


class LongRope(ScalingLaw):
    """LongRoPE (Phi-3): every frequency divided by its own rescale factor, ``short_factor``
    up to the original length L0 and ``long_factor`` past it (strictly); the magnitude grows as
    ``sqrt(1 + ln(factor) / ln(L0))``. The state key is ``seq_len > L0``."""

    rope_type = "longrope"
    aliases = ("su",)  # Phi-3's pre-release name
    keys = frozenset({"short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"})
    required = frozenset({"short_factor", "long_factor"})
    is_length_dependent = True
    top_level_original = True

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        half = self.rotary_dim // 2
        original = self._original_len(params)
        out: dict[str, Any] = {"original_max_position_embeddings": original}
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
        out["attention_factor"] = self._valid_attention_factor(params)
        return out

    def state_key(self, seq_len: int | None) -> Any:
        return bool(seq_len) and seq_len > self.scaling["original_max_position_embeddings"]

    def inv_freq(self, key: Any) -> torch.Tensor:
        s = self.scaling
        ext = torch.tensor(s["long_factor"] if key else s["short_factor"], dtype=torch.float64)
        return self._rotary_inv_freq() / ext

    def inv_freq_per_sequence(
        self, seq_lens: torch.Tensor, on_device: Callable[[str, Callable[[], Any]], Any]
    ) -> torch.Tensor:
        dev = seq_lens.device
        short, long = on_device("longrope", lambda: (self.inv_freq(False).to(dev), self.inv_freq(True).to(dev)))
        return torch.where((seq_lens > self.scaling["original_max_position_embeddings"])[:, None], long, short)

    def magnitude(self) -> float:
        s = self.scaling
        factor = s["factor"]
        if factor is None or factor <= 1.0:
            return 1.0
        return math.sqrt(1.0 + math.log(factor) / math.log(s["original_max_position_embeddings"]))

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        # Phi-3-mini-128k's shape: factor 32, short factors near 1, long ones rising to 16.
        half = rotary_dim // 2
        return {
            "scaling": {
                "rope_type": cls.rope_type,
                "short_factor": _ramp(half, 1.0, 1.5),
                "long_factor": _ramp(half, 1.0, 16.0),
                "original_max_position_embeddings": length,
                "factor": 32.0,
            }
        }


class Llama3(ScalingLaw):
    """Llama 3.1: wavelengths above ``L0 / low_freq_factor`` are divided by ``factor``, those
    below ``L0 / high_freq_factor`` kept, the band between blended smoothly."""

    rope_type = "llama3"
    keys = frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
    required = frozenset({"factor", "low_freq_factor", "high_freq_factor"})
    top_level_original = True

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"original_max_position_embeddings": self._original_len(params)}
        out["factor"] = self._factor(params)
        low = _real("scaling.low_freq_factor", params["low_freq_factor"])
        high = _real("scaling.high_freq_factor", params["high_freq_factor"])
        if low <= 0:
            raise _err("scaling.low_freq_factor", f"must be positive, got {low}")
        if high <= low:
            raise _err("scaling.high_freq_factor", f"({high}) must be > low_freq_factor ({low})")
        out.update(low_freq_factor=low, high_freq_factor=high)
        return out

    def inv_freq(self, key: Any) -> torch.Tensor:
        s = self.scaling
        inv = self._rotary_inv_freq()
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        original = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smoothed, scaled)

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        return {
            "scaling": {
                "rope_type": cls.rope_type,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": length,
            }
        }


class Proportional(ScalingLaw):
    """Proportional RoPE, defined over the whole head as in transformers: the first
    ``int(partial_rotary_factor * D // 2)`` frequencies are ``base ** (-2i/D) / factor``, the
    rest zero (identity rotations), so ``rotary_dim`` is D."""

    rope_type = "proportional"
    keys = frozenset({"factor"})

    @classmethod
    def resolve_rotary_dim(cls, head_dim: int, rotary_dim: int | None, partial_rotary_factor: float | None) -> int:
        if rotary_dim is not None and rotary_dim != head_dim:
            raise _err("rotary_dim", "must be None or head_dim for proportional RoPE (use partial_rotary_factor)")
        return super().resolve_rotary_dim(head_dim, head_dim, None)

    def __init__(self, params: Mapping[str, Any], **geometry: Any):
        super().__init__(params, **geometry)
        prf = self.partial_rotary_factor
        self.angles = int((prf if prf is not None else 1.0) * self.head_dim // 2)  # the rotating frequencies

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        factor = _real("scaling.factor", params.get("factor", 1.0))
        if factor < 1.0:
            raise _err("scaling.factor", f"must be >= 1, got {factor}")
        return {"factor": factor}

    def inv_freq(self, key: Any) -> torch.Tensor:
        inv = torch.zeros(self.rotary_dim // 2, dtype=torch.float64)
        inv[: self.angles] = _power_inv_freq(self.base, _exponents(self.head_dim, self.angles))
        return inv / self.scaling["factor"]

    def to_dict(self, args: dict[str, Any]) -> dict[str, Any]:
        args = super().to_dict(args)
        args["scaling"]["partial_rotary_factor"] = 2 * self.angles / self.head_dim
        args["rotary_dim"] = None  # implied: the whole head
        return args

    def identity(self) -> Any:
        return self.angles

    @classmethod
    def example(cls, rotary_dim: int = 64, length: int = 32) -> dict[str, Any]:
        return {"scaling": {"rope_type": cls.rope_type, "partial_rotary_factor": 0.25}}


ROPE_TYPES = tuple(LAWS)  # the built-in laws, in the order above
