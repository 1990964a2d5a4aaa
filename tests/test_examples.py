"""Smoke test of the context-extension example: it runs end to end and writes its outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_extend_context_quick(tmp_path):
    pytest.importorskip("matplotlib")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "extend_context.py"),
            "--quick",
            "--out",
            str(tmp_path),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| PI + FT |" in proc.stdout and "| extrapolation |" in proc.stdout
    for name in ("table.md", "results.json", "extend_context.png", "base_seed0.pt", "search_seed0.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) >= {"extrapolation", "PI", "NTK", "YaRN", "PI + FT", "LongRoPE (searched)"}
    for row in results["summary"].values():
        assert 0.0 <= row["acc_short"][0] <= 1.0 and 0.0 <= row["acc_long"][0] <= 1.0
    curves = results["per_seed"]["0"]["finetune_curves"]
    assert [step for step, _ in curves["PI + FT"]] == [0, 2, 4]  # probes every 2 of 4 quick steps


def tiny_model():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import tiny_model
    finally:
        sys.path.pop(0)
    return tiny_model


def test_tiny_model_train_save_load_deterministic(tmp_path):
    import torch

    tm = tiny_model()
    tok = tm.WordTokenizer.for_template()
    assert tok.decode(tok.encode("The pass key is 71432. Remember it.")) == "The pass key is 71432. Remember it."

    def trained():
        torch.manual_seed(0)
        model = tm.TinyLM(tm.TinyConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_kv_heads=1, train_len=72))
        losses = tm.train(model, tok, steps=3, length=72, batch_size=4, seed=0)
        return model, losses

    model, losses = trained()
    again, losses2 = trained()
    assert losses == losses2  # deterministic for a seed
    ids = torch.tensor([tok.encode("The grass is green. The sky is blue.")])
    torch.testing.assert_close(model(ids), again(ids), rtol=0, atol=0)
    # GQA folded over the batch gives the same logits as one row at a time.
    batch = torch.tensor([tok.encode("The grass is green."), tok.encode("The sun is yellow.")])
    torch.testing.assert_close(model(batch), torch.cat([model(batch[:1]), model(batch[1:])]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(batch), model(batch, positions=torch.arange(5).expand(2, 5)), rtol=1e-5, atol=1e-5)
    # Swapping the RoPE scaling changes the logits beyond the first position only.
    model.rope = tm.scaled_rope(model.config, "linear", 4.0)
    pi = model(ids)
    torch.testing.assert_close(pi[:, 0], again(ids)[:, 0])
    assert not torch.allclose(pi, again(ids))
    tm.save(model, tok, tmp_path / "m.pt")
    loaded, tok2 = tm.load(tmp_path / "m.pt")
    assert tok2.vocab == tok.vocab and loaded.rope == model.rope
    torch.testing.assert_close(loaded(ids), pi, rtol=0, atol=0)


def test_extend_context_excludes_untrained_seeds(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import extend_context
    finally:
        sys.path.pop(0)
    argv = ["--out", str(tmp_path), "--seeds", "3", "--threads", "1", "--train-len", "80", "--train-steps", "2",
            "--batch", "2", "--eval-n", "1", "--depths", "0.5", "--min-base-acc", "0.5"]  # fmt: skip
    assert extend_context.main(argv) == 1  # 2 steps learn nothing: the seed is excluded, no table
    assert "seed 3: base model scores 0.000 at 80 < 0.5: excluded" in capsys.readouterr().out
    assert not (tmp_path / "table.md").exists()


def test_parallel_context_windows_and_nbce(tmp_path):
    import torch

    pytest.importorskip("matplotlib")
    tm = tiny_model()
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import context_windows
    finally:
        sys.path.pop(0)
    tok = tm.WordTokenizer.for_template()
    torch.manual_seed(0)
    model = tm.TinyLM(tm.TinyConfig(vocab_size=len(tok), n_heads=4, n_kv_heads=2)).eval()
    w = torch.tensor(tok.encode("The grass is green. The pass key is 12345. Remember it."))
    w2 = torch.tensor(tok.encode("The sky is blue."))
    t = torch.tensor(tok.encode("What is the pass key? The pass key is 1 2"))
    with torch.no_grad():
        # One window: exactly the ordinary forward of window + task (up to fp32 rounding).
        torch.testing.assert_close(model.forward_windows([w], t), model(torch.cat([w, t])[None])[0, len(w) :])
        # Windows share positions: the task sees both, and their order does not matter.
        both = model.forward_windows([w, w2], t)
        torch.testing.assert_close(both, model.forward_windows([w2, w], t), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(both, model.forward_windows([w], t))
    tm.save(model, tok, tmp_path / "base_seed0.pt")
    argv = ["--models", str(tmp_path), "--out", str(tmp_path / "cw"), "--eval-n", "1", "--depths", "0.5",
            "--threads", "1"]  # fmt: skip
    assert context_windows.main(argv) == 0
    assert "| NBCE (min-entropy) |" in (tmp_path / "cw" / "table.md").read_text()
    assert (tmp_path / "cw" / "context_windows.png").stat().st_size > 0


def test_readme_real_model_table_is_the_example_output():
    """The README's real-model table is ``examples/real_model.py``'s ``table.md``, not typed; its rows
    are ropekern's, with transformers' beside them where it has the law (and they agree)."""
    out = ROOT / "examples" / "results" / "real_model"
    table = (out / "table.md").read_text()
    assert table.strip() in (ROOT / "README.md").read_text()
    results = json.loads((out / "results.json").read_text())
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import real_model
    finally:
        sys.path.pop(0)
    assert real_model.table(results) == table  # table.md is the report of results.json
    rows = results["ppl"]
    ours = {(r["law"], r["factor"], r["length"]): r for r in rows if r["impl"] == "ropekern"}
    for r in (r for r in rows if r["impl"] == "transformers"):
        mine = ours[(r["law"], r["factor"], r["length"])]["buckets"]
        # 1e-4 wherever the model reads the text. Where it has lost it (extrapolation at 16K-32K,
        # bucket perplexities 1,000-6,000) its predictions swing with any change of the angles, and
        # stock's fp32 angles there are p * 2^-24 ~ 1-2e-3 rad off ropekern's exact ones: up to 2e-3.
        assert all(abs(a - b) <= (1e-4 if b < 1000 else 1e-2) * b for a, b in zip(mine, r["buckets"]))
