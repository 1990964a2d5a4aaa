"""Min-of-N timings of a fixed CPU workload through the public API (2K causal prefill, 16K decode
steps; fp32 and bf16, one thread): run it under two checkouts alternately to compare them.

    PYTHONPATH=<checkout> python benchmarks/tools/api_path_timing.py
"""

import time

import torch

import ropekern as rk


def best_ms(fn, args, kwargs, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rope = rk.RopeConfig(128, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    out = []
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 2048, 16, 128, generator=g).to(dt)
        k = torch.randn(1, 2048, 4, 128, generator=g).to(dt)
        out.append(best_ms(rk.rope_attention, (q, k, k, rope), dict(causal=True, backend="cpu"), 4))
        kc = torch.randn(1, 16384, 8, 128, generator=g).to(dt)
        vc = kc.clone()
        qd = torch.randn(1, 1, 32, 128, generator=g).to(dt)
        kn = torch.randn(1, 1, 8, 128, generator=g).to(dt)
        lens = torch.tensor([16383], dtype=torch.int32)
        kw = dict(cache_seqlens=lens, k_new=kn, v_new=kn, backend="cpu")
        out.append(best_ms(rk.rope_attention_with_kvcache, (qd, kc, vc, rope), kw, 30))
    print(" ".join(f"{x:8.2f}" for x in out), "ms (prefill f32, decode f32, prefill bf16, decode bf16; min)")


if __name__ == "__main__":
    main()
