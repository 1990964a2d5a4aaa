"""Scaling-type fixtures shared by the backend test files: one RopeConfig (or its keyword
arguments) per entry of ``ropekern.scaling.ROPE_TYPES``."""

from __future__ import annotations

import ropekern as rk


def ropes_per_type(d: int) -> dict[str, rk.RopeConfig]:
    """Head dim ``d``, trained length 32 (tests run sequences on both sides of it)."""
    half = d // 2
    return {
        "default": rk.RopeConfig(d),
        "linear": rk.RopeConfig(d, scaling={"rope_type": "linear", "factor": 4.0}),
        "ntk": rk.RopeConfig(d, scaling={"rope_type": "ntk", "factor": 4.0}),
        "dynamic": rk.RopeConfig(d, scaling={"rope_type": "dynamic", "factor": 3.0}, max_position_embeddings=32),
        "yarn": rk.RopeConfig(
            d, base=5e5, scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}
        ),
        "longrope": rk.RopeConfig(
            d,
            scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.01 * i for i in range(half)],
                "long_factor": [1.0 + 0.5 * i for i in range(half)],
                "original_max_position_embeddings": 32,
                "factor": 4.0,
            },
        ),
        "llama3": rk.RopeConfig(
            d,
            base=5e5,
            scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "proportional": rk.RopeConfig(d, scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25}),
    }


def rope_kwargs_per_type(half: int) -> dict[str, dict]:
    """RopeConfig keyword arguments (beside head_dim/base) for ``half = rotary_dim / 2`` pairs;
    the length switches sit at 16-24 tokens, inside the short caches of the decode tests."""
    return {
        "default": dict(),
        "linear": dict(scaling={"rope_type": "linear", "factor": 4.0}),
        "ntk": dict(scaling={"rope_type": "ntk", "factor": 4.0}),
        "dynamic": dict(scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=24),
        "yarn": dict(scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}),
        "longrope": dict(
            scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [2.0 + i for i in range(half)],
                "original_max_position_embeddings": 20,
            }
        ),
        "llama3": dict(
            scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
        "proportional": dict(scaling={"rope_type": "proportional", "partial_rotary_factor": 0.5}),
    }
