"""The error-ratio rule itself (``ropekern.testing.error_check``): what it must pass and fail."""

from __future__ import annotations

import torch

from ropekern.testing import error_check

F32, F16 = torch.float32, torch.float16


def test_one_ulp_on_a_lucky_baseline_passes():
    """One element whose fp32 rounding happened to be tiny (the drawn noise) and a baseline that is
    exactly the rounded oracle: a result one ulp away is as valid as the baseline. The bound from
    the drawn noise alone was far below an ulp (0.02 ulp in the audit's kv case)."""
    o = torch.tensor([0.1], dtype=torch.float64)
    o = o.to(F32).double() + 1e-12  # the fp32 rounding of this oracle is ~1e-12: a lucky draw
    base = o.to(F32)
    one_ulp = torch.nextafter(base, torch.tensor([1.0]))
    assert error_check(one_ulp, o, base, F32).ok
    # the bound is 2 * eps * (0.1 + 0.3): ~13 ulp at 0.1; 40 ulp fail
    assert not error_check(base + 40 * (one_ulp - base), o, base, F32).ok


def test_bugs_are_still_caught():
    """A 1e-5 relative error on a larger tensor fails; the baseline's own error level passes."""
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    base = (o * (1 + 3e-7 * torch.randn(64, 32, generator=gen, dtype=torch.float64))).to(F32)
    assert error_check(base, o, base, F32).ok
    assert not error_check((o * (1 + 1e-5)).to(F32), o, base, F32).ok


def test_nonfinite_baseline_falls_back_to_the_oracle_magnitude():
    """The fp16 baseline overflowed (inf) where the oracle and the kernel are finite: the rule used to
    form a NaN bound (FAIL whatever the kernel); now the baseline's error there is one rounding of the
    oracle, the message says so, and a wrong kernel still fails."""
    o = torch.tensor([1.0, 2.0, 3.0, -4.0], dtype=torch.float64)
    base = torch.tensor([1.0, float("inf"), 3.0, -4.0], dtype=F16)
    right = o.to(F16)
    check = error_check(right, o, base, F16)
    assert check.ok, str(check)
    assert "baseline is not finite at 1 of 4 elements" in str(check)
    wrong = right.clone()
    wrong[1] = 2.5
    assert not error_check(wrong, o, base, F16).ok


def test_nonfinite_results_must_match():
    """-inf LSE rows (rows that see no key) and NaN where the oracle has them: exact match required."""
    o = torch.tensor([float("-inf"), 1.0, float("nan")], dtype=torch.float64)
    good = torch.tensor([float("-inf"), 1.0, float("nan")])
    assert error_check(good, o, good, F32).ok
    assert not error_check(torch.tensor([0.0, 1.0, float("nan")]), o, good, F32).ok
    assert not error_check(torch.tensor([float("-inf"), 1.0, 0.0]), o, good, F32).ok
