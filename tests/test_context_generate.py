"""pcw_generate / nbce_generate on a tiny random LlamaForCausalLM against direct step-by-step oracles.

The oracles never use ropekern: the stock (unpatched) transformers model recomputes the whole sequence
at every step. PCW's oracle is one dense sequence [window_1 | ... | window_W | task tokens] with
position ids [0..n_1-1, ..., 0..n_W-1, max n_w, ...] and a custom 4-D mask (each window causal within
itself, task tokens see every window and causally each other); NBCE's runs each row unpadded and
combines the last logits with ``nbce_combine``. ``initializer_range=0.2`` keeps logits far apart, so
greedy tokens test the method rather than floating-point ties.
"""

import pytest
import torch
import transformers as T

from ropekern.context import nbce_combine, nbce_generate, pcw_generate
from ropekern.integrations import hf

from cases import TINY_LLAMA, TINY_MODEL

VOCAB = TINY_MODEL["vocab_size"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(attn: str = "eager", seed: int = 0, **over):
    config = T.LlamaConfig(**{**TINY_MODEL, **TINY_LLAMA, **over})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config).eval()


def rand_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def pcw_oracle(model, windows, prompt, steps):
    """Greedy PCW by full recomputation with a dense custom mask (stock model, no cache)."""
    lengths = [len(w) for w in windows]
    n_ctx, start = sum(lengths), max(lengths)
    task = list(prompt)
    out, scores = [], []
    for _ in range(steps):
        s = n_ctx + len(task)
        allowed = torch.zeros(s, s, dtype=torch.bool)
        off = 0
        for n in lengths:
            allowed[off : off + n, off : off + n] = torch.ones(n, n).tril().bool()
            off += n
        allowed[n_ctx:, :n_ctx] = True
        allowed[n_ctx:, n_ctx:] = torch.ones(len(task), len(task)).tril().bool()
        mask = torch.zeros(1, 1, s, s).masked_fill(~allowed, torch.finfo(torch.float32).min)
        pos = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(start, start + len(task))])
        ids = torch.cat([torch.as_tensor(w) for w in windows] + [torch.tensor(task)])
        logits = model(input_ids=ids[None], attention_mask=mask, position_ids=pos[None]).logits[0, -1]
        scores.append(torch.log_softmax(logits, -1))
        task.append(int(logits.argmax()))
        out.append(task[-1])
    return out, torch.stack(scores)


@torch.no_grad()
def nbce_oracle(model, contexts, prompt, steps, beta=0.25, pooling="min_entropy"):
    """Greedy NBCE: every row recomputed unpadded each step, rows combined with nbce_combine."""
    rows = [list(prompt)] + [list(c) + list(prompt) for c in contexts]
    out, scores = [], []
    for _ in range(steps):
        last = torch.stack([model(torch.tensor(r)[None]).logits[0, -1] for r in rows])
        combined = nbce_combine(last, beta=beta, pooling=pooling)
        token = int(combined.argmax())
        scores.append(combined)
        out.append(token)
        rows = [r + [token] for r in rows]
    return out, torch.stack(scores)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pcw_single_window_is_ordinary_generation(attn):
    model = tiny_llama(attn)
    window, prompt = rand_ids(13, 1), rand_ids(5, 2)
    with torch.no_grad():
        expected = model.generate(
            torch.cat([window, prompt])[None], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, 18:]
    got = pcw_generate(model, [window], prompt, 12)
    assert torch.equal(got, expected)
    assert len(set(got.tolist())) > 6  # the tokens vary: this tests the model, not a fixed point
    assert not hf.is_patched(model)  # patched for the call only


@pytest.mark.parametrize("lengths", [(9, 4, 13), (1, 17)])
def test_pcw_matches_dense_mask_oracle(lengths):
    model = tiny_llama()
    windows = [rand_ids(n, 10 + i).tolist() for i, n in enumerate(lengths)]
    prompt = rand_ids(4, 3).tolist()
    expected, expected_scores = pcw_oracle(model, windows, prompt, 8)
    got, scores = pcw_generate(model, windows, prompt, 8, return_scores=True)
    assert got.tolist() == expected
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=2e-4)
    # windows are exchangeable: same positions, and attention is a set operation over keys
    assert pcw_generate(model, windows[::-1], prompt, 8).tolist() == expected


def test_pcw_on_patched_model_and_yarn():
    model = tiny_llama()
    hf.extend_context(model, {"rope_type": "yarn", "factor": 2.0})
    windows, prompt = [rand_ids(11, 4), rand_ids(6, 5)], rand_ids(3, 6)
    got = pcw_generate(model, windows, prompt, 6)
    assert hf.is_patched(model)  # left as it was
    hf.unpatch(model)  # the oracle runs stock transformers' own YaRN
    assert got.tolist() == pcw_oracle(model, [w.tolist() for w in windows], prompt.tolist(), 6)[0]


def test_pcw_refuses_length_dependent_rope():
    model = tiny_llama()
    hf.extend_context(model, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="depends on the sequence length"):
        pcw_generate(model, [[3, 4]], [5], 2)


@pytest.mark.parametrize("pooling", ["min_entropy", "mean"])
def test_nbce_generate_matches_step_by_step_formula(pooling):
    model = tiny_llama()
    contexts = [rand_ids(n, 20 + n).tolist() for n in (7, 15, 2)]
    prompt = rand_ids(4, 7).tolist()
    expected, expected_scores = nbce_oracle(model, contexts, prompt, 8, beta=0.25, pooling=pooling)
    got, scores = nbce_generate(model, contexts, prompt, 8, pooling=pooling, return_scores=True)
    assert got.tolist() == expected
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=2e-4)
    assert not hf.is_patched(model)


def test_sampling_eos_and_zero_tokens():
    model = tiny_llama()
    windows, prompt = [rand_ids(5, 1), rand_ids(8, 2)], rand_ids(3, 3)
    a = pcw_generate(model, windows, prompt, 6, do_sample=True, top_k=20, top_p=0.9, temperature=0.7,
                     generator=torch.Generator().manual_seed(5))  # fmt: skip
    b = pcw_generate(model, windows, prompt, 6, do_sample=True, top_k=20, top_p=0.9, temperature=0.7,
                     generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(a, b) and a.shape == (6,)
    greedy = pcw_generate(model, windows, prompt, 6)
    stopped = pcw_generate(model, windows, prompt, 6, eos_token_id=int(greedy[2]))
    assert stopped.tolist() == greedy[:3].tolist()
    assert pcw_generate(model, windows, prompt, 0).shape == (0,)
    n = nbce_generate(model, windows, prompt, 5, eos_token_id=[int(x) for x in range(VOCAB)])
    assert n.shape == (1,)  # every token is an EOS: stop after the first


def test_errors():
    model = tiny_llama()
    with pytest.raises(TypeError, match="model"):
        pcw_generate("gpt2", [[3]], [4], 2)
    with pytest.raises(ValueError, match="window_ids"):
        pcw_generate(model, [], [4], 2)
    with pytest.raises(ValueError, match=r"window_ids\[1\]"):
        pcw_generate(model, [[3], []], [4], 2)
    with pytest.raises(TypeError, match="window_ids"):
        pcw_generate(model, torch.tensor([[3, 4]]), [4], 2)
    with pytest.raises(ValueError, match="prompt_ids"):
        nbce_generate(model, [[3]], [], 2)
    with pytest.raises(TypeError, match="prompt_ids"):
        nbce_generate(model, [[3]], [4.0], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pcw_generate(model, [[3]], [4], -1)
    with pytest.raises(TypeError, match="num_beams"):
        pcw_generate(model, [[3]], [4], 2, num_beams=2)
    with pytest.raises(ValueError, match="temperature"):
        nbce_generate(model, [[3]], [4], 2, temperature=0)
    with pytest.raises(ValueError, match="pooling"):
        nbce_generate(model, [[3]], [4], 2, pooling="median")
    with pytest.raises(ValueError, match="beta"):
        nbce_generate(model, [[3]], [4], 2, beta=-1.0)
    assert not hf.is_patched(model)


def test_searched_longrope_factors_go_into_extend_context():
    """A longrope_search result is a scaling dict hf.extend_context accepts for the model it was searched for."""
    from ropekern.search import longrope_search

    model = tiny_llama()  # head_dim 16: 8 frequencies, pretrained length 64
    rope = hf.rope_config(hf.patch(model))
    hf.unpatch(model)
    scaling = longrope_search(
        lambda s: sum(abs(f - 3.0) for f in s["long_factor"]), rope, 256, generations=1, population=4, progress=False
    )
    hf.extend_context(model, scaling)
    got = hf.rope_config(model)
    assert got.rope_type == "longrope" and model.config.max_position_embeddings == 256
    assert list(got.scaling["long_factor"]) == scaling["long_factor"]
    with torch.no_grad():
        assert torch.isfinite(model(rand_ids(100, 1)[None]).logits).all()
