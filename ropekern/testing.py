"""The correctness rule of DESIGN §5, shared by the test suite and ``ropekern check``.

* **Oracle**: the reference on float64 copies of the inputs (exact angles, fp64 arithmetic).
* **Baseline**: what users run today in the test dtype: fp32 angles, cos/sin cast to the dtype,
  rotation and attention in the dtype.
* **Rule**: ``max|kernel - oracle| <= factor * (max|baseline - oracle| + noise)`` with
  ``noise = max|(oracle.to(dt) + 0.3 - 0.3) - oracle|`` (factor 2 forward, 3 backward), and the
  same inequality for the mean absolute error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from . import reference
from ._validation import attention_call, kvcache_call, rope_call

__all__ = [
    "ErrorCheck",
    "error_check",
    "oracle_attention",
    "baseline_attention",
    "oracle_kvcache",
    "baseline_kvcache",
    "oracle_rope",
    "baseline_rope",
    "random_qkv",
    "exact_angle",
]


@dataclass
class ErrorCheck:
    """Outcome of one comparison under the error-ratio rule."""

    ok: bool
    max_err: float
    max_bound: float
    mean_err: float
    mean_bound: float

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{verdict}: max {self.max_err:.3g} <= {self.max_bound:.3g}, "
            f"mean {self.mean_err:.3g} <= {self.mean_bound:.3g}"
        )


def error_check(
    out: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor,
    dtype: torch.dtype | None = None,
    factor: float = 2.0,
) -> ErrorCheck:
    """Apply the rule to ``out`` (kernel result) against the fp64 ``oracle`` and the ``baseline``.

    Non-finite values must match exactly in position and value (``-inf`` LSE rows), else fail.
    """
    dtype = dtype or out.dtype
    oracle = oracle.detach().to(torch.float64)
    out64 = out.detach().to(torch.float64).to(oracle.device)
    base64 = baseline.detach().to(torch.float64).to(oracle.device)
    finite = torch.isfinite(oracle)
    same_nonfinite = bool(torch.equal(torch.isfinite(out64), finite)) and bool(
        (out64[~finite] == oracle[~finite]).all()
    )
    if oracle.numel() == 0 or not bool(finite.any()):
        return ErrorCheck(same_nonfinite, 0.0, 0.0, 0.0, 0.0)
    o, k, b = oracle[finite], out64[finite], base64[finite]
    err = (k - o).abs()
    base_err = (b - o).abs()
    noise = ((o.to(dtype) + 0.3 - 0.3).to(torch.float64) - o).abs()
    max_bound = factor * (float(base_err.max()) + float(noise.max()))
    mean_bound = factor * (float(base_err.mean()) + float(noise.mean()))
    max_err = float(err.max()) if err.numel() else 0.0
    mean_err = float(err.mean()) if err.numel() else 0.0
    ok = same_nonfinite and max_err <= max_bound and mean_err <= mean_bound
    return ErrorCheck(ok, max_err, max_bound, mean_err, mean_bound)


def _f64(*tensors):
    return [None if t is None else (t.to(torch.float64) if t.is_floating_point() else t) for t in tensors]


def oracle_attention(q, k, v, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` in float64 (kwargs as ``rope_attention``; ``return_lse`` is implied)."""
    kwargs = {key: val for key, val in kwargs.items() if key not in ("return_lse", "backend")}
    q, k, v = _f64(q, k, v)
    return reference.attention(attention_call(q, k, v, rope, **kwargs))


def baseline_attention(q, k, v, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` computed entirely in ``q.dtype`` with fp32 angles (today's practice)."""
    kwargs = {key: val for key, val in kwargs.items() if key not in ("return_lse", "backend")}
    return reference.attention(attention_call(q, k, v, rope, **kwargs), compute_dtype=q.dtype, angles="fp32")


def _kv_clone(kwargs):
    return {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}


def oracle_kvcache(q, k_cache, v_cache, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``(out, lse)`` of ``rope_attention_with_kvcache`` on copies (the caches are not touched)."""
    kwargs = {key: val for key, val in _kv_clone(kwargs).items() if key not in ("return_lse", "backend")}
    for key in ("k_new", "v_new"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key].to(torch.float64)
    q, k_cache, v_cache = _f64(q, k_cache.clone(), v_cache.clone())
    return reference.kvcache(kvcache_call(q, k_cache, v_cache, rope, **kwargs))


def baseline_kvcache(q, k_cache, v_cache, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline ``(out, lse)`` in ``q.dtype`` on copies of the caches."""
    kwargs = {key: val for key, val in _kv_clone(kwargs).items() if key not in ("return_lse", "backend")}
    call = kvcache_call(q, k_cache.clone(), v_cache.clone(), rope, **kwargs)
    return reference.kvcache(call, compute_dtype=q.dtype, angles="fp32")


def oracle_rope(x, rope, positions=None, seq_len=None) -> torch.Tensor:
    """fp64 ``apply_rope``."""
    return reference.rotate_call(rope_call(x.to(torch.float64), rope, positions, seq_len))


def baseline_rope(x, rope, positions=None, seq_len=None) -> torch.Tensor:
    """``apply_rope`` in ``x.dtype`` with fp32 angles."""
    return reference.rotate_call(rope_call(x, rope, positions, seq_len), compute_dtype=x.dtype, angles="fp32")


def random_qkv(
    batch: int,
    sq: int,
    sk: int,
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    varlen_lengths: tuple[list[int], list[int]] | None = None,
):
    """Random un-rotated q, k, v (dense, or packed when ``varlen_lengths=(q_lens, k_lens)``).

    Returns ``(q, k, v, extra)`` where ``extra`` holds ``cu_seqlens_q/k`` for the varlen layout.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    extra = {}
    if varlen_lengths is not None:
        q_lens, k_lens = varlen_lengths
        q_shape, k_shape = (sum(q_lens), hq, d), (sum(k_lens), hkv, d)
        extra["cu_seqlens_q"] = torch.tensor(
            [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
        extra["cu_seqlens_k"] = torch.tensor(
            [0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
    else:
        q_shape, k_shape = (batch, sq, hq, d), (batch, sk, hkv, d)
    q = torch.randn(q_shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    k = torch.randn(k_shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    v = torch.randn(k_shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return q, k, v, extra


# ---------------------------------------------------------------- exact angles
def _split_27(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x * 134217729.0  # 2**27 + 1: Veltkamp's split into two halves of <= 26 bits
    hi = c - (c - x)
    return hi, x - hi


def exact_angle(pos: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``pos * inv`` reduced to [-π, π] in float64, to ~1e-15 rad at every int32 position (the plain
    fp64 product is up to ~2.4e-7 rad off at 2**31): Dekker's error-free product and a Cody-Waite
    reduction by 2π in three parts (the first two of 24 bits, so k * part is exact for k < 2**29)."""
    a = pos.to(torch.float64)[:, None]
    b = inv.to(torch.float64)[None, :]
    p = a * b
    ah, al = _split_27(a)
    bh, bl = _split_27(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl  # p + e == a * b exactly
    c1, c2, c3 = _TWO_PI_PARTS
    k = torch.round(p / (2 * math.pi))
    return ((p - k * c1) - k * c2) + (e - k * c3)


PI_FRACTION = Fraction(314159265358979323846264338327950288419716939937510582097494459, 10**62)  # π to 62 digits


def _two_pi_parts() -> tuple[float, float, float]:
    rest, parts = 2 * PI_FRACTION, []
    for bits in (24, 24):
        m, ex = math.frexp(float(rest))
        part = math.ldexp(round(math.ldexp(m, bits)), ex - bits)
        parts.append(part)
        rest -= Fraction(part)
    parts.append(float(rest))
    return tuple(parts)


_TWO_PI_PARTS = _two_pi_parts()
