"""Triton ``apply_rope``: a rotated copy of x (the "separate RoPE pass" of the benchmarks).

One program owns ``BLOCK_S`` tokens of one batch row: it forms their cos/sin once (accurate
angles, fp32, attention factor applied) and rotates every head with them, so the trigonometry is
paid once per token rather than once per (token, head). Pass-through channels are copied as raw
loads and stores, bit-exact.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .rope_math import rope_cos_sin
from .rope_tile import load_2d, load_pass, pair_columns, rotate_pairs


def gpu_block_s(half_p: int) -> int:
    """Tokens per program on GPUs: ~1K rotated pairs. cos/sin stay live over the head loop; 2K
    pairs spilled 116 B per thread (sm_80, fp16, D = 96, R = 64, interleaved; ptxas -v), 1K uses
    139 registers and no spill."""
    return max(16, min(128, 1024 // half_p))


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535


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
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS: tl.constexpr,
    PASS_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
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
    cos, sin = rope_cos_sin(pos, Split + b * stride_tb, idx, col_ok, HALF, attention_factor)
    pmask = ok[:, None] & col_ok[None, :]
    pidx = tl.arange(0, PASS_P)
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
            xp = load_pass(x_rows, ok, 2 * HALF, PASS, PASS_P, True)
            tl.store(o_rows[:, None] + 2 * HALF + pidx[None, :], xp, mask=ok[:, None] & (pidx < PASS)[None, :])
        x_rows += stride_xh
        o_rows += stride_oh


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def forward(
    x: torch.Tensor,
    positions: torch.Tensor,
    split: torch.Tensor,
    attention_factor: float,
    rotary_dim: int,
    interleaved: bool,
) -> torch.Tensor:
    """Rotated copy of ``x`` ``[B, S, H, D]`` (positions int32 ``[B, S]``) or ``[T, H, D]``
    (positions ``[T]``); ``split`` float32 ``[nT, 4, R/2]``, nT in {1, B}. Returns a contiguous
    tensor of x's shape and dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    if x.dim() == 3:
        xs, os_, ps = (0, *x.stride()), (0, *out.stride()), 0
        batch, seqlen = 1, x.shape[0]
    else:
        xs, os_, ps = x.stride(), out.stride(), positions.stride(0)
        batch, seqlen = x.shape[0], x.shape[1]
    if positions.shape[-1] > 1 and positions.stride(-1) != 1:
        positions = positions.contiguous()
        ps = positions.stride(0) if positions.dim() == 2 else 0
    split = split.contiguous()
    d = x.shape[-1]
    half = rotary_dim // 2
    half_p = _pow2(half)
    block_s = 16 if _INTERPRET else gpu_block_s(half_p)  # 16 tokens interpreted, so tails are tested
    grid = (triton.cdiv(seqlen, block_s), batch)
    _apply_rope_kernel[grid](
        x, out, positions, split,
        xs[0], xs[1], xs[2], os_[0], os_[1], os_[2], ps,
        split.stride(0) if split.shape[0] > 1 else 0,
        seqlen, x.shape[-2], attention_factor,
        HALF=half, HALF_P=half_p, PASS=d - rotary_dim, PASS_P=_pow2(d - rotary_dim) if d > rotary_dim else 16,
        INTERLEAVED=interleaved, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return out


def check(call) -> str | None:
    """None when the kernel supports the validated ``RopeCall``, else the reason."""
    if call.x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {call.x.dtype} is not supported (float16, bfloat16, float32)"
    if call.x.dim() == 4 and call.x.shape[0] > _MAX_GRID_YZ:
        return f"batch ({call.x.shape[0]}) must be <= {_MAX_GRID_YZ}"
    return None


def run(call) -> torch.Tensor:
    """Rotated copy of ``call.x`` for a validated ``RopeCall``, through the registered torch op."""
    from .ops import apply_rope

    _, split = call.tables()
    return apply_rope(
        call.x, call.positions, split, call.rope.attention_factor, call.rope.rotary_dim, call.rope.interleaved
    )
