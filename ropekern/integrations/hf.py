"""Run a Hugging Face ``transformers`` model's RoPE + attention through ropekern.

``patch(model)`` replaces, in place, the ``forward`` of every attention module by one that keeps the
module's own projections (biases, q/k norms, fused qkv) and output projection, but hands the
**un-rotated** q, k, v to ``ropekern.rope_attention`` with explicit positions. ``unpatch(model)``
deletes those instance-level forwards, so the class's own forward runs again, bit for bit.

KV cache. Keys are stored un-rotated. Each cache layer (``transformers.DynamicLayer``) is swapped,
while still empty, for ``UnrotatedLayer``, which also records the position of every cached token
(``[B, T]``) and keeps it aligned through ``crop``, ``reorder_cache`` (beam search) and the batch
operations. Every step rotates *all* keys with the table of the sequence's current length; stock
transformers caches keys rotated with the table in force when they were written (``docs/hf.md``).
Re-rotation alone is exact for one layer only: deeper layers' cached keys/values were computed from
attention outputs under the older table. So for dynamic NTK and LongRoPE the decoder stack's
forward is wrapped too (``rescale="recompute"``, the default): when a sequence's scaling state
changes, the prefix is recomputed from input embeddings kept in the cache, and cached generation
equals a full recompute. A cache written by an unpatched model (rotated keys) is refused, and an
``UnrotatedLayer`` refuses writes from an unpatched module.

Masks. The module receives transformers' own mask (``None``, 2-D padding mask, or 4-D bool/float
mask). It is reduced to a key-validity mask ``[B, T]``; a 4-D mask is checked to be exactly
"causal + key padding" (it is not when sliding windows, packed sequences or custom masks are in
play, and those are refused). With padding, the valid tokens are packed into ropekern's varlen
layout, so left-padded batches attend exactly to their own tokens; padded query rows return zeros.

Refused with a ``ValueError`` naming the module: unknown attention classes, sliding windows,
logit soft-capping, attention sinks, per-layer RoPE parameters, 3-D (multimodal) position ids,
packed-sequence flash kwargs, attention dropout in training, ``output_attentions``, cache types
other than ``DynamicCache``'s full-attention layers, and configs whose RoPE ropekern would read
differently from the model's own rotary tables (checked at patch time).
"""

from __future__ import annotations

import inspect
import math
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

try:
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as exc:  # transformers < 4.56 has no per-layer cache objects
    raise ImportError("ropekern.integrations.hf needs transformers >= 5 (pip install 'ropekern[hf]')") from exc

import ropekern as rk

__all__ = [
    "patch",
    "unpatch",
    "extend_context",
    "is_patched",
    "rope_config",
    "exact_reference",
    "UnrotatedLayer",
    "SUPPORTED_ARCHITECTURES",
    "cache_keyword",
    "output_cache",
    "CACHE_KEYWORDS",
]

_STATE = "_ropekern_state"
_MODEL_STATE = "_ropekern_patch"
_FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# ---------------------------------------------------------------------------------------------- adapters
def _heads(hidden: torch.Tensor, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, S, H*D]`` -> ``[B, S, H, D]`` (a view: ropekern takes any strides with a contiguous last dim)."""
    return x.view(*hidden.shape[:-1], -1, head_dim)


def _project_separate(m, h):
    return _heads(h, m.q_proj(h), m.head_dim), _heads(h, m.k_proj(h), m.head_dim), _heads(h, m.v_proj(h), m.head_dim)


def _project_qk_norm(m, h):
    q, k, v = _project_separate(m, h)
    return m.q_norm(q), m.k_norm(k), v  # Qwen3 normalises each head before RoPE


def _project_phi3(m, h):
    qkv = m.qkv_proj(h)
    nq = m.config.num_attention_heads * m.head_dim
    nkv = m.num_key_value_heads * m.head_dim
    d = m.head_dim
    return _heads(h, qkv[..., :nq], d), _heads(h, qkv[..., nq : nq + nkv], d), _heads(h, qkv[..., nq + nkv :], d)


def _project_neox(m, h):
    d = m.head_size
    qkv = m.query_key_value(h).view(*h.shape[:-1], -1, 3 * d)  # per head: [q | k | v]
    return qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]


def _project_gptj(m, h):
    d = m.head_dim
    return _heads(h, m.q_proj(h), d), _heads(h, m.k_proj(h), d), _heads(h, m.v_proj(h), d)


def _no_window(m) -> int | None:
    return None


def _config_window(m) -> int | None:
    return getattr(m.config, "sliding_window", None)


def _module_window(m) -> int | None:
    return getattr(m, "sliding_window", None)


@dataclass(frozen=True)
class _Adapter:
    """How one transformers attention class computes q/k/v, scales and projects out.

    ``required`` names the attributes this reading of the class needs; a class may have one adapter
    per transformers layout (GPT-J changed in 5.24), and the first whose attributes are all present
    is used."""

    arch: str
    project: Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    out: Callable[[Any, torch.Tensor], torch.Tensor]
    scale: Callable[[Any], float]
    dropout: Callable[[Any], float]
    window: Callable[[Any], int | None]
    rotary_dim: Callable[[Any], int | None]
    required: tuple[str, ...] = ()


def _llama_like(arch, project=_project_separate, window=_no_window, required=("q_proj", "k_proj", "v_proj")):
    return _Adapter(
        arch=arch,
        project=project,
        out=lambda m, o: m.o_proj(o),
        scale=lambda m: m.scaling,
        dropout=lambda m: m.attention_dropout,
        window=window,
        rotary_dim=lambda m: None,
        required=(*required, "o_proj", "head_dim", "scaling", "layer_idx"),
    )


# GPT-J before transformers 5.24: the attention module owns its sin/cos table (embed_positions) and
# divides the scores by scale_attn.
_GPTJ_OWN_TABLE = _Adapter(
    arch="GPT-J",
    project=_project_gptj,
    out=lambda m, o: m.resid_dropout(m.out_proj(o)),
    scale=lambda m: 1.0 / m.scale_attn,
    dropout=lambda m: m.attn_dropout.p,
    window=_no_window,
    rotary_dim=lambda m: m.pos_embd_dim,
    required=("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scale_attn", "embed_positions", "layer_idx"),
)
# GPT-J from 5.24: the table moved to the model's GPTJRotaryEmbedding; the module multiplies by scaling.
_GPTJ_SHARED_TABLE = _Adapter(
    arch="GPT-J",
    project=_project_gptj,
    out=lambda m, o: m.resid_dropout(m.out_proj(o)),
    scale=lambda m: m.scaling,
    dropout=lambda m: m.attention_dropout,
    window=_no_window,
    rotary_dim=lambda m: m.rotary_dim or m.head_dim,
    required=("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scaling", "rotary_dim", "layer_idx"),
)
_GPTJ = (_GPTJ_OWN_TABLE, _GPTJ_SHARED_TABLE)

# (module, class name) -> its adapters. Classes are matched exactly, so a subclass with its own
# forward is an unknown class and is refused.
_ADAPTERS: dict[tuple[str, str], tuple[_Adapter, ...]] = {
    ("transformers.models.llama.modeling_llama", "LlamaAttention"): (_llama_like("Llama"),),
    ("transformers.models.mistral.modeling_mistral", "MistralAttention"): (
        _llama_like("Mistral", window=_config_window),
    ),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"): (_llama_like("Qwen2", window=_module_window),),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention"): (
        _llama_like(
            "Qwen3", project=_project_qk_norm, window=_module_window, required=("q_proj", "k_proj", "v_proj", "q_norm")
        ),
    ),
    ("transformers.models.phi3.modeling_phi3", "Phi3Attention"): (
        _llama_like(
            "Phi-3", project=_project_phi3, window=_config_window, required=("qkv_proj", "num_key_value_heads")
        ),
    ),
    ("transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXAttention"): (
        _Adapter(
            arch="GPT-NeoX",
            project=_project_neox,
            out=lambda m, o: m.dense(o),
            scale=lambda m: m.scaling,
            dropout=lambda m: m.attention_dropout,
            window=_no_window,
            rotary_dim=lambda m: m.rotary_ndims,
            required=("query_key_value", "dense", "head_size", "scaling", "rotary_ndims", "layer_idx"),
        ),
    ),
    ("transformers.models.gptj.modeling_gptj", "GPTJAttention"): _GPTJ,
    ("transformers.models.gptj.modeling_gptj", "GPTJFlashAttention2"): _GPTJ,  # gone in 5.24
}

SUPPORTED_ARCHITECTURES = {
    "Llama": "LlamaForCausalLM",
    "Mistral": "MistralForCausalLM (sliding_window=None)",
    "Qwen2": "Qwen2ForCausalLM (full attention layers)",
    "Qwen3": "Qwen3ForCausalLM (q/k norm)",
    "Phi-3": "Phi3ForCausalLM (fused qkv, LongRoPE, partial rotary: Phi-3, Phi-3.5, Phi-4-mini)",
    "GPT-NeoX": "GPTNeoXForCausalLM (fused per-head qkv, partial rotary)",
    "GPT-J": "GPTJForCausalLM (interleaved partial rotary)",
}


# ---------------------------------------------------------------------------------------------- signatures
# The names under which transformers has passed the KV cache to an attention module or a decoder
# stack: ``past_key_values`` (5.0-5.23), ``cache`` (5.24+, with ``past_key_values`` accepted through
# a deprecation shim until 5.40), ``layer_past`` (GPT-NeoX, and GPT-J before 5.24).
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")
# Every parameter the patched attention forward knows what to do with. A class forward with any
# other parameter is refused at patch time: it may carry something (a cache under a new name, a
# mask, a window) that the replacement would otherwise drop without a word.
_ATTENTION_PARAMS = frozenset(
    {
        "hidden_states",
        "position_embeddings",
        "attention_mask",
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        *CACHE_KEYWORDS,
    }
)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _forward_parameters(cls: type) -> list[inspect.Parameter]:
    """The class forward's parameters after ``self`` (through ``functools.wraps`` decorators)."""
    return list(inspect.signature(cls.forward).parameters.values())[1:]


def _cache_keyword(cls: type, where: str, allowed: tuple[str, ...] = CACHE_KEYWORDS) -> str:
    """The one name among ``allowed`` under which ``cls.forward`` takes the KV cache."""
    names = [p.name for p in _forward_parameters(cls) if p.name in allowed]
    if len(names) != 1:
        raise ValueError(
            f"{where}: {cls.__name__}.forward takes the KV cache under {names or 'no known keyword'} (expected one of "
            f"{list(allowed)}) in transformers {_transformers_version()}, which ropekern does not know"
        )
    return names[0]


def _check_attention_signature(cls: type, where: str) -> None:
    """Refuse a class forward with a parameter the patched forward would ignore, or without exactly
    one known cache keyword."""
    unknown = [
        p.name for p in _forward_parameters(cls) if p.kind is not p.VAR_KEYWORD and p.name not in _ATTENTION_PARAMS
    ]
    if unknown:
        raise ValueError(
            f"{where}: {cls.__name__}.forward in transformers {_transformers_version()} takes {unknown}, which "
            "ropekern's attention adapter does not know (a newer transformers layout); it would be ignored, so "
            "the module is refused"
        )
    _cache_keyword(cls, where)


def _take_cache(kwargs: dict, where: str) -> Any:
    """Pop the KV cache from a forward's keyword arguments under whichever known name it came.

    Raises when two names carry one, or when a ``transformers`` ``Cache`` arrives under a keyword no
    transformers release has used for it (a rename ropekern does not know: never skipped quietly)."""
    popped = {name: kwargs.pop(name, None) for name in CACHE_KEYWORDS}
    given = {name: value for name, value in popped.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"{where}: the KV cache was passed twice, as {sorted(given)}")
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if stray:
        raise ValueError(
            f"{where}: received a KV cache under {stray}, a keyword ropekern does not know (transformers "
            f"{_transformers_version()}; known: {list(CACHE_KEYWORDS)})"
        )
    return next(iter(given.values()), None)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a KV cache in the installed transformers
    (``"cache"`` from 5.24, ``"past_key_values"`` before): ``model(ids, **{cache_keyword(model): c})``
    passes a cache without a deprecation warning on either side of the rename."""
    return _cache_keyword(type(model), f"ropekern.integrations.hf ({type(model).__name__})", CACHE_KEYWORDS[:2])


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``output.cache`` from transformers 5.24, ``past_key_values``
    before; a tuple output's second item), without touching the deprecated alias."""
    if isinstance(output, tuple):
        return output[1] if len(output) > 1 else None
    fields = getattr(type(output), "__dataclass_fields__", {})
    name = next((n for n in CACHE_KEYWORDS[:2] if n in fields), None)
    return None if name is None else getattr(output, name)


@dataclass
class _ModuleState:
    """What a patched attention module needs at run time (stored on the module)."""

    name: str
    adapter: _Adapter
    rope: rk.RopeConfig
    backend: str
    params: tuple[str, ...]  # the class forward's positional parameters after hidden_states


def _adapter_for(module: torch.nn.Module) -> _Adapter | None:
    """The adapter of a known attention class whose attributes are all there (None: unknown class;
    the first adapter when none is complete, so that its missing attributes are reported)."""
    cls = type(module)
    adapters = _ADAPTERS.get((cls.__module__, cls.__name__), ())
    complete = [a for a in adapters if all(hasattr(module, attr) for attr in a.required)]
    return (complete or adapters or [None])[0]


def _is_attention_like(module: torch.nn.Module) -> bool:
    return "Attention" in type(module).__name__


# ---------------------------------------------------------------------------------------------- KV cache
class UnrotatedLayer(DynamicLayer):
    """A ``DynamicLayer`` holding **un-rotated** keys and the position of every cached token.

    ``keys``/``values``: ``[B, Hkv, T, D]`` as in transformers; ``positions``: int32 ``[B, T]``;
    ``inputs``: the input embeddings ``[B, T, hidden]`` (first layer only, ``rescale="recompute"``
    with a length-dependent RoPE: what a recompute of the whole prefix starts from). Writes must
    come from a patched module (``update(..., positions=...)``); cache operations that reorder or
    cut the batch or the sequence keep ``positions`` and ``inputs`` aligned with the keys.
    """

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, positions: torch.Tensor | None = None, **kwargs):
        if positions is None:
            raise ValueError(
                "this cache layer holds un-rotated keys written by a ropekern-patched model; it cannot be "
                "updated by an unpatched attention module (patch the model again, or start a new cache)"
            )
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        positions = positions.to(device=keys.device, dtype=torch.int32)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        return keys, values

    def _side(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("positions", "inputs"):
            value = getattr(self, name)
            if value is not None and value.shape[1]:
                setattr(self, name, fn(value))

    def crop(self, *args, **kwargs) -> None:  # the argument was renamed in transformers 5.18
        super().crop(*args, **kwargs)
        if self.is_initialized:
            n = self.keys.shape[-2]
            self._side(lambda t: t[:, :n])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._side(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._side(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._side(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        # Drop the keys (5.18+ does; 5.17 zeroes them in place, keeping the length), so the layer is
        # empty and the next update starts a new sequence.
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()
        self.positions = self.inputs = None


def _cache_layer(cache: Any, layer_idx: int, where: str) -> UnrotatedLayer:
    """The ``UnrotatedLayer`` for ``layer_idx``, installing one in place of an empty ``DynamicLayer``."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not hasattr(cache, "update"):
        raise ValueError(f"{where}: unsupported cache {type(cache).__name__}; use transformers.DynamicCache")
    while len(layers) <= layer_idx:
        layers.append(UnrotatedLayer())
    layer = layers[layer_idx]
    if isinstance(layer, UnrotatedLayer):
        length = layer.get_seq_length()
        pos = layer.positions
        if length and (pos is None or pos.shape[1] != length or pos.shape[0] != layer.keys.shape[0]):
            raise ValueError(
                f"{where}: the cache's keys ({tuple(layer.keys.shape)}) and recorded positions "
                f"({None if pos is None else tuple(pos.shape)}) are out of step (a cache operation ropekern "
                "does not track); start a new cache"
            )
        return layer
    if type(layer) is not DynamicLayer:
        raise ValueError(
            f"{where}: unsupported cache layer {type(layer).__name__} (sliding-window, static, quantized and "
            "offloaded layers are not supported); use transformers.DynamicCache"
        )
    if layer.get_seq_length():
        raise ValueError(
            f"{where}: the cache already holds {layer.get_seq_length()} keys written by an unpatched model "
            "(rotated keys); a patched model needs a cache it filled itself"
        )
    layers[layer_idx] = UnrotatedLayer()
    return layers[layer_idx]


# ---------------------------------------------------------------------------------------------- masks
# The last mask reduced, by identity: every layer of one forward receives the same mask object, and
# checking a 4-D mask costs B * Sq * T comparisons (64M per layer for an 8K-token prefill).
_LAST_MASK: list[Any] = [None, None, None]  # [weakref to the mask, (b, sq, t, version), validity]


def _key_validity(mask: Any, b: int, sq: int, t: int, where: str) -> torch.Tensor | None:
    """Reduce transformers' attention mask to key validity, bool ``[B, T]``; None when nothing is masked
    beyond causality. A 4-D mask must be exactly causal (bottom-right) & key padding."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"{where}: unsupported attention mask {type(mask).__name__} (flex attention block masks are not "
            "supported; use attn_implementation='eager' or 'sdpa')"
        )
    checking = not torch.compiler.is_compiling()
    key = (b, sq, t, mask._version)  # the version counter moves on any in-place change
    if checking and _LAST_MASK[0] is not None and _LAST_MASK[0]() is mask and _LAST_MASK[1] == key:
        return _LAST_MASK[2]
    valid = _reduce_mask(mask, b, sq, t, where, checking)
    if checking:
        _LAST_MASK[:] = [weakref.ref(mask), key, valid]
    return valid


def _reduce_mask(mask: torch.Tensor, b: int, sq: int, t: int, where: str, checking: bool) -> torch.Tensor | None:
    if mask.dim() == 2:
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"{where}: 2-D attention mask has shape {tuple(mask.shape)}, expected {(b, t)}")
        valid = mask.bool()
    elif mask.dim() == 4:
        if mask.shape[0] != b or mask.shape[1] != 1 or mask.shape[2] != sq or mask.shape[3] != t:
            raise ValueError(f"{where}: 4-D attention mask has shape {tuple(mask.shape)}, expected {(b, 1, sq, t)}")
        allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]  # eager: 0 keeps, dtype-min masks
        valid = allowed[:, -1, :]  # the last query sees every key that is not padding
        if checking:
            i = torch.arange(sq, device=mask.device)[:, None]
            j = torch.arange(t, device=mask.device)[None, :]
            # Every row, padded queries included: transformers masks padding by key column only, and a
            # row check limited to "real" queries would accept a block-diagonal (packed) mask, whose
            # last row marks the first documents' tokens as padding.
            expected = (j <= i + (t - sq))[None] & valid[:, None, :]
            if bool((expected != allowed).any()):
                raise ValueError(
                    f"{where}: the attention mask is not causal + padding (sliding window, packed sequences or a "
                    "custom mask), which ropekern's causal attention cannot reproduce"
                )
    else:
        raise ValueError(f"{where}: attention mask must have 2 or 4 dimensions, got shape {tuple(mask.shape)}")
    if checking and bool(valid.all()):
        return None
    return valid


def _query_positions(position_ids: Any, b: int, s: int, past: int, device: torch.device, where: str) -> torch.Tensor:
    """Positions of the new tokens, int ``[B, S]``; transformers passes ``[1, S]`` or ``[B, S]``."""
    if position_ids is None:
        return torch.arange(past, past + s, device=device, dtype=torch.int32).expand(b, s)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise TypeError(f"{where}: position_ids must be an integer tensor")
    if position_ids.dim() != 2:
        raise ValueError(
            f"{where}: position_ids must be [batch, seq] (got shape {tuple(position_ids.shape)}; multimodal "
            "3-D positions are not supported)"
        )
    if position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
        raise ValueError(f"{where}: position_ids has shape {tuple(position_ids.shape)}, expected ({b}, {s})")
    return position_ids.to(device).expand(b, s)


def _attend(q, k, v, q_pos, k_pos, valid, state: _ModuleState, scale: float) -> torch.Tensor:
    """Causal scaled-RoPE attention of q ``[B, Sq, Hq, D]`` against k/v ``[B, T, Hkv, D]`` (un-rotated).

    ``valid`` (bool ``[B, T]`` or None) marks real tokens; with padding, the real tokens are packed
    into the varlen layout (queries are the last Sq tokens of each row, so after packing they are
    still the last tokens of their sequence and the bottom-right causal mask is exact)."""
    if valid is None:
        return rk.rope_attention(
            q,
            k,
            v,
            state.rope,
            causal=True,
            softmax_scale=scale,
            q_positions=q_pos,
            k_positions=k_pos,
            backend=state.backend,
        )
    sq, t = q.shape[1], k.shape[1]
    q_valid = valid[:, t - sq :]
    cu_k = torch.nn.functional.pad(valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.nn.functional.pad(q_valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    packed = rk.rope_attention(
        q[q_valid],
        k[valid],
        v[valid],
        state.rope,
        causal=True,
        softmax_scale=scale,
        q_positions=q_pos[q_valid],
        k_positions=k_pos[valid],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        backend=state.backend,
    )
    out = q.new_zeros(q.shape)
    out[q_valid] = packed
    return out


# ---------------------------------------------------------------------------------------------- forward
def _patched_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Replacement ``forward`` of a supported attention module (bound to the instance by ``patch``)."""
    state: _ModuleState = getattr(self, _STATE)
    where = f"ropekern ({state.name}, {type(self).__name__})"
    if len(args) > len(state.params):
        raise TypeError(f"{where}: too many positional arguments ({len(args)})")
    for name, value in zip(state.params, args):
        kwargs[name] = value
    adapter = state.adapter
    if kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False):
        raise ValueError(f"{where}: output_attentions is not supported (ropekern never forms attention weights)")
    if self.training and adapter.dropout(self) > 0:
        raise ValueError(f"{where}: attention dropout in training is not supported")
    if any(kwargs.get(key) is not None for key in _FLASH_VARLEN_KWARGS):
        raise ValueError(f"{where}: packed-sequence (padding-free) flash-attention kwargs are not supported")

    cache = _take_cache(kwargs, where)
    q, k, v = adapter.project(self, hidden_states)  # [B, S, H, D], un-rotated
    b, s = q.shape[:2]
    layer = None
    past = 0
    if cache is not None:
        if self.layer_idx is None:
            raise ValueError(f"{where}: the module has no layer_idx, so it cannot use a KV cache")
        layer = _cache_layer(cache, self.layer_idx, where)
        past = layer.get_seq_length()
    q_pos = _query_positions(kwargs.get("position_ids"), b, s, past, q.device, where)
    if layer is not None:
        keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, positions=q_pos)
        k, v, k_pos = keys.transpose(1, 2), values.transpose(1, 2), layer.positions
    else:
        k_pos = q_pos
    valid = _key_validity(kwargs.get("attention_mask"), b, s, k.shape[1], where)
    out = _attend(q, k, v, q_pos, k_pos, valid, state, adapter.scale(self))
    return adapter.out(self, out.reshape(b, s, -1)), None


# ---------------------------------------------------------------------------------------------- recompute
RESCALE_MODES = ("recompute", "rotate")


@dataclass
class _StackState:
    """State of a patched decoder stack (``rescale="recompute"`` with a length-dependent RoPE)."""

    rope: rk.RopeConfig
    params: tuple[str, ...]
    cache_arg: str  # the name the class forward takes the cache under
    # The class's forward, looked up at patch time: inside a compiled module dynamo resolves
    # type(self).forward to the instance attribute, i.e. to the wrapper itself (infinite recursion).
    forward: Callable[..., Any]


def _sequence_lengths(positions: torch.Tensor, valid: torch.Tensor | None) -> list[int]:
    """``max(positions[b])`` over real tokens, plus one, per row (0 for a row without any)."""
    pos = positions.to(torch.int64)
    if valid is not None:
        pos = torch.where(valid, pos, torch.full_like(pos, -1))
    if not pos.shape[1]:
        return [0] * pos.shape[0]
    return (pos.amax(dim=1) + 1).clamp_min(0).tolist()


def _first_layer(cache: Any) -> UnrotatedLayer | None:
    layers = getattr(cache, "layers", None)
    if not layers or not isinstance(layers[0], UnrotatedLayer) or not layers[0].get_seq_length():
        return None
    return layers[0]


def _patched_stack_forward(self, *args, **kwargs):
    """Replacement ``forward`` of the decoder stack when the RoPE is length-dependent.

    Un-rotated keys make every step rotate all keys with the current table, but in a model with
    more than one layer the cached keys and values of deeper layers were computed from attention
    outputs of the table in force when their token was processed. Whenever a sequence's scaling
    state changes (LongRoPE: once, at the switch; dynamic NTK: every step past L), this forward
    therefore recomputes the whole prefix from the input embeddings kept in the cache, so cached
    generation equals a full recompute at every depth. Other steps append to the cache as usual.
    """
    state: _StackState = getattr(self, _STATE)
    for name, value in zip(state.params, args):
        kwargs[name] = value
    forward = types.MethodType(state.forward, self)
    where = f"ropekern ({type(self).__name__})"
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if kwargs.get("input_ids") is None:
            return forward(**kwargs)
        embeds = self.get_input_embeddings()(kwargs["input_ids"])
        kwargs.update(input_ids=None, inputs_embeds=embeds)
    if kwargs.get("token_type_ids") is not None:
        raise ValueError(f"{where}: token_type_ids are not supported with rescale='recompute'")
    cache = _take_cache(kwargs, where)
    if cache is not None:
        kwargs[state.cache_arg] = cache
    b, s = embeds.shape[:2]
    first = _first_layer(cache)
    recompute = False
    if first is not None:
        past = first.get_seq_length()
        if first.inputs is None or tuple(first.inputs.shape[:2]) != (b, past):
            raise ValueError(
                f"{where}: the cache holds {past} tokens but no matching input history (it was filled with "
                "rescale='rotate' or changed by an operation ropekern does not track); start a new cache"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, past + s)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{where}: rescale='recompute' needs a 2-D attention mask {(b, past + s)}, got {shape}")
        new_pos = _query_positions(kwargs.get("position_ids"), b, s, past, embeds.device, where)
        all_pos = torch.cat([first.positions, new_pos.to(torch.int32)], dim=1)
        valid = None if mask is None else mask.bool()
        before = _sequence_lengths(first.positions, None if valid is None else valid[:, :past])
        after = _sequence_lengths(all_pos, valid)
        if any(state.rope.state_key(x) != state.rope.state_key(y) for x, y in zip(before, after)):
            recompute = True
            history = first.inputs
            for layer in cache.layers:
                layer.reset()
            kwargs.update(inputs_embeds=torch.cat([history, embeds], dim=1), position_ids=all_pos.to(torch.int64))
    out = forward(**kwargs)
    if isinstance(out, tuple):
        if len(out) > 2:
            raise ValueError(f"{where}: tuple outputs with hidden states are not supported; use return_dict=True")
        if recompute:
            out = (out[0][:, -s:], *out[1:])
    elif recompute:
        out.last_hidden_state = out.last_hidden_state[:, -s:]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, -s:] for h in out.hidden_states)
    out_cache = output_cache(out)
    layers = getattr(cache if out_cache is None else out_cache, "layers", None)
    if layers and isinstance(layers[0], UnrotatedLayer):
        held = layers[0].inputs
        full = kwargs["inputs_embeds"]
        layers[0].inputs = full if recompute or held is None else torch.cat([held, full], dim=1)
    return out


# ---------------------------------------------------------------------------------------------- checks
def _refuse_features(model: torch.nn.Module) -> None:
    config = model.config
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None):
            raise ValueError(f"ropekern.integrations.hf: {type(model).__name__} uses {key}, which is not supported")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        odd = sorted({t for t in layer_types if t != "full_attention"})
        raise ValueError(f"ropekern.integrations.hf: layer types {odd} (only full attention is supported)")


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, _Adapter]]:
    """Every attention module, with its adapter; refuses unknown classes and unsupported features."""
    found = []
    for name, module in model.named_modules():
        if not _is_attention_like(module):
            continue
        adapter = _adapter_for(module)
        if adapter is None:
            raise ValueError(
                f"ropekern.integrations.hf: unsupported attention module {name!r} ({type(module).__module__}."
                f"{type(module).__name__}); supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [attr for attr in adapter.required if not hasattr(module, attr)]
        if missing:
            raise ValueError(
                f"ropekern.integrations.hf: {name!r} ({type(module).__name__}) lacks {missing}; the module of "
                f"transformers {_transformers_version()} differs from the ones ropekern was written for"
            )
        window = adapter.window(module)
        if window is not None:
            raise ValueError(
                f"ropekern.integrations.hf: {name!r} ({type(module).__name__}) uses a sliding window of {window} "
                "tokens, which is not supported"
            )
        if hasattr(module, "sinks"):
            raise ValueError(f"ropekern.integrations.hf: {name!r} uses attention sinks, which are not supported")
        if "forward" in module.__dict__ and getattr(module, _STATE, None) is None:
            raise ValueError(
                f"ropekern.integrations.hf: {name!r} already has an instance-level forward (an accelerate hook or "
                "another patch) that patching would discard"
            )
        found.append((name, module, adapter))
    if not found:
        raise ValueError(
            f"ropekern.integrations.hf: no attention module found in {type(model).__name__}; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return found


def _close(where: str, what: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float, atol: float) -> None:
    ours, theirs = ours.double().cpu().flatten(), theirs.double().cpu().flatten()
    if ours.shape != theirs.shape:
        raise ValueError(
            f"ropekern.integrations.hf: {where}: {what} has {theirs.numel()} entries in the model but "
            f"{ours.numel()} in ropekern's RopeConfig"
        )
    err = (ours - theirs).abs()
    if bool((err > atol + rtol * theirs.abs()).any()):
        raise ValueError(
            f"ropekern.integrations.hf: {where}: ropekern's RoPE ({what}) differs from the model's own by up to "
            f"{float(err.max()):.3g}; this config is read differently by ropekern and by transformers"
        )


def _check_stock_tables(model: torch.nn.Module, rope: rk.RopeConfig, modules) -> None:
    """Refuse when ropekern's reading of the config disagrees with the model's own rotary tables.

    Tolerances: transformers computes frequencies in fp32 (relative error ~1e-7); any misreading of
    the config (base, dimension, type, factor) moves them by far more than the 1e-5 allowed here.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name, module in model.named_modules():
        inv = getattr(module, "original_inv_freq", None)
        if not isinstance(inv, torch.Tensor) or not hasattr(module, "attention_scaling"):
            continue
        where = f"{name!r} ({type(module).__name__})"
        _close(where, "inv_freq", rope.inv_freq64(None), inv, 1e-5, 0.0)
        _close(
            where,
            "attention factor",
            torch.tensor([rope.attention_factor]),
            torch.tensor([module.attention_scaling]),
            1e-6,
            0.0,
        )
        if rope.is_length_dependent:
            fn = ROPE_INIT_FUNCTIONS.get(getattr(module, "rope_type", None))
            if fn is None:
                raise ValueError(f"ropekern.integrations.hf: {where}: unknown rope_type {module.rope_type!r}")
            s = rope.scaling
            long_len = (
                s["original_max_position_embeddings"] + 1
                if rope.rope_type == "longrope"
                else 2 * s["max_position_embeddings"] + 3
            )
            hf_inv, hf_factor = fn(module.config, "cpu", seq_len=long_len)
            _close(where, f"inv_freq at length {long_len}", rope.inv_freq64(long_len), hf_inv, 1e-5, 0.0)
            _close(
                where, "attention factor", torch.tensor([rope.attention_factor]), torch.tensor([hf_factor]), 1e-6, 0.0
            )
    for name, module, adapter in modules:
        where = f"{name!r} ({type(module).__name__})"
        rotary = adapter.rotary_dim(module)
        if rotary is not None and rotary != rope.rotary_dim:
            raise ValueError(
                f"ropekern.integrations.hf: {where} rotates {rotary} channels but ropekern's RopeConfig rotates "
                f"{rope.rotary_dim}"
            )
        if adapter in _GPTJ and not rope.interleaved:
            raise ValueError(f"ropekern.integrations.hf: {where} pairs channels interleaved; the RopeConfig does not")
    for name, owner in _gptj_tables(model):
        where = f"{name!r} ({type(owner).__name__})"
        # embed_positions[p] = [sin(p f) * a, cos(p f) * a] (fp32): row 1 gives f and a back.
        row = owner.embed_positions[1].double().cpu()
        sin, cos = row[: row.numel() // 2], row[row.numel() // 2 :]
        _close(where, "inv_freq", rope.inv_freq64(None), torch.atan2(sin, cos), 1e-5, 1e-6)
        _close(where, "attention factor", torch.full_like(sin, rope.attention_factor), torch.hypot(sin, cos), 1e-5, 0.0)


def _gptj_tables(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules holding GPT-J's fixed ``[max positions, R]`` sin/cos table (``embed_positions``): each
    attention module before transformers 5.24, the model's one ``GPTJRotaryEmbedding`` from 5.24."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__module__ == "transformers.models.gptj.modeling_gptj"
        and isinstance(getattr(m, "embed_positions", None), torch.Tensor)
    ]


# ---------------------------------------------------------------------------------------------- public API
def is_patched(model: torch.nn.Module) -> bool:
    """True when ``model`` is currently patched by ``patch``."""
    return getattr(model, _MODEL_STATE, None) is not None


def patch(model: torch.nn.Module, backend: str = "auto", *, rescale: str = "recompute") -> torch.nn.Module:
    """Route every attention module's RoPE + attention through ropekern, in place; returns ``model``.

    Args:
        model: a transformers model of a supported architecture (``SUPPORTED_ARCHITECTURES``), e.g. a
            ``LlamaForCausalLM``; its ``config`` gives the ``RopeConfig`` (``RopeConfig.from_hf``).
        backend: ropekern backend for every call (``"auto"`` or a name from ``rk.available_backends()``).
        rescale: for length-dependent RoPE (dynamic NTK, LongRoPE) with a KV cache. ``"recompute"``
            (default): when a sequence's scaling state changes, the whole prefix is recomputed, so
            cached generation equals a full recompute (LongRoPE: one extra prefill at the switch;
            dynamic NTK: every step past L costs a prefill). ``"rotate"``: never recompute; every
            step still rotates all cached keys with the current table, but deeper layers' cached
            keys/values keep what earlier layers computed under the older table.

    Projections, biases, q/k norms and output projections are the module's own. Prefill and decode
    call ``rk.rope_attention`` on un-rotated q/k/v with explicit positions; a ``DynamicCache`` keeps
    un-rotated keys (``UnrotatedLayer``). Patching a patched model re-patches it with the current
    config and arguments. Raises ``ValueError`` naming the module for anything unsupported.
    """
    if rescale not in RESCALE_MODES:
        raise ValueError(f"`rescale` must be one of {RESCALE_MODES}, got {rescale!r}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a string, got {type(backend).__name__}")
    if backend != "auto":
        status = rk.available_backends().get(backend)
        if status is None:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {list(rk.available_backends())}")
        if status is not True:
            raise ValueError(f"backend {backend!r} is not available: {status}")
    _refuse_features(model)
    modules = _attention_modules(model)
    try:
        rope = rk.RopeConfig.from_hf(model.config)
    except ValueError as exc:
        raise ValueError(f"ropekern.integrations.hf: {type(model).__name__}'s RoPE config: {exc}") from exc
    _check_stock_tables(model, rope, modules)
    stack = None
    if rope.is_length_dependent and rescale == "recompute":
        stack = getattr(model, "base_model", model)
        if not hasattr(stack, "get_input_embeddings") or "forward" in stack.__dict__ and not hasattr(stack, _STATE):
            raise ValueError(
                f"ropekern.integrations.hf: cannot install rescale='recompute' on {type(stack).__name__} (no input "
                "embeddings, or an instance-level forward already there); use rescale='rotate'"
            )
    for name, module, _ in modules:
        _check_attention_signature(type(module), f"ropekern.integrations.hf: {name!r}")
    stack_cache = None
    if stack is not None:
        where = f"ropekern.integrations.hf: rescale='recompute' on {type(stack).__name__}"
        stack_cache = _cache_keyword(type(stack), where, CACHE_KEYWORDS[:2])
    unpatch(model)
    for name, module, adapter in modules:
        setattr(module, _STATE, _ModuleState(name, adapter, rope, backend, _positional_params(module, skip=2)))
        module.forward = types.MethodType(_patched_forward, module)
    if stack is not None:
        state = _StackState(rope, _positional_params(stack, skip=1), stack_cache, type(stack).forward)
        setattr(stack, _STATE, state)
        stack.forward = types.MethodType(_patched_stack_forward, stack)
    if stack is not None and type(model).__name__ in _CACHE_DROPPING:
        # Phi3ForCausalLM drops the cache when a sequence first passes LongRoPE's switch point: stock
        # caches keys rotated with the short table. transformers 5.17-5.19 then feed only the newest
        # token without a cache (generation breaks; fixed in 5.20). The patched stack recomputes at
        # the switch itself, so the patched instance uses the generic method and keeps its cache.
        model.prepare_inputs_for_generation = super(type(model), model).prepare_inputs_for_generation
    for name, owner in _gptj_tables(model):
        if _adapter_for(owner) is None:
            # GPTJRotaryEmbedding (5.24+) gathers rows of its fixed table in every model forward, so a
            # position past max_position_embeddings raises IndexError there although the patched
            # attention never reads the result; while patched it returns nothing.
            setattr(owner, _STATE, name)
            owner.forward = types.MethodType(_unused_table, owner)
    setattr(
        model,
        _MODEL_STATE,
        {"rope": rope, "backend": backend, "rescale": rescale, "modules": [name for name, _, _ in modules]},
    )
    return model


# Causal-LM classes whose own ``prepare_inputs_for_generation`` drops the cache at a RoPE switch.
_CACHE_DROPPING = frozenset({"Phi3ForCausalLM"})


def _unused_table(self, x, position_ids):
    return None


def _positional_params(module: torch.nn.Module, skip: int) -> tuple[str, ...]:
    """Names of the class forward's positional parameters after the first ``skip`` (self, hidden_states)."""
    params = _forward_parameters(type(module))[skip - 1 :]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``patch``: every attention module runs its class's own forward again (a no-op when not
    patched). Caches filled while patched hold un-rotated keys and refuse unpatched writes."""
    for module in model.modules():
        if getattr(module, _STATE, None) is not None:
            del module.forward
            delattr(module, _STATE)
    if hasattr(model, _MODEL_STATE):
        delattr(model, _MODEL_STATE)
        model.__dict__.pop("prepare_inputs_for_generation", None)
    return model


def exact_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Turn an **unpatched** model, in place, into an independent oracle for the patched one.

    Everything stays transformers' own code (projections, rotate-half or rotate-every-two, partial
    rotary, masks, cache) except the RoPE tables, whose fp32 angles (``position * inv_freq`` in fp32:
    0.06 rad off at position 2^20) become exact: cos/sin from fp64 angles on ropekern's fp64
    frequencies, per row with that row's length for dynamic NTK / LongRoPE (docs/design.md §2). Attention
    runs in the model's dtype: SDPA instead of eager (whose softmax is always fp32) where the model
    supports it, and GPT-J's scores, which transformers forms in fp32, in the model's dtype. Cast
    the model to float64 first for an oracle; returns ``model``.
    """
    if is_patched(model):
        raise ValueError("exact_reference needs an unpatched model")
    rope = rk.RopeConfig.from_hf(model.config)
    _check_stock_tables(model, rope, _attention_modules(model))
    if getattr(model, "_supports_sdpa", False):
        model.config._attn_implementation = "sdpa"  # eager attention's softmax is always fp32
    for module in model.modules():
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor) and hasattr(
            module, "attention_scaling"
        ):
            module.forward = types.MethodType(_exact_rotary_forward(rope), module)
    for _, owner in _gptj_tables(model):
        if _adapter_for(owner) is not None:  # the attention module (before 5.24)
            owner._get_embed_positions = types.MethodType(_exact_gptj_table(rope), owner)
            owner._attn = types.MethodType(_gptj_attn_in_dtype, owner)
        else:  # GPTJRotaryEmbedding: (sin, cos) [B, S, R/2] of the given positions
            owner.forward = types.MethodType(_exact_gptj_forward(rope), owner)
    return model


def _exact_cos_sin(
    rope: rk.RopeConfig, positions: torch.Tensor, lengths_from: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(cos, sin)`` ``[B, S, R/2]`` times the attention factor. Row b uses the table of
    length ``max(lengths_from[b]) + 1`` (default ``positions``) for length-dependent types."""
    lengths_from = positions if lengths_from is None else lengths_from
    rows = []
    for row, ref in zip(positions.to(torch.int64), lengths_from.to(torch.int64)):
        inv = rope.inv_freq64(int(ref.max()) + 1 if rope.is_length_dependent else None).to(row.device)
        rows.append(row.to(torch.float64)[:, None] * inv[None, :])
    angle = torch.stack(rows)
    return torch.cos(angle) * rope.attention_factor, torch.sin(angle) * rope.attention_factor


def _exact_rotary_forward(rope: rk.RopeConfig):
    def forward(self, x, position_ids, layer_type=None):
        cos, sin = _exact_cos_sin(rope, position_ids)
        return torch.cat([cos, cos], dim=-1).to(x.dtype), torch.cat([sin, sin], dim=-1).to(x.dtype)

    return forward


def _exact_gptj_table(rope: rk.RopeConfig):
    def get_embed_positions(self, position_ids):
        # GPT-J gathers row p = [sin(p f) a, cos(p f) a] of this [B, max position + 1, R] table.
        n = int(position_ids.max()) + 1
        grid = torch.arange(n, device=position_ids.device).expand(position_ids.shape[0], n)
        cos, sin = _exact_cos_sin(rope, grid, lengths_from=position_ids)
        return torch.cat([sin, cos], dim=-1)

    return get_embed_positions


def _exact_gptj_forward(rope: rk.RopeConfig):
    def forward(self, x, position_ids):
        cos, sin = _exact_cos_sin(rope, position_ids)
        return sin.to(x.dtype), cos.to(x.dtype)

    return forward


def _gptj_attn_in_dtype(self, query, key, value, attention_mask=None):
    scores = torch.matmul(query, key.transpose(-1, -2)) / self.scale_attn
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.nn.functional.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(self.attn_dropout(weights), value), weights


def rope_config(model: torch.nn.Module) -> rk.RopeConfig:
    """The ``RopeConfig`` a patched model runs with (``ValueError`` when not patched)."""
    state = getattr(model, _MODEL_STATE, None)
    if state is None:
        raise ValueError("the model is not patched by ropekern")
    return state["rope"]


def extend_context(
    model: torch.nn.Module,
    scaling: Mapping[str, Any],
    backend: str = "auto",
    *,
    max_position_embeddings: int | None = None,
    rescale: str = "recompute",
) -> torch.nn.Module:
    """Set the model's RoPE scaling and patch it; returns ``model``.

    Args:
        model: a supported transformers model (patched or not).
        scaling: a ``rope_parameters`` dict of any ropekern type (docs/design.md §3), e.g.
            ``{"rope_type": "yarn", "factor": 4.0}``. ``original_max_position_embeddings`` defaults to the
            model's pretraining length: the config's top-level ``original_max_position_embeddings``
            (Phi-3), else the current ``rope_parameters``' one, else ``max_position_embeddings``.
            ``rope_theta`` and ``partial_rotary_factor`` default to the model's.
        backend, rescale: as in ``patch``.
        max_position_embeddings: the new context length; default ``original * factor``. Dynamic NTK
            keeps the current value by default: transformers uses it as L, the length beyond which
            the base grows (so an explicit value sets L), and the context has no fixed end.

    The config gets ``rope_parameters`` and ``max_position_embeddings`` (and, when it has one, the
    top-level ``original_max_position_embeddings``); the model's own rotary tables are rebuilt from it,
    so ``unpatch`` afterwards runs the same scaling with stock transformers (GPT-J: the base-state
    table; stock GPT-J has no length-dependent RoPE). Nothing is changed when the scaling is invalid.
    """
    if rescale not in RESCALE_MODES:
        raise ValueError(f"`rescale` must be one of {RESCALE_MODES}, got {rescale!r}")
    if not isinstance(scaling, Mapping):
        raise TypeError(f"`scaling` must be a dict of rope parameters, got {type(scaling).__name__}")
    config = model.config
    params = dict(scaling)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    rope_type = params.setdefault("rope_type", "default")
    current = dict(getattr(config, "rope_parameters", None) or {})
    if any(isinstance(v, Mapping) for v in current.values()):
        raise ValueError("ropekern.integrations.hf: per-layer-type rope_parameters are not supported")
    original = (
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or current.get("original_max_position_embeddings")
        or config.max_position_embeddings
    )
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in params and current.get(key) is not None:
            params[key] = current[key]
    if rope_type in ("yarn", "longrope", "llama3"):
        params["original_max_position_embeddings"] = original
    if max_position_embeddings is None:
        factor = params.get("factor")
        if rope_type == "dynamic":
            max_position_embeddings = config.max_position_embeddings
        elif factor is not None:
            max_position_embeddings = int(math.ceil(original * float(factor)))
        elif rope_type == "longrope":
            raise ValueError("extend_context: longrope without `factor` needs `max_position_embeddings`")
        else:
            max_position_embeddings = original
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int):
        raise TypeError(f"`max_position_embeddings` must be an int, got {max_position_embeddings!r}")
    if max_position_embeddings <= 0:
        raise ValueError(f"`max_position_embeddings` must be positive, got {max_position_embeddings}")

    overrides = {"rope_parameters": params, "rope_scaling": None, "max_position_embeddings": max_position_embeddings}
    if hasattr(config, "original_max_position_embeddings") and rope_type in ("yarn", "longrope", "llama3"):
        overrides["original_max_position_embeddings"] = original
    try:
        rope = rk.RopeConfig.from_hf(_Overlay(config, overrides))  # validate before touching the model
    except ValueError as exc:
        raise ValueError(f"extend_context: {exc}") from exc
    _refuse_features(model)
    _attention_modules(model)

    config.rope_parameters = params
    config.max_position_embeddings = max_position_embeddings
    if hasattr(config, "original_max_position_embeddings") and rope_type in ("yarn", "longrope", "llama3"):
        config.original_max_position_embeddings = original
    _rebuild_stock_tables(model, rope)
    return patch(model, backend, rescale=rescale)


class _Overlay:
    """A read-only view of a config with some attributes replaced (the config-to-be)."""

    def __init__(self, config: Any, overrides: Mapping[str, Any]):
        self._config, self._overrides = config, dict(overrides)

    def __getattr__(self, key: str) -> Any:
        if key in self._overrides:
            return self._overrides[key]
        return getattr(self._config, key)


def _rebuild_stock_tables(model: torch.nn.Module, rope: rk.RopeConfig) -> None:
    """Rebuild the model's own rotary tables for its new config, in place and on the same devices.

    Types transformers implements are computed by transformers itself (so that ``unpatch`` runs the
    stock scaling); static NTK, which it lacks, gets ropekern's table as a fixed fp32 ``inv_freq``.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = model.config
    for module in model.modules():
        inv = getattr(module, "original_inv_freq", None)
        if isinstance(inv, torch.Tensor) and hasattr(module, "attention_scaling"):
            device, rope_type = inv.device, rope.rope_type
            if rope_type == "default":
                new_inv, factor = module.compute_default_rope_parameters(config)
            elif rope_type in ROPE_INIT_FUNCTIONS:
                new_inv, factor = ROPE_INIT_FUNCTIONS[rope_type](config, device)
            else:
                new_inv, factor, rope_type = rope.inv_freq(None), rope.attention_factor, "default"
            new_inv = new_inv.to(device=device, dtype=torch.float32)
            module.rope_type = rope_type
            module.register_buffer("inv_freq", new_inv, persistent=False)
            module.register_buffer("original_inv_freq", new_inv.clone(), persistent=False)
            module.attention_scaling = factor
            module.max_seq_len_cached = module.original_max_seq_len = config.max_position_embeddings
            if hasattr(module, "long_inv_freq"):  # transformers' cached LongRoPE long table
                del module.long_inv_freq
    for _, owner in _gptj_tables(model):
        # Stock GPT-J's table: [sin(p f) * a, cos(p f) * a] for p < max positions, fp32 angles.
        n = config.max_position_embeddings
        angle = torch.arange(n, dtype=torch.float32)[:, None] * rope.inv_freq(None)[None, :]
        af = rope.attention_factor
        table = torch.cat([torch.sin(angle) * af, torch.cos(angle) * af], dim=1)
        owner.embed_positions = table.to(owner.embed_positions.device)
        owner.max_positions = n
