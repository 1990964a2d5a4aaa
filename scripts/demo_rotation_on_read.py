"""Measure what caching *rotated* keys costs for length-dependent RoPE scaling (docs/triton-decode.md).

A sequence is prefilled with P tokens and then decoded one token at a time past the point where
its scaling changes (dynamic NTK: every length above L; LongRoPE: the short -> long switch).

* exact: every key rotated with the table of the current length n (what recomputing the whole
  prefix gives, and what ropekern's cache of un-rotated keys + rotation on read computes);
* rotated cache: each key rotated once, when it entered the cache, with the table of the length
  at that moment (prompt keys with the prompt's table), as serving stacks store them.

Prints the max |error| of the rotated cache's attention logits (q.k / sqrt(D)) and outputs for the
query at position n - 1, both against the exact fp64 result, and the error of ropekern's Triton
kernel (fp32, through the interpreter when there is no GPU) at one length.

    PYTHONPATH=. python scripts/demo_rotation_on_read.py
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported (by ropekern's triton backend)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ropekern as rk  # noqa: E402
from ropekern import reference  # noqa: E402


def rotate(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, rope: rk.RopeConfig) -> torch.Tensor:
    """x [S, H, D] fp64 at positions [S] with per-row tables inv [S, R/2]."""
    angle = pos.double()[:, None] * inv
    af = rope.attention_factor
    cos, sin = (torch.cos(angle) * af)[:, None], (torch.sin(angle) * af)[:, None]
    return reference.rotate(x, cos, sin, rope.rotary_dim, rope.interleaved)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One query [H, D] against keys/values [n, H, D]: (logits [H, n], out [H, D])."""
    logits = torch.einsum("hd,nhd->hn", q, k) * q.shape[-1] ** -0.5
    return logits, torch.einsum("hn,nhd->hd", logits.softmax(-1), v)


def table_for(rope: rk.RopeConfig, lengths: torch.Tensor) -> torch.Tensor:
    return rope.tables(lengths)[0]  # fp64 [len(lengths), R/2]


def demo(name: str, rope: rk.RopeConfig, prompt: int, lengths: list[int], heads: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_max, d = max(lengths), rope.head_dim
    k = torch.randn(n_max, heads, d, generator=gen, dtype=torch.float64)
    v = torch.randn(n_max, heads, d, generator=gen, dtype=torch.float64)
    q = torch.randn(n_max, heads, d, generator=gen, dtype=torch.float64)
    pos = torch.arange(n_max)
    # the length each key's table was chosen from when it entered a rotated cache
    at_append = torch.where(pos < prompt, torch.full_like(pos, prompt), pos + 1)
    k_stale = rotate(k, pos, table_for(rope, at_append), rope)
    print(f"\n{name}: prompt {prompt} tokens, then decoding")
    print(f"{'n':>7} {'max |logit err|':>16} {'max |out err|':>14}")
    for n in lengths:
        table = table_for(rope, torch.tensor([n]))
        q_n = rotate(q[n - 1 : n], pos[n - 1 : n], table, rope)[0]
        exact_logits, exact_out = attend(q_n, rotate(k[:n], pos[:n], table.expand(n, -1), rope), v[:n])
        stale_logits, stale_out = attend(q_n, k_stale[:n], v[:n])
        print(
            f"{n:>7} {float((stale_logits - exact_logits).abs().max()):>16.3e}"
            f" {float((stale_out - exact_out).abs().max()):>14.3e}"
        )
    n = lengths[1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    f32 = dict(device=device, dtype=torch.float32)
    k_cache = torch.full((1, n, heads, d), float("nan"), **f32)
    v_cache = k_cache.clone()
    k_cache[0, : n - 1], v_cache[0, : n - 1] = k[: n - 1].to(**f32), v[: n - 1].to(**f32)
    out = rk.rope_attention_with_kvcache(
        q[None, n - 1 : n].to(**f32),
        k_cache,
        v_cache,
        rope,
        cache_seqlens=torch.tensor([n - 1], dtype=torch.int32, device=device),
        k_new=k[None, n - 1 : n].to(**f32),
        v_new=v[None, n - 1 : n].to(**f32),
        backend="triton",
    )
    exact = reference.rope_attention(q[None, :n], k[None, :n], v[None, :n], rope, causal=True)[0, -1]
    err = float((out[0, 0].double().cpu() - exact).abs().max())
    print(f"ropekern triton kernel (fp32) at n = {n}: max |out err| {err:.3e}")


def main() -> None:
    # Llama-2-7B-shaped dynamic NTK: D 128, base 1e4, L 4096, factor 2.
    dynamic = rk.RopeConfig(
        128, base=10000.0, scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=4096
    )
    demo("dynamic NTK (D 128, L 4096, factor 2)", dynamic, prompt=4000, lengths=[4096, 4200, 6000, 8192])
    # Phi-3-128k-shaped LongRoPE (synthetic factors of the same shape): D 96, L0 4096.
    half = 48
    long_factor = [1.0 + 47.0 * (i / (half - 1)) ** 2 for i in range(half)]
    short_factor = [1.0 + 0.2 * i / (half - 1) for i in range(half)]
    longrope = rk.RopeConfig(
        96,
        base=10000.0,
        scaling={
            "rope_type": "longrope",
            "short_factor": short_factor,
            "long_factor": long_factor,
            "original_max_position_embeddings": 4096,
        },
        max_position_embeddings=131072,
    )
    demo(
        "LongRoPE (D 96, L0 4096, synthetic Phi-3-shaped factors)",
        longrope,
        prompt=4000,
        lengths=[4096, 4200, 6000, 8192],
    )


if __name__ == "__main__":
    main()
