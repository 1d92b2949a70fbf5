"""Corpora, vocabulary and batching (bptt.data)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from bptt.data import (
    EOS,
    UNK,
    Corpus,
    CorpusError,
    SentenceBatches,
    StreamBatches,
    Vocab,
    encode,
    read_lines,
)

TRAIN = "the cat sat\n\nthe dog sat down\n   \nthe cat ran\n"


def write(tmp_path, name, text: str | bytes):
    p = tmp_path / name
    if isinstance(text, str):
        text = text.encode("utf-8")
    p.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    return p


# ---------------------------------------------------------------- reading


def test_read_words_skips_blank_lines(tmp_path):
    p = write(tmp_path, "train.txt", TRAIN)
    expected = [["the", "cat", "sat"], ["the", "dog", "sat", "down"], ["the", "cat", "ran"]]
    assert list(read_lines(p)) == expected


def test_read_chars(tmp_path):
    p = write(tmp_path, "c.txt", " ab c\n\nçé\n")
    assert list(read_lines(p, unit="char")) == [["a", "b", " ", "c"], ["ç", "é"]]


def test_read_gz(tmp_path):
    p = write(tmp_path, "train.txt.gz", TRAIN)
    assert list(read_lines(p)) == list(read_lines(write(tmp_path, "plain.txt", TRAIN)))


def test_bad_utf8_names_file_and_line(tmp_path):
    p = write(tmp_path, "bad.txt", b"ok line\nfine too\nbad \xff byte\nlast\n")
    with pytest.raises(CorpusError) as e:
        list(read_lines(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: ") and "\n" not in msg


def test_bad_utf8_in_gz(tmp_path):
    p = write(tmp_path, "bad.txt.gz", b"a\n\xc3\n")
    with pytest.raises(CorpusError, match=r"bad\.txt\.gz:2: "):
        list(read_lines(p))


def test_empty_and_missing(tmp_path):
    p = write(tmp_path, "empty.txt", "\n  \n\n")
    with pytest.raises(CorpusError) as e:
        list(read_lines(p))
    assert str(e.value) == f"{p}: empty corpus"
    with pytest.raises(CorpusError) as e:
        read_lines(tmp_path / "nope.txt")
    assert str(e.value) == f"{tmp_path / 'nope.txt'}: no such file"
    with pytest.raises(CorpusError, match="empty corpus"):
        Vocab.build(p)


def test_unknown_unit(tmp_path):
    p = write(tmp_path, "t.txt", TRAIN)
    with pytest.raises(ValueError, match="--unit"):
        read_lines(p, unit="byte")


# ---------------------------------------------------------------- vocabulary


def test_vocab_order_and_counts(tmp_path):
    v = Vocab.build(write(tmp_path, "t.txt", TRAIN))
    # the:3, cat:2, sat:2 (cat first), dog:1, down:1, ran:1 by first appearance
    assert v.words == [EOS, UNK, "the", "cat", "sat", "dog", "down", "ran"]
    assert v.counts == [3, 0, 3, 2, 2, 1, 1, 1]
    assert len(v) == 8 and v.index["sat"] == 4
    assert v.id("cat") == 3 and v.id("zebra") == 1 and v.id(EOS) == 0


def test_vocab_min_count_and_max_vocab(tmp_path):
    p = write(tmp_path, "t.txt", TRAIN)
    v = Vocab.build(p, min_count=2)
    assert v.words == [EOS, UNK, "the", "cat", "sat"]
    assert v.counts == [3, 3, 3, 2, 2]
    v = Vocab.build(p, max_vocab=4)
    assert v.words == [EOS, UNK, "the", "cat"]
    assert v.counts == [3, 5, 3, 2]
    assert sum(v.counts) == 13  # 10 words + 3 eos
    with pytest.raises(ValueError):
        Vocab.build(p, max_vocab=1)


def test_literal_unk_merged(tmp_path):
    v = Vocab.build(write(tmp_path, "t.txt", "a <unk> b\n<unk> a rare\n"), min_count=2)
    assert v.words == [EOS, UNK, "a"]
    assert v.words.count(UNK) == 1
    assert v.counts == [2, 4, 2]  # 2 literal <unk> + b + rare


def test_vocab_json_round_trip(tmp_path):
    v = Vocab.build(write(tmp_path, "t.txt", "héllo wörld héllo\n"), unit="word")
    w = Vocab.from_json(json.loads(json.dumps(v.to_json())))
    assert (w.words, w.counts, w.index, w.unit) == (v.words, v.counts, v.index, v.unit)
    path = tmp_path / "vocab.json"
    v.save(path)
    u = Vocab.load(path)
    assert (u.words, u.counts, u.unit) == (v.words, v.counts, v.unit)
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".vocab-")] == []  # no temp left


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"format": "bptt-vocab", "version": 1, "words": ["a", "b"], "counts": [1, 1]}),
        json.dumps({"format": "bptt-vocab", "version": 1, "words": [EOS, UNK, "a"], "counts": [1]}),
        json.dumps({"format": "bptt-vocab", "version": 1, "words": [EOS, UNK, "a", "a"], "counts": [1] * 4}),
        json.dumps({"format": "bptt-vocab", "version": 99, "words": [EOS, UNK], "counts": [1, 1]}),
    ],
)
def test_vocab_load_malformed(tmp_path, content):
    p = write(tmp_path, "v.json", content)
    with pytest.raises(CorpusError) as e:
        Vocab.load(p)
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)


def test_vocab_load_missing(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        Vocab.load(tmp_path / "none.json")


# ---------------------------------------------------------------- encoding


def test_encode_ids_and_oov(tmp_path):
    v = Vocab.build(write(tmp_path, "t.txt", TRAIN))
    c = encode(write(tmp_path, "valid.txt", "the zebra sat\n\nunseen cat <unk>\n"), v)
    the, cat, sat = v.id("the"), v.id("cat"), v.id("sat")
    assert c.ids.dtype == np.int32 and c.sentence_starts.dtype == np.int64
    assert c.ids.tolist() == [the, 1, sat, 0, 1, cat, 1, 0]
    assert c.sentence_starts.tolist() == [0, 4]
    assert c.tokens == 8 and c.oov == 2  # the literal <unk> is not an OOV
    assert c.oov_rate == pytest.approx(2 / 8)
    assert c.sentence_lengths.tolist() == [4, 4]
    assert c.path.endswith("valid.txt")


def test_encode_chars(tmp_path):
    p = write(tmp_path, "c.txt", "ab a\nba\n")
    v = Vocab.build(p, unit="char")
    c = encode(p, v, unit="char")
    assert [v.words[i] for i in c.ids] == ["a", "b", " ", "a", EOS, "b", "a", EOS]
    assert c.oov == 0


# ---------------------------------------------------------------- stream batches


@pytest.mark.parametrize("n,B,T", [(23, 3, 4), (24, 3, 7), (10, 1, 3), (9, 4, 1), (50, 5, 100)])
def test_stream_batches_line_up(n, B, T):
    ids = np.arange(100, 100 + n, dtype=np.int32)
    sb = StreamBatches(ids, B, T)
    L = (n - 1) // B
    assert len(sb) == -(-L // T)
    blocks = list(sb)
    assert len(blocks) == len(sb)
    for i, (x, y) in enumerate(blocks):
        assert x.dtype == y.dtype == torch.int64
        expected_T = T if i < len(sb) - 1 else L - T * (len(sb) - 1)
        assert x.shape == y.shape == (expected_T, B)
        assert torch.equal(y[:-1], x[1:])
        if i + 1 < len(blocks):
            assert torch.equal(blocks[i + 1][0][0], y[-1])
    xs = torch.cat([x for x, _ in blocks])
    ys = torch.cat([y for _, y in blocks])
    for b in range(B):
        assert xs[:, b].tolist() == ids[b * L : b * L + L].tolist()
        assert ys[:, b].tolist() == ids[b * L + 1 : b * L + L + 1].tolist()


def test_stream_last_short_block_and_resume():
    sb = StreamBatches(np.arange(21), batch_size=2, block=4)  # L = 10 -> blocks of 4, 4, 2
    assert len(sb) == 3
    assert [x.shape[0] for x, _ in sb] == [4, 4, 2]
    resumed = list(sb.iter_from(1))
    assert len(resumed) == 2 and torch.equal(resumed[0][0], sb.block(1)[0])
    with pytest.raises(IndexError):
        sb.block(3)


def test_stream_too_short():
    with pytest.raises(ValueError, match="--batch"):
        StreamBatches(np.arange(4), batch_size=4, block=2)
    StreamBatches(np.arange(5), batch_size=4, block=2)  # L = 1 is enough


# ---------------------------------------------------------------- sentence batches


def _corpus(tmp_path):
    text = "a b c\nd\nb b b b a\nc a\nd d\n"
    v = Vocab.build(write(tmp_path, "s.txt", text))
    return v, encode(tmp_path / "s.txt", v)


def _sentences(corpus: Corpus) -> list[list[int]]:
    ends = list(corpus.sentence_starts[1:]) + [len(corpus.ids)]
    return [corpus.ids[s:e].tolist() for s, e in zip(corpus.sentence_starts, ends)]


def _columns(batches: SentenceBatches):
    for x, y, m in batches:
        assert x.dtype == y.dtype == torch.int64 and m.dtype == torch.bool
        assert x.shape == y.shape == m.shape
        assert m.any(0).all()
        assert m.sum(0).max() == x.shape[0]  # padded only to the longest in the batch
        assert (x[~m] == 0).all() and (y[~m] == 0).all()
        for b in range(x.shape[1]):
            n = int(m[:, b].sum())
            assert m[:n, b].all() and not m[n:, b].any()  # padding is at the end
            yield x[:n, b].tolist(), y[:n, b].tolist()


def test_sentence_batches_reconstruct(tmp_path):
    _, c = _corpus(tmp_path)
    sents = _sentences(c)
    sb = SentenceBatches(c, batch_size=2)
    assert len(sb) == 3
    cols = list(_columns(sb))
    assert [y for _, y in cols] == sents
    assert [x for x, _ in cols] == [[0] + s[:-1] for s in sents]
    assert sum(int(m.sum()) for _, _, m in sb) == c.tokens
    x, y, m = sb.batch(2)
    assert x.shape[1] == 1  # last partial batch, no fake columns
    with pytest.raises(IndexError):
        sb.batch(3)


def test_sentence_batches_shuffle(tmp_path):
    _, c = _corpus(tmp_path)
    sents = _sentences(c)
    one = [y for _, y in _columns(SentenceBatches(c, 2, shuffle=True, seed=7))]
    again = [y for _, y in _columns(SentenceBatches(c, 2, shuffle=True, seed=7))]
    assert one == again
    assert sorted(one) == sorted(sents)
    orders = {tuple(SentenceBatches(c, 2, shuffle=True, seed=s).order) for s in range(10)}
    assert len(orders) > 1
