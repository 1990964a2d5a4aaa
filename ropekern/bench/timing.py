"""Interleaved timing: every candidate of a point runs in one loop (A B C A B C ...), so that a
machine shared with other jobs slows all of them alike and the ratios stay meaningful (docs/design.md §6).

* CPU: one warm-up call each (``warmup=False`` skips it: for calls of seconds, first-call effects
  are milliseconds, and the runner still warms up every provider at the sweep's first point),
  then ``repeats`` rounds; each round times every candidate once (in a rotated order, so no
  candidate always runs right after the same neighbour). A sample averages
  enough back-to-back calls to last ``min_sample_s`` (50 ms: ``perf_counter`` jitter and
  allocator noise stay below 1%). The figure is the median sample.
* CUDA: like ``triton.testing.do_bench``: warm-up, then every sample is one call between two CUDA
  events, preceded by zeroing a 256 MiB buffer so the call starts with a cold L2 (50 MiB on H100);
  samples are taken until each candidate has ~100 ms of samples (and at least ``repeats``);
  decode candidates are captured in a CUDA graph when possible (launch overhead is a large part of
  a decode step), falling back to eager launches with the reason recorded.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "time_interleaved"]

_L2_FLUSH_BYTES = 256 * 1024 * 1024
_CPU_MIN_SAMPLE_S = 0.05
_CUDA_TARGET_MS = 100.0
_MAX_INNER = 10_000


@dataclass
class Timing:
    """Result for one candidate: median and spread of its samples, in milliseconds."""

    ms: float
    min_ms: float
    q1_ms: float
    q3_ms: float
    samples: int
    calls_per_sample: int
    cuda_graph: bool = False
    note: str = ""

    @classmethod
    def from_samples(cls, samples_ms: list[float], inner: int, graph: bool = False, note: str = "") -> Timing:
        s = sorted(samples_ms)
        if len(s) >= 4:
            q = statistics.quantiles(s, n=4)
            q1, q3 = q[0], q[2]
        else:
            q1, q3 = s[0], s[-1]
        return cls(statistics.median(s), s[0], q1, q3, len(s), inner, graph, note)


def time_interleaved(
    fns: list[Callable[[], Any]],
    repeats: int,
    device: str = "cpu",
    *,
    graphable: list[bool] | None = None,
    min_sample_s: float = _CPU_MIN_SAMPLE_S,
    warmup: bool = True,
) -> list[Timing | BaseException]:
    """Time ``fns`` interleaved; entry i is a ``Timing`` or the exception candidate i raised.

    A candidate that raises (out of memory, an unsupported case found late) is dropped from the
    remaining rounds; the others continue.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if torch.device(device).type == "cuda":
        return _time_cuda(fns, repeats, graphable or [False] * len(fns))
    return _time_cpu(fns, repeats, min_sample_s, warmup)


def _time_cpu(
    fns: list[Callable[[], Any]], repeats: int, min_sample_s: float, warmup: bool
) -> list[Timing | BaseException]:
    results: list[Timing | BaseException | None] = [None] * len(fns)
    inner = [1] * len(fns)
    for i, fn in enumerate(fns if warmup else []):  # warm-up, and the call count per sample
        try:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        except Exception as exc:
            results[i] = exc
            continue
        inner[i] = max(1, min(_MAX_INNER, math.ceil(min_sample_s / max(dt, 1e-9))))
    samples: list[list[float]] = [[] for _ in fns]
    live = [i for i in range(len(fns)) if results[i] is None]
    for r in range(repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for i in order:
            if results[i] is not None:
                continue
            fn, n = fns[i], inner[i]
            try:
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[i].append((time.perf_counter() - t0) * 1e3 / n)
            except Exception as exc:
                results[i] = exc
    return [res if res is not None else Timing.from_samples(samples[i], inner[i]) for i, res in enumerate(results)]


def _capture(fn: Callable[[], Any]) -> tuple[Callable[[], Any], str]:
    """``(replay, "")`` when ``fn`` can be captured in a CUDA graph, else ``(fn, reason)``."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # allocator and autotuning settle before capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay, ""
    except Exception as exc:
        torch.cuda.synchronize()
        return fn, f"no CUDA graph ({type(exc).__name__}: {str(exc)[:120]})"


def _time_cuda(fns: list[Callable[[], Any]], repeats: int, graphable: list[bool]) -> list[Timing | BaseException]:
    results: list[Timing | BaseException | None] = [None] * len(fns)
    runners: list[Callable[[], Any]] = list(fns)
    notes, graphed = [""] * len(fns), [False] * len(fns)
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    estimate = [0.0] * len(fns)
    for i, fn in enumerate(fns):
        try:
            fn()
            torch.cuda.synchronize()
            if graphable[i]:
                runners[i], notes[i] = _capture(fn)
                graphed[i] = not notes[i]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                runners[i]()
            end.record()
            torch.cuda.synchronize()
            estimate[i] = start.elapsed_time(end) / 5
        except Exception as exc:
            torch.cuda.synchronize()
            results[i] = exc
    live = [i for i in range(len(fns)) if results[i] is None]
    if not live:
        return list(results)  # type: ignore[arg-type]
    rounds = max(repeats, min(1000, math.ceil(_CUDA_TARGET_MS / max(min(estimate[i] for i in live), 1e-3))))
    events = {i: [] for i in live}
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)]
        for i in order:
            if results[i] is not None or (r >= repeats and estimate[i] * len(events[i]) >= _CUDA_TARGET_MS):
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.zero_()
            try:
                start.record()
                runners[i]()
                end.record()
            except Exception as exc:
                results[i] = exc
                continue
            events[i].append((start, end))
    torch.cuda.synchronize()
    out: list[Timing | BaseException] = []
    for i in range(len(fns)):
        if results[i] is not None:
            out.append(results[i])  # type: ignore[arg-type]
            continue
        samples = [s.elapsed_time(e) for s, e in events[i]]
        out.append(Timing.from_samples(samples, 1, graphed[i], notes[i]))
    return out
