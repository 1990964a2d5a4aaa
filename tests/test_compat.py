"""What ropekern declares about the versions of the libraries it depends on is what it checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_range(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = set(re.findall(rf'"{name}([<>=!~][^";]*)', text))
    assert len(found) == 1, f"{name} is declared with different ranges: {found}"
    return found.pop()


def test_triton_floor_matches_pyproject():
    """The triton backend refuses releases below the floor pyproject.toml declares."""
    pytest.importorskip("triton")
    from ropekern import _triton

    floor = re.search(r">=(\d+)\.(\d+)", _pyproject_range("triton"))
    assert tuple(int(x) for x in floor.groups()) == _triton.MIN_TRITON


def test_triton_version_reasons(monkeypatch):
    """Too old a Triton, or Triton 3.6's interpreter with numpy >= 2.4, makes the backend say why."""
    pytest.importorskip("triton")
    import numpy
    import triton

    from ropekern import _triton

    monkeypatch.setattr(triton, "__version__", "3.5.1")
    assert "older than 3.6" in _triton.version_reason()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(_triton, "INTERPRET", True)
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert "numpy 2.4.0" in _triton.version_reason() and "Triton >= 3.7" in _triton.version_reason()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert _triton.version_reason() is None
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    monkeypatch.setattr(triton, "__version__", "3.7.1")
    assert _triton.version_reason() is None
    monkeypatch.setattr(_triton, "INTERPRET", False)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert _triton.version_reason() is None  # compiled kernels do not use numpy


def test_info_reports_declared_ranges(capsys, monkeypatch):
    """``ropekern info`` prints each range and whether the installed version is inside it."""
    from ropekern import _cli_info

    monkeypatch.setattr(_cli_info, "declared_ranges", lambda: {"transformers": ">=5.17,<5.26", "numpy": "<0.1"})
    assert _cli_info.run(None) == 0
    out = capsys.readouterr().out
    import numpy

    assert re.search(r"transformers +\S+ +\(supported >=5.17,<5.26: (yes|NO)", out)
    assert f"numpy        {numpy.__version__}  (supported <0.1: NO, outside the tested range)" in out


def test_installed_metadata_matches_pyproject():
    """An installed ropekern declares pyproject.toml's transformers and triton ranges (a stale
    editable install, e.g. after editing pyproject.toml without reinstalling, fails here)."""
    from ropekern._cli_info import declared_ranges

    ranges = declared_ranges()
    if not ranges:
        pytest.skip("ropekern runs from the source tree without being installed (compat venvs)")
    for name in ("transformers", "triton"):
        want = {s.strip() for s in _pyproject_range(name).split(",")}
        assert set(ranges[name].split(",")) == want, (name, ranges[name], want)


def test_compat_script_oldest_set_is_the_declared_floor():
    """scripts/compat.sh tests, by default, the oldest transformers and triton pyproject.toml allows."""
    text = (ROOT / "scripts" / "compat.sh").read_text()
    tf, tr, _ = re.search(r"^oldest=(\S+)/(\S+)/(\S+)$", text, re.M).groups()
    for name, version in (("transformers", tf), ("triton", tr)):
        floor = re.search(r">=([\d.]+)", _pyproject_range(name)).group(1)
        assert version.split(".")[:2] == floor.split(".")[:2], (name, version, floor)
