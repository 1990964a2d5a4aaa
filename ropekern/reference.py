"""The oracle: scaled-RoPE attention in plain PyTorch (docs/design.md §2), any device, any float dtype.

Rotation angles are formed in float64 (``position * inv_freq``), so the reference is exact at any
position. Arithmetic runs in float64 for float64 inputs and float32 otherwise; the output has the
input dtype. Attention is computed over query chunks so that no ``B·H·Sq·Sk`` score tensor is ever
materialised (16K tokens fit a 24 GB machine). Every function is differentiable by autograd.

The public functions validate their inputs exactly like ``ropekern.rope_attention`` and friends;
``attention``, ``kvcache`` and ``rotate`` are the backend entry points that take validated calls.
"""

from __future__ import annotations

import torch

from ._validation import AttentionCall, KVCacheCall, RopeCall, attention_call, kvcache_call, rope_call
from .scaling import RopeConfig, RopeTable

__all__ = ["apply_rope", "rope_attention", "rope_attention_with_kvcache"]

# Scores held at once per query chunk: 2**25 elements (128 MiB in fp32, ~4 live copies).
_SCORE_BUDGET = 1 << 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cos_sin(
    positions: torch.Tensor,
    inv_freq64: torch.Tensor,
    attention_factor: float,
    dtype: torch.dtype,
    angles: str = "fp64",
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[*positions.shape, R/2]`` in ``dtype``, scaled by the attention factor.

    ``angles="fp64"`` is the exact path. ``angles="fp32"`` is what most RoPE code does today (the
    test baseline): fp32 ``position * inv_freq``, fp32 cos/sin, cast to ``dtype``.
    """
    if angles == "fp64":
        angle = positions.to(torch.float64)[..., None] * inv_freq64.to(positions.device, torch.float64)
        cos, sin = torch.cos(angle) * attention_factor, torch.sin(angle) * attention_factor
    else:
        angle = positions.to(torch.float32)[..., None] * inv_freq64.to(positions.device, torch.float32)
        cos, sin = torch.cos(angle) * attention_factor, torch.sin(angle) * attention_factor
    return cos.to(dtype), sin.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x [..., D]``; cos/sin broadcast to ``[..., R/2]``.

    Half-split pairs (i, i + R/2); interleaved pairs (2i, 2i + 1). Channels >= R are copied.
    """
    r = rotary_dim
    if interleaved:
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rot, x[..., r:]), dim=-1) if r < x.shape[-1] else rot


def _rotate_rows(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv64: torch.Tensor,
    rope: RopeConfig | RopeTable,
    dtype: torch.dtype,
    angles: str,
    enabled: bool = True,
) -> torch.Tensor:
    """x ``[S, H, D]`` (cast to ``dtype``) rotated at positions ``[S]`` with table ``inv64 [R/2]``
    (a ``RopeTable``'s ``[P, 2, R/2]`` rows, looked up by position)."""
    if not enabled:
        return x.to(dtype)
    if isinstance(rope, RopeTable):
        rows = inv64.to(positions.device)[positions.to(torch.int64)]
        cos, sin = rows[:, 0].to(dtype), rows[:, 1].to(dtype)
    else:
        cos, sin = cos_sin(positions, inv64, rope.attention_factor, dtype, angles)
    return rotate(x.to(dtype), cos[:, None, :], sin[:, None, :], rope.rotary_dim, rope.interleaved)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    offset: int,
    window: tuple[int, int] = (-1, -1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence, already rotated: q ``[Sq, Hq, D]``, k/v ``[Sk, Hkv, D]``.

    Causal keeps key j for query i iff ``j <= i + offset``; ``window = (left, right)`` keeps it iff
    ``i + offset - left <= j <= i + offset + right`` (-1 unbounded). Returns out ``[Sq, Hq, D]`` and
    LSE float ``[Hq, Sq]``; rows that see no key give zeros and ``-inf``.
    """
    left, right = window
    masked = causal or left >= 0 or right >= 0
    sq, hq, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    if sk == 0:  # a varlen sequence with queries but no keys: every row sees no key
        return q.new_zeros(sq, hq, v.shape[-1]), q.new_full((hq, sq), float("-inf"))
    g = hq // hkv
    qg = q.reshape(sq, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, Sq, D]
    kt = k.permute(1, 2, 0)[:, None]  # [Hkv, 1, D, Sk]
    vt = v.permute(1, 0, 2)[:, None]  # [Hkv, 1, Sk, D]
    chunk = max(1, _SCORE_BUDGET // max(1, hq * sk))
    outs, lses = [], []
    for i0 in range(0, sq, chunk):
        i1 = min(sq, i0 + chunk)
        s = torch.matmul(qg[:, :, i0:i1], kt) * scale  # [Hkv, G, c, Sk]
        if masked:
            rows = torch.arange(i0, i1, device=q.device)[:, None] + offset
            keys = torch.arange(sk, device=q.device)[None, :]
            keep = (keys <= rows) if causal else torch.ones_like(keys <= rows)
            if left >= 0:
                keep &= keys >= rows - left
            if right >= 0:
                keep &= keys <= rows + right
            s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        if masked:
            p = torch.where(keep, p, torch.zeros_like(p))  # select, never multiply: NaN must not leak
        l_ = p.sum(dim=-1, keepdim=True)
        empty = l_ == 0
        l_safe = torch.where(empty, torch.ones_like(l_), l_)
        o = _weighted_values(p, vt, keep if masked else None) / l_safe
        lse = torch.where(empty, torch.full_like(l_, float("-inf")), m + torch.log(l_safe))
        outs.append(o)
        lses.append(lse[..., 0])
    out = torch.cat(outs, dim=2) if outs else qg.new_zeros(hkv, g, 0, d)
    lse = torch.cat(lses, dim=2) if lses else qg.new_zeros(hkv, g, 0)
    return out.permute(2, 0, 1, 3).reshape(sq, hq, d), lse.reshape(hq, sq)


def _weighted_values(p: torch.Tensor, vt: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``p @ v`` in which a key a row cannot see (``keep`` False) never meets the row: a NaN or an
    infinity in its V row must not reach it (a plain matmul gives 0 * NaN = NaN). The matmul takes
    the finite part of V; each row then gets, per channel, what the non-finite values of the keys it
    sees contribute (a probability times a NaN, or infinities of both signs, is NaN; else the
    infinity). p ``[Hkv, G, c, Sk]``, vt ``[Hkv, 1, Sk, D]``, keep bool ``[c, Sk]`` or None (all seen)."""
    finite = torch.isfinite(vt)
    if not torch.compiler.is_compiling() and bool(finite.all()):
        return torch.matmul(p, vt)
    out = torch.matmul(p, torch.where(finite, vt, torch.zeros_like(vt)))
    # Per (row, channel): seen NaN, +inf and -inf counted in one fp64 matmul (exact below 2**20 keys).
    inf = float("inf")
    code = torch.zeros(vt.shape, dtype=torch.float64, device=vt.device)
    code = code.masked_fill(torch.isnan(vt), 1.0).masked_fill(vt == inf, 2.0**20).masked_fill(vt == -inf, 2.0**40)
    seen = torch.ones(p.shape[-2:], dtype=torch.float64, device=p.device) if keep is None else keep.to(torch.float64)
    counts = torch.matmul(seen, code)
    nan, pos, neg = counts % 2**20 > 0, (counts // 2**20) % 2**20 > 0, counts >= 2**40
    extra = torch.where(nan | (pos & neg), float("nan"), torch.where(pos, inf, torch.where(neg, -inf, 0.0)))
    return out + extra.to(out.dtype)


def _sequence_slices(call: AttentionCall):
    """Yield (b, q slice, k slice) per sequence, for both layouts."""
    if call.varlen:
        cq, ck = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            yield b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
    else:
        for b in range(call.q.shape[0]):
            yield b, b, b


def attention(
    call: AttentionCall, *, compute_dtype: torch.dtype | None = None, angles: str = "fp64"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry point: ``(out, lse)`` for a validated call (LSE float32 ``[B, Hq, Sq]`` /
    ``[Hq, Tq]``). ``compute_dtype``/``angles`` exist for the test baseline only."""
    cd = compute_dtype or _compute_dtype(call.q.dtype)
    lse_dtype = torch.float64 if cd == torch.float64 else torch.float32
    inv64, _ = call.tables()
    outs, lses = [], []
    for b, qs, ks in _sequence_slices(call):
        table = inv64[b if inv64.shape[0] > 1 else 0]
        q = _rotate_rows(call.q[qs], call.q_positions[qs], table, call.rope, cd, angles, call.rotate)
        k = _rotate_rows(call.k[ks], call.k_positions[ks], table, call.rope, cd, angles, call.rotate)
        o, l_ = _attend(
            q, k, call.v[ks].to(cd), call.softmax_scale, call.causal, k.shape[0] - q.shape[0],
            (call.window_left, call.window_right),
        )  # fmt: skip
        outs.append(o.to(call.q.dtype))
        lses.append(l_.to(lse_dtype))
    if not outs:  # empty batch
        hq = call.q.shape[-2]
        shape = (hq, 0) if call.varlen else (0, hq, call.q.shape[1])
        return torch.empty_like(call.q), torch.empty(shape, dtype=lse_dtype, device=call.q.device)
    if call.varlen:
        return torch.cat(outs, 0), torch.cat(lses, 1)
    return torch.stack(outs, 0), torch.stack(lses, 0)


def _gather_cache(cache: torch.Tensor, call: KVCacheCall, b: int, n: int) -> torch.Tensor:
    """Keys/values 0..n-1 of sequence b: ``[n, Hkv, D]``."""
    if not call.paged:
        return cache[b, :n]
    bs = cache.shape[1]
    idx = torch.arange(n, device=cache.device)
    blocks = call.block_table[b].to(torch.int64)[idx // bs]
    return cache[blocks, idx % bs]


def append_kv(call: KVCacheCall) -> list[int]:
    """Write ``k_new``/``v_new`` into the caches in place, un-rotated; returns n per sequence."""
    lens = call.cache_seqlens.tolist()
    s_new = call.s_new
    if s_new:
        for b, n0 in enumerate(lens):
            idx = torch.arange(n0, n0 + s_new, device=call.q.device)
            if call.paged:
                bs = call.k_cache.shape[1]
                blocks = call.block_table[b].to(torch.int64)[idx // bs]
                call.k_cache[blocks, idx % bs] = call.k_new[b]
                call.v_cache[blocks, idx % bs] = call.v_new[b]
            else:
                call.k_cache[b, n0 : n0 + s_new] = call.k_new[b]
                call.v_cache[b, n0 : n0 + s_new] = call.v_new[b]
    return [n0 + s_new for n0 in lens]


def kvcache(
    call: KVCacheCall, *, compute_dtype: torch.dtype | None = None, angles: str = "fp64"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry point: append, then attend every sequence's last Sq tokens to its n keys."""
    cd = compute_dtype or _compute_dtype(call.q.dtype)
    lens = append_kv(call)
    inv64, _ = call.tables()
    rope = call.rope
    b_, sq, hq, _ = call.q.shape
    outs, lses = [], []
    for b, n in enumerate(lens):
        table = inv64[b if inv64.shape[0] > 1 else 0]
        k = _gather_cache(call.k_cache, call, b, n)
        v = _gather_cache(call.v_cache, call, b, n).to(cd)
        k_pos = torch.arange(n, device=call.q.device)
        q_pos = torch.arange(n - sq, n, device=call.q.device).clamp_min(0)  # n < Sq: the first sit at 0
        q = _rotate_rows(call.q[b], q_pos, table, rope, cd, angles, call.rotate)
        k = _rotate_rows(k, k_pos, table, rope, cd, angles, call.rotate)
        o, l_ = _attend(q, k, v, call.softmax_scale, call.causal, n - sq, (call.window_left, call.window_right))
        outs.append(o)
        lses.append(l_)
    lse_dtype = torch.float64 if cd == torch.float64 else torch.float32
    if not outs:
        return torch.empty_like(call.q), torch.empty(0, hq, sq, dtype=lse_dtype, device=call.q.device)
    return torch.stack(outs).to(call.q.dtype), torch.stack(lses).to(lse_dtype)


def rotate_call(call: RopeCall, *, compute_dtype: torch.dtype | None = None, angles: str = "fp64") -> torch.Tensor:
    """Backend entry point for ``apply_rope``: a rotated copy of ``call.x``."""
    cd = compute_dtype or _compute_dtype(call.x.dtype)
    inv64, _ = call.tables()
    x = call.x if call.x.dim() == 4 else call.x[None]
    pos = call.positions if call.x.dim() == 4 else call.positions[None]
    rows = []
    for b in range(x.shape[0]):
        table = inv64[b if inv64.shape[0] > 1 else 0]
        rows.append(_rotate_rows(x[b], pos[b], table, call.rope, cd, angles))
    out = torch.stack(rows).to(call.x.dtype) if rows else torch.empty_like(x)
    return out if call.x.dim() == 4 else out[0]


# ---------------------------------------------------------------------- public reference API
def apply_rope(
    x: torch.Tensor, rope: RopeConfig, positions: torch.Tensor | None = None, *, seq_len: int | None = None
) -> torch.Tensor:
    """Reference ``ropekern.apply_rope``: see there."""
    return rotate_call(rope_call(x, rope, positions, seq_len))


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeConfig, **kwargs):
    """Reference ``ropekern.rope_attention``: same arguments (without ``backend``)."""
    call = attention_call(q, k, v, rope, **kwargs)
    out, lse = attention(call)
    return (out, lse.to(torch.float32) if call.q.dtype != torch.float64 else lse) if call.return_lse else out


def rope_attention_with_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rope: RopeConfig, **kwargs
):
    """Reference ``ropekern.rope_attention_with_kvcache``: same arguments (without ``backend``)."""
    call = kvcache_call(q, k_cache, v_cache, rope, **kwargs)
    out, lse = kvcache(call)
    return (out, lse) if call.return_lse else out
