"""Passkey retrieval in the Position Interpolation paper's format (Chen et al. 2023, §3.2).

A random number (the passkey) is hidden at a chosen depth in repeated filler; after a question the
model must produce it::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.
    I will quiz you about the important information there. The grass is green. The sky is blue.
    The sun is yellow. Here we go. There and back again. (repeated x times) The pass key is 71432.
    Remember it. 71432 is the pass key. The grass is green. ... (repeated y times)
    What is the pass key? The pass key is 71432

Samples are built in token space so that their length is exact for any tokenizer: the pieces are
encoded separately and the filler is repeated and cut token by token. A sample of ``length`` L is
``input_ids`` (the prompt) followed by ``answer_ids``, L tokens in all, so scoring it by teacher
forcing feeds a model positions 0..L-1. Teacher-forced exact match (every answer token is the
arg-max) is the same event as greedy decoding reproducing the answer, at the cost of one forward.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._common import LogitsFn, as_encoder, as_token_ids, batches_by_length, call_logits

__all__ = [
    "PasskeyTemplate",
    "PasskeySample",
    "PasskeyScore",
    "passkey_sample",
    "passkey_samples",
    "score_passkey",
    "passkey_scores",
    "passkey_accuracy",
]


@dataclass(frozen=True)
class PasskeyTemplate:
    """The text pieces of a passkey prompt (defaults: the PI paper's wording).

    ``needle`` and ``answer`` contain ``{passkey}``. Pieces after the prefix start with a space so
    that sub-word tokenizers (SentencePiece, BPE) see word starts when pieces are encoded apart.
    """

    prefix: str = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there."
    )
    filler: str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    needle: str = " The pass key is {passkey}. Remember it. {passkey} is the pass key."
    question: str = " What is the pass key? The pass key is"
    answer: str = " {passkey}"

    def __post_init__(self) -> None:
        for name in ("prefix", "filler", "needle", "question", "answer"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"PasskeyTemplate: `{name}` must be a str")
        for name in ("needle", "answer"):
            if "{passkey}" not in getattr(self, name):
                raise ValueError(f"PasskeyTemplate: `{name}` must contain '{{passkey}}'")

    def text(self, passkey: str, n_before: int, n_after: int) -> str:
        """The prompt as text with whole filler repeats (the PI paper's x and y)."""
        return (
            self.prefix
            + self.filler * n_before
            + self.needle.format(passkey=passkey)
            + self.filler * n_after
            + self.question
        )


@dataclass(frozen=True)
class PasskeySample:
    """One passkey prompt in token ids.

    ``input_ids`` is the prompt (ends with the question), ``answer_ids`` the tokens the model must
    produce; ``length == len(input_ids) + len(answer_ids)``. ``needle_start`` is the index of the
    needle's first token in ``input_ids``; ``depth`` the requested fraction of filler before it.
    """

    input_ids: list[int]
    answer_ids: list[int]
    passkey: str
    length: int
    depth: float
    needle_start: int

    @property
    def full_ids(self) -> list[int]:
        """Prompt followed by the answer: what teacher-forced scoring feeds the model."""
        return self.input_ids + self.answer_ids


@dataclass(frozen=True)
class PasskeyScore:
    """Teacher-forced score of one sample: exact match, fraction of answer tokens that are the
    arg-max, and the answer's summed negative log-likelihood (nats) over ``n_tokens`` tokens."""

    correct: bool
    token_accuracy: float
    nll: float
    n_tokens: int


class _Pieces:
    """Encoded template pieces, shared by all samples of one tokenizer."""

    def __init__(self, encode: Callable[[str], list[int]], template: PasskeyTemplate):
        self.encode, self.template = encode, template
        self.prefix = encode(template.prefix)
        self.filler = encode(template.filler)
        self.question = encode(template.question)
        if not self.filler:
            raise ValueError("passkey: the filler text encodes to no tokens")

    def sample(self, length: int, depth: float, passkey: str) -> PasskeySample:
        needle = self.encode(self.template.needle.format(passkey=passkey))
        answer = self.encode(self.template.answer.format(passkey=passkey))
        if not answer:
            raise ValueError("passkey: the answer encodes to no tokens")
        fixed = len(self.prefix) + len(needle) + len(self.question) + len(answer)
        n_filler = length - fixed
        if n_filler < 0:
            raise ValueError(f"passkey: `length` {length} is shorter than the prompt without filler ({fixed} tokens)")
        before = int(math.floor(depth * n_filler + 0.5))
        # Both filler runs start at the beginning of the filler sentence, as in the PI prompt.
        prompt = self.prefix + _cycle(self.filler, before) + needle + _cycle(self.filler, n_filler - before)
        prompt += self.question
        return PasskeySample(prompt, answer, passkey, length, float(depth), len(self.prefix) + before)


def _cycle(unit: list[int], n: int) -> list[int]:
    reps = -(-n // len(unit))
    return (unit * reps)[:n]


def _check_length(length: Any) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"passkey: `length` must be a positive int, got {length!r}")
    return length


def _check_depth(depth: Any) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"passkey: `depth` must be a number in [0, 1], got {depth!r}")
    return float(depth)


def _check_digits(digits: Any) -> int:
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 18:
        raise ValueError(f"passkey: `digits` must be an int in [1, 18], got {digits!r}")
    return digits


def _random_passkey(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1))


def passkey_sample(
    tokenizer: Any,
    length: int,
    depth: float,
    passkey: str | int | None = None,
    *,
    digits: int = 5,
    seed: int = 0,
    template: PasskeyTemplate | None = None,
) -> PasskeySample:
    """One passkey sample of exactly ``length`` tokens (prompt + answer).

    Args:
        tokenizer: an object with ``encode(text)`` (e.g. a transformers tokenizer) or a callable
            text -> token ids.
        length: total tokens, prompt plus answer (the positions a teacher-forced pass uses).
        depth: fraction of the filler placed before the needle, in [0, 1] (0: right after the
            prefix, 1: right before the question).
        passkey: the number to hide; default a random ``digits``-digit number drawn from ``seed``.
        template: the prompt wording (default: the PI paper's).
    Raises ``ValueError`` when ``length`` cannot hold the prompt without filler.
    """
    template = template or PasskeyTemplate()
    if passkey is None:
        passkey = _random_passkey(random.Random(seed), _check_digits(digits))
    passkey = str(passkey)
    if not passkey.isdigit():
        raise ValueError(f"passkey: `passkey` must be a non-negative integer, got {passkey!r}")
    return _Pieces(as_encoder(tokenizer), template).sample(_check_length(length), _check_depth(depth), passkey)


def passkey_samples(
    tokenizer: Any,
    lengths: int | Iterable[int],
    depths: float | Iterable[float],
    n: int,
    *,
    digits: int = 5,
    seed: int = 0,
    template: PasskeyTemplate | None = None,
) -> list[PasskeySample]:
    """``n`` samples for every (length, depth) pair, ordered by length, depth, then index.

    Passkeys are random ``digits``-digit numbers (no leading zero) from ``random.Random(seed)``:
    the same arguments always give the same samples.
    """
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    depths = [depths] if isinstance(depths, (int, float)) else list(depths)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"passkey: `n` must be a positive int, got {n!r}")
    if not lengths or not depths:
        raise ValueError("passkey: `lengths` and `depths` must not be empty")
    digits = _check_digits(digits)
    pieces = _Pieces(as_encoder(tokenizer), template or PasskeyTemplate())
    rng = random.Random(seed)
    out = []
    for length in lengths:
        length = _check_length(length)
        for depth in depths:
            depth = _check_depth(depth)
            out.extend(pieces.sample(length, depth, _random_passkey(rng, digits)) for _ in range(n))
    return out


def score_passkey(sample: PasskeySample, output: str | Sequence[int] | torch.Tensor, tokenizer: Any = None) -> bool:
    """Whether a model's continuation ``output`` gives the passkey.

    Text output: its first run of digits must equal the passkey (``"71432."`` and ``" 71432 is"``
    count, ``"7143"`` does not). Token ids: decoded with ``tokenizer.decode`` when a tokenizer is
    given and scored as text; otherwise they must begin with ``sample.answer_ids``.
    """
    if not isinstance(sample, PasskeySample):
        raise TypeError(f"`sample` must be a PasskeySample, got {type(sample).__name__}")
    if not isinstance(output, str):
        ids = as_token_ids("output", output)
        if tokenizer is None:
            return ids[: len(sample.answer_ids)] == sample.answer_ids
        if not hasattr(tokenizer, "decode"):
            raise TypeError("`tokenizer` must have a decode(ids) method to score token ids as text")
        output = tokenizer.decode(ids)
    match = re.search(r"\d+", output)
    return bool(match) and match.group() == sample.passkey


def passkey_scores(logits_fn: LogitsFn, samples: Sequence[PasskeySample], *, batch_size: int = 8) -> list[PasskeyScore]:
    """Teacher-forced scores, one per sample (same order).

    ``logits_fn(input_ids int64 [b, L]) -> logits [b, L, V]`` (or an object with ``.logits``), where
    ``logits[:, i]`` predicts token ``i + 1``; input ids are on the CPU (move them in ``logits_fn``).
    Only the last positions are read, so ``logits_fn`` may return just the last ``k`` of them
    (``k`` >= the answer's length + 1), e.g. ``model(ids, logits_to_keep=16).logits``: that keeps
    long prompts from materialising ``[b, L, V]``. Samples of equal length are batched,
    ``batch_size`` at a time, under ``torch.no_grad``.
    """
    rows = [s.full_ids for s in _samples(samples)]
    scores: list[PasskeyScore | None] = [None] * len(rows)
    with torch.no_grad():
        for idx, ids in batches_by_length(rows, batch_size):
            n_read = 1 + max(len(samples[i].answer_ids) for i in idx)
            logp = torch.log_softmax(call_logits(logits_fn, ids, last=n_read), dim=-1).cpu()
            for row, i in enumerate(idx):
                n_ans = len(samples[i].answer_ids)
                pred = logp[row, n_read - n_ans - 1 : -1]  # predictions of the answer tokens
                target = ids[row, ids.shape[1] - n_ans :]
                hits = pred.argmax(-1) == target
                nll = -pred.gather(-1, target[:, None]).sum()
                scores[i] = PasskeyScore(bool(hits.all()), float(hits.float().mean()), float(nll), n_ans)
    return scores  # type: ignore[return-value]


def passkey_accuracy(logits_fn: LogitsFn, samples: Sequence[PasskeySample], *, batch_size: int = 8) -> float:
    """Fraction of samples whose whole passkey is reproduced (teacher-forced exact match)."""
    scores = passkey_scores(logits_fn, samples, batch_size=batch_size)
    return sum(s.correct for s in scores) / len(scores)


def _samples(samples: Any) -> Sequence[PasskeySample]:
    if not isinstance(samples, Sequence) or not samples:
        raise ValueError("`samples` must be a non-empty sequence of PasskeySample")
    for s in samples:
        if not isinstance(s, PasskeySample):
            raise TypeError(f"`samples` must contain PasskeySample objects, got {type(s).__name__}")
    return samples
