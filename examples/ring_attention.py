"""Ring attention with fused scaled RoPE: one process per device, launched by torchrun.

    # 8 GPUs of one node (NCCL): a 1M-token causal sequence, Llama-70B-like heads, YaRN x8
    torchrun --nproc_per_node=8 examples/ring_attention.py --seq-len 1048576 --heads 64 --kv-heads 8 \\
        --head-dim 128 --dtype bf16 --rope yarn --factor 8
    # CPU (gloo), small, checked against single-process attention on the gathered sequence
    torchrun --nproc_per_node=2 examples/ring_attention.py --seq-len 256 --check

Each rank builds only its own shard (``ropekern.distributed.shard_indices`` says which global
tokens it holds), runs ``ring_rope_attention`` forward and backward, and rank 0 prints the time
and the attention throughput. ``--check`` gathers every shard and holds output and gradients to
the error-ratio rule against the fp64 reference on one process (small sequences only).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import ropekern as rk
import ropekern.distributed.ring as ring_module
from ropekern.distributed import ring_rope_attention, unshard
from ropekern.testing import baseline_attention, error_check

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=256, help="global sequence length N (divisible by 2W)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--rope", choices=["default", "yarn", "dynamic", "llama3"], default="yarn")
    p.add_argument("--factor", type=float, default=4.0, help="context extension factor of the scaled rope")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes (after one warm-up)")
    p.add_argument("--check", action="store_true", help="compare with single-process attention (small N)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per rank (torch.set_num_threads)")
    return p.parse_args()


def make_rope(args: argparse.Namespace) -> rk.RopeConfig:
    original = max(1, int(args.seq_len / args.factor))
    scaling = {
        "default": None,
        "yarn": {"rope_type": "yarn", "factor": args.factor, "original_max_position_embeddings": original},
        "dynamic": {"rope_type": "dynamic", "factor": args.factor},
        "llama3": {
            "rope_type": "llama3",
            "factor": args.factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        },
    }[args.rope]
    extra = {"max_position_embeddings": original} if args.rope == "dynamic" else {}
    return rk.RopeConfig(args.head_dim, base=500000.0, scaling=scaling, **extra)


def main() -> int:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    rope = make_rope(args)
    n, b, hq, hkv, d = args.seq_len, args.batch, args.heads, args.kv_heads, args.head_dim
    if n % (2 * world if args.layout == "zigzag" else world):
        raise SystemExit(f"--seq-len {n} must divide by {2 * world if args.layout == 'zigzag' else world}")
    s = n // world

    gen = torch.Generator(device=device).manual_seed(1234 + rank)  # every rank draws only its shard
    q = torch.randn(b, s, hq, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, s, hkv, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, s, hkv, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(b, s, hq, d, generator=gen, device=device, dtype=dtype)
    causal = not args.no_causal

    def step():
        q.grad = k.grad = v.grad = None
        out = ring_rope_attention(q, k, v, rope, causal=causal, layout=args.layout)
        out.backward(do)
        return out

    if args.threads:
        torch.set_num_threads(args.threads)
    # Time spent blocked on ring transfers (after the compute they overlap): near 0 when hidden.
    blocked = [0.0]
    plain_wait = ring_module._wait

    def timed_wait(works):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        plain_wait(works)
        if cuda:
            torch.cuda.synchronize()
        blocked[0] += time.perf_counter() - t0

    ring_module._wait = timed_wait
    out = step()  # warm-up (allocations, NCCL/gloo connections)
    times, blocked[0] = [], 0.0
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # docs/design.md §6: forward 4·B·Hq·N²·D (halved for causal), backward 2.5x forward, RoPE not counted.
    flops = 3.5 * 4 * b * hq * n * n * d / (2 if causal else 1)
    median = sorted(times)[len(times) // 2]
    share = torch.tensor([blocked[0] / sum(times)], dtype=torch.float64, device=device)
    dist.all_reduce(share, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(
            f"ring_rope_attention W={world} N={n} B={b} Hq={hq} Hkv={hkv} D={d} {args.dtype} {args.layout} "
            f"causal={causal} rope={args.rope}: fwd+bwd median {median * 1e3:.1f} ms over {args.repeats}, "
            f"{flops / median / 1e12 / world:.3f} TFLOP/s per rank, blocked on transfers "
            f"{100 * float(share):.1f}% of the time (worst rank)"
        )

    if not args.check:
        dist.destroy_process_group()
        return 0

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return unshard([p.cpu() for p in parts], args.layout)

    got = {key: gather(t) for key, t in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}
    full = {key: gather(t.detach()) for key, t in (("q", q), ("k", k), ("v", v), ("do", do))}
    ok = True
    if rank == 0:
        ref = {}
        for kind, dt in (("oracle", torch.float64), ("baseline", dtype)):
            qq, kk, vv = (full[key].to(dt).requires_grad_() for key in ("q", "k", "v"))
            fn = rk.reference.rope_attention if kind == "oracle" else baseline_attention
            res = fn(qq, kk, vv, rope, causal=causal)
            o = res if kind == "oracle" else res[0]
            o.backward(full["do"].to(dt))
            ref[kind] = {"out": o.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad}
        for key in got:
            check = error_check(got[key], ref["oracle"][key], ref["baseline"][key], dtype, 2.0 if key == "out" else 3.0)
            ok &= check.ok
            print(f"check {key}: {check}")
        print("check:", "PASS" if ok else "FAIL")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
