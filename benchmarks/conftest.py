"""pytest-benchmark suite setup (``pytest benchmarks/ --benchmark-only``; not part of ``tests/``)."""

import _path  # noqa: F401
