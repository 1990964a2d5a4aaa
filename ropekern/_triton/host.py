"""Host-side constants and helpers shared by every Triton launcher."""

from __future__ import annotations

import os

import torch
import triton

# Read once, before triton compiles anything: the interpreter runs kernels on CPU tensors (CI).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # the kernels use exp2: scale * log2(e) folds the conversion into the scale
MAX_GRID_YZ = 65535  # CUDA grid y / z limit; batch and heads index those dimensions


def pow2(n: int) -> int:
    """Padded block width: a power of two >= 16 (the smallest tl.dot operand dimension on GPUs)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def head_constants(head_dim: int, rotary_dim: int) -> dict[str, int]:
    """The head-split constexprs every kernel takes: ``HEAD_DIM`` (D), ``HALF`` (rotary pairs R/2),
    ``PASS`` (pass-through channels D - R) and their padded widths ``*_P``; ``PASS_P`` is 0 when
    there is no pass-through (the configs' register tables key on 2 * HALF_P + PASS_P columns)."""
    half, passthrough = rotary_dim // 2, head_dim - rotary_dim
    return dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_P=pow2(head_dim),
        HALF=half,
        HALF_P=pow2(half),
        PASS=passthrough,
        PASS_P=pow2(passthrough) if passthrough > 0 else 0,
    )


def rotary_split(rope) -> tuple[int, bool]:
    """``(R, rotate)`` of ``RopeArgs``: rotary_dim 0 runs without rotation, with the head split of
    the table (R = 2 * its columns) so that the same kernel runs, rotation compiled out."""
    return (rope.rotary_dim or 2 * rope.split.shape[-1]), rope.rotary_dim > 0


def table_args(rope) -> tuple[torch.Tensor, int, int]:
    """``(table, batch stride, P)`` of ``RopeArgs`` for the kernels' ``Split`` pointer: the law's split
    table ``[nT, 4, R/2]`` with stride 0 when shared (nT = 1) and P = 0, or a caller's table
    ``[P, 2, R/2]`` (``table_positions`` P > 0), shared by every sequence (stride 0)."""
    split = rope.split.contiguous()
    if rope.table_positions:
        return split, 0, int(rope.table_positions)
    return split, (split.stride(0) if split.shape[0] > 1 else 0), 0
