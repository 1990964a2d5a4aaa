"""What the contract tests share: the backend list, a handle that runs one backend and skips what
it declines, input builders on the backend's device, and the checks against the fp64 oracle.

The checks are the docs/design.md §5 rule (``ropekern.testing.error_check``) on ``out`` and LSE,
the documented shapes and dtypes, and, for the kv cache, the in-place append of the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import ropekern as rk
from ropekern import backends, reference, testing
from ropekern._validation import AttentionCall, KVCacheCall, attention_call, kvcache_call, rope_call
from ropekern.laws import LAWS
from ropekern.scaling import MAX_POSITION

F32, BF16 = torch.float32, torch.bfloat16
DTYPES = [F32, BF16]
# 64: the smallest head dim the CUDA kernels are compiled for (64 / 128 / 256), so that the
# attention and kv-cache contract also reaches them where a GPU runs it.
D = 64
# Where the scaling laws change behaviour (trained length): sequences run on both sides of it.
TRAINED = 32

# Chunk boundaries of the kernels' angle split (2**12, 2**24), where a two-chunk scheme broke
# (2**25 and up), a jump of 2**30, and the top of the accepted range.
LARGE_POSITIONS = [0, 5, 4095, 4096, 2**24 - 1, 2**24, 2**25 + 3, 2**27, 2**28 + 1, 2**30 + 5]
LARGE_POSITIONS += [MAX_POSITION - 1, MAX_POSITION]
# tests/test_large_positions.py's bound: fp32 output within 2e-5 of the oracle where the
# fp32-angle baseline is off by more than 0.1 (there the §5 rule's baseline is as wrong as a
# broken kernel, so the rule cannot judge).
LARGE_POSITION_BOUND = 2e-5
FP32_ANGLES_ERROR = 0.1
# (Hq, Hkv, rotary_dim, interleaved, dtype): MHA, GQA 2 and 3, MQA; full and partial rotary.
HEAD_LAYOUTS = [(4, 4, D, True, F32), (4, 2, 32, False, BF16), (6, 2, 48, True, BF16), (8, 1, 16, False, F32)]


def param_id(value) -> str | None:
    """Test ids: dtypes by their short name (the rest as pytest writes them)."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def contract_backends() -> tuple[str, ...]:
    """Every backend in the registry, read when the tests are collected: a backend registered in
    ``backends._REGISTRY`` gets the whole contract without a line here. The native CPU backend runs
    once per kernel unit this machine runs (``cpu-avx512``, ``cpu-avx2``, ``cpu-generic``: the
    unit forced by ROPEKERN_CPU_ISA)."""
    names: list[str] = []
    for name in backends._REGISTRY:
        units = cpu_units() if name == "cpu" else ()
        names += [f"{name}-{unit}" for unit in units] or [name]
    return tuple(names)


def cpu_units() -> tuple[str, ...]:
    """The CPU kernel units this machine runs, widest first (none without the native extension)."""
    import os

    try:
        from ropekern.backends import native

        native.cpu_isa()
    except (ImportError, RuntimeError, ValueError):
        return ()
    units = []
    old = os.environ.get("ROPEKERN_CPU_ISA")
    try:
        for unit in ("amx", "avx512", "avx2", "neon", "generic"):
            os.environ["ROPEKERN_CPU_ISA"] = unit
            try:
                if native.cpu_isa() == unit:
                    units.append(unit)
            except (RuntimeError, ValueError):
                pass
    finally:
        if old is None:
            os.environ.pop("ROPEKERN_CPU_ISA", None)
        else:
            os.environ["ROPEKERN_CPU_ISA"] = old
    return tuple(units)


def law_rope(rope_type: str, head_dim: int = D, length: int = TRAINED, **kwargs) -> rk.RopeConfig:
    """The canonical example of one scaling law (``ScalingLaw.example``) changing at ``length``;
    ``kwargs``: rotary_dim, interleaved."""
    example = LAWS[rope_type].example(kwargs.get("rotary_dim") or head_dim, length)
    return rk.RopeConfig(head_dim, **kwargs, **example)


def yarn_rope(head_dim: int = D, **kwargs) -> rk.RopeConfig:
    """YaRN: an attention factor != 1 and a mix of scaled and unscaled frequencies."""
    return law_rope("yarn", head_dim, 16, **kwargs)


@dataclass(frozen=True)
class Target:
    """One backend under test and the device its tensors live on."""

    name: str
    device: torch.device

    @classmethod
    def open(cls, name: str) -> Target:
        """The handle of a registered backend; the test is skipped when it cannot run here."""
        status = rk.available_backends()[name]
        if status is not True:
            pytest.skip(f"backend {name!r} unavailable: {status}")
        impl = backends.get_backend(name)
        # Backends bound to one device type say so (the native ones); the others run on the
        # accelerator when there is one (Triton, the reference), else on the CPU.
        device = getattr(impl, "device_type", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(name, torch.device(device))

    @property
    def impl(self):
        return backends.get_backend(self.name)

    def _served(self, fn, *args, **kwargs):
        """Run a public op with ``backend=self.name``; a call the backend declines (e.g. float64 on
        the native kernels, bfloat16 off the CUDA kernels' list) skips with its reason."""
        try:
            return fn(*args, backend=self.name, **kwargs)
        except ValueError as exc:
            if f"backend {self.name!r} cannot run this" in str(exc):
                pytest.skip(str(exc))
            raise

    def attention(self, q, k, v, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._served(rk.rope_attention, q, k, v, rope, return_lse=True, **kwargs)

    def kvcache(self, q, k_cache, v_cache, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._served(rk.rope_attention_with_kvcache, q, k_cache, v_cache, rope, return_lse=True, **kwargs)

    def rope(self, x, rope, positions=None, seq_len=None) -> torch.Tensor:
        return self._served(rk.apply_rope, x, rope, positions, seq_len=seq_len)

    def run_call(self, call: AttentionCall | KVCacheCall) -> tuple[torch.Tensor, torch.Tensor]:
        """A validated call straight to the backend object (for switches the public API does not
        expose, e.g. ``call.rotate``); skipped with the backend's reason if it declines it."""
        op = "attention" if isinstance(call, AttentionCall) else "kvcache"
        why = getattr(self.impl, f"check_{op}")(call)
        if why:
            pytest.skip(f"backend {self.name!r} declines this {op} call: {why}")
        return getattr(self.impl, op)(call)

    # ------------------------------------------------------------------ inputs on the device
    def ints(self, values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64).to(self.device)

    def randn(self, *shape, dtype=F32, seed=0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=gen).to(device=self.device, dtype=dtype)

    def qkv(self, b, sq, sk, hq, hkv, d=D, dtype=F32, seed=0, varlen=None):
        """``random_qkv`` on the device: ``(q, k, v, extra)``, ``extra`` the varlen ``cu_seqlens``."""
        return testing.random_qkv(
            b, sq, sk, hq, hkv, d, dtype=dtype, device=self.device, seed=seed, varlen_lengths=varlen
        )

    def cache(self, lens, s_new, sq, hq, hkv, d=D, dtype=F32, block=None, seed=0) -> dict:
        """Keyword arguments of ``rope_attention_with_kvcache`` (q, caches, cache_seqlens, k_new,
        v_new, block_table) for cached lengths ``lens``. Every slot at or past a sequence's cached
        length holds NaN, so a kernel that reads a slot it must not (or attends to it) shows NaN.
        Paged when ``block`` is given: shuffled blocks, plus spare NaN blocks no table names."""
        gen = torch.Generator().manual_seed(seed)
        b = len(lens)
        smax = max(lens, default=0) + s_new + 5
        if block:
            smax = -(-smax // block) * block

        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(dtype)

        q = rnd(b, sq, hq, d)
        k_new, v_new = (rnd(b, s_new, hkv, d), rnd(b, s_new, hkv, d)) if s_new else (None, None)
        k_full = torch.full((b, smax, hkv, d), float("nan"), dtype=dtype)
        v_full = k_full.clone()
        for i, n in enumerate(lens):
            k_full[i, :n], v_full[i, :n] = rnd(n, hkv, d), rnd(n, hkv, d)
        table = None
        if block:
            nblk = smax // block
            table = torch.randperm(b * nblk + 3, generator=gen)[: b * nblk].view(b, nblk).to(torch.int32)
            pools = []
            for full in (k_full, v_full):  # block j of sequence i goes to pool block table[i, j]
                pool = torch.full((b * nblk + 3, block, hkv, d), float("nan"), dtype=dtype)
                pool[table.flatten().long()] = full.reshape(b * nblk, block, hkv, d)
                pools.append(pool)
            k_full, v_full = pools
        dev = self.device
        return dict(
            q=q.to(dev),
            k_cache=k_full.to(dev),
            v_cache=v_full.to(dev),
            cache_seqlens=torch.tensor(list(lens), dtype=torch.int32, device=dev),
            k_new=None if k_new is None else k_new.to(dev),
            v_new=None if v_new is None else v_new.to(dev),
            block_table=None if table is None else table.to(dev),
        )


# ---------------------------------------------------------------------------------- checks
def assert_rule(out, oracle, baseline, dtype, what: str) -> None:
    res = testing.error_check(out, oracle, baseline, dtype)
    assert res.ok, f"{what}: {res}"


def check_attention(target: Target, q, k, v, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_attention`` on ``target`` against the oracle: out and LSE under the §5 rule, with
    the documented shapes and dtypes (out contiguous like q, LSE float32)."""
    out, lse = target.attention(q, k, v, rope, **kwargs)
    o64, l64 = testing.oracle_attention(q, k, v, rope, **kwargs)
    ob, lb = testing.baseline_attention(q, k, v, rope, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device and out.is_contiguous()
    assert lse.shape == l64.shape and lse.dtype == F32
    assert_rule(out, o64, ob, q.dtype, "out")
    assert_rule(lse, l64, lb.float(), F32, "lse")
    return out, lse


def check_kvcache(target: Target, rope, causal=True, **case) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_attention_with_kvcache`` on ``target`` against the oracle, then the caches: the new
    tokens written in place, un-rotated, at ``cache_seqlens``, nothing else changed, and
    ``cache_seqlens`` itself untouched."""
    q, kc, vc = case["q"], case["k_cache"], case["v_cache"]
    kw = {key: case[key] for key in ("cache_seqlens", "k_new", "v_new", "block_table")}
    o64, l64 = testing.oracle_kvcache(q, kc, vc, rope, causal=causal, **kw)
    ob, lb = testing.baseline_kvcache(q, kc, vc, rope, causal=causal, **kw)
    want_k, want_v, lens = kc.clone(), vc.clone(), kw["cache_seqlens"].clone()
    reference.append_kv(kvcache_call(q, want_k, want_v, rope, **kw))
    out, lse = target.kvcache(q, kc, vc, rope, causal=causal, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == F32
    assert_rule(out, o64, ob, q.dtype, "out")
    assert_rule(lse, l64, lb.float(), F32, "lse")
    assert torch.equal(kw["cache_seqlens"], lens)
    # NaN marks the slots no sequence owns: compare them as a value of their own
    assert torch.equal(kc.nan_to_num(7.0), want_k.nan_to_num(7.0)), "k_cache"
    assert torch.equal(vc.nan_to_num(7.0), want_v.nan_to_num(7.0)), "v_cache"
    return out, lse


def check_rope(target: Target, x, rope, positions=None, seq_len=None) -> torch.Tensor:
    """``apply_rope`` on ``target`` against the oracle; channels past ``rotary_dim`` bit-exact."""
    out = target.rope(x, rope, positions, seq_len)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device and out.is_contiguous()
    oracle, baseline = (
        testing.oracle_rope(x, rope, positions, seq_len),
        testing.baseline_rope(x, rope, positions, seq_len),
    )
    assert_rule(out, oracle, baseline, x.dtype, "apply_rope")
    r = rope.rotary_dim
    assert torch.equal(out[..., r:], x[..., r:]), "pass-through channels must be copied bit-exact"
    return out


def check_large_positions(out, oracle, fp32_angles, exact_angles, dtype) -> None:
    """At large positions the fp32-angle baseline is off by the angle, so the §5 rule cannot judge.
    float32: an absolute bound against the oracle. Lower precision, where that bound is below one
    rounding: the §5 rule with the reference in ``dtype`` *with exact angles* as the baseline. Both
    also hold the fp32-angle baseline to the same check and require it to fail, so the check can."""
    if dtype == F32:
        err = float((out.double() - oracle).abs().max())
        base_err = float((fp32_angles.double() - oracle).abs().max())
        assert err <= LARGE_POSITION_BOUND < FP32_ANGLES_ERROR < base_err, (err, base_err)
    else:
        assert_rule(out, oracle, exact_angles, dtype, "large positions")
        assert not testing.error_check(fp32_angles, oracle, exact_angles, dtype).ok, (
            "fp32 angles pass: the check is blind"
        )


def exact_angle_attention(q, k, v, rope, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference in q's dtype with fp64 angles: the yardstick at large positions."""
    return reference.attention(attention_call(q, k, v, rope, **kwargs), compute_dtype=q.dtype)


def exact_angle_rope(x, rope, positions) -> torch.Tensor:
    """``apply_rope`` by the reference in x's dtype with fp64 angles."""
    return reference.rotate_call(rope_call(x, rope, positions), compute_dtype=x.dtype)
