"""Peak memory of one call beyond its live inputs (outputs + workspace), per provider.

* CUDA: ``torch.cuda.max_memory_allocated`` during the call minus ``memory_allocated`` before.
* CPU: ``tracemalloc`` cannot see torch's allocations, so this measures the process's resident
  set: in a **fresh subprocess per point** (``python -m ropekern.bench.memory``), each provider
  is first run once on a tiny shape (so code pages and library initialisation are not charged to
  it), then, for each provider in turn, freed heap is returned to the OS (``malloc_trim``), the
  kernel's high-water mark is reset (``/proc/self/clear_refs``), the call runs once, and the
  figure is ``VmHWM - VmRSS`` before the call. Linux only; elsewhere the figure is left empty.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Shape, make_rope
from .providers import Point, Skip, build_providers, make_inputs

__all__ = ["measure_memory", "cpu_method_available", "cpu_peak_bytes", "CPU_METHOD", "CUDA_METHOD"]

CPU_METHOD = "rss-hwm (fresh subprocess per point, VmHWM - VmRSS around one call)"
CUDA_METHOD = "torch.cuda.max_memory_allocated - memory_allocated before the call"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if not match:
        raise OSError(f"{field} missing from /proc/self/status")
    return int(match.group(1))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5": reset the peak RSS (Linux >= 4.0)


def cpu_method_available() -> bool:
    try:
        _status_kb("VmHWM")
        _reset_hwm()
    except OSError:
        return False
    return True


def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), bytes)``: the resident memory ``fn`` added at its peak over what the process held
    before it (freed heap returned to the OS first, then the kernel's peak-RSS mark reset), so
    what ``fn`` returns and keeps counts too. Linux only (``cpu_method_available``); run it in a
    process that has already paged in the code ``fn`` uses, or that code is charged to ``fn``."""
    _trim()
    rss0 = _status_kb("VmRSS")
    _reset_hwm()
    result = fn()
    return result, max(0, _status_kb("VmHWM") - rss0) * 1024


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap may stay resident (figures only undercount)
        pass


def _variant_points(shape: Shape, variants: list[tuple[str, str]], seed: int) -> dict[str, Point]:
    inputs = make_inputs(shape, seed)
    return {rt: Point(shape, rt, make_rope(rt, shape.head_dim), inputs) for rt in {rt for _, rt in variants}}


def _measure_here(shape: Shape, variants: list[tuple[str, str]], backends: list[str], seed: int) -> list[dict]:
    """Measure in this process (the subprocess body on CPU; directly on CUDA)."""
    cuda = torch.device(shape.device).type == "cuda"
    providers = {p.name: p for p in build_providers(shape.op, backends)}
    if not cuda:  # page in every provider's code on a tiny shape first
        tiny = Shape(**{**shape.to_dict(), "seqlen": min(shape.seqlen, 64), "batch": 1})
        tiny_points = _variant_points(tiny, variants, seed)
        for name, rt in variants:
            try:
                providers[name].build(tiny_points[rt])()
            except Exception:  # the real measurement below reports the error
                pass
        del tiny_points
    points = _variant_points(shape, variants, seed)
    out = []
    for name, rt in variants:
        entry: dict[str, Any] = {"provider": name, "rope_type": rt, "bytes": None, "error": None}
        try:
            fn = providers[name].build(points[rt])
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                result = fn()
                torch.cuda.synchronize()
                entry["bytes"] = torch.cuda.max_memory_allocated() - before
            else:
                result, entry["bytes"] = cpu_peak_bytes(fn)
            del result
        except Skip as exc:
            entry["error"] = f"skipped: {exc}"
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        out.append(entry)
        if not cuda:
            _trim()
    return out


def measure_memory(
    shape: Shape, variants: list[tuple[str, str]], backends: list[str], seed: int = 0
) -> tuple[dict[tuple[str, str], int | None], str]:
    """Peak extra bytes per ``(provider, rope_type)`` and the method used (or why none)."""
    if not variants:
        return {}, ""
    if torch.device(shape.device).type == "cuda":
        rows = _measure_here(shape, variants, backends, seed)
        return {(r["provider"], r["rope_type"]): r["bytes"] for r in rows}, CUDA_METHOD
    if not cpu_method_available():
        return {v: None for v in variants}, "unavailable (needs Linux /proc/self/clear_refs)"
    spec = {
        "shape": shape.to_dict(),
        "variants": variants,
        "backends": backends,
        "seed": seed,
        "threads": torch.get_num_threads(),
    }
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the ropekern package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "ropekern.bench.memory"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {v: None for v in variants}, f"failed: {tail[:200]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(r["provider"], r["rope_type"]): r["bytes"] for r in rows}, CPU_METHOD


def _main() -> int:
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(int(spec["threads"]))
    shape = Shape(**spec["shape"])
    variants = [tuple(v) for v in spec["variants"]]
    rows = _measure_here(shape, variants, spec["backends"], int(spec["seed"]))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
