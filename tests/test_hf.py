"""ropekern.integrations.hf: patched transformers models against the stock ones.

Models are tiny and randomly initialised (hidden 64, 2 layers, vocab 128, 4 query / 2 kv heads, no
downloads). ``initializer_range=0.2`` (10x the default) keeps the logits far apart, so greedy and
sampled tokens test the model rather than floating-point ties.

The oracle is independent of the patched code path: ``hf.exact_reference`` keeps the *stock*
transformers forward (projections, its own rotate-half / rotate-every-two, partial rotary, masks)
in float64 and only makes its RoPE tables exact (fp64 angles instead of fp32). Two checks use it:
  * the patched model in float64 must equal it to 1e-9 relative (same math; only summation order
    differs), which catches any integration mistake (layout, scale, positions, mask, cache);
  * in fp32 and bf16, the docs/design.md §5 error-ratio rule with baseline = the stock eager model in the
    test dtype (what users run today) and kernel = the patched model in that dtype.
Rope types transformers lacks for a model (static NTK; any scaling for GPT-J, whose stock table is a
fixed buffer) get their stock baseline through ``extend_context``, which writes ropekern's fp32
frequencies into the stock table (length-dependent types: the table for the test length).
"""

import copy
import json
import warnings

import pytest
import torch
import transformers as T
from packaging.version import Version
from transformers.cache_utils import DynamicCache, StaticCache

import ropekern as rk
from ropekern import cli
from ropekern.context import pcw_generate
from ropekern.integrations import hf
from ropekern.testing import error_check

from cases import TINY_LLAMA, TINY_MODEL

VOCAB, SEQ = TINY_MODEL["vocab_size"], 40
COMMON, LLAMA_LIKE = TINY_MODEL, TINY_LLAMA


def _configs():
    return {
        "llama": lambda: T.LlamaConfig(**LLAMA_LIKE, **COMMON),
        "mistral": lambda: T.MistralConfig(**LLAMA_LIKE, sliding_window=None, **COMMON),
        "qwen2": lambda: T.Qwen2Config(**LLAMA_LIKE, **COMMON),
        "qwen3": lambda: T.Qwen3Config(**LLAMA_LIKE, head_dim=32, **COMMON),  # head_dim != hidden / heads
        "phi3": lambda: T.Phi3Config(
            **LLAMA_LIKE, partial_rotary_factor=0.5, original_max_position_embeddings=16, **COMMON
        ),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=128, rotary_pct=0.5, **COMMON),
        "gptj": lambda: T.GPTJConfig(
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
            n_embd=64,
            n_layer=2,
            n_head=4,
            rotary_dim=8,
            n_positions=64,
            initializer_range=0.2,
        ),
    }


CONFIGS = _configs()
ARCHS = list(CONFIGS)


def rotary_half(arch: str) -> int:
    """R/2 of each tiny model (LongRoPE factor lists have this length)."""
    return {"qwen3": 16, "phi3": 4, "gpt_neox": 4, "gptj": 4}.get(arch, 8)


def scaling(kind: str, arch: str) -> tuple[dict | None, int | None]:
    """``(rope_parameters, max_position_embeddings)`` of each rope type; switch points at 16 < SEQ."""
    half = rotary_half(arch)
    table = {
        "default": None,
        "linear": {"rope_type": "linear", "factor": 2.0},
        "ntk": {"rope_type": "ntk", "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        "longrope": {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 1.5 * i for i in range(half)],
            "original_max_position_embeddings": 16,
        },
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }
    table["proportional"] = {"rope_type": "proportional", "factor": 2.0, "partial_rotary_factor": 0.5}
    # dynamic NTK's L is max_position_embeddings; LongRoPE's factor is max / original = 4.
    return table[kind], {"dynamic": 16, "longrope": 64}.get(kind)


ROPE_TYPES = ["default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3", "proportional"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(arch: str, attn: str = "eager", seed: int = 0):
    config = CONFIGS[arch]()
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config).eval()


def stock(arch: str, kind: str = "default", attn: str = "eager"):
    """The stock fp32 model with the given rope type set through ``extend_context`` (then unpatched)."""
    model = make_model(arch, attn)
    params, max_pos = scaling(kind, arch)
    if params is not None:
        hf.unpatch(hf.extend_context(model, params, max_position_embeddings=max_pos))
    return model


def cast(model, dtype):
    """A copy with parameters in ``dtype``; rotary buffers stay fp32 as ``from_pretrained(dtype=...)``
    leaves them (``model.to(bf16)`` would round transformers' own frequencies to bf16)."""
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.data = p.data.to(dtype)
    return out


def tokens(b=2, s=SEQ, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, s), generator=gen)


def gptj_table_for_length(model, rope: rk.RopeConfig, seq_len: int):
    """Stock GPT-J for a length-dependent type: its fixed table, built for this length's state."""
    inv = rope.inv_freq(seq_len)
    angle = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv[None, :]
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1) * rope.attention_factor
    for m in model.modules():
        if hasattr(m, "embed_positions"):
            m.embed_positions = table


@torch.no_grad()
def logits(model, ids, **kw):
    return model(ids, **kw).logits


# --------------------------------------------------------------------------------------- logits
def oracle_of(model):
    return hf.exact_reference(cast(model, torch.float64))


def assert_same_fp64(patched_model, oracle_model, ids, rows=None, **kw):
    """The patched model in fp64 (on the fp64 reference backend: kernels rotate in fp32 by design)
    equals the exact stock reference: summation order is the only difference (~1e-15 relative);
    1e-9 leaves room without hiding any real mistake (>1e-3)."""
    out, ref = logits(patched_model, ids, **kw), logits(oracle_model, ids, **kw)
    if rows is not None:
        out, ref = out[rows], ref[rows]
    assert (out - ref).abs().max() <= 1e-9 * ref.abs().max()
    return ref


@pytest.mark.parametrize("kind", ROPE_TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_stock(arch, kind):
    if kind == "proportional" and arch in ("gpt_neox", "gptj"):
        # Proportional RoPE spans the whole head; these rotate a fixed channel count: refused.
        with pytest.raises(ValueError, match="rotates 8 channels|rotary_dim"):
            stock(arch, kind)
        return
    base = stock(arch, kind)
    rope = rk.RopeConfig.from_hf(base.config)
    assert rope.rope_type == kind
    ids = tokens()
    dtypes = (torch.float32, torch.bfloat16)
    oracle = assert_same_fp64(hf.patch(cast(base, torch.float64), backend="torch"), oracle_of(base), ids)
    patched = {dtype: hf.patch(cast(base, dtype)) for dtype in dtypes}
    if arch == "gptj" and rope.is_length_dependent:
        gptj_table_for_length(base, rope, SEQ)  # after patching: patch() checks the base-state table
    for dtype in dtypes:
        baseline = logits(cast(base, dtype), ids)
        out = logits(patched[dtype], ids)
        assert out.dtype == dtype
        check = error_check(out, oracle, baseline, dtype)
        assert check.ok, f"{arch} {kind} {dtype}: {check}"


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_reference_is_stock(arch):
    """The oracle is the stock model up to stock's fp32 angles (<= 40 * 2^-24 rad here) and GPT-J's
    fp32 scores: relative 1e-5 is ~100x that margin; a wrong table or layout moves logits by >1e-2."""
    base = cast(stock(arch, "yarn"), torch.float64)
    ids = tokens()
    ref = logits(base, ids)
    out = logits(hf.exact_reference(copy.deepcopy(base)), ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (out - ref).abs().max() > 0  # it really replaced the tables


def test_far_and_repeated_positions():
    """Explicit positions near 2^20 and repeated positions (parallel context windows): the patched
    model equals the exact reference in fp64 and beats stock's fp32 angles (0.06 rad off at 2^20)
    under the error-ratio rule in fp32."""
    base = stock("llama", "default")
    ids = tokens(b=2, s=24)
    far = torch.arange(24)[None].repeat(2, 1) + 2**20 - 7
    repeated = torch.cat([torch.arange(12), torch.arange(12)])[None].repeat(2, 1)
    patched64, oracle_model = hf.patch(cast(base, torch.float64), backend="torch"), oracle_of(base)
    patched = hf.patch(copy.deepcopy(base))
    for pos in (far, repeated):
        oracle = assert_same_fp64(patched64, oracle_model, ids, position_ids=pos)
        check = error_check(logits(patched, ids, position_ids=pos), oracle, logits(base, ids, position_ids=pos))
        assert check.ok, str(check)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_left_padding_logits(attn, kind):
    """Left padding reaches the module as a 4-D bool (sdpa) or float (eager) mask. The real rows of
    a padded batch equal the exact reference (dynamic NTK: one table per row, of the row's own
    length, where stock transformers uses the longest row's) and each row run alone."""
    model = stock("llama", kind, attn)
    ids = tokens(b=2, s=20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    kw = dict(attention_mask=mask, position_ids=pos)
    assert_same_fp64(
        hf.patch(cast(model, torch.float64), backend="torch"), oracle_of(model), ids, rows=mask.bool(), **kw
    )
    patched = hf.patch(model)
    out = logits(patched, ids, **kw)
    torch.testing.assert_close(out[1, 7:], logits(patched, ids[1:, 7:])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], logits(patched, ids[:1])[0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- generation
def generate(model, ids, **kw):
    kw.setdefault("max_new_tokens", 32)
    kw.setdefault("min_new_tokens", kw["max_new_tokens"])
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, **kw)


@pytest.mark.parametrize("kind", ["default", "yarn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_identical(arch, kind):
    """32 greedy tokens through the cache, as stock (static rope types: stock's cached decoding is
    exact for them; the length-dependent ones are compared with recomputation below)."""
    model = stock(arch, kind)
    ids = tokens(b=1, s=8)
    expected = generate(model, ids)
    got = generate(hf.patch(model), ids)
    assert torch.equal(got, expected)
    assert len(set(got[0, 8:].tolist())) > 8  # the tokens vary: this tests the model, not a fixed point


@pytest.mark.parametrize("arch,attn", [("llama", "eager"), ("llama", "sdpa"), ("gpt_neox", "sdpa"), ("gptj", "eager")])
def test_batched_left_padded_generation(arch, attn):
    model = stock(arch, "linear", attn)
    ids = tokens(b=3, s=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = generate(model, ids, attention_mask=mask, max_new_tokens=16)
    got = generate(hf.patch(model), ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(got, expected)


def test_sampling_and_beam_search_identical():
    """Sampling (same seed) and beam search (the cache is reordered: positions must follow)."""
    model = stock("qwen2", "yarn")
    ids = tokens(b=2, s=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    runs = {}
    for patched in (False, True):
        if patched:
            hf.patch(model)
        torch.manual_seed(5)
        sampled = generate(model, ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=20)
        beams = generate(model, ids, attention_mask=mask, num_beams=3, max_new_tokens=12)
        runs[patched] = (sampled, beams)
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])


def step_logits(model, ids, mask, use_cache: bool, steps: int):
    out = generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=steps,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize(
    "arch,kind", [("llama", "dynamic"), ("phi3", "longrope"), ("gptj", "dynamic"), ("qwen3", "longrope")]
)
def test_cached_generation_equals_recompute_across_switch(arch, kind):
    """Dynamic NTK (L=16) and LongRoPE (original 16): prompts of 6 and 12 real tokens grow past 16.
    Patched (rescale="recompute"): cached decoding == full recompute, per sequence, left padding
    included. Stock transformers caches keys rotated with the table of the step that wrote them, so
    its cached run drifts from its own recompute (by whole logits here); stock Phi-3 is the exception:
    its generate() drops the cache once, when the padded length first passes the switch point, and
    on transformers 5.17-5.19 then feeds one token without a cache (stock logits 5.2 off on 5.17).
    The patched Phi-3 keeps its cache (exact across the switch), so it passes on those releases too."""
    model = stock(arch, kind)
    ids = tokens(b=2, s=12)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    patched = hf.patch(copy.deepcopy(model))
    seq_c, log_c = step_logits(patched, ids, mask, True, 20)
    seq_r, log_r = step_logits(patched, ids, mask, False, 20)
    assert torch.equal(seq_c, seq_r)
    torch.testing.assert_close(log_c, log_r, rtol=0, atol=2e-5)
    if arch in ("llama", "qwen3"):
        _, stock_c = step_logits(model, ids[1:], mask[1:], True, 20)
        _, stock_r = step_logits(model, ids[1:], mask[1:], False, 20)
        assert (stock_c - stock_r).abs().max() > 1e-1


@pytest.mark.parametrize("layers", [1, 2])
def test_rotate_mode_is_exact_for_one_layer_only(layers):
    """rescale="rotate" keeps the cache: every step rotates all cached keys with the current table,
    which is exact for one attention layer; with two, the second layer's cached keys/values came from
    first-layer outputs computed under older tables, so only "recompute" is exact."""
    model = make_model("llama")
    model.config.num_hidden_layers = layers
    model.model.layers = model.model.layers[:layers]
    hf.unpatch(hf.extend_context(model, scaling("dynamic", "llama")[0], max_position_embeddings=16))
    ids = tokens(b=1, s=12)
    mask = torch.ones_like(ids)
    patched = hf.patch(model, rescale="rotate")
    _, log_c = step_logits(patched, ids, mask, True, 12)
    _, log_r = step_logits(patched, ids, mask, False, 12)
    err = float((log_c - log_r).abs().max())
    assert err < 2e-5 if layers == 1 else err > 1e-2


# --------------------------------------------------------------------------------------- cache, compile
def test_cache_holds_unrotated_keys_and_positions():
    model = hf.patch(stock("llama", "default"))
    ids = tokens(b=1, s=5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{hf.cache_keyword(model): cache}, use_cache=True)
    layer = cache.layers[0]
    assert isinstance(layer, hf.UnrotatedLayer)
    assert layer.positions.tolist() == [[0, 1, 2, 3, 4]]
    attn = model.model.layers[0].self_attn
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    k = attn.k_proj(h).view(1, 5, -1, attn.head_dim).transpose(1, 2)
    torch.testing.assert_close(layer.keys, k, rtol=0, atol=0)  # stored exactly as projected: un-rotated
    cache.crop(-2)  # transformers 5: a negative count of tokens to drop
    assert layer.positions.tolist() == [[0, 1, 2]]


def test_unrotated_layer_follows_cache_operations():
    """Beam search reorders, batch expansion and cropping keep positions and inputs with their keys."""
    layer = hf.UnrotatedLayer()
    k = torch.randn(3, 2, 4, 8)
    layer.update(k, k, positions=torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8], [9, 9, 9, 9]]))
    layer.inputs = torch.arange(12.0).reshape(3, 4, 1)
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert layer.positions.tolist() == [[9, 9, 9, 9], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert torch.equal(layer.keys, k[[2, 0, 0]]) and layer.inputs[:, 0, 0].tolist() == [8, 0, 0]
    layer.batch_select_indices(torch.tensor([0, 1]))
    layer.batch_repeat_interleave(2)
    assert layer.positions[:, 0].tolist() == [9, 9, 0, 0] and layer.inputs[:, 0, 0].tolist() == [8, 8, 0, 0]
    layer.crop(-1)
    assert layer.positions.shape == (4, 3) and layer.inputs.shape == (4, 3, 1) and layer.keys.shape[2] == 3
    with pytest.raises(ValueError, match="un-rotated keys"):
        layer.update(k[:, :, :1].repeat(2, 1, 1, 1)[:4], k[:4, :, :1])
    layer.reset()
    assert layer.positions is None and layer.inputs is None and layer.get_seq_length() == 0


def test_decoding_reads_the_cache_by_slot(monkeypatch):
    """Decoding after a prefix at positions 0..T-1 goes through ``rope_attention_with_kvcache`` (the
    decode kernel, keys addressed by slot); a left-padded batch keeps explicit positions. Both give
    stock's tokens."""
    calls = []
    real = rk.rope_attention_with_kvcache

    def spy(q, *args, **kwargs):
        calls.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(rk, "rope_attention_with_kvcache", spy)
    model = stock("llama", "yarn")
    ids = tokens(b=1, s=8)
    expected = generate(model, ids, max_new_tokens=6)
    assert torch.equal(generate(hf.patch(model), ids, max_new_tokens=6), expected)
    assert calls == [1] * (5 * model.config.num_hidden_layers)  # 5 steps after the prefill, every layer
    calls.clear()
    ids, mask = tokens(b=2, s=8), torch.ones(2, 8, dtype=torch.int64)
    mask[1, :3] = 0
    hf.unpatch(model)
    expected = generate(model, ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(generate(hf.patch(model), ids, attention_mask=mask, max_new_tokens=4), expected)
    assert calls == []


def test_unrotated_layer_knows_sequential_positions():
    layer = hf.UnrotatedLayer()
    k = torch.randn(2, 2, 3, 8)
    layer.update(k, k, positions=torch.arange(3).expand(2, 3))
    assert layer.sequential
    layer.update(k[:, :, :1], k[:, :, :1], positions=torch.tensor([[3], [3]]))
    assert layer.sequential
    layer.update(k[:, :, :1], k[:, :, :1], positions=torch.tensor([[4], [7]]))  # a row skips ahead
    assert not layer.sequential
    layer.crop(-1)
    assert not layer.sequential  # kept conservatively: nothing re-reads the positions
    layer.reset()
    assert layer.sequential
    layer.update(k, k, positions=torch.tensor([[1, 2, 3], [0, 1, 2]]))  # a row not starting at 0
    assert not layer.sequential


def test_mask_forms():
    """Every form transformers hands the module reduces to the same key validity; others are refused."""
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    i, j = torch.arange(2)[:, None], torch.arange(4)[None, :]
    allowed = ((j <= i + 2)[None] & valid[:, None, :])[:, None]  # [B, 1, Sq=2, T=4]
    eager = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (valid.long(), allowed, eager):
        assert torch.equal(hf._key_validity(mask, 2, 2, 4, "t"), valid)
    assert hf._key_validity(torch.ones(2, 4), 2, 2, 4, "t") is None  # nothing masked: dense path
    assert hf._key_validity(None, 2, 2, 4, "t") is None
    with pytest.raises(ValueError, match="not causal"):
        hf._key_validity(~allowed, 2, 2, 4, "t")
    mask = valid.long()
    hf._key_validity(mask, 2, 2, 4, "t")
    mask[0, 0] = 1  # changed in place after a call: not served from the per-forward memo
    assert hf._key_validity(mask, 2, 2, 4, "t") is None
    with pytest.raises(ValueError, match="expected"):
        hf._key_validity(valid, 2, 2, 5, "t")
    with pytest.raises(ValueError, match="unsupported attention mask"):
        hf._key_validity(object(), 2, 2, 4, "t")


def test_cache_mixing_refused():
    model = stock("llama", "default")
    ids = tokens(b=1, s=5)
    name = hf.cache_keyword(model)
    with torch.no_grad():
        stale = hf.output_cache(model(ids, use_cache=True))
        hf.patch(model)
        with pytest.raises(ValueError, match="written by an unpatched model"):
            model(ids[:, :1], **{name: stale}, use_cache=True)
        fresh = hf.output_cache(model(ids, use_cache=True))
        hf.unpatch(model)
        with pytest.raises(ValueError, match="un-rotated keys"):
            model(ids[:, :1], **{name: fresh}, use_cache=True)
        hf.patch(model)
        static = StaticCache(config=model.config, max_cache_len=16)
        with pytest.raises(ValueError, match="unsupported cache layer"):
            model(ids, **{name: static}, use_cache=True)


def test_torch_compile_forward():
    """torch.compile (dynamo graph capture; the reference backend's data-dependent steps break the
    graph, which dynamo handles) gives the eager patched logits, with and without padding."""
    model = hf.patch(stock("llama", "dynamic", "sdpa"))
    ids = tokens(b=2, s=24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    expect_plain, expect_pad = logits(model, ids), logits(model, ids, attention_mask=mask)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(logits(compiled, ids), expect_plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(compiled, ids, attention_mask=mask), expect_pad, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------- patch / unpatch
@pytest.mark.parametrize("arch,kind", [("phi3", "longrope"), ("gptj", "dynamic")])
def test_unpatch_restores_exactly(arch, kind):
    model = stock(arch, kind)
    ids = tokens(s=16)  # GPT-J's stock table ends at max_position_embeddings (16 for its dynamic NTK)
    before = logits(model, ids)
    hf.patch(model, backend="torch")
    hf.patch(model)  # re-patching is allowed
    assert hf.is_patched(model)
    assert not torch.equal(logits(model, ids), before)  # patched really runs something else
    hf.unpatch(model)
    assert not hf.is_patched(model)
    assert torch.equal(logits(model, ids), before)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert "prepare_inputs_for_generation" not in model.__dict__


def test_backend_is_used(monkeypatch):
    calls = []
    real = rk.rope_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rk, "rope_attention", spy)
    model = hf.patch(stock("gptj"), backend="torch")
    logits(model, tokens(b=1, s=4))
    assert calls == ["torch", "torch"]


def test_a_broken_kernel_is_caught(monkeypatch):
    """The logits test can fail: a kernel that drops the rotation's sign of one position is caught."""
    real = rk.rope_attention

    def broken(q, k, v, rope, **kwargs):
        kwargs["k_positions"] = kwargs["k_positions"] + (kwargs["k_positions"] == 3).to(kwargs["k_positions"].dtype)
        return real(q, k, v, rope, **kwargs)

    base = stock("llama", "default")
    ids = tokens()
    oracle = logits(oracle_of(base), ids)
    monkeypatch.setattr(rk, "rope_attention", broken)
    out = logits(hf.patch(copy.deepcopy(base)), ids)
    assert not error_check(out, oracle, logits(base, ids), torch.float32).ok


# --------------------------------------------------------------------------------------- transformers drift
def test_cache_keyword_and_no_deprecation_warnings(monkeypatch):
    """Whatever name this transformers release gives the cache (``cache`` from 5.24, ``past_key_values``
    before), ropekern's own calls pass it under that name: no FutureWarning from the renaming shims
    and no deprecation log line from the output aliases."""
    logged = []
    generic = __import__("transformers.utils.generic", fromlist=["logger"])
    if hasattr(generic, "logger"):
        monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: logged.append(msg))
    model = hf.patch(stock("llama", "dynamic"))
    assert hf.cache_keyword(model) == ("cache" if Version(T.__version__) >= Version("5.24") else "past_key_values")
    ids = tokens(b=1, s=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :18], **{hf.cache_keyword(model): cache}, use_cache=True)
        assert hf.output_cache(out) is cache and cache.get_seq_length() == 18
        model(ids[:, 18:], **{hf.cache_keyword(model): cache}, use_cache=True)  # across dynamic NTK's L
        generate(model, ids[:, :6], max_new_tokens=4)
        pcw_generate(stock("llama", "yarn"), [ids[0, :5], ids[0, 5:9]], ids[0, 9:12], 3)
    assert not [m for m in logged if "deprecated" in m]


def test_unknown_forward_signature_refused(monkeypatch):
    """A transformers release that renames the cache keyword (or adds a parameter) is refused at patch
    time, naming the class and the version, instead of running without the cache."""
    model = make_model("llama")
    cls = type(model.model.layers[0].self_attn)

    def renamed(self, hidden_states, position_embeddings, attention_mask=None, kv_cache=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(cls, "forward", renamed)
    with pytest.raises(
        ValueError, match=rf"LlamaAttention.forward in transformers {T.__version__} takes \['kv_cache'\]"
    ):
        hf.patch(model)

    def no_cache(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(cls, "forward", no_cache)
    with pytest.raises(
        ValueError, match=rf"LlamaAttention.forward takes the KV cache under no known keyword.*{T.__version__}"
    ):
        hf.patch(model)
    assert not hf.is_patched(model)


def test_cache_under_unknown_keyword_refused():
    """A cache that reaches a patched module under a keyword no release used is an error, not ignored."""
    model = hf.patch(make_model("llama"))
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 3, 64)
    cos_sin = model.model.rotary_emb(h, torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"received a KV cache under \['kv_cache'\].*known: \['cache'"):
        attn(h, cos_sin, None, kv_cache=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="passed twice"):
        attn(h, cos_sin, None, cache=DynamicCache(), past_key_values=DynamicCache())
    cache = DynamicCache(config=model.config)
    for name in ("past_key_values", "cache"):  # either name reaches the cache: old callers and new
        attn(h, cos_sin, None, **{name: cache})
    assert cache.layers[0].positions.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_reset_empties_the_layer():
    """UnrotatedLayer.reset leaves an empty layer whatever DynamicLayer.reset does (5.17 zeroes the
    keys in place and keeps their length), so a recompute starts from nothing."""
    layer = hf.UnrotatedLayer()
    k = torch.randn(1, 2, 4, 8)
    layer.update(k, k, positions=torch.arange(4)[None])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.positions is None
    layer.update(k[:, :, :1], k[:, :, :1], positions=torch.tensor([[7]]))
    assert layer.keys.shape[2] == 1 and layer.positions.tolist() == [[7]]


# --------------------------------------------------------------------------------------- refusals
def test_refusals():
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn' \(MistralAttention\) uses a sliding window"):
        config = T.MistralConfig(**LLAMA_LIKE, **COMMON)  # sliding_window defaults to 4096
        hf.patch(T.MistralForCausalLM(config))
    qwen = T.Qwen2Config(**LLAMA_LIKE, use_sliding_window=True, sliding_window=8, max_window_layers=0, **COMMON)
    with pytest.raises(ValueError, match="sliding_attention"):
        hf.patch(T.Qwen2ForCausalLM(qwen))

    class MyAttention(T.models.llama.modeling_llama.LlamaAttention):
        pass

    model = make_model("llama")
    model.model.layers[1].self_attn = MyAttention(model.config, 1)
    with pytest.raises(ValueError, match=r"unsupported attention module 'model.layers.1.self_attn'"):
        hf.patch(model)
    gemma = T.Gemma2Config(**LLAMA_LIKE, head_dim=16, **COMMON)
    with pytest.raises(ValueError, match="softcapping"):
        hf.patch(T.Gemma2ForCausalLM(gemma))
    with pytest.raises(TypeError, match="`model` must be a transformers"):
        hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        hf.patch(make_model("llama"), backend="nope")

    model = make_model("gptj")
    attn = model.transformer.h[0].attn
    for name in ("scaling", "scale_attn"):  # GPT-J's two layouts (5.24 changed it): neither complete
        attn.__dict__.pop(name, None)
    with pytest.raises(
        ValueError, match=rf"'transformer.h.0.attn' \(GPTJAttention\) lacks .*transformers {T.__version__}"
    ):
        hf.patch(model)

    model = make_model("llama")
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn' uses attention sinks"):
        hf.patch(model)
    model = make_model("llama")
    model.config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    with pytest.raises(ValueError, match="per-layer-type rope_parameters"):
        hf.patch(model)
    model = make_model("llama")
    model.config.rope_parameters["rope_theta"] = 500000.0  # config edited after the tables were built
    with pytest.raises(ValueError, match="inv_freq.*read differently"):
        hf.patch(model)


def test_forward_refusals():
    model = hf.patch(make_model("llama"))
    ids = tokens(b=2, s=6)
    with pytest.raises(ValueError, match="output_attentions"):
        logits(model, ids, output_attentions=True)
    packed = torch.cat([torch.arange(3), torch.arange(3)])[None]  # two packed documents
    with pytest.raises(ValueError, match="not causal \\+ padding"):
        logits(model, ids[:1], position_ids=packed, use_cache=False)  # stock then masks per document
    attn = model.model.layers[0].self_attn  # directly: 5.17's stock rotary fails first on 3-D ids
    h = torch.randn(2, 6, 64)
    with pytest.raises(ValueError, match="multimodal"):
        attn(h, None, None, position_ids=torch.zeros(3, 2, 6, dtype=torch.long))
    model.config.attention_dropout = 0.1
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="dropout in training"):
        model(ids)


# --------------------------------------------------------------------------------------- extend_context
def test_extend_context_sets_config_and_stock_tables():
    """extend_context's rebuilt stock tables equal those transformers builds from a config that
    carries the scaling from the start (an independent check of the test baselines above)."""
    model = make_model("llama")
    hf.extend_context(model, {"rope_type": "yarn", "factor": 4.0})
    assert hf.is_patched(model)
    assert model.config.max_position_embeddings == 256
    assert model.config.rope_parameters["original_max_position_embeddings"] == 64
    assert hf.rope_config(model).rope_type == "yarn"
    native = T.LlamaConfig(**LLAMA_LIKE, **{**COMMON, "max_position_embeddings": 256})
    native.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 64}  # fmt: skip
    ref = T.models.llama.modeling_llama.LlamaRotaryEmbedding(native)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.inv_freq)
    assert model.model.rotary_emb.attention_scaling == ref.attention_scaling

    phi = make_model("phi3")  # Phi-3: the top-level original_max_position_embeddings is the original
    half = rotary_half("phi3")
    hf.extend_context(phi, {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [4.0] * half,
                            "factor": 8.0})  # fmt: skip
    assert phi.config.max_position_embeddings == 128
    assert hf.rope_config(phi).scaling["original_max_position_embeddings"] == 16

    dyn = make_model("gpt_neox")
    hf.extend_context(dyn, {"rope_type": "dynamic", "factor": 2.0})
    assert dyn.config.max_position_embeddings == 64  # dynamic NTK's L is unchanged


def test_extend_context_errors_leave_model_unchanged():
    model = make_model("llama")
    before = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    with pytest.raises(ValueError, match="scaling.factor"):
        hf.extend_context(model, {"rope_type": "yarn"})
    with pytest.raises(ValueError, match="rope_type"):
        hf.extend_context(model, {"rope_type": "wavy", "factor": 2.0})
    with pytest.raises(TypeError, match="`scaling` must be a dict"):
        hf.extend_context(model, "yarn")
    assert json.dumps(model.config.to_dict(), sort_keys=True, default=str) == before
    assert not hf.is_patched(model)


# --------------------------------------------------------------------------------------- CLI, docs
def test_check_model_cli(tmp_path, capsys, monkeypatch):
    model = stock("gptj")
    model.save_pretrained(tmp_path / "gptj")
    assert cli.main(["check-model", str(tmp_path / "gptj"), "--length", "20", "--decode", "4"]) == 0
    out = capsys.readouterr().out
    assert "interleaved" in out and "verdict: PASS" in out

    T.MistralForCausalLM(T.MistralConfig(**LLAMA_LIKE, **COMMON)).save_pretrained(tmp_path / "mistral")
    assert cli.main(["check-model", str(tmp_path / "mistral")]) == 1
    assert "sliding window" in capsys.readouterr().out
    assert cli.main(["check-model", str(tmp_path / "missing")]) == 2

    real = rk.rope_attention

    def noisy(*args, **kwargs):  # a kernel 1e-3 off, in the test dtype only (the fp64 oracle stays exact)
        out = real(*args, **kwargs)
        return out if out.dtype == torch.float64 else out + 1e-3 * torch.randn_like(out)

    monkeypatch.setattr(rk, "rope_attention", noisy)
    assert cli.main(["check-model", str(tmp_path / "gptj"), "--length", "20", "--decode", "4"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cached_vs_recompute_example(capsys):
    """examples/hf_cached_vs_recompute.py (the numbers quoted in docs/hf.md) runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "hf_cached_vs_recompute.py"
    spec = importlib.util.spec_from_file_location("hf_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("recompute" in line for line in lines)


def test_docs_example_runs():
    """Every ```python block of docs/hf.md, run as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "hf.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/hf.md", "exec"), namespace)
