"""scripts/gpu_session.sh, the two device-tool calls a session makes when a GPU is lent, run here on
the CPU with a tiny grid so that the script cannot rot between GPU sessions (renamed benchmark
flags, a missing output file, a broken stage)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(stage: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    full.pop("TRITON_INTERPRET", None)  # the script runs on whatever the machine has, as on a GPU
    return subprocess.run(["bash", str(SCRIPT), stage], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


def test_usage_error():
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_bench_stage_writes_every_result(tmp_path):
    pytest.importorskip("ropekern._C", reason="the bench stage would build the extension first")
    r = _run("bench", tmp_path, BENCH_DEVICE="cpu", BENCH_GRID="--seqlens 128 --repeats 1 --no-memory", T_BENCH="300")
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    # The device tool returns at most 8 files per command.
    assert names == ["bench.log", "bwd.json", "decode.json", "env.txt", "fwd.json", "rope.json"]
    log = (tmp_path / "bench.log").read_text()
    for step in ("fwd", "bwd", "decode", "rope"):
        assert f"{step} rc=0" in log, log
        data = json.loads((tmp_path / f"{step}.json").read_text())
        assert data, step
    assert "python" in (tmp_path / "env.txt").read_text()


def test_budget_cuts_every_step(tmp_path):
    """BUDGET caps the whole command (the device tool kills it at 600 s): with 1 s left, each
    benchmark is stopped by its own time limit, logged, and the stage still ends at once."""
    r = _run("bench", tmp_path, BENCH_DEVICE="cpu", BUDGET="1")
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "bench.log").read_text()
    assert all(f"{step} rc=124" in log for step in ("fwd", "bwd", "decode", "rope")), log
