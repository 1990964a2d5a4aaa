"""Triton fused scaled-RoPE + FlashAttention-2 backward (docs/design.md §2).

Gradients of ``out = softmax(R(q) R(k)^T * scale) v`` for the **un-rotated** q, k, v, recomputed
from the forward's natural-log LSE (no ``[Sq, Sk]`` matrix is ever stored). With Q' = R(q),
K' = R(k) (rotated in fp32 registers with the forward's accurate angles, rounded to the input
dtype as the forward rounds them):

    P = exp(S - lse),  S = Q' K'^T * scale      dV  = P^T dO
    dP = dO V^T,  dS = P * (dP - delta)          dQ' = dS K' * scale,  dK' = dS^T Q' * scale

with ``delta = rowsum(dO * O) - dlse`` (``_bwd_preprocess``; ``dlse`` is the incoming gradient of
the LSE output, zero unless a loss uses it). A rotation is orthogonal and the attention factor f
scales it, so the gradient of ``x' = f (x1 cos - x2 sin, x2 cos + x1 sin)`` is the inverse rotation
times f: ``dx = rotate_pairs(dx1', dx2', f cos, -f sin)``, applied once per output row at the end
of each kernel. Pass-through channels (``>= rotary_dim``) take the plain gradient; V is never
rotated, and no rotated copy of Q or K is ever written.

Kernels, none with atomics, so every gradient is bitwise reproducible run to run:

* ``_rope_table``: fp32 cos/sin (factor applied) per token of q and of k, ``[T, 2, R/2]``, with the
  accurate angle of ``rope_math`` (the per-call table of the length-dependent types included), or
  with ``ROPE_TABLE`` the rows of a caller's table ``[P, 2, R/2]`` gathered by position.
  The loops below load it instead of forming angles: an in-loop angle (or the forward's
  angle-addition step tables) keeps two more ``[BLOCK, R/2]`` fp32 blocks and the direct path's
  temporaries live next to the dK/dV accumulators, and spilled (ptxas, sm_90, D = 128, see
  ``aot.py``). The tables hold 4 R bytes per token, 1/16 of a bf16 q of 32 heads x 128.
* ``_bwd_preprocess``: delta, one fp32 per (query, head), in the LSE layout.
* ``_bwd_dkdv``: a program owns ``BLOCK_N`` keys of one (sequence, kv head), rotates them once,
  and walks the query blocks that see them, each for every query head of the GQA group, so dK/dV
  are summed over the group in registers (no atomics, no reduction pass). Scores are formed
  transposed (``K Q^T``) so P and dS come out as the left operands of the dV / dK dots.
* ``_bwd_dq``: the forward's tiling (GQA group folded into M, Q rotated once per program, each K
  tile rotated after it loads), accumulating dQ' over the key blocks.

Masking follows the forward: loads outside the sequence are masked with ``other=0`` (a masked
row gets ``lse = +inf``, so P = 0), causal and sliding-window (``WINDOW``) blocks select masked
probabilities and dS to zero, blocks outside every row's window are skipped by both kernels' loop
bounds, and rows that saw no key (``lse = -inf``) get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import RopeArgs
from .attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, _dot, band_blocks, config_shape, window_band
from .host import INTERPRET, LOG2E, MAX_GRID_YZ, head_constants, pow2, rotary_split, table_args
from .rope_math import position_cos_sin
from .rope_tile import load_2d, load_pairs, load_pass, pair_columns, rotate_pairs

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; none has been timed on a GPU yet.
# The dK/dV program keeps dK' and dV (fp32, BLOCK_N x 2D) and the rotated K and V for its whole life,
# so it takes few query rows per step; the dQ program keeps dQ', Q and dO. Spills (``ptxas -v``,
# ``aot.compile_backward``; figures in docs/triton-bwd.md): the chained dots (S -> P -> dS -> dK)
# make Triton put every warp along the first dot dimension, so the second operand (Q in dK/dV, K in
# dQ) is held whole by every warp, and the Q rotation is done twice (for the transposed operand of
# S = K Q^T and for dK += dS^T Q). Spill-free on sm_90 (fp16 / bf16) and listed first, kept alone
# by ``select_configs`` where they apply: dK/dV (16, 128, 8, 1) at D <= 64 (GROUP 1-8; 16 query
# rows, 16 key rows per warp); dQ (64, 16, 4, 1) and (128, 16, 8, 1) at D <= 128 with full rotary
# (16 keys per step: the rotated K tile is the operand every warp holds). Everything else spills:
# dK/dV at D = 128 >= 0.8 KB per thread on sm_90 for every shape tried (GROUP 4), and sm_80 spills
# in both kernels (dK/dV D = 64: 268 B; dQ D = 128: 412 B).
_DKDV = ((16, 128, 8, 1), (32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (16, 64, 4, 1))
_DQ = ((64, 16, 4, 1), (128, 16, 8, 1), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2))


def spill_free(
    kernel: str, major: int, elem_size: int, head_dim_p: int, k_cols: int, has_pass: bool, window: bool = False
) -> set:
    """The ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``kernel`` measured spill-free for this
    head layout on a GPU generation (``major``); empty where none is known. ``window``: the
    sliding-window variant, whose dQ spills in (64, 16, 4, 1) at D = 128, GROUP 1 (20 B per thread,
    sm_90; none at GROUP 4, nor in (128, 16, 8, 1) or in dK/dV's (16, 128, 8, 1) at GROUP 1, 4, 8)."""
    if major != 9 or elem_size != 2:
        return set()
    if kernel == "dkdv" and head_dim_p <= 64 and k_cols <= 64:
        return {(16, 128, 8, 1)}
    if kernel == "dq" and head_dim_p <= 128 and k_cols <= 128 and not has_pass:
        return {(128, 16, 8, 1)} if window else {(64, 16, 4, 1), (128, 16, 8, 1)}
    return set()


# Under the interpreter every tile step costs ~1000 Python-level ops: 32 x 32 tiles keep the test
# shapes (<= 129 tokens) on several blocks, as in the forward.
_INTERPRETER = ((32, 32, 4, 1),)


def _configs(shapes) -> list[triton.Config]:
    shapes = _INTERPRETER if INTERPRET else shapes
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def select_configs(
    configs: list[triton.Config],
    kernel: str,
    smem_limit: int,
    elem_size: int,
    head_dim_p: int,
    k_cols: int,
    major: int = 0,
    has_pass: bool = False,
    window: bool = False,
) -> list[triton.Config]:
    """The configs of ``kernel`` ("dkdv" or "dq") whose operand tiles fit ``smem_limit`` bytes of
    shared memory, for a padded head of ``head_dim_p`` (V, dO) and ``k_cols`` = 2 * HALF_P + PASS_P
    (Q / K) columns; D = 256 keeps only the configs that leave registers for twice the accumulators.
    Where ``spill_free`` knows configs for this layout on GPU generation ``major`` (and variant:
    ``window``), only those."""
    keep = []
    for c in configs:
        bm, bn, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        # One tile of Q, dO and one of K, V in the input dtype, double-buffered when num_stages > 1.
        smem = (bm + bn) * (k_cols + head_dim_p) * elem_size * min(c.num_stages, 2)
        # fp32 values per thread held for the program's life: dK' + dV (dkdv) or dQ' + Q + dO (dq).
        acc = bn * (k_cols + head_dim_p) if kernel == "dkdv" else bm * (2 * k_cols + head_dim_p) * elem_size // 4
        if smem <= smem_limit and acc // (32 * w) <= 128:
            keep.append(c)
    known = spill_free(kernel, major, elem_size, head_dim_p, k_cols, has_pass, window)
    if any(config_shape(c) in known for c in keep):
        keep = [c for c in keep if config_shape(c) in known]
    if not keep:  # the smallest tile of the list
        keep = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -c.num_warps))]
    return keep


def _pruner(kernel: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        q = named_args["Q"]
        props = triton.runtime.driver.active.utils.get_device_properties(q.device.index or 0)
        k_cols = 2 * kwargs["HALF_P"] + kwargs["PASS_P"]
        major = torch.cuda.get_device_capability(q.device)[0]
        return select_configs(
            configs, kernel, props["max_shared_mem"], q.element_size(), kwargs["HEAD_DIM_P"], k_cols, major,
            kwargs["PASS"] > 0, kwargs["WINDOW"],
        )  # fmt: skip

    return prune


_KEY = [
    "HEAD_DIM_P", "HALF_P", "PASS_P", "GROUP", "INTERLEAVED", "ROTATE", "CAUSAL", "WINDOW", "VARLEN", "Q_BUCKET",
    "K_BUCKET",
]  # fmt: skip
_NO_SPECIALIZE = ["Q_BUCKET", "K_BUCKET", "seqlen_q", "seqlen_k", "window_left", "window_right"]


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _rope_table(
    Pos,
    Split,
    Table,
    Cu,
    stride_pb,
    stride_tb,
    stride_cb,
    seqlen,
    attention_factor,
    table_positions,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    VARLEN: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``Table[b, s] = (cos, sin)`` fp32 ``[2, HALF]`` (factor applied) of ``Pos[b, s]``, with the
    sequence's split table, or with ``ROPE_TABLE`` row ``Pos[b, s]`` (clamped) of the caller's table
    ``Split`` ``[table_positions, 2, HALF]``; varlen: rows are tokens ``cu[b] + s`` of one
    ``[T, 2, HALF]`` table."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if VARLEN:
        start = tl.load(Cu + b)
        n = tl.load(Cu + b + 1) - start
    else:
        start = 0
        n = seqlen
    toks = pid * BLOCK + tl.arange(0, BLOCK)
    ok = toks < n
    b64 = b.to(tl.int64)
    pos = tl.load(Pos + b64 * stride_pb + start + toks, mask=ok, other=0)
    idx = tl.arange(0, HALF_P)
    pair_ok = idx < HALF
    cos, sin = position_cos_sin(
        pos, Split + b * stride_tb, idx, pair_ok, HALF, attention_factor, table_positions, ROPE_TABLE
    )
    rows = Table + b64 * stride_cb + (start + toks).to(tl.int64)[:, None] * (2 * HALF) + idx[None, :]
    mask = ok[:, None] & pair_ok[None, :]
    tl.store(rows, cos, mask=mask)
    tl.store(rows + HALF, sin, mask=mask)


@triton.jit
def _cos_sin(rows, row_ok, HALF: tl.constexpr, HALF_P: tl.constexpr):
    """cos/sin ``[M, HALF_P]`` fp32 from table rows ``rows [M]`` (pointers to ``[2, HALF]``)."""
    idx = tl.arange(0, HALF_P)
    cos = load_2d(rows[:, None] + idx[None, :], row_ok, idx < HALF, True, HALF != HALF_P)
    sin = load_2d(rows[:, None] + HALF + idx[None, :], row_ok, idx < HALF, True, HALF != HALF_P)
    return cos, sin


@triton.jit
def _load_rotated(
    rows,
    row_ok,
    cs_rows,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROTATE: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    """The rotary halves of rows ``rows [M]``, rotated with their table rows and rounded once to
    the input dtype (as the forward's ``load_rotary``); the raw loads when not ``ROTATE``."""
    x1, x2 = load_pairs(rows, row_ok, HALF, HALF_P, INTERLEAVED, MASK_ROWS)
    if ROTATE:
        cos, sin = _cos_sin(cs_rows, row_ok, HALF, HALF_P)
        y1, y2 = rotate_pairs(x1, x2, cos, sin)
        x1 = y1.to(x1.dtype)
        x2 = y2.to(x2.dtype)
    return x1, x2


@triton.jit
def _store_rows(ptrs, x, row_mask, col_mask):
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _store_head(
    rows,
    row_ok,
    g1,
    g2,
    gp,
    cs_rows,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS: tl.constexpr,
    PASS_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Store the gradient of rows ``rows [M]`` (pointers to channel 0): the rotary halves ``g1, g2``
    (gradients w.r.t. the rotated pairs, fp32 ``[M, HALF_P]``) mapped back through the inverse
    rotation times the attention factor, and the pass-through block ``gp`` unchanged."""
    idx, c1, c2 = pair_columns(HALF, HALF_P, INTERLEAVED)
    pair_ok = idx < HALF
    if ROTATE:
        cos, sin = _cos_sin(cs_rows, row_ok, HALF, HALF_P)
        g1, g2 = rotate_pairs(g1, g2, cos, -sin)
    _store_rows(rows[:, None] + c1[None, :], g1, row_ok, pair_ok)
    _store_rows(rows[:, None] + c2[None, :], g2, row_ok, pair_ok)
    if PASS > 0:
        pidx = tl.arange(0, PASS_P)
        _store_rows(rows[:, None] + 2 * HALF + pidx[None, :], gp, row_ok, pidx < PASS)


@triton.jit
def _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
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
    return q_start, sq, k_start, sk


@triton.jit
def _row_stats(Lse, Delta, lse_off, rows_ok):
    """log2-domain LSE (``+inf`` for masked rows and rows that saw no key, so P = 0) and delta."""
    lse = tl.load(Lse + lse_off, mask=rows_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + lse_off, mask=rows_ok, other=0.0)
    return lse, delta


# ------------------------------------------------------------------------------------ preprocess
@triton.jit
def _bwd_preprocess(
    Out,
    DO,
    DLse,
    Delta,
    stride_ob,
    stride_os,
    stride_oh,
    stride_db,
    stride_ds,
    stride_dh,
    stride_lb,
    stride_lh,
    seqlen,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``delta[b, h, i] = sum_d dO * O - dlse`` in fp32 (LSE layout; varlen: b = 0, i = token)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    toks = pid * BLOCK + tl.arange(0, BLOCK)
    ok = toks < seqlen
    t64 = toks.to(tl.int64)
    d = tl.arange(0, HEAD_DIM_P)
    cols = d < HEAD_DIM
    o = load_2d(Out + b * stride_ob + h * stride_oh + t64[:, None] * stride_os + d[None, :], ok, cols, True, True)
    do = load_2d(DO + b * stride_db + h * stride_dh + t64[:, None] * stride_ds + d[None, :], ok, cols, True, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    off = b * stride_lb + h * stride_lh + t64
    if HAS_DLSE:
        delta -= tl.load(DLse + off, mask=ok, other=0.0)
    tl.store(Delta + off, delta, mask=ok)


# ------------------------------------------------------------------------------------ dK / dV
@triton.jit
def _dkdv_block(
    dk1,
    dk2,
    dkp,
    dv,
    k1,
    k2,
    kp,
    v,
    cols,
    q_base,
    do_base,
    lse_base,
    Lse,
    Delta,
    csq_base,
    qk_scale,
    q_start,
    sq,
    causal_offset,
    win_lo,
    win_hi,
    m_start,
    stride_qs,
    stride_qh,
    stride_dos,
    stride_doh,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS: tl.constexpr,
    PASS_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROTATE: tl.constexpr,
    WINDOW: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Add the contributions of queries ``[m_start, m_start + BLOCK_M)`` of every head of the
    group to the key block's accumulators; ``MASKED`` applies the causal mask, or with ``WINDOW``
    the band ``win_lo <= key - query <= win_hi``."""
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < sq
    tok64 = (q_start + rows).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_P)
    cs_rows = csq_base + tok64 * (2 * HALF)
    if MASKED:
        if WINDOW:
            keep = (cols[:, None] >= rows[None, :] + win_lo) & (cols[:, None] <= rows[None, :] + win_hi)
        else:
            keep = cols[:, None] <= rows[None, :] + causal_offset  # [BLOCK_N, BLOCK_M]
    # Pointers are rebuilt per head from scalar bases: a [BLOCK_M, D] block of 64-bit pointers carried
    # across the loop would hold 64 registers per thread (BLOCK_M = 32, D = 128, 4 warps).
    for g in tl.range(GROUP, disable_licm=True):
        q_rows = q_base + g * stride_qh + tok64 * stride_qs
        q1, q2 = _load_rotated(q_rows, row_ok, cs_rows, HALF, HALF_P, INTERLEAVED, ROTATE, True)
        lse, delta = _row_stats(Lse, Delta, lse_base + g * stride_lh + tok64, row_ok)
        # Transposed scores [BLOCK_N, BLOCK_M]: K and V are the left operands of every dot and the
        # probabilities come out in the accumulator layout that the dV / dK dots take as their left
        # operand, with no transpose of P or dS through shared memory (FlashAttention-2's order).
        st = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        st = _dot(k1, tl.trans(q1), st, DOT_PREC, UPCAST)
        st = _dot(k2, tl.trans(q2), st, DOT_PREC, UPCAST)
        if PASS > 0:
            qp = load_pass(q_rows, row_ok, 2 * HALF, PASS, PASS_P, True)
            st = _dot(kp, tl.trans(qp), st, DOT_PREC, UPCAST)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if MASKED:
            pt = tl.where(keep, pt, 0.0)  # select, never multiply: masked scores may be inf
        do_rows = do_base + g * stride_doh + tok64[:, None] * stride_dos + d[None, :]
        do = load_2d(do_rows, row_ok, d < HEAD_DIM, True, HEAD_DIM != HEAD_DIM_P)
        dv = _dot(pt.to(do.dtype), do, dv, DOT_PREC, UPCAST)
        dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        if MASKED:
            dst = tl.where(keep, dst, 0.0)  # dP of a hidden key may be NaN (NaN in its V): select, never multiply
        dst = dst.to(q1.dtype)
        dk1 = _dot(dst, q1, dk1, DOT_PREC, UPCAST)
        dk2 = _dot(dst, q2, dk2, DOT_PREC, UPCAST)
        if PASS > 0:
            dkp = _dot(dst, qp, dkp, DOT_PREC, UPCAST)
    return dk1, dk2, dkp, dv


@triton.autotune(configs=_configs(_DKDV), key=_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    CSQ,
    CSK,
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_lb,
    stride_lh,
    stride_csqb,
    stride_cskb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    softmax_scale,
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
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    q_start, sq, k_start, sk = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= sk:
        return

    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < sk
    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)
    ktok64 = (k_start + cols).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_P)
    # Keys are rotated once for the program's whole walk over the queries.
    k_rows = K + b64 * stride_kb + ktok64 * stride_ks + hkv64 * stride_kh
    csk_rows = CSK + b64 * stride_cskb + ktok64 * (2 * HALF)
    k1, k2 = _load_rotated(k_rows, col_ok, csk_rows, HALF, HALF_P, INTERLEAVED, ROTATE, True)
    if PASS > 0:
        kp = load_pass(k_rows, col_ok, 2 * HALF, PASS, PASS_P, True)
    else:
        kp = k1  # never read: PASS == 0 compiles the pass-through dots out
    v_rows = V + b64 * stride_vb + ktok64[:, None] * stride_vs + hkv64 * stride_vh + d[None, :]
    v = load_2d(v_rows, col_ok, d < HEAD_DIM, True, HEAD_DIM != HEAD_DIM_P)

    dk1 = tl.zeros([BLOCK_N, HALF_P], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_P], dtype=tl.float32)
    dkp = tl.zeros([BLOCK_N, PASS_P if PASS > 0 else 16], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)

    head0 = (hkv * GROUP).to(tl.int64)
    q_base = Q + b64 * stride_qb + head0 * stride_qh
    do_base = DO + b64 * stride_dob + head0 * stride_doh
    lse_base = b64 * stride_lb + head0 * stride_lh
    csq_base = CSQ + b64 * stride_csqb
    causal_offset = sk - sq  # bottom-right alignment: query i sees key j iff j <= i + Sk - Sq
    if WINDOW:
        # Key j is seen by queries [j - win_hi, j - win_lo]: the band of the forward, transposed.
        # Query blocks outside it are skipped; those that see every key of the block run unmasked,
        # the edges of the band (and the ragged query tail) masked.
        win_lo, win_hi = window_band(sq, sk, window_left, window_right, CAUSAL)
        last = tl.minimum(n0 + BLOCK_N, sk) - 1
        m_lo, m_full_lo, m_full_hi, m_hi = band_blocks(n0, last, -win_hi, -win_lo, sq, BLOCK_M)
        for m_start in range(m_full_lo, m_full_hi, BLOCK_M):
            dk1, dk2, dkp, dv = _dkdv_block(
                dk1, dk2, dkp, dv, k1, k2, kp, v, cols, q_base, do_base, lse_base, Lse, Delta, csq_base, qk_scale,
                q_start, sq, causal_offset, win_lo, win_hi, m_start, stride_qs, stride_qh, stride_dos, stride_doh,
                stride_lh, GROUP, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, True, False,
                DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        # Both masked edges in one loop (one copy of the block's code fewer, as in the forward).
        n_left = tl.cdiv(m_full_lo - m_lo, BLOCK_M)
        for it in range(0, n_left + tl.cdiv(m_hi - m_full_hi, BLOCK_M)):
            m_start = tl.where(it < n_left, m_lo + it * BLOCK_M, m_full_hi + (it - n_left) * BLOCK_M)
            dk1, dk2, dkp, dv = _dkdv_block(
                dk1, dk2, dkp, dv, k1, k2, kp, v, cols, q_base, do_base, lse_base, Lse, Delta, csq_base, qk_scale,
                q_start, sq, causal_offset, win_lo, win_hi, m_start, stride_qs, stride_qh, stride_dos, stride_doh,
                stride_lh, GROUP, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, True, True,
                DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    else:
        if CAUSAL:
            # Queries below n0 - offset see none of these keys; from the last valid key - offset on,
            # they see all of them. The band in between is the masked diagonal.
            m_lo = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M
            last = tl.minimum(n0 + BLOCK_N, sk) - 1
            m_full = tl.minimum(tl.cdiv(tl.maximum(last - causal_offset, 0), BLOCK_M) * BLOCK_M, sq)
            m_full = tl.maximum(m_full, m_lo)
        else:
            m_lo = 0
            m_full = 0
        for m_start in range(m_lo, m_full, BLOCK_M):
            dk1, dk2, dkp, dv = _dkdv_block(
                dk1, dk2, dkp, dv, k1, k2, kp, v, cols, q_base, do_base, lse_base, Lse, Delta, csq_base, qk_scale,
                q_start, sq, causal_offset, causal_offset, causal_offset, m_start, stride_qs, stride_qh, stride_dos,
                stride_doh, stride_lh, GROUP, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE,
                False, True, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        for m_start in range(m_full, sq, BLOCK_M):
            dk1, dk2, dkp, dv = _dkdv_block(
                dk1, dk2, dkp, dv, k1, k2, kp, v, cols, q_base, do_base, lse_base, Lse, Delta, csq_base, qk_scale,
                q_start, sq, causal_offset, causal_offset, causal_offset, m_start, stride_qs, stride_qh, stride_dos,
                stride_doh, stride_lh, GROUP, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE,
                False, False, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
            )  # fmt: skip

    dk_rows = DK + b64 * stride_dkb + ktok64 * stride_dks + hkv64 * stride_dkh
    _store_head(
        dk_rows, col_ok, dk1 * softmax_scale, dk2 * softmax_scale, dkp * softmax_scale, csk_rows, HALF, HALF_P, PASS,
        PASS_P, INTERLEAVED, ROTATE,
    )  # fmt: skip
    dv_rows = DV + b64 * stride_dvb + ktok64[:, None] * stride_dvs + hkv64 * stride_dvh + d[None, :]
    _store_rows(dv_rows, dv, col_ok, d < HEAD_DIM)


# ------------------------------------------------------------------------------------ dQ
@triton.jit
def _dq_keys(
    dq1,
    dq2,
    dqp,
    q1,
    q2,
    qp,
    do,
    lse,
    delta,
    qi,
    k_base,
    v_base,
    csk_base,
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
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate dQ' over key blocks ``[lo, hi)``; ``MASKED`` blocks may be ragged, causal or
    (``WINDOW``) cut by the band ``qi + win_lo <= key <= qi + win_hi``, and then skip the blocks of
    ``[gap_lo, gap_hi)`` (both edges of the band in one loop, as in the forward's ``_attn_keys``)."""
    d = tl.arange(0, HEAD_DIM_P)
    if WINDOW and MASKED:
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
        k1, k2 = _load_rotated(
            k_rows, col_ok, csk_base + cols64 * (2 * HALF), HALF, HALF_P, INTERLEAVED, ROTATE, MASKED
        )
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot(q1, tl.trans(k1), s, DOT_PREC, UPCAST)
        s = _dot(q2, tl.trans(k2), s, DOT_PREC, UPCAST)
        if PASS > 0:
            kp = load_pass(k_rows, col_ok, 2 * HALF, PASS, PASS_P, MASKED)
            s = _dot(qp, tl.trans(kp), s, DOT_PREC, UPCAST)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            keep = col_ok[None, :]
            if WINDOW:
                keep = keep & (cols[None, :] >= qi[:, None] + win_lo) & (cols[None, :] <= qi[:, None] + win_hi)
            elif CAUSAL:
                keep = keep & (cols[None, :] <= qi[:, None] + causal_offset)
            p = tl.where(keep, p, 0.0)  # select, never multiply
        v = load_2d(
            v_base + cols64[:, None] * stride_vs + d[None, :], col_ok, d < HEAD_DIM, MASKED, HEAD_DIM != HEAD_DIM_P
        )
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        if MASKED:
            ds = tl.where(keep, ds, 0.0)  # dP of a hidden key may be NaN (NaN in its V): select, never multiply
        ds = ds.to(k1.dtype)
        dq1 = _dot(ds, k1, dq1, DOT_PREC, UPCAST)
        dq2 = _dot(ds, k2, dq2, DOT_PREC, UPCAST)
        if PASS > 0:
            dqp = _dot(ds, kp, dqp, DOT_PREC, UPCAST)
    return dq1, dq2, dqp


@triton.autotune(configs=_configs(_DQ), key=_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    CSQ,
    CSK,
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_lb,
    stride_lh,
    stride_csqb,
    stride_cskb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    softmax_scale,
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
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Heaviest (causal: last) query blocks first, as in the forward.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    q_start, sq, k_start, sk = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN)
    r0 = pid_m * BLOCK_M
    if r0 >= sq * GROUP:
        return

    # Row r of the tile is query r // GROUP of head hkv * GROUP + r % GROUP (GQA folded into M).
    rows = r0 + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head64 = (hkv * GROUP + rows % GROUP).to(tl.int64)
    row_ok = qi < sq
    b64 = b.to(tl.int64)
    tok64 = (q_start + qi).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_P)
    q_rows = Q + b64 * stride_qb + tok64 * stride_qs + head64 * stride_qh
    csq_rows = CSQ + b64 * stride_csqb + tok64 * (2 * HALF)
    q1, q2 = _load_rotated(q_rows, row_ok, csq_rows, HALF, HALF_P, INTERLEAVED, ROTATE, True)
    if PASS > 0:
        qp = load_pass(q_rows, row_ok, 2 * HALF, PASS, PASS_P, True)
    else:
        qp = q1  # never read
    do_rows = DO + b64 * stride_dob + tok64[:, None] * stride_dos + head64[:, None] * stride_doh + d[None, :]
    do = load_2d(do_rows, row_ok, d < HEAD_DIM, True, HEAD_DIM != HEAD_DIM_P)
    lse, delta = _row_stats(Lse, Delta, b64 * stride_lb + head64 * stride_lh + tok64, row_ok)

    causal_offset = sk - sq
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
    csk_base = CSK + b64 * stride_cskb
    dq1 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
    dqp = tl.zeros([BLOCK_M, PASS_P if PASS > 0 else 16], dtype=tl.float32)
    # Key phases as in the forward: [full_lo, full_hi) unmasked, the rest of [lo, hi) masked.
    dq1, dq2, dqp = _dq_keys(
        dq1, dq2, dqp, q1, q2, qp, do, lse, delta, qi, k_base, v_base, csk_base, qk_scale, k_start, sk,
        causal_offset, win_lo, win_hi, full_lo, full_hi, full_lo, full_hi, stride_ks, stride_vs, HEAD_DIM, HEAD_DIM_P,
        HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, CAUSAL, WINDOW, False, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    dq1, dq2, dqp = _dq_keys(
        dq1, dq2, dqp, q1, q2, qp, do, lse, delta, qi, k_base, v_base, csk_base, qk_scale, k_start, sk,
        causal_offset, win_lo, win_hi, lo, hi, full_lo, full_hi, stride_ks, stride_vs, HEAD_DIM, HEAD_DIM_P, HALF,
        HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, CAUSAL, WINDOW, True, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    dq_rows = DQ + b64 * stride_dqb + tok64 * stride_dqs + head64 * stride_dqh
    _store_head(
        dq_rows, row_ok, dq1 * softmax_scale, dq2 * softmax_scale, dqp * softmax_scale, csq_rows, HALF, HALF_P, PASS,
        PASS_P, INTERLEAVED, ROTATE,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ launchers
def _grad_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def preprocess(out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """``delta = rowsum(dO * O) - dlse``, float32 in the LSE layout (``[B, Hq, Sq]`` / ``[Hq, Tq]``).

    ``out``/``dout`` like q, dense ``[B, S, Hq, D]`` or varlen ``[T, Hq, D]`` (any strides, contiguous
    last dim); ``dlse`` like ``lse`` or None."""
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    if delta.numel() == 0:
        return delta
    # Autograd hands e.g. ``out.sum()``'s gradient over as an expanded tensor (every stride 0).
    out, dout = _last_dim_contiguous(out), _last_dim_contiguous(dout)
    d = out.shape[-1]
    d_p = pow2(d)
    if out.dim() == 3:  # varlen
        seqlen, hq, batch = out.shape[0], out.shape[1], 1
        so = (0, out.stride(0), out.stride(1))
        sd = (0, dout.stride(0), dout.stride(1))
        sl = (0, delta.stride(0))
    else:
        batch, seqlen, hq = out.shape[0], out.shape[1], out.shape[2]
        so = (out.stride(0), out.stride(1), out.stride(2))
        sd = (dout.stride(0), dout.stride(1), dout.stride(2))
        sl = (delta.stride(0), delta.stride(1))
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    # Two [BLOCK, D] tiles in registers: 8K elements keep it at <= 64 fp32 values per thread (4 warps).
    block = max(16, min(128, 8192 // d_p))
    grid = (triton.cdiv(seqlen, block), hq, batch)
    _bwd_preprocess[grid](
        out, dout, dlse if dlse is not None else delta, delta, *so, *sd, *sl, seqlen,
        HEAD_DIM=d, HEAD_DIM_P=d_p, HAS_DLSE=dlse is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return delta


def table_block(half_p: int) -> int:
    """Tokens per ``_rope_table`` program: 2048 cos/sin pairs, 16 per thread at 4 warps. The
    accurate angle keeps ~10 fp32 temporaries per pair: 4096 pairs spilled 28 B (sm_90) / 56 B
    (sm_80) per thread at R = 128 (ptxas -v)."""
    return max(16, min(128, 2048 // half_p))


def rope_table(
    positions: torch.Tensor,
    rope: RopeArgs,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
) -> torch.Tensor:
    """fp32 cos/sin (factor applied) of every token: ``[B, S, 2, R/2]`` for positions ``[B, S]``,
    ``[T, 2, R/2]`` for varlen positions ``[T]`` with ``cu_seqlens`` (sequence b uses split table b;
    a caller's table, ``rope.table_positions`` > 0, is shared by every sequence)."""
    split, stride_tb, table_positions = table_args(rope)
    half = split.shape[-1]
    varlen = cu_seqlens is not None
    table = torch.empty((*positions.shape, 2, half), dtype=torch.float32, device=positions.device)
    batch = cu_seqlens.numel() - 1 if varlen else positions.shape[0]
    if table.numel() == 0 or batch == 0:
        return table
    if not varlen and positions.shape[-1] > 1 and positions.stride(-1) != 1:
        positions = positions.contiguous()
    half_p = pow2(half)
    block = table_block(half_p)
    seqlen = max_seqlen if varlen else positions.shape[1]
    _rope_table[(triton.cdiv(seqlen, block), batch)](
        positions, split, table, cu_seqlens if varlen else positions,
        0 if varlen else positions.stride(0), stride_tb,
        0 if varlen else table.stride(0), seqlen, rope.attention_factor, table_positions,
        HALF=half, HALF_P=half_p, VARLEN=varlen, ROPE_TABLE=table_positions > 0, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return table


def run(dout, out, lse, dlse, *fwd) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the un-rotated inputs (contiguous, input dtype) of a whole call from the
    forward's ``out`` and ``lse``, the output gradient ``dout`` and optionally the LSE gradient ``dlse``;
    ``fwd``: the forward's arguments, as ``backward`` takes them (``BACKWARD_SCHEMA``, rope bundled)."""
    return backward(dout, lse, preprocess(out, dout, lse, dlse), *fwd)


def backward(
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
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
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the dK/dV and dQ kernels on validated inputs (layouts and arguments as ``attention.forward``).

    ``dout`` like q; ``lse`` the forward's LSE and ``delta`` from ``preprocess`` (both float32 in
    the LSE layout; for a block of a longer sequence, the *global* LSE and delta of its queries).
    ``window_left/right``: the forward's sliding window (-1 unbounded).
    Returns contiguous ``(dq, dk, dv)`` shaped like q, k, v in ``grad_dtype`` (default: the input
    dtype); dk/dv are summed over each GQA group.
    """
    grad_dtype = grad_dtype or q.dtype
    dq, dk, dv = _grad_like(q, grad_dtype), _grad_like(k, grad_dtype), _grad_like(v, grad_dtype)
    varlen = cu_seqlens_q is not None
    d = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        batch = q.shape[0]
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv
    if batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    dout = _last_dim_contiguous(dout)
    lse, delta = lse.contiguous(), delta.contiguous()
    rotary_dim, rotate = rotary_split(rope)
    if rotate:
        cs_q = rope_table(q_positions, rope, cu_seqlens_q, max_seqlen_q)
        cs_k = rope_table(k_positions, rope, cu_seqlens_k, max_seqlen_k)
        scs = (0, 0) if varlen else (cs_q.stride(0), cs_k.stride(0))
    else:
        cs_q = cs_k = lse  # never read: rotation compiled out
        scs = (0, 0)

    def strides(x):  # (batch, token, head) strides; the varlen layout has no batch dimension
        return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))

    sl = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    group = hq // hkv
    dummy = lse  # stands in for the cu_seqlens pointers of the dense layout (never read)
    cu_q = cu_seqlens_q if varlen else dummy
    cu_k = cu_seqlens_k if varlen else dummy
    meta = dict(
        GROUP=group, **head_constants(d, rotary_dim), INTERLEAVED=rope.interleaved, ROTATE=rotate,
        CAUSAL=causal, WINDOW=window_left >= 0 or window_right >= 0, VARLEN=varlen,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )  # fmt: skip
    scalars = (
        seqlen_q, seqlen_k, softmax_scale * LOG2E, softmax_scale, window_left, window_right,
        triton.next_power_of_2(max_seqlen_q), triton.next_power_of_2(max_seqlen_k),
    )  # fmt: skip
    common = (*strides(q), *strides(k), *strides(v), *strides(dout))

    def grid_dkdv(m):
        return (triton.cdiv(max_seqlen_k, m["BLOCK_N"]), hkv, batch)

    _bwd_dkdv[grid_dkdv](
        q, k, v, dout, lse, delta, dk, dv, cs_q, cs_k, cu_q, cu_k,
        *common, *strides(dk), *strides(dv), *sl, *scs, *scalars, **meta,
    )  # fmt: skip

    def grid_dq(m):
        return (triton.cdiv(max_seqlen_q * group, m["BLOCK_M"]), hkv, batch)

    _bwd_dq[grid_dq](
        q, k, v, dout, lse, delta, dq, cs_q, cs_k, cu_q, cu_k,
        *common, *strides(dq), *sl, *scs, *scalars, **meta,
    )  # fmt: skip
    return dq, dk, dv


def limits(q: torch.Tensor, k: torch.Tensor, batch: int) -> str | None:
    """None when the backward kernels take these inputs (device not checked), else the reason."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if max(q.shape[-2], k.shape[-2], batch) > MAX_GRID_YZ:
        return f"batch ({batch}) and heads ({q.shape[-2]}) must each be <= {MAX_GRID_YZ}"
    return None
