"""The contract of ``apply_rope``, held by every registered backend (``[B, S, H, D]`` and packed
``[T, H, D]`` inputs).

* every scaling law's example, fp32 and bf16, under the docs/design.md §5 rule, with one table per
  row for the length-dependent laws; channels past ``rotary_dim`` copied bit-exact; a packed input
  is one row: the same bits as that row of a batch;
* explicit positions with repeats and jumps, and large positions up to ``MAX_POSITION`` (an
  absolute bound there: the rule's fp32-angle baseline is as wrong as a broken kernel);
* partial rotary and interleaved pairs; strided head slices of a packed buffer with NaN padding;
* empty inputs keep their shape.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import baseline_rope, oracle_rope

from contract_support import (
    BF16,
    DTYPES,
    F32,
    LARGE_POSITIONS,
    D,
    check_large_positions,
    check_rope,
    exact_angle_rope,
    law_rope,
    param_id,
    yarn_rope,
)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("rope_type", rk.ROPE_TYPES)
def test_every_law(backend, rope_type, dtype):
    """Row 0 stays below the trained length, row 1 goes past it; the packed form of row 1 alone,
    and with an explicit scaling length."""
    rope = law_rope(rope_type)
    x = backend.randn(2, 21, 3, D, dtype=dtype)
    pos = backend.ints([list(range(21)), list(range(60, 81))])
    out = check_rope(backend, x, rope, pos)
    assert torch.equal(check_rope(backend, x[1], rope, pos[1]), out[1])
    check_rope(backend, x[1], rope, pos[1], seq_len=200)


@pytest.mark.parametrize(
    "rotary_dim,interleaved,dtype", [(D, True, F32), (32, False, BF16), (16, True, BF16)], ids=param_id
)
def test_rotary_layouts(backend, rotary_dim, interleaved, dtype):
    rope = yarn_rope(rotary_dim=rotary_dim, interleaved=interleaved)
    x = backend.randn(2, 17, 2, D, dtype=dtype)
    check_rope(backend, x, rope)
    check_rope(backend, x[0], rope)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_repeated_and_jumping_positions(backend, dtype):
    """Positions are data: two windows sharing positions 0..9, a jump to 5000."""
    rope = law_rope("dynamic")
    x = backend.randn(2, 20, 2, D, dtype=dtype)
    pos = backend.ints([list(range(10)) * 2, list(range(10)) + list(range(5000, 5010))])
    check_rope(backend, x, rope, pos)
    check_rope(backend, x.flatten(0, 1), rope, pos.flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_large_positions(backend, dtype):
    """Positions over the whole accepted range, dense and packed."""
    top = rk.scaling.MAX_POSITION
    n = len(LARGE_POSITIONS)
    pos = backend.ints([LARGE_POSITIONS, [top - n + 1 + j // 2 for j in range(n)]])
    x = backend.randn(2, n, 2, D, dtype=dtype)
    rope = rk.RopeConfig(D, base=500000.0, scaling={"rope_type": "linear", "factor": 4.0})
    for xx, pp in ((x, pos), (x.flatten(0, 1), pos.flatten())):
        out = backend.rope(xx, rope, pp)
        oracle, fp32_angles = oracle_rope(xx, rope, pp), baseline_rope(xx, rope, pp)
        check_large_positions(out, oracle, fp32_angles, exact_angle_rope(xx, rope, pp), dtype)


@pytest.mark.parametrize("d,dtype", [(D, F32), (D, BF16), (80, BF16)], ids=param_id)
def test_strided_head_slice_with_nan_padding(backend, d, dtype):
    """A head slice of a packed buffer whose padding columns (to 96) and other heads hold NaN."""
    buf = torch.full((2, 19, 5, 96), float("nan"), dtype=dtype)
    buf[:, :, 1:3, :d] = torch.randn(2, 19, 2, d, generator=torch.Generator().manual_seed(4)).to(dtype)
    buf = buf.to(backend.device)
    rope = yarn_rope(d, rotary_dim=48)
    for x in (buf[:, :, 1:3, :d], buf[0, :, 1:3, :d]):
        assert not x.is_contiguous()
        assert torch.isfinite(check_rope(backend, x, rope)).all()


def test_empty_inputs(backend):
    rope = law_rope("dynamic")
    for shape in ((0, 5, 2, D), (2, 0, 2, D), (0, 2, D)):
        x = torch.empty(shape, dtype=BF16, device=backend.device)
        out = backend.rope(x, rope)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
