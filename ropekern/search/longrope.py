"""LongRoPE-style evolutionary search of per-dimension RoPE rescale factors.

LongRoPE (Ding et al. 2024) and LongRoPE2 (Shang et al. 2025) extend a model from its original
length L0 to L by dividing each rotary frequency i by its own factor λ_i, found by evolutionary
search instead of a formula, and score each candidate by the model's perplexity on long inputs
(LongRoPE2: needle-driven perplexity, i.e. only on answer tokens that require the long context).

The search space follows LongRoPE's constraints: ``1 <= λ_i <= max_factor`` and λ non-decreasing
across dimensions (low frequencies, whose periods exceed the trained length, are stretched at
least as much as high ones). The first population holds the factors implied by Position
Interpolation, NTK and YaRN (``inv_freq / scaled inv_freq``) and mutations of them; each generation
draws children by one-point crossover and log-normal mutation of the best candidates and keeps
the best ``population`` of parents and children (elitist, so the best score never gets worse).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..scaling import RopeConfig

__all__ = ["longrope_search", "seed_factors", "with_scaling"]

_FORMAT = "ropekern.longrope_search/1"
# Factors are kept on a 1e-4 grid: equal candidates are recognised (and never re-evaluated), and
# the checkpoint stays exact. 1e-4 of a factor moves the lowest frequency's angle at 128K tokens
# by under 1e-4 * 128K * inv_freq_min, far below what perplexity can resolve.
_DECIMALS = 4


def with_scaling(rope: RopeConfig, scaling: dict[str, Any] | None) -> RopeConfig:
    """``rope`` with its scaling replaced (same head/rotary dims, pairing and max positions)."""
    return RopeConfig(
        rope.head_dim,
        base=rope.base if scaling is None or "rope_theta" not in scaling else None,
        rotary_dim=rope.rotary_dim,
        interleaved=rope.interleaved,
        scaling=scaling,
        max_position_embeddings=rope.max_position_embeddings,
    )


def _original_len(rope: RopeConfig, original_len: int | None) -> int:
    if original_len is None:
        original_len = rope.scaling.get("original_max_position_embeddings") or rope.max_position_embeddings
    if original_len is None:
        raise ValueError(
            "longrope_search: `original_len` is required when `rope` has no max_position_embeddings "
            "or original_max_position_embeddings"
        )
    if isinstance(original_len, bool) or not isinstance(original_len, numbers.Integral) or original_len < 1:
        raise ValueError(f"longrope_search: `original_len` must be a positive int, got {original_len!r}")
    return int(original_len)


def seed_factors(rope: RopeConfig, target_len: int, original_len: int | None = None) -> dict[str, list[float]]:
    """Per-dimension factors ``λ_i = inv_freq_i / scaled inv_freq_i`` of the classic scalings.

    Returns ``{"pi": ..., "ntk": ..., "yarn": ...}`` (each ``rotary_dim // 2`` floats, >= 1,
    non-decreasing), plus ``"longrope"`` (``rope``'s ``long_factor``) when ``rope`` is already a
    LongRoPE config, for the extension ratio ``target_len / original_len``.
    """
    original = _original_len(rope, original_len)
    s = target_len / original
    base = RopeConfig(rope.head_dim, base=rope.base, rotary_dim=rope.rotary_dim).inv_freq64()
    out = {}
    for name, scaling in (
        ("pi", {"rope_type": "linear", "factor": s}),
        ("ntk", {"rope_type": "ntk", "factor": s}),
        ("yarn", {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": original}),
    ):
        scaled = RopeConfig(rope.head_dim, base=rope.base, rotary_dim=rope.rotary_dim, scaling=scaling).inv_freq64()
        out[name] = (base / scaled).tolist()
    if rope.rope_type == "longrope":
        out["longrope"] = list(rope.scaling["long_factor"])
    return out


def _project(x: np.ndarray, max_factor: float) -> np.ndarray:
    """Closest (least-squares) non-decreasing vector, clamped to [1, max_factor], on the grid."""
    # Pool-adjacent-violators: merge neighbouring blocks while they decrease.
    values: list[float] = []
    weights: list[int] = []
    for v in x.tolist():
        values.append(v)
        weights.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            weights[-2] = w
            values.pop()
            weights.pop()
    y = np.repeat(values, weights)
    # Rounding and clamping are monotone maps, so the order survives them.
    return np.clip(np.round(y, _DECIMALS), 1.0, max_factor)


def _key(x: np.ndarray) -> str:
    return ",".join(f"{v:.{_DECIMALS}f}" for v in x)


class _Search:
    def __init__(self, evaluate, rope, target_len, original, settings, max_factor, progress):
        self.evaluate = evaluate
        self.rope = rope
        self.settings = settings
        self.max_factor = max_factor
        self.original = original
        self.target_len = target_len
        self.scores: dict[str, float] = {}
        self.population: list[list[float]] | None = None  # sorted best first
        self.pending: list[list[float]] | None = None
        self.generation = -1  # generations completed; -1: the first population is not scored yet
        self.history: list[float] = []
        self.rng = np.random.default_rng(settings["seed"])
        self.progress = progress

    # ----------------------------------------------------------------- candidates
    def scaling(self, factors: list[float]) -> dict[str, Any]:
        rope = self.rope
        half = rope.rotary_dim // 2
        short = list(rope.scaling["short_factor"]) if rope.rope_type == "longrope" else [1.0] * half
        out: dict[str, Any] = {
            "rope_type": "longrope",
            "rope_theta": rope.base,
            "short_factor": short,
            "long_factor": [float(f) for f in factors],
            "original_max_position_embeddings": self.original,
            "factor": self.target_len / self.original,
        }
        if rope.rotary_dim != rope.head_dim:
            prf = rope.rotary_dim / rope.head_dim
            if int(rope.head_dim * prf) == rope.rotary_dim:  # else the caller's rotary_dim must say it
                out["partial_rotary_factor"] = prf
        return out

    def mutate(self, x: np.ndarray) -> np.ndarray:
        p, scale = self.settings["mutation_prob"], self.settings["mutation_scale"]
        hit = self.rng.random(x.size) < p
        if not hit.any():
            hit[self.rng.integers(x.size)] = True
        noise = np.exp(self.rng.normal(0.0, scale, x.size))
        return _project(np.where(hit, x * noise, x), self.max_factor)

    def child(self, parents: list[np.ndarray]) -> np.ndarray:
        a = parents[self.rng.integers(len(parents))]
        if len(parents) > 1 and self.rng.random() < self.settings["crossover_prob"]:
            b = parents[self.rng.integers(len(parents))]
            cut = int(self.rng.integers(1, a.size)) if a.size > 1 else 0
            a = _project(np.concatenate([a[:cut], b[cut:]]), self.max_factor)
        return self.mutate(a)

    def unique(self, make: Callable[[], np.ndarray], taken: set[str]) -> list[float]:
        """A candidate not seen before (10 tries; then a repeat, whose cached score is reused)."""
        for _ in range(10):
            x = make()
            if _key(x) not in taken and _key(x) not in self.scores:
                break
        taken.add(_key(x))
        return x.tolist()

    def first_population(self, seeds: list[np.ndarray]) -> list[list[float]]:
        size = self.settings["population"]
        taken: set[str] = set()
        out = []
        for s in seeds:
            x = _project(s, self.max_factor)
            if _key(x) not in taken and len(out) < size:
                taken.add(_key(x))
                out.append(x.tolist())
        while len(out) < size:
            seed = seeds[self.rng.integers(len(seeds))]
            out.append(self.unique(lambda seed=seed: self.mutate(seed), taken))
        return out

    def children(self) -> list[list[float]]:
        parents = [np.array(x) for x in self.population[: self.settings["parents"]]]
        taken = {_key(np.array(x)) for x in self.population}
        return [self.unique(lambda: self.child(parents), taken) for _ in range(self.settings["population"])]

    # ----------------------------------------------------------------- scoring
    def score(self, factors: list[float]) -> float:
        key = _key(np.array(factors))
        if key not in self.scores:
            value = self.evaluate(self.scaling(factors))
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"longrope_search: `evaluate` must return a float, got {type(value).__name__}")
            value = float(value)
            # A candidate that breaks the model (NaN loss) is as bad as it gets, not an error.
            self.scores[key] = value if not math.isnan(value) else math.inf
        return self.scores[key]

    def select(self, candidates: list[list[float]]) -> list[list[float]]:
        """Best ``population`` distinct candidates; ties keep the earlier one (stable sort)."""
        seen: set[str] = set()
        distinct = []
        for x in candidates:
            k = _key(np.array(x))
            if k not in seen:
                seen.add(k)
                distinct.append(x)
        distinct.sort(key=self.score)
        return distinct[: self.settings["population"]]

    # ----------------------------------------------------------------- checkpoint
    def state(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "settings": self.settings,
            "generation": self.generation,
            "population": self.population,
            "pending": self.pending,
            "history": self.history,
            "scores": self.scores,
            "rng": self.rng.bit_generator.state,
        }

    def restore(self, data: dict[str, Any], path: Path) -> None:
        if data.get("format") != _FORMAT:
            raise ValueError(f"longrope_search: {path} is not a longrope_search checkpoint")
        if data["settings"] != self.settings:
            diff = sorted(k for k in self.settings if data["settings"].get(k) != self.settings[k])
            raise ValueError(f"longrope_search: checkpoint {path} was made with different settings: {diff}")
        self.generation = data["generation"]
        self.population = data["population"]
        self.pending = data["pending"]
        self.history = data["history"]
        self.scores = {k: float(v) for k, v in data["scores"].items()}
        self.rng.bit_generator.state = data["rng"]


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a torn checkpoint


def _positive(name: str, value: Any, kind: type = numbers.Real) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"longrope_search: `{name}` must be positive, got {value!r}")


def longrope_search(
    evaluate: Callable[[dict[str, Any]], float],
    rope: RopeConfig,
    target_len: int,
    *,
    generations: int = 8,
    population: int = 16,
    parents: int | None = None,
    mutation_prob: float = 0.3,
    mutation_scale: float = 0.1,
    crossover_prob: float = 0.5,
    max_factor: float | None = None,
    original_len: int | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search per-dimension LongRoPE rescale factors that minimise ``evaluate``.

    Args:
        evaluate: ``evaluate(scaling) -> float``, lower is better, where ``scaling`` is a
            ``longrope`` dict for ``RopeConfig`` (build the model's rope with
            ``with_scaling(rope, scaling)``); typically a needle-driven perplexity at ``target_len``
            (``ropekern.eval.needle_perplexity``). NaN counts as +inf. Called at most
            ``population * (generations + 1)`` times, never twice for the same factors.
        rope: the model's un-extended ``RopeConfig`` (or a LongRoPE one, whose long factors seed
            the search and whose short factors are kept).
        target_len: the context length to extend to (> the original length).
        generations: rounds of crossover + mutation after the first population.
        population: candidates per generation (>= 2); ``parents``: how many of the best breed
            (default ``max(2, population // 4)``).
        mutation_prob: chance that each factor is perturbed (at least one always is), by a
            log-normal factor ``exp(N(0, mutation_scale))``. ``crossover_prob``: chance that a
            child combines two parents at a random dimension before mutating.
        max_factor: upper bound of every factor; default ``1.25 * target_len / original_len``
            (LongRoPE's search space).
        original_len: the trained length L0; default ``rope``'s
            ``original_max_position_embeddings`` or ``max_position_embeddings``.
        seed: the search is deterministic for a seed (given a deterministic ``evaluate``).
        checkpoint: JSON file written after every evaluation; if it exists the search resumes
            from it (same settings required; ``generations`` may grow) and reaches the same
            result as an uninterrupted run.
        progress: show a tqdm progress bar (stderr).
    Returns: the best candidate's scaling dict (``rope_type="longrope"``, ``rope_theta``,
    ``short_factor``, ``long_factor``, ``original_max_position_embeddings``, ``factor``).
    """
    if not callable(evaluate):
        raise TypeError(f"longrope_search: `evaluate` must be callable, got {type(evaluate).__name__}")
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"longrope_search: `rope` must be a ropekern.RopeConfig, got {type(rope).__name__}")
    if rope.rope_type == "proportional":
        raise ValueError("longrope_search: proportional RoPE has no LongRoPE form")
    original = _original_len(rope, original_len)
    _positive("target_len", target_len, numbers.Integral)
    if target_len <= original:
        raise ValueError(f"longrope_search: `target_len` ({target_len}) must exceed the original length ({original})")
    _positive("population", population, numbers.Integral)
    if population < 2:
        raise ValueError(f"longrope_search: `population` must be >= 2, got {population}")
    if isinstance(generations, bool) or not isinstance(generations, numbers.Integral) or generations < 0:
        raise ValueError(f"longrope_search: `generations` must be an int >= 0, got {generations!r}")
    parents = max(2, population // 4) if parents is None else parents
    _positive("parents", parents, numbers.Integral)
    if parents > population:
        raise ValueError(f"longrope_search: `parents` ({parents}) must be <= population ({population})")
    for name, value in (("mutation_prob", mutation_prob), ("crossover_prob", crossover_prob)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise ValueError(f"longrope_search: `{name}` must be in [0, 1], got {value!r}")
    _positive("mutation_scale", mutation_scale)
    ratio = target_len / original
    max_factor = 1.25 * ratio if max_factor is None else max_factor
    _positive("max_factor", max_factor)
    if max_factor < 1.0:
        raise ValueError(f"longrope_search: `max_factor` must be >= 1, got {max_factor}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"longrope_search: `seed` must be an int >= 0, got {seed!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"longrope_search: `progress` must be a bool, got {progress!r}")

    settings = {
        "rope": rope.to_dict(),
        "target_len": int(target_len),
        "original_len": original,
        "population": int(population),
        "parents": int(parents),
        "mutation_prob": float(mutation_prob),
        "mutation_scale": float(mutation_scale),
        "crossover_prob": float(crossover_prob),
        "max_factor": float(max_factor),
        "seed": int(seed),
    }
    # JSON turns tuples into lists: compare settings in their JSON form.
    settings = json.loads(json.dumps(settings))
    search = _Search(evaluate, rope, int(target_len), original, settings, float(max_factor), progress)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        search.restore(json.loads(path.read_text()), path)

    def save() -> None:
        if path is not None:
            _save(path, search.state())

    total = population * (generations + 1)
    bar = tqdm(total=total, desc="longrope_search", disable=not progress, leave=False)
    bar.update(min(total, population * max(0, search.generation + 1)))

    def run(candidates: list[list[float]]) -> None:
        done = sum(_key(np.array(x)) in search.scores for x in candidates)
        bar.update(done)
        for x in candidates:
            if _key(np.array(x)) not in search.scores:
                search.score(x)
                save()
                bar.update(1)
                bar.set_postfix(best=min(search.scores.values()))

    try:
        if search.generation < 0:
            if search.pending is None:
                seeds = [np.array(v) for v in seed_factors(rope, target_len, original).values()]
                search.pending = search.first_population(seeds)
                save()
            run(search.pending)
            search.population = search.select(search.pending)
            search.pending = None
            search.generation = 0
            search.history.append(search.score(search.population[0]))
            save()
        while search.generation < generations:
            if search.pending is None:
                search.pending = search.children()
                save()
            run(search.pending)
            search.population = search.select(search.population + search.pending)
            search.pending = None
            search.generation += 1
            search.history.append(search.score(search.population[0]))
            save()
    finally:
        bar.close()
    return search.scaling(search.population[0])
