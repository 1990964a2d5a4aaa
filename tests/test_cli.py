"""The ropekern command line: info and check (bench has its own tests)."""

import subprocess
import sys

import pytest

from ropekern import _cli_check
from ropekern.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ropekern" in out and "torch" in out and "backends:" in out


def test_check_quick_passes(capsys):
    assert main(["check", "--quick", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "cases passed" in out and "FAIL" not in out


def test_check_fails_on_a_broken_backend(monkeypatch, capsys):
    """The check must be able to fail: corrupt the backend's output and expect exit 1."""
    from ropekern.backends.pytorch import backend as torch_backend

    real = torch_backend.attention

    def broken(call):
        out, lse = real(call)
        return out * 1.01, lse

    monkeypatch.setattr(torch_backend, "attention", broken)
    assert main(["check", "--quick", "--backend", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_unknown_backend_is_an_error(capsys):
    assert main(["check", "--quick", "--backend", "nope"]) == 1


def test_no_command_prints_help(capsys):
    assert main([]) == 2


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "ropekern", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backends:" in proc.stdout


@pytest.mark.parametrize("quick", [True, False])
def test_case_sweep_shapes(quick):
    cases = list(_cli_check._cases(quick))
    assert cases and all(c["kind"] in _cli_check.ROPES for c in cases)
