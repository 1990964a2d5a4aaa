"""Triton tile helpers shared by the RoPE kernels: load a ``[M, D]`` row tile as its rotary halves
plus its pass-through block, and rotate the halves in fp32 registers right after the load.

A head of ``D`` channels with ``R = rotary_dim`` is read as three blocks:

* ``x1``: the first channel of every pair, ``[M, HALF_P]`` (half-split: cols ``[0, R/2)``;
  interleaved: the even cols ``0, 2, .., R-2``),
* ``x2``: the second channel of every pair (half-split: ``[R/2, R)``; interleaved: the odd cols),
* ``xp``: the pass-through channels ``[R, D)``, ``[M, PASS_P]``.

Rotation is then elementwise (``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin``) with no
in-register permute, and a dot product over the head is the sum of three partial dots, because
q·k does not depend on the order of the channels. ``HALF_P``/``PASS_P`` are powers of two >= 16
(every ``tl.dot`` operand dimension must be >= 16 on GPUs); padded columns load as 0, so they add
nothing to a dot. The attention backward (backward.py) reuses these helpers: the gradient of a rotation
is the rotation by the opposite angle, i.e. ``rotate_pairs(g1, g2, cos, -sin)``; ``step_table`` +
``tile_cos_sin`` give the cos/sin of a K tile cheaply when its positions are consecutive.

``ROPE_TABLE`` (constexpr) switches the cos/sin source to a caller's table ``[rows, 2, HALF]`` looked up
by position (``rope_math.table_cos_sin``); ``split_ptr`` then points at it and ``rows`` is its length.
"""

import triton
import triton.language as tl

from .rope_math import position_cos_sin, rope_cos_sin


@triton.jit
def load_2d(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """``tl.load`` of a 2-D pointer block with only the masks that are needed (0 where masked)."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def pair_columns(HALF: tl.constexpr, HALF_P: tl.constexpr, INTERLEAVED: tl.constexpr):
    """``(pair index [HALF_P], column of x1, column of x2)`` for the pair layout."""
    idx = tl.arange(0, HALF_P)
    if INTERLEAVED:
        c1 = 2 * idx
        c2 = 2 * idx + 1
    else:
        c1 = idx
        c2 = idx + HALF
    return idx, c1, c2


@triton.jit
def rotate_pairs(x1, x2, cos, sin):
    """Rotate pairs in fp32: ``(x1 cos - x2 sin, x2 cos + x1 sin)``; inverse: pass ``-sin``."""
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def load_pairs(
    row_ptrs, row_mask, HALF: tl.constexpr, HALF_P: tl.constexpr, INTERLEAVED: tl.constexpr, MASK_ROWS: tl.constexpr
):
    """The two channels of every pair of rows ``row_ptrs [M]`` (pointers to channel 0): ``[M, HALF_P]`` each."""
    idx, c1, c2 = pair_columns(HALF, HALF_P, INTERLEAVED)
    col_mask = idx < HALF
    x1 = load_2d(row_ptrs[:, None] + c1[None, :], row_mask, col_mask, MASK_ROWS, HALF != HALF_P)
    x2 = load_2d(row_ptrs[:, None] + c2[None, :], row_mask, col_mask, MASK_ROWS, HALF != HALF_P)
    return x1, x2


@triton.jit
def load_rotary(
    row_ptrs,
    row_mask,
    pos,
    split_ptr,
    attention_factor,
    rows,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROTATE: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    """Load the rotary part of rows ``row_ptrs [M]`` (pointers to channel 0) and rotate it.

    ``pos [M]`` int32 positions, ``split_ptr`` the sequence's split table ``float32 [4, HALF]`` (or
    with ``ROPE_TABLE`` a caller's table ``float32 [rows, 2, HALF]``).
    Returns ``(x1, x2)`` ``[M, HALF_P]`` in the input dtype: rotated in fp32 and rounded once when
    ``ROTATE``, the raw loads otherwise (the RoPE-off variant costs no conversion).
    """
    x1, x2 = load_pairs(row_ptrs, row_mask, HALF, HALF_P, INTERLEAVED, MASK_ROWS)
    if ROTATE:
        idx = tl.arange(0, HALF_P)
        cos, sin = position_cos_sin(pos, split_ptr, idx, idx < HALF, HALF, attention_factor, rows, ROPE_TABLE)
        y1, y2 = rotate_pairs(x1, x2, cos, sin)
        x1 = y1.to(x1.dtype)
        x2 = y2.to(x2.dtype)
    return x1, x2


@triton.jit
def step_table(split_ptr, HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK: tl.constexpr):
    """``(cos, sin)(j f)`` for ``j`` in ``[0, BLOCK)``, factor 1: the steps of ``tile_cos_sin``, ``[BLOCK, HALF_P]``."""
    idx = tl.arange(0, HALF_P)
    return rope_cos_sin(tl.arange(0, BLOCK), split_ptr, idx, idx < HALF, HALF, 1.0)


@triton.jit
def tile_cos_sin(
    pos,
    valid,
    split_ptr,
    step_cos,
    step_sin,
    attention_factor,
    rows,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """cos/sin ``[BLOCK, HALF_P]`` (times the attention factor) for a tile's positions ``pos [BLOCK]``.

    When the ``valid`` positions of the tile are consecutive (``pos[j] = p0 + j``, as with default
    positions), by angle addition: ``e^{i (p0 + j) f} = e^{i p0 f} e^{i j f}`` from the accurate
    ``(cos, sin)(p0 f)`` (one row) and ``step_table``: 4 FMAs per element instead of a full angle
    (~35 ops) and two transcendentals (~30 ops on GPUs). The angle errors add (measured within
    6.6e-7 of exact up to position 2**31). Any other tile (repeats, jumps, PCW) takes the direct path.

    With ``ROPE_TABLE`` every tile looks its rows up in the caller's table ``[rows, 2, HALF]`` (an
    arbitrary table has no angle to add; ``step_cos``/``step_sin`` are not read).
    """
    idx = tl.arange(0, HALF_P)
    pair_mask = idx < HALF
    if ROPE_TABLE:
        cos, sin = position_cos_sin(pos, split_ptr, idx, pair_mask, HALF, attention_factor, rows, ROPE_TABLE)
    else:
        rel = pos - tl.arange(0, BLOCK)
        first = tl.min(tl.where(valid, rel, 2147483647), 0)
        last = tl.max(tl.where(valid, rel, -1), 0)
        if first == last:
            base = tl.zeros([1], dtype=tl.int32) + first
            base_cos, base_sin = rope_cos_sin(base, split_ptr, idx, pair_mask, HALF, attention_factor)
            cos = base_cos * step_cos - base_sin * step_sin
            sin = base_sin * step_cos + base_cos * step_sin
        else:
            cos, sin = rope_cos_sin(pos, split_ptr, idx, pair_mask, HALF, attention_factor)
    return cos, sin


@triton.jit
def load_pass(
    row_ptrs, row_mask, ROTARY_DIM: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr, MASK_ROWS: tl.constexpr
):
    """The pass-through channels ``[ROTARY_DIM, ROTARY_DIM + PASS)`` of rows ``row_ptrs [M]``: ``[M, PASS_P]``."""
    idx = tl.arange(0, PASS_P)
    return load_2d(row_ptrs[:, None] + ROTARY_DIM + idx[None, :], row_mask, idx < PASS, MASK_ROWS, PASS != PASS_P)


@triton.jit
def add_seen_nonfinite(acc, v_row_ptr, d, d_ok, key, n_keys, lim):
    """``acc [M, D]`` plus the NaN and infinities of one V row (``key`` < ``n_keys``, at ``v_row_ptr``)
    for the rows that see it (``lim [M] >= key``): what a positive probability times them gives, whatever the
    probability (adding keeps their meaning: inf + -inf and NaN + x are NaN). With the P·V dot
    taking ``finite_or_zero(V)``, a row's zero probability of a key it cannot see never meets that
    key's NaN (0 * NaN = NaN). Kernels call it key by key after the dot, only for a masked block
    whose V holds a non-finite value: formed for the whole tile at once (reductions over [N, D], or
    a counting dot) it made the forward kernel spill 68-846 B (sm_80 / sm_90, ptxas -v)."""
    vj = tl.load(v_row_ptr + d, mask=d_ok & (d * 0 + key < n_keys), other=0.0).to(tl.float32)
    bad = vj * 0.0 != 0.0
    return acc + tl.where((lim >= key)[:, None] & bad[None, :], vj[None, :], 0.0)


@triton.jit
def is_finite(v):
    """Elementwise: neither a NaN nor an infinity (x * 0 is NaN exactly for those), in fp32."""
    v = v.to(tl.float32)  # the interpreter's bf16 arithmetic works on raw bits
    return v * 0.0 == 0.0


@triton.jit
def finite_or_zero(v):
    """``v`` with its NaN and infinities replaced by 0 (for the P·V dot after ``nonfinite_values``)."""
    return tl.where(is_finite(v), v, tl.zeros_like(v))
