"""``ropekern eval passkey|ppl`` on a tiny random Llama checkpoint with a word-level tokenizer (tmp_path)."""

import json
import re

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from ropekern import cli
from ropekern.eval import PasskeyTemplate, needle_perplexity, passkey_samples, passkey_scores

MAX_POS = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def word_tokenizer() -> T.PreTrainedTokenizerFast:
    """Word-level tokenizer over the passkey template's words, digits one token each."""
    t = PasskeyTemplate()
    text = " ".join([t.prefix, t.filler, t.needle, t.question, t.answer]).replace("{passkey}", "")
    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    words = sorted({w for w, _ in split.pre_tokenize_str(text)} | set("0123456789"))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = word_tokenizer()
    config = T.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=MAX_POS,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load(path):
    model = T.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, T.AutoTokenizer.from_pretrained(path, local_files_only=True)


def stock_logits_fn(model, bos=1):
    def fn(ids):
        ids = torch.cat([torch.full((ids.shape[0], 1), bos), ids], dim=1)
        return model(ids, use_cache=False).logits[:, 1:]

    return fn


def test_passkey_json_matches_direct_scoring(checkpoint, capsys):
    argv = ["eval", "passkey", "--model", str(checkpoint), "--lengths", "96", "128", "--depths", "0", "1", "--n", "2"]
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "passkey" and out["patched"] and out["bos"]
    assert [r["length"] for r in out["rows"]] == [96, 128] and set(out["rows"][0]["by_depth"]) == {"0.0", "1.0"}
    # the stock model scored directly with ropekern.eval (positions 0..L with BOS) gives the same numbers
    model, tok = load(checkpoint)
    samples = passkey_samples(tok, [96, 128], [0.0, 1.0], 2, seed=0)
    scores = passkey_scores(stock_logits_fn(model), samples)
    for row, length in zip(out["rows"], [96, 128]):
        mine = [s for smp, s in zip(samples, scores) if smp.length == length]
        assert row["accuracy"] == sum(s.correct for s in mine) / len(mine)
        nll = sum(s.nll for s in mine) / sum(s.n_tokens for s in mine)
        assert row["answer_ppl"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
    # the table form
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\s+96\s+\d\.\d{3}", table, re.M) and "depth 0" in table and "ropekern-patched" in table


def test_ppl_needle_and_text_with_scaling(checkpoint, tmp_path, capsys):
    model, tok = load(checkpoint)
    expected = needle_perplexity(stock_logits_fn(model), passkey_samples(tok, 100, [0.5], 3, seed=4))
    argv = ["eval", "ppl", "--model", str(checkpoint), "--lengths", "100", "--depths", "0.5", "--n", "3", "--seed", "4"]
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["needle_ppl"] == pytest.approx(expected, rel=1e-4)
    assert cli.main([*argv, "--stock", "--json"]) == 0  # stock transformers through the same CLI path
    stock = json.loads(capsys.readouterr().out)
    assert not stock["patched"] and stock["rows"][0]["needle_ppl"] == pytest.approx(expected, rel=1e-4)
    # YaRN x2 changes the model (positions past 128 now interpolated): a different perplexity at 200
    out_file = tmp_path / "r.json"
    assert cli.main(["eval", "ppl", "--model", str(checkpoint), "--lengths", "200", "--json", str(out_file)]) == 0
    plain = json.loads(out_file.read_text())["rows"][0]["needle_ppl"]
    assert cli.main(["eval", "ppl", "--model", str(checkpoint), "--lengths", "200", "--rope-type", "yarn",
                     "--factor", "2", "--json", str(out_file)]) == 0  # fmt: skip
    yarn = json.loads(out_file.read_text())
    assert "yarn" in yarn["rope"] and yarn["rows"][0]["needle_ppl"] != pytest.approx(plain, rel=1e-3)
    text = tmp_path / "t.txt"
    text.write_text(PasskeyTemplate().filler * 20)
    assert cli.main(["eval", "ppl", "--model", str(checkpoint), "--text", str(text), "--window", "48"]) == 0
    assert re.search(r"t\.txt\s+\d+\s+48\s+24\s+\d", capsys.readouterr().out)


def test_bad_input(checkpoint, tmp_path, capsys):
    assert cli.main(["eval", "passkey", "--model", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["eval", "passkey", "--model", str(checkpoint), "--rope-type", "yarn"]) == 2
    assert "--factor" in capsys.readouterr().err
    assert cli.main(["eval", "passkey", "--model", str(checkpoint), "--depths", "1.5"]) == 2
    assert cli.main(["eval", "passkey", "--model", str(checkpoint), "--lengths", "20"]) == 2  # too short a prompt
    assert "shorter than the prompt" in capsys.readouterr().err
    assert cli.main(["eval", "passkey", "--model", str(checkpoint), "--text", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        cli.main(["eval", "passkey"])  # --model is required
