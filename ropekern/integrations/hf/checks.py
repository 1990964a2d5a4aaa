"""Patch-time refusals: unsupported model features, attention classes and forward signatures, and RoPE
configs that ropekern would read differently from the model's own rotary tables.
"""

from __future__ import annotations

import torch

import ropekern as rk

from .adapters import _GPTJ, SUPPORTED_ARCHITECTURES, _Adapter, _adapter_for, _gptj_tables, _is_attention_like
from .cache import CACHE_KEYWORDS, _cache_keyword, _forward_parameters, _transformers_version
from .forward import _STATE

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
