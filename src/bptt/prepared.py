"""Prepared corpora: texts encoded once by `bptt prepare`, then memory-mapped by every run that reads them.

`prepare` streams the texts with bounded memory — the vocabulary counts of the training text
(`Vocab.build`), then each split encoded in chunks (`encode_chunks`, so the ids are `encode`'s exactly)
and appended to its files — and writes

    DATA/vocab.json        the vocabulary (Vocab.save)
    DATA/{split}.ids       (N,) the token ids, raw little-endian uint32, `<eos>` closing every line
    DATA/{split}.starts    (S,) raw little-endian int64, the index in .ids of each sentence's first token
    DATA/{split}.oov       (S,) raw little-endian uint32, each sentence's words outside the vocabulary
                           (read as <unk>; `bptt score --data` reports them per sentence)
    DATA/meta.json         format and version; unit, min_count, max_vocab; the vocabulary's size and the
                           sha256 of vocab.json; per split: tokens, sentences, oov, its source (path,
                           bytes, sha256) and the sha256 of its .ids, .starts and .oov files (a DATA
                           written before .oov existed has none: its sentences' OOV counts are unknown)

for split in train, valid and (optionally) test. The directory is built as a temporary sibling
(DATA.tmp-XXXXXXXX), every file fsynced, meta.json last, and renamed into place at the end: a prepare
killed at any instant leaves no DATA (a leftover DATA.tmp-* is removed by the next prepare of DATA).

`load_prepared` checks meta.json against the files (their sizes, the vocabulary's sha256 and, once per
split read, the sha256 of its files) and returns a `PreparedData` whose `split(name)` is a data.Corpus
whose ids and sentence starts are read-only np.memmap views of the files: nothing is read into memory
until a batch asks for its tokens. Every problem is a CorpusError naming the file, on one line.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from bptt import checks
from bptt.files import atomic_write_json, file_sha256, fsync_path
from bptt.data import (
    ENCODE_CHUNK,
    EOS_ID,
    UNITS,
    Corpus,
    CorpusError,
    Vocab,
    check_input_file,
    check_unit,
    encode_chunks,
)

FORMAT = "bptt-prepared"
VERSION = 1
META_FILE = "meta.json"
VOCAB_FILE = "vocab.json"
SPLITS = ("train", "valid", "test")
IDS_DTYPE = np.dtype("<u4")  # token ids: little-endian uint32
STARTS_DTYPE = np.dtype("<i8")  # sentence starts: little-endian int64
OOV_DTYPE = np.dtype("<u4")  # words outside the vocabulary per sentence: little-endian uint32
_TEMP_INFIX = ".tmp-"  # DATA.tmp-XXXXXXXX: the directory being built
_OLD_INFIX = ".old-"  # DATA.old-XXXXXXXX: the directory --force replaces, removed once the new one is in place


# -- prepare ---------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    """What `prepare` wrote: the directory, its meta.json (as a dict), the seconds it took and the bytes
    of text it read (the training text twice: once counted, once encoded)."""

    path: Path
    meta: dict
    seconds: float
    bytes_read: int

    @property
    def tokens(self) -> int:
        """Tokens encoded, all splits together (`<eos>` included)."""
        return sum(s["tokens"] for s in self.meta["splits"].values())


def prepare(
    out: str | os.PathLike,
    train: str | os.PathLike,
    valid: str | os.PathLike,
    test: str | os.PathLike | None = None,
    *,
    unit: str = "word",
    min_count: int = 1,
    max_vocab: int | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_tokens: int = ENCODE_CHUNK,
) -> PrepareResult:
    """Encode the texts (.txt or .gz) into the directory `out` (see the module docstring).

    Memory: the vocabulary and one chunk of `chunk_tokens` ids, whatever the size of the texts.
    ValueError if `out` exists and is not empty (with force=True, a directory written by an earlier
    prepare is replaced, anything else is refused); CorpusError "FILE:LINE: what" for a bad text, as
    `encode`. progress: a tqdm bar of the bytes read, on stderr.
    """
    started = time.perf_counter()
    check_unit(unit)
    min_count = checks.positive_int("--min-count", min_count)
    if max_vocab is not None and checks.positive_int("--max-vocab", max_vocab) < 2:
        raise ValueError(f"--max-vocab must be at least 2 (<eos> and <unk>), got {max_vocab}")
    sources = {"train": train, "valid": valid} | ({"test": test} if test is not None else {})
    sources = {split: check_input_file(path) for split, path in sources.items()}
    label = str(out)  # as given, for messages
    out = Path(os.path.abspath(out))  # `--out .` too: its siblings are beside it, not inside it
    _check_out(out, force, label)
    sizes = {split: os.path.getsize(path) for split, path in sources.items()}
    total = sizes["train"] + sum(sizes.values())  # the training text is read twice
    tmp = _new_sibling(out, _TEMP_INFIX, create=True)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="vocabulary", disable=not progress,
               leave=False, mininterval=0.5)
    try:
        vocab = Vocab.build(sources["train"], unit, min_count, max_vocab, progress=bar.update)
        vocab.save(tmp / VOCAB_FILE)
        splits = {}
        for split, source in sources.items():
            bar.set_description(split)
            splits[split] = _write_split(tmp, split, source, vocab, unit, chunk_tokens, bar.update)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "unit": unit,
            "min_count": min_count,
            "max_vocab": max_vocab,
            "vocab": {"file": VOCAB_FILE, "size": len(vocab), "sha256": file_sha256(tmp / VOCAB_FILE)},
            "splits": splits,
        }
        atomic_write_json(tmp / META_FILE, meta)  # last: a directory without it is not a prepared corpus
        mode = (tmp / "train.ids").stat().st_mode & 0o777  # the umask's, which the vocabulary's temp file lacks
        os.chmod(tmp / VOCAB_FILE, mode)
        os.chmod(tmp / META_FILE, mode)
        fsync_path(tmp)
        _move_into_place(tmp, out, force, label)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()
    _remove_leftovers(out)  # only now: a killed --force may have left the only copy of the earlier DATA
    return PrepareResult(Path(label), meta, time.perf_counter() - started, total)


def _check_out(out: Path, force: bool, label: str) -> None:
    """out: the absolute path; label: --out as given."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {label}: exists and is not a directory")
    if out.exists() and out.samefile(os.getcwd()):  # DATA replaces the directory: `.` would stay the old one
        raise ValueError(f"--out {label}: is the current directory; name a directory to create (e.g. --out data)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {label}: cannot create the directory it goes in ({e.strerror})") from None
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ValueError(f"--out {label}: exists and is not empty; choose a new directory, or add --force to replace "
                         "an earlier bptt prepare's output")
    foreign = _foreign_files(out, complete=True)
    if foreign:
        raise ValueError(f"--out {label}: --force replaces only a directory written by bptt prepare; this one holds "
                         f"{foreign}")


def _prepare_file_names() -> set[str]:
    """Every name a prepare writes into DATA."""
    return {META_FILE, VOCAB_FILE} | {f"{split}.{ext}" for split in SPLITS for ext in ("ids", "starts", "oov")}


def _foreign_files(directory: Path, complete: bool) -> str | None:
    """None when `directory` holds only files a prepare writes (complete: with a meta.json of this format);
    else the first thing that is not (for messages)."""
    names = _prepare_file_names()
    for path in sorted(directory.iterdir()):
        if path.name not in names or path.is_symlink() or not path.is_file():
            return f"'{path.name}', which bptt prepare does not write"
    if complete:
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"no {META_FILE} written by bptt prepare"
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return f"a {META_FILE} that bptt prepare did not write"
    return None


def _remove_leftovers(out: Path) -> None:
    """The DATA.tmp-XXXXXXXX and DATA.old-XXXXXXXX siblings left by a prepare of `out` that was killed (one
    writer per DATA): exactly the names _new_sibling makes, holding nothing but a prepare's files."""
    pattern = re.compile(re.escape(out.name) + "(" + re.escape(_TEMP_INFIX) + "|" + re.escape(_OLD_INFIX) + ")[0-9a-f]{8}")
    for stale in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        if (pattern.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink()
                and _foreign_files(stale, complete=False) is None):
            shutil.rmtree(stale, ignore_errors=True)


def _new_sibling(out: Path, infix: str, create: bool) -> Path:
    """A fresh path DATA{infix}XXXXXXXX beside `out`; created as a directory (with the umask's permissions,
    unlike tempfile.mkdtemp's 0700) when `create`."""
    while True:
        path = out.parent / f"{out.name}{infix}{secrets.token_hex(4)}"
        if not create:
            if not os.path.lexists(path):
                return path
            continue
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _move_into_place(tmp: Path, out: Path, force: bool, label: str) -> None:
    """Rename the finished directory to `out`: over a missing or empty `out` (the rename fails if files
    appeared in it meanwhile: nothing is replaced), or, with --force, after checking again that `out` is an
    earlier prepare's output and moving it aside (DATA.old-XXXXXXXX, deleted once the new one is in place)."""
    old = None
    if force and out.is_dir() and any(out.iterdir()):
        _check_out(out, force, label)  # again: files may have appeared since the start
        old = _new_sibling(out, _OLD_INFIX, create=False)
        os.replace(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ValueError(f"--out {label}: files appeared in it while bptt prepare ran; nothing was replaced "
                             "(add --force to replace an earlier prepare's output)") from None
        raise
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _HashedWriter:
    """Appends arrays to a file in a fixed dtype, hashing the bytes as they are written."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.f: BinaryIO = open(path, "wb")
        self.dtype = dtype
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        self.f.write(data)
        self.hash.update(data)
        self.count += len(values)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _write_split(directory: Path, split: str, source: str, vocab: Vocab, unit: str, chunk_tokens: int,
                 progress: Callable[[int], None]) -> dict:
    """Encode `source` chunk by chunk into directory/{split}.ids and .starts; its entry of meta.json."""
    ids = _HashedWriter(directory / f"{split}.ids", IDS_DTYPE)
    starts = _HashedWriter(directory / f"{split}.starts", STARTS_DTYPE)
    oovs = _HashedWriter(directory / f"{split}.oov", OOV_DTYPE)
    oov = 0
    try:
        for chunk_ids, chunk_starts, chunk_oov in encode_chunks(source, vocab, unit, chunk_tokens, progress):
            ids.write(chunk_ids)
            starts.write(chunk_starts)
            oovs.write(chunk_oov)
            oov += int(chunk_oov.sum())
    finally:
        ids.close()
        starts.close()
        oovs.close()
    return {
        "tokens": ids.count,
        "sentences": starts.count,
        "oov": oov,
        "source": {"path": os.path.abspath(source), "bytes": os.path.getsize(source), "sha256": file_sha256(source)},
        "ids": {"file": f"{split}.ids", "sha256": ids.hash.hexdigest()},
        "starts": {"file": f"{split}.starts", "sha256": starts.hash.hexdigest()},
        "sentence_oov": {"file": f"{split}.oov", "sha256": oovs.hash.hexdigest()},
    }


# -- load ------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """A directory written by `prepare`, checked against its meta.json (`load_prepared`).

    vocab: the Vocab of DATA/vocab.json. meta: meta.json as a dict. sha256: the sha256 of meta.json,
    which names the whole directory's contents (a run trained on DATA records it). splits: the
    splits present. split(name): that split as a Corpus of read-only np.memmap views.
    """

    path: Path
    meta: dict
    vocab: Vocab
    sha256: str
    verify: bool = True
    _verified: set = field(default_factory=set, repr=False)

    @property
    def unit(self) -> str:
        return self.meta["unit"]

    @property
    def min_count(self) -> int:
        return self.meta["min_count"]

    @property
    def max_vocab(self) -> int | None:
        return self.meta.get("max_vocab")  # absent: no limit

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if s in self.meta["splits"])

    def split(self, name: str) -> Corpus:
        """The split `name` (train, valid, test) as a Corpus: ids (N,) uint32, sentence_starts (S,) int64 and
        sentence_oov (S,) uint32 (None for a DATA without .oov files), read-only memory maps of DATA/{name}.ids,
        .starts and .oov. With verify (the default),
        the files' sha256 are checked against meta.json the first time (the files are read once, in blocks)."""
        meta_path = self.path / META_FILE
        if name not in self.meta["splits"]:
            raise CorpusError(meta_path, f"has no {name!r} split (it has {', '.join(self.splits)})")
        entry = self.meta["splits"][name]
        files = {}
        for kind, path, dtype, count in _split_files(self.path, entry):
            if self.verify and (name, kind) not in self._verified:
                actual = file_sha256(path)
                if actual != entry[kind]["sha256"]:
                    recorded = entry[kind]["sha256"]
                    raise CorpusError(path, f"sha256 {actual[:12]}… does not match {recorded[:12]}… in {meta_path}: "
                                            "the file was modified or corrupted; run bptt prepare again")
                self._verified.add((name, kind))
            files[kind] = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
        ids, starts, sentence_oov = files["ids"], files["starts"], files.get("sentence_oov")
        if int(starts[0]) != 0 or int(ids[-1]) != EOS_ID or not 0 <= int(starts[-1]) < len(ids):
            raise CorpusError(self.path / entry["ids"]["file"], "not a prepared corpus (sentence starts or the final "
                                                                "<eos> do not line up); run bptt prepare again")
        return Corpus(ids, starts, int(entry["tokens"]), int(entry["oov"]), str(self.path / entry["ids"]["file"]),
                      sentence_oov)


def _split_files(directory: Path, entry: dict) -> list[tuple[str, Path, np.dtype, int]]:
    """(kind, path, dtype, count) of a split's .ids, .starts and (when listed) .oov files, each checked to have
    the size its meta.json entry implies."""
    files = []
    kinds = [("ids", IDS_DTYPE, entry["tokens"], "tokens"), ("starts", STARTS_DTYPE, entry["sentences"], "sentences")]
    if "sentence_oov" in entry:
        kinds.append(("sentence_oov", OOV_DTYPE, entry["sentences"], "sentences"))
    for kind, dtype, count, what in kinds:
        path = directory / entry[kind]["file"]
        _check_size(path, count * dtype.itemsize, f"{count} {what}")
        files.append((kind, path, dtype, count))
    return files


def _check_size(path: Path, expected: int, what: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorpusError(path, f"no such file (listed in {META_FILE}); run bptt prepare again") from None
    if size != expected:
        raise CorpusError(path, f"{size} bytes, {META_FILE} says {what} ({expected} bytes): truncated or modified; "
                                "run bptt prepare again")


def _bad_meta(path: Path, what: str) -> CorpusError:
    return CorpusError(path, f"malformed {META_FILE}: {what}")


def _check_count(meta_path: Path, where: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad_meta(meta_path, f"{where} must be an integer >= {minimum}, got {value!r:.40}")


def _check_meta(meta_path: Path, meta: Any) -> None:
    """The structure of meta.json; CorpusError naming it and the first bad field."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorpusError(meta_path, f"not a {FORMAT} file (not written by bptt prepare)")
    if meta.get("version") != VERSION:
        raise CorpusError(meta_path, f"unsupported {FORMAT} version {meta.get('version')!r:.20} (this bptt reads "
                                     f"{VERSION}); run bptt prepare again")
    if meta.get("unit") not in UNITS:
        raise _bad_meta(meta_path, f"'unit' must be one of {', '.join(UNITS)}")
    _check_count(meta_path, "'min_count'", meta.get("min_count"), 1)
    if meta.get("max_vocab") is not None:
        _check_count(meta_path, "'max_vocab'", meta.get("max_vocab"), 2)
    vocab = meta.get("vocab")
    if not isinstance(vocab, dict) or not isinstance(vocab.get("sha256"), str) or vocab.get("file") != VOCAB_FILE:
        raise _bad_meta(meta_path, "'vocab' must hold 'file' and 'sha256'")
    _check_count(meta_path, "'vocab.size'", vocab.get("size"), 2)
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not {"train", "valid"} <= set(splits) or not set(splits) <= set(SPLITS):
        raise _bad_meta(meta_path, "'splits' must hold train, valid and optionally test")
    for name, entry in splits.items():
        if not isinstance(entry, dict):
            raise _bad_meta(meta_path, f"split {name!r} must be an object")
        _check_count(meta_path, f"{name}.tokens", entry.get("tokens"), 1)
        _check_count(meta_path, f"{name}.sentences", entry.get("sentences"), 1)
        _check_count(meta_path, f"{name}.oov", entry.get("oov"), 0)
        for kind, suffix in (("ids", "ids"), ("starts", "starts"), ("sentence_oov", "oov")):
            f = entry.get(kind)
            if kind == "sentence_oov" and f is None:
                continue  # written before the per-sentence OOV counts existed
            if not isinstance(f, dict) or f.get("file") != f"{name}.{suffix}" or not isinstance(f.get("sha256"), str):
                raise _bad_meta(meta_path, f"{name}.{kind} must hold 'file' ({name}.{suffix}) and 'sha256'")


def load_prepared(path: str | os.PathLike, expected_sha256: str | None = None, verify: bool = True) -> PreparedData:
    """Open a directory written by `prepare`: its meta.json, its vocabulary (checked against the sha256 in
    meta.json), and the sizes of every split's files. expected_sha256: the sha256 of meta.json recorded
    by a run trained on it (PreparedData.sha256); a different one is refused (the data changed).
    verify: split() also checks each file's sha256 (the default). CorpusError, one line naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise CorpusError(path, "no such directory (a corpus prepared by bptt prepare)" if not path.exists()
                          else "is not a directory (a corpus prepared by bptt prepare)")
    meta_path = path / META_FILE
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(meta_path, "no such file: not a corpus prepared by bptt prepare") from None
    except OSError as e:
        raise CorpusError(meta_path, f"cannot read: {e.strerror or e}") from None
    sha256 = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise CorpusError(meta_path, f"sha256 {sha256[:12]}… is not the {expected_sha256[:12]}… recorded when the "
                                     "run started: the prepared corpus changed since (prepared again, or replaced)")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad_meta(meta_path, str(e) or type(e).__name__) from None
    _check_meta(meta_path, meta)
    vocab_path = path / VOCAB_FILE
    if not vocab_path.is_file():
        raise CorpusError(vocab_path, f"no such file (listed in {META_FILE}); run bptt prepare again")
    actual = file_sha256(vocab_path)
    if actual != meta["vocab"]["sha256"]:
        raise CorpusError(vocab_path, f"sha256 {actual[:12]}… does not match {meta['vocab']['sha256'][:12]}… in "
                                      f"{meta_path}: the file was modified; run bptt prepare again")
    vocab = Vocab.load(vocab_path)
    if len(vocab) != meta["vocab"]["size"] or vocab.unit != meta["unit"]:
        raise CorpusError(vocab_path, f"does not match {meta_path} (size or unit)")
    for entry in meta["splits"].values():
        _split_files(path, entry)
    return PreparedData(path, meta, vocab, sha256, verify)
