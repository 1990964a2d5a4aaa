"""The provider registry: everything a sweep can time, for each op, built from one shared setup.

A *provider* turns a benchmark point (shape, rope type, inputs) into a zero-argument callable that
runs one op, or raises ``Skip`` with the reason it cannot (backend missing, GPU needed, library
not installed, unsupported shape). Roles:

* ``fused``     ropekern backend ``B`` (every backend in ``rk.available_backends()``): rotation
                inside the kernel. Named ``rk-B``.
* ``norope``    the same kernel with rotation compiled out (``call.rotate = False``): the "RoPE tax"
                baseline. Named ``rk-B:norope``.
* ``separate``  ropekern ``apply_rope`` on q and k, then the same kernel with rotation off: what
                fusing saves over a separate rotary kernel. Named ``rk-B:separate``.
* ``baseline``  what users run today: HF-style eager RoPE (fp32 angles, cos/sin cast to the dtype,
                ``rotate_half``) + ``torch.nn.functional.scaled_dot_product_attention`` (``eager+sdpa``);
                SDPA alone (``sdpa:norope``); for decode a pre-rotated HF-layout cache + SDPA or a
                grouped einsum (``eager+einsum``); for rope alone the eager rotation (``eager``).
* ``peer``      flash-attn (``flash_attn_func`` after its ``apply_rotary_emb``; decode:
                ``flash_attn_with_kvcache`` with its rotary) and FlashInfer
                (``pos_encoding_mode="ROPE_LLAMA"``), imported lazily, CUDA only. They are not
                installed on the machine this suite was written on: written and guarded, untested.

ropekern providers time the backend entry point on a call validated once outside the timed region
(validation costs one host synchronisation for the KV cache; it is per call, not per kernel), so
the figures compare kernels. The backward providers go through the public ``rk.rope_attention``.
Eager baselines precompute cos/sin outside the timed region, as a model does once per forward
for all its layers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .. import backends
from .._validation import attention_call, kvcache_call, rope_call
from ..scaling import RopeConfig
from .config import Shape

__all__ = [
    "Skip",
    "Point",
    "Provider",
    "EagerRope",
    "make_inputs",
    "default_backends",
    "build_providers",
    "MAIN_BASELINE",
]

# The baseline every speed-up headline is quoted against, per op.
MAIN_BASELINE = {"forward": "eager+sdpa", "backward": "eager+sdpa", "decode": "eager+sdpa", "rope": "eager"}


class Skip(Exception):
    """A provider cannot run this point; ``str(exc)`` is the reason shown to the user."""


@dataclass
class Point:
    """What a provider is built for: the shape, the rope configuration and the shared inputs."""

    shape: Shape
    rope_type: str
    rope: RopeConfig
    inputs: dict[str, torch.Tensor]
    # Per-point scratch shared by the providers (e.g. eager cos/sin tables), built on demand.
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass
class Provider:
    """A named way to run ``op``; ``build(point)`` returns the callable to time or raises ``Skip``."""

    name: str
    op: str
    role: str
    description: str
    build: Callable[[Point], Callable[[], Any]]
    backend: str | None = None
    rope_dependent: bool = False  # timed once per rope type (fused kernels: the variant spread)
    cuda_graph: bool = False  # capture into a CUDA graph on GPU (decode)


# ------------------------------------------------------------------------------------- inputs
def make_inputs(shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random un-rotated inputs for one point (same seed, same data in every process).

    forward/backward: q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` (backward: leaves requiring grad,
    plus ``dout``); rope: q and k; decode: q/k_new/v_new ``[B, q_len, H, D]``, dense caches
    ``[B, L, Hkv, D]`` holding L - q_len tokens (``cache_seqlens``), the step appends q_len.
    """
    s = shape
    dev, dt = torch.device(s.device), s.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=dev, dtype=torch.float32).to(dt)

    b, d = s.batch, s.head_dim
    if s.op == "decode":
        if s.q_len > s.seqlen:
            raise ValueError(f"decode q_len ({s.q_len}) exceeds the cache length ({s.seqlen})")
        return dict(
            q=rnd(b, s.q_len, s.hq, d),
            k_cache=rnd(b, s.seqlen, s.hkv, d),
            v_cache=rnd(b, s.seqlen, s.hkv, d),
            k_new=rnd(b, s.q_len, s.hkv, d),
            v_new=rnd(b, s.q_len, s.hkv, d),
            cache_seqlens=torch.full((b,), s.seqlen - s.q_len, dtype=torch.int32, device=dev),
        )
    out = dict(q=rnd(b, s.seqlen, s.hq, d), k=rnd(b, s.seqlen, s.hkv, d))
    if s.op != "rope":
        out["v"] = rnd(b, s.seqlen, s.hkv, d)
    if s.op == "backward":
        for key in ("q", "k", "v"):
            out[key].requires_grad_(True)
        out["dout"] = rnd(b, s.seqlen, s.hq, d)
    return out


# ------------------------------------------------------------------------------------- helpers
def default_backends(device: str) -> list[str]:
    """The ropekern backends a sweep times by default on ``device``.

    Those available that run natively there (the device's ``auto`` order: triton on CPU tensors
    is the interpreter, not a performance path). The torch reference is dropped once a native
    backend exists: it is the oracle, and at 32K it takes minutes per call.
    """
    order = backends.auto_order(torch.device(device).type)
    available = [n for n, ok in backends.available_backends().items() if ok is True and n in order]
    native = [n for n in available if n != "torch"]
    return native or [n for n in available if n == "torch"]


def _backend(name: str) -> Any:
    try:
        return backends.get_backend(name)
    except ValueError as exc:
        raise Skip(str(exc)) from None


def _check(backend: Any, op: str, call: Any) -> None:
    check = getattr(backend, f"check_{op}", None)
    if check is None or not hasattr(backend, op):
        raise Skip(f"backend {backend.name!r} does not implement {op}")
    try:
        why = check(call)
    except Exception as exc:  # a half-written backend module must not abort the sweep
        raise Skip(f"{op} check failed: {type(exc).__name__}: {exc}") from None
    if why:
        raise Skip(why)


def _need_cuda(pt: Point) -> None:
    if pt.shape.device != "cuda" and not pt.shape.device.startswith("cuda"):
        raise Skip("needs a CUDA device")


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise Skip(f"{module.split('.')[0]} is not installed ({type(exc).__name__})") from None


def _seq_len(pt: Point) -> int:
    return pt.shape.seqlen


@functools.cache
def _sdpa_has_gqa() -> bool:
    """``enable_gqa`` exists from torch 2.5; older versions get repeated K/V (as HF's repeat_kv)."""
    q = torch.zeros(1, 2, 1, 8)
    k = torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None = None):
    """SDPA on ``[B, H, S, D]`` with GQA; ``mask`` (bool, True = keep) overrides ``causal``."""
    hq, hkv = q.shape[1], k.shape[1]
    kw = {}
    if hq != hkv:
        if _sdpa_has_gqa():
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, **kw)


class EagerRope:
    """RoPE as Hugging Face models apply it today: fp32 ``position * inv_freq``, cos/sin times the
    attention factor cast to the activation dtype, then ``x * cos + rotate_half(x) * sin`` (GPT-J
    ``rotate_every_two`` for the interleaved layout), pass-through channels concatenated.

    ``positions`` int ``[S]``; ``layout`` ``"bhsd"`` (HF, before SDPA) or ``"bshd"``; tables are
    built here, once, outside any timed region.
    """

    def __init__(self, rope: RopeConfig, positions: torch.Tensor, dtype: torch.dtype, seq_len: int, layout: str):
        inv = rope.inv_freq(seq_len).to(positions.device)
        freqs = positions.to(torch.float32)[:, None] * inv[None, :]
        emb = freqs.repeat_interleave(2, dim=-1) if rope.interleaved else torch.cat((freqs, freqs), dim=-1)
        af = rope.attention_factor
        cos, sin = (emb.cos() * af).to(dtype), (emb.sin() * af).to(dtype)
        index = (None, None) if layout == "bhsd" else (None, slice(None), None)
        self.cos, self.sin = cos[index], sin[index]
        self.rotary_dim, self.interleaved = rope.rotary_dim, rope.interleaved

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        partial = r < x.shape[-1]
        xr = x[..., :r] if partial else x
        if self.interleaved:
            rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
        else:
            h = r // 2
            rot = torch.cat((-xr[..., h:], xr[..., :h]), dim=-1)
        out = xr * self.cos + rot * self.sin
        return torch.cat((out, x[..., r:]), dim=-1) if partial else out


def _eager(pt: Point, key: str, positions: torch.Tensor, layout: str) -> EagerRope:
    if key not in pt.shared:
        pt.shared[key] = EagerRope(pt.rope, positions, pt.shape.torch_dtype, _seq_len(pt), layout)
    return pt.shared[key]


def _with_backward(forward: Callable[[], torch.Tensor], pt: Point) -> Callable[[], Any]:
    """forward + backward through autograd; raises Skip when the forward has no autograd path."""
    inputs = (pt.inputs["q"], pt.inputs["k"], pt.inputs["v"])
    dout = pt.inputs["dout"]

    def step():
        out = forward()
        return torch.autograd.grad(out, inputs, dout)

    return step


def _probe_autograd(run_small: Callable[[dict[str, torch.Tensor]], torch.Tensor], pt: Point) -> None:
    """Run the provider's forward on a tiny copy of the shape; Skip if no gradient can flow."""
    s = dataclasses.replace(pt.shape, seqlen=8, batch=1)
    small = make_inputs(s)
    try:
        out = run_small(small)
    except Exception as exc:
        raise Skip(f"forward failed on a tiny probe: {type(exc).__name__}: {exc}") from None
    if not out.requires_grad:
        raise Skip("no autograd path (the backend's forward is not differentiable)")


# ------------------------------------------------------------------------------------- forward
def _attn_call(pt: Point, rotate: bool, inputs: dict[str, torch.Tensor] | None = None):
    i = inputs or pt.inputs
    call = attention_call(i["q"], i["k"], i["v"], pt.rope, causal=pt.shape.causal)
    call.rotate = rotate
    return call


def _rope_calls(pt: Point, be: Any, tensors: tuple[torch.Tensor, ...], positions: torch.Tensor | None = None):
    calls = [rope_call(t, pt.rope, positions, _seq_len(pt)) for t in tensors]
    for c in calls:
        _check(be, "rope", c)
    return calls


def _fused(op: str, name: str) -> Provider:
    def build(pt: Point):
        be = _backend(name)
        if op == "forward":
            call = _attn_call(pt, True)
            _check(be, "attention", call)
            return lambda: be.attention(call)
        if op == "backward":
            _check(be, "attention", _attn_call(pt, True))
            import ropekern as rk

            def fwd(i):
                return rk.rope_attention(i["q"], i["k"], i["v"], pt.rope, causal=pt.shape.causal, backend=name)

            _probe_autograd(fwd, pt)
            return _with_backward(lambda: fwd(pt.inputs), pt)
        if op == "decode":
            call = _kv_call(pt, True)
            _check(be, "kvcache", call)
            return lambda: be.kvcache(call)
        qc, kc = _rope_calls(pt, be, (pt.inputs["q"], pt.inputs["k"]))
        return lambda: (be.rope(qc), be.rope(kc))

    what = {
        "forward": "fused RoPE attention",
        "backward": "fused RoPE attention, forward + backward",
        "decode": "fused RoPE KV-cache attention (keys rotated on read)",
        "rope": "apply_rope",
    }[op]
    return Provider(
        f"rk-{name}",
        op,
        "fused",
        f"ropekern {name} backend: {what}",
        build,
        name,
        rope_dependent=True,
        cuda_graph=op == "decode",
    )


def _norope(op: str, name: str) -> Provider:
    def build(pt: Point):
        be = _backend(name)
        if op in ("forward", "backward"):
            call = _attn_call(pt, False)
            _check(be, "attention", call)
            if op == "forward":
                return lambda: be.attention(call)

            def fwd(i):
                return be.attention(_attn_call(pt, False, i))[0]

            _probe_autograd(fwd, pt)
            return _with_backward(lambda: be.attention(call)[0], pt)
        call = _kv_call(pt, False)
        _check(be, "kvcache", call)
        return lambda: be.kvcache(call)

    return Provider(
        f"rk-{name}:norope",
        op,
        "norope",
        f"ropekern {name} backend with rotation compiled out",
        build,
        name,
        cuda_graph=op == "decode",
    )


def _separate(op: str, name: str) -> Provider:
    def build(pt: Point):
        be = _backend(name)
        if op in ("forward", "backward"):
            call = _attn_call(pt, False)
            _check(be, "attention", call)
            q, k = pt.inputs["q"], pt.inputs["k"]

            def fwd_from(calls, base_call):
                qc, kc = calls
                rq, rk_ = be.rope(qc), be.rope(kc)
                return be.attention(dataclasses.replace(base_call, q=rq, k=rk_))[0]

            calls = _rope_calls(pt, be, (q, k))
            if op == "forward":
                return lambda: fwd_from(calls, call)

            def small(i):
                return fwd_from(_rope_calls(pt, be, (i["q"], i["k"])), _attn_call(pt, False, i))

            _probe_autograd(small, pt)
            return _with_backward(lambda: fwd_from(calls, call), pt)
        # decode: rotate q and the new key with apply_rope, append to a cache of rotated keys,
        # attend with rotation off (a separate rotary kernel in front of a plain decode kernel).
        call = _kv_call(pt, False, rotated_cache=True)
        _check(be, "kvcache", call)
        s = pt.shape
        pos = torch.arange(s.seqlen - s.q_len, s.seqlen, device=s.device, dtype=torch.int32).expand(s.batch, s.q_len)
        qc, kc = _rope_calls(pt, be, (pt.inputs["q"], pt.inputs["k_new"]), pos)
        return lambda: be.kvcache(dataclasses.replace(call, q=be.rope(qc), k_new=be.rope(kc)))

    return Provider(
        f"rk-{name}:separate",
        op,
        "separate",
        f"ropekern apply_rope ({name}) on q and k, then the {name} kernel with rotation off",
        build,
        name,
        cuda_graph=op == "decode",
    )


# ------------------------------------------------------------------------------------- decode
def _kv_call(pt: Point, rotate: bool, rotated_cache: bool = False):
    i = pt.inputs
    k_cache, v_cache = i["k_cache"], i["v_cache"]
    if rotated_cache:  # the separate pass keeps its own cache of rotated keys
        if "k_cache_rot" not in pt.shared:
            pt.shared["k_cache_rot"] = _rotated_keys(pt).clone()
            pt.shared["v_cache_rot"] = v_cache.clone()
        k_cache, v_cache = pt.shared["k_cache_rot"], pt.shared["v_cache_rot"]
    call = kvcache_call(
        i["q"],
        k_cache,
        v_cache,
        pt.rope,
        cache_seqlens=i["cache_seqlens"],
        k_new=i["k_new"],
        v_new=i["v_new"],
        causal=True,
    )
    call.rotate = rotate
    return call


def _rotated_keys(pt: Point) -> torch.Tensor:
    """The cached keys rotated at their positions 0..L-1, ``[B, L, Hkv, D]`` (built once, untimed):
    what a cache of pre-rotated keys holds, so every decode provider attends to the same keys."""
    if "k_rotated" not in pt.shared:
        k = pt.inputs["k_cache"]
        eager = EagerRope(pt.rope, torch.arange(k.shape[1], device=k.device), k.dtype, _seq_len(pt), "bshd")
        pt.shared["k_rotated"] = eager(k)
    return pt.shared["k_rotated"]


def _hf_cache(pt: Point, rotated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache in HF layout ``[B, Hkv, L, D]`` (StaticCache) of pre-rotated keys, shared by the
    eager baselines (``rotated=False``: the un-rotated keys, for SDPA without RoPE)."""
    tag = "hf" if rotated else "hf_plain"
    if f"{tag}_k" not in pt.shared:
        keys = _rotated_keys(pt) if rotated else pt.inputs["k_cache"]
        pt.shared[f"{tag}_k"] = keys.transpose(1, 2).contiguous()
        pt.shared[f"{tag}_v"] = pt.inputs["v_cache"].transpose(1, 2).contiguous()
    return pt.shared[f"{tag}_k"], pt.shared[f"{tag}_v"]


def _decode_step(pt: Point):
    """Eager rotation of q and the new key, in-place append to the rotated HF cache; returns a
    closure producing ``(q_rot [B, Hq, q_len, D], k [B, Hkv, L, D], v)`` and the causal mask."""
    s = pt.shape
    kc, vc = _hf_cache(pt)
    pos = torch.arange(s.seqlen - s.q_len, s.seqlen, device=s.device)
    eager = _eager(pt, "eager_decode", pos, "bhsd")
    q, k_new, v_new = pt.inputs["q"].transpose(1, 2), pt.inputs["k_new"].transpose(1, 2), pt.inputs["v_new"]
    lo = s.seqlen - s.q_len
    # q_len > 1 (chunked decode) needs the bottom-right mask; SDPA's is_causal is top-left.
    mask = None
    if s.q_len > 1:
        mask = torch.arange(s.seqlen, device=s.device)[None, :] <= torch.arange(lo, s.seqlen, device=s.device)[:, None]

    def step():
        qr = eager(q)
        kc[:, :, lo:] = eager(k_new)
        vc[:, :, lo:] = v_new.transpose(1, 2)
        return qr, kc, vc

    return step, mask


def _eager_sdpa_decode(pt: Point):
    step, mask = _decode_step(pt)

    def run():
        qr, kc, vc = step()
        return _sdpa(qr, kc, vc, False, mask).transpose(1, 2)

    return run


def _eager_einsum_decode(pt: Point):
    step, mask = _decode_step(pt)
    s = pt.shape
    g = s.hq // s.hkv
    scale = s.head_dim**-0.5

    def run():
        qr, kc, vc = step()
        qg = qr.reshape(s.batch, s.hkv, g, s.q_len, s.head_dim)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, kc).float() * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(vc.dtype)
        out = torch.einsum("bhgqk,bhkd->bhgqd", p, vc)
        return out.reshape(s.batch, s.hq, s.q_len, s.head_dim).transpose(1, 2)

    return run


# ------------------------------------------------------------------------------------- baselines
def _eager_sdpa(op: str) -> Provider:
    def build(pt: Point):
        if op == "decode":
            return _eager_sdpa_decode(pt)
        s = pt.shape
        eager = _eager(pt, "eager_bhsd", torch.arange(s.seqlen, device=s.device), "bhsd")
        q, k, v = (pt.inputs[n].transpose(1, 2) for n in ("q", "k", "v"))

        def fwd():
            return _sdpa(eager(q), eager(k), v, s.causal).transpose(1, 2)

        return fwd if op == "forward" else _with_backward(fwd, pt)

    return Provider(
        "eager+sdpa",
        op,
        "baseline",
        "HF-style eager RoPE (fp32 angles, rotate_half) + torch scaled_dot_product_attention",
        build,
        cuda_graph=op == "decode",
    )


def _sdpa_norope(op: str) -> Provider:
    def build(pt: Point):
        s = pt.shape
        if op == "decode":
            kc, vc = _hf_cache(pt, rotated=False)
            q, lo = pt.inputs["q"].transpose(1, 2), s.seqlen - s.q_len
            k_new, v_new = pt.inputs["k_new"].transpose(1, 2), pt.inputs["v_new"].transpose(1, 2)
            if s.q_len > 1:
                raise Skip("q_len > 1 needs a bottom-right mask; eager+sdpa covers it")

            def run():
                kc[:, :, lo:] = k_new
                vc[:, :, lo:] = v_new
                return _sdpa(q, kc, vc, False).transpose(1, 2)

            return run
        q, k, v = (pt.inputs[n].transpose(1, 2) for n in ("q", "k", "v"))

        def fwd():
            return _sdpa(q, k, v, s.causal).transpose(1, 2)

        return fwd if op == "forward" else _with_backward(fwd, pt)

    return Provider(
        "sdpa:norope",
        op,
        "baseline",
        "torch scaled_dot_product_attention without any RoPE",
        build,
        cuda_graph=op == "decode",
    )


def _eager_einsum() -> Provider:
    return Provider(
        "eager+einsum",
        "decode",
        "baseline",
        "eager RoPE + grouped einsum attention over a pre-rotated HF-layout cache",
        _eager_einsum_decode,
        cuda_graph=True,
    )


def _eager_rope() -> Provider:
    def build(pt: Point):
        s = pt.shape
        eager = _eager(pt, "eager_bshd", torch.arange(s.seqlen, device=s.device), "bshd")
        q, k = pt.inputs["q"], pt.inputs["k"]
        return lambda: (eager(q), eager(k))

    return Provider("eager", "rope", "baseline", "HF-style eager RoPE on q and k (fp32 angles, rotate_half)", build)


# ------------------------------------------------------------------------------------- peers
def _fa_tables(pt: Point, positions_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[L, R/2]`` in the activation dtype for flash-attn's rotary (attention factor in)."""
    rope, s = pt.rope, pt.shape
    inv = rope.inv_freq(_seq_len(pt)).to(s.device)
    freqs = torch.arange(positions_len, device=s.device, dtype=torch.float32)[:, None] * inv[None, :]
    af = rope.attention_factor
    return (freqs.cos() * af).to(s.torch_dtype), (freqs.sin() * af).to(s.torch_dtype)


def _fa_check(pt: Point) -> None:
    _need_cuda(pt)
    if pt.shape.torch_dtype not in (torch.float16, torch.bfloat16):
        raise Skip("flash-attn needs fp16/bf16")


def _flash_attn(op: str) -> Provider:
    def build(pt: Point):
        _fa_check(pt)
        fa = _import("flash_attn")
        rotary = _import("flash_attn.layers.rotary")
        s, il = pt.shape, pt.rope.interleaved
        if op == "decode":
            cos, sin = _fa_tables(pt, s.seqlen)
            i = pt.inputs
            kc, vc = _rotated_keys(pt).clone(), i["v_cache"].clone()  # flash-attn caches rotated keys

            return lambda: fa.flash_attn_with_kvcache(
                i["q"],
                kc,
                vc,
                k=i["k_new"],
                v=i["v_new"],
                rotary_cos=cos,
                rotary_sin=sin,
                cache_seqlens=i["cache_seqlens"],
                causal=True,
                rotary_interleaved=il,
            )
        cos, sin = _fa_tables(pt, s.seqlen)
        q, k = pt.inputs["q"], pt.inputs["k"]
        if op == "rope":
            return lambda: (
                rotary.apply_rotary_emb(q, cos, sin, interleaved=il),
                rotary.apply_rotary_emb(k, cos, sin, interleaved=il),
            )
        v = pt.inputs["v"]

        def fwd():
            qr = rotary.apply_rotary_emb(q, cos, sin, interleaved=il)
            kr = rotary.apply_rotary_emb(k, cos, sin, interleaved=il)
            return fa.flash_attn_func(qr, kr, v, causal=s.causal)

        return fwd if op == "forward" else _with_backward(fwd, pt)

    what = {"decode": "flash_attn_with_kvcache with rotary_cos/sin", "rope": "apply_rotary_emb"}.get(
        op, "apply_rotary_emb + flash_attn_func"
    )
    return Provider(
        "flash-attn", op, "peer", f"flash-attn {what} (untested here: no GPU)", build, cuda_graph=op == "decode"
    )


def _flashinfer_check(pt: Point) -> tuple[Any, float]:
    _need_cuda(pt)
    rope = pt.rope
    if rope.rope_type not in ("default", "linear"):
        raise Skip(f"FlashInfer ROPE_LLAMA has no {rope.rope_type!r} scaling (only rope_scale/rope_theta)")
    if rope.interleaved or rope.rotary_dim != rope.head_dim:
        raise Skip("FlashInfer ROPE_LLAMA rotates the full head in the half-split layout")
    scale = float(rope.scaling.get("factor", 1.0)) if rope.rope_type == "linear" else 1.0
    return _import("flashinfer"), scale


def _flashinfer(op: str) -> Provider:
    def build(pt: Point):
        fi, scale = _flashinfer_check(pt)
        s, theta = pt.shape, pt.rope.base
        if op == "forward":
            q, k, v = (pt.inputs[n] for n in ("q", "k", "v"))
            return lambda: [
                fi.single_prefill_with_kv_cache(
                    q[b],
                    k[b],
                    v[b],
                    causal=s.causal,
                    pos_encoding_mode="ROPE_LLAMA",
                    rope_scale=scale,
                    rope_theta=theta,
                )
                for b in range(s.batch)
            ]
        if op == "decode":
            if s.q_len != 1:
                raise Skip("single_decode_with_kv_cache takes one query per sequence")
            i, n = pt.inputs, s.seqlen
            kc, vc = i["k_cache"].clone(), i["v_cache"].clone()  # un-rotated keys, rotated on read

            def run():
                kc[:, n - 1 : n] = i["k_new"]
                vc[:, n - 1 : n] = i["v_new"]
                return [
                    fi.single_decode_with_kv_cache(
                        i["q"][b, 0], kc[b], vc[b], pos_encoding_mode="ROPE_LLAMA", rope_scale=scale, rope_theta=theta
                    )
                    for b in range(s.batch)
                ]

            return run
        q = pt.inputs["q"].reshape(-1, s.hq, s.head_dim)
        k = pt.inputs["k"].reshape(-1, s.hkv, s.head_dim)
        pos = torch.arange(s.seqlen, device=s.device, dtype=torch.int32).repeat(s.batch)
        return lambda: fi.apply_rope_pos_ids(
            q, k, pos, rotary_dim=pt.rope.rotary_dim, interleave=False, rope_scale=scale, rope_theta=theta
        )

    what = {
        "forward": "single_prefill_with_kv_cache",
        "decode": "single_decode_with_kv_cache",
        "rope": "apply_rope_pos_ids",
    }[op]
    return Provider(
        "flashinfer",
        op,
        "peer",
        f"FlashInfer {what}, pos_encoding_mode=ROPE_LLAMA (untested here: no GPU)",
        build,
        cuda_graph=op == "decode",
    )


# ------------------------------------------------------------------------------------- registry
def build_providers(op: str, backends: list[str]) -> list[Provider]:
    """Every provider of ``op``: per ropekern backend (fused, norope, separate), then the baselines
    and peers. Whether each can run is decided per point by ``Provider.build`` (``Skip``)."""
    out: list[Provider] = []
    for name in backends:
        out.append(_fused(op, name))
        if op != "rope":
            out.append(_norope(op, name))
            out.append(_separate(op, name))
    if op == "rope":
        out.append(_eager_rope())
    else:
        out.append(_eager_sdpa(op))
        if op == "decode":
            out.append(_eager_einsum())
        out.append(_sdpa_norope(op))
    out.append(_flash_attn(op))
    if op != "backward":  # FlashInfer has no backward
        out.append(_flashinfer(op))
    return out
