"""Attention gradients recomputed from the saved log-sum-exp, for every backend.

``dense_backward`` is the FlashAttention-2 recompute backward in plain PyTorch, chunked over queries
so that no ``[Sq, Sk]`` matrix of a whole sequence is ever held; ``recompute_backward`` runs it over a
whole call (an op, ``ropekern_autograd::recompute_bwd``, so that ``torch.compile`` traces it as one
opaque node). Both are the ``torch`` backend's ``backward``.

``register_attention_autograd(op)`` gives an attention forward op (``ATTENTION_SCHEMA``: the native
``ropekern::fwd`` of the CPU and CUDA kernels, the Triton one) its one autograd formula: it saves the
inputs, out and the LSE and runs the ``backward`` of the first backend that serves the call
(``backward_backend``).
"""

from __future__ import annotations

import torch

from . import backends
from ._validation import BACKWARD_SCHEMA, RopeArgs
from .reference import rotate

__all__ = ["backward_backend", "dense_backward", "recompute_backward", "register_attention_autograd"]

# Scores held at once per query chunk: 2**24 elements (128 MiB in fp64, ~5 live copies: s, p,
# dp, ds and a product), so the pure-PyTorch backward fits next to the activations.
_SCORE_BUDGET = 1 << 24


def dense_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    rope: RopeArgs,
    causal: bool,
    softmax_scale: float,
    whole_rows: bool = False,
    window: tuple[int, int] = (-1, -1),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one dense (query block, key block) pair from the softmax statistics.

    Args:
        q: un-rotated ``[B, Sq, Hq, D]``; k, v: un-rotated ``[B, Sk, Hkv, D]``; do: ``[B, Sq, Hq, D]``.
        lse: the log-sum-exp ``[B, Hq, Sq]`` over *all* the keys of the queries (for a block of a
            longer sequence, the global one); delta: ``rowsum(dO * O) - dlse`` ``[B, Hq, Sq]`` of the
            final output O (FlashAttention-2); with ``whole_rows``, ``-dlse`` alone (zeros when the
            LSE takes no gradient): rowsum(dO * O) is then formed from the recomputed rows.
        q_pos, k_pos: int ``[B, Sq]`` / ``[B, Sk]``; rope: the kernels' rotary arguments (split
            table ``[nT, 4, R/2]``, nT in {1, B}; ``rotary_dim`` 0: no rotation).
        causal: bottom-right aligned mask ``j <= i + Sk - Sq`` inside the pair.
        window: ``(left, right)``: query i sees keys ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``
            (-1 unbounded; ``AttentionCall.window_left/right``).
        whole_rows: k holds every key the queries see (not a block of a longer sequence), so P is
            the softmax of the recomputed scores itself, rowsum(dO * O) is rowsum(P * dP) of the
            same rows, and ``lse`` is not read (every row it recomputes sees a key).
    Returns: ``(dq, dk, dv)`` of the un-rotated inputs, in the compute dtype: fp32 for fp16/bf16
    inputs, fp64 for fp32/fp64 ones; dk/dv are summed over each GQA group.

    On rotated Q', K' (fp64 angles): P = exp(S - lse) (with ``whole_rows``, the softmax of each
    recomputed row and delta = rowsum(P ∘ dP) - dlse), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - delta),
    dQ' = dS K' · scale, dK' = dSᵀ Q' · scale; the inverse rotation (the transpose: the same cos
    with -sin, times the attention factor) maps dQ', dK' back to the un-rotated inputs, and
    pass-through channels keep the plain gradient.
    """
    # Precision, fp32 inputs (docs/design.md §5 ratio = error / bound with factor 3; worst of 160 random
    # dense cases over every rope type, causal or not, GQA, D 64/128, `whole_rows`): S, P, dP and
    # dS in fp64 (cd), the three products dV = P^T dO, dQ' = dS K', dK' = dS^T Q' in fp32 (gd):
    # worst 0.41 (mean-error ratio 0.27). dP in fp32 as well: worst 0.50, mean 0.48, 8 % faster;
    # S and dP in fp32: 0.55, 18 % faster; everything in fp32: 1.23 (fails), 44 % faster. Earlier
    # forms: P = exp(S - lse) with delta = rowsum(dO * O) reached 2.7 in fp64 and
    # 2.05 in fp32 (dv, one visible key); the row softmax with that delta, 1.00 in fp32. Ring blocks
    # (P = exp(S - lse) from a fp32 forward): fp32 S reached 0.84, fp64 S 0.46 (YaRN, non-causal,
    # W = 2). Half-precision inputs are far from the bound with fp32 throughout.
    cd = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
    gd = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    r, il = rope.rotary_dim, rope.interleaved
    if r:
        cq, sq_ = rope.cos_sin(q_pos, cd)
        ck, sk_ = rope.cos_sin(k_pos, cd)
        cq, sq_, ck, sk_ = (t[:, :, None, :] for t in (cq, sq_, ck, sk_))  # [B, S, 1, R/2]
        qr, kr = rotate(q.to(cd), cq, sq_, r, il), rotate(k.to(cd), ck, sk_, r, il)
    else:
        qr, kr = q.to(cd), k.to(cd)
    qr = qr.view(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Sq, D]
    kr = kr.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Sk, D]
    vt = v.to(cd).permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Sk, D]
    dot = do.to(cd).reshape(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Sq, D]
    delta = delta.to(cd).reshape(b, hkv, g, sq)
    dqr = torch.zeros_like(qr)
    dkr = torch.zeros(b, hkv, sk, d, dtype=cd, device=q.device)
    dv = torch.zeros(b, hkv, sk, d, dtype=cd, device=q.device)
    qs = qr * softmax_scale  # S = (Q' * scale) K'^T: one rounding of Q' in cd instead of a pass over S
    qg, kg, dog = qr.to(gd), kr.to(gd), dot.to(gd)  # the operands of the three gd products
    if not whole_rows:
        # A row with lse -inf saw no key: exp(S - (+inf)) gives it P = 0, as masked entries get.
        lse = lse.to(cd).reshape(b, hkv, g, sq)
        lse = torch.where(torch.isfinite(lse), lse, float("inf"))
    off = sk - sq  # causal: query i sees keys j <= i + off
    left, right = window
    first = max(0, -off) if causal else 0  # causal rows before this see no key: zero gradients
    chunk = max(1, _SCORE_BUDGET // max(1, b * hq * sk))
    if causal or left >= 0:
        # Query chunks of at most 256 rows, each against only the keys its rows can see: the
        # masked triangle is never formed (at 2K causal, ~half the work of the full score rows).
        chunk = min(chunk, 256)
    for i0 in range(first, sq, chunk):
        i1 = min(sq, i0 + chunk)
        ke = min(sk, i1 + off) if causal else sk  # keys j <= (i1 - 1) + off
        if right >= 0:
            ke = min(ke, i1 + off + right)
        kb = max(0, i0 + off - left) if left >= 0 else 0  # keys j >= i0 + off - left
        if ke <= kb:
            continue
        s = torch.matmul(qs[:, :, :, i0:i1], kr[:, :, :, kb:ke].transpose(-1, -2))  # [B, Hkv, G, c, ke - kb]
        hidden, j0 = None, kb
        if left >= 0 or right >= 0:
            rows = torch.arange(i0, i1, device=q.device)[:, None] + off
            keys = torch.arange(kb, ke, device=q.device)[None, :]
            hidden = (keys > rows) if causal else torch.zeros_like(keys > rows)
            if left >= 0:
                hidden |= keys < rows - left
            if right >= 0:
                hidden |= keys > rows + right
            s.masked_fill_(hidden, float("-inf"))
        elif causal:
            # Only the band [j0, ke) holds keys that some rows of the chunk do not see.
            j0 = max(0, i0 + off + 1)
            if j0 < ke:
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                hidden = torch.arange(j0, ke, device=q.device)[None, :] > rows + off
                s[..., j0 - kb :].masked_fill_(hidden, float("-inf"))
        if whole_rows:
            # exp(S - lse) carries the forward kernel's fp32 rounding of lse into every P; the
            # softmax of the recomputed row does not (with one visible key P is exactly 1, as in the
            # eager baseline, where exp(S - lse) put dv 2.7x over the docs/design.md §5 bound).
            p = torch.softmax(s, dim=-1)
            if hidden is not None and j0 == kb:
                # a window can leave a row without keys (all -inf: softmax NaN); it gets no gradient
                p.masked_fill_(hidden.all(-1, keepdim=True), 0.0)
        else:
            p = torch.exp(s.sub_(lse[..., i0:i1, None]))
        ds = torch.matmul(dot[:, :, :, i0:i1], vt[:, :, :, kb:ke].transpose(-1, -2))  # dP
        if hidden is not None:
            # dP of a hidden key is dO . V of a key the row cannot see: a NaN or an infinity in that
            # V must not reach the row through P * dP (0 * NaN = NaN), so it is selected to 0.
            ds[..., j0 - kb :].masked_fill_(hidden, 0.0)
        dc = delta[..., i0:i1, None]
        if whole_rows:
            # rowsum(P * dP) = rowsum(dO * O) in exact arithmetic; formed from the same P and dP it
            # cancels exactly where the gradient is exactly 0 (one visible key: dS = dP - dP).
            dc = dc + (p * ds).sum(-1, keepdim=True)
        ds = ds.sub_(dc).mul_(p).to(gd)  # dS = P o (dP - delta)
        p = p.to(gd)
        dv[:, :, kb:ke] += torch.matmul(p.transpose(-1, -2), dog[:, :, :, i0:i1]).sum(2)
        dqr[:, :, :, i0:i1] = torch.matmul(ds, kg[:, :, :, kb:ke]) * softmax_scale
        dkr[:, :, kb:ke] += torch.matmul(ds.transpose(-1, -2), qg[:, :, :, i0:i1]).sum(2) * softmax_scale
    dq = dqr.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    dk = dkr.permute(0, 2, 1, 3)
    if r:
        dq, dk = rotate(dq, cq, -sq_, r, il), rotate(dk, ck, -sk_, r, il)
    return dq, dk, dv.permute(0, 2, 1, 3)


def _recompute(
    dout, out, lse, dlse, q, k, v, q_positions, k_positions, cu_seqlens_q, cu_seqlens_k, _mq, _mk, rope, causal,
    softmax_scale, window_left, window_right,
):  # fmt: skip
    """``(dq, dk, dv)`` (input dtype) of a whole ``rope_attention`` call in PyTorch, any device
    (``BACKWARD_SCHEMA``, rope bundled). Layouts as ``rope_attention`` (dense, or varlen with
    ``cu_seqlens_*``, one sequence at a time)."""
    cd = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
    # -dlse in the LSE layout: dense_backward (whole_rows) adds rowsum(dO * O) of the recomputed rows.
    delta = -dlse.to(cd) if dlse is not None else torch.zeros(lse.shape, dtype=cd, device=lse.device)
    args = (causal, softmax_scale, True, (window_left, window_right))
    if cu_seqlens_q is None:
        grads = dense_backward(q, k, v, dout, lse, delta, q_positions, k_positions, rope, *args)
        return tuple(gr.to(x.dtype) for gr, x in zip(grads, (q, k, v)))
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if qs.start == qs.stop or ks.start == ks.stop:
            continue  # no queries or no keys: zero gradients
        grads = dense_backward(
            q[None, qs], k[None, ks], v[None, ks], dout[None, qs], lse[None, :, qs], delta[None, :, qs],
            q_positions[None, qs], k_positions[None, ks], rope.for_sequence(b), *args,
        )  # fmt: skip
        dq[qs], dk[ks], dv[ks] = (gr[0].to(dq.dtype) for gr in grads)
    return dq, dk, dv


def fake_grads(dout, out, lse, dlse, q, k, v, *rest):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


backends.define_op(
    "ropekern_autograd::recompute_bwd", BACKWARD_SCHEMA, "(Tensor, Tensor, Tensor)", _recompute, fake_grads
)
recompute_backward = torch.ops.ropekern_autograd.recompute_bwd


def backward_backend(call: backends.BackwardCall, prefer: str = "auto") -> backends.Backend:
    """The backend whose ``backward`` serves ``call``: ``prefer`` when it does (the forward's own
    backend, e.g. Triton's fused backward under the interpreter), else the first of the device's
    ``auto`` order that does (``torch`` serves every call)."""
    if prefer != "auto":
        loaded = backends.load(prefer)
        if not isinstance(loaded, str) and loaded.check_backward(call) is None:
            return loaded
    return backends.select_backend("backward", call, call.q.device, "auto")


# ------------------------------------------------------------------------------- forward ops
_REGISTERED: set[str] = set()


def register_attention_autograd(qualname: str, prefer: str = "auto") -> None:
    """Make a forward op with ``ATTENTION_SCHEMA`` -> ``(out, lse)`` differentiable (idempotent).

    One registration covers every device the op has kernels for; ``prefer`` names the backend whose
    backward runs when it serves the call (``backward_backend``). The op must exist."""
    if qualname in _REGISTERED:
        return

    def setup_context(ctx, inputs, output) -> None:
        is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
        ctx.save_for_backward(*(x for x, t in zip(inputs, is_tensor) if t), *output)
        ctx.is_tensor = is_tensor
        ctx.others = [None if t else x for x, t in zip(inputs, is_tensor)]

    def backward(ctx, dout, dlse):
        *saved, out, lse = ctx.saved_tensors
        tensors = iter(saved)
        inputs = [next(tensors) if other is None and t else other for other, t in zip(ctx.others, ctx.is_tensor)]
        if dout is None:
            dout = torch.zeros_like(out)
        call = backends.BackwardCall.from_op_args(dout, out, lse, dlse, *inputs)
        grads = backward_backend(call, prefer).backward(call)
        return (*grads, *(None,) * (len(inputs) - 3))

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    _REGISTERED.add(qualname)
