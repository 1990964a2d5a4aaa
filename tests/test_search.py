"""ropekern.search.longrope_search: improves a synthetic objective, respects LongRoPE's constraints,
is deterministic, never re-evaluates a candidate, and resumes from its checkpoint to the same result."""

import json
import math

import numpy as np
import pytest

import ropekern as rk
from ropekern.search import longrope_search, seed_factors, with_scaling

ROPE = rk.RopeConfig(32, max_position_embeddings=128)
TARGET = np.linspace(1.3, 4.6, 16)  # a monotone optimum the classic scalings do not hit


class Objective:
    """Squared distance of the long factors to TARGET; records every call."""

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, scaling):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # a crash mid-search
        self.calls.append(scaling)
        return distance(scaling["long_factor"])


def distance(factors):
    return float(np.mean((np.array(factors) - TARGET) ** 2))


def check_constraints(factors, max_factor):
    f = np.array(factors)
    assert f.shape == (16,)
    assert (f >= 1.0).all() and (f <= max_factor + 1e-12).all()
    assert (np.diff(f) >= 0).all()


def test_improves_and_respects_constraints():
    obj = Objective()
    best = longrope_search(obj, ROPE, 512, generations=6, population=8, progress=False)
    seeds = seed_factors(ROPE, 512)
    assert distance(best["long_factor"]) < 0.25 * min(distance(v) for v in seeds.values())
    assert distance(best["long_factor"]) == min(distance(c["long_factor"]) for c in obj.calls)
    assert len(obj.calls) <= 8 * 7
    keys = [tuple(c["long_factor"]) for c in obj.calls]
    assert len(set(keys)) == len(keys)  # never evaluated twice
    for c in obj.calls:
        check_constraints(c["long_factor"], 1.25 * 4)
    # The first candidates are the PI, NTK and YaRN tables (on the search grid).
    for call, name in zip(obj.calls, ("pi", "ntk", "yarn")):
        np.testing.assert_allclose(call["long_factor"], seeds[name], atol=5e-5)
    # The result is a longrope dict that RopeConfig accepts, scaling the frequencies as found.
    assert best["rope_type"] == "longrope" and best["original_max_position_embeddings"] == 128
    assert best["factor"] == 4.0 and best["short_factor"] == [1.0] * 16
    cfg = with_scaling(ROPE, best)
    long = cfg.inv_freq64(512)
    np.testing.assert_allclose(long.numpy(), ROPE.inv_freq64().numpy() / np.array(best["long_factor"]), rtol=1e-12)
    np.testing.assert_allclose(cfg.inv_freq64(128).numpy(), ROPE.inv_freq64().numpy(), rtol=1e-12)
    assert cfg.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(128)))


def test_seed_factors():
    seeds = seed_factors(ROPE, 512)
    assert seeds["pi"] == pytest.approx([4.0] * 16)
    for name in ("ntk", "yarn"):
        f = np.array(seeds[name])
        assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(4.0) and (np.diff(f) >= -1e-12).all()
    # A LongRoPE config's own long factors seed the search too.
    lr = with_scaling(ROPE, {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": list(TARGET),
                             "original_max_position_embeddings": 128})  # fmt: skip
    assert seed_factors(lr, 512)["longrope"] == pytest.approx(list(TARGET))


def test_deterministic_for_a_seed():
    a, b, c = Objective(), Objective(), Objective()
    ra = longrope_search(a, ROPE, 512, generations=3, population=6, seed=5, progress=False)
    rb = longrope_search(b, ROPE, 512, generations=3, population=6, seed=5, progress=False)
    longrope_search(c, ROPE, 512, generations=3, population=6, seed=6, progress=False)
    assert ra == rb and a.calls == b.calls
    assert a.calls != c.calls


@pytest.mark.parametrize("fail_after", [2, 9, 20])
def test_resume_after_a_crash(tmp_path, fail_after):
    kw = dict(generations=3, population=6, seed=1, progress=False)
    straight = Objective()
    expected = longrope_search(straight, ROPE, 512, **kw)
    ckpt = tmp_path / "search.json"
    crashing = Objective(fail_after=fail_after)
    with pytest.raises(KeyboardInterrupt):
        longrope_search(crashing, ROPE, 512, checkpoint=ckpt, **kw)
    assert json.loads(ckpt.read_text())["format"] == "ropekern.longrope_search/1"
    resumed = Objective()
    assert longrope_search(resumed, ROPE, 512, checkpoint=ckpt, **kw) == expected
    # Nothing evaluated before the crash is evaluated again; together they are the straight run.
    assert crashing.calls + resumed.calls == straight.calls
    # A finished checkpoint returns at once.
    again = Objective()
    assert longrope_search(again, ROPE, 512, checkpoint=ckpt, **kw) == expected and not again.calls


def test_more_generations_continue_a_checkpoint(tmp_path):
    ckpt = tmp_path / "search.json"
    kw = dict(population=6, seed=2, progress=False)
    first = Objective()
    longrope_search(first, ROPE, 512, generations=1, checkpoint=ckpt, **kw)
    more = Objective()
    got = longrope_search(more, ROPE, 512, generations=3, checkpoint=ckpt, **kw)
    straight = Objective()
    assert got == longrope_search(straight, ROPE, 512, generations=3, **kw)
    assert first.calls + more.calls == straight.calls
    with pytest.raises(ValueError, match="different settings: \\['population'\\]"):
        longrope_search(Objective(), ROPE, 512, generations=3, checkpoint=ckpt, population=8, seed=2)
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a longrope_search checkpoint"):
        longrope_search(Objective(), ROPE, 512, checkpoint=tmp_path / "other.json", progress=False)


def test_partial_rotary_nan_scores_and_bounds():
    rope = rk.RopeConfig(64, rotary_dim=16, base=500.0, max_position_embeddings=100)
    seen = []

    def objective(scaling):
        f = np.array(scaling["long_factor"])
        seen.append(f)
        return float("nan") if f[0] > 1.5 else float(np.abs(f - 2.0).sum())

    best = longrope_search(objective, rope, 300, generations=2, population=5, max_factor=2.5, progress=True)
    cfg = with_scaling(rope, best)
    assert cfg.rotary_dim == 16 and cfg.base == 500.0 and len(best["long_factor"]) == 8
    assert best["long_factor"][0] <= 1.5  # NaN candidates rank last
    for f in seen:
        assert f.size == 8 and (f >= 1).all() and (f <= 2.5).all() and (np.diff(f) >= 0).all()


def test_errors():
    def obj(s):
        return 0.0

    with pytest.raises(TypeError, match="`evaluate`"):
        longrope_search(None, ROPE, 512)
    with pytest.raises(TypeError, match="`rope`"):
        longrope_search(obj, {"head_dim": 32}, 512)
    with pytest.raises(ValueError, match="must exceed the original length"):
        longrope_search(obj, ROPE, 128)
    with pytest.raises(ValueError, match="`original_len` is required"):
        longrope_search(obj, rk.RopeConfig(32), 512)
    with pytest.raises(ValueError, match="`population`"):
        longrope_search(obj, ROPE, 512, population=1)
    with pytest.raises(ValueError, match="`parents`"):
        longrope_search(obj, ROPE, 512, population=4, parents=5)
    with pytest.raises(ValueError, match="`mutation_prob`"):
        longrope_search(obj, ROPE, 512, mutation_prob=1.5)
    with pytest.raises(ValueError, match="`max_factor`"):
        longrope_search(obj, ROPE, 512, max_factor=0.5)
    with pytest.raises(ValueError, match="`generations`"):
        longrope_search(obj, ROPE, 512, generations=-1)
    with pytest.raises(ValueError, match="`seed`"):
        longrope_search(obj, ROPE, 512, seed=-3)
    with pytest.raises(TypeError, match="must return a float"):
        longrope_search(lambda s: "low", ROPE, 512, progress=False)
