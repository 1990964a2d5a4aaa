"""KV-cache decode with RoPE on read (the ``triton`` backend's ``kvcache`` op, docs/design.md §1–§2).

The cache holds **un-rotated** keys. Each call

1. appends ``k_new``/``v_new`` in place at ``cache_seqlens`` (``_append_kernel``, dense or paged);
2. attends the last Sq tokens of every sequence to its ``n = cache_seqlens + S_new`` keys
   (``_decode_kernel``), rotating every key as it is loaded with the table of *that sequence's
   current n* (``split [B, 4, R/2]`` for dynamic NTK / LongRoPE, ``[1, 4, R/2]`` otherwise). This is
   identical to recomputing the whole prefix, which is why length-dependent scaling stays exact.
   Query i sits at position ``n - Sq + i``. A sequence may hold fewer keys than queries (n < Sq,
   n = 0 included): its first Sq - n queries are rotated at position 0 and, under ``causal``
   (bottom-right: query i sees keys ``j <= n - Sq + i``), see no key (out 0, LSE -inf). With
   flash-attn's sliding window (``_decode_window_kernel``) query i sees key j iff
   ``j >= n - Sq + i - window_left`` and ``j <= n - Sq + i + window_right`` (-1: unbounded; the
   diagonal under ``causal``), and each program streams only the keys that some of its rows see;
3. with split-K (flash-decoding), merges the partial results by their LSE (``_merge_kernel``).

One program owns one (sequence, KV head, block of query rows, key split). Its M rows are the
GQA group's G query heads times the Sq queries (row ``m = i * G + g``, padded to >= 16), so each
K/V tile is read once per group, not once per query head.

Rotation cost. A K tile of BLOCK_N keys needs cos/sin for BLOCK_N x R/2 angles. Computing each
with the accurate-angle scheme (``rope_math.angle_turns``, ~25 fp32 ops) plus cos and sin would
cost ~30 ops per pair: about 10 ops per byte of fp16 K/V, the whole fp32 budget of an H100 at
full HBM bandwidth. Instead the kernel uses ``R(base + j) = R(base) R(j)``: the table for the
offsets ``j < BLOCK_N`` is computed once per program, and per tile only the R/2 angles of the tile
start ``base`` are formed, applied to the (small) Q tile as ``R(-base)``. The K tile then costs
4 fp32 ops per pair. Both angles come from ``angle_turns`` (accurate at every position), and the extra
rounding of the composition is within the docs/design.md §4 budget (2e-6): the composed cos/sin of these
device functions are within 6.6e-7 of exact at positions near 0, 2**20, 2**24, 2**28 and 2**31 (D 64 and 128,
bases 1e4 and 1e6; ``tests/test_triton_decode.py::test_composed_angles_accurate``, interpreter).
A caller's table (``ROPE_TABLE``: ``ropekern.RopeTable``, ``[P, 2, R/2]`` shared by the batch) has no
angle to compose: Q is rotated once with the rows of its positions and each K tile with the rows
of its keys' positions (``rope_math.table_cos_sin``), a load instead of the trigonometry.

Numerics: rotation, scores, online softmax and accumulation in fp32; Q and K are cast back to
the I/O dtype after rotation for the fp16/bf16 tensor-core dots (fp32 I/O uses IEEE fp32 dots,
never TF32). Masked probabilities are *selected* to zero, and slots at or past n are never loaded
(nor their block-table entries; with a window, neither are the keys left of every row's window),
so NaN in unused cache slots or garbage in unused block-table entries cannot leak. All memory
offsets are int64.

Performance: no GPU was available while this was written; the tile sizes below are a reasoned,
untimed heuristic (see ``_config``) and the kernel has only run under ``TRITONINTERPRET=1``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._validation import RopeArgs
from . import _release
from .host import INTERPRET, LOG2E, head_constants, pow2, rotary_split, table_args
from .rope_math import TWO_PI, angle_turns, load_split, table_cos_sin
from .rope_tile import add_seen_nonfinite, finite_or_zero, is_finite

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# A split should stream at least this many keys: below it the partial write + merge pass costs
# more than the extra parallelism gains (FlashDecoding uses splits of >= 256 keys for the same reason).
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64


# ---------------------------------------------------------------------------------- kernels
@triton.jit
def _append_kernel(
    KNEW,
    VNEW,
    KC,
    VC,
    SEQLENS,
    TABLE,
    S_NEW,
    HKV,
    stride_nb,
    stride_ns,
    stride_nh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGED: tl.constexpr,
    LOG2_BS: tl.constexpr,
):
    """Copy token s of sequence b (program (b * S_NEW + s, head block)) into slot cache_seqlens[b] + s."""
    pid = tl.program_id(0)
    b = pid // S_NEW
    s = pid % S_NEW
    b64 = b.to(tl.int64)
    t = tl.load(SEQLENS + b) + s
    if PAGED:
        blk = tl.load(TABLE + b64 * stride_tb + (t >> LOG2_BS)).to(tl.int64)
        slot = (t & ((1 << LOG2_BS) - 1)).to(tl.int64)
        k_dst = KC + blk * stride_kb + slot * stride_ks
        v_dst = VC + blk * stride_vb + slot * stride_vs
    else:
        k_dst = KC + b64 * stride_kb + t.to(tl.int64) * stride_ks
        v_dst = VC + b64 * stride_vb + t.to(tl.int64) * stride_vs
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (heads < HKV)[:, None] & (d < HEAD_DIM)[None, :]
    h64 = heads.to(tl.int64)[:, None]
    k = tl.load(KNEW + b64 * stride_nb + s * stride_ns + h64 * stride_nh + d[None, :], mask=mask, other=0.0)
    v = tl.load(VNEW + b64 * stride_vnb + s * stride_vns + h64 * stride_vnh + d[None, :], mask=mask, other=0.0)
    tl.store(k_dst + h64 * stride_kh + d[None, :], k, mask=mask)
    tl.store(v_dst + h64 * stride_vh + d[None, :], v, mask=mask)


@triton.jit
def _cache_slots(TABLE, b64, keys, ok, stride_tb, PAGED: tl.constexpr, LOG2_BS: tl.constexpr):
    """(block, slot) of cache entries ``keys`` of sequence ``b64``, int64: the block-table entry and the
    slot in it when ``PAGED`` (entries of keys not ``ok`` are never read: slots >= n may point at
    unallocated blocks, garbage), else the dense cache's batch row and the key itself.

    Every key looks its own page up, so a tile may span any number of pages and every power of two
    works, down to pages of one token (how a dense cache with per-sequence start slots is viewed):
    only the shift and mask constants change. Measured at ``LOG2_BS`` 0, 3, 4, 6 (causal, paged,
    rotated; fp16 D 128, bf16 D 256, fp32 D 80; sm_80 and sm_90, Triton 3.9, ptxas -v): the same
    global loads, registers within 7 of each other, no spill."""
    if PAGED:
        blk = tl.load(TABLE + b64 * stride_tb + (keys >> LOG2_BS), mask=ok, other=0).to(tl.int64)
        slot = (keys & ((1 << LOG2_BS) - 1)).to(tl.int64)
    else:
        blk = b64
        slot = keys.to(tl.int64)
    return blk, slot


@triton.jit
def _cos_sin(pos, f1, f2, f3, f4):
    """fp32 cos/sin ``[len(pos), P]`` of the accurate angle (turns reduced to [-0.5, 0.5], then x 2π)."""
    angle = angle_turns(pos[:, None], f1[None, :], f2[None, :], f3[None, :], f4[None, :]) * TWO_PI
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, DT: tl.constexpr):
    """acc + a @ b with the operands rounded to the I/O dtype ``DT`` and fp32 accumulation.

    ``DOT_F32``: IEEE fp32 dot (never TF32) for fp32 I/O, and for bf16 under the interpreter, whose
    bf16 dot multiplies raw bits: rounding to bf16 first keeps exactly the GPU's operand precision.
    """
    if DOT_F32:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT), acc)


@triton.jit
def _decode_program(
    Q,
    KC,
    VC,
    SEQLENS,
    TABLE,
    SPLIT,
    OUT,
    LSE,
    S_NEW,
    SQ,
    HKV,
    NUM_SPLITS,
    qk_scale,
    attention_factor,
    table_positions,
    window_left,
    window_right,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_fb,
    stride_os,
    stride_ob,
    stride_oi,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
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
    PAGED: tl.constexpr,
    LOG2_BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """The body of ``_decode_kernel`` (``WINDOW`` False: ``window_left/right`` unread) and of
    ``_decode_window_kernel`` (flash-attn's window ``window_left, window_right``, -1 unbounded; the
    right one unread under ``CAUSAL``)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    DT: tl.constexpr = KC.dtype.element_ty
    MASKED: tl.constexpr = CAUSAL or WINDOW  # rows of one program may see different keys
    n = tl.load(SEQLENS + b) + S_NEW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_i = offs_m // G
    head = h * G + offs_m % G
    row_ok = row_i < SQ
    # Query i sits at position n - Sq + i; the causal mask compares keys with that (negative when
    # n < Sq: such a row sees no key), while rotation clamps it at 0, the position of the first token.
    q_pos = n - SQ + row_i
    rot_pos = tl.maximum(q_pos, 0)
    if WINDOW:
        # Row m sees key j iff win_lo <= j - q_pos <= win_hi: two scalars, where an unbounded edge
        # becomes one that no key crosses (j - q_pos lies in [1 - n, Sq - 1]). Per-row bound
        # vectors made the D 256 bf16 program (255 registers) spill 8-40 B (sm_90 / sm_80, ptxas -v).
        win_lo = tl.where(window_left >= 0, -window_left, -n)
        if CAUSAL:
            win_hi = 0
        else:
            win_hi = tl.where(window_right >= 0, window_right, SQ)

    pair = tl.arange(0, HALF_P)
    pair_ok = pair < HALF
    if INTERLEAVED:
        c1 = 2 * pair
        c2 = 2 * pair + 1
    else:
        c1 = pair
        c2 = pair + HALF
    q_row = Q + b64 * stride_qb + row_i.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    q_mask = row_ok[:, None] & pair_ok[None, :]
    q1 = tl.load(q_row[:, None] + c1[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_row[:, None] + c2[None, :], mask=q_mask, other=0.0).to(tl.float32)
    if PASS > 0:
        pp = tl.arange(0, PASS_P)
        pass_ok = pp < PASS
        qp = tl.load(q_row[:, None] + (2 * HALF + pp)[None, :], mask=row_ok[:, None] & pass_ok[None, :], other=0.0)

    offs_n = tl.arange(0, BLOCK_N)
    if ROTATE and ROPE_TABLE:
        cq, sq = table_cos_sin(rot_pos, SPLIT, pair, pair_ok, HALF, table_positions)
        q1, q2 = q1 * cq - q2 * sq, q2 * cq + q1 * sq
    elif ROTATE:
        f_ptr = SPLIT + b64 * stride_fb  # this sequence's table (stride 0 when shared)
        f1, f2, f3, f4 = load_split(f_ptr, pair, pair_ok, HALF)
        cq, sq = _cos_sin(rot_pos, f1, f2, f3, f4)
        cq = cq * attention_factor
        sq = sq * attention_factor
        q1, q2 = q1 * cq - q2 * sq, q2 * cq + q1 * sq
        # R(j) for the offsets inside a tile, once per program; the attention factor rides here
        # so that the rotated part of every product carries its square (docs/design.md §2).
        cj, sj = _cos_sin(offs_n, f1, f2, f3, f4)
        cj = cj * attention_factor
        sj = sj * attention_factor

    if WINDOW:
        # The keys [lo, hi) that some row of this block sees, from the window edges of its first
        # and last query: the splits partition only these, and the tiles start at lo itself (not
        # at a multiple of BLOCK_N: every key row is addressed on its own), so keys below lo are
        # never loaded nor their block-table entries read (a cache manager may have freed those
        # pages), and the loop needs no lower-bound mask.
        i_lo = pid_m * BLOCK_M // G
        i_hi = tl.minimum(SQ - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // G)
        lo = tl.maximum(n - SQ + i_lo + win_lo, 0)
        hi = tl.maximum(tl.minimum(n - SQ + i_hi + win_hi + 1, n), lo)
        chunk = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + pid_s * chunk
        kv_end = tl.minimum(start + chunk, hi)
        loop_end = kv_end
    else:
        # This split's keys: per-sequence chunks, a multiple of BLOCK_N so tiles never straddle splits.
        chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = pid_s * chunk
        kv_end = tl.minimum(start + chunk, n)
        loop_end = kv_end
        if CAUSAL:
            # At or below start (no iteration) when no row of this block sees a key of this split.
            last_i = tl.minimum(SQ - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // G)
            loop_end = tl.minimum(loop_end, n - SQ + last_i + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    for j0 in tl.range(start, loop_end, BLOCK_N, disable_licm=True):  # see the split reload below
        offs_j = j0 + offs_n
        key_ok = offs_j < kv_end
        blk, slot = _cache_slots(TABLE, b64, offs_j, key_ok, stride_tb, PAGED, LOG2_BS)
        k_row = KC + blk * stride_kb + slot * stride_ks + h64 * stride_kh
        v_row = VC + blk * stride_vb + slot * stride_vs + h64 * stride_vh
        k_mask = key_ok[:, None] & pair_ok[None, :]
        k1 = tl.load(k_row[:, None] + c1[None, :], mask=k_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_row[:, None] + c2[None, :], mask=k_mask, other=0.0).to(tl.float32)
        if ROTATE and ROPE_TABLE:
            # Key j sits at position j: its own table row (keys past kv_end are masked, clamped rows).
            ck, sk = table_cos_sin(offs_j, SPLIT, pair, pair_ok, HALF, table_positions)
            qa = q1
            qb = q2
            ka = k1 * ck - k2 * sk
            kb = k2 * ck + k1 * sk
        elif ROTATE:
            # q . R(j0 + j) k = (R(-j0) q) . (R(j) k): R(-j0) on the small Q tile, R(j) on K.
            # The split table is reloaded per tile (from L1; disable_licm keeps the loads in the
            # loop) rather than kept in registers across it: kept, its four rows made the D = 256
            # bf16 program spill 200-244 B (sm_90, ptxas -v); reloaded it uses 255 registers, no spill.
            t1, t2, t3, t4 = load_split(f_ptr, pair, pair_ok, HALF)
            cb, sb = _cos_sin(j0 + tl.zeros([1], dtype=tl.int32), t1, t2, t3, t4)
            qa = q1 * cb + q2 * sb
            qb = q2 * cb - q1 * sb
            ka = k1 * cj - k2 * sj
            kb = k2 * cj + k1 * sj
        else:
            qa = q1
            qb = q2
            ka = k1
            kb = k2
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot(qa, tl.trans(ka), s, DOT_F32, DT)
        s = _dot(qb, tl.trans(kb), s, DOT_F32, DT)
        if PASS > 0:
            kp = tl.load(k_row[:, None] + (2 * HALF + pp)[None, :], mask=key_ok[:, None] & pass_ok[None, :], other=0.0)
            s = _dot(qp, tl.trans(kp), s, DOT_F32, DT)
        s = s * qk_scale  # softmax scale x log2(e): exp2 below
        if WINDOW:
            rel = offs_j[None, :] - q_pos[:, None]
            valid = key_ok[None, :] & row_ok[:, None] & (rel >= win_lo) & (rel <= win_hi)
        else:
            valid = key_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                valid = valid & (offs_j[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.where(valid, tl.exp2(s - m_use[:, None]), 0.0)  # select, never multiply: NaN cannot leak
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_row[:, None] + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        # As in the prefill kernel: a NaN or an infinity in V of a key some row cannot see (causal
        # or windowed, Sq > 1) must not reach that row through its zero probability. The dot takes
        # the finite part of V, and a tile whose V holds one (rare: a scalar branch) then adds the
        # non-finite values each row sees, key by key. 16-bit V is sanitised in every masked tile;
        # fp32 V only in such a tile (its own dot): sanitised always, the fp32 program (D 80) went
        # from 112 registers to 255 and spilled, and the other way round the bf16 D 256 one spilled 1.9 KB.
        nonfinite = 0
        if MASKED:
            nonfinite = tl.sum(tl.where(is_finite(v), 0, 1))
        if DT == tl.float32:
            if nonfinite > 0:
                acc = _dot(p, finite_or_zero(v), acc, DOT_F32, DT)
            else:
                acc = _dot(p, v, acc, DOT_F32, DT)
        else:
            if MASKED:
                v = finite_or_zero(v)
            acc = _dot(p, v, acc, DOT_F32, DT)
        if nonfinite > 0:
            for jj in range(BLOCK_N):
                key = j0 + jj
                key_blk, key_slot = _cache_slots(TABLE, b64, key, key < kv_end, stride_tb, PAGED, LOG2_BS)
                v_key = VC + key_blk * stride_vb + key_slot * stride_vs + h64 * stride_vh
                if WINDOW:
                    # left of a row's window the key is unseen, like one past its right edge
                    lim = tl.where(row_ok & (key - q_pos >= win_lo), q_pos + win_hi, -1)
                else:
                    lim = tl.where(row_ok, q_pos, -1)
                acc = add_seen_nonfinite(acc, v_key, d, d_ok, key, kv_end, lim)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptr = (
        OUT
        + pid_s.to(tl.int64) * stride_os
        + b64 * stride_ob
        + row_i.to(tl.int64) * stride_oi
        + head.to(tl.int64) * stride_oh
    )
    tl.store(o_ptr[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    l_ptr = LSE + pid_s.to(tl.int64) * stride_ls + b64 * stride_lb + head.to(tl.int64) * stride_lh + row_i
    tl.store(l_ptr, lse, mask=row_ok)


# Two entry points over one body: the plain kernel keeps its parameter list, which the tests' ptxas
# checks build signatures from, and its code (the same PTX instructions as before the window
# existed: sm_90, Triton 3.9).
@triton.jit
def _decode_kernel(
    Q,
    KC,
    VC,
    SEQLENS,
    TABLE,
    SPLIT,
    OUT,
    LSE,
    S_NEW,
    SQ,
    HKV,
    NUM_SPLITS,
    qk_scale,
    attention_factor,
    table_positions,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_fb,
    stride_os,
    stride_ob,
    stride_oi,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
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
    PAGED: tl.constexpr,
    LOG2_BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Program (b * HKV + h, m block, split): rows m = i * G + g of KV head h of sequence b.

    Writes ``OUT[split, b, i, h * G + g, :]`` (normalised by its own softmax sum) and the natural-log
    ``LSE[split, b, h * G + g, i]``; ``stride_os``/``stride_ls`` are 0 without split-K. ``SPLIT``:
    the law's split tables ``[nT, 4, HALF]`` (batch stride ``stride_fb``), or with ``ROPE_TABLE`` a
    caller's table ``[table_positions, 2, HALF]`` shared by every sequence.
    """
    _decode_program(
        Q, KC, VC, SEQLENS, TABLE, SPLIT, OUT, LSE, S_NEW, SQ, HKV, NUM_SPLITS, qk_scale, attention_factor,
        table_positions, -1, -1, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
        stride_vh, stride_tb, stride_fb, stride_os, stride_ob, stride_oi, stride_oh, stride_ls, stride_lb, stride_lh, G,
        HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, ROPE_TABLE, CAUSAL, False, PAGED,
        LOG2_BS, BLOCK_M, BLOCK_N, DOT_F32,
    )  # fmt: skip


# The window bounds only enter integer compares: specialising them (value 1, multiples of 16) would
# compile variants of their own for nothing.
@triton.jit(do_not_specialize=["window_left", "window_right"])
def _decode_window_kernel(
    Q,
    KC,
    VC,
    SEQLENS,
    TABLE,
    SPLIT,
    OUT,
    LSE,
    S_NEW,
    SQ,
    HKV,
    NUM_SPLITS,
    qk_scale,
    attention_factor,
    table_positions,
    window_left,
    window_right,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_fb,
    stride_os,
    stride_ob,
    stride_oi,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
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
    PAGED: tl.constexpr,
    LOG2_BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """``_decode_kernel`` with flash-attn's sliding window: query i (position ``p = n - Sq + i``) sees
    key j iff ``j >= p - window_left`` (when >= 0) and ``j <= p + window_right`` (when >= 0; the
    diagonal under ``CAUSAL``). Splits cover only the keys some row of the program sees."""
    _decode_program(
        Q, KC, VC, SEQLENS, TABLE, SPLIT, OUT, LSE, S_NEW, SQ, HKV, NUM_SPLITS, qk_scale, attention_factor,
        table_positions, window_left, window_right, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_tb, stride_fb, stride_os, stride_ob, stride_oi, stride_oh, stride_ls,
        stride_lb, stride_lh, G, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, ROPE_TABLE,
        CAUSAL, True, PAGED, LOG2_BS, BLOCK_M, BLOCK_N, DOT_F32,
    )  # fmt: skip


@triton.jit
def _merge_kernel(
    OPART,
    LPART,
    OUT,
    LSE,
    NUM_SPLITS,
    HQ,
    SQ,
    stride_ps,
    stride_ls,
    stride_ob,
    stride_oi,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SP: tl.constexpr,
):
    """Program r = (b * HQ + h) * SQ + i combines the splits' partials of one query row by LSE."""
    r = tl.program_id(0).to(tl.int64)
    b = r // (HQ * SQ)
    h = (r // SQ) % HQ
    i = r % SQ
    s = tl.arange(0, SP)
    lse_s = tl.load(LPART + s * stride_ls + r, mask=s < NUM_SPLITS, other=float("-inf"))
    live = lse_s > float("-inf")  # empty splits (no key in range) carry -inf and a zero partial
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(live, tl.exp(lse_s - m_use), 0.0)
    total = tl.sum(w, 0)
    d = tl.arange(0, HEAD_DIM_P)
    part = tl.load(
        OPART + s[:, None] * stride_ps + r * HEAD_DIM + d[None, :],
        mask=live[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(part * w[:, None], 0) / total_safe
    tl.store(OUT + b * stride_ob + i * stride_oi + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(LSE + r, tl.where(total == 0.0, float("-inf"), m_use + tl.log(total_safe)))


# ---------------------------------------------------------------------------------- host side
def limits(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None) -> str | None:
    """None when the kernels take these inputs (device not checked), else the reason."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (the triton decode kernel takes float16, bfloat16 or float32)"
    d = q.shape[-1]
    if d > _MAX_HEAD_DIM:
        return f"head dim {d} > {_MAX_HEAD_DIM} (register budget of the decode kernel)"
    if block_table is not None:
        bs = k_cache.shape[1]
        if bs < 1 or bs & (bs - 1):  # pages are addressed by shift and mask (LOG2_BS)
            return f"paged block size {bs} is not a power of two"
    return None


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1  # the interpreter runs programs one after another: splitting only adds work


@functools.cache
def _cuda_sms(index: int) -> int:  # queried once per device: decode steps are latency-bound
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits_heuristic(batch: int, hkv: int, m_blocks: int, capacity: int, num_sms: int) -> int:
    """Key splits for flash-decoding: enough programs for ~2 per SM, each streaming >= 256 keys.

    ``capacity`` is the cache's token capacity (dense Smax, or max_blocks x block_size), not the
    actual lengths: reading those would cost a host sync and break CUDA graphs (FlashAttention's
    kvcache heuristic makes the same choice). Splits that find no key of a shorter sequence exit
    at once and are ignored by the merge.
    """
    programs = batch * hkv * m_blocks
    if programs >= num_sms:
        return 1
    want = triton.cdiv(2 * num_sms, programs)
    by_length = max(1, capacity // _MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_length, _MAX_SPLITS))


def _config(dtype: torch.dtype, dp: int, rows: int, table: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim ``dp`` (padded) and G x Sq ``rows``;
    ``table``: the caller's-table variant (``ROPE_TABLE``).

    Not timed on a GPU yet but checked statically: every choice compiles for sm_90
    with ptxas reporting no spills when launched with 16-divisible strides (paged, rotated, the
    worst case): the R(j) offset table alone is 2 x BLOCK_N x R/2 fp32 values, 64 registers per
    thread at BLOCK_N 64, R 128 and 4 warps, so 8 warps are used wherever a tile is that large.
    """
    if INTERPRET:
        return min(64, pow2(rows)), 16, 1, 1
    fp32 = dtype == torch.float32  # fp32 tiles take twice the registers
    # Head dims above 128 in 16 bits: each Triton release's bundled ptxas allocates differently (the
    # accurate angle of every tile start leaves few registers spare). BLOCK_M 16 fits Triton 3.6 and
    # 3.7 (242 registers, no spill; 3.8-3.9: 508-656 B spilled), BLOCK_M 32 fits 3.9 (255, none;
    # 3.8: 20 B; 3.6-3.7: 208-216 B), measured at D 256 bf16, 8 warps, sm_90. The caller's-table
    # variant loads fp32 cos/sin rows per K tile: BLOCK_M 32 spilled 996 B there, 16 none (3.9).
    wide_m = 32 if _release(triton.__version__) >= (3, 8) and not table else 16
    block_m = min(16 if fp32 else wide_m if dp > 128 else 64, pow2(rows))
    block_n = 32 if fp32 or dp > 128 else 64
    num_warps = 4 if dp <= 64 and block_m == 16 else 8
    return block_m, block_n, num_warps, 2


def append(
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
) -> None:
    """Write ``k_new``/``v_new`` ``[B, S_new, Hkv, D]`` into the caches in place at ``cache_seqlens``
    (un-rotated); layouts as ``rope_attention_with_kvcache``."""
    if k_new is None or k_new.shape[1] == 0:
        return
    b, s_new, hkv, d = k_new.shape
    kc, vc, kn, vn = k_cache, v_cache, k_new, v_new
    paged = block_table is not None
    block_h = min(16, triton.next_power_of_2(hkv))
    table = block_table if paged else cache_seqlens  # unused pointer when dense
    log2_bs = int(math.log2(kc.shape[1])) if paged else 0
    grid = (b * s_new, triton.cdiv(hkv, block_h))
    _append_kernel[grid](
        kn,
        vn,
        kc,
        vc,
        cache_seqlens,
        table,
        s_new,
        hkv,
        *kn.stride()[:3],
        *vn.stride()[:3],
        *kc.stride()[:3],
        *vc.stride()[:3],
        table.stride(0),
        HEAD_DIM=d,
        HEAD_DIM_P=pow2(d),
        BLOCK_H=block_h,
        PAGED=paged,
        LOG2_BS=log2_bs,
    )


def run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    block_table: torch.Tensor | None,
    rope: RopeArgs,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    num_splits: int = 0,
    *,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the new tokens, then attend (the arguments of ``KVCACHE_SCHEMA``, rope bundled):
    ``(out [B, Sq, Hq, D] like q, lse float32 [B, Hq, Sq])``. ``window_left/right``: flash-attn's
    sliding window (-1 unbounded; ``window_right`` is -1 under ``causal``). ``num_splits`` 0 lets
    the heuristic choose; ``block_n`` overrides the key tile (tests reach positions near 2**20
    quickly with it)."""
    append(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
    s_new = 0 if k_new is None else k_new.shape[1]  # sequence b now holds cache_seqlens[b] + s_new keys
    kc, vc = k_cache, v_cache
    paged = block_table is not None
    b, sq, hq, d = q.shape
    hkv = kc.shape[2]
    g = hq // hkv
    rotary_dim, rotate = rotary_split(rope)
    head = head_constants(d, rotary_dim)
    block_m, cfg_n, num_warps, num_stages = _config(q.dtype, head["HEAD_DIM_P"], g * sq, rope.table_positions > 0)
    block_n = block_n or cfg_n
    m_blocks = triton.cdiv(g * sq, block_m)
    capacity = block_table.shape[1] * kc.shape[1] if paged else kc.shape[1]
    # A bound that no (query, key) pair can cross is no bound, and the unwindowed kernel serves it:
    # query positions p are < capacity, so p - left < 0 for left >= capacity; p + right >= n - 1 for
    # every query once right >= Sq - 1, and the diagonal is tighter under causal. This also keeps
    # the kernel's int32 sums in range.
    if window_left >= capacity:
        window_left = -1
    if causal or window_right >= sq - 1:
        window_right = -1
    windowed = window_left >= 0 or window_right >= 0
    keys = capacity
    if window_left >= 0:  # the keys one program sees: at most left + Sq (+ right) of them
        keys = min(keys, window_left + sq + max(window_right, 0))
    if not num_splits:
        num_splits = num_splits_heuristic(b, hkv, m_blocks, keys, _num_sms(q.device))
    split, stride_fb, table_positions = table_args(rope)

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    if num_splits > 1:
        o_dst = torch.empty(num_splits, b, hq, sq, d, dtype=torch.float32, device=q.device)
        l_dst = torch.empty(num_splits, b, hq, sq, dtype=torch.float32, device=q.device)
        o_strides = (o_dst.stride(0), o_dst.stride(1), o_dst.stride(3), o_dst.stride(2))
        l_strides = l_dst.stride()[:3]
    else:
        o_dst, l_dst = out, lse
        o_strides = (0, out.stride(0), out.stride(1), out.stride(2))
        l_strides = (0, lse.stride(0), lse.stride(1))
    table = block_table if paged else cache_seqlens
    log2_bs = int(math.log2(kc.shape[1])) if paged else 0
    grid = (b * hkv, m_blocks, num_splits)
    kernel = _decode_window_kernel if windowed else _decode_kernel
    window = (window_left, window_right) if windowed else ()
    kernel[grid](
        q,
        kc,
        vc,
        cache_seqlens,
        table,
        split,
        o_dst,
        l_dst,
        s_new,
        sq,
        hkv,
        num_splits,
        softmax_scale * LOG2E,
        rope.attention_factor,
        table_positions,
        *window,
        *q.stride()[:3],
        *kc.stride()[:3],
        *vc.stride()[:3],
        table.stride(0),
        stride_fb,
        *o_strides,
        *l_strides,
        G=g,
        **head,
        INTERLEAVED=rope.interleaved,
        ROTATE=rotate,
        ROPE_TABLE=table_positions > 0,
        CAUSAL=causal,
        PAGED=paged,
        LOG2_BS=log2_bs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_F32=q.dtype == torch.float32 or (INTERPRET and q.dtype == torch.bfloat16),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_kernel[(b * hq * sq,)](
            o_dst,
            l_dst,
            out,
            lse,
            num_splits,
            hq,
            sq,
            o_dst.stride(0),
            l_dst.stride(0),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            HEAD_DIM=d,
            HEAD_DIM_P=head["HEAD_DIM_P"],
            SP=triton.next_power_of_2(num_splits),
        )
    return out, lse
