"""Triton fused scaled-RoPE + FlashAttention-2 backward (issue 4).

Gradients of ``out = softmax(R(q) R(k)^T * scale) v`` for the **un-rotated** q, k, v, recomputed
from the forward's natural-log LSE (no ``[Sq, Sk]`` matrix is ever stored). With Q' = R(q),
K' = R(k) (rotated in fp32 registers exactly as the forward does, rounded to the input dtype):

    P = exp(S - lse),  S = Q' K'^T * scale      dV  = P^T dO
    dP = dO V^T,  dS = P * (dP - delta)          dQ' = dS K' * scale,  dK' = dS^T Q' * scale

with ``delta = rowsum(dO * O) - dlse`` (``_bwd_preprocess``; ``dlse`` is the incoming gradient of
the LSE output, usually absent). A rotation is orthogonal and the attention factor f scales it,
so the gradient of ``x' = f (x1 cos - x2 sin, x2 cos + x1 sin)`` is the inverse rotation times f:
``dx = rotate_pairs(dx1', dx2', f cos, -f sin)``, applied once per output row at the end of each
kernel. Pass-through channels (``>= rotary_dim``) take the plain gradient; V is never rotated.

Three kernels, no atomics, so every gradient is bitwise reproducible run to run:

* ``_bwd_preprocess``: delta, one fp32 per (query, head), in the LSE layout.
* ``_bwd_dkdv``: a program owns ``BLOCK_N`` keys of one (sequence, kv head), rotates them once,
  and walks the query blocks that see them; for each query block it forms the block's cos/sin
  once (by angle addition when positions are consecutive) and reuses them for every query head of
  the GQA group, so dK/dV are summed over the group in registers (no atomics, no reduction pass).
* ``_bwd_dq``: the forward's tiling (GQA group folded into M, Q rotated once per program, each K
  tile rotated after it loads), accumulating dQ' over the key blocks.

Masking follows the forward: loads outside the sequence are masked with ``other=0`` (a masked
row gets ``lse = +inf``, so P = 0), causal blocks select masked probabilities to zero, and rows
that saw no key (``lse = -inf``) get no gradient.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .attention import SUPPORTED_DTYPES, _dot, _pow2
from .rope_math import rope_cos_sin
from .rope_tile import load_2d, load_pairs, load_pass, load_rotary, pair_columns, rotate_pairs, step_table, tile_cos_sin

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. The dK/dV program keeps four fp32
# accumulators of BLOCK_N x D (dk halves, dk pass-through, dv) plus K and V for its whole life; the
# dQ program keeps dQ' and Q. Shapes follow the public FA2 Triton backward (small M for dK/dV,
# small N for dQ); every one compiles for sm_80 / sm_90 without spills at D = 128 bf16 (aot.py),
# none has been timed (no GPU in this session).
_DKDV = ((32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (16, 64, 4, 1))
_DQ = ((64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 16, 4, 1))
# Under the interpreter every tile step costs ~1000 Python-level ops: 32 x 32 tiles keep the test
# shapes (<= 129 tokens) on several blocks, as in the forward.
_INTERPRETER = ((32, 32, 4, 1),)


def _configs(shapes) -> list[triton.Config]:
    shapes = _INTERPRETER if _INTERPRET else shapes
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def select_configs(
    configs: list[triton.Config], kernel: str, smem_limit: int, elem_size: int, head_dim_p: int, k_cols: int
) -> list[triton.Config]:
    """The configs of ``kernel`` ("dkdv" or "dq") whose operand tiles fit ``smem_limit`` bytes and
    whose fp32 accumulators fit the register file, for a padded head of ``head_dim_p`` (V, dO)
    and ``k_cols`` = 2 * HALF_P + PASS_P (Q / K) columns."""
    keep = []
    for c in configs:
        bm, bn, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        # One tile of Q, dO (dkdv: streamed; dq: resident) and one of K, V, in the input dtype.
        smem = (bm + bn) * (k_cols + head_dim_p) * elem_size
        # Resident fp32 accumulators per thread: dK' + dV (dkdv) or dQ' (dq), plus the score block.
        acc = bn * (k_cols + head_dim_p) if kernel == "dkdv" else bm * k_cols
        regs = (acc + bm * bn) // (32 * w)
        if smem <= smem_limit and regs <= 160:
            keep.append(c)
    if not keep:  # the last entry of each list is its smallest
        keep = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return keep


def _pruner(kernel: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        q = named_args["Q"]
        props = triton.runtime.driver.active.utils.get_device_properties(q.device.index or 0)
        k_cols = 2 * kwargs["HALF_P"] + kwargs["PASS_P"]
        return select_configs(configs, kernel, props["max_shared_mem"], q.element_size(), kwargs["HEAD_DIM_P"], k_cols)

    return prune


_KEY = ["HEAD_DIM_P", "HALF_P", "PASS_P", "GROUP", "INTERLEAVED", "ROTATE", "CAUSAL", "VARLEN", "Q_BUCKET", "K_BUCKET"]


# ------------------------------------------------------------------------------------ helpers
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
    pos,
    split,
    attention_factor,
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
        cos, sin = rope_cos_sin(pos, split, idx, pair_ok, HALF, attention_factor)
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
    qpos_base,
    split,
    step_cos,
    step_sin,
    attention_factor,
    qk_scale,
    q_start,
    sq,
    causal_offset,
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
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Add the contributions of queries ``[m_start, m_start + BLOCK_M)`` of every head of the
    group to the key block's accumulators; ``MASKED`` applies the causal mask."""
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < sq
    tok64 = (q_start + rows).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_P)
    # One cos/sin block per query block, shared by the GROUP heads (the positions are per token).
    if ROTATE:
        qpos = tl.load(qpos_base + rows, mask=row_ok, other=0)
        cos, sin = tile_cos_sin(qpos, row_ok, split, step_cos, step_sin, attention_factor, HALF, HALF_P, BLOCK_M)
    if MASKED:
        keep = cols[None, :] <= rows[:, None] + causal_offset
    q_rows = q_base + tok64 * stride_qs
    do_rows = do_base + tok64[:, None] * stride_dos + d[None, :]
    lse_off = lse_base + tok64
    for _ in range(GROUP):
        q1, q2 = load_pairs(q_rows, row_ok, HALF, HALF_P, INTERLEAVED, True)
        if ROTATE:
            r1, r2 = rotate_pairs(q1, q2, cos, sin)
            q1 = r1.to(q1.dtype)
            q2 = r2.to(q2.dtype)
        lse, delta = _row_stats(Lse, Delta, lse_off, row_ok)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot(q1, tl.trans(k1), s, DOT_PREC, UPCAST)
        s = _dot(q2, tl.trans(k2), s, DOT_PREC, UPCAST)
        if PASS > 0:
            qp = load_pass(q_rows, row_ok, 2 * HALF, PASS, PASS_P, True)
            s = _dot(qp, tl.trans(kp), s, DOT_PREC, UPCAST)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(keep, p, 0.0)  # select, never multiply: masked scores may be inf
        do = load_2d(do_rows, row_ok, d < HEAD_DIM, True, HEAD_DIM != HEAD_DIM_P)
        dv = _dot(tl.trans(p.to(do.dtype)), do, dv, DOT_PREC, UPCAST)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PREC, UPCAST)
        ds = tl.trans((p * (dp - delta[:, None])).to(q1.dtype))
        dk1 = _dot(ds, q1, dk1, DOT_PREC, UPCAST)
        dk2 = _dot(ds, q2, dk2, DOT_PREC, UPCAST)
        if PASS > 0:
            dkp = _dot(ds, qp, dkp, DOT_PREC, UPCAST)
        q_rows += stride_qh
        do_rows += stride_doh
        lse_off += stride_lh
    return dk1, dk2, dkp, dv


@triton.autotune(configs=_configs(_DKDV), key=_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit(do_not_specialize=["Q_BUCKET", "K_BUCKET", "seqlen_q", "seqlen_k"])
def _bwd_dkdv(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
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
    stride_qpb,
    stride_kpb,
    stride_tb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    softmax_scale,
    attention_factor,
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
    split = Split + b * stride_tb
    # Keys are rotated once for the program's whole walk over the queries.
    k_rows = K + b64 * stride_kb + ktok64 * stride_ks + hkv64 * stride_kh
    kpos = tl.load(KPos + b64 * stride_kpb + k_start + cols, mask=col_ok, other=0)
    k1, k2 = load_rotary(k_rows, col_ok, kpos, split, attention_factor, HALF, HALF_P, INTERLEAVED, ROTATE, True)
    if PASS > 0:
        kp = load_pass(k_rows, col_ok, 2 * HALF, PASS, PASS_P, True)
    else:
        kp = k1  # never read: PASS == 0 compiles the pass-through dots out
    v_rows = V + b64 * stride_vb + ktok64[:, None] * stride_vs + hkv64 * stride_vh + d[None, :]
    v = load_2d(v_rows, col_ok, d < HEAD_DIM, True, HEAD_DIM != HEAD_DIM_P)

    if ROTATE:
        step_cos, step_sin = step_table(split, HALF, HALF_P, BLOCK_M)
    else:
        step_cos = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)  # unused: rotation compiled out
        step_sin = step_cos

    dk1 = tl.zeros([BLOCK_N, HALF_P], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_P], dtype=tl.float32)
    dkp = tl.zeros([BLOCK_N, PASS_P if PASS > 0 else HALF_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)

    head0 = (hkv * GROUP).to(tl.int64)
    q_base = Q + b64 * stride_qb + head0 * stride_qh
    do_base = DO + b64 * stride_dob + head0 * stride_doh
    lse_base = b64 * stride_lb + head0 * stride_lh
    qpos_base = QPos + b64 * stride_qpb + q_start
    causal_offset = sk - sq  # bottom-right alignment: query i sees key j iff j <= i + Sk - Sq
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
            dk1, dk2, dkp, dv, k1, k2, kp, v, cols, q_base, do_base, lse_base, Lse, Delta, qpos_base, split,
            step_cos, step_sin, attention_factor, qk_scale, q_start, sq, causal_offset, m_start, stride_qs,
            stride_qh, stride_dos, stride_doh, stride_lh, GROUP, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P,
            INTERLEAVED, ROTATE, True, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for m_start in range(m_full, sq, BLOCK_M):
        dk1, dk2, dkp, dv = _dkdv_block(
            dk1, dk2, dkp, dv, k1, k2, kp, v, cols, q_base, do_base, lse_base, Lse, Delta, qpos_base, split,
            step_cos, step_sin, attention_factor, qk_scale, q_start, sq, causal_offset, m_start, stride_qs,
            stride_qh, stride_dos, stride_doh, stride_lh, GROUP, HEAD_DIM, HEAD_DIM_P, HALF, HALF_P, PASS, PASS_P,
            INTERLEAVED, ROTATE, False, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
        )  # fmt: skip

    dk_rows = DK + b64 * stride_dkb + ktok64 * stride_dks + hkv64 * stride_dkh
    _store_head(
        dk_rows, col_ok, dk1 * softmax_scale, dk2 * softmax_scale, dkp * softmax_scale, kpos, split, attention_factor,
        HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE,
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
    kpos_base,
    split,
    step_cos,
    step_sin,
    attention_factor,
    qk_scale,
    k_start,
    sk,
    causal_offset,
    lo,
    hi,
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
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate dQ' over key blocks ``[lo, hi)``; ``MASKED`` blocks may be ragged or causal."""
    d = tl.arange(0, HEAD_DIM_P)
    for start in range(lo, hi, BLOCK_N):
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
            cos, sin = tile_cos_sin(kpos, col_ok, split, step_cos, step_sin, attention_factor, HALF, HALF_P, BLOCK_N)
            r1, r2 = rotate_pairs(k1, k2, cos, sin)
            k1 = r1.to(k1.dtype)
            k2 = r2.to(k2.dtype)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot(q1, tl.trans(k1), s, DOT_PREC, UPCAST)
        s = _dot(q2, tl.trans(k2), s, DOT_PREC, UPCAST)
        if PASS > 0:
            kp = load_pass(k_rows, col_ok, 2 * HALF, PASS, PASS_P, MASKED)
            s = _dot(qp, tl.trans(kp), s, DOT_PREC, UPCAST)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= qi[:, None] + causal_offset)
            p = tl.where(keep, p, 0.0)  # select, never multiply
        v = load_2d(
            v_base + cols64[:, None] * stride_vs + d[None, :], col_ok, d < HEAD_DIM, MASKED, HEAD_DIM != HEAD_DIM_P
        )
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PREC, UPCAST)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = _dot(ds, k1, dq1, DOT_PREC, UPCAST)
        dq2 = _dot(ds, k2, dq2, DOT_PREC, UPCAST)
        if PASS > 0:
            dqp = _dot(ds, kp, dqp, DOT_PREC, UPCAST)
    return dq1, dq2, dqp


@triton.autotune(configs=_configs(_DQ), key=_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit(do_not_specialize=["Q_BUCKET", "K_BUCKET", "seqlen_q", "seqlen_k"])
def _bwd_dq(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_lb,
    stride_lh,
    stride_qpb,
    stride_kpb,
    stride_tb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    softmax_scale,
    attention_factor,
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
    split = Split + b * stride_tb
    q_rows = Q + b64 * stride_qb + tok64 * stride_qs + head64 * stride_qh
    q_pos = tl.load(QPos + b64 * stride_qpb + q_start + qi, mask=row_ok, other=0)
    q1, q2 = load_rotary(q_rows, row_ok, q_pos, split, attention_factor, HALF, HALF_P, INTERLEAVED, ROTATE, True)
    if PASS > 0:
        qp = load_pass(q_rows, row_ok, 2 * HALF, PASS, PASS_P, True)
    else:
        qp = q1  # never read
    do_rows = DO + b64 * stride_dob + tok64[:, None] * stride_dos + head64[:, None] * stride_doh + d[None, :]
    do = load_2d(do_rows, row_ok, d < HEAD_DIM, True, HEAD_DIM != HEAD_DIM_P)
    lse, delta = _row_stats(Lse, Delta, b64 * stride_lb + head64 * stride_lh + tok64, row_ok)

    causal_offset = sk - sq
    if CAUSAL:
        i_lo = r0 // GROUP
        i_hi = tl.minimum((r0 + BLOCK_M - 1) // GROUP, sq - 1)
        hi = tl.maximum(tl.minimum(sk, i_hi + causal_offset + 1), 0)
        full = tl.maximum(tl.minimum(sk, i_lo + causal_offset + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = sk
        full = sk // BLOCK_N * BLOCK_N

    hkv64 = hkv.to(tl.int64)
    k_base = K + b64 * stride_kb + hkv64 * stride_kh
    v_base = V + b64 * stride_vb + hkv64 * stride_vh
    kpos_base = KPos + b64 * stride_kpb + k_start
    if ROTATE:
        step_cos, step_sin = step_table(split, HALF, HALF_P, BLOCK_N)
    else:
        step_cos = tl.zeros([BLOCK_N, HALF_P], dtype=tl.float32)  # unused: rotation compiled out
        step_sin = step_cos

    dq1 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
    dqp = tl.zeros([BLOCK_M, PASS_P if PASS > 0 else HALF_P], dtype=tl.float32)
    dq1, dq2, dqp = _dq_keys(
        dq1, dq2, dqp, q1, q2, qp, do, lse, delta, qi, k_base, v_base, kpos_base, split, step_cos, step_sin,
        attention_factor, qk_scale, k_start, sk, causal_offset, 0, full, stride_ks, stride_vs, HEAD_DIM, HEAD_DIM_P,
        HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, CAUSAL, False, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    dq1, dq2, dqp = _dq_keys(
        dq1, dq2, dqp, q1, q2, qp, do, lse, delta, qi, k_base, v_base, kpos_base, split, step_cos, step_sin,
        attention_factor, qk_scale, k_start, sk, causal_offset, full, hi, stride_ks, stride_vs, HEAD_DIM, HEAD_DIM_P,
        HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE, CAUSAL, True, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    dq_rows = DQ + b64 * stride_dqb + tok64 * stride_dqs + head64 * stride_dqh
    _store_head(
        dq_rows, row_ok, dq1 * softmax_scale, dq2 * softmax_scale, dqp * softmax_scale, q_pos, split, attention_factor,
        HALF, HALF_P, PASS, PASS_P, INTERLEAVED, ROTATE,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ launchers
def _grad_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def preprocess(
    out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, varlen: bool
) -> torch.Tensor:
    """``delta = rowsum(dO * O) - dlse``, float32 in the LSE layout (``[B, Hq, Sq]`` / ``[Hq, Tq]``).

    ``out``/``dout`` like q (any strides, contiguous last dim); ``dlse`` like ``lse`` or None."""
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    if delta.numel() == 0:
        return delta
    # Autograd hands e.g. ``out.sum()``'s gradient over as an expanded tensor (every stride 0).
    out, dout = _last_dim_contiguous(out), _last_dim_contiguous(dout)
    d = out.shape[-1]
    d_p = _pow2(d)
    if varlen:
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


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    split: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    attention_factor: float,
    rotary_dim: int,
    interleaved: bool,
    causal: bool,
    rotate: bool,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the dK/dV and dQ kernels on validated inputs (layouts as ``attention.forward``).

    ``dout`` like q; ``lse`` the forward's LSE and ``delta`` from ``preprocess`` (both float32 in
    the LSE layout; for a block of a longer sequence, the *global* LSE and delta of its queries).
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
    if not varlen:
        if q_positions.shape[-1] > 1 and q_positions.stride(-1) != 1:
            q_positions = q_positions.contiguous()
        if k_positions.shape[-1] > 1 and k_positions.stride(-1) != 1:
            k_positions = k_positions.contiguous()

    def strides(x):  # (batch, token, head) strides; the varlen layout has no batch dimension
        return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))

    sl = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    spos = (0, 0) if varlen else (q_positions.stride(0), k_positions.stride(0))
    split = split.contiguous()
    stride_tb = split.stride(0) if split.shape[0] > 1 else 0
    half = rotary_dim // 2
    group = hq // hkv
    dummy = q_positions  # stands in for the cu_seqlens pointers of the dense layout (never read)
    cu_q = cu_seqlens_q if varlen else dummy
    cu_k = cu_seqlens_k if varlen else dummy
    meta = dict(
        GROUP=group, HEAD_DIM=d, HEAD_DIM_P=_pow2(d), HALF=half, HALF_P=_pow2(half), PASS=d - rotary_dim,
        PASS_P=_pow2(d - rotary_dim) if d > rotary_dim else 0, INTERLEAVED=interleaved, ROTATE=rotate,
        CAUSAL=causal, VARLEN=varlen, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
    )  # fmt: skip
    scalars = (
        seqlen_q, seqlen_k, softmax_scale * _LOG2E, softmax_scale, attention_factor,
        triton.next_power_of_2(max_seqlen_q), triton.next_power_of_2(max_seqlen_k),
    )  # fmt: skip
    common = (*strides(q), *strides(k), *strides(v), *strides(dout))

    def grid_dkdv(m):
        return (triton.cdiv(max_seqlen_k, m["BLOCK_N"]), hkv, batch)

    _bwd_dkdv[grid_dkdv](
        q, k, v, dout, lse, delta, dk, dv, q_positions, k_positions, split, cu_q, cu_k,
        *common, *strides(dk), *strides(dv), *sl, *spos, stride_tb, *scalars, **meta,
    )  # fmt: skip

    def grid_dq(m):
        return (triton.cdiv(max_seqlen_q * group, m["BLOCK_M"]), hkv, batch)

    _bwd_dq[grid_dq](
        q, k, v, dout, lse, delta, dq, q_positions, k_positions, split, cu_q, cu_k,
        *common, *strides(dq), *sl, *spos, stride_tb, *scalars, **meta,
    )  # fmt: skip
    return dq, dk, dv


_MAX_GRID_YZ = 65535


def check(q: torch.Tensor, k: torch.Tensor, batch: int) -> str | None:
    """None when the backward kernels take these inputs (device not checked), else the reason."""
    from .attention import MAX_HEAD_DIM

    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if max(q.shape[-2], k.shape[-2], batch) > _MAX_GRID_YZ:
        return f"batch ({batch}) and heads ({q.shape[-2]}) must each be <= {_MAX_GRID_YZ}"
    return None
