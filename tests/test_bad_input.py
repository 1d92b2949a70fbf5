"""Bad input never crashes: corpora, vocabularies, score inputs and command-line options.

Every bad input must give exactly one line on stderr that names the file (and line) or the option,
exit code 2, no traceback; and nothing already written may be damaged. The property-based tests
(hypothesis) throw random bytes and random JSON at the readers; benchmarks/fuzz_inputs.py runs the
same generators for longer.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bptt.data as data
import bptt.scoring as score_module
from bptt.cli import main
from bptt.data import EOS, UNK, CorpusError, Vocab, encode, read_lines
from bptt.storage.saved_model import load_model
from bptt.scoring import score_file
from conftest import one_error_line, train_tiny_model

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = "the a cat dog sat ran on under mat rug".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("bad-input"), WORDS, seed=0)


@pytest.fixture(scope="module")
def corpus_file(model_dir):
    return model_dir.parent / "t.txt"


# -- the corpus reader ---------------------------------------------------------------------------------


def _reference(raw: bytes, unit: str) -> list[list[str]]:
    """What read_lines must give for bytes that are valid UTF-8 without NUL: a plain split on b"\\n"."""
    text = raw.decode("utf-8").removeprefix("\ufeff")
    lines = [line.split() if unit == "word" else list(line.strip()) for line in text.split("\n")]
    return [tokens for tokens in lines if tokens]


_TEXT = st.text(alphabet=st.sampled_from(list("ab é€𝄞 \t\r\n\u3000\x0b\ufeff")), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXT, unit=st.sampled_from(["word", "char"]), chunk=st.integers(1, 9), bom=st.booleans())
def test_chunked_reading_equals_a_plain_split(tmp_path, text, unit, chunk, bom):
    """Lines longer than the read size are tokenized piece by piece: the tokens must not change,
    whatever the boundaries (inside a multi-byte character, a token, a run of white space)."""
    raw = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    path = tmp_path / "c.txt"
    path.write_bytes(raw)
    expected = _reference(raw, unit)
    old = data._CHUNK
    data._CHUNK = chunk
    try:
        if expected:
            assert list(read_lines(path, unit)) == expected
            vocab = Vocab.build(path, unit)
            corpus = encode(path, vocab, unit)
            assert corpus.tokens == sum(len(t) + 1 for t in expected)
            assert len(corpus.sentence_starts) == len(expected)
            assert vocab.counts[0] == len(expected)
        else:
            with pytest.raises(CorpusError, match="empty corpus"):
                list(read_lines(path, unit))
    finally:
        data._CHUNK = old


@FAST
@given(lines=st.lists(st.text(alphabet="abc é€", min_size=0, max_size=30), min_size=1, max_size=6),
       where=st.integers(0, 10_000), bad=st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x80", b"\x00"]),
       chunk=st.sampled_from([2, 3, 5, 1 << 20]))
def test_bad_bytes_name_the_line_and_byte(tmp_path, lines, where, bad, chunk):
    """An undecodable byte or a NUL: CorpusError "FILE:LINE: ... (byte B of the line)", with the same
    LINE and B whatever the read size."""
    encoded = [line.encode("utf-8") for line in lines]
    row = where % len(encoded)
    chars = lines[row]
    cut = len(chars[: where % (len(chars) + 1)].encode("utf-8"))  # between two characters
    encoded[row] = encoded[row][:cut] + bad + b" " + encoded[row][cut:]  # a space: a cut sequence ends there
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\n".join(encoded) + b"\n")
    old = data._CHUNK
    data._CHUNK = chunk
    try:
        with pytest.raises(CorpusError) as info:
            list(read_lines(path))
    finally:
        data._CHUNK = old
    message = str(info.value)
    assert message.startswith(f"{path}:{row + 1}: ") and "\n" not in message
    assert f"(byte {cut + 1} of the line)" in message
    assert ("NUL" in message) == (bad == b"\x00")


@FAST
@given(raw=st.binary(max_size=300), unit=st.sampled_from(["word", "char"]),
       mode=st.sampled_from(["plain", "gz", "not-gzip"]))
def test_random_bytes_read_or_fail_cleanly(tmp_path, raw, unit, mode):
    path = tmp_path / ("r.txt" if mode == "plain" else "r.txt.gz")
    path.write_bytes(gzip.compress(raw) if mode == "gz" else raw)
    try:
        vocab = Vocab.build(path, unit)
        corpus = encode(path, vocab, unit)
    except CorpusError as e:
        assert str(e).startswith(f"{path}") and "\n" not in str(e)
    else:
        assert corpus.tokens >= 2 and corpus.oov == 0


def test_a_line_longer_than_the_read_size(tmp_path):
    """A 3 MB line (over the 1 MiB read size) of 600k tokens, a multi-byte character on a boundary."""
    assert data._CHUNK == 1 << 20
    words = ["w%d" % (i % 1000) for i in range(600_000)]
    line = " ".join(words)
    head = line[: data._CHUNK - 1] + "é"  # 'é' straddles the first piece boundary
    path = tmp_path / "long.txt"
    path.write_text(f"first line\n{head}{line}\nlast\n", encoding="utf-8")
    vocab = Vocab.build(path)
    corpus = encode(path, vocab)
    expected = len(head.split()) + len(words) - 1  # the last word of head and the first of line merge
    assert corpus.sentence_lengths.tolist() == [3, expected + 1, 2]
    assert vocab.counts[vocab.id("last")] == 1 and vocab.id("é") == 1  # 'é' is part of a word, not a word


def test_bom_crlf_and_unicode_space(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"\xef\xbb\xbfthe cat\r\n\r\nsat\xe3\x80\x80down\r\n")
    assert list(read_lines(path)) == [["the", "cat"], ["sat", "down"]]
    assert list(read_lines(path, "char")) == [list("the cat"), list("sat\u3000down")]


@pytest.mark.parametrize("make", ["truncated", "corrupt", "not-gzip"])
def test_bad_gzip_is_one_line(tmp_path, make):
    good = gzip.compress(b"the cat sat\n" * 1000)
    raw = {"truncated": good[: len(good) // 2], "corrupt": good[:12] + b"\x00" * 40 + good[52:],
           "not-gzip": b"the cat sat\n"}[make]
    path = tmp_path / "c.txt.gz"
    path.write_bytes(raw)
    with pytest.raises(CorpusError) as info:
        Vocab.build(path)
    assert str(info.value).startswith(f"{path}") and "\n" not in str(info.value)


def test_directory_and_special_files(tmp_path):
    with pytest.raises(CorpusError, match="is a directory"):
        read_lines(tmp_path)
    with pytest.raises(CorpusError, match="empty corpus"):
        list(read_lines("/dev/null"))


# -- vocabulary files ----------------------------------------------------------------------------------


def _vocab_json(**changes):
    d = {"format": "bptt-vocab", "version": 1, "unit": "word", "words": [EOS, UNK, "a", "b"], "counts": [3, 0, 2, 1]}
    d.update(changes)
    return json.dumps(d)


@pytest.mark.parametrize(
    "content, needle",
    [
        (_vocab_json(words=[EOS, UNK, "a", "a"]), "'a' appears more than once"),
        (_vocab_json(words=[UNK, EOS, "a", "b"]), "must start with"),
        (_vocab_json(words=["a", "b", "c", "d"]), "must start with"),
        (_vocab_json(words=[EOS, UNK, 3, "b"]), "must be strings"),
        (_vocab_json(words={"a": 1}), "must be lists"),
        (_vocab_json(counts=[1, 2, 3]), "one non-negative integer per word"),
        (_vocab_json(counts=[1, 2, -3, 4]), "'counts'"),
        (_vocab_json(counts=[1, 2, 3, 2**70]), "2**63"),
        (_vocab_json(counts=[1, 2, 3, 1.5]), "integers"),
        (_vocab_json(counts=[1, 2, 3, True]), "integers"),
        (_vocab_json(unit="byte"), "'unit'"),
        (_vocab_json(version="1"), "version"),
        ('{"format": "bptt-vocab", "version": 1, "words": ' + "[" * 50_000 + "]" * 50_000 + "}", "malformed"),
        ('{"format": "bptt-vocab", "version": 1, "counts": [' + "9" * 5000 + "]}", "malformed"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        ("", "malformed"),
        ("null", "not a bptt-vocab"),
    ],
)
def test_malformed_vocabulary_is_one_line(tmp_path, content, needle):
    path = tmp_path / "vocab.json"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    with pytest.raises(CorpusError) as info:
        Vocab.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and needle in message


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@FAST
@given(value=_JSON, field=st.sampled_from(["words", "counts", "unit", "format", "version", None]))
def test_vocabulary_with_random_json(tmp_path, value, field):
    d = json.loads(_vocab_json())
    if field is None:
        d = value
    else:
        d[field] = value
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(d))
    try:
        vocab = Vocab.load(path)
    except CorpusError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    else:
        assert vocab.words[:2] == [EOS, UNK] and len(set(vocab.words)) == len(vocab.words)


@FAST
@given(raw=st.binary(max_size=200))
def test_vocabulary_of_random_bytes(tmp_path, raw):
    path = tmp_path / "vocab.json"
    path.write_bytes(raw)
    with pytest.raises(CorpusError) as info:
        Vocab.load(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


# -- score, eval, generate inputs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty corpus"),
        (b"\n \n\t\n", "empty corpus"),
        (b"the cat\nthe \xff dog\n", ":2: invalid UTF-8 (byte 5 of the line)"),
        (b"the cat\x00 sat\n", ":1: NUL byte (byte 8 of the line)"),
        (b"\xff\xfet\x00h\x00e\x00", ":1: "),  # UTF-16
        (None, "is a directory"),
        ("missing", "no such file"),
    ],
)
@pytest.mark.parametrize("command", ["score", "eval"])
def test_bad_text_for_score_and_eval(model_dir, tmp_path, capsys, command, content, needle):
    path = tmp_path / "input.txt"
    if content is None:
        path = tmp_path
    elif content == "missing":
        path = tmp_path / "nope.txt"
    else:
        path.write_bytes(content)
    option = "--text" if command == "score" else "--test"
    assert main([command, "--model", str(model_dir), option, str(path)]) == 2
    out = capsys.readouterr()
    one_error_line(out.err, str(path), needle)
    assert out.out == ""


@FAST
@given(raw=st.binary(max_size=200))
def test_score_random_bytes(model_dir, tmp_path, capsys, raw):
    path = tmp_path / "r.txt"
    path.write_bytes(raw)
    rc = main(["score", "--model", str(model_dir), "--text", str(path)])
    out = capsys.readouterr()
    if rc == 0:
        assert len(out.out.splitlines()) == len(_reference(raw, "word"))
    else:
        assert rc == 2
        one_error_line(out.err, str(path))


def test_score_long_lines_in_pieces(model_dir, tmp_path, monkeypatch):
    """A line far longer than one forward pass goes through in pieces with the state carried: the same
    scores as in one piece."""
    model, vocab, _ = load_model(model_dir)
    rng = random.Random(3)
    lines = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (1, 300, 7, 40, 2, 129)]
    path = tmp_path / "long.txt"
    path.write_text("\n".join(lines) + "\n")
    whole = score_file(model, vocab, path).ln_probs
    monkeypatch.setattr(score_module, "_POSITIONS_PER_PASS", 5)
    pieces = score_file(model, vocab, path).ln_probs
    np.testing.assert_allclose(pieces, whole, rtol=1e-5)
    corpus = encode(path, vocab)  # and the reference: one stream per sentence
    from bptt.evaluation import stream_nats

    for i, (start, n) in enumerate(zip(corpus.sentence_starts, corpus.sentence_lengths)):
        assert -stream_nats(model, corpus.ids[start : start + n], 0) == pytest.approx(whole[i], rel=1e-5)


# -- command-line options ------------------------------------------------------------------------------


TRAIN = ["train", "--train", "{t}", "--valid", "{t}", "--model", "{new}"]
BAD_OPTIONS = [
    (TRAIN + ["--hidden", "0"], "--hidden"),
    (TRAIN + ["--hidden", "-3"], "--hidden"),
    (TRAIN + ["--hidden", "x"], "--hidden"),
    (TRAIN + ["--hidden", str(10**30)], "--hidden"),
    (TRAIN + ["--hidden", "1000000"], "--hidden 1000000"),  # the resource guard
    (TRAIN + ["--batch", str(10**12)], "--batch"),
    (TRAIN + ["--batch", "0"], "--batch"),
    (TRAIN + ["--batch", "2", "--bptt", str(10**9)], "--batch 2 --bptt 1000000000"),  # the resource guard
    (TRAIN + ["--bptt", "0"], "--bptt"),
    (TRAIN + ["--bptt", "-1"], "--bptt"),
    (TRAIN + ["--bptt-block", "0"], "--bptt-block"),
    (TRAIN + ["--epochs", "0"], "--epochs"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--lr", "inf"], "--lr"),
    (TRAIN + ["--lr", "-1"], "--lr"),
    (TRAIN + ["--lr", "0"], "--lr"),
    (TRAIN + ["--lr", "1e999"], "--lr"),
    (TRAIN + ["--clip", "nan"], "--clip"),
    (TRAIN + ["--min-improvement", "-inf"], "--min-improvement"),
    (TRAIN + ["--min-improvement", "0"], "--min-improvement"),
    (TRAIN + ["--min-improvement", "0.001"], "--min-improvement"),  # a percentage given where a ratio is asked
    (TRAIN + ["--halving-factor", "1"], "--halving-factor"),
    (TRAIN + ["--halving-factor", "0"], "--halving-factor"),
    (TRAIN + ["--tie", "--output", "nce"], "--tie"),
    (TRAIN + ["--lr", "1e9"], "--lr"),
    (TRAIN + ["--clip", "-1"], "--clip"),
    (TRAIN + ["--ar", "-0.5"], "--ar"),
    (TRAIN + ["--tar", "inf"], "--tar"),
    (TRAIN + ["--l2", "-0.1"], "--l2"),
    (TRAIN + ["--direct", "-1"], "--direct"),
    (TRAIN + ["--direct", "1", "--output", "hsm"], "direct"),
    (TRAIN + ["--direct-order", "0", "--direct", "1"], "--direct-order"),
    (TRAIN + ["--lr-decay", "2"], "--lr-decay"),
    (TRAIN + ["--patience", "-1"], "--patience"),
    (TRAIN + ["--average-every", "-2"], "--average-every"),
    (TRAIN + ["--truncation", "-2"], "--truncation"),
    (TRAIN + ["--min-count", "0"], "--min-count"),
    (TRAIN + ["--max-vocab", "1"], "--max-vocab"),
    (TRAIN + ["--classes", "0"], "--classes"),
    (TRAIN + ["--seed", "-1"], "--seed"),
    (TRAIN + ["--seed", str(2**64)], "--seed"),
    (TRAIN + ["--checkpoint-every", "-1"], "--checkpoint-every"),
    (TRAIN + ["--max-steps", "-1"], "--max-steps"),
    (TRAIN + ["--optimizer", "adamw"], "--optimizer"),
    (TRAIN + ["--output", "mixture"], "--output"),
    (TRAIN + ["--activation", "gelu"], "--activation"),
    (TRAIN + ["--cell", "lstm", "--activation", "relu"], "--activation"),  # the LSTM has no F to choose
    (TRAIN + ["--forget-bias", "1"], "--forget-bias"),  # the Elman cell has no forget gate
    (TRAIN + ["--cell", "lstm", "--forget-bias", "nan"], "--forget-bias"),
    (TRAIN + ["--cell", "gru", "--layers", "0"], "--layers"),
    (TRAIN + ["--cell", "rnn"], "--cell"),
    (TRAIN + ["--dropout", "1"], "--dropout"),
    (TRAIN + ["--dropout", "-0.1"], "--dropout"),
    (TRAIN + ["--dropout", "nan"], "--dropout"),
    (TRAIN + ["--dropout-embedding", "1.5"], "--dropout-embedding"),
    (TRAIN + ["--embedding", "-4"], "--embedding"),
    (TRAIN + ["--cell", "lstm", "--embedding", "7", "--tie"], "--tie"),  # the embedding is V: e must be m
    (TRAIN + ["--cell", "lstm", "--embedding", "0", "--tie"], "--tie"),  # U (4m,V) is not Vᵀ
    (TRAIN + ["--output", "class", "--graph"], "--graph"),
    (TRAIN + ["--schedule", "step", "--decay-start", "-1"], "--decay-start"),
    (TRAIN + ["--unit", "byte"], "--unit"),
    (TRAIN + ["--schedule", "cosine"], "--schedule"),
    (TRAIN + ["--device", "tpu"], "--device"),
    (["train", "--train", "{t}", "--model", "{new}"], "--valid"),
    (["train", "--resume", "{new}"], "{new}"),
    (TRAIN + ["--data", "{t}"], "--data"),  # --data is instead of --train and --valid
    (["train", "--data", "{t}", "--model", "{new}"], "{t}"),  # not a directory written by bptt prepare
    (["train", "--data", "{t}", "--model", "{new}", "--unit", "char"], "--unit"),  # the vocabulary is DATA's
    (["train", "--data", "{t}", "--model", "{new}", "--min-count", "2"], "--min-count"),
    (["prepare", "--train", "{t}", "--out", "{new}"], "--valid"),
    (["prepare", "--train", "{t}", "--valid", "{t}", "--out", "{new}", "--min-count", "0"], "--min-count"),
    (["prepare", "--train", "{t}", "--valid", "{t}", "--out", "{new}", "--max-vocab", "1"], "--max-vocab"),
    (["prepare", "--train", "{t}", "--valid", "{t}", "--out", "{new}", "--unit", "byte"], "--unit"),
    (["prepare", "--train", "{t}", "--valid", "{t}", "--out", "{m}"], "{m}"),  # not empty
    (["prepare", "--train", "{t}", "--valid", "{t}", "--out", "{m}", "--force"], "{m}"),  # not a prepared DATA
    (["eval", "--model", "{m}", "--data", "{t}"], "{t}"),
    (["eval", "--model", "{m}", "--test", "{t}", "--data", "{t}"], "--data"),
    (["eval", "--model", "{m}", "--test", "{t}", "--split", "valid"], "--split"),
    (["eval", "--model", "{m}", "--data", "{new}", "--split", "dev"], "--split"),
    (["eval", "--model", "{m}"], "--test"),
    (["eval", "--model", "{new}", "--test", "{t}"], "{new}"),
    (["eval", "--model", "{m}", "--test", "{t}", "--dynamic", "-0.1"], "--dynamic"),
    (["eval", "--model", "{m}", "--test", "{t}", "--dynamic", "1e30"], "--dynamic"),
    (["eval", "--model", "{m}", "--test", "{t}", "--dynamic", "0.1", "--dynamic-block", "0"], "--dynamic-block"),
    (["score", "--model", "{m}", "--text", "{t}", "--device", "gpu"], "--device"),
    (["generate", "--model", "{m}", "--words", "-1"], "--words"),
    (["generate", "--model", "{m}", "--words", str(10**12)], "--words"),
    (["generate", "--model", "{m}", "--temperature", "0"], "--temperature"),
    (["generate", "--model", "{m}", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "{m}", "--temperature", "inf"], "--temperature"),
    (["generate", "--model", "{m}", "--temperature", "nan"], "--temperature"),
    (["generate", "--model", "{m}", "--top-k", "0"], "--top-k"),
    (["generate", "--model", "{m}", "--top-k", "-5"], "--top-k"),
    (["generate", "--model", "{m}", "--seed", str(2**40)], "--seed"),
    (["generate", "--model", "{new}"], "{new}"),
    (["plot", "--model", "{new}"], "{new}"),
    (["gradcheck", "--hidden", "0"], "--hidden"),
    (["gradcheck", "--vocab", "-1"], "--vocab"),
    (["gradcheck", "--seed", "-7"], "--seed"),
    (["gradcheck", "--dtype", "int8"], "--dtype"),
    (["bench", "--steps", "0"], "--steps"),
    (["bench", "--config", "V=0"], "--config"),
    (["bench", "--threads", "-2"], "--threads"),
    (["demo", "--hidden", "0"], "--hidden"),
    (["demo", "--seed", "-5"], "--seed"),
    (["demo", "--epochs", "-1"], "--epochs"),
    (["frobnicate"], "frobnicate"),
    (["train", "--no-such-option"], "--no-such-option"),
    # found by the CLI review of 2026-11-29: each was an internal error (exit 1) or named no option
    (TRAIN + ["--cell", "lstm", "--forget-bias", "1e39"], "--forget-bias"),
    (TRAIN + ["--init-range", "1e39"], "--init-range"),
    (["bench", "--config", "V=" + "9" * 30 + ",m=2,B=1,T=1"], "--config"),
    (["bench", "--config", "V=10,m=2,B=1,T=1,direct=" + "9" * 23], "--config"),
    (["bench", "--config", "V=\u00b2,m=2,B=1,T=1"], "--config"),
    (["bench", "--threads", str(2**62)], "--threads"),
    (["gradcheck", "--batch", str(10**18)], "--batch"),
    (["gradcheck", "--steps", str(10**18)], "--steps"),
    (["diagnose", "--model", "{m}", "--text", "{t}", "--positions", str(2**62)], "--positions"),
    (TRAIN + ["--direct", "1", "--direct-order", "10000"], "--direct-order"),
    (["demo", "--quick", "--sentences", "5"], "--sentences"),
    (["demo", "--quick", "--sentences", str(10**18)], "--sentences"),
]


@pytest.mark.parametrize("argv, needle", BAD_OPTIONS, ids=[f"{i}-{a[0]}-{n}" for i, (a, n) in enumerate(BAD_OPTIONS)])
def test_bad_option_is_one_line_and_exit_2(model_dir, corpus_file, tmp_path, capsys, argv, needle):
    fill = {"{t}": str(corpus_file), "{m}": str(model_dir), "{new}": str(tmp_path / "new")}
    argv = [fill.get(a, a) for a in argv]
    needle = fill.get(needle, needle)
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert main(argv) == 2
    out = capsys.readouterr()
    one_error_line(out.err, needle)
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new" / "model.safetensors").exists()


# -- existing model directories are never overwritten by accident -------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _small_run(corpus_file, directory, *extra):
    return ["train", "--train", str(corpus_file), "--valid", str(corpus_file), "--model", str(directory),
            "--hidden", "6", "--batch", "4", "--bptt", "5", "--epochs", "1", "--quiet", *extra]


def test_train_refuses_an_existing_model_directory(corpus_file, tmp_path, capsys):
    directory = tmp_path / "m"
    assert main(_small_run(corpus_file, directory)) == 0
    capsys.readouterr()
    before = _snapshot(directory)
    assert {"model.safetensors", "config.json", "vocab.json", "metrics.jsonl"} <= before.keys()
    for argv in (_small_run(corpus_file, directory), _small_run(corpus_file, directory, "--hidden", "0"),
                 _small_run(tmp_path / "missing.txt", directory)):
        assert main(argv) == 2
        one_error_line(capsys.readouterr().err)
        assert _snapshot(directory) == before  # not a byte changed
    assert main(_small_run(corpus_file, directory)) == 2
    one_error_line(capsys.readouterr().err, f"--model {directory}", "--resume", "--force")
    # --force starts afresh, but not for a run that fails at once: then nothing is deleted
    for argv in (_small_run(corpus_file, directory, "--force", "--hidden", "0"),
                 _small_run(tmp_path / "missing.txt", directory, "--force")):
        assert main(argv) == 2
        one_error_line(capsys.readouterr().err)
        assert _snapshot(directory) == before
    # the previous run's files are replaced, the state is the new run's
    (directory / "notes.txt").write_text("mine")
    assert main(_small_run(corpus_file, directory, "--force", "--hidden", "7")) == 0
    model, _, _ = load_model(directory)
    assert model.hidden_size == 7 and (directory / "notes.txt").read_text() == "mine"
    assert main(["train", "--resume", str(directory), "--quiet"]) == 0


def test_train_into_an_empty_or_unrelated_directory_is_fine(corpus_file, tmp_path, capsys):
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "README").write_text("x")
    assert main(_small_run(corpus_file, directory)) == 0
    assert (directory / "model.safetensors").exists() and (directory / "README").read_text() == "x"
    file = tmp_path / "f"
    file.write_text("x")
    assert main(_small_run(corpus_file, file)) == 2
    one_error_line(capsys.readouterr().err, "not a directory")


def test_unexpected_errors_are_one_line_and_exit_1(monkeypatch, capsys):
    import bptt.commands.generate as generate

    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setattr(generate, "run", boom)
    assert main(["generate", "--model", "x"]) == 1
    one_error_line(capsys.readouterr().err, "internal error", "KeyError")
    monkeypatch.setenv("BPTT_TRACEBACK", "1")
    with pytest.raises(KeyError):
        main(["generate", "--model", "x"])


def test_generate_refuses_non_finite_probabilities(model_dir):
    model, vocab, _ = load_model(model_dir)
    model.params["V"][0, 0] = float("inf")
    from bptt.sampling import sample

    with pytest.raises(ValueError, match="not finite"):
        sample(model, vocab, words=3)
