"""NBCE (ropekern.context.nbce_combine) against a direct, loop-by-loop transcription of the formula;
the window splitter both context methods read long inputs through."""

import math

import pytest
import torch

from ropekern.context import POOLINGS, nbce_combine, split_windows


def direct(logits: torch.Tensor, beta: float, pooling: str) -> torch.Tensor:
    """Su's NBCE for one position, written out row by row in float64."""
    rows = [torch.log_softmax(r.double(), -1) for r in logits]
    uncond, cond = rows[0], rows[1:]
    if pooling == "min_entropy":
        entropies = [-sum(math.exp(x) * max(x, -100.0) for x in r.tolist()) for r in cond]
        pooled = cond[entropies.index(min(entropies))]
    elif pooling == "mean":
        pooled = sum(cond) / len(cond)
    else:
        pooled = torch.stack(cond).max(0).values
    merged = [
        (1 + beta) * p - beta * u if u > -100.0 else p for p, u in zip(pooled.tolist(), uncond.tolist())
    ]  # fmt: skip
    return torch.log_softmax(torch.tensor(merged, dtype=torch.float64), -1)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_matches_direct_formula(pooling, n, beta):
    logits = torch.randn(n + 1, 37, dtype=torch.float64) * 3
    got = nbce_combine(logits, beta=beta, pooling=pooling)
    assert got.dtype == torch.float64 and got.shape == (37,)
    torch.testing.assert_close(got, direct(logits, beta, pooling), rtol=0, atol=1e-12)
    assert torch.allclose(got.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_min_entropy_picks_the_confident_context():
    v = 10
    uncond = torch.zeros(v)
    vague = torch.zeros(v)
    sure = torch.full((v,), -5.0)
    sure[7] = 5.0
    out = nbce_combine(torch.stack([uncond, vague, sure, vague]), beta=0.25)
    assert int(out.argmax()) == 7
    # Against a uniform unconditional row the correction is a constant: the result is the chosen
    # row sharpened by (1 + beta).
    torch.testing.assert_close(out, torch.log_softmax(1.25 * torch.log_softmax(sure, -1), -1))


def test_unconditional_correction_direction():
    # The context-free model already likes token 0; NBCE discounts it in favour of token 1.
    uncond = torch.tensor([4.0, 0.0, 0.0])
    ctx = torch.tensor([2.0, 1.9, -3.0])
    out = nbce_combine(torch.stack([uncond, ctx]), beta=0.5, pooling="mean")
    assert int(out.argmax()) == 1
    assert int(nbce_combine(torch.stack([uncond, ctx]), beta=0.0).argmax()) == 0


def test_batched_rows_and_dtypes():
    logits = torch.randn(4, 3, 11)  # [n + 1, B, V]
    out = nbce_combine(logits)
    assert out.shape == (3, 11) and out.dtype == torch.float32
    for b in range(3):
        torch.testing.assert_close(out[b].double(), direct(logits[:, b], 0.25, "min_entropy"), rtol=0, atol=1e-5)
    half = nbce_combine(logits.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_masked_vocabulary_stays_finite():
    logits = torch.randn(3, 6)
    logits[0, 2] = float("-inf")  # the context-free model rules token 2 out
    logits[:, 5] = float("-inf")  # nobody may emit token 5
    out = nbce_combine(logits)
    assert not torch.isnan(out).any()
    assert out[5] == float("-inf") and torch.isfinite(out[:5]).all()
    # Token 2 takes the pooled value instead of an unbounded -beta * (-inf) bonus.
    torch.testing.assert_close(out.double(), direct(logits, 0.25, "min_entropy"), rtol=0, atol=1e-5)


def test_errors():
    x = torch.randn(3, 5)
    with pytest.raises(TypeError, match="`logits` must be a torch.Tensor"):
        nbce_combine(x.tolist())
    with pytest.raises(TypeError, match="floating"):
        nbce_combine(x.long())
    with pytest.raises(ValueError, match="n >= 1"):
        nbce_combine(x[:1])
    with pytest.raises(ValueError, match="n >= 1"):
        nbce_combine(x[0])
    with pytest.raises(ValueError, match="`beta`"):
        nbce_combine(x, beta=-0.1)
    with pytest.raises(ValueError, match="`beta`"):
        nbce_combine(x, beta=float("nan"))
    with pytest.raises(ValueError, match="`pooling`"):
        nbce_combine(x, pooling="min")
    with pytest.raises(ValueError, match="NaN"):
        nbce_combine(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]))


@pytest.mark.parametrize("size, overlap", [(20, 7), (20, 0), (1, 0), (100, 99), (150, 10)])
def test_split_windows_hold_every_span_of_overlap_items(size, overlap):
    ctx = list(range(100))
    wins = split_windows(ctx, size, overlap)
    assert wins[0][0] == 0 and wins[-1][-1] == 99 and all(len(w) <= size for w in wins)
    assert all(w == ctx[w[0] : w[0] + len(w)] for w in wins)  # contiguous slices
    for start in range(len(ctx) - overlap + 1):
        assert any(w[0] <= start and start + overlap - 1 <= w[-1] for w in wins)
    assert split_windows(torch.arange(100), size, overlap)[-1][-1] == 99  # tensors slice the same way
    assert split_windows([], 4, 1) == [[]]


@pytest.mark.parametrize(
    "size, overlap, exc",
    [(0, 0, ValueError), (5, 5, ValueError), (5, -1, ValueError), (5.0, 1, TypeError), (5, True, TypeError)],
)
def test_split_windows_errors(size, overlap, exc):
    with pytest.raises(exc, match="split_windows"):
        split_windows([1, 2, 3], size, overlap)
