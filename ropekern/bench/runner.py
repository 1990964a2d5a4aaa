"""Run a sweep: for every shape, build each provider (per rope type where it matters), time them
interleaved, measure peak memory, and derive the docs/design.md §6 figures and the ratios."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import Shape, SweepConfig, make_rope
from .memory import measure_memory
from .metrics import io_bytes, op_bytes, op_flops
from .providers import Point, Skip, build_providers, default_backends, make_inputs
from .timing import Timing, time_interleaved

__all__ = ["Results", "run_sweep", "add_ratios", "variant_spread"]

REFERENCE_ROLES = ("baseline", "peer")


@dataclass
class Results:
    """A finished sweep: metadata, the config, one row per (shape, provider, rope type)."""

    meta: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    spread: list[dict[str, Any]] = field(default_factory=list)

    @property
    def op(self) -> str:
        return self.config["op"]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": 1, "meta": self.meta, "config": self.config, "rows": self.rows, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Results:
        return cls(d["meta"], d["config"], d["rows"], d.get("spread", []))


def _row(shape: Shape, provider, rope_type: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "provider": provider.name,
        "role": provider.role,
        "backend": provider.backend,
        "rope_type": rope_type,
        **shape.to_dict(),
        "status": "ok",
        "reason": "",
    }
    return row


def _fill_timing(row: dict[str, Any], shape: Shape, t: Timing) -> None:
    row.update(
        ms=t.ms,
        min_ms=t.min_ms,
        q1_ms=t.q1_ms,
        q3_ms=t.q3_ms,
        samples=t.samples,
        calls_per_sample=t.calls_per_sample,
        cuda_graph=t.cuda_graph,
        timing_note=t.note,
    )
    flops, nbytes = op_flops(shape), op_bytes(shape)
    seconds = t.ms * 1e-3
    row["tflops"] = flops / seconds / 1e12 if flops is not None and seconds > 0 else None
    row["gbps"] = nbytes / seconds / 1e9 if nbytes is not None and seconds > 0 else None
    row["io_mb"] = io_bytes(shape) / 2**20


def run_sweep(cfg: SweepConfig, *, progress: bool = True, meta: dict[str, Any] | None = None) -> Results:
    """Run every shape of ``cfg``; ``progress`` draws a tqdm bar on stderr."""
    backends = list(cfg.backends) if cfg.backends is not None else default_backends(cfg.device)
    providers = build_providers(cfg.op, backends)
    if cfg.providers is not None:
        known = {p.name for p in providers}
        unknown = [n for n in cfg.providers if n not in known]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown} for op {cfg.op!r}; available: {sorted(known)}")
        providers = [p for p in providers if p.name in cfg.providers]
    shapes = cfg.shapes()
    rows: list[dict[str, Any]] = []
    memory_methods: set[str] = set()
    bar = _progress(len(shapes), f"ropekern bench {cfg.op}", progress)
    for shape in shapes:
        bar.set_postfix_str(f"seqlen={shape.seqlen} D={shape.head_dim} {shape.hq}/{shape.hkv}")
        inputs = make_inputs(shape, cfg.seed)
        points = {rt: Point(shape, rt, make_rope(rt, shape.head_dim), inputs) for rt in cfg.rope_types}
        variants, fns, variant_rows, point_rows = [], [], [], []
        for p in providers:
            for rt in cfg.rope_types if p.rope_dependent else cfg.rope_types[:1]:
                row = _row(shape, p, rt)
                point_rows.append(row)
                try:
                    fn = p.build(points[rt])
                except Skip as exc:
                    row.update(status="skipped", reason=str(exc))
                    continue
                except Exception as exc:  # a broken provider is reported, the sweep goes on
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                    continue
                variants.append((p, rt))
                fns.append(fn)
                variant_rows.append(row)
        timings = time_interleaved(
            fns,
            cfg.repeats,
            shape.device,
            graphable=[p.cuda_graph for p, _ in variants],
            warmup=cfg.warmup or shape is shapes[0],
        )
        del fns, points, inputs
        measured = []
        for (p, rt), row, t in zip(variants, variant_rows, timings):
            if isinstance(t, BaseException):
                row.update(status="error", reason=f"{type(t).__name__}: {t}")
            else:
                _fill_timing(row, shape, t)
                measured.append((p.name, rt))
        rows.extend(point_rows)
        if cfg.memory and measured:
            if torch.device(shape.device).type == "cuda":
                torch.cuda.empty_cache()
            mem, method = measure_memory(shape, measured, backends, cfg.seed)
            memory_methods.add(method)
            for row in variant_rows:
                value = mem.get((row["provider"], row["rope_type"]))
                row["peak_mb"] = None if value is None else value / 2**20
        bar.update(1)
    bar.close()
    add_ratios(rows)
    cfg_dict = cfg.to_dict()
    cfg_dict["backends"] = backends
    meta = dict(meta or {})
    meta["memory_method"] = "; ".join(sorted(memory_methods)) if memory_methods else "off"
    return Results(meta, cfg_dict, rows, variant_spread(rows))


class _NoBar:
    def set_postfix_str(self, s: str) -> None:
        del s

    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="point", dynamic_ncols=True)


def _point_key(row: dict[str, Any]) -> tuple:
    return (
        row["op"],
        row["batch"],
        row["seqlen"],
        row["hq"],
        row["hkv"],
        row["head_dim"],
        row["causal"],
        row["dtype"],
        row["device"],
        row["q_len"],
    )


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup`` (reference time / this time, per reference provider) and ``rope_tax``.

    References: every baseline and peer at the same point (at the sweep's first rope type, since
    their cost does not depend on the type), and for a fused row also its own backend's
    ``:separate`` and ``:norope`` variants. ``rope_tax`` = fused / norope - 1.
    """
    by_point: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            by_point[_point_key(row)].append(row)
    for group in by_point.values():
        first_type = {}
        for row in group:
            first_type.setdefault(row["provider"], row)
        refs = {r["provider"]: r for r in first_type.values() if r["role"] in REFERENCE_ROLES}
        for row in group:
            own = {}
            if row["role"] == "fused" and row["backend"]:
                for suffix in (":separate", ":norope"):
                    ref = first_type.get(f"rk-{row['backend']}{suffix}")
                    if ref is not None:
                        own[ref["provider"]] = ref
            speedup = {}
            for name, ref in {**refs, **own}.items():
                if name != row["provider"] and row["ms"] > 0:
                    speedup[name] = ref["ms"] / row["ms"]
            row["speedup"] = speedup
            norope = own.get(f"rk-{row['backend']}:norope")
            row["rope_tax"] = row["ms"] / norope["ms"] - 1.0 if norope is not None and norope["ms"] > 0 else None


def variant_spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fused provider and point: slowest rope type / the default type (or the first timed)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row["role"] == "fused":
            groups[(row["provider"], *_point_key(row))].append(row)
    out = []
    for rows_ in groups.values():
        if len(rows_) < 2:
            continue
        base = next((r for r in rows_ if r["rope_type"] == "default"), rows_[0])
        slowest = max(rows_, key=lambda r: r["ms"])
        out.append(
            {
                "provider": base["provider"],
                **{k: base[k] for k in ("op", "batch", "seqlen", "hq", "hkv", "head_dim", "causal", "dtype")},
                "base_type": base["rope_type"],
                "slowest_type": slowest["rope_type"],
                "spread": slowest["ms"] / base["ms"],
                "types": {r["rope_type"]: r["ms"] for r in rows_},
            }
        )
    return out
