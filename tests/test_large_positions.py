"""Every int32 position is rotated exactly (README, "Numerics"), on every backend that runs here.

At large positions the error-ratio rule cannot judge a kernel: its fp32 baseline is as wrong as a
broken kernel (0.06 rad at 2**20, arbitrary past 2**24). So these tests hold each backend's angles
to an absolute bound against exact angles (``testing.exact_angle``), and its gradients against
fp64 autograd, and show that fp32 angles are far outside that bound (the test can fail). The
outputs of the three ops at large positions are part of every backend's contract
(tests/contract/, the same bound). The CUDA kernels' angle is
``rope_math.h``, tested the same way by ``csrc/tests/test_rope_math.cpp`` and the emulated kernel
harness.
"""

from __future__ import annotations

import pytest
import torch

import ropekern as rk
from ropekern.testing import exact_angle

# Chunk boundaries of the split (2**12, 2**24) and of the old two-chunk scheme's failure (2**25+),
# the top of the int32 range, and a jump.
POSITIONS = [0, 5, 4095, 4096, 2**24 - 1, 2**24, 2**25 + 3, 2**27, 2**28 + 1, 2**30 + 5, 2**31 - 2, 2**31 - 1]


def _backends():
    ok = rk.available_backends()
    return [b for b in ("torch", "cpu", "triton") if ok.get(b) is True]


BACKENDS = _backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rope_cos_sin_at_every_int32_position(backend):
    """Rotating the unit vector (1, 0) of every pair gives (cos, sin) of the angle directly:
    within 2e-6 of exact at every position above (the two-chunk scheme was 4 off on N(0, 1) data)."""
    rope = rk.RopeConfig(128, base=10000.0)
    gen = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.tensor(POSITIONS), torch.randint(0, 2**31, (52,), generator=gen)])
    x = torch.zeros(1, pos.numel(), 1, 128)
    x[..., :64] = 1.0
    out = rk.apply_rope(x, rope, pos[None], backend=backend)[0, :, 0].double()
    exact = exact_angle(pos, rope.inv_freq64())
    err = max(float((out[:, :64] - exact.cos()).abs().max()), float((out[:, 64:] - exact.sin()).abs().max()))
    assert err <= 2e-6, err
    plain = pos.float()[:, None] * rope.inv_freq()[None]
    assert float((plain.cos().double() - exact.cos()).abs().max()) > 0.5  # fp32 angles: the test can fail


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_gradients_at_large_positions(backend):
    """The backward rotates by the same angles: gradients within 1e-4 of fp64 autograd through the
    reference at positions near 2**31 (fp32 angles there give O(1) errors)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 8, 2, 32, requires_grad=True) for _ in range(3))
    k_pos = (torch.arange(8) * 3 + 2**31 - 30)[None]
    rope = rk.RopeConfig(32)
    kw = dict(causal=True, q_positions=k_pos, k_positions=k_pos)
    do = torch.randn(1, 8, 2, 32)
    grads = torch.autograd.grad(rk.rope_attention(q, k, v, rope, backend=backend, **kw), (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(
        rk.rope_attention(q64, k64, v64, rope, backend="torch", **kw), (q64, k64, v64), do.double()
    )
    for name, g, r in zip("qkv", grads, ref):
        assert (g.double() - r).abs().max().item() <= 1e-4, name
