"""bptt score, bptt generate, bptt plot: on a tiny model trained once for the whole module."""

from __future__ import annotations

import json
import math
import random
import re
import sys

import numpy as np
import pytest
import torch

from bptt.cli import main
from bptt.data import EOS, encode
from bptt.engine.stream import Stream
from bptt.evaluation import stream_nats
from bptt.sampling import format_text, sample
from bptt.storage.saved_model import load_model
from bptt.scoring import score_file
from bptt.training.trainer import TrainConfig, train

WORDS = "the a cat dog sat ran on under mat rug big small red fast slowly".split()  # 15 words


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(n)]


# every command below runs on a model of each cell: the seed's Elman model, a tied two-layer LSTM trained
# with dropout (off when scoring and generating), a GRU trained with variational dropout
CELL_MODELS = {"elman": {}, "lstm": dict(cell="lstm", layers=2, dropout=0.3, tied=True),
               "gru": dict(cell="gru", dropout=0.2, variational=True)}


@pytest.fixture(scope="module", params=sorted(CELL_MODELS))
def model_dir(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    (root / "train.txt").write_text("\n".join(_sentences(rng, 60)) + "\n")
    (root / "valid.txt").write_text("\n".join(_sentences(rng, 10)) + "\n")
    out = root / "model"
    train(TrainConfig.from_options(train=str(root / "train.txt"), valid=str(root / "valid.txt"), model=str(out),
                      hidden_size=8, batch=4, bptt=5, epochs=2, progress=False, **CELL_MODELS[request.param]))
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Sentences with OOV words (zebra ×2, quokka ×1) and blank lines, which are skipped."""
    path = tmp_path_factory.mktemp("text") / "test.txt"
    path.write_text("the cat sat on the mat\n\n  \nzebra ran fast\na quokka dog zebra\nbig\n")
    return path


def _reference_ln_probs(model, vocab, path) -> list[float]:
    """Each sentence alone, a plain loop: ln P(w_1..w_n <eos>) from model.log_probs, history <eos>."""
    corpus = encode(path, vocab)
    eos = vocab.id(EOS)
    out = []
    for start, length in zip(corpus.sentence_starts, corpus.sentence_lengths):
        ids = corpus.ids[start : start + length].tolist()
        log_p = Stream(model).log_probs(torch.tensor([eos] + ids[:-1]).unsqueeze(1))
        out.append(sum(float(log_p[t, 0, w]) for t, w in enumerate(ids)))
        assert out[-1] == pytest.approx(-stream_nats(model, np.asarray(ids, np.int32), eos), rel=1e-6)
    return out


# -- score -------------------------------------------------------------------------------------------


def test_score_matches_per_sentence_evaluation(model_dir, text_file):
    model, vocab, _ = load_model(model_dir)
    ref = _reference_ln_probs(model, vocab, text_file)
    result = score_file(model, vocab, text_file)
    assert len(ref) == 4  # blank lines give no sentence
    np.testing.assert_allclose(result.ln_probs, ref, rtol=1e-5, atol=1e-5)
    assert result.tokens.tolist() == [7, 4, 5, 2]
    assert result.oov.tolist() == [0, 1, 2, 0]


def test_score_batches_like_single_sentences(model_dir, tmp_path):
    """More sentences than one batch (64), of mixed lengths: padding must not leak into any score."""
    model, vocab, _ = load_model(model_dir)
    path = tmp_path / "many.txt"
    path.write_text("\n".join(_sentences(random.Random(5), 150)) + "\n")
    result = score_file(model, vocab, path)
    np.testing.assert_allclose(result.ln_probs, _reference_ln_probs(model, vocab, path), rtol=1e-5, atol=1e-5)


def test_score_cli_log10_ln_and_summary(model_dir, text_file, capsys):
    model, vocab, _ = load_model(model_dir)
    ref = _reference_ln_probs(model, vocab, text_file)
    assert main(["score", "--model", str(model_dir), "--text", str(text_file)]) == 0
    captured = capsys.readouterr()
    log10 = [float(x) for x in captured.out.split("\n") if x]
    assert len(log10) == 4  # one line per non-blank input line
    np.testing.assert_allclose(log10, np.asarray(ref) / math.log(10), atol=2e-6)
    summary = captured.err.strip()
    assert len(summary.splitlines()) == 1
    assert "4 lines" in summary and "18 tokens" in summary and "3 OOV" in summary
    total = float(re.search(r"total log10 prob (\S+),", summary).group(1))
    assert total == pytest.approx(sum(ref) / math.log(10), abs=1e-3)
    assert f"perplexity {math.exp(-sum(ref) / 18):.2f}" in summary

    assert main(["score", "--model", str(model_dir), "--text", str(text_file), "--ln"]) == 0
    ln = [float(x) for x in capsys.readouterr().out.split()]
    np.testing.assert_allclose(ln, np.asarray(log10) * math.log(10), atol=1e-5)


def test_perplexity_that_overflows_is_inf_in_score_and_eval():
    """A diverged model's mean over 700 nats a token: inf in `bptt score`'s summary (as in `bptt eval`), not
    an OverflowError; the three places that turn entropy into perplexity share one guard."""
    from bptt.evaluation import Evaluation
    from bptt.scoring import ScoredText
    from bptt.training.trainer import perplexity

    text = ScoredText(np.array([-800.0 * 3, -800.0 * 2]), np.array([3, 2]), None)
    assert text.perplexity == math.inf
    assert ScoredText(np.array([-6.0, -4.0]), np.array([3, 2]), None).perplexity == pytest.approx(math.e ** 2)
    assert Evaluation(nats=4000.0, tokens=5, oov=0).perplexity == math.inf
    assert perplexity(2000.0) == math.inf and perplexity(3.0) == pytest.approx(8.0)


def test_score_cli_json(model_dir, text_file, capsys):
    assert main(["score", "--model", str(model_dir), "--text", str(text_file), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sentence"] for r in records] == [1, 2, 3, 4]
    assert [r["oov"] for r in records] == [0, 1, 2, 0]
    assert [r["tokens"] for r in records] == [7, 4, 5, 2]
    assert all(r["log10_prob"] < 0 for r in records)


def test_score_missing_file_is_one_line_exit_2(model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["score", "--model", str(model_dir), "--text", str(missing)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(missing) in err and "Traceback" not in err


# -- generate ----------------------------------------------------------------------------------------


def _generate(capsys, model_dir, *extra) -> str:
    assert main(["generate", "--model", str(model_dir), "--words", "30", *extra]) == 0
    return capsys.readouterr().out


def test_generate_is_reproducible_per_seed(model_dir, capsys):
    a = _generate(capsys, model_dir, "--seed", "1")
    b = _generate(capsys, model_dir, "--seed", "1")
    c = _generate(capsys, model_dir, "--seed", "2")
    assert a == b and a != c
    assert a.strip() and "<eos>" not in a
    assert set(a.split()) <= set(WORDS) | {"<unk>"}


def test_generate_prints_prompt_first_and_one_sentence_per_line(model_dir, capsys):
    model, vocab, _ = load_model(model_dir)
    out = _generate(capsys, model_dir, "--prompt", "the big cat", "--seed", "3")
    assert out.startswith("the big cat")
    words = sample(model, vocab, 30, prompt=["the", "big", "cat"], seed=3)
    assert out == format_text(["the", "big", "cat"] + words) + "\n"
    assert len(out.splitlines()) == words.count(EOS) + (words[-1] != EOS)


def test_top_k_1_is_the_argmax_chain(model_dir, capsys):
    model, vocab, _ = load_model(model_dir)
    prompt = ["the", "dog"]
    history = [vocab.id(EOS)] + [vocab.id(w) for w in prompt]
    stream = Stream(model)  # carries every layer's state from one call to the next
    log_p = stream.log_probs(torch.tensor(history).unsqueeze(1))
    expected = []
    for _ in range(20):
        word = int(log_p[-1, 0].argmax())
        expected.append(vocab.words[word])
        log_p = stream.log_probs(torch.tensor([[word]]))
    for seed in (0, 1):
        assert sample(model, vocab, 20, top_k=1, prompt=prompt, seed=seed) == expected
    out = _generate(capsys, model_dir, "--top-k", "1", "--prompt", "the dog", "--seed", "9")
    assert out == format_text(prompt + sample(model, vocab, 30, top_k=1, prompt=prompt)) + "\n"
    for temperature in (1e-308, 5e-324):  # log_p / T would overflow to -inf everywhere: the chain is greedy
        assert sample(model, vocab, 20, temperature=temperature, prompt=prompt, seed=3) == expected


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_generate_bad_temperature_is_one_line_exit_2(model_dir, value, capsys):
    assert main(["generate", "--model", str(model_dir), "--temperature", value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--temperature" in err and "Traceback" not in err


def test_format_text():
    assert format_text(["a", "b", EOS, "c", EOS]) == "a b\nc"
    assert format_text(["a", EOS, EOS, "b"]) == "a\n\nb"
    assert format_text(["h", "i", " ", "x", EOS], unit="char") == "hi x"


# -- plot --------------------------------------------------------------------------------------------

METRICS = [
    {"epoch": 1, "lr": 5.0, "train_entropy_bits": 9.1, "valid_entropy_bits": 8.2, "valid_perplexity": 294.1,
     "accepted": True, "seconds": 3.0, "tokens_per_s": 1000.0},
    {"epoch": 2, "lr": 5.0, "train_entropy_bits": 7.9, "valid_entropy_bits": 7.6, "valid_perplexity": 194.0,
     "accepted": True, "seconds": 3.0, "tokens_per_s": 1000.0},
    {"epoch": 3, "lr": 2.5, "train_entropy_bits": 7.5, "valid_entropy_bits": 7.7, "valid_perplexity": 207.9,
     "accepted": False, "seconds": 3.0, "tokens_per_s": 1000.0},
]


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    assert main(["plot", "--model", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert capsys.readouterr().out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    out = tmp_path / "other.png"
    assert main(["plot", "--model", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_real_training_run(model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.png"
    assert main(["plot", "--model", str(model_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_malformed_line_names_file_and_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    lines = [json.dumps(METRICS[0]), "{not json", json.dumps(METRICS[1])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["plot", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'metrics.jsonl'}:2:" in err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({**METRICS[0], "lr": "fast"}) + "\n")
    assert main(["plot", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'metrics.jsonl'}:1:" in err and "'lr'" in err
    assert not (tmp_path / "curves.png").exists()
    for junk in ("[" * 100_000 + "]" * 100_000, '{"epoch": ' + "1" * 5001 + "}"):  # too deep; too many digits
        (tmp_path / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n" + junk + "\n")
        assert main(["plot", "--model", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'metrics.jsonl'}:2:" in err


@pytest.mark.parametrize("key, value", [("train_entropy_bits", 1024.0), ("valid_entropy_bits", -1.0),
                                        ("lr", -0.5), ("epoch", 1e300)])
def test_plot_refuses_values_no_training_run_writes(tmp_path, capsys, key, value):
    """2 ** 1024 overflows a float, an epoch of 1e300 breaks the axis: refused as bad input, naming the line."""
    pytest.importorskip("matplotlib")
    lines = [json.dumps(METRICS[0]), json.dumps({**METRICS[1], key: value})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["plot", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'metrics.jsonl'}:2:" in err and repr(key) in err
    assert not (tmp_path / "curves.png").exists()


def test_plot_missing_metrics_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plot", "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "metrics.jsonl" in err and "no such file" in err


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["plot", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: bptt plot needs matplotlib: pip install 'bptt[plot]'"
