"""ropekern.eval: passkey generator/scorer round trip, teacher-forced scoring, perplexities."""

import math
import re

import pytest
import torch

from ropekern.eval import (
    PasskeySample,
    PasskeyTemplate,
    answer_nll,
    needle_perplexity,
    passkey_accuracy,
    passkey_sample,
    passkey_samples,
    passkey_scores,
    score_passkey,
    sliding_window_perplexity,
)


class Words:
    """Word-level tokenizer with an HF-like encode(text, add_special_tokens=...) signature."""

    def __init__(self):
        self.vocab = ["<unk>"]
        self.index = {"<unk>": 0}

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # the generator must not ask for a BOS mid-prompt
        out = []
        for w in re.findall(r"\d|\w+|[^\s\w]", text):
            if w not in self.index:
                self.index[w] = len(self.vocab)
                self.vocab.append(w)
            out.append(self.index[w])
        return out

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)


def chars(text):
    """A bare callable tokenizer: one id per byte."""
    return list(text.encode())


@pytest.mark.parametrize("tokenizer", [Words(), chars], ids=["words", "bytes"])
@pytest.mark.parametrize("length", [80, 129, 1000])
def test_exact_length_and_layout(tokenizer, length):
    if tokenizer is chars:
        length *= 4
    depths = [0.0, 0.3, 1.0]
    samples = passkey_samples(tokenizer, length, depths, 2, seed=3)
    assert [s.depth for s in samples] == [0.0, 0.0, 0.3, 0.3, 1.0, 1.0]
    enc = tokenizer.encode if hasattr(tokenizer, "encode") else tokenizer
    kw = {"add_special_tokens": False} if hasattr(tokenizer, "encode") else {}
    t = PasskeyTemplate()
    prefix, question = enc(t.prefix, **kw), enc(t.question, **kw)
    for s in samples:
        assert isinstance(s, PasskeySample) and s.length == length == len(s.full_ids)
        assert len(s.passkey) == 5 and s.passkey[0] != "0"
        needle = enc(t.needle.format(passkey=s.passkey), **kw)
        assert s.answer_ids == enc(t.answer.format(passkey=s.passkey), **kw)
        assert s.input_ids[: len(prefix)] == prefix and s.input_ids[-len(question) :] == question
        assert s.input_ids[s.needle_start : s.needle_start + len(needle)] == needle
    n_filler = length - len(prefix) - len(needle) - len(question) - len(samples[0].answer_ids)
    assert samples[0].needle_start == len(prefix)  # depth 0: right after the prefix
    assert samples[-1].needle_start == len(prefix) + n_filler  # depth 1: right before the question
    assert samples[2].needle_start == len(prefix) + round(0.3 * n_filler)


def test_text_round_trip():
    tok = Words()
    s = passkey_sample(tok, 200, 0.5, passkey=71432)
    text = tok.decode(s.input_ids)
    assert "The pass key is 7 1 4 3 2 . Remember it . 7 1 4 3 2 is the pass key ." in text
    assert text.startswith("There is an important info hidden")
    assert text.endswith("What is the pass key ? The pass key is")
    assert score_passkey(s, " 71432.") and score_passkey(s, "71432 is the pass key")
    assert not score_passkey(s, "7143") and not score_passkey(s, "no idea") and not score_passkey(s, "171432")
    assert score_passkey(s, s.answer_ids) and score_passkey(s, torch.tensor(s.answer_ids + [5]))
    assert not score_passkey(s, s.answer_ids[:-1])
    assert score_passkey(s, tok.encode(" 7 1 4 3 2", add_special_tokens=False), tokenizer=type("T", (), {
        "decode": staticmethod(lambda ids: "".join(tok.vocab[i] for i in ids))})())  # fmt: skip
    # The PI paper's text form with whole filler repeats.
    assert PasskeyTemplate().text("42", 1, 0).count("The grass is green") == 1


def test_determinism():
    tok = Words()
    a = passkey_samples(tok, [100, 150], [0.2, 0.8], 3, seed=7)
    b = passkey_samples(tok, [100, 150], [0.2, 0.8], 3, seed=7)
    c = passkey_samples(tok, [100, 150], [0.2, 0.8], 3, seed=8)
    assert a == b and [s.passkey for s in a] != [s.passkey for s in c]
    assert len({s.passkey for s in a}) > 1
    assert passkey_sample(tok, 100, 0.5, seed=1) == passkey_sample(tok, 100, 0.5, seed=1)
    assert all(len(s.passkey) == 3 for s in passkey_samples(tok, 100, 0.5, 20, digits=3))


def oracle_fn(strength=30.0, vocab=64):
    """A 'model' that reads the future: puts `strength` on the true next token (the last row's
    prediction is arbitrary)."""

    def fn(ids):
        logits = torch.zeros(*ids.shape, vocab)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], strength)
        return logits

    return fn


def test_teacher_forced_scores():
    tok = Words()
    samples = passkey_samples(tok, [90, 120], [0.0, 0.5, 1.0], 2, seed=0)
    vocab = 64
    assert max(max(s.full_ids) for s in samples) < vocab
    assert passkey_accuracy(oracle_fn(vocab=vocab), samples, batch_size=4) == 1.0
    assert needle_perplexity(oracle_fn(vocab=vocab), samples) == pytest.approx(1.0, abs=1e-9)
    uniform = lambda ids: torch.zeros(*ids.shape, vocab)  # noqa: E731
    assert needle_perplexity(uniform, samples) == pytest.approx(vocab, rel=1e-6)
    total, count = answer_nll(uniform, samples)
    assert count == 5 * len(samples) and total == pytest.approx(count * math.log(vocab), rel=1e-6)

    def wrong_last(ids):  # right on every answer token but the last
        logits = oracle_fn(vocab=vocab)(ids)
        logits[:, -2] = 0.0
        logits[torch.arange(ids.shape[0]), -2, (ids[:, -1] + 1) % vocab] = 30.0
        return logits

    scores = passkey_scores(wrong_last, samples, batch_size=3)
    assert all(not s.correct and s.token_accuracy == pytest.approx(0.8) for s in scores)
    assert all(s.n_tokens == 5 and s.nll > 20 for s in scores)

    class Output:  # transformers-style output objects are unwrapped
        def __init__(self, logits):
            self.logits = logits

    assert passkey_accuracy(lambda ids: Output(oracle_fn(vocab=vocab)(ids)), samples) == 1.0
    # Logits of the last k positions only (transformers' logits_to_keep) score the same, down to the nll.
    for k in (6, 16):
        tail = passkey_scores(lambda ids, k=k: wrong_last(ids)[:, -k:], samples, batch_size=3)
        assert tail == scores
    with pytest.raises(ValueError, match=r"with 6 <= k <= S"):
        passkey_scores(lambda ids: wrong_last(ids)[:, -5:], samples)  # one position short of the answer


def test_batches_keep_sample_order():
    tok = Words()
    samples = passkey_samples(tok, [130, 90, 110], [0.5], 3, seed=0)
    seen = []

    def fn(ids):
        seen.append(tuple(ids.shape))
        return oracle_fn(vocab=64)(ids)

    scores = passkey_scores(fn, samples, batch_size=2)
    assert len(scores) == len(samples) and all(s.correct for s in scores)
    assert sorted(seen) == [(1, 90), (1, 110), (1, 130), (2, 90), (2, 110), (2, 130)]


def ngram_fn(context, vocab=13, seed=0):
    """A causal model that reads exactly the last `context` tokens (fewer at the window start)."""
    table = torch.randn(4096, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def fn(ids):
        b, s = ids.shape
        key = torch.zeros(b, s, dtype=torch.int64)
        for j in range(context):
            shifted = torch.full((b, s), vocab, dtype=torch.int64)  # 'no token' marker
            shifted[:, j:] = ids[:, : s - j]
            key = key * (vocab + 1) + shifted
        return table[key % 4096]

    return fn


def test_sliding_window_scores_every_token_once():
    tokens = torch.randint(0, 13, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    bigram = ngram_fn(1)
    full = needle_perplexity(bigram, [(tokens[:1], tokens[1:])])  # one pass over everything
    for window, stride in [(2, 1), (16, 5), (64, 63), (64, 32), (299, 100), (512, 256)]:
        got = sliding_window_perplexity(bigram, tokens, window=window, stride=stride, batch_size=3)
        assert got == pytest.approx(full, rel=1e-9), (window, stride)
    # With window - stride >= the model's context, every token sees all it can use.
    trigram = ngram_fn(3)
    full3 = needle_perplexity(trigram, [(tokens[:1], tokens[1:])])
    assert sliding_window_perplexity(trigram, tokens, window=40, stride=37) == pytest.approx(full3, rel=1e-9)
    assert sliding_window_perplexity(trigram, tokens, window=40, stride=39) != pytest.approx(full3, rel=1e-6)
    assert sliding_window_perplexity(lambda ids: torch.zeros(*ids.shape, 13), tokens, window=50) == pytest.approx(13)


def test_sliding_window_calls():
    calls = []

    def fn(ids):
        calls.append(ids[0].tolist())
        return torch.zeros(*ids.shape, 100)

    sliding_window_perplexity(fn, torch.arange(100), window=30)  # default stride 15
    assert sorted(c[0] for c in calls) == [0, 15, 30, 45, 60, 75]
    assert all(len(c) <= 30 for c in calls) and max(c[-1] for c in calls) == 99


def test_errors():
    tok = Words()
    with pytest.raises(ValueError, match="shorter than the prompt"):
        passkey_sample(tok, 40, 0.5)
    with pytest.raises(ValueError, match="`depth`"):
        passkey_sample(tok, 100, 1.5)
    with pytest.raises(ValueError, match="`length`"):
        passkey_samples(tok, [100, -1], 0.5, 1)
    with pytest.raises(ValueError, match="`passkey`"):
        passkey_sample(tok, 100, 0.5, passkey="12a")
    with pytest.raises(ValueError, match="`digits`"):
        passkey_samples(tok, 100, 0.5, 1, digits=0)
    with pytest.raises(ValueError, match="`n`"):
        passkey_samples(tok, 100, 0.5, 0)
    with pytest.raises(TypeError, match="`tokenizer`"):
        passkey_sample(42, 100, 0.5)
    with pytest.raises(ValueError, match="must contain '\\{passkey\\}'"):
        PasskeyTemplate(needle="no key here")
    samples = passkey_samples(tok, 100, 0.5, 2)
    with pytest.raises(ValueError, match="returned shape"):
        passkey_accuracy(lambda ids: torch.zeros(3, 4), samples)
    with pytest.raises(TypeError, match="must return a tensor"):
        passkey_accuracy(lambda ids: ids.tolist(), samples)
    with pytest.raises(ValueError, match="`batch_size`"):
        passkey_accuracy(oracle_fn(), samples, batch_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        passkey_accuracy(oracle_fn(), [])
    with pytest.raises(TypeError, match="PasskeySample"):
        score_passkey("x", "1")
    with pytest.raises(TypeError, match="pairs"):
        needle_perplexity(oracle_fn(), [1, 2])
    with pytest.raises(ValueError, match="`stride`"):
        sliding_window_perplexity(oracle_fn(), list(range(10)), window=4, stride=4)
    with pytest.raises(ValueError, match="`window`"):
        sliding_window_perplexity(oracle_fn(), list(range(10)), window=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_window_perplexity(oracle_fn(), [3], window=4)
    with pytest.raises(TypeError, match="integer"):
        sliding_window_perplexity(oracle_fn(), [1.0, 2.0], window=4)
