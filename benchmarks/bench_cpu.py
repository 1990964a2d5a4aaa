"""Benchmark of the native CPU backend against the plain-PyTorch ways to do the same work.

Prefill (causal, Hq/Hkv = 16/4, D = 128): ``rk.rope_attention(backend="cpu")`` against
  * baseline: eager Hugging Face-style RoPE (fp32 angles, cos/sin cast to the dtype) on q and k,
    then ``scaled_dot_product_attention`` with ``enable_gqa=True`` or with repeated K/V,
    whichever is faster in this run;
  * SDPA alone on the same (un-rotated) inputs: no RoPE at all, the bar's "1.1x SDPA".
Decode (1 query, GQA 32/8, D = 128, a cache of N un-rotated keys): ``rk.rope_attention_with_kvcache``
(rotates every key on read) against eager RoPE of q plus SDPA, or a grouped einsum, over a cache
of *pre-rotated* keys (the faster of the two); K/V read in GB/s and as a share of the memcpy
bandwidth measured in the same run (STREAM convention: bytes read + written per second).
Memory: peak resident memory of a 32K-token prefill (in a subprocess) against the bytes of
q, k, v and out.

Candidates run interleaved (A B C A B C ...) after a warm-up; medians are compared as ratios, so
a loaded machine slows all of them alike. FLOPs: 4 B Hq Sq Sk D, halved for causal (docs/design.md §6).

    PYTHONPATH=. python benchmarks/bench_cpu.py                      # the full table
    PYTHONPATH=. python benchmarks/bench_cpu.py --quick              # 1K-4K prefill, 4K-16K decode
    PYTHONPATH=. python benchmarks/bench_cpu.py --json results.json
    PYTHONPATH=. python benchmarks/bench_cpu.py --threads 1     # per-core efficiency (robust on a busy host)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import ropekern as rk
from ropekern.reference import cos_sin, rotate

HQ, HKV, HEAD_DIM = 16, 4, 128
DEC_HQ, DEC_HKV = 32, 8


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# Read before every timed call when set (--sweep-mb): evicts the caches without leaving dirty
# lines, so that no candidate pays for the write-backs of the one before it.
_SWEEP: torch.Tensor | None = None


def interleaved(candidates: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each candidate, run A B C A B C ... after `warmup` rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if _SWEEP is not None:
                _SWEEP.sum()
            times[name].append(_timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def hf_cos_sin(rope: rk.RopeConfig, positions: torch.Tensor, dtype: torch.dtype):
    """What HF's RotaryEmbedding does: fp32 angles, cos/sin of cat(freqs, freqs), cast to the dtype."""
    inv_freq = rope.inv_freq()
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rope.attention_factor).to(dtype), (emb.sin() * rope.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [S, D]."""
    return x * cos + rotate_half(x) * sin


def memcpy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy (STREAM 'Copy' convention)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / best


def prefill_candidates(rope: rk.RopeConfig, s: int, dtype: torch.dtype) -> dict:
    """The prefill candidates on one set of inputs (q [1, s, HQ, D], k/v [1, s, HKV, D], un-rotated)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, HQ, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(1, s, HKV, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(1, s, HKV, HEAD_DIM, generator=gen).to(dtype)
    pos = torch.arange(s)
    g = HQ // HKV

    def ours():
        return rk.rope_attention(q, k, v, rope, causal=True, backend="cpu")

    def base_gqa():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr, kr = hf_rope(q.transpose(1, 2), cos, sin), hf_rope(k.transpose(1, 2), cos, sin)
        return F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True, enable_gqa=True)

    def base_repeat():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr, kr = hf_rope(q.transpose(1, 2), cos, sin), hf_rope(k.transpose(1, 2), cos, sin)
        kr, vr = kr.repeat_interleave(g, dim=1), v.transpose(1, 2).repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)

    def sdpa_only():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )

    return {"cpu": ours, "rope+sdpa(gqa)": base_gqa, "rope+sdpa(repeat)": base_repeat, "sdpa": sdpa_only}


def bench_prefill(seqlens: list[int], dtypes: list[torch.dtype], repeats: int) -> list[dict]:
    rope = rk.RopeConfig(HEAD_DIM)
    rows = []
    for dtype in dtypes:
        for s in seqlens:
            t = interleaved(prefill_candidates(rope, s, dtype), repeats)
            base = min(t["rope+sdpa(gqa)"], t["rope+sdpa(repeat)"])
            flops = 4 * HQ * s * s * HEAD_DIM / 2
            row = {
                "op": "prefill",
                "dtype": str(dtype).replace("torch.", ""),
                "seqlen": s,
                "ms": {name: 1e3 * sec for name, sec in t.items()},
                "gflops_cpu": flops / t["cpu"] / 1e9,
                "gflops_sdpa": flops / t["sdpa"] / 1e9,
                "speedup_vs_baseline": base / t["cpu"],
                "speedup_vs_sdpa": t["sdpa"] / t["cpu"],
            }
            rows.append(row)
            print(
                f"prefill {row['dtype']:>8} S={s:>6}: cpu {row['ms']['cpu']:9.1f} ms {row['gflops_cpu']:6.1f} GFLOP/s"
                f" | baseline {1e3 * base:9.1f} ms  x{row['speedup_vs_baseline']:.2f}"
                f" | sdpa {row['ms']['sdpa']:9.1f} ms  x{row['speedup_vs_sdpa']:.2f}",
                flush=True,
            )
    return rows


def decode_candidates(rope: rk.RopeConfig, n: int, dtype: torch.dtype) -> tuple[dict, int]:
    """The decode candidates for a cache of n keys, and the bytes of K and V they read."""
    g = DEC_HQ // DEC_HKV
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, DEC_HQ, HEAD_DIM, generator=gen).to(dtype)
    k_cache = torch.randn(1, n, DEC_HKV, HEAD_DIM, generator=gen).to(dtype)  # un-rotated, ours
    v_cache = torch.randn(1, n, DEC_HKV, HEAD_DIM, generator=gen).to(dtype)
    lens = torch.tensor([n], dtype=torch.int32)
    # The baseline's cache: HF layout [B, Hkv, S, D], keys rotated once when they were appended.
    inv64, _ = rope.tables()
    cos_all, sin_all = cos_sin(torch.arange(n), inv64[0], rope.attention_factor, torch.float32, angles="fp32")
    k_rot = rotate(k_cache[0].float(), cos_all[:, None], sin_all[:, None], HEAD_DIM, False)  # [n, Hkv, D]
    k_hf = k_rot.to(dtype).permute(1, 0, 2).unsqueeze(0).contiguous()
    v_hf = v_cache.permute(0, 2, 1, 3).contiguous()
    pos = torch.tensor([n - 1])

    def ours():
        return rk.rope_attention_with_kvcache(q, k_cache, v_cache, rope, cache_seqlens=lens, backend="cpu")

    def base_sdpa():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr = hf_rope(q.transpose(1, 2), cos, sin)
        return F.scaled_dot_product_attention(qr, k_hf, v_hf, enable_gqa=True)

    def base_einsum():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr = hf_rope(q.transpose(1, 2), cos, sin).reshape(1, DEC_HKV, g, HEAD_DIM)
        scores = torch.einsum("bhgd,bhsd->bhgs", qr, k_hf) * HEAD_DIM**-0.5
        return torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), v_hf)

    kv_bytes = 2 * n * DEC_HKV * HEAD_DIM * k_cache.element_size()
    return {"cpu": ours, "rope+sdpa": base_sdpa, "rope+einsum": base_einsum}, kv_bytes


def bench_decode(cache_lens: list[int], dtypes: list[torch.dtype], repeats: int, memcpy_bps: float) -> list[dict]:
    rope = rk.RopeConfig(HEAD_DIM)
    rows = []
    for dtype in dtypes:
        for n in cache_lens:
            cands, kv_bytes = decode_candidates(rope, n, dtype)
            t = interleaved(cands, repeats)
            base = min(t["rope+sdpa"], t["rope+einsum"])
            row = {
                "op": "decode",
                "dtype": str(dtype).replace("torch.", ""),
                "cache_len": n,
                "ms": {name: 1e3 * sec for name, sec in t.items()},
                "kv_gbps_cpu": kv_bytes / t["cpu"] / 1e9,
                "kv_gbps_baseline": kv_bytes / base / 1e9,
                "pct_of_memcpy": 100 * kv_bytes / t["cpu"] / memcpy_bps,
                "speedup_vs_baseline": base / t["cpu"],
            }
            rows.append(row)
            print(
                f"decode  {row['dtype']:>8} N={n:>6}: cpu {row['ms']['cpu']:8.2f} ms {row['kv_gbps_cpu']:5.1f} GB/s"
                f" ({row['pct_of_memcpy']:.0f}% of memcpy) | baseline {1e3 * base:8.2f} ms"
                f" {row['kv_gbps_baseline']:5.1f} GB/s  x{row['speedup_vs_baseline']:.2f}",
                flush=True,
            )
    return rows


_MEMORY_CHILD = r"""
import sys, torch, ropekern as rk
import torch.nn.functional as F

def status(key):  # kB from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

s, which, dtype = int(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
q = torch.randn(1, s, {hq}, {d}).to(dtype); k = torch.randn(1, s, {hkv}, {d}).to(dtype); v = torch.randn_like(k)
rope = rk.RopeConfig({d})
rk.rope_attention(q[:, :64], k[:, :64], v[:, :64], rope, causal=True)  # load everything first
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS:")
if which == "cpu":
    out = rk.rope_attention(q, k, v, rope, causal=True, backend="cpu")
else:
    from bench_cpu import hf_cos_sin, hf_rope
    cos, sin = hf_cos_sin(rope, torch.arange(s), dtype)
    qr, kr = hf_rope(q.transpose(1, 2), cos, sin), hf_rope(k.transpose(1, 2), cos, sin)
    out = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True, enable_gqa=True)
print((status("VmHWM:") - before) * 1024)
"""


def bench_memory(seqlen: int, dtype: torch.dtype, which: str) -> dict:
    """Peak memory of one prefill in a fresh process: the inputs plus the growth of the resident set
    during the call (Linux VmHWM, reset just before it), which includes the output."""
    code = _MEMORY_CHILD.format(hq=HQ, hkv=HKV, d=HEAD_DIM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    res = subprocess.run(
        [sys.executable, "-c", code, str(seqlen), which, str(dtype).replace("torch.", "")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    growth = int(res.stdout.strip().splitlines()[-1])
    esize = torch.empty(0, dtype=dtype).element_size()
    qkvo = (2 * seqlen * HQ + 2 * seqlen * HKV) * HEAD_DIM * esize
    inputs = (seqlen * HQ + 2 * seqlen * HKV) * HEAD_DIM * esize
    peak = inputs + growth
    row = {
        "op": "memory",
        "which": which,
        "dtype": str(dtype).replace("torch.", ""),
        "seqlen": seqlen,
        "bytes_qkvo": qkvo,
        "peak_bytes": peak,
        "ratio": peak / qkvo,
    }
    print(
        f"memory  {which:>8} {row['dtype']} S={seqlen}: peak {peak / 2**20:8.0f} MiB = {row['ratio']:.2f} x "
        f"bytes(q, k, v, out) ({qkvo / 2**20:.0f} MiB)",
        flush=True,
    )
    return row


def environment() -> dict:
    from ropekern.backends.native import cpu_isa

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": model,
        "threads": torch.get_num_threads(),
        "isa": cpu_isa(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1min_at_start": load,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sweep (1K-4K prefill, 4K-16K decode)")
    parser.add_argument("--prefill", type=int, nargs="*", help="prefill lengths (default 1K..16K)")
    parser.add_argument("--decode", type=int, nargs="*", help="decode cache lengths (default 4K..64K)")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 5, 3 above 4K)")
    parser.add_argument("--memory-seqlen", type=int, default=32768, help="0 skips the memory measurement")
    parser.add_argument("--memory-baseline", action="store_true", help="also measure the baseline's peak memory")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every candidate (default: torch's)")
    parser.add_argument(
        "--sweep-mb", type=int, default=0, help="read this many MB before every timed call (default 0: none)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _SWEEP
    _SWEEP = torch.ones(args.sweep_mb << 18) if args.sweep_mb > 0 else None

    prefill = args.prefill if args.prefill is not None else ([1024, 2048, 4096] if args.quick else [1024, 4096, 16384])
    decode = args.decode if args.decode is not None else ([4096, 16384] if args.quick else [4096, 16384, 65536])
    dtypes = [getattr(torch, d) for d in args.dtypes]
    env = environment()
    print(json.dumps(env))
    bw = memcpy_bandwidth()
    print(f"memcpy bandwidth: {bw / 1e9:.1f} GB/s (read + write)")
    results = {"environment": env, "memcpy_gbps": bw / 1e9, "sweep_mb": args.sweep_mb, "rows": []}
    for s in prefill:
        reps = args.repeats or (5 if s <= 4096 else 3)
        results["rows"] += bench_prefill([s], dtypes, reps)
    for n in decode:
        results["rows"] += bench_decode([n], dtypes, args.repeats or 15, bw)
    if args.memory_seqlen:
        for which in ("cpu", "baseline") if args.memory_baseline else ("cpu",):
            results["rows"].append(bench_memory(args.memory_seqlen, dtypes[0], which))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
