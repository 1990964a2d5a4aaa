"""Triton fused scaled-RoPE + FlashAttention-2 forward (docs/design.md §2, §4).

One kernel serves every rope type, both layouts and both pair conventions. It takes **un-rotated**
q, k, v: the Q tile is rotated once after it loads, each K tile right after it loads, in fp32
registers with the accurate angle of ``rope_math.rope_cos_sin``; V is never rotated. A K tile whose
positions are consecutive (default positions) gets its cos/sin by angle addition from one accurate
row and a per-program step table (``rope_tile.tile_cos_sin``): the per-element trigonometry is what
the rotation costs, and each K tile is rotated once per query tile. Scaling laws reach the kernel
only as the host split table ``[nT, 4, R/2]`` (batch stride 0 when shared), so a new law needs no
new kernel. A caller's table (``ROPE_TABLE``: ``ropekern.RopeTable``, ``[P, 2, R/2]`` shared by the
batch) takes the law's place: Q and every K tile look their cos/sin rows up by position, with no
step table (an arbitrary table has no angle addition).

Tiling. A program owns ``BLOCK_M`` rows of one (sequence, kv head): row ``r`` is query
``r // GROUP`` of query head ``kv_head * GROUP + r % GROUP``, i.e. the GQA group is folded into M,
so each K/V tile (and its rotation) is loaded once for the whole group. Keys are visited in two
phases: blocks that every row sees (no masks at all), then the causal diagonal / ragged tail with
masks. A sliding window (``WINDOW``, flash-attn's ``window_size``) bounds the keys of a query tile
on both sides: blocks outside every row's band are never loaded, and the masked phase covers both
of its edges. q·k is the sum of three partial dots over the rotary halves and the pass-through block
(see ``rope_tile``), so no in-register permute is needed for either pair layout.

Outputs: ``out`` like q (contiguous) and the natural-log LSE in fp32, which is what a
FlashAttention-2 backward needs besides the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import RopeArgs
from .host import INTERPRET, LOG2E, MAX_GRID_YZ, head_constants, rotary_split, table_args
from .rope_tile import (
    add_seen_nonfinite,
    finite_or_zero,
    is_finite,
    load_2d,
    load_pairs,
    load_pass,
    load_rotary,
    rotate_pairs,
    step_table,
    tile_cos_sin,
)

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages), none timed on a GPU yet. Every config the
# pruner keeps compiles for sm_80 / sm_90 without register spills (``ptxas -v`` through ``aot.py``;
# figures in docs/triton-fwd.md). A program keeps for its whole key loop the fp32 accumulator, the
# rotated Q tile and the fp32 cos/sin step table of ``rope_tile.step_table`` (2 x BLOCK_N x HALF_P
# x 4 B), and rotates each K tile in fp32. The 4-warp 128-row shapes of public FA2 kernels spill
# here (128 x 64 x 4 warps, D = 128 bf16: 5.8 KB per thread on sm_90), so every config has 8 warps
# and BLOCK_N <= 64: 128 x 32 x 8 warps uses 253 registers and no spill at D = 128 bf16. Even 64 x 64 x
# 4 warps spilled at D = 64 on sm_80 (72 B; none on sm_90). ``_SPILL_FREE`` lists, per head
# class, the configs measured spill-free; the pruner keeps only those. 32-row and 16-key tiles are for
# D = 256 (a 64 x 256 fp32 accumulator alone is 64 registers per thread at 8 warps); (32, 16, 8, 1)
# is the fallback for every head (<= 48 KB of shared memory).
_AMPERE = ((128, 32, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 1))
_HOPPER = ((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 1))
# Under the interpreter every tile step is ~1000 Python-level ops (~40 ms): 32 x 32 tiles keep the
# test shapes (<= 129 tokens) on several blocks, so ragged tails, both key phases and GQA groups
# split across tiles are exercised, at a quarter of the iterations of 16 x 16.
_INTERPRETER = ((32, 32, 4, 1),)


# Register limit passed to ptxas (``.maxnreg``). Without it ptxas capped some 8-warp programs at
# 128 or 80 registers and spilled rather than use more (32 x 16 x 8 warps: D = 128 GROUP 4 on
# sm_90, 128 registers and 128 B of spills; D = 64 on sm_80, 80 and 4 B); with it: 163 and 112
# registers, no spill.
MAXNREG = 255


def _configs() -> list[triton.Config]:
    shapes = _INTERPRETER if INTERPRET else tuple(dict.fromkeys(_AMPERE + _HOPPER))
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=None if INTERPRET else MAXNREG)
        for m, n, w, s in shapes
    ]


_H64 = frozenset(_HOPPER)
_A64 = frozenset(_AMPERE)
_SMALL = frozenset({(64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 1)})
_FALLBACK = frozenset({(32, 16, 8, 1)})
# Measured spill-free (``ptxas -v`` via ``aot.compile_attention``, rotated, causal): (generation,
# element size, head class) -> configs. The head class is the padded width of the widest tile,
# max(HEAD_DIM_P, 2 * HALF_P + PASS_P), at least 64. fp16 was compiled where bf16 was (same
# register footprint). fp32 operands double the Q / K / V tiles: at D = 128 only 32 x 16 x 8 warps
# is spill-free (64 x 16: 24 B, 32 x 32: 52 B on sm_90). The RoPE-off variant uses fewer registers.
# GROUP 1 (measured before ``MAXNREG``, which only lifts the ptxas cap):
_SPILL_FREE = {
    (9, 2, 64): _H64,
    (9, 2, 128): _H64 - {(128, 64, 8, 3)},  # 128 x 64: 244 B
    (9, 2, 256): _SMALL,  # 128 x 32: 2 KB, 64 x 64: 1.7 KB
    (9, 4, 64): _SMALL,  # 64 x 64: 44 B
    (9, 4, 128): _FALLBACK,
    (9, 4, 256): _FALLBACK,
    # sm_80 without MAXNREG capped some shapes (D = 64: 32 x 16 x 8 warps at 80 registers, 4 B;
    # 128 x 32 x 8 at 128 registers, 32 B); not re-measured with it, so still out.
    (8, 2, 64): _A64 - {(32, 16, 8, 1), (128, 32, 8, 2)},
    (8, 2, 128): _SMALL | {(128, 32, 8, 2)},  # 64 x 64: 92 B, 128 x 64: 212 B
    (8, 2, 256): _FALLBACK,  # 64 x 16: 196 B, 32 x 32: 48 B
    (8, 4, 64): _SMALL,
    (8, 4, 128): _FALLBACK,
    (8, 4, 256): _FALLBACK,
}
# GROUP > 1 (measured at GROUP 4 with MAXNREG): the GQA rows (row r is query r // GROUP of head
# r % GROUP) cost registers; 64 x 64 x 8 at D = 128 spilled 472 B at GROUP 2 and 412 B at GROUP 4.
_SPILL_FREE_GQA = {
    (9, 2, 64): _H64,
    # 128 x 32 x 8: spill-free at D = 128 (GROUP 4, also varlen or R = 64), but 32 B at D = 80,
    # R = 48 (GROUP 2) and 200 B with interleaved pairs and varlen: out.
    (9, 2, 128): _SMALL,
    (9, 2, 256): _SMALL,
    (9, 4, 64): _SMALL,
    (9, 4, 128): _FALLBACK,
    (9, 4, 256): _FALLBACK,
    (8, 2, 64): _A64 - {(128, 64, 8, 2)},  # 16 B
    (8, 2, 128): _SMALL,  # 128 x 32: 100 B, 64 x 64: 108 B
    (8, 2, 256): _FALLBACK,  # 64 x 16: 152 B, 32 x 32: 96 B
    (8, 4, 64): _SMALL,
    (8, 4, 128): _FALLBACK,
    (8, 4, 256): _FALLBACK,
}
# A caller's table (``ROPE_TABLE``) loads fp32 cos/sin rows per K tile instead of keeping the step
# table: spill-free wherever the lists above are (sm_90 and sm_80, D 64 / 128, GROUP 1 and 4, 16-bit
# and fp32) except these sm_80 16-bit GROUP 1 configs (Triton 3.9 ptxas; bf16 / fp16, bytes per thread):
_TABLE_SPILLS = {
    (8, 2, 64): frozenset({(128, 64, 8, 2)}),  # 268 B bf16
    (8, 2, 128): frozenset({(128, 32, 8, 2)}),  # 200 B bf16, 60 B fp16
}
# The sliding-window variant (``WINDOW``: the band's bounds and its mask) is spill-free wherever the
# lists above are (every config of ``_SPILL_FREE`` / ``_SPILL_FREE_GQA`` compiled, bf16 and fp32,
# causal, GROUP 1 and 4, Triton 3.9 ptxas) except these (bytes per thread):
_WINDOW_SPILLS = {
    (9, 2, 128): frozenset({(64, 64, 8, 3)}),  # 180 B
    (9, 2, 256): frozenset({(32, 32, 8, 2)}),  # 16 B
}
_WINDOW_SPILLS_GQA = {
    (9, 2, 256): frozenset({(32, 32, 8, 2)}),  # 124 B
    (8, 2, 64): frozenset({(64, 64, 8, 3)}),  # 8 B
}


def head_class(head_dim_p: int, k_cols: int) -> int:
    """The ``_SPILL_FREE`` head class of a layout: a power of two in 64..256 (k_cols <= 3 * 128)."""
    return min(256, max(64, triton.next_power_of_2(max(head_dim_p, k_cols))))


def config_shape(c: triton.Config) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of a config, the key of the config tables."""
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def select_configs(
    configs: list[triton.Config],
    major: int,
    smem_limit: int,
    elem_size: int,
    head_dim_p: int,
    k_cols: int,
    group: int = 1,
    table: bool = False,
    window: bool = False,
) -> list[triton.Config]:
    """The configs of this GPU generation (``major`` 9+: Hopper list, else Ampere) that fit
    ``smem_limit`` bytes of shared memory and were measured to compile without register spills
    (``_SPILL_FREE``, ``_SPILL_FREE_GQA`` when ``group`` > 1), for a padded head of ``head_dim_p``
    (V / accumulator) and ``k_cols`` = 2 * HALF_P + PASS_P (Q / K) columns. The RoPE-off variant
    gets the same configs as the rotated one, so its RoPE tax is measured at equal tiles. ``table``:
    the caller's-table variant, without the configs it spills in (``_TABLE_SPILLS``); ``window``:
    the sliding-window variant, without those of ``_WINDOW_SPILLS`` (``_WINDOW_SPILLS_GQA``)."""
    key = (9 if major >= 9 else 8, 4 if elem_size >= 4 else 2, head_class(head_dim_p, k_cols))
    allowed = (_SPILL_FREE_GQA if group > 1 else _SPILL_FREE)[key]
    if table and group == 1:
        allowed = allowed - _TABLE_SPILLS.get(key, frozenset())
    if window:
        allowed = allowed - (_WINDOW_SPILLS_GQA if group > 1 else _WINDOW_SPILLS).get(key, frozenset())
    keep = []
    for c in configs:
        shape = config_shape(c)
        # Shared memory: one K and one V tile is a lower bound. Compiled for sm_80/sm_90 with D = 128
        # bf16, Triton allocated 0.75-1.5x of it whatever num_stages (24-66 KB): K passes through
        # registers to be rotated, so only part of the loads are multi-buffered. Configs that
        # still do not fit fail at launch with OutOfResources, which the autotuner skips.
        smem = c.kwargs["BLOCK_N"] * (k_cols + head_dim_p) * elem_size
        if shape in allowed and smem <= smem_limit:
            keep.append(c)
    if not keep:  # (32, 16, 8, 1) is in both families, spill-free everywhere and the smallest
        keep = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return keep


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuner hook: ``select_configs`` for the device of ``Q`` and this call's head layout."""
    q = named_args["Q"]
    major = torch.cuda.get_device_capability(q.device)[0]
    props = triton.runtime.driver.active.utils.get_device_properties(q.device.index or 0)
    k_cols = 2 * kwargs["HALF_P"] + kwargs["PASS_P"]
    return select_configs(
        configs, major, props["max_shared_mem"], q.element_size(), kwargs["HEAD_DIM_P"], k_cols, kwargs["GROUP"],
        kwargs["ROPE_TABLE"], kwargs["WINDOW"],
    )  # fmt: skip


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter multiplies bf16 as raw uint16 bits: compute in fp32 there (same rounded
    # inputs, so the result matches the GPU's fp32-accumulated bf16 MMA up to summation order).
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return out


@triton.jit
def window_band(sq, sk, window_left, window_right, CAUSAL: tl.constexpr):
    """flash-attn's window as key - query offsets ``(win_lo, win_hi)``: query i sees key j iff
    ``win_lo <= j - i <= win_hi``. -1 (unbounded) becomes a bound that cuts no key: ``-Sq`` on the
    left (``j - i > -Sq`` for every query i < Sq), ``Sk`` on the right (``j - i < Sk``); ``CAUSAL``
    ends the band at the diagonal (flash-attn's right bound 0)."""
    offset = sk - sq
    win_lo = offset - tl.where(window_left >= 0, window_left, sk)
    if CAUSAL:
        win_hi = offset
    else:
        win_hi = offset + tl.where(window_right >= 0, window_right, sq)
    return win_lo, win_hi


@triton.jit
def band_blocks(i_lo, i_hi, win_lo, win_hi, n, BLOCK: tl.constexpr):
    """Blocks of ``BLOCK`` columns for the rows ``[i_lo, i_hi]`` of a band (row i sees columns
    ``[i + win_lo, i + win_hi]`` of ``[0, n)``; ``win_lo <= win_hi`` and ``i_lo + win_lo < n``):
    ``(lo, full_lo, full_hi, hi)`` with ``lo <= full_lo <= full_hi <= hi``. Columns ``[lo, hi)``
    hold every column a row sees (``lo`` block-aligned); the blocks of ``[full_lo, full_hi)`` are
    seen whole by every row (block-aligned, or empty at ``hi``)."""
    lo = tl.maximum(i_lo + win_lo, 0) // BLOCK * BLOCK
    hi = tl.maximum(tl.minimum(n, i_hi + win_hi + 1), 0)
    full_lo = tl.minimum(tl.cdiv(tl.maximum(i_hi + win_lo, 0), BLOCK) * BLOCK, hi)
    full_hi = tl.maximum(tl.minimum(n, i_lo + win_hi + 1), 0) // BLOCK * BLOCK
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _attn_keys(
    acc,
    l_i,
    m_i,
    q1,
    q2,
    qp,
    qi,
    k_base,
    v_base,
    kpos_base,
    split,
    step_cos,
    step_sin,
    attention_factor,
    table_positions,
    qk_scale,
    k_start,
    sk,
    causal_offset,
    win_lo,
    win_hi,
    lo,
    hi,
    gap_lo,
    gap_hi,
    stride_ks,
    stride_vs,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS: tl.constexpr,
    PASS_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROTATE: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax over key blocks ``[lo, hi)``; ``MASKED`` blocks may be ragged, causal or
    (``WINDOW``) cut by the band ``qi + win_lo <= key <= qi + win_hi``, and then skip the blocks of
    ``[gap_lo, gap_hi)`` (the unmasked middle of the band: both edges run in one loop)."""
    d = tl.arange(0, HEAD_DIM_P)
    if WINDOW and MASKED:
        # One loop over both edges: with a third copy of the loop body ptxas spilled (sm_90, fp32,
        # D = 256, 32 x 16 x 8 warps, the only config there: 284 B per thread; 12 B with one loop).
        n_left = tl.cdiv(gap_lo - lo, BLOCK_N)
        it_lo = 0
        it_hi = n_left + tl.cdiv(hi - gap_hi, BLOCK_N)
    else:
        it_lo = lo
        it_hi = hi
    for it in range(it_lo, it_hi, 1 if WINDOW and MASKED else BLOCK_N):
        if WINDOW and MASKED:
            start = tl.where(it < n_left, lo + it * BLOCK_N, gap_hi + (it - n_left) * BLOCK_N)
        else:
            start = it
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < sk
        cols64 = (k_start + cols).to(tl.int64)
        k_rows = k_base + cols64 * stride_ks
        if MASKED:
            kpos = tl.load(kpos_base + cols, mask=col_ok, other=0)
        else:
            kpos = tl.load(kpos_base + cols)
        k1, k2 = load_pairs(k_rows, col_ok, HALF, HALF_P, INTERLEAVED, MASKED)
        if ROTATE:
            cos, sin = tile_cos_sin(
                kpos, col_ok, split, step_cos, step_sin, attention_factor, table_positions, HALF, HALF_P, ROPE_TABLE,
                BLOCK_N,
            )  # fmt: skip
            r1, r2 = rotate_pairs(k1, k2, cos, sin)
            k1 = r1.to(k1.dtype)
            k2 = r2.to(k2.dtype)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot(q1, tl.trans(k1), s, DOT_PREC, UPCAST)
        s = _dot(q2, tl.trans(k2), s, DOT_PREC, UPCAST)
        if PASS > 0:
            kp = load_pass(k_rows, col_ok, 2 * HALF, PASS, PASS_P, MASKED)
            s = _dot(qp, tl.trans(kp), s, DOT_PREC, UPCAST)
        s = s * qk_scale
        if MASKED:
            keep = col_ok[None, :]
            if WINDOW:
                # per-row bounds against the columns (a [M, N] difference cost that config its last 12 B)
                keep = keep & (cols[None, :] >= qi[:, None] + win_lo) & (cols[None, :] <= qi[:, None] + win_hi)
            elif CAUSAL:
                keep = keep & (cols[None, :] <= qi[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        if MASKED:
            p = tl.where(keep, p, 0.0)  # select, never multiply: NaN in a masked slot must not leak
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_2d(
            v_base + cols64[:, None] * stride_vs + d[None, :], col_ok, d < HEAD_DIM, MASKED, HEAD_DIM != HEAD_DIM_P
        )
        acc = acc * alpha[:, None]
        if MASKED:
            # A row's zero probability of a key it cannot see would meet that key's V in the dot: a
            # NaN or an infinity there must not reach it. The dot takes the finite part of V, and
            # in the rare block whose V holds one (a scalar branch, masked blocks only) each row
            # then adds the non-finite values of the keys it does see, key by key.
            nonfinite = tl.sum(tl.where(is_finite(v), 0, 1))
            v = finite_or_zero(v)
        acc = _dot(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
        if MASKED:
            if nonfinite > 0:
                if CAUSAL:
                    lim = qi + causal_offset
                else:
                    lim = tl.full([BLOCK_M], sk, dtype=tl.int32)
                for jj in range(BLOCK_N):
                    key = start + jj
                    v_row = v_base + (k_start + key).to(tl.int64) * stride_vs
                    if WINDOW:
                        # a row sees the key iff it lies in its band: limit key there, -1 elsewhere
                        rel = key - qi
                        key_lim = tl.where((rel >= win_lo) & (rel <= win_hi), key, -1)
                    else:
                        key_lim = lim
                    acc = add_seen_nonfinite(acc, v_row, d, d < HEAD_DIM, key, sk, key_lim)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(),
    key=[
        "HEAD_DIM_P",
        "HALF_P",
        "PASS_P",
        "GROUP",
        "INTERLEAVED",
        "ROTATE",
        "ROPE_TABLE",
        "CAUSAL",
        "WINDOW",
        "VARLEN",
        "Q_BUCKET",
        "K_BUCKET",
    ],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["Q_BUCKET", "K_BUCKET", "seqlen_q", "seqlen_k", "window_left", "window_right"])
def _rope_attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    QPos,
    KPos,
    Split,
    CuQ,
    CuK,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_qpb,
    stride_kpb,
    stride_tb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    attention_factor,
    table_positions,
    window_left,
    window_right,
    Q_BUCKET,
    K_BUCKET,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS: tl.constexpr,
    PASS_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROTATE: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Heaviest (causal: last) query blocks first, so the tail of the grid is short blocks.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    if VARLEN:
        q_start = tl.load(CuQ + b)
        sq = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        sk = tl.load(CuK + b + 1) - k_start
    else:
        q_start = 0
        sq = seqlen_q
        k_start = 0
        sk = seqlen_k
    r0 = pid_m * BLOCK_M
    if r0 >= sq * GROUP:
        return

    rows = r0 + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head64 = (hkv * GROUP + rows % GROUP).to(tl.int64)
    row_ok = qi < sq
    b64 = b.to(tl.int64)
    tok64 = (q_start + qi).to(tl.int64)
    # int64 offsets: B·S·H·D passes 2**31 at e.g. 128K tokens x 32 heads x 128 (or any packed qkv).
    q_rows = Q + b64 * stride_qb + tok64 * stride_qs + head64 * stride_qh
    q_pos = tl.load(QPos + b64 * stride_qpb + q_start + qi, mask=row_ok, other=0)
    split = Split + b * stride_tb
    q1, q2 = load_rotary(
        q_rows, row_ok, q_pos, split, attention_factor, table_positions, HALF, HALF_P, INTERLEAVED, ROTATE, ROPE_TABLE,
        True,
    )  # fmt: skip
    if PASS > 0:
        qp = load_pass(q_rows, row_ok, 2 * HALF, PASS, PASS_P, True)
    else:
        qp = q1  # never read: PASS == 0 compiles the third dot out

    causal_offset = sk - sq  # bottom-right alignment: query i sees key j iff j <= i + Sk - Sq
    if WINDOW:
        win_lo, win_hi = window_band(sq, sk, window_left, window_right, CAUSAL)
        i_lo = r0 // GROUP
        i_hi = tl.minimum((r0 + BLOCK_M - 1) // GROUP, sq - 1)
        lo, full_lo, full_hi, hi = band_blocks(i_lo, i_hi, win_lo, win_hi, sk, BLOCK_N)
    else:
        win_lo = causal_offset  # unused: no window
        win_hi = causal_offset
        full_lo = 0
        if CAUSAL:
            i_lo = r0 // GROUP
            i_hi = tl.minimum((r0 + BLOCK_M - 1) // GROUP, sq - 1)
            hi = tl.maximum(tl.minimum(sk, i_hi + causal_offset + 1), 0)
            full_hi = tl.maximum(tl.minimum(sk, i_lo + causal_offset + 1), 0) // BLOCK_N * BLOCK_N
        else:
            hi = sk
            full_hi = sk // BLOCK_N * BLOCK_N
        lo = full_hi

    hkv64 = hkv.to(tl.int64)
    k_base = K + b64 * stride_kb + hkv64 * stride_kh
    v_base = V + b64 * stride_vb + hkv64 * stride_vh
    kpos_base = KPos + b64 * stride_kpb + k_start

    if ROTATE and not ROPE_TABLE:
        step_cos, step_sin = step_table(split, HALF, HALF_P, BLOCK_N)
    else:
        step_cos = tl.zeros([BLOCK_N, HALF_P], dtype=tl.float32)  # unused: no rotation, or table rows
        step_sin = step_cos

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    # Key blocks [full_lo, full_hi) are seen whole by every row (no mask); [lo, hi) less those are the
    # causal diagonal or the window's edges and the ragged tail, masked.
    acc, l_i, m_i = _attn_keys(
        acc, l_i, m_i, q1, q2, qp, qi, k_base, v_base, kpos_base, split, step_cos, step_sin, attention_factor,
        table_positions, qk_scale, k_start, sk, causal_offset, win_lo, win_hi, full_lo, full_hi, full_lo, full_hi,
        stride_ks, stride_vs, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, ROPE_TABLE, CAUSAL,
        WINDOW, False, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_keys(
        acc, l_i, m_i, q1, q2, qp, qi, k_base, v_base, kpos_base, split, step_cos, step_sin, attention_factor,
        table_positions, qk_scale, k_start, sk, causal_offset, win_lo, win_hi, lo, hi, full_lo, full_hi, stride_ks,
        stride_vs, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, ROPE_TABLE, CAUSAL, WINDOW,
        True, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    # Rows that saw no key (causal with Sq > Sk, a window that ends before key 0, or an empty key
    # sequence): zeros and LSE -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    d = tl.arange(0, HEAD_DIM_P)
    o_rows = Out + b64 * stride_ob + tok64 * stride_os + head64 * stride_oh
    tl.store(o_rows[:, None] + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(Lse + b64 * stride_lb + head64 * stride_lh + tok64, lse, mask=row_ok)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    rope: RopeArgs,
    causal: bool,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel on validated inputs (the arguments of ``ATTENTION_SCHEMA``).

    Dense: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``, positions int32 ``[B, S]`` (last stride 1,
    batch stride may be 0). Varlen: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, positions ``[T]``,
    ``cu_seqlens_*`` int32 ``[B + 1]``. ``rope.split`` float32 ``[nT, 4, R/2]`` with nT in {1, B}, or
    a caller's table ``[P, 2, R/2]`` (``rope.table_positions`` P > 0). ``window_left/right``:
    flash-attn's sliding window per sequence (query i sees key j iff
    ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; -1 unbounded), compiled in only when set.
    Returns ``out`` (contiguous, q's shape and dtype) and LSE float32 ``[B, Hq, Sq]`` / ``[Hq, Tq]``.
    """
    varlen = cu_seqlens_q is not None
    d = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lse = torch.empty((hq, q.shape[0]), dtype=torch.float32, device=q.device)
        sb = (0, 0, 0, 0)
        sq_k_o = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0))
        so_h, sl = out.stride(1), (0, lse.stride(0))
        spos = (0, 0)
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        batch = q.shape[0]
        lse = torch.empty((batch, hq, q.shape[1]), dtype=torch.float32, device=q.device)
        sb = (q.stride(0), k.stride(0), v.stride(0), out.stride(0))
        sq_k_o = (q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), out.stride(1))
        so_h, sl = out.stride(2), (lse.stride(0), lse.stride(1))
        if q_positions.shape[-1] > 1 and q_positions.stride(-1) != 1:
            q_positions = q_positions.contiguous()
        if k_positions.shape[-1] > 1 and k_positions.stride(-1) != 1:
            k_positions = k_positions.contiguous()
        spos = (q_positions.stride(0), k_positions.stride(0))
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
    if out.numel() == 0 or batch == 0 or max_seqlen_q == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    if max_seqlen_k == 0 or k.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    split, stride_tb, table_positions = table_args(rope)
    rotary_dim, rotate = rotary_split(rope)
    group = hq // hkv
    dummy = q_positions  # stands in for the cu_seqlens pointers of the dense layout (never read)

    def grid(meta):
        return (triton.cdiv(max_seqlen_q * group, meta["BLOCK_M"]), hkv, batch)

    _rope_attn_fwd[grid](
        q, k, v, out, lse, q_positions, k_positions, split,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        sb[0], sq_k_o[0], sq_k_o[1],
        sb[1], sq_k_o[2], sq_k_o[3],
        sb[2], sq_k_o[4], sq_k_o[5],
        sb[3], sq_k_o[6], so_h,
        sl[0], sl[1],
        spos[0], spos[1], stride_tb,
        seqlen_q, seqlen_k,
        softmax_scale * LOG2E, rope.attention_factor, table_positions, window_left, window_right,
        triton.next_power_of_2(max_seqlen_q), triton.next_power_of_2(max_seqlen_k),
        GROUP=group, **head_constants(d, rotary_dim),
        INTERLEAVED=rope.interleaved, ROTATE=rotate, ROPE_TABLE=table_positions > 0, CAUSAL=causal,
        WINDOW=window_left >= 0 or window_right >= 0, VARLEN=varlen,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )  # fmt: skip
    return out, lse


def limits(q: torch.Tensor, k: torch.Tensor, batch: int) -> str | None:
    """None when the kernel takes these inputs (device not checked), else the reason."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    hkv = k.shape[-2]
    if hkv > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        return f"batch ({batch}) and key/value heads ({hkv}) must each be <= {MAX_GRID_YZ}"
    return None
