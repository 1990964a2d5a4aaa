"""Ring attention with fused scaled RoPE (context parallelism over ``torch.distributed``).

Each of the W ranks of a group holds a shard of S tokens of one global sequence of N = W·S tokens:
q ``[B, S, Hq, D]`` and k, v ``[B, S, Hkv, D]``, all **un-rotated**. Forward: the K/V block of
every rank travels once around the ring (rank r sends to r+1, receives from r-1) together with
its int32 positions; at step t rank r holds the block of rank ``src = (r - t) mod W``, posts the
transfer of that block to r+1 *before* attending to it (so the transfer overlaps the compute), and
merges the partial output into its running output through the log-sum-exp. Because keys are
rotated on read from their positions, a block needs nothing from its owner but K, V and positions.

Causality is decided by **global sequence index** (query g_i sees key g_j iff g_j <= g_i), never
by the positions, which are data (they may repeat or jump). The public attention op only knows
two relations between a query block and a key block — all visible (``causal=False``) and the
bottom-right aligned triangle (``causal=True``) — so each (q shard, K block) pair is split into
sub-blocks that are each one of: fully visible, diagonal (same global index range on both sides,
where ``j <= i`` on local indices is exactly ``g_j <= g_i``) or invisible (skipped):

* ``contiguous`` (rank r holds global [rS, (r+1)S)): src < r all visible; src == r diagonal;
  src > r invisible. Rank W-1 does W - 1/2 blocks of work, rank 0 half a block.
* ``zigzag`` (the sequence is cut into 2W chunks of c = S/2; rank r holds chunks r and 2W-1-r, in
  that order, so local order is global order): src == r diagonal over the whole shard;
  src < r: all queries see the first half (chunk src) of the block, none see chunk 2W-1-src;
  src > r: only the second-half queries (chunk 2W-1-r) see the block, all of it. Every rank does
  exactly half a block of work per step, so no rank waits for another.

Length-dependent scaling (dynamic NTK, LongRoPE) uses the **global** length on every rank:
N for the default positions, else ``max over all ranks of k_positions[b] + 1`` (one all-reduce),
the same rule ``rope_attention`` applies to the gathered sequence.

Backward (``torch.autograd``) runs the ring again: K/V and positions travel as in the forward,
and the fp32 dK/dV accumulator of each block travels with it, one step behind, collecting every
rank's contribution, and takes one extra hop home to the block's owner. Per-block gradients come
from the saved global LSE (``block_backward``: the fused Triton backward kernels when they take the
tensors, else the PyTorch recompute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import backends
from .._autograd import backward_backend
from .._validation import FLOAT_DTYPES, AttentionCall, RopeArgs, attention_call
from ..scaling import RopeConfig, split_turns

__all__ = ["LAYOUTS", "block_backward", "ring_rope_attention", "shard", "shard_indices", "unshard"]

LAYOUTS = ("zigzag", "contiguous")

# gloo matches messages between a pair of ranks by tag (NCCL by order; both hold here).
_TAG_KV, _TAG_POS, _TAG_DKV = 0, 1, 2


# ---------------------------------------------------------------------------------- layouts
def _check_layout(layout: object) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    return layout


def shard_indices(seq_len: int, world_size: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """Global sequence indices (int64 ``[seq_len // world_size]``, increasing) held by ``rank``.

    ``contiguous``: ``[rank·S, (rank+1)·S)``. ``zigzag``: chunks ``rank`` and ``2W-1-rank`` of 2W
    chunks of ``S/2`` tokens (``seq_len`` must divide by ``2W``), which balances causal work.
    """
    layout = _check_layout(layout)
    for name, value in (("seq_len", seq_len), ("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {world_size=}, {rank=}")
    parts = world_size if layout == "contiguous" else 2 * world_size
    if seq_len < 0 or seq_len % parts:
        raise ValueError(f"`seq_len` ({seq_len}) must be a non-negative multiple of {parts} for the {layout} layout")
    s = seq_len // world_size
    if layout == "contiguous":
        return torch.arange(rank * s, (rank + 1) * s)
    c = s // 2
    lo, hi = rank * c, (2 * world_size - 1 - rank) * c
    return torch.cat((torch.arange(lo, lo + c), torch.arange(hi, hi + c)))


def shard(x: torch.Tensor, world_size: int, rank: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The shard of ``x`` (global sequence along ``dim``) that ``rank`` passes to the ring (a copy)."""
    idx = shard_indices(x.shape[dim], world_size, rank, layout).to(x.device)
    return x.index_select(dim, idx)


def unshard(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard``: the global tensor from the list of every rank's shard, rank order."""
    w = len(shards)
    if w == 0:
        raise ValueError("`shards` is empty")
    n = shards[0].shape[dim] * w
    x = torch.cat(list(shards), dim=dim)
    order = torch.cat([shard_indices(n, w, r, layout) for r in range(w)]).to(x.device)
    return x.index_select(dim, torch.argsort(order))


def _block_plan(layout: str, causal: bool, rank: int, src: int, s: int) -> list[tuple[slice, slice, bool]]:
    """Sub-blocks ``(q slice, k slice, causal)`` of rank ``rank``'s queries against the K block of
    rank ``src`` that together cover exactly the keys each query sees (module docstring)."""
    every = slice(0, s)
    if not causal:
        return [(every, every, False)]
    if src == rank:
        return [(every, every, True)]
    if layout == "contiguous":
        return [(every, every, False)] if src < rank else []
    c = s // 2
    if src < rank:
        return [(every, slice(0, c), False)]
    return [(slice(c, s), every, False)]


# ---------------------------------------------------------------------------------- the ring
class _Ring:
    """Point-to-point neighbours of this rank in ``group`` (group ranks; P2POp maps them)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world

    def exchange(self, send: list[tuple[torch.Tensor, int]], recv: list[tuple[torch.Tensor, int]]) -> list:
        """Post sends to ``next`` and receives from ``prev`` (``(tensor, tag)`` pairs) as one batch;
        returns the works to ``wait`` on. Sent tensors must stay untouched until then."""
        ops_ = [dist.P2POp(dist.isend, t, group=self.group, group_peer=self.next, tag=tag) for t, tag in send]
        ops_ += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.prev, tag=tag) for t, tag in recv]
        return dist.batch_isend_irecv(ops_)


def _wait(works: list | None) -> None:
    for w in works or ():
        w.wait()


@dataclasses.dataclass
class _Setup:
    """Everything about one ring call that is not a tensor the autograd graph tracks."""

    ring: _Ring
    layout: str
    causal: bool
    rope: RopeConfig
    softmax_scale: float
    backend: str
    template: AttentionCall | None  # the validated local call; pieces are `dataclasses.replace`d from it


def _merge(out_acc, lse_acc, out_p, lse_p, qs: slice) -> None:
    """Fold a partial result (``out_p [B, s, Hq, D]``, ``lse_p [B, Hq, s]``) into rows ``qs`` of the
    running accumulators, in place: the log-sum-exp weighted mean of two softmax partitions."""
    a = lse_acc[:, :, qs]
    b = lse_p.to(lse_acc.dtype)
    new = torch.logaddexp(a, b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # both -inf: weights exp(-inf) = 0
    wa = torch.exp(a - safe).transpose(1, 2)[..., None]
    wb = torch.exp(b - safe).transpose(1, 2)[..., None]
    out_acc[:, qs] = out_acc[:, qs] * wa + out_p.to(out_acc.dtype) * wb
    lse_acc[:, :, qs] = new


def _ring_forward(q, k, v, q_pos, k_pos, seq_lens, setup: _Setup) -> tuple[torch.Tensor, torch.Tensor]:
    ring, s = setup.ring, q.shape[1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse_acc = torch.full((q.shape[0], q.shape[2], s), float("-inf"), dtype=acc_dtype, device=q.device)
    kv = torch.stack((k, v)) if ring.world > 1 else (k, v)  # one contiguous [2, B, S, Hkv, D] message per step
    pos = k_pos.contiguous()
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        works = None
        if step < ring.world - 1:  # post the next transfer before computing on the current block
            kv_next, pos_next = torch.empty_like(kv), torch.empty_like(pos)
            works = ring.exchange([(kv, _TAG_KV), (pos, _TAG_POS)], [(kv_next, _TAG_KV), (pos_next, _TAG_POS)])
        for qs, ks, causal in _block_plan(setup.layout, setup.causal, ring.rank, src, s):
            call = dataclasses.replace(
                setup.template,
                q=q[:, qs],
                k=kv[0][:, ks],
                v=kv[1][:, ks],
                q_positions=q_pos[:, qs].contiguous(),
                k_positions=pos[:, ks].contiguous(),
                causal=causal,
                max_seqlen_q=qs.stop - qs.start,
                max_seqlen_k=ks.stop - ks.start,
                seq_lens=seq_lens,
                return_lse=True,
            )
            out_p, lse_p = backends.select_backend("attention", call, q.device, setup.backend).attention(call)
            _merge(out_acc, lse_acc, out_p, lse_p, qs)
        if works is not None:
            _wait(works)
            kv, pos = kv_next, pos_next
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out_acc.to(q.dtype), lse_acc.to(lse_dtype)


# ---------------------------------------------------------------------------------- backward
def block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    inv64: torch.Tensor,
    rope: RopeConfig,
    softmax_scale: float,
    causal: bool,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (query block, key block) pair from the global softmax statistics.

    Args: as ``ropekern._autograd.dense_backward`` (the global ``lse`` and ``delta`` = rowsum(dO * O)
    of the final output), with the rope as its config and float64 frequencies ``inv64 [nT, R/2]``, and
        backend: the ring's forward backend: its ``backward`` runs the block when it serves it (the
            fused Triton kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``), else the first of the
            device's ``auto`` order that does (``backends``; ``torch``: the PyTorch recompute).
    Returns: ``(dq, dk, dv)`` of the un-rotated inputs, in float32 (the PyTorch path: fp64 for
    fp32/fp64 inputs); dk/dv are summed over each GQA group.
    """
    rope_args = RopeArgs.of(rope, split_turns(inv64))
    call = backends.BackwardCall(
        do, q, k, v, None, lse, None, q_pos, k_pos, None, None, q.shape[1], k.shape[1], rope_args, causal,
        softmax_scale, -1, -1, delta=delta,
    )  # fmt: skip
    return backward_backend(call, backend).backward(call)


def _ring_backward(q, k, v, q_pos, k_pos, seq_lens, out, lse, dout, setup: _Setup):
    ring, s = setup.ring, q.shape[1]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    inv64, _ = setup.rope.tables(seq_lens, q.device)
    delta = (dout.to(cd) * out.to(cd)).sum(-1).transpose(1, 2)  # [B, Hq, S]
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    kv = torch.stack((k, v)) if ring.world > 1 else (k, v)
    pos = k_pos.contiguous()
    dkv_works, dkv_in, dkv_sent = None, None, None
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        kv_works = None
        if step < ring.world - 1:
            kv_next, pos_next = torch.empty_like(kv), torch.empty_like(pos)
            kv_works = ring.exchange([(kv, _TAG_KV), (pos, _TAG_POS)], [(kv_next, _TAG_KV), (pos_next, _TAG_POS)])
        dkv = torch.zeros((2, *k.shape), dtype=cd, device=q.device)
        for qs, ks, causal in _block_plan(setup.layout, setup.causal, ring.rank, src, s):
            dq_p, dk_p, dv_p = block_backward(
                q[:, qs],
                kv[0][:, ks],
                kv[1][:, ks],
                dout[:, qs],
                lse[:, :, qs],
                delta[:, :, qs],
                q_pos[:, qs],
                pos[:, ks],
                inv64,
                setup.rope,
                setup.softmax_scale,
                causal,
                setup.backend,
            )
            dq[:, qs] += dq_p
            dkv[0][:, ks] += dk_p
            dkv[1][:, ks] += dv_p
        if ring.world > 1:
            if step > 0:  # the accumulator of this block, with the contributions of the ranks before
                _wait(dkv_works)
                dkv += dkv_in
            # One step behind the K/V: the last hop (step W-1) carries each block home to its owner.
            dkv_in, dkv_sent = torch.empty_like(dkv), dkv
            dkv_works = ring.exchange([(dkv_sent, _TAG_DKV)], [(dkv_in, _TAG_DKV)])
        else:
            dkv_in = dkv
        if kv_works is not None:
            _wait(kv_works)
            kv, pos = kv_next, pos_next
    _wait(dkv_works)
    del dkv_sent
    return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, seq_lens, setup):
        out, lse = _ring_forward(q, k, v, q_pos, k_pos, seq_lens, setup)
        ctx.save_for_backward(q, k, v, q_pos, k_pos, seq_lens, out, lse)
        ctx.setup = dataclasses.replace(setup, template=None)  # no tensor references outside saved ones
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, q_pos, k_pos, seq_lens, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, q_pos, k_pos, seq_lens, out, lse, dout, ctx.setup)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------- entry point
def _agree(values: list[int], device: torch.device, group) -> bool:
    """True when every rank of ``group`` passed the same ``values`` (one all-reduce of max and -min)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    both = torch.cat((t, -t))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(both[: len(values)], -both[len(values) :]))


def ring_rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: RopeConfig,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Scaled-RoPE self-attention of a sequence sharded over the ranks of ``group`` (ring attention).

    Call it on every rank of the group with that rank's shard (``shard(x, W, rank, layout)``);
    the result is each rank's shard of ``rope_attention`` on the gathered sequence. Differentiable
    (the backward is a collective too: every rank must run it).

    Args:
        q: un-rotated ``[B, S, Hq, D]``, this rank's S tokens; S is the same on every rank.
        k, v: un-rotated ``[B, S, Hkv, D]`` of the same tokens; ``Hq % Hkv == 0``.
        rope: the ``RopeConfig`` (``rope.head_dim == D``), the same on every rank.
        group: the process group (default: the default group); W = its size.
        causal: mask by global sequence index (query g_i sees key g_j iff g_j <= g_i).
        q_positions, k_positions: int ``[B, S]`` positions of this rank's tokens (data: they may
            repeat or jump); default: the global sequence index of each token under ``layout``.
        softmax_scale: default ``D ** -0.5``.
        layout: which global tokens this rank holds (``shard_indices``): ``"zigzag"`` (chunks r and
            2W-1-r of 2W; S must be even; balances causal work) or ``"contiguous"``.
        return_lse: also return the float32 LSE ``[B, Hq, S]`` over the whole sequence (not
            differentiable).
        backend: ``"auto"`` or a name from ``available_backends()``, for the forward blocks.
    Returns: ``out [B, S, Hq, D]`` like q, or ``(out, lse)``.
    Length-dependent scaling (dynamic NTK, LongRoPE) uses the global length: N = W·S for the
    default positions, else ``max over all ranks of k_positions[b] + 1``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_rope_attention needs torch.distributed initialised (init_process_group)")
    ring = _Ring(group)
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    # Validate locally, then agree on the outcome and the shapes in one all-reduce, so that a bad
    # argument on one rank raises on every rank instead of leaving the others blocked in a transfer.
    error, shape = None, [0] * 8
    try:
        layout = _check_layout(layout)
        if not isinstance(return_lse, bool):
            raise TypeError(f"`return_lse` must be a bool, got {return_lse!r}")
        template = attention_call(
            q, k, v, rope, causal=False, softmax_scale=softmax_scale, q_positions=q_positions, k_positions=k_positions
        )
        backends.select_backend("attention", template, device, backend)  # unknown or unusable names fail here
        if not isinstance(causal, bool):
            raise TypeError(f"`causal` must be a bool, got {causal!r}")
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                f"`q` holds {q.shape[1]} tokens but `k` holds {k.shape[1]}: the shards are the same tokens"
            )
        if layout == "zigzag" and q.shape[1] % 2:
            raise ValueError(f"the zigzag layout needs an even shard length, got S = {q.shape[1]} tokens")
        shape = [*q.shape, k.shape[2], FLOAT_DTYPES.index(q.dtype), LAYOUTS.index(layout), int(causal)]
        explicit_k = k_positions is not None
    except (TypeError, ValueError) as exc:
        error, explicit_k = exc, False
    agreed = _agree([int(error is not None), *shape, int(explicit_k)], device, group)
    if error is not None:
        raise error
    if not agreed:
        raise ValueError(
            "ring_rope_attention: ranks disagree (an error on another rank, or different batch, "
            "shard length, heads, head dim, dtype, layout, causal or k_positions presence)"
        )
    b, s = q.shape[0], q.shape[1]
    n = s * ring.world
    idx = shard_indices(n, ring.world, ring.rank, layout).to(device=device, dtype=torch.int32)
    q_pos = template.q_positions if q_positions is not None else idx.expand(b, s).contiguous()
    k_pos = template.k_positions if explicit_k else idx.expand(b, s).contiguous()
    seq_lens = None
    if rope.is_length_dependent:
        if explicit_k:
            local = k_pos.amax(dim=1).to(torch.int64) if s else torch.full((b,), -1, dtype=torch.int64, device=device)
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
            seq_lens = local + 1
        else:
            seq_lens = torch.full((b,), n, dtype=torch.int64, device=device)
    if q.numel() == 0 or k.numel() == 0:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q * 0 + (k.sum() + v.sum()) * 0  # zeros, connected to the graph so backward yields zeros
        lse = torch.full((b, q.shape[2], s), float("-inf"), dtype=lse_dtype, device=device)
        return (out, lse) if return_lse else out
    setup = _Setup(ring, layout, causal, template.rope, template.softmax_scale, backend, template)
    out, lse = _RingAttention.apply(q, k, v, q_pos, k_pos, seq_lens, setup)
    return (out, lse) if return_lse else out
