"""docs/migrating.md, executed: every ```python block of the migration guide is a test.

Each block writes a peer's call (flash-attention, FlashInfer, vLLM, Liger-Kernel, transformers) as
that peer's published formula in plain PyTorch and asserts that ropekern matches it under the
docs/design.md §5 error-ratio rule (``ropekern.testing.error_check``). A block runs as written
(``BACKEND = "auto"``: the ``cpu`` backend for these CPU tensors) and once more per backend this
machine has (``torch``, ``cpu``, ``triton`` through its interpreter), with its ``BACKEND = "auto"``
line replaced by that name; every ropekern op call in a block passes ``backend=BACKEND``, so each
rerun exercises that backend alone (a named backend never falls back; design.md §2).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ropekern as rk

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
BACKEND_LINE = re.compile(r'^BACKEND = "auto"(?=\s|$)', flags=re.M)
OP_CALL = re.compile(r"\brk\.(?:apply_rope_?|rope_attention(?:_with_kvcache)?)\(")


def _blocks() -> list[tuple[str, int, str]]:
    """``(id, first line number, code)`` of every ```python block, the id from its first comment."""
    text = DOC.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
        code = match.group(1)
        line = text.count("\n", 0, match.start(1)) + 1
        first = code.splitlines()[0] if code.strip() else ""
        slug = re.sub(r"[^a-z0-9]+", "-", first.lstrip("# ").lower()).strip("-")[:60] or f"line-{line}"
        blocks.append((slug, line, code))
    return blocks


BLOCKS = _blocks()


def _run(code: str, line: int) -> None:
    # Leading newlines keep the doc's line numbers in tracebacks.
    exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), {"__name__": "docs_migrating"})


def test_every_block_is_well_formed():
    """Blocks start with a comment naming the peer's call (the test id), ids are unique, and a
    block that calls ropekern's ops defines ``BACKEND = "auto"`` once and passes it to every call."""
    assert len(BLOCKS) >= 10
    ids = [slug for slug, _, _ in BLOCKS]
    assert len(ids) == len(set(ids)), ids
    for slug, line, code in BLOCKS:
        assert code.startswith("# "), f"block at docs/migrating.md:{line} must start with a comment"
        calls = len(OP_CALL.findall(re.sub(r"#.*", "", code)))  # calls, not comments naming them
        if calls:
            assert len(BACKEND_LINE.findall(code)) == 1, f'{slug}: needs one `BACKEND = "auto"` line'
            assert code.count("backend=BACKEND") == calls, f"{slug}: every op call must pass backend=BACKEND"


@pytest.mark.parametrize("backend", ["as-written", "torch", "cpu", "triton"])
@pytest.mark.parametrize(("line", "code"), [(line, code) for _, line, code in BLOCKS], ids=[s for s, _, _ in BLOCKS])
def test_block(line, code, backend):
    if backend != "as-written":
        if not BACKEND_LINE.search(code):
            pytest.skip("the block calls no ropekern op")
        if rk.available_backends().get(backend) is not True:
            pytest.skip(f"backend {backend} unavailable")
        code = BACKEND_LINE.sub(f'BACKEND = "{backend}"', code, count=1)
    _run(code, line)
