"""CI-sized microbenchmarks of every provider and op: ``pytest benchmarks/ --benchmark-only``.

Timings only, no thresholds: regressions show up in the CI log (pytest-benchmark's table, grouped
by op, with FLOPs/bytes in ``extra_info``) without failing the run. Providers that cannot run here
(no GPU, library not installed) are skipped with the reason. The shapes are small enough that the
whole file takes well under a minute on 2 CPU cores with the torch reference.
"""

from __future__ import annotations

import pytest
import torch

from ropekern.bench.config import OPS, Shape, make_rope
from ropekern.bench.metrics import op_bytes, op_flops
from ropekern.bench.providers import Point, Skip, build_providers, default_backends, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
# Small enough for CI, large enough that a call is dominated by compute, not Python overhead.
CI_SHAPES = {
    "forward": Shape("forward", 1, 256, 4, 2, 64, True, DTYPE, DEVICE),
    "backward": Shape("backward", 1, 128, 4, 2, 64, True, DTYPE, DEVICE),
    "decode": Shape("decode", 1, 2048, 8, 2, 64, True, DTYPE, DEVICE),
    "rope": Shape("rope", 1, 1024, 4, 2, 64, False, DTYPE, DEVICE),
}
BACKENDS = default_backends(DEVICE)
CASES = [(op, p.name) for op in OPS for p in build_providers(op, BACKENDS)]


@pytest.mark.parametrize(("op", "name"), CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_provider(benchmark, op: str, name: str) -> None:
    shape = CI_SHAPES[op]
    provider = next(p for p in build_providers(op, BACKENDS) if p.name == name)
    point = Point(shape, "default", make_rope("default", shape.head_dim), make_inputs(shape))
    try:
        fn = provider.build(point)
    except Skip as exc:
        pytest.skip(str(exc))
    benchmark.group = f"{op} {shape.label()} seqlen={shape.seqlen}"
    benchmark.extra_info.update(flops=op_flops(shape), bytes=op_bytes(shape), role=provider.role)
    if DEVICE == "cuda":

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark(run)
    else:
        benchmark(fn)
