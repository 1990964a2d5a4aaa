"""``patch``, ``unpatch``, ``extend_context``, ``is_patched`` and ``rope_config``: installing and removing
the replacement forwards, and the model-level patch state.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import Any

import torch

import ropekern as rk

from .adapters import _adapter_for, _gptj_tables
from .cache import CACHE_KEYWORDS, _cache_keyword, _forward_parameters
from .checks import _attention_modules, _check_attention_signature, _check_stock_tables, _refuse_features
from .forward import _STATE, _ModuleState, _patched_forward
from .recompute import RESCALE_MODES, _patched_stack_forward, _StackState

_MODEL_STATE = "_ropekern_patch"


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
