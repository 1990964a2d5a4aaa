"""Triton ``apply_rope``: a rotated copy of x (the "separate RoPE pass" of the benchmarks).

One program owns ``BLOCK_S`` tokens of one batch row: it forms their cos/sin once (accurate
angles, fp32, attention factor applied; or the rows of a caller's table, ``ROPE_TABLE``) and rotates
every head with them, so the trigonometry is
paid once per token rather than once per (token, head). Pass-through channels are copied as raw
loads and stores, bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import RopeArgs
from .host import INTERPRET, MAX_GRID_YZ, head_constants, table_args
from .rope_math import position_cos_sin
from .rope_tile import load_2d, load_pass, pair_columns, rotate_pairs


def gpu_block_s(half_p: int) -> int:
    """Tokens per program on GPUs: ~1K rotated pairs. cos/sin stay live over the head loop; 2K
    pairs spilled 116 B per thread (sm_80, fp16, D = 96, R = 64, interleaved; ptxas -v), 1K uses
    139 registers and no spill."""
    return max(16, min(128, 1024 // half_p))


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _apply_rope_kernel(
    X,
    Out,
    Pos,
    Split,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_pb,
    stride_tb,
    seqlen,
    num_heads,
    attention_factor,
    table_positions,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS: tl.constexpr,
    PASS_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    toks = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = toks < seqlen
    b64 = b.to(tl.int64)
    t64 = toks.to(tl.int64)
    pos = tl.load(Pos + b64 * stride_pb + toks, mask=ok, other=0)
    idx, c1, c2 = pair_columns(HALF, HALF_P, INTERLEAVED)
    col_ok = idx < HALF
    cos, sin = position_cos_sin(
        pos, Split + b * stride_tb, idx, col_ok, HALF, attention_factor, table_positions, ROPE_TABLE
    )
    pmask = ok[:, None] & col_ok[None, :]
    # Pointers advance by one head stride per step: no h * stride product that could pass 2**31.
    x_rows = X + b64 * stride_xb + t64 * stride_xs
    o_rows = Out + b64 * stride_ob + t64 * stride_os
    for _ in range(num_heads):
        x1 = load_2d(x_rows[:, None] + c1[None, :], ok, col_ok, True, HALF != HALF_P)
        x2 = load_2d(x_rows[:, None] + c2[None, :], ok, col_ok, True, HALF != HALF_P)
        y1, y2 = rotate_pairs(x1, x2, cos, sin)
        tl.store(o_rows[:, None] + c1[None, :], y1.to(x1.dtype), mask=pmask)
        tl.store(o_rows[:, None] + c2[None, :], y2.to(x2.dtype), mask=pmask)
        if PASS > 0:
            pidx = tl.arange(0, PASS_P)
            xp = load_pass(x_rows, ok, 2 * HALF, PASS, PASS_P, True)
            tl.store(o_rows[:, None] + 2 * HALF + pidx[None, :], xp, mask=ok[:, None] & (pidx < PASS)[None, :])
        x_rows += stride_xh
        o_rows += stride_oh


def forward(x: torch.Tensor, positions: torch.Tensor, rope: RopeArgs) -> torch.Tensor:
    """Rotated copy of ``x`` ``[B, S, H, D]`` (positions int32 ``[B, S]``) or ``[T, H, D]``
    (positions ``[T]``); ``rope.split`` float32 ``[nT, 4, R/2]``, nT in {1, B}, or a caller's table
    ``[P, 2, R/2]`` (``rope.table_positions`` P > 0). Returns a contiguous tensor of x's shape and dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rotate_into(x, positions, rope, out)
    return out


def in_place(x: torch.Tensor, positions: torch.Tensor, rope: RopeArgs) -> None:
    """``forward`` written into ``x`` itself (any strides): each program loads a block of rows before
    it stores them, and no two programs touch the same row."""
    rotate_into(x, positions, rope, x)


def rotate_into(x: torch.Tensor, positions: torch.Tensor, rope: RopeArgs, out: torch.Tensor) -> None:
    """``x`` rotated into ``out`` (x's shape, any strides with a contiguous last dimension)."""
    if x.numel() == 0:
        return
    if x.dim() == 3:
        xs, os_, ps = (0, *x.stride()), (0, *out.stride()), 0
        batch, seqlen = 1, x.shape[0]
    else:
        xs, os_, ps = x.stride(), out.stride(), positions.stride(0)
        batch, seqlen = x.shape[0], x.shape[1]
    if positions.shape[-1] > 1 and positions.stride(-1) != 1:
        positions = positions.contiguous()
        ps = positions.stride(0) if positions.dim() == 2 else 0
    split, stride_tb, table_positions = table_args(rope)
    head = head_constants(x.shape[-1], rope.rotary_dim)
    block_s = 16 if INTERPRET else gpu_block_s(head["HALF_P"])  # 16 tokens interpreted, so tails are tested
    grid = (triton.cdiv(seqlen, block_s), batch)
    _apply_rope_kernel[grid](
        x, out, positions, split,
        xs[0], xs[1], xs[2], os_[0], os_[1], os_[2], ps,
        stride_tb, seqlen, x.shape[-2], rope.attention_factor, table_positions,
        HALF=head["HALF"], HALF_P=head["HALF_P"], PASS=head["PASS"], PASS_P=head["PASS_P"],
        INTERLEAVED=rope.interleaved, ROPE_TABLE=table_positions > 0, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip


def limits(x: torch.Tensor) -> str | None:
    """None when the kernel takes ``x`` (device not checked), else the reason."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (float16, bfloat16, float32)"
    if x.dim() == 4 and x.shape[0] > MAX_GRID_YZ:
        return f"batch ({x.shape[0]}) must be <= {MAX_GRID_YZ}"
    return None
