"""Triton device functions for the accurate RoPE angle (DESIGN §4), shared by every Triton kernel.

The angle is formed exactly as ``ropekern.scaling.angle_turns_fp32`` specifies (and as the C++
header ``csrc/include/ropekern/rope_math.h`` does): 12-bit position chunks times 12-bit frequency
pieces are exact in fp32, so reducing them modulo one turn loses nothing; only three additions of
values below 2 and the final multiplication by 2π round. Error <= ~1.4e-6 rad below position 2**24.
"""

import triton
import triton.language as tl

# A constexpr: a plain float global compiles under the interpreter but is rejected by the GPU compiler.
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _frac(x):
    return x - tl.floor(x)


@triton.jit
def angle_turns(pos, f1, f2, f3):
    """Angle in turns in [-0.5, 0.5] for int32 positions ``pos`` and split frequencies (broadcast)."""
    ph = (pos >> 12).to(tl.float32)
    pl = (pos & 4095).to(tl.float32)
    a = _frac(ph * f1 * 4096.0)
    b = _frac(ph * f2 * 4096.0)
    c = _frac(pl * f1)
    s = _frac(a + b)
    s = _frac(s + c)
    s = s + (ph * 4096.0 * f3 + pl * f2 + pl * f3)
    return s - tl.floor(s + 0.5)


@triton.jit
def rope_cos_sin(pos, split_ptr, pair_idx, pair_mask, HALF: tl.constexpr, attention_factor):
    """cos/sin (times the attention factor) for positions ``pos [M]`` and pairs ``pair_idx [P]``.

    ``split_ptr`` points at one sequence's table ``float32 [3, HALF]`` (rows f1, f2, f3). Returns
    two fp32 ``[M, P]`` blocks; masked pairs get cos = attention_factor, sin = 0 (ignored).
    """
    f1 = tl.load(split_ptr + pair_idx, mask=pair_mask, other=0.0)
    f2 = tl.load(split_ptr + HALF + pair_idx, mask=pair_mask, other=0.0)
    f3 = tl.load(split_ptr + 2 * HALF + pair_idx, mask=pair_mask, other=0.0)
    t = angle_turns(pos[:, None], f1[None, :], f2[None, :], f3[None, :])
    angle = t * TWO_PI
    return tl.cos(angle) * attention_factor, tl.sin(angle) * attention_factor
