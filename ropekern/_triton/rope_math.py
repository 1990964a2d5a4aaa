"""Triton device functions for the accurate RoPE angle (docs/design.md §4), shared by every Triton kernel.

The angle is formed exactly as ``ropekern.scaling.angle_turns_fp32`` specifies (and as the C++
header ``csrc/include/ropekern/rope_math.h`` does): 12-bit position chunks times 12-bit frequency
pieces are exact in fp32, so reducing them modulo one turn loses nothing; only the additions of
reduced values, the small products and the final multiplication by 2π round. Error <= ~1.6e-6 rad
for every position below 2**31 (measured 8.4e-7).

A caller's table (``ropekern.RopeTable``, ``RopeArgs.table_positions`` P > 0) replaces the law:
``table_cos_sin`` looks its rows up instead, and ``position_cos_sin`` picks either by a constexpr,
so the law path compiles exactly as it does without tables.
"""

import triton
import triton.language as tl

# A constexpr: a plain float global compiles under the interpreter but is rejected by the GPU compiler.
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _reduce(x):
    return x - tl.floor(x + 0.5)


@triton.jit
def angle_turns(pos, f1, f2, f3, f4):
    """Angle in turns in [-0.5, 0.5] for int32 positions ``pos`` and split frequencies (broadcast)."""
    p2 = (pos >> 24).to(tl.float32) * 16777216.0
    p1 = ((pos >> 12) & 4095).to(tl.float32) * 4096.0
    p0 = (pos & 4095).to(tl.float32)
    h = _reduce(p2 * f1)
    h = _reduce(h + _reduce(p2 * f2))
    h = _reduce(h + _reduce(p2 * f3))
    h = _reduce(h + _reduce(p1 * f1))
    h = _reduce(h + _reduce(p1 * f2))
    small = p1 * f3 + (p2 * f4 + p1 * f4)
    s = _reduce(h + _reduce(p0 * f1))
    return _reduce(s + (small + (p0 * f2 + (p0 * f3 + p0 * f4))))


@triton.jit
def load_split(split_ptr, pair_idx, pair_mask, HALF: tl.constexpr):
    """The four rows (f1, f2, f3, f4) of one sequence's split table ``float32 [4, HALF]`` at ``pair_idx``."""
    f1 = tl.load(split_ptr + pair_idx, mask=pair_mask, other=0.0)
    f2 = tl.load(split_ptr + HALF + pair_idx, mask=pair_mask, other=0.0)
    f3 = tl.load(split_ptr + 2 * HALF + pair_idx, mask=pair_mask, other=0.0)
    f4 = tl.load(split_ptr + 3 * HALF + pair_idx, mask=pair_mask, other=0.0)
    return f1, f2, f3, f4


@triton.jit
def rope_cos_sin(pos, split_ptr, pair_idx, pair_mask, HALF: tl.constexpr, attention_factor):
    """cos/sin (times the attention factor) for positions ``pos [M]`` and pairs ``pair_idx [P]``.

    ``split_ptr`` points at one sequence's table ``float32 [4, HALF]`` (rows f1..f4). Returns two
    fp32 ``[M, P]`` blocks; masked pairs get cos = attention_factor, sin = 0 (ignored).
    """
    f1, f2, f3, f4 = load_split(split_ptr, pair_idx, pair_mask, HALF)
    t = angle_turns(pos[:, None], f1[None, :], f2[None, :], f3[None, :], f4[None, :])
    angle = t * TWO_PI
    return tl.cos(angle) * attention_factor, tl.sin(angle) * attention_factor


@triton.jit
def table_cos_sin(pos, table_ptr, pair_idx, pair_mask, HALF: tl.constexpr, rows):
    """cos/sin of a caller's table ``float32 [rows, 2, HALF]`` (row p: HALF cos, then HALF sin) at
    row ``clamp(pos, 0, rows - 1)`` for positions ``pos [M]`` and pairs ``pair_idx [P]``.

    The host refuses positions past the table; the clamp keeps unchecked calls (``torch.compile``)
    and masked rows in bounds. Returns two fp32 ``[M, P]`` blocks used as given (the table holds
    any magnitude factor); masked pairs get cos = 1, sin = 0 (ignored).
    """
    row = tl.minimum(tl.maximum(pos, 0), rows - 1).to(tl.int64) * (2 * HALF)
    ptrs = table_ptr + row[:, None] + pair_idx[None, :]
    mask = pair_mask[None, :]
    return tl.load(ptrs, mask=mask, other=1.0), tl.load(ptrs + HALF, mask=mask, other=0.0)


@triton.jit
def position_cos_sin(
    pos, split_ptr, pair_idx, pair_mask, HALF: tl.constexpr, attention_factor, rows, ROPE_TABLE: tl.constexpr
):
    """``table_cos_sin`` of a caller's table ``[rows, 2, HALF]`` when ``ROPE_TABLE``, else
    ``rope_cos_sin`` of the split table at ``split_ptr`` (``rows`` unused): fp32 ``[M, P]`` each."""
    if ROPE_TABLE:
        cos, sin = table_cos_sin(pos, split_ptr, pair_idx, pair_mask, HALF, rows)
    else:
        cos, sin = rope_cos_sin(pos, split_ptr, pair_idx, pair_mask, HALF, attention_factor)
    return cos, sin
