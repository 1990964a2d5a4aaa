"""Per-architecture adapters: how each supported transformers attention class projects q/k/v, scales,
projects out and rotates, and where GPT-J keeps its fixed sin/cos table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


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


def _adapter_for(module: torch.nn.Module) -> _Adapter | None:
    """The adapter of a known attention class whose attributes are all there (None: unknown class;
    the first adapter when none is complete, so that its missing attributes are reported)."""
    cls = type(module)
    adapters = _ADAPTERS.get((cls.__module__, cls.__name__), ())
    complete = [a for a in adapters if all(hasattr(module, attr) for attr in a.required)]
    return (complete or adapters or [None])[0]


def _is_attention_like(module: torch.nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _gptj_tables(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules holding GPT-J's fixed ``[max positions, R]`` sin/cos table (``embed_positions``): each
    attention module before transformers 5.24, the model's one ``GPTJRotaryEmbedding`` from 5.24."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__module__ == "transformers.models.gptj.modeling_gptj"
        and isinstance(getattr(m, "embed_positions", None), torch.Tensor)
    ]
