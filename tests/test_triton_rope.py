"""The Triton ``apply_rope`` kernel against the fp64 oracle (docs/design.md §5), through the interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import baseline_rope, error_check, oracle_rope

from cases import ropes_per_type

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def randn(*shape, dtype=F32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def check(x, rope, positions=None, seq_len=None):
    out = rk.apply_rope(x, rope, positions, seq_len=seq_len, backend="triton")
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    res = error_check(out, oracle_rope(x, rope, positions, seq_len), baseline_rope(x, rope, positions, seq_len))
    assert res.ok, str(res)
    r = rope.rotary_dim
    assert torch.equal(out[..., r:], x[..., r:])  # pass-through channels bit-exact
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "d,rotary_dim,dtype",
    [(32, 32, F16), (64, 16, BF16), (80, 80, F32), (96, 64, BF16), (128, 32, F16), (256, 256, BF16)],
)
def test_head_dims_partial_interleaved(d, rotary_dim, interleaved, dtype):
    rope = rk.RopeConfig(d, rotary_dim=rotary_dim, interleaved=interleaved)
    check(randn(2, 17, 2, d, dtype=dtype), rope)


def test_position_zero_is_identity_and_input_untouched():
    x = randn(1, 1, 4, 64, dtype=BF16)
    before = x.clone()
    out = rk.apply_rope(x, rk.RopeConfig(64, interleaved=True), backend="triton")
    assert torch.equal(out, x) and torch.equal(x, before)


def test_float64_refused_with_reason():
    with pytest.raises(ValueError, match="float64 is not supported"):
        rk.apply_rope(randn(1, 3, 1, 32, dtype=torch.float64), rk.RopeConfig(32), backend="triton")


def test_opcheck_and_compile():
    from ropekern._validation import rope_call

    x = randn(2, 9, 2, 32, dtype=BF16)
    rope = rk.RopeConfig(32, rotary_dim=16)
    call = rope_call(x, rope)
    torch.library.opcheck(torch.ops.ropekern_triton.apply_rope.default, call.op_args())

    def f(x):
        return rk.apply_rope(x, rope, backend="triton")

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_gpu_large(dtype):
    x = randn(2, 8192, 32, 128, dtype=dtype)
    check(x, ropes_per_type(128)["yarn"])
    check(x[:, :4096, :8], ropes_per_type(128)["longrope"])
