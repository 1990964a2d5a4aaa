"""What a benchmark sweep measures: the shapes, the rope configurations, the presets.

A sweep is the product of seqlens x head configurations x head dims x masks (``Shape``), each
timed for every provider; fused ropekern providers are additionally timed for every requested
rope type (the "variant spread"). Presets give each op a default grid per device: ``quick`` is
what ``ropekern bench`` runs by default (about two minutes on an idle 2-core CPU with only the
torch reference), ``full`` is the whole grid (1K..32K, +64K/128K on GPU, both masks, head dims
64/128, MHA and GQA, every rope type).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..laws import LAWS
from ..scaling import ROPE_TYPES, RopeConfig

__all__ = [
    "OPS",
    "Shape",
    "SweepConfig",
    "make_rope",
    "parse_dtype",
    "parse_heads",
    "parse_int_list",
    "parse_seqlens",
    "preset",
    "seqlen_ladder",
]

OPS = ("forward", "backward", "decode", "rope")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Shape:
    """One benchmark point, independent of the provider and rope type.

    ``seqlen`` is Sq = Sk for forward/backward, the cache length after the step for decode, and
    the number of tokens rotated for rope. ``q_len`` is the decode step's new tokens (queries).
    """

    op: str
    batch: int
    seqlen: int
    hq: int
    hkv: int
    head_dim: int
    causal: bool
    dtype: str
    device: str
    q_len: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def group_key(self) -> tuple:
        """Everything but the seqlen: rows with equal keys form one curve over seqlen."""
        return (self.op, self.batch, self.hq, self.hkv, self.head_dim, self.causal, self.dtype, self.device, self.q_len)

    def label(self) -> str:
        """Human description of the group (no seqlen)."""
        mask = "causal" if self.causal else "full"
        extra = f" q_len={self.q_len}" if self.op == "decode" else ""
        if self.op == "rope":
            mask = ""
        return (
            f"{self.op} B={self.batch} Hq={self.hq} Hkv={self.hkv} D={self.head_dim} {mask} "
            f"{self.dtype} {self.device}{extra}"
        ).replace("  ", " ")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_rope(rope_type: str, head_dim: int) -> RopeConfig:
    """A representative ``RopeConfig`` of each type: its law's canonical example at the lengths of
    public long-context checkpoints (Llama 3.1: base 500000, 8K original; the others 4K).

    Only the cost matters here, not the model: every type goes through the same host tables, so
    the spread between types measures what the kernel pays for per-sequence tables (dynamic,
    longrope) and the attention factor (yarn, longrope).
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope type {rope_type!r}; expected one of {ROPE_TYPES} or 'all'")
    llama3 = rope_type == "llama3"
    example = LAWS[rope_type].example(head_dim, 8192 if llama3 else 4096)
    return RopeConfig(head_dim, base=500000.0 if llama3 else 10000.0, **example)


def parse_dtype(text: str) -> str:
    """``fp32``/``bf16``/``fp16`` (or the torch names) -> canonical torch name."""
    key = text.strip().lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {text!r}; expected fp32, bf16 or fp16")
    return str(_DTYPES[key]).replace("torch.", "")


def _parse_size(token: str) -> int:
    t = token.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise ValueError(f"cannot parse {token!r} as a length (e.g. 4096 or 4k)") from None
    if value <= 0:
        raise ValueError(f"lengths must be positive, got {token!r}")
    return value


def parse_seqlens(text: str) -> list[int]:
    """``"512,1k,2K,4096"`` -> ``[512, 1024, 2048, 4096]`` (sorted, deduplicated)."""
    values = sorted({_parse_size(tok) for tok in text.split(",") if tok.strip()})
    if not values:
        raise ValueError("no sequence lengths given")
    return values


def parse_int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(tok) for tok in text.split(",") if tok.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return values


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"8/2,8/8"`` -> ``[(8, 2), (8, 8)]``; ``"8"`` means MHA (8/8)."""
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        parts = tok.split("/")
        try:
            hq, hkv = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
        except ValueError:
            hq = hkv = 0
        if hq <= 0 or hkv <= 0 or hq % hkv:
            raise ValueError(f"--heads expects Hq/Hkv with Hq a multiple of Hkv (e.g. 8/2), got {tok!r}")
        out.append((hq, hkv))
    if not out:
        raise ValueError("no head configuration given")
    return out


def parse_rope_types(text: str) -> list[str]:
    if text.strip() == "all":
        return list(ROPE_TYPES)
    types = [t.strip() for t in text.split(",") if t.strip()]
    for t in types:
        if t not in ROPE_TYPES:
            raise ValueError(f"unknown rope type {t!r}; expected one of {ROPE_TYPES} or 'all'")
    if not types:
        raise ValueError("no rope type given")
    return list(dict.fromkeys(types))


def seqlen_ladder(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` doubling up to ``hi`` (``hi`` itself included)."""
    out, s = [], lo
    while s < hi:
        out.append(s)
        s *= 2
    out.append(hi)
    return sorted(set(out))


@dataclass
class SweepConfig:
    """A whole sweep: the grid and how to time it."""

    op: str = "forward"
    device: str = "cpu"
    seqlens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    heads: list[tuple[int, int]] = field(default_factory=lambda: [(8, 2)])
    head_dims: list[int] = field(default_factory=lambda: [128])
    causal: list[bool] = field(default_factory=lambda: [True])
    dtype: str = "float32"
    batch: int = 1
    q_len: int = 1
    rope_types: list[str] = field(default_factory=lambda: ["default"])
    repeats: int = 3
    warmup: bool = True  # False: warm up at the first shape only (for sweeps of seconds-long calls)
    backends: list[str] | None = None  # None: every available backend that runs natively here
    providers: list[str] | None = None  # None: all; else only these provider names
    memory: bool = True
    cuda_graphs: bool = True
    seed: int = 0

    def shapes(self) -> list[Shape]:
        causal = [False] if self.op == "rope" else self.causal
        return [
            Shape(self.op, self.batch, s, hq, hkv, d, c, self.dtype, self.device, self.q_len)
            for (hq, hkv), d, c, s in itertools.product(self.heads, self.head_dims, causal, self.seqlens)
        ]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"] = [f"{a}/{b}" for a, b in self.heads]
        return d


# preset -> op -> device -> grid. CPU sizes follow the 2-minute budget of `ropekern bench`
# with only the torch reference (4K causal fp32 Hq=8: ~2.6 s per reference call on 2 cores).
_PRESETS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "quick": {
        "forward": {
            "cpu": dict(seqlens=[512, 1024, 2048, 4096], heads=[(8, 2)], head_dims=[128], causal=[True]),
            "cuda": dict(seqlens=[1024, 2048, 4096, 8192, 16384], heads=[(32, 8)], head_dims=[128], causal=[True]),
        },
        "backward": {
            # autograd through the reference keeps every score chunk alive: ~4 x B*H*S^2 floats.
            "cpu": dict(seqlens=[256, 512, 1024, 2048], heads=[(8, 2)], head_dims=[128], causal=[True]),
            "cuda": dict(seqlens=[1024, 2048, 4096, 8192, 16384], heads=[(32, 8)], head_dims=[128], causal=[True]),
        },
        "decode": {
            "cpu": dict(seqlens=[4096, 8192, 16384, 32768], heads=[(32, 8)], head_dims=[128], causal=[True]),
            "cuda": dict(
                seqlens=[4096, 8192, 16384, 32768, 65536, 131072], heads=[(32, 8)], head_dims=[128], causal=[True]
            ),
        },
        "rope": {
            "cpu": dict(seqlens=[1024, 4096, 16384], heads=[(8, 2)], head_dims=[128], causal=[False]),
            "cuda": dict(seqlens=[4096, 16384, 65536], heads=[(32, 8)], head_dims=[128], causal=[False]),
        },
    },
}
_FULL_SEQLENS = {"cpu": [1024, 2048, 4096, 8192, 16384, 32768], "cuda": [1024 * 2**i for i in range(8)]}
_FULL_HEADS = {"cpu": [(8, 8), (8, 2)], "cuda": [(32, 32), (32, 8)]}


def preset(name: str, op: str, device: str) -> dict[str, Any]:
    """Grid defaults for ``op`` on ``device`` (``"cpu"`` or ``"cuda"``) under preset ``name``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    dev = "cuda" if device.startswith("cuda") else "cpu"
    if name == "quick":
        return dict(_PRESETS["quick"][op][dev])
    if name == "full":
        seqlens = _FULL_SEQLENS[dev]
        if op == "decode":
            seqlens = [s for s in seqlens if s >= 4096] + ([65536] if dev == "cpu" else [])
        return dict(
            seqlens=seqlens,
            heads=_FULL_HEADS[dev],
            head_dims=[64, 128],
            causal=[False] if op == "rope" else [True, False] if op != "decode" else [True],
            rope_types=list(ROPE_TYPES),
        )
    raise ValueError(f"unknown preset {name!r}; expected 'quick' or 'full'")
