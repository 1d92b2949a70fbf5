"""benchmarks/make_corpus.py: the synthetic One-Billion-Word-shaped corpus (issue 18, item 5)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bptt.data import EOS, UNK, Vocab, encode

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "make_corpus.py"
_spec = importlib.util.spec_from_file_location("make_corpus", _PATH)
mc = importlib.util.module_from_spec(_spec)
sys.modules["make_corpus"] = mc
_spec.loader.exec_module(mc)

SMALL = mc.Params(vocab=2000, classes=50, successors=5, seed=1)


@pytest.fixture(scope="module")
def small():
    return mc.Process(SMALL)


def text_of(process, tokens, split=0, chunk=mc.CHUNK_SENTENCES) -> str:
    f = io.BytesIO()
    mc.write_split(process, f, tokens, split, chunk=chunk)
    return f.getvalue().decode("ascii")


def lines_of(text: str) -> list[list[str]]:
    assert text.endswith("\n")
    return [line.split(" ") for line in text[:-1].split("\n")]


def test_deterministic_given_the_seed(tmp_path):
    params = mc.Params(vocab=3000, classes=40, seed=7)
    for name in ("a.txt", "b.txt", "a.txt.gz", "b.txt.gz"):
        mc.generate(params, 3000, out=str(tmp_path / name))
    a = (tmp_path / "a.txt").read_bytes()
    assert a == (tmp_path / "b.txt").read_bytes()
    assert (tmp_path / "a.txt.gz").read_bytes() == (tmp_path / "b.txt.gz").read_bytes()  # gzip too (mtime 0)
    assert gzip.decompress((tmp_path / "a.txt.gz").read_bytes()) == a
    mc.generate(mc.Params(vocab=3000, classes=40, seed=8), 3000, out=str(tmp_path / "c.txt"))
    assert (tmp_path / "c.txt").read_bytes() != a


def test_token_count_exact_and_lengths_in_bounds(small):
    lo, hi = SMALL.min_length, SMALL.max_length
    # tiny chunks put the cut at every place: first sentence of a chunk, remainder below lo, tiny corpora
    for tokens in [5, 6, 9, 49, 50, 51, 52, 54, 55, 99, 101, 137, 250, 999]:
        for chunk in (1, 2, 3, 7, 64):
            lines = lines_of(text_of(small, tokens, chunk=chunk))
            assert sum(len(words) for words in lines) == tokens, (tokens, chunk)
            assert all(lo <= len(words) <= hi for words in lines), (tokens, chunk)
            assert all(w for words in lines for w in words)  # one space between words, none at the ends
    with pytest.raises(ValueError):
        text_of(small, 4)  # fewer words than one sentence can hold
    with pytest.raises(ValueError):
        text_of(mc.Process(mc.Params(vocab=100, classes=5, min_length=5, max_length=5, mean_length=5)), 12)


def test_sentence_lengths_have_the_requested_mean(small):
    lengths = np.array([len(w) for w in lines_of(text_of(small, 100_000))])
    assert lengths.min() == 5 and lengths.max() <= 50
    assert abs(lengths.mean() - 25) < 0.5  # 4000 sentences: standard error 0.13
    assert lengths.std() > 5  # lengths vary (sd of the law: 8.6)
    other = mc.Process(mc.Params(vocab=2000, classes=50, min_length=3, max_length=20, mean_length=12))
    lengths = np.array([len(w) for w in lines_of(text_of(other, 30_000))])
    assert lengths.min() >= 3 and lengths.max() <= 20 and abs(lengths.mean() - 12) < 0.3


def zipf_slope(text: str, ranks: int = 1000) -> float:
    counts = np.array(sorted(Counter(text.split()).values(), reverse=True)[:ranks], float)
    r = np.arange(1, len(counts) + 1)
    return float(np.polyfit(np.log(r), np.log(counts), 1)[0])


def test_zipf_rank_frequency_slope():
    text = text_of(mc.Process(mc.Params(vocab=10_000, classes=100, seed=2)), 200_000)
    assert -1.1 < zipf_slope(text) < -0.9
    text = text_of(mc.Process(mc.Params(vocab=10_000, classes=100, zipf=1.3, seed=2)), 100_000)
    assert -1.4 < zipf_slope(text, 300) < -1.2


def test_bigram_structure_present(small):
    """A bigram model (interpolated with the unigram) estimated on 100k words predicts the next 20k
    better than the unigram alone; on text without the Markov structure it is worse (measured: 7.08
    against 8.14 bits a word here, 8.44 against 8.13 with --backoff 1)."""
    words = text_of(small, 120_000).split()
    index = {w: i for i, w in enumerate(dict.fromkeys(words))}
    ids = np.array([index[w] for w in words])
    train, test = ids[:100_000], ids[100_000:]
    unigram = (np.bincount(train, minlength=len(index)) + 1) / (len(train) + len(index))
    pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
    previous = np.bincount(train[:-1], minlength=len(index))
    bigram = np.array([pairs[a, b] / previous[a] if previous[a] else 0.0
                       for a, b in zip(test[:-1].tolist(), test[1:].tolist())])
    h_unigram = -np.log2(unigram[test[1:]]).mean()
    h_bigram = -np.log2(0.5 * bigram + 0.5 * unigram[test[1:]]).mean()
    assert h_bigram < h_unigram - 0.5, (h_bigram, h_unigram)
    assert small.entropy()["mutual_information_bits"] > 1.5


def test_implied_entropy_is_the_cross_entropy_of_the_true_model(small):
    """−log2 P(text) under the process, per token (<eos> included), is the entropy that it reports."""
    rng = np.random.default_rng(5)
    lengths = small.sample_lengths(8000, rng)
    words = small.sample_chunk(lengths, rng)
    per_token = -small.log2prob(words, lengths) / (len(words) + len(lengths))
    e = small.entropy()
    assert per_token == pytest.approx(e["entropy_bits_per_token"], abs=0.03)  # standard error ≈ 0.007
    assert e["entropy_bits_per_token"] < e["unigram_entropy_bits_per_token"] - 1.0
    # every position has the Zipf unigram law (the class chain is stationary at P(c))
    late = words[np.cumsum(lengths)[lengths >= 20] - lengths[lengths >= 20] + 18]  # position 19 of long lines
    top = np.bincount(late, minlength=small.params.vocab)[:3] / len(late)
    assert top == pytest.approx(small.p[:3], rel=0.1)


def test_words_unique_pronounceable_never_special():
    table, lengths = mc.word_strings(800_000, np.random.default_rng(0))
    rows = table.view(f"V{table.shape[1]}").ravel()
    assert len(np.unique(rows)) == 800_000
    letters = table[np.arange(table.shape[1]) < lengths[:, None] - 1]
    assert letters.min() >= ord("a") and letters.max() <= ord("z")
    assert (table[np.arange(800_000), lengths - 1] == ord(" ")).all()
    words = {bytes(table[i, : lengths[i] - 1]).decode() for i in range(0, 800_000, 997)}
    assert EOS not in words and UNK not in words
    assert lengths[:100].max() < lengths[-1]  # the frequent words are the short ones


def test_bptt_reads_the_splits(tmp_path):
    out = tmp_path / "c"
    summary = mc.generate(mc.Params(vocab=500, classes=20, seed=3), 4000, out_dir=str(out),
                          valid_fraction=0.1, gzip_files=True)
    saved = json.loads((out / "corpus.json").read_text())
    assert saved["files"] == summary["files"]
    vocab = Vocab.build(out / "train.txt.gz")
    assert EOS in vocab.index and vocab.counts[1] == 0  # no literal <unk>
    train = encode(out / "train.txt.gz", vocab)
    files = summary["files"]
    assert train.tokens == 4000 + files["train"]["sentences"] == files["train"]["tokens_with_eos"]
    valid = encode(out / "valid.txt.gz", vocab)
    assert valid.tokens - len(valid.sentence_starts) == 400
    assert valid.oov_rate < 0.05  # the held-out words are drawn from the same process
    assert (out / "valid.txt.gz").read_bytes() != (out / "test.txt.gz").read_bytes()


def test_command_line(tmp_path, capsys):
    assert mc.main(["--tokens", "1500", "--vocab", "300", "--classes", "10", "--out-dir", str(tmp_path),
                    "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.json", "test.txt", "train.txt", "valid.txt"]
    assert summary["files"]["valid"]["words"] == 15
    entropy = summary["entropy"]
    assert 0 < entropy["entropy_bits_per_token"] < entropy["unigram_entropy_bits_per_token"]
    with pytest.raises(SystemExit) as e:
        mc.main(["--tokens", "100", "--vocab", "10", "--classes", "20", "--out", str(tmp_path / "x.txt")])
    assert e.value.code == 2
