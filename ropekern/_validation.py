"""Input validation shared by every backend: raw user arguments -> one normalised call object.

Every public entry point (``ropekern.api`` and ``ropekern.reference``) goes through here, so the
backends can assume well-formed inputs: matching dtypes and devices, contiguous last dimensions,
int32 positions materialised on the device, int32 ``cu_seqlens`` and host-side maxima.
Checks that need the data (negative positions, monotonic ``cu_seqlens``, cache overflow) cost
one host synchronisation and are skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, get_type_hints

import torch

from .scaling import MAX_POSITION, RopeConfig, RopeTable, check_table_positions

__all__ = ["AttentionCall", "KVCacheCall", "RopeArgs", "RopeCall", "attention_call", "kvcache_call", "rope_call"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class RopeArgs(NamedTuple):
    """The rotary arguments every kernel takes, in the one order every op signature uses (the
    C++ twin is ``RopeParams``, csrc/include/ropekern/params.h): ``*call.rope_args()`` fills them.

    split: float32 ``[nT, 4, R/2]`` turn-split table (``scaling.split_turns``), nT in {1, batch}, or
    with ``table_positions`` P > 0 a caller's table (``RopeTable``) float32 ``[P, 2, R/2]``: row p
    holds the cos then the sin of position p (positions past it read row P - 1; the host checks);
    rotary_dim: R, or 0 to run without rotation (the table then only fixes the head split);
    interleaved: pairs ``(2i, 2i+1)`` instead of ``(i, i + R/2)``; attention_factor: multiplies cos/sin
    (1 for a caller's table); table_positions: 0 for the law's split table, else P.
    """

    split: torch.Tensor
    rotary_dim: int
    interleaved: bool
    attention_factor: float
    table_positions: int

    @classmethod
    def of(cls, rope: RopeConfig | RopeTable, split: torch.Tensor, rotate: bool = True) -> RopeArgs:
        """``rope``'s arguments with its kernel table ``split``; ``rotate=False`` runs without rotation."""
        rotary_dim = rope.rotary_dim if rotate else 0
        rows = split.shape[0] if isinstance(rope, RopeTable) else 0
        return cls(split.contiguous(), rotary_dim, bool(rope.interleaved), float(rope.attention_factor), int(rows))

    def for_sequence(self, b: int) -> RopeArgs:
        """The arguments of sequence ``b`` alone: its row of a per-sequence split table."""
        if self.table_positions or self.split.shape[0] == 1:
            return self
        return self._replace(split=self.split[b : b + 1])

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[B, S, R/2]`` in ``dtype`` for positions ``[B, S]`` (row b uses table b
        of a per-sequence split): the PyTorch paths' rotation, with float64 angles for a law."""
        if self.table_positions:
            rows = self.split[positions.to(torch.int64).clamp(0, self.table_positions - 1)]
            return rows[..., 0, :].to(dtype), rows[..., 1, :].to(dtype)
        inv64 = inv_freq_from_split(self.split)[:, None, :].to(positions.device)
        angle = positions.to(torch.float64)[..., None] * inv64
        af = self.attention_factor
        return (torch.cos(angle) * af).to(dtype), (torch.sin(angle) * af).to(dtype)

    @classmethod
    def take(cls, args: tuple | list) -> tuple[RopeArgs, tuple]:
        """``(RopeArgs, the arguments after them)`` from op arguments that start with them."""
        n = len(cls._fields)
        return cls(*args[:n]), tuple(args[n:])


_SCHEMA_TYPES = {torch.Tensor: "Tensor", int: "int", bool: "bool", float: "float"}
# The torch.library schemas of every op's arguments, in the order ``op_args()`` below gives them
# (csrc/bindings.cpp spells the same order for the native ops).
ROPE_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[t]} {name}" for name, t in get_type_hints(RopeArgs).items())
ATTENTION_SCHEMA = (
    "Tensor q, Tensor k, Tensor v, Tensor q_positions, Tensor k_positions, Tensor? cu_seqlens_q, "
    f"Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, {ROPE_SCHEMA}, bool causal, float softmax_scale, "
    "int window_left, int window_right"
)
KVCACHE_SCHEMA = (
    "Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, Tensor? v_new, "
    f"Tensor? block_table, {ROPE_SCHEMA}, bool causal, float softmax_scale, int window_left, int window_right, "
    "int num_splits"
)
APPLY_ROPE_SCHEMA = f"Tensor x, Tensor positions, {ROPE_SCHEMA}"
# apply_rope_ writes the rotation into x (the native op's schema in csrc/schemas.h says the same)
APPLY_ROPE_INPLACE_SCHEMA = f"Tensor(a!) x, Tensor positions, {ROPE_SCHEMA}"
# The backward of an attention forward: the output gradients and the forward's results, then the
# forward's own arguments.
BACKWARD_SCHEMA = f"Tensor dout, Tensor out, Tensor lse, Tensor? dlse, {ATTENTION_SCHEMA}"


def inv_freq_from_split(split: torch.Tensor) -> torch.Tensor:
    """float64 ``[nT, R/2]`` radians per position from the kernels' split table ``[nT, 4, R/2]``
    (the rows sum to the frequency in turns, ``scaling.split_turns``)."""
    return split.to(torch.float64).sum(-2) * (2.0 * math.pi)


def rope_position(schema: str) -> int:
    """Where an op's rope arguments start in ``schema`` (its first field's index)."""
    names = [arg.split()[-1] for arg in schema.split(", ")]
    return names.index(RopeArgs._fields[0])


def bundle_rope(args: tuple, at: int) -> tuple:
    """An op's arguments with the rope ones (from index ``at``) gathered into one ``RopeArgs``: the
    arguments of the kernel launchers."""
    rope, rest = RopeArgs.take(args[at:])
    return (*args[:at], rope, *rest)


class _Rotary:
    """The rotary side of a validated call: its tables and its ``RopeArgs``."""

    rope: RopeConfig | RopeTable
    seq_lens: torch.Tensor | None
    rotate: bool

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _max_position(self) -> int:
        """The largest position the call rotates (-1 for none); reads device data."""
        raise NotImplementedError

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inv_freq64 [nT, R/2], split [nT, 4, R/2] fp32)`` on the device; nT in {1, batch}.
        For a ``RopeTable``: ``(reference [1, P, 2, R/2], kernel [P, 2, R/2] fp32)``, checked to
        cover the call's positions."""
        ref, kern = self.rope.tables(self.seq_lens, self._device())
        if isinstance(self.rope, RopeTable) and self.rotate and _checking():
            check_table_positions(kern.shape[0], self._max_position())
        return ref, kern

    def rope_args(self) -> RopeArgs:
        return RopeArgs.of(self.rope, self.tables()[1], self.rotate)


@dataclass
class AttentionCall(_Rotary):
    """A validated ``rope_attention`` call.

    Dense: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``, positions int32 ``[B, Sq]`` / ``[B, Sk]``.
    Varlen: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, positions int32 ``[Tq]`` / ``[Tk]``,
    ``cu_seqlens_*`` int32 ``[B + 1]``. ``seq_lens`` is the per-sequence scaling length
    (int64 ``[B]`` on the device, ``max(k_positions[b]) + 1``) or None when the rope type does
    not depend on length.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rope: RopeConfig | RopeTable
    causal: bool
    softmax_scale: float
    q_positions: torch.Tensor
    k_positions: torch.Tensor
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    seq_lens: torch.Tensor | None
    return_lse: bool
    # False runs the same kernel without rotation: the benchmarks' "RoPE tax" baseline and the
    # attention half of "separate RoPE pass + the same attention". Not part of the public API.
    rotate: bool = True
    # flash-attn's window_size: key j is visible to query i iff j >= i + Sk - Sq - window_left and
    # j <= i + Sk - Sq + window_right; -1 is unbounded (window_right is -1 under causal, which bounds it)
    window_left: int = -1
    window_right: int = -1

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.varlen else self.q.shape[0]

    def _device(self) -> torch.device:
        return self.q.device

    def _max_position(self) -> int:
        return max(_tensor_max(self.q_positions), _tensor_max(self.k_positions))

    def op_args(self) -> tuple:
        """The arguments of every attention forward op (``ATTENTION_SCHEMA``)."""
        return (
            self.q, self.k, self.v, self.q_positions, self.k_positions, self.cu_seqlens_q, self.cu_seqlens_k,
            int(self.max_seqlen_q), int(self.max_seqlen_k), *self.rope_args(), bool(self.causal),
            float(self.softmax_scale), int(self.window_left), int(self.window_right),
        )  # fmt: skip


@dataclass
class KVCacheCall(_Rotary):
    """A validated ``rope_attention_with_kvcache`` call.

    q ``[B, Sq, Hq, D]``; dense cache ``[B, Smax, Hkv, D]`` or paged ``[num_blocks, block_size,
    Hkv, D]`` with ``block_table`` int32 ``[B, max_blocks]``; ``cache_seqlens`` int32 ``[B]``;
    ``k_new``/``v_new`` ``[B, S_new, Hkv, D]`` or None. Sequence b holds ``n_b = cache_seqlens[b]
    + S_new`` keys after the append; ``seq_lens`` = n (int64 ``[B]``) when the rope type depends
    on length, else None.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    k_new: torch.Tensor | None
    v_new: torch.Tensor | None
    block_table: torch.Tensor | None
    rope: RopeConfig | RopeTable
    causal: bool
    softmax_scale: float
    return_lse: bool
    seq_lens: torch.Tensor | None
    rotate: bool = True  # as in AttentionCall (benchmarks only)
    # Some sequence holds fewer keys than there are queries (n_b < Sq; known only when the data
    # checks ran): kernels that cannot serve it say so.
    fewer_keys: bool = False
    window_left: int = -1  # as in AttentionCall, with Sk = n_b
    window_right: int = -1

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def s_new(self) -> int:
        return 0 if self.k_new is None else self.k_new.shape[1]

    @property
    def inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors a caller could ask gradients of (``backends.grad_reason``)."""
        return self.q, self.k_cache, self.v_cache, self.k_new, self.v_new

    def _device(self) -> torch.device:
        return self.q.device

    def _max_position(self) -> int:
        return _tensor_max(self.cache_seqlens) + self.s_new - 1

    def op_args(self, num_splits: int = 0) -> tuple:
        """The arguments of every kv-cache op (``KVCACHE_SCHEMA``); ``num_splits`` is the split-K
        hint (0: the kernel chooses)."""
        return (
            self.q, self.k_cache, self.v_cache, self.cache_seqlens, self.k_new, self.v_new, self.block_table,
            *self.rope_args(), bool(self.causal), float(self.softmax_scale), int(self.window_left),
            int(self.window_right), int(num_splits),
        )  # fmt: skip


@dataclass
class RopeCall(_Rotary):
    """A validated ``apply_rope`` call: x ``[B, S, H, D]`` with positions int32 ``[B, S]``, or
    x ``[T, H, D]`` with positions ``[T]``; ``seq_lens`` as in ``AttentionCall`` (per batch row)."""

    x: torch.Tensor
    rope: RopeConfig | RopeTable
    positions: torch.Tensor
    seq_lens: torch.Tensor | None
    rotate: bool = True

    def _device(self) -> torch.device:
        return self.x.device

    def _max_position(self) -> int:
        return _tensor_max(self.positions)

    def op_args(self) -> tuple:
        """The arguments of every apply_rope op (``APPLY_ROPE_SCHEMA``)."""
        return (self.x, self.positions, *self.rope_args())


def _tensor_max(t: torch.Tensor) -> int:
    return int(t.max()) if t.numel() else -1


def _checking() -> bool:
    """Data-dependent checks (cache lengths, block tables, ``cu_seqlens`` order) read device data on
    the host, i.e. synchronise. They are skipped while torch.compile traces, while a CUDA graph is
    being captured (a sync there is an error), and when ``ROPEKERN_SKIP_DATA_CHECKS=1`` (decode
    loops that must not wait for the device; the inputs are then trusted)."""
    if torch.compiler.is_compiling() or os.environ.get("ROPEKERN_SKIP_DATA_CHECKS") == "1":
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _tensor(name: str, t: Any, ndims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"`{name}` must have {want} dimensions, got shape {tuple(t.shape)}")
    return t


def _float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"`{name}` must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def _same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], what: str) -> None:
    first = getattr(tensors[0], what)
    for name, t in zip(names[1:], tensors[1:]):
        if getattr(t, what) != first:
            raise ValueError(f"`{name}` {what} {getattr(t, what)} differs from `{names[0]}` {what} {first}")


def _elements_may_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share an element of memory (False only when provably disjoint).

    Metadata only. Disjoint storages or byte ranges are disjoint; views with one set of strides laid
    out without self-overlap (each stride beyond the span of the smaller ones at the larger of the two
    extents, as in ``kv[:, :, 0]`` / ``kv[:, :, 1]`` of an interleaved ``[.., 2, H, D]`` buffer, or the
    q and k heads of a packed ``[T, (Hq + 2 Hkv) D]`` one) meet exactly when their offset is a sum of
    strides times index differences ``i - j`` (``0 <= i < a``'s extent, ``0 <= j < b``'s), decided digit
    by digit from the largest stride; anything else is assumed to meet."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    if a1 <= b0 or b1 <= a0:
        return False
    delta, size = b.data_ptr() - a.data_ptr(), a.element_size()
    if a.dim() != b.dim() or a.stride() != b.stride() or b.element_size() != size or delta % size:
        return True
    dims = sorted((st, na, nb) for st, na, nb in zip(a.stride(), a.shape, b.shape) if max(na, nb) > 1)
    reach = 0  # the largest offset the smaller strides span
    for st, na, nb in dims:
        if st <= reach:
            return True  # self-overlapping layout: not decided here
        reach += (max(na, nb) - 1) * st

    def representable(rest: int, k: int) -> bool:
        if k < 0:
            return rest == 0
        st, na, nb = dims[k]
        c = rest // st
        return any(1 - nb <= x <= na - 1 and representable(rest - x * st, k - 1) for x in (c, c + 1))

    return representable(delta // size, len(dims) - 1)


def _check_append_targets(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The in-place append writes both caches: refuse layouts where it would overwrite other data."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        zero = [i for i, (n, st) in enumerate(zip(t.shape, t.stride())) if n > 1 and st == 0]
        if zero:
            raise ValueError(
                f"`{name}` has stride 0 in dimension {zero[0]} (an expand()ed view): the in-place append would "
                f"write one memory slot for all {t.shape[zero[0]]} entries of that dimension; pass a real cache"
            )
    if k_cache is v_cache or _elements_may_meet(k_cache, v_cache):
        raise ValueError(
            "`k_cache` and `v_cache` share memory: the in-place append of `v_new` would overwrite keys (or the "
            "other way round); pass two caches that do not overlap"
        )


def _check_block_sharing(block_table: torch.Tensor, lens: list[int], s_new: int, block_size: int) -> None:
    """Refuse an append into a block that another sequence's block-table row also uses (prefix
    sharing): the write would change that sequence's keys. Reads the table on the host."""
    rows = block_table.tolist()
    users: dict[int, list[int]] = {}
    for i, (row, n0) in enumerate(zip(rows, lens)):
        for blk in row[: (n0 + s_new + block_size - 1) // block_size]:
            users.setdefault(blk, []).append(i)
    for i, (row, n0) in enumerate(zip(rows, lens)):
        for blk in row[n0 // block_size : (n0 + s_new + block_size - 1) // block_size]:
            other = [j for j in users[blk] if j != i]
            if other:
                raise ValueError(
                    f"`block_table` rows {i} and {other[0]} share block {blk}, into which sequence {i} appends: the "
                    f"write would change sequence {other[0]}'s keys; copy the block first (copy-on-write)"
                )


def _scale(softmax_scale: Any, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"`softmax_scale` must be a float, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"`softmax_scale` must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _rope(rope: Any, head_dim: int) -> RopeConfig | RopeTable:
    if not isinstance(rope, (RopeConfig, RopeTable)):
        raise TypeError(f"`rope` must be a ropekern.RopeConfig or RopeTable, got {type(rope).__name__}")
    if rope.head_dim != head_dim:
        raise ValueError(f"head dim {head_dim} of the inputs differs from `rope.head_dim` {rope.head_dim}")
    return rope


def _window(window_size: Any, causal: bool) -> tuple[int, int]:
    """flash-attn's ``window_size=(left, right)``: ints >= -1 (-1 unbounded); under ``causal`` the right
    bound is the diagonal (right -> -1 here, as flash-attn sets it to 0)."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)
    ):
        raise TypeError(f"`window_size` must be a (left, right) pair of ints, got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"`window_size` entries must be >= -1 (-1: unbounded), got {tuple(window_size)}")
    return left, -1 if causal else right


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}")
    return value


def _positions(name: str, pos: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"`{name}` must be an integer torch.Tensor, got {type(pos).__name__}")
    if pos.dtype not in INT_DTYPES:
        raise TypeError(f"`{name}` must be an integer tensor (int32/int64), got {pos.dtype}")
    # Hugging Face passes one row of position ids for the whole batch ([1, S]): it is every row's.
    shared = len(shape) == 2 and pos.dim() == 2 and pos.shape[0] == 1 and pos.shape[1] == shape[1]
    if shared:
        pos = pos.expand(shape)
    if tuple(pos.shape) != tuple(shape):
        also = f" or {(1, shape[1])}" if len(shape) == 2 else ""
        raise ValueError(f"`{name}` must have shape {tuple(shape)}{also}, got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"`{name}` is on {pos.device} but the inputs are on {device}")
    if _checking() and pos.numel():
        lo, hi = torch.aminmax(pos)
        lo, hi = int(lo), int(hi)
        if lo < 0:
            raise ValueError(f"`{name}` must be >= 0, got a minimum of {lo}")
        if hi > MAX_POSITION:
            raise ValueError(f"`{name}` must be < 2**31, got {hi}")
    return pos.to(torch.int32).contiguous()


def _cu_seqlens(name: str, cu: Any, total: int, device: torch.device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"`{name}` must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`{name}` must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"`{name}` must have shape [batch + 1], got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"`{name}` is on {cu.device} but the inputs are on {device}")
    if _checking():
        host = cu.tolist()
        if host[0] != 0:
            raise ValueError(f"`{name}` must start at 0, got {host[0]}")
        if any(b < a for a, b in zip(host, host[1:])):
            raise ValueError(f"`{name}` must be non-decreasing, got {host}")
        if host[-1] != total:
            raise ValueError(f"`{name}` must end at the token count {total}, got {host[-1]}")
    return cu.to(torch.int32).contiguous()


def _max_seqlen(name: str, value: Any, cu: torch.Tensor) -> int:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value is not None and not _checking():
        return value  # torch.compile: a given maximum is trusted (reading cu_seqlens is data-dependent)
    actual = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if value is None:
        return actual
    if value < actual:
        raise ValueError(f"`{name}` ({value}) is smaller than the longest sequence ({actual})")
    return value


def _varlen_default_positions(cu: torch.Tensor, total: int, offsets: torch.Tensor | None) -> torch.Tensor:
    """Positions restarting at 0 per sequence (plus a per-sequence offset), int32 ``[total]``."""
    lengths = (cu[1:] - cu[:-1]).to(torch.int64)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device, dtype=torch.int64) - cu[:-1].to(torch.int64)[seq]
    if offsets is not None:
        # docs/design.md §2 default Sk - Sq + i; negative when Sq > Sk, clamped to 0 as in the dense layout.
        pos = (pos + offsets[seq]).clamp_min(0)
    return pos.to(torch.int32)


def _segment_max(values: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """max(values[cu[b]:cu[b+1]]) per sequence, int64 ``[B]``; -1 for empty sequences."""
    batch = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).to(torch.int64)
    seq = torch.repeat_interleave(torch.arange(batch, device=cu.device), lengths, output_size=values.numel())
    out = torch.full((batch,), -1, dtype=torch.int64, device=values.device)
    return out.scatter_reduce(0, seq, values.to(torch.int64), reduce="amax", include_self=True)


def _seq_len(seq_len: Any, rope: Any, batch: int, device: torch.device) -> torch.Tensor | None:
    """An explicit scaling length: ``None``, or int64 ``[batch]`` filled with it for a
    length-dependent rope (the other types ignore it, after the same check)."""
    if seq_len is None:
        return None
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"`seq_len` must be a non-negative int, got {seq_len!r}")
    return torch.full((batch,), seq_len, dtype=torch.int64, device=device) if rope.is_length_dependent else None


def attention_call(
    q: Any,
    k: Any,
    v: Any,
    rope: Any,
    *,
    causal: bool = False,
    softmax_scale: Any = None,
    q_positions: Any = None,
    k_positions: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: Any = None,
    max_seqlen_k: Any = None,
    return_lse: bool = False,
    seq_len: Any = None,
    window_size: Any = (-1, -1),
) -> AttentionCall:
    """Validate ``rope_attention`` arguments (see ``ropekern.rope_attention``)."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("`cu_seqlens_q` and `cu_seqlens_k` must be given together")
    if not varlen and (max_seqlen_q is not None or max_seqlen_k is not None):
        raise ValueError("`max_seqlen_q`/`max_seqlen_k` are only meaningful with `cu_seqlens_q`/`cu_seqlens_k`")
    ndim = (3,) if varlen else (4,)
    q, k, v = (_tensor(n, t, ndim) for n, t in (("q", q), ("k", k), ("v", v)))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _float(name, t)
    names = ("q", "k", "v")
    _same(names, (q, k, v), "dtype")
    _same(names, (q, k, v), "device")
    if k.shape != v.shape:
        raise ValueError(f"`k` shape {tuple(k.shape)} differs from `v` shape {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dim of `q` ({q.shape[-1]}) differs from `k` ({k.shape[-1]})")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    rope = _rope(rope, q.shape[-1])
    causal = _bool("causal", causal)
    window = _window(window_size, causal)
    return_lse = _bool("return_lse", return_lse)
    scale = _scale(softmax_scale, q.shape[-1])
    device = q.device

    if varlen:
        cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], device)
        cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], device)
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"`cu_seqlens_q` has {cu_q.numel()} entries but `cu_seqlens_k` has {cu_k.numel()}")
        mq = _max_seqlen("max_seqlen_q", max_seqlen_q, cu_q)
        mk = _max_seqlen("max_seqlen_k", max_seqlen_k, cu_k)
        if k_positions is None:
            k_pos = _varlen_default_positions(cu_k, k.shape[0], None)
        else:
            k_pos = _positions("k_positions", k_positions, (k.shape[0],), device)
        if q_positions is None:
            offset = ((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])).to(torch.int64)
            q_pos = _varlen_default_positions(cu_q, q.shape[0], offset)
        else:
            q_pos = _positions("q_positions", q_positions, (q.shape[0],), device)
        seq_lens = _seq_len(seq_len, rope, cu_k.numel() - 1, device)
        if seq_lens is None and rope.is_length_dependent:
            seq_lens = _segment_max(k_pos, cu_k) + 1
        return AttentionCall(
            q, k, v, rope, causal, scale, q_pos, k_pos, cu_q, cu_k, mq, mk, seq_lens, return_lse, True, *window
        )

    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch size of `q` ({q.shape[0]}) differs from `k` ({k.shape[0]})")
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if k_positions is None:
        k_pos = torch.arange(sk, device=device, dtype=torch.int32).expand(b, sk)
    else:
        k_pos = _positions("k_positions", k_positions, (b, sk), device)
    if q_positions is None:
        # docs/design.md §2: q_positions[b, i] = Sk - Sq + i; clamped at 0 when Sq > Sk.
        q_pos = (torch.arange(sq, device=device, dtype=torch.int32) + (sk - sq)).clamp_min(0).expand(b, sq)
    else:
        q_pos = _positions("q_positions", q_positions, (b, sq), device)
    seq_lens = _seq_len(seq_len, rope, b, device)
    if seq_lens is None and rope.is_length_dependent:
        if k_positions is None:
            seq_lens = torch.full((b,), sk, dtype=torch.int64, device=device)
        else:
            seq_lens = (
                (k_pos.amax(dim=1).to(torch.int64) + 1) if sk else torch.zeros(b, dtype=torch.int64, device=device)
            )
    return AttentionCall(
        q, k, v, rope, causal, scale, q_pos, k_pos, None, None, sq, sk, seq_lens, return_lse, True, *window
    )


def kvcache_call(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    rope: Any,
    *,
    cache_seqlens: Any,
    k_new: Any = None,
    v_new: Any = None,
    block_table: Any = None,
    cache_leftpad: Any = None,
    cache_batch_idx: Any = None,
    causal: bool = True,
    softmax_scale: Any = None,
    return_lse: bool = False,
    seq_len: Any = None,
    window_size: Any = (-1, -1),
) -> KVCacheCall:
    """Validate ``rope_attention_with_kvcache`` arguments (see ``ropekern.rope_attention_with_kvcache``).

    ``cache_batch_idx`` / ``cache_leftpad`` (dense caches) are turned into a paged view of the same
    memory: pages of the largest power of two dividing ``Smax`` and every ``cache_leftpad`` (1 when
    the pads cannot be read, under ``torch.compile``), one block-table row per query row starting at
    its cache row's first page plus its pad; ``cache_seqlens`` becomes the token count
    ``cache_seqlens - cache_leftpad``. No kernel knows about either."""
    q = _tensor("q", q, (4,))
    k_cache = _tensor("k_cache", k_cache, (4,))
    v_cache = _tensor("v_cache", v_cache, (4,))
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _float(name, t)
    tensors, names = [q, k_cache, v_cache], ["q", "k_cache", "v_cache"]
    if (k_new is None) != (v_new is None):
        raise ValueError("`k_new` and `v_new` must be given together")
    if k_new is not None:
        k_new = _tensor("k_new", k_new, (4,))
        v_new = _tensor("v_new", v_new, (4,))
        _float("k_new", k_new)
        _float("v_new", v_new)
        tensors += [k_new, v_new]
        names += ["k_new", "v_new"]
    _same(tuple(names), tuple(tensors), "dtype")
    _same(tuple(names), tuple(tensors), "device")
    device = q.device
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"`k_cache` shape {tuple(k_cache.shape)} differs from `v_cache` shape {tuple(v_cache.shape)}")
    b, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head dim of `q` ({d}) differs from `k_cache` ({k_cache.shape[3]})")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    rope = _rope(rope, d)
    causal = _bool("causal", causal)
    window = _window(window_size, causal)
    return_lse = _bool("return_lse", return_lse)
    scale = _scale(softmax_scale, d)
    if k_new is not None:
        if k_new.shape != v_new.shape:
            raise ValueError(f"`k_new` shape {tuple(k_new.shape)} differs from `v_new` shape {tuple(v_new.shape)}")
        if k_new.shape[0] != b or k_new.shape[2] != hkv or k_new.shape[3] != d:
            raise ValueError(f"`k_new` must have shape [{b}, S_new, {hkv}, {d}], got {tuple(k_new.shape)}")
        _check_append_targets(k_cache, v_cache)
    s_new = 0 if k_new is None else k_new.shape[1]
    fewer_keys = False

    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"`cache_seqlens` must be an int32 torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`cache_seqlens` must be int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"`cache_seqlens` must have shape [{b}], got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"`cache_seqlens` is on {cache_seqlens.device} but the inputs are on {device}")

    leftpad = _row_ints("cache_leftpad", cache_leftpad, b, device)
    batch_idx = _row_ints("cache_batch_idx", cache_batch_idx, b, device)
    if block_table is not None and (leftpad is not None or batch_idx is not None):
        which = "cache_leftpad" if leftpad is not None else "cache_batch_idx"
        raise ValueError(f"`{which}` applies to a dense cache: it cannot be combined with `block_table`")

    if block_table is not None:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"`block_table` must be an int32 torch.Tensor, got {type(block_table).__name__}")
        if block_table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"`block_table` must be int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != b:
            raise ValueError(f"`block_table` must have shape [{b}, max_blocks], got {tuple(block_table.shape)}")
        if block_table.device != device:
            raise ValueError(f"`block_table` is on {block_table.device} but the inputs are on {device}")
        block_table = block_table.to(torch.int32).contiguous()
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        if k_cache.shape[0] != b and batch_idx is None:
            raise ValueError(
                f"dense `k_cache` batch ({k_cache.shape[0]}) differs from `q` batch ({b}); "
                "pass `block_table` for a paged cache, or `cache_batch_idx` to pick its rows"
            )
        capacity = k_cache.shape[1]

    if _checking():
        lens = cache_seqlens.tolist()
        pads = leftpad.tolist() if leftpad is not None else [0] * b
        fewer_keys = False
        for i, (n0, pad) in enumerate(zip(lens, pads)):
            if n0 < 0:
                raise ValueError(f"`cache_seqlens[{i}]` must be >= 0, got {n0}")
            if n0 + s_new > capacity:
                raise ValueError(
                    f"cache overflow in sequence {i}: cache_seqlens {n0} + {s_new} new tokens exceeds "
                    f"the cache capacity of {capacity} tokens"
                )
            if not 0 <= pad <= n0:
                raise ValueError(f"`cache_leftpad[{i}]` must be in [0, cache_seqlens[{i}] = {n0}], got {pad}")
            fewer_keys = fewer_keys or n0 - pad + s_new < sq
        if batch_idx is not None:
            rows = batch_idx.tolist()
            bad = [r for r in rows if not 0 <= r < k_cache.shape[0]]
            if bad:
                raise ValueError(f"`cache_batch_idx` refers to cache row {bad[0]} outside [0, {k_cache.shape[0]})")
            if s_new and len(set(rows)) < len(rows):
                raise ValueError(
                    "`cache_batch_idx` repeats a cache row and `k_new` is given: two sequences would append "
                    "into the same cache row"
                )
        if block_table is not None and b:
            nb = k_cache.shape[0]
            bs = k_cache.shape[1]
            used = [(n0 + s_new + bs - 1) // bs for n0 in lens]
            rows = block_table.tolist()
            for i, (row, u) in enumerate(zip(rows, used)):
                bad = [x for x in row[:u] if not 0 <= x < nb]
                if bad:
                    raise ValueError(f"`block_table[{i}]` refers to block {bad[0]} outside [0, {nb})")
            if s_new:
                _check_block_sharing(block_table, lens, s_new, bs)
    cache_seqlens = cache_seqlens.to(torch.int32).contiguous()
    if leftpad is not None or batch_idx is not None:
        k_cache, v_cache, block_table, cache_seqlens = _dense_as_pages(
            k_cache, v_cache, cache_seqlens, leftpad, batch_idx, b
        )
    seq_lens = _seq_len(seq_len, rope, b, device)
    if seq_lens is None and rope.is_length_dependent:
        seq_lens = cache_seqlens.to(torch.int64) + s_new
    return KVCacheCall(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, rope, causal, scale, return_lse, seq_lens,
        fewer_keys=_checking() and fewer_keys, window_left=window[0], window_right=window[1],
    )  # fmt: skip


def _row_ints(name: str, t: Any, batch: int, device: torch.device) -> torch.Tensor | None:
    """An optional per-sequence int32 ``[batch]`` argument (``cache_leftpad``, ``cache_batch_idx``)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`{name}` must be an int32 torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"`{name}` must have shape [{batch}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"`{name}` is on {t.device} but the inputs are on {device}")
    return t.to(torch.int32)


def _dense_as_pages(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    leftpad: torch.Tensor | None,
    batch_idx: torch.Tensor | None,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense cache ``[Bc, Smax, Hkv, D]`` read through ``cache_batch_idx`` (query row b uses cache
    row ``idx[b]``) and ``cache_leftpad`` (row b's tokens start at slot ``pad[b]``; ``cache_seqlens``
    counts slots, pad included) as the same memory in pages: ``(k_pages, v_pages, block_table int32
    [B, Smax / bs], token counts int32 [B])``. The page size bs is the largest power of two dividing
    Smax and every pad, so that token t of row b is slot ``pad[b] + t`` of its cache row."""
    cache_rows, smax = k_cache.shape[0], k_cache.shape[1]
    bits = smax
    if leftpad is not None:
        # the pads are read on the host (the checks above did already); unreadable: one-token pages
        bits = functools.reduce(operator.or_, leftpad.tolist(), bits) if _checking() else 1
    bs = bits & -bits if bits else 1
    pages = smax // bs
    try:
        k_pages, v_pages = (c.view(cache_rows * pages, bs, *c.shape[2:]) for c in (k_cache, v_cache))
    except RuntimeError as exc:
        raise ValueError(
            "`cache_leftpad`/`cache_batch_idx` need caches whose batch and token dimensions can be viewed as "
            f"one (pages of {bs} tokens), got strides {tuple(k_cache.stride())}: {exc}"
        ) from None
    device = k_cache.device
    rows = batch_idx.to(torch.int64) if batch_idx is not None else torch.arange(batch, device=device)
    pad = leftpad.to(torch.int64) if leftpad is not None else torch.zeros(batch, dtype=torch.int64, device=device)
    first = rows * pages + pad // bs
    # entries past a row's last page are never read (cache_seqlens + S_new <= Smax); clamped in range
    table = (first[:, None] + torch.arange(pages, device=device)[None]).clamp_max(cache_rows * pages - 1)
    return k_pages, v_pages, table.to(torch.int32).contiguous(), (cache_seqlens - pad).to(torch.int32).contiguous()


def _offsets(offsets: Any, batch: int, device: torch.device) -> torch.Tensor:
    """Per-sequence position offsets: int64 ``[batch]``, >= 0."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in INT_DTYPES:
        raise TypeError(f"`offsets` must be an integer torch.Tensor, got {getattr(offsets, 'dtype', type(offsets))}")
    if tuple(offsets.shape) != (batch,):
        raise ValueError(f"`offsets` must have shape ({batch},), one per sequence, got {tuple(offsets.shape)}")
    if offsets.device != device:
        raise ValueError(f"`offsets` is on {offsets.device} but the inputs are on {device}")
    if _checking() and offsets.numel() and int(offsets.min()) < 0:
        raise ValueError(f"`offsets` must be >= 0, got a minimum of {int(offsets.min())}")
    return offsets.to(torch.int64)


def rope_calls(
    x: Any, rope: Any, positions: Any = None, seq_len: Any = None, cu_seqlens: Any = None, offsets: Any = None
) -> list[tuple[slice | None, RopeCall]]:
    """Validate ``apply_rope`` arguments (see ``ropekern.apply_rope``): ``(rows, call)`` pairs, where
    ``rows`` is None (the call covers ``x``) or the token slice of one varlen sequence. A varlen call
    of a length-dependent law runs one call per sequence, each with its own table."""
    if cu_seqlens is None and offsets is None:
        return [(None, rope_call(x, rope, positions, seq_len))]
    x = _tensor("x", x, (3, 4))
    if offsets is not None and positions is not None:
        raise ValueError("give `positions` or `offsets`, not both (offsets shift the default positions)")
    if cu_seqlens is None:  # dense: row b at offsets[b] + i
        if positions is None:
            off = _offsets(offsets, 1 if x.dim() == 3 else x.shape[0], x.device)
            positions = off[:, None] + torch.arange(x.shape[-3], device=x.device)
            positions = positions[0] if x.dim() == 3 else positions
        return [(None, rope_call(x, rope, positions, seq_len))]
    if x.dim() != 3:
        raise ValueError(f"`cu_seqlens` goes with a packed x [T, H, D], got x of shape {tuple(x.shape)}")
    cu = _cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device)
    if positions is None:
        off = None if offsets is None else _offsets(offsets, cu.numel() - 1, x.device)
        positions = _varlen_default_positions(cu, x.shape[0], off)
    rope = _rope(rope, x.shape[-1])
    if seq_len is not None or not rope.is_length_dependent or cu.numel() <= 2:
        return [(None, rope_call(x, rope, positions, seq_len))]
    positions = _positions("positions", positions, (x.shape[0],), x.device)
    bounds = cu.tolist()
    return [(slice(a, b), rope_call(x[a:b], rope, positions[a:b], None)) for a, b in zip(bounds, bounds[1:]) if b > a]


def rope_inplace_calls(
    q: Any, k: Any, rope: Any, positions: Any = None, seq_len: Any = None, cu_seqlens: Any = None, offsets: Any = None
) -> list[RopeCall]:
    """Validate ``apply_rope_`` arguments (see ``ropekern.apply_rope_``): the calls rotating q, then k."""
    calls = [c for _, c in rope_calls(q, rope, positions, seq_len, cu_seqlens, offsets)]
    if k is not None:
        calls += [c for _, c in rope_calls(k, rope, positions, seq_len, cu_seqlens, offsets)]
        if k.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"`k` must have the leading dimensions of `q` {tuple(q.shape[:-2])}, got {tuple(k.shape[:-2])}"
            )
        # storage pointers are not traceable: torch.compile trusts the caller here
        if not torch.compiler.is_compiling() and _elements_may_meet(q, k):
            raise ValueError("`q` and `k` share memory: rotating one in place would change the other")
    for name, x in (("q", q), ("k", k)):
        if x is not None and torch.is_grad_enabled() and x.requires_grad:
            raise ValueError(f"`{name}` requires grad: an in-place rotation hides it from autograd; use apply_rope")
    return calls


def rope_call(x: Any, rope: Any, positions: Any = None, seq_len: Any = None) -> RopeCall:
    """Validate ``apply_rope`` arguments (see ``ropekern.apply_rope``)."""
    x = _tensor("x", x, (3, 4))
    _float("x", x)
    rope = _rope(rope, x.shape[-1])
    lead = tuple(x.shape[:-2])
    if positions is None:
        s = x.shape[-3]
        positions = torch.arange(s, device=x.device, dtype=torch.int32).expand(lead)
    else:
        positions = _positions("positions", positions, lead, x.device)
    rows = 1 if x.dim() == 3 else x.shape[0]
    seq_lens = _seq_len(seq_len, rope, rows, x.device)
    if seq_lens is None and rope.is_length_dependent:
        if positions.numel():
            seq_lens = positions.reshape(rows, -1).amax(dim=1).to(torch.int64) + 1
        else:
            seq_lens = torch.zeros(rows, dtype=torch.int64, device=x.device)
    return RopeCall(x, rope, positions, seq_lens)
