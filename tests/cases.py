"""Fixtures shared by the backend test files: one RopeConfig (or its keyword arguments) per entry
of ``ropekern.scaling.ROPE_TYPES``, each its law's canonical example
(``ropekern.laws.ScalingLaw.example``); the tiny transformers models; paged KV caches."""

from __future__ import annotations

import torch

import ropekern as rk
from ropekern.laws import LAWS

# Where the length-dependent laws switch in rope_kwargs_per_type: staggered (dynamic NTK grows past
# 24 tokens, LongRoPE switches past 20, YaRN / Llama 3 are tuned to 16) so that the decode tests'
# short caches cross each switch at a different step.
_SWITCH = {"dynamic": 24, "longrope": 20}


# The tiny transformers models of the HF and context tests (test_hf.py adds the other architectures):
# initializer_range 0.2 keeps logits far apart, so greedy tokens test the method rather than
# floating-point ties.
TINY_MODEL = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TINY_MODEL |= dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
TINY_MODEL |= dict(initializer_range=0.2)
TINY_LLAMA = dict(intermediate_size=128, num_key_value_heads=2)  # with TINY_MODEL: GQA 4 / 2


def ropes_per_type(d: int) -> dict[str, rk.RopeConfig]:
    """Head dim ``d``, trained length 32 (tests run sequences on both sides of it)."""
    return {t: rk.RopeConfig(d, **LAWS[t].example(d, 32)) for t in rk.ROPE_TYPES}


def rope_kwargs_per_type(half: int) -> dict[str, dict]:
    """RopeConfig keyword arguments (beside head_dim/base) for ``half = rotary_dim / 2`` pairs;
    the length switches sit at 16-24 tokens, inside the short caches of the decode tests."""
    return {t: LAWS[t].example(2 * half, _SWITCH.get(t, 16)) for t in rk.ROPE_TYPES}


GARBAGE_BLOCK = 2**30  # what an allocator may leave in unused (or freed) block-table entries


def paged_cache(k_full, v_full, lens, s_new, block, gen, spare=3):
    """Dense caches ``[B, Smax, Hkv, D]`` as a paged pool ``[B * ceil(Smax / block) + spare, block,
    Hkv, D]`` with shuffled blocks (``spare`` of them NaN and unused) and ``block_table [B,
    max_blocks]`` int32, whose entries past the blocks sequence b uses after the append
    (``lens[b] + s_new`` tokens) hold ``GARBAGE_BLOCK``. Returns ``(k_pool, v_pool, table)``."""
    b, smax = k_full.shape[:2]
    nblk = -(-smax // block)
    k_pool = torch.full((b * nblk + spare, block, *k_full.shape[2:]), float("nan"), dtype=k_full.dtype)
    v_pool = k_pool.clone()
    table = torch.randperm(b * nblk + spare, generator=gen)[: b * nblk].view(b, nblk).to(torch.int32)
    for i, n in enumerate(lens):
        for j in range(nblk):
            lo, hi = j * block, min((j + 1) * block, smax)
            k_pool[table[i, j], : hi - lo] = k_full[i, lo:hi]
            v_pool[table[i, j], : hi - lo] = v_full[i, lo:hi]
        table[i, -(-(n + s_new) // block) :] = GARBAGE_BLOCK
    return k_pool, v_pool, table
