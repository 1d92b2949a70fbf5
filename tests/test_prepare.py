"""`bptt prepare` and training from memory-mapped corpora (issue 18, items 1 and 2).

prepare's ids are `encode`'s (word, char, .gz, any chunk size); meta.json describes the files; a
prepare that fails or is killed leaves no DATA; a damaged DATA is refused with one line naming the
file; the lazy batchers give the eager ones' blocks bit for bit; training from DATA gives the same
model as training from the texts (continuous and --independent, resumed too); eval --data gives the
numbers of eval --test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import bptt.prepared as prepared_module
from bptt.cli import main
from bptt.data import EOS_ID, Corpus, CorpusError, SentenceBatches, StreamBatches, Vocab, encode, encode_chunks
from bptt.engine.stream import token_blocks
from bptt.prepared import load_prepared, prepare
from conftest import one_error_line

WORDS = "the a cat dog sat ran on under mat rug big small".split()
EOS, UNK = "<eos>", "<unk>"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_text(path: Path, lines: int, seed: int, words=WORDS) -> Path:
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(lines))
    path.write_text(text + "\n\n")  # a blank line: skipped, as by every reader
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    return {"train": write_text(root / "train.txt", 120, 0),
            "valid": write_text(root / "valid.txt", 25, 1, WORDS + ["zebra"]),
            "test": write_text(root / "test.txt", 20, 2, WORDS + ["<unk>", "yak"])}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- prepare's output is encode's ------------------------------------------------------------------------


@pytest.mark.parametrize("unit, gz, options", [("word", False, {}), ("char", False, {}), ("word", True, {}),
                                               ("word", False, {"min_count": 2, "max_vocab": 8})],
                         ids=["word", "char", "gz", "min-count-max-vocab"])
def test_prepare_equals_encode(texts, tmp_path, unit, gz, options):
    sources = dict(texts)
    if gz:
        for split, path in texts.items():
            sources[split] = tmp_path / f"{split}.txt.gz"
            sources[split].write_bytes(gzip.compress(path.read_bytes()))
    out = tmp_path / "data"
    prepare(out, sources["train"], sources["valid"], sources["test"], unit=unit, progress=False, chunk_tokens=7,
            **options)
    vocab = Vocab.build(sources["train"], unit, **options)
    vocab.save(tmp_path / "vocab.json")
    assert (out / "vocab.json").read_bytes() == (tmp_path / "vocab.json").read_bytes()
    data = load_prepared(out)
    assert data.vocab.words == vocab.words and data.vocab.counts == vocab.counts and data.unit == unit
    for split in ("train", "valid", "test"):
        want, got = encode(sources[split], vocab, unit), data.split(split)
        assert isinstance(got.ids, np.memmap) and got.ids.dtype == np.dtype("<u4") and not got.ids.flags.writeable
        assert isinstance(got.sentence_starts, np.memmap) and got.sentence_starts.dtype == np.dtype("<i8")
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.sentence_starts, want.sentence_starts)
        assert (got.tokens, got.oov) == (want.tokens, want.oov)
        assert np.array_equal(got.sentence_lengths, want.sentence_lengths)
    assert data.split("test").oov > 0 and data.split("valid").oov > 0  # 'yak', 'zebra'; a literal <unk> is none


_WORD = st.sampled_from(["a", "b", "c", "d", "é", "<unk>", "xx"])
_LINES = st.lists(st.lists(_WORD, max_size=12), min_size=1, max_size=15)


@FAST
@given(lines=_LINES, chunk=st.integers(1, 40), unit=st.sampled_from(["word", "char"]))
def test_encode_chunks_concatenate_to_encode(tmp_path, lines, chunk, unit):
    """Chunks end anywhere (inside a line too): concatenated, they are encode's corpus exactly; each holds
    at least `chunk` ids but the last, and at most `chunk` plus one line."""
    path = tmp_path / "c.txt"
    path.write_text("\n".join(" ".join(line) for line in lines) + "\n")
    if not any(lines):
        with pytest.raises(CorpusError, match="empty corpus"):
            list(encode_chunks(path, Vocab([EOS, UNK]), unit, chunk))
        return
    vocab = Vocab.build(path, unit, max_vocab=4)
    want = encode(path, vocab, unit)
    parts = list(encode_chunks(path, vocab, unit, chunk))
    longest = max(len(" ".join(line)) for line in lines) + 1
    assert all(chunk <= len(ids) < chunk + longest for ids, _, _ in parts[:-1])
    assert np.array_equal(np.concatenate([p[0] for p in parts]), want.ids)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), want.sentence_starts)
    assert np.array_equal(np.concatenate([p[2] for p in parts]), want.sentence_oov)


def test_progress_counts_the_bytes_of_the_file(texts, tmp_path):
    """The progress calls of a pass sum to the file's size on disk (compressed for .gz)."""
    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(texts["train"].read_bytes() * 50))
    for path in (texts["train"], gz):
        seen: list[int] = []
        Vocab.build(path, progress=seen.append)
        assert sum(seen) == path.stat().st_size and min(seen) >= 0
        seen.clear()
        list(encode_chunks(path, Vocab.build(path), progress=seen.append))
        assert sum(seen) == path.stat().st_size


def test_meta_json(texts, tmp_path):
    out = tmp_path / "data"
    result = prepare(out, texts["train"], texts["valid"], max_vocab=10, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta == result.meta
    assert (meta["format"], meta["version"], meta["unit"], meta["min_count"], meta["max_vocab"]) == (
        "bptt-prepared", 1, "word", 1, 10)
    assert meta["vocab"] == {"file": "vocab.json", "size": 10, "sha256": sha256(out / "vocab.json")}
    assert sorted(meta["splits"]) == ["train", "valid"]  # no --test: no test split
    assert sorted(os.listdir(out)) == ["meta.json", "train.ids", "train.oov", "train.starts", "valid.ids",
                                       "valid.oov", "valid.starts", "vocab.json"]
    vocab = Vocab.load(out / "vocab.json")
    for split in ("train", "valid"):
        entry, corpus = meta["splits"][split], encode(texts[split], vocab)
        assert (entry["tokens"], entry["sentences"], entry["oov"]) == (corpus.tokens, len(corpus.sentence_starts),
                                                                       corpus.oov)
        assert entry["source"] == {"path": str(texts[split].resolve()), "bytes": texts[split].stat().st_size,
                                   "sha256": sha256(texts[split])}
        assert entry["ids"] == {"file": f"{split}.ids", "sha256": sha256(out / f"{split}.ids")}
        assert entry["starts"] == {"file": f"{split}.starts", "sha256": sha256(out / f"{split}.starts")}
        assert (out / f"{split}.ids").read_bytes() == corpus.ids.astype("<u4").tobytes()
        assert (out / f"{split}.starts").read_bytes() == corpus.sentence_starts.astype("<i8").tobytes()
        assert entry["sentence_oov"] == {"file": f"{split}.oov", "sha256": sha256(out / f"{split}.oov")}
        assert (out / f"{split}.oov").read_bytes() == corpus.sentence_oov.astype("<u4").tobytes()
        assert corpus.sentence_oov.sum() == corpus.oov > 0
        assert np.array_equal(load_prepared(out).split(split).sentence_oov, corpus.sentence_oov)
    assert result.bytes_read == 2 * texts["train"].stat().st_size + texts["valid"].stat().st_size
    assert not list(tmp_path.glob("data.*"))  # no temporary sibling left
    with pytest.raises(CorpusError, match="no 'test' split"):
        load_prepared(out).split("test")


def test_the_command_line(texts, tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["prepare", "--train", str(texts["train"]), "--valid", str(texts["valid"]), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(argv) == 2  # DATA exists and is not empty
    one_error_line(capsys.readouterr().err, f"--out {out}", "--force")
    before = (out / "train.ids").read_bytes()
    assert main([*argv, "--force", "--unit", "char"]) == 0  # replaces an earlier prepare's output
    assert "tokens/s" in capsys.readouterr().out
    assert load_prepared(out).unit == "char" and (out / "train.ids").read_bytes() != before
    assert not list(tmp_path.glob("data.*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*argv[:-1], str(other), "--force"]) == 2  # --force deletes only a prepared DATA
    one_error_line(capsys.readouterr().err, f"--out {other}")
    assert (other / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv[:-1], str(empty), "--quiet"]) == 0  # an empty directory is fine
    assert load_prepared(empty).splits == ("train", "valid")


def test_force_replaces_nothing_but_an_earlier_prepare(texts, tmp_path, capsys):
    """--force refuses a DATA with a file prepare does not write, and a directory whose meta.json is not
    prepare's (here holding the training text itself): one line naming --out, exit 2, nothing deleted."""
    argv = ["prepare", "--train", str(texts["train"]), "--valid", str(texts["valid"]), "--quiet", "--force", "--out"]
    data = tmp_path / "data"
    assert main([*argv, str(data)]) == 0
    (data / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    assert main([*argv, str(data)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {data}", "notes.txt")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    project = tmp_path / "project"
    project.mkdir()
    (project / "meta.json").write_text('{"name": "my project"}')
    shutil.copy(texts["train"], project / "train.ids")  # a name prepare writes, but not prepare's meta.json
    assert main(["prepare", "--train", str(project / "train.ids"), "--valid", str(texts["valid"]), "--quiet",
                 "--force", "--out", str(project)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {project}", "meta.json")
    assert (project / "train.ids").read_bytes() == Path(texts["train"]).read_bytes()


def test_only_a_killed_prepares_own_leftovers_are_removed_and_only_after_success(texts, tmp_path, capsys):
    """Siblings named like prepare's leftovers but not made by it (a user's backup of an earlier DATA named
    data.old-v1, data.tmp-experiments, a data.tmp-XXXXXXXX holding other files) stay; a real leftover (the
    earlier DATA that a killed --force had moved aside: data.old-XXXXXXXX) survives a prepare that fails and
    is removed by one that succeeds."""
    data = tmp_path / "data"
    prepare(tmp_path / "earlier", texts["train"], texts["valid"], progress=False)
    shutil.copytree(tmp_path / "earlier", tmp_path / "data.old-v1")  # the user's backup
    (tmp_path / "earlier").rename(tmp_path / "data.old-0123abcd")  # killed between the two renames
    for name in ("data.tmp-experiments", "data.tmp-89abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.csv").write_text("precious")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\n")
    argv = ["prepare", "--valid", str(texts["valid"]), "--out", str(data), "--quiet"]
    assert main([*argv, "--train", str(bad)]) == 2
    one_error_line(capsys.readouterr().err, "bad.txt:2")
    assert load_prepared(tmp_path / "data.old-0123abcd").split("valid").tokens > 0
    assert main([*argv, "--train", str(texts["train"])]) == 0
    assert not (tmp_path / "data.old-0123abcd").exists()
    assert load_prepared(tmp_path / "data.old-v1").split("valid").tokens > 0
    for name in ("data.tmp-experiments", "data.tmp-89abcdef"):
        assert (tmp_path / name / "results.csv").read_text() == "precious"


def test_files_that_appear_in_an_empty_out_during_prepare_are_kept(texts, tmp_path, monkeypatch):
    """DATA is empty when prepare starts and gets a file before it ends: without --force nothing is
    replaced (a ValueError naming --out, the file kept, no sibling left); with --force the second check
    refuses it too."""
    real = prepared_module._write_split
    out = tmp_path / "data"

    def meanwhile(directory, split, *args, **kwargs):
        if split == "valid":
            (out / "NOTES.txt").write_text("mine")
        return real(directory, split, *args, **kwargs)

    monkeypatch.setattr(prepared_module, "_write_split", meanwhile)
    for force in (False, True):
        out.mkdir()
        with pytest.raises(ValueError, match=f"--out {out}: .*NOTES.txt|--out {out}: files appeared"):
            prepare(out, texts["train"], texts["valid"], progress=False, force=force)
        assert [p.name for p in out.iterdir()] == ["NOTES.txt"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
        shutil.rmtree(out)


def test_out_is_the_current_directory_or_under_a_file(texts, tmp_path, monkeypatch, capsys):
    """--out . (the new DATA would replace the directory, and `.` would stay the old one) and --out under a
    file: one line naming --out, exit 2, nothing written; a relative --out is written where it names."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    argv = ["prepare", "--train", str(texts["train"]), "--valid", str(texts["valid"]), "--quiet", "--out"]
    for out in (".", str(here)):
        assert main([*argv, out]) == 2
        one_error_line(capsys.readouterr().err, f"--out {out}: is the current directory")
    under = Path(texts["train"]) / "sub"
    assert main([*argv, str(under)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {under}")
    assert list(tmp_path.iterdir()) == [here] and not any(here.iterdir())
    assert main([*argv, "data"]) == 0
    assert load_prepared(here / "data").split("valid").tokens > 0 and sorted(p.name for p in here.iterdir()) == ["data"]


# -- atomicity -------------------------------------------------------------------------------------------


def test_a_failed_prepare_leaves_no_data(texts, tmp_path, monkeypatch):
    """The encoder fails after two chunks of the valid split: no DATA, no temporary sibling; a rerun works."""
    real = prepared_module.encode_chunks

    def failing(path, *args, **kwargs):
        for i, chunk in enumerate(real(path, *args, **kwargs)):
            if i == 2 and "valid" in str(path):
                raise OSError("disk full (simulated)")
            yield chunk

    monkeypatch.setattr(prepared_module, "encode_chunks", failing)
    with pytest.raises(OSError, match="simulated"):
        prepare(tmp_path / "new", texts["train"], texts["valid"], progress=False, chunk_tokens=5)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="simulated"):
        prepare(tmp_path / "empty", texts["train"], texts["valid"], progress=False, chunk_tokens=5)
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"] and not any((tmp_path / "empty").iterdir())
    monkeypatch.setattr(prepared_module, "encode_chunks", real)
    prepare(tmp_path / "new", texts["train"], texts["valid"], progress=False, chunk_tokens=5)
    valid = encode(texts["valid"], Vocab.build(texts["train"]))
    assert load_prepared(tmp_path / "new").split("valid").tokens == valid.tokens


_KILLED = """
import os, signal, sys
import bptt.prepared as p
real = p.encode_chunks
def killed(path, *args, **kwargs):
    for i, chunk in enumerate(real(path, *args, **kwargs)):
        if i == 3 and "valid" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        yield chunk
p.encode_chunks = killed
p.prepare(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, chunk_tokens=5, force=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL")
def test_a_killed_prepare_leaves_no_complete_data(texts, tmp_path):
    """SIGKILL mid-prepare, over a fresh DATA and over an earlier one (--force): no DATA that looks
    complete; the leftover DATA.tmp-* is not loadable and the next prepare removes it."""
    out = tmp_path / "data"
    for earlier in (False, True):
        if earlier:
            prepare(out, texts["train"], texts["valid"], progress=False, force=True, min_count=2)
            before = {p.name: p.read_bytes() for p in out.iterdir()}
        run = subprocess.run([sys.executable, "-c", _KILLED, str(out), str(texts["train"]), str(texts["valid"])],
                             capture_output=True, text=True)
        assert run.returncode == -9, run.stderr
        if earlier:  # the kill came before the rename: the old DATA stands, whole
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        else:
            assert not out.exists()
        (leftover,) = tmp_path.glob("data.tmp-*")
        assert (leftover / "train.ids").exists() and not (leftover / "meta.json").exists()
        with pytest.raises(CorpusError, match="meta.json: no such file"):
            load_prepared(leftover)
        prepare(out, texts["train"], texts["valid"], progress=False, force=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
        assert load_prepared(out).split("valid").tokens > 0


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_bad_text_is_one_line_and_exit_2(texts, tmp_path, capsys, split):
    sources = dict(texts)
    bad = tmp_path / f"{split}.txt"
    bad.write_bytes(b"the cat\na dog\nthe \xff mat\n")
    sources[split] = bad
    out = tmp_path / "data"
    argv = ["prepare", "--train", str(sources["train"]), "--valid", str(sources["valid"]), "--test",
            str(sources["test"]), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, f"{bad}:3:", "invalid UTF-8")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    assert main([*argv[:6], str(tmp_path / "missing.txt"), *argv[7:]]) == 2  # --test is missing
    one_error_line(capsys.readouterr().err, "missing.txt", "no such file")


def _damage(out: Path, how: str) -> Path:
    """Damage a prepared DATA; return the file the error must name."""
    if how == "truncated ids":
        path = out / "train.ids"
        path.write_bytes(path.read_bytes()[:-4])
    elif how == "flipped id":
        path = out / "train.ids"
        raw = bytearray(path.read_bytes())
        raw[8] ^= 1
        path.write_bytes(bytes(raw))
    elif how == "flipped start":
        path = out / "valid.starts"
        raw = bytearray(path.read_bytes())
        raw[9] ^= 1
        path.write_bytes(bytes(raw))
    elif how == "missing starts":
        path = out / "valid.starts"
        path.unlink()
    elif how == "vocabulary changed":
        path = out / "vocab.json"
        vocab = Vocab.load(path)
        Vocab(vocab.words[:2] + vocab.words[2:][::-1], vocab.counts, vocab.unit).save(path)
    elif how == "missing meta":
        path = out / "meta.json"
        path.unlink()
    elif how == "malformed meta":
        path = out / "meta.json"
        path.write_text('{"format": "bptt-prepared", "version": 1,')
    elif how == "meta says more tokens":
        path = out / "train.ids"
        meta = json.loads((out / "meta.json").read_text())
        meta["splits"]["train"]["tokens"] += 1
        (out / "meta.json").write_text(json.dumps(meta))
    elif how == "missing directory":
        path = out
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
    else:
        raise AssertionError(how)
    return path


DAMAGES = ["truncated ids", "flipped id", "flipped start", "missing starts", "vocabulary changed", "missing meta",
           "malformed meta", "meta says more tokens", "missing directory"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_data_is_refused_with_one_line(texts, tmp_path, capsys, how):
    out = tmp_path / "data"
    prepare(out, texts["train"], texts["valid"], progress=False)
    named = _damage(out, how)
    with pytest.raises(CorpusError) as e:
        data = load_prepared(out)
        data.split("train"), data.split("valid")
    assert str(e.value).startswith(f"{named}") and "\n" not in str(e.value)
    assert main(["train", "--data", str(out), "--model", str(tmp_path / "m"), "--hidden", "4", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, str(named))
    assert not (tmp_path / "m" / "model.safetensors").exists()


# -- lazy batching ---------------------------------------------------------------------------------------


def eager_stream_blocks(ids: np.ndarray, B: int, T: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """StreamBatches as it was: the whole stream as int64 (L,B) tensors, blocks sliced from them."""
    ids = np.asarray(ids, dtype=np.int64)
    L = (len(ids) - 1) // B
    inputs = torch.from_numpy(np.ascontiguousarray(ids[: B * L].reshape(B, L).T))
    targets = torch.from_numpy(np.ascontiguousarray(ids[1 : B * L + 1].reshape(B, L).T))
    return [(inputs[lo : lo + T], targets[lo : lo + T]) for lo in range(0, L, T)]


def eager_sentence_batches(corpus: Corpus, B: int, order: np.ndarray):
    """SentenceBatches as it was: the whole corpus as int64, then the same gathers."""
    ids = np.asarray(corpus.ids, dtype=np.int64)
    starts = np.asarray(corpus.sentence_starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, len(ids)))
    for i in range(0, len(order), B):
        sel = order[i : i + B]
        t = np.arange(int(lengths[sel].max()))[:, None]
        mask = t < lengths[sel][None, :]
        pos = np.where(mask, starts[sel][None, :] + t, 0)
        targets = np.where(mask, ids[pos], 0)
        inputs = np.where(mask, np.where(t > 0, ids[np.maximum(pos - 1, 0)], EOS_ID), 0)
        yield torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask)


def memmap_of(path: Path, values: np.ndarray, dtype: str) -> np.memmap:
    path.write_bytes(np.asarray(values).astype(dtype).tobytes())
    return np.memmap(path, dtype=dtype, mode="r")


@FAST
@given(n=st.integers(2, 300), B=st.integers(1, 12), T=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_lazy_stream_blocks_equal_the_eager_ones(tmp_path, n, B, T, seed):
    if (n - 1) // B < 1:
        return
    ids = np.random.default_rng(seed).integers(0, 2**31 - 1, n)
    want = eager_stream_blocks(ids, B, T)
    for source in (ids.astype(np.int32), memmap_of(tmp_path / "ids", ids, "<u4")):
        batches = StreamBatches(source, B, T)
        assert len(batches) == len(want)
        for i, (x, y) in enumerate(want):
            gx, gy = batches.block(i)
            assert gx.dtype == gy.dtype == torch.int64
            assert torch.equal(gx, x) and torch.equal(gy, y)
        if isinstance(source, np.memmap):  # nothing copied: the batcher reads the map itself
            assert np.shares_memory(batches._ids, source)


@FAST
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=30), B=st.integers(1, 7), shuffle=st.booleans(),
       seed=st.integers(0, 1000))
def test_lazy_sentence_batches_equal_the_eager_ones(tmp_path, lengths, B, shuffle, seed):
    rng = np.random.default_rng(seed)
    starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    ids = rng.integers(2, 2**31 - 1, sum(lengths))
    ids[starts + np.array(lengths) - 1] = EOS_ID
    in_memory = Corpus(ids.astype(np.int32), starts, len(ids), 0, "c")
    mapped = Corpus(memmap_of(tmp_path / "ids", ids, "<u4"), memmap_of(tmp_path / "starts", starts, "<i8"),
                    len(ids), 0, "c")
    for corpus in (in_memory, mapped):
        batches = SentenceBatches(corpus, B, shuffle=shuffle, seed=seed)
        want = list(eager_sentence_batches(in_memory, B, batches.order))
        assert len(batches) == len(want)
        for got, expected in zip(batches, want):
            for g, e in zip(got, expected):
                assert g.dtype == e.dtype and torch.equal(g, e)


@FAST
@given(n=st.integers(1, 120), block=st.integers(1, 50), seed=st.integers(0, 1000))
def test_lazy_token_blocks_equal_the_eager_ones(tmp_path, n, block, seed):
    ids = np.random.default_rng(seed).integers(1, 2**31 - 1, n)
    tokens = torch.from_numpy(np.concatenate(([EOS_ID], ids)).astype(np.int64))
    want = [(tokens[s : s + len(y)], y) for s in range(0, n, block) for y in [tokens[s + 1 : s + block + 1]]]
    for source in (ids.astype(np.int32), memmap_of(tmp_path / "ids", ids, "<u4")):
        got = list(token_blocks(source, EOS_ID, block))
        assert len(got) == len(want)
        for (x, y), (wx, wy) in zip(got, want):
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (len(wy), 1)
            assert torch.equal(x[:, 0], wx) and torch.equal(y[:, 0], wy)


# -- training, resuming and evaluating from DATA ------------------------------------------------------------


def _weights(directory: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(directory / name))


def assert_same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    wa, wb = _weights(a, name), _weights(b, name)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def data_dir(texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(out, texts["train"], texts["valid"], texts["test"], progress=False)
    return out


SMALL = ["--hidden", "6", "--batch", "4", "--bptt", "5", "--epochs", "1", "--quiet"]


@pytest.mark.parametrize("extra", [[], ["--independent", "--output", "class", "--classes", "3"]],
                         ids=["continuous", "independent-class"])
def test_training_from_data_equals_training_from_text(texts, data_dir, tmp_path, extra):
    text_run, data_run = tmp_path / "text", tmp_path / "data"
    assert main(["train", "--train", str(texts["train"]), "--valid", str(texts["valid"]), "--model", str(text_run),
                 *SMALL, *extra]) == 0
    assert main(["train", "--data", str(data_dir), "--model", str(data_run), *SMALL, *extra]) == 0
    assert_same_weights(text_run, data_run)
    assert (text_run / "vocab.json").read_bytes() == (data_run / "vocab.json").read_bytes()
    metrics = [json.loads(line) for line in (data_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["valid_entropy_bits"] for m in metrics] == [
        json.loads(line)["valid_entropy_bits"] for line in (text_run / "metrics.jsonl").read_text().splitlines()]
    training = json.loads((data_run / "config.json").read_text())["training"]
    assert training["data"] == str(data_dir) and training["train"] is None
    assert training["data_sha256"] == sha256(data_dir / "meta.json")


def test_char_data_records_its_unit(texts, tmp_path, capsys):
    data = tmp_path / "chars"
    prepare(data, texts["train"], texts["valid"], texts["test"], unit="char", progress=False)
    assert main(["train", "--data", str(data), "--model", str(tmp_path / "m"), *SMALL]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["training"]["unit"] == "char"
    assert main(["eval", "--model", str(tmp_path / "m"), "--test", str(texts["test"]), "--json"]) == 0
    from_text = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nats"] == from_text["nats"]


def test_resume_with_data(texts, data_dir, tmp_path, capsys):
    """A run from DATA stopped after 3 steps and resumed ends where an uninterrupted one does; a DATA
    prepared again differently, or gone, is refused with one line naming it."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(["train", "--data", str(data_dir), "--model", str(whole), *SMALL]) == 0
    assert main(["train", "--data", str(data_dir), "--model", str(stopped), *SMALL, "--max-steps", "3"]) == 0
    assert main(["train", "--resume", str(stopped), "--quiet"]) == 0
    assert_same_weights(whole, stopped)
    assert_same_weights(whole / "checkpoint", stopped / "checkpoint")

    copy = tmp_path / "copy"
    prepare(copy, texts["train"], texts["valid"], progress=False)
    run = tmp_path / "run"
    assert main(["train", "--data", str(copy), "--model", str(run), *SMALL, "--max-steps", "2"]) == 0
    capsys.readouterr()
    prepare(copy, texts["train"], texts["valid"], min_count=2, progress=False, force=True)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, str(copy / "meta.json"), "changed")
    for p in copy.iterdir():
        p.unlink()
    copy.rmdir()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, str(copy), "no such directory")


def test_eval_data_equals_eval_text(texts, data_dir, tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["train", "--data", str(data_dir), "--model", str(model), *SMALL]) == 0
    capsys.readouterr()
    for split, extra in (("test", []), ("valid", ["--dynamic", "0.1"])):
        assert main(["eval", "--model", str(model), "--test", str(texts[split]), "--json", *extra]) == 0
        from_text = json.loads(capsys.readouterr().out)
        assert main(["eval", "--model", str(model), "--data", str(data_dir), "--split", split, "--json", *extra]) == 0
        from_data = json.loads(capsys.readouterr().out)
        assert from_text.pop("path") != from_data.pop("path")
        assert from_data == from_text  # perplexity, entropy, nats, tokens, OOV: equal, not close
    other = tmp_path / "other"  # another vocabulary: refused
    prepare(other, texts["valid"], texts["valid"], texts["test"], progress=False)
    assert main(["eval", "--model", str(model), "--data", str(other)]) == 2
    one_error_line(capsys.readouterr().err, str(other / "vocab.json"), str(model))
    no_test = tmp_path / "no-test"
    prepare(no_test, texts["train"], texts["valid"], progress=False)
    assert main(["eval", "--model", str(model), "--data", str(no_test)]) == 2
    one_error_line(capsys.readouterr().err, str(no_test / "meta.json"), "'test'")


def test_score_data_equals_score_text(texts, data_dir, tmp_path, capsys):
    """bptt score --data DATA --split S prints what --text prints for the split's text: every sentence's
    log-probability, tokens and OOV count (the split's .oov file), and the same summary but the path; a
    DATA without .oov files (prepared before they existed) scores the same with the OOV counts null."""
    model = tmp_path / "m"
    assert main(["train", "--data", str(data_dir), "--model", str(model), *SMALL]) == 0
    capsys.readouterr()
    for split in ("test", "valid"):
        assert main(["score", "--model", str(model), "--text", str(texts[split]), "--json"]) == 0
        out, err = capsys.readouterr()
        from_text = [json.loads(line) for line in out.splitlines()]
        assert main(["score", "--model", str(model), "--data", str(data_dir), "--split", split, "--json"]) == 0
        out, err_data = capsys.readouterr()
        assert [json.loads(line) for line in out.splitlines()] == from_text  # equal, not close
        assert err_data.split(":", 1)[1] == err.split(":", 1)[1]
    assert sum(r["oov"] for r in from_text) > 0
    old = tmp_path / "old"  # a DATA written before the per-sentence OOV counts
    shutil.copytree(data_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    for entry in meta["splits"].values():
        del entry["sentence_oov"]
    (old / "meta.json").write_text(json.dumps(meta))
    for split in meta["splits"]:
        (old / f"{split}.oov").unlink()
    assert main(["score", "--model", str(model), "--data", str(old), "--split", "valid", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["oov"] for r in records] == [None] * len(from_text)
    assert [r["log10_prob"] for r in records] == [r["log10_prob"] for r in from_text]
    other = tmp_path / "other"  # another vocabulary: refused
    prepare(other, texts["valid"], texts["valid"], texts["test"], progress=False)
    assert main(["score", "--model", str(model), "--data", str(other)]) == 2
    one_error_line(capsys.readouterr().err, str(other / "vocab.json"), str(model))
    assert main(["score", "--model", str(model), "--text", str(texts["test"]), "--split", "test"]) == 2
    one_error_line(capsys.readouterr().err, "--split")
    assert main(["score", "--model", str(model)]) == 2
    one_error_line(capsys.readouterr().err, "--text")


def test_guard_estimate_does_not_grow_with_the_corpus():
    """The memory guard counts each block's copy (and per-sentence arrays with --independent), not the
    corpus: the batchers read it lazily."""
    from bptt.model.config import ModelConfig
    from bptt.training.resources import estimate_training_memory

    config = ModelConfig(vocab_size=1000, hidden_size=16)
    small, large = (estimate_training_memory(config, batch=8, k1=10, train_tokens=n, valid_tokens=n).parts["data"]
                    for n in (10**3, 10**9))
    assert small == large < 10**4


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                current = parts[5] if len(parts) > 5 else None
            elif parts[0] == "Rss:" and current == str(path):
                total += int(parts[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_an_epoch_over_a_memory_map_does_not_keep_the_file_mapped(tmp_path, monkeypatch):
    """Stream blocks over a 32 MiB ids file: the pages read are unmapped now and then, so the resident part
    of the map stays a fraction of the file (without the release, the whole file ends up resident). Sentence
    batches release after every few batches: right after a release nothing of the file is mapped."""
    import bptt.data as data_module

    path = tmp_path / "ids"
    n = 8 << 20  # 32 MiB of uint32
    np.arange(n, dtype="<u4").tofile(path)

    def peak_over_an_epoch() -> int:
        ids = np.memmap(path, dtype="<u4", mode="r")
        batches, peak = StreamBatches(ids, 2, 200), 0
        for i in range(len(batches)):
            batches.block(i)
            if i % 256 == 255:  # the last block before a release, among others
                peak = max(peak, _mapped_kib(path))
        return max(peak, _mapped_kib(path))

    assert peak_over_an_epoch() < 12 << 10  # KiB: about a third of the file at most (2 streams, a few folios each)
    monkeypatch.setattr(data_module, "_STREAM_RELEASE_BLOCKS", 1 << 40)
    assert peak_over_an_epoch() > 24 << 10  # the check can fail: without the release the file stays mapped

    starts = np.arange(0, n, 20, dtype=np.int64)
    ids = np.memmap(path, dtype="<u4", mode="r")
    sentences = SentenceBatches(Corpus(ids, starts, n, 0, str(path)), 64, shuffle=True)
    every = data_module._RELEASE_BYTES // (64 * data_module._MAPPED_PER_FAULT)
    for i in range(8 * every):
        sentences.batch(i)
        if (i + 1) % every == 0:
            assert _mapped_kib(path) <= 64  # KiB


def test_a_meta_without_max_vocab_means_no_limit(texts, tmp_path):
    """meta.json's max_vocab is optional (an earlier or hand-made DATA): no limit, not a KeyError."""
    out = tmp_path / "data"
    prepare(out, texts["train"], texts["valid"], progress=False)
    meta = json.loads((out / "meta.json").read_text())
    del meta["max_vocab"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert load_prepared(out).max_vocab is None
