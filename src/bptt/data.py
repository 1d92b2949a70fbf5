"""Corpora, vocabulary and batching for recurrent language models (Mikolov rnnlm conventions).

A corpus is plain UTF-8 text (optionally gzip-compressed, `.gz`), one sentence per line. Every line is
closed by the end-of-sentence token `<eos>` (id 0); words outside the vocabulary map to `<unk>` (id 1).

Two batching schemes:

* `StreamBatches`: continuous streams with the hidden state carried across blocks (truncated BPTT,
  as in PyTorch's word_language_model). Blocks are (T, B) int64 tensors.
* `SentenceBatches`: rnnlm -independent: every sentence starts from a fresh state with `<eos>` as its
  first input. Batches are (T, B) int64 tensors plus a (T, B) bool mask for padding.

Both read the token ids lazily, block by block: the ids may be an in-memory array (`encode`) or a
read-only memory map of a file written by `bptt prepare` (bptt.prepared), never copied whole.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import mmap
import os
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bptt import checks
from bptt.files import atomic_write_json

EOS = "<eos>"
UNK = "<unk>"
EOS_ID = 0
UNK_ID = 1
UNITS = ("word", "char")
_VOCAB_FORMAT = "bptt-vocab"
_VOCAB_VERSION = 1
_MAX_COUNT = 1 << 63  # word counts must fit an int64


class CorpusError(ValueError):
    """A problem with an input file. The message is one line: `FILE:LINE: what` or `FILE: what`."""

    def __init__(self, path: str | os.PathLike, message: str | None = None, line: int | None = None):
        if message is None:  # CorpusError("FILE: already formatted message")
            super().__init__(" ".join(str(path).split()))
            self.path, self.line = None, None
            return
        where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {' '.join(str(message).split())}")
        self.path: str | None = os.fspath(path)
        self.line = line


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return unit


def read_lines(path: str | os.PathLike, unit: str = "word") -> Iterator[list[str]]:
    """Yield the tokens of each non-blank line of `path` (without `<eos>`; callers append it).

    unit="word": whitespace-separated tokens. unit="char": the characters of the line with leading and
    trailing whitespace (and the newline) removed; inner spaces are kept as the token " ".
    `.gz` files are decompressed transparently. Bytes are decoded as strict UTF-8 line by line, so an
    undecodable byte raises CorpusError "FILE:LINE: ..."; so does a NUL byte (a binary or UTF-16 file).
    A UTF-8 byte-order mark at the start of the file is skipped; CRLF line ends are white space.
    A missing file raises "FILE: no such file", a directory "FILE: is a directory" and a file without
    any token "FILE: empty corpus". The unit and the file's existence are checked immediately; the
    decoding errors surface while iterating. Lines are read in pieces of at most _CHUNK bytes, so a
    line of any length is tokenized without holding more than one piece of its text at a time.
    """
    check_unit(unit)
    name = check_input_file(path)

    def lines() -> Iterator[list[str]]:
        line: list[str] = []
        for tokens, end in _read_pieces(name, unit):
            line.extend(tokens)
            if end:
                if line:
                    yield line
                line = []

    return lines()


_CHUNK = 1 << 20  # bytes read at a time; a longer line is decoded and tokenized piece by piece
_BOM = "\ufeff"  # a UTF-8 byte-order mark opening the file is skipped


def check_input_file(path: str | os.PathLike) -> str:
    """os.fspath(path), or CorpusError "FILE: no such file" / "FILE: is a directory"."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise CorpusError(name, "is a directory, not a text file")
    if not os.path.exists(name):
        raise CorpusError(name, "no such file")
    return name


def _decode(raw: bytes, name: str, lineno: int, offset: int, decoder=None, final: bool = True) -> str:
    """Strict UTF-8 without NUL; errors name the file, the line and the byte (1-based, in the line)."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise CorpusError(name, f"NUL byte (byte {offset + nul + 1} of the line): not a UTF-8 text file", lineno)
    pending = len(decoder.getstate()[0]) if decoder is not None else 0
    try:
        return raw.decode("utf-8", errors="strict") if decoder is None else decoder.decode(raw, final)
    except UnicodeDecodeError as e:
        byte = offset - pending + e.start + 1
        raise CorpusError(name, f"invalid UTF-8 (byte {byte} of the line)", lineno) from None


class _LineTokenizer:
    """Tokens of one line fed as consecutive decoded pieces: a token cut by a piece boundary is carried.

    The carried text is a list of pieces joined once, so a token (or a run of white space) of any
    length costs linear time.
    """

    def __init__(self, unit: str):
        self.unit = unit
        self.carry: list[str] = []  # word: a token that may continue; char: white space that may be trailing
        self.started = False  # char: a non-space character was seen (leading white space is dropped)

    def feed(self, text: str, last: bool) -> list[str]:
        return self._words(text, last) if self.unit == "word" else self._chars(text, last)

    def _words(self, text: str, last: bool) -> list[str]:
        if not text:  # e.g. only the first bytes of a multi-byte character
            if last and self.carry:
                tokens, self.carry = ["".join(self.carry)], []
                return tokens
            return []
        tokens = text.split()
        if self.carry:
            if tokens and not text[0].isspace():  # the carried token goes on
                if len(tokens) == 1 and not text[-1].isspace() and not last:
                    self.carry.append(text)  # and on: no white space in this piece at all
                    return []
                tokens[0] = "".join(self.carry) + tokens[0]
            else:
                tokens.insert(0, "".join(self.carry))
            self.carry = []
        if not last and tokens and not text[-1].isspace():
            self.carry = [tokens.pop()]
        return tokens

    def _chars(self, text: str, last: bool) -> list[str]:
        if not self.started:
            text = text.lstrip()
            if not text:
                return []
            self.started = True
        body = text.rstrip()
        if not body:  # white space only: trailing, unless a character follows
            if not last:
                self.carry.append(text)
            return []
        tokens = list("".join(self.carry)) + list(body) if self.carry else list(body)
        self.carry = [text[len(body):]] if not last and len(body) < len(text) else []
        return tokens


Progress = Callable[[int], None]  # called with the bytes of the file read since its last call
_PROGRESS_LINES = 4096  # lines between two progress calls


def _read_pieces(name: str, unit: str, progress: Progress | None = None,
                 empty_ok: bool = False) -> Iterator[tuple[list[str], bool]]:
    """(tokens, line_ends) for every piece of every line of the file, blank lines included.

    progress, if given, is called every _PROGRESS_LINES lines (and at the end) with the bytes of the
    file on disk read since its last call (compressed bytes for a .gz file): the calls sum to its size.
    Raises CorpusError "FILE: empty corpus" at the end when no line held a token (unless empty_ok).
    """
    found = False
    try:
        gz = name.endswith(".gz")
        with open(name, "rb") as src, (gzip.open(src, "rb") if gz else contextlib.nullcontext(src)) as f:
            lineno = 0
            reported = 0  # bytes of src passed to progress
            while True:
                if progress is not None and lineno % _PROGRESS_LINES == 0:
                    position = src.tell()
                    progress(position - reported)
                    reported = position
                raw = f.readline(_CHUNK)
                if not raw:
                    break
                lineno += 1
                if raw.endswith(b"\n") or len(raw) < _CHUNK:  # the common case: the line in one piece
                    text = _decode(raw, name, lineno, 0)
                    if lineno == 1:
                        text = text.removeprefix(_BOM)
                    tokens = text.split() if unit == "word" else list(text.strip())
                    found = found or bool(tokens)
                    yield tokens, True
                    continue
                decoder = codecs.getincrementaldecoder("utf-8")("strict")
                tokenizer = _LineTokenizer(unit)
                offset, bom = 0, lineno == 1  # bytes of the line before raw; a BOM may still come
                while True:
                    last = not raw or raw.endswith(b"\n") or len(raw) < _CHUNK
                    text = _decode(raw, name, lineno, offset, decoder, last)
                    if bom and text:
                        text, bom = text.removeprefix(_BOM), False
                    tokens = tokenizer.feed(text, last)
                    found = found or bool(tokens)
                    yield tokens, last
                    if last:
                        break
                    offset += len(raw)
                    raw = f.readline(_CHUNK)
            if progress is not None:
                progress(src.tell() - reported)
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a truncated or corrupt .gz file
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise CorpusError(name, f"cannot read: {reason}") from None
    if not found and not empty_ok:
        raise CorpusError(name, "empty corpus")


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every line of a text file, blank lines included (no
    fields): for files whose lines are records (n-best lists, probability and score files, ARPA models).
    Read and checked as read_lines reads a corpus (.gz, strict UTF-8 with "FILE:LINE" errors, NUL bytes,
    unreadable or truncated files as one CorpusError), but an empty file is no error here."""
    name = check_input_file(path)

    def lines() -> Iterator[tuple[int, list[str]]]:
        fields: list[str] = []
        number = 0
        for tokens, end in _read_pieces(name, "word", empty_ok=True):
            fields.extend(tokens)
            if end:
                number += 1
                yield number, fields
                fields = []

    return lines()


class Vocab:
    """Word <-> id mapping. `<eos>` is id 0, `<unk>` id 1, then words by descending training count
    (ties by first appearance).

    words:  list[str], id -> word.     index: dict[str, int], word -> id.
    counts: list[int], training count per id (`<eos>` = number of lines; `<unk>` = literal `<unk>`
            tokens plus every token of a word left out by min_count / max_vocab).
    unit:   "word" or "char", the unit the vocabulary was built with.
    """

    def __init__(self, words: list[str], counts: list[int] | None = None, unit: str = "word"):
        words = list(words)
        if len(words) < 2 or words[0] != EOS or words[1] != UNK:
            raise ValueError(f"a vocabulary must start with {EOS!r}, {UNK!r}")
        if not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary words must be strings")
        index = {w: i for i, w in enumerate(words)}
        if len(index) != len(words):
            seen: set[str] = set()
            duplicate = next(w for w in words if w in seen or seen.add(w))
            raise ValueError(f"vocabulary words must be unique; {duplicate!r} appears more than once")
        counts = [0] * len(words) if counts is None else [int(c) for c in counts]
        if len(counts) != len(words) or any(c < 0 for c in counts):
            raise ValueError("vocabulary counts must be one non-negative integer per word")
        self.words = words
        self.index = index
        self.counts = counts
        self.unit = check_unit(unit)

    @classmethod
    def build(
        cls, path: str | os.PathLike, unit: str = "word", min_count: int = 1, max_vocab: int | None = None,
        progress: Progress | None = None,
    ) -> Vocab:
        """Count the words of the training file `path` (memory: the distinct words, not the text).

        Words with count < min_count, and words beyond the first `max_vocab` entries (max_vocab counts
        every entry, `<eos>` and `<unk>` included, so it must be >= 2), map to `<unk>`. progress: called
        with the bytes read, as the file is read (e.g. a tqdm bar's update).
        """
        min_count = checks.positive_int("--min-count", min_count)
        if max_vocab is not None and (checks.positive_int("--max-vocab", max_vocab) < 2):
            raise ValueError(f"--max-vocab must be at least 2 (<eos> and <unk>), got {max_vocab}")
        check_unit(unit)
        name = check_input_file(path)
        counter: Counter[str] = Counter()
        lines = 0
        in_line = False  # the line being read has a token
        for tokens, end in _read_pieces(name, unit, progress):
            counter.update(tokens)
            in_line = in_line or bool(tokens)
            if end:
                lines += in_line
                in_line = False
        eos_count = lines + counter.pop(EOS, 0)
        unk_count = counter.pop(UNK, 0)
        # Counter keeps first-appearance order and sorted() is stable: ties stay in that order.
        ranked = sorted(counter.items(), key=lambda kv: -kv[1])
        kept = [(w, c) for w, c in ranked if c >= min_count]
        if max_vocab is not None:
            kept = kept[: max_vocab - 2]
        unk_count += sum(counter.values()) - sum(c for _, c in kept)
        return cls([EOS, UNK] + [w for w, _ in kept], [eos_count, unk_count] + [c for _, c in kept], unit)

    def __len__(self) -> int:
        return len(self.words)

    def id(self, word: str) -> int:
        """The id of `word`; the `<unk>` id for a word outside the vocabulary."""
        return self.index.get(word, UNK_ID)

    def to_json(self) -> dict:
        return {
            "format": _VOCAB_FORMAT,
            "version": _VOCAB_VERSION,
            "unit": self.unit,
            "words": list(self.words),
            "counts": list(self.counts),
        }

    @classmethod
    def from_json(cls, d: Any) -> Vocab:
        """Inverse of `to_json`; ValueError on anything malformed."""
        if not isinstance(d, dict) or d.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"not a {_VOCAB_FORMAT} object")
        if d.get("version") != _VOCAB_VERSION:
            raise ValueError(f"unsupported vocabulary version {d.get('version')!r}")
        words, counts = d.get("words"), d.get("counts")
        if not isinstance(words, list) or not isinstance(counts, list):
            raise ValueError("'words' and 'counts' must be lists")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < _MAX_COUNT for c in counts):
            raise ValueError("'counts' must hold integers in [0, 2**63)")
        unit = d.get("unit", "word")
        if unit not in UNITS:
            raise ValueError(f"'unit' must be one of {', '.join(UNITS)}, got {unit!r}")
        return cls(words, counts, unit)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically: temp file in the same directory, fsync, os.replace."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a file written by `save`; CorpusError "FILE: ..." if it is missing or malformed."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise CorpusError(path, "is a directory, not a vocabulary file")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CorpusError(path, "no such file") from None
        except OSError as e:
            raise CorpusError(path, f"cannot read: {e.strerror or e}") from None
        try:
            d = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise CorpusError(path, f"malformed vocabulary: not UTF-8 text (byte {e.start + 1})") from None
        except json.JSONDecodeError as e:
            raise CorpusError(path, f"malformed vocabulary: line {e.lineno} column {e.colno}: {e.msg}") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits, nesting too deep
            raise CorpusError(path, f"malformed vocabulary: {e or type(e).__name__}") from None
        try:
            return cls.from_json(d)
        except ValueError as e:
            raise CorpusError(path, f"malformed vocabulary: {e}") from None


@dataclass
class Corpus:
    """An encoded corpus.

    ids:             (N,) integer token ids, every token of the file in order, each line followed by the
                     `<eos>` id: int32 in memory (`encode`), or a read-only uint32 np.memmap of a file
                     written by `bptt prepare` (bptt.prepared). Consumers index it; they neither copy it
                     whole nor assume its dtype (the batchers convert each block to int64).
    sentence_starts: (S,) int64, index into `ids` of each sentence's first token; S = number of lines
                     (a read-only memmap for a prepared corpus, too).
    tokens:          N = len(ids), `<eos>` tokens included.
    oov:             tokens mapped to `<unk>` that were not a literal `<unk>` in the text.
    path:            the file it was read from.
    sentence_oov:    (S,) int32, those tokens per sentence (a uint32 memmap for a prepared corpus; None for
                     one prepared before bptt wrote them).
    """

    ids: np.ndarray
    sentence_starts: np.ndarray
    tokens: int
    oov: int
    path: str
    sentence_oov: np.ndarray | None = None

    @property
    def oov_rate(self) -> float:
        """oov / tokens (a fraction in [0, 1]; `<eos>` tokens count in the denominator)."""
        return self.oov / self.tokens if self.tokens else 0.0

    @property
    def sentence_lengths(self) -> np.ndarray:
        """(S,) int64, tokens per sentence, its `<eos>` included."""
        return np.diff(np.append(self.sentence_starts, len(self.ids))).astype(np.int64)


ENCODE_CHUNK = 1 << 20  # tokens per chunk of encode_chunks


def encode_chunks(
    path: str | os.PathLike, vocab: Vocab, unit: str = "word", chunk_tokens: int = ENCODE_CHUNK,
    progress: Progress | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`encode`, streamed: the ids of `path` in consecutive chunks, never the whole corpus at once.

    Yields (ids (n,) int32, starts (s,) int64, sentence_oov (s,) int32) with n >= chunk_tokens but
    for the last chunk (a chunk ends on a token boundary, not necessarily a line's end; n < chunk_tokens
    plus the longest read piece). starts index the whole corpus (the concatenation of every chunk's
    ids), one per sentence completed in the chunk, with that sentence's OOV count. Concatenated, the
    chunks are `encode`'s Corpus, exactly. progress: as in Vocab.build.
    """
    check_unit(unit)
    name = check_input_file(path)
    chunk_tokens = checks.positive_int("chunk_tokens", chunk_tokens)
    index = vocab.index
    ids = array("i")
    starts = array("q")
    sentence_oov = array("i")
    done = 0  # tokens in the chunks already yielded
    start, missing = -1, 0  # the line being read: where its first token went (-1: none yet), its OOVs

    def chunk() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids_np = np.frombuffer(ids, dtype=np.int32).copy() if ids.itemsize == 4 else np.asarray(ids, np.int32)
        return ids_np, np.asarray(starts, dtype=np.int64), np.asarray(sentence_oov, dtype=np.int32)

    for tokens, end in _read_pieces(name, unit, progress):
        if tokens:
            if start < 0:
                start = done + len(ids)
            line = [index.get(w, -1) for w in tokens]
            m = line.count(-1)
            if m:
                line = [UNK_ID if i < 0 else i for i in line]
                missing += m
            ids.extend(line)
        if end and start >= 0:
            starts.append(start)
            sentence_oov.append(missing)
            ids.append(EOS_ID)
            start, missing = -1, 0
        if len(ids) >= chunk_tokens:
            yield chunk()
            done += len(ids)
            ids, starts, sentence_oov = array("i"), array("q"), array("i")
    if len(ids) or len(starts):
        yield chunk()


def encode(path: str | os.PathLike, vocab: Vocab, unit: str = "word") -> Corpus:
    """Map every token of `path` to its id in `vocab` (OOV -> `<unk>`), appending `<eos>` to each line."""
    parts = list(encode_chunks(path, vocab, unit))
    ids_np, starts_np, oov_np = (np.concatenate([p[k] for p in parts]) for k in range(3))
    return Corpus(ids_np, starts_np, int(len(ids_np)), int(oov_np.sum()), os.fspath(path), oov_np)


def stream_length(tokens: int, batch_size: int, path: str | None = None) -> int:
    """L = (tokens - 1) // B, the positions of each of B streams; ValueError naming --batch (and the
    corpus file, if given) if L < 1."""
    L = (tokens - 1) // batch_size if tokens > 0 else 0
    if L < 1:
        corpus = f"{path}, a corpus of {tokens} tokens" if path else f"a corpus of {tokens} tokens"
        raise ValueError(f"--batch {batch_size} is too large for {corpus} (each stream needs >= 2)")
    return L


_MAPPED_PER_FAULT = 1 << 20  # bytes of a file mapping one page fault may map (a large page-cache folio: up to 2 MiB)
_RELEASE_BYTES = 32 << 20  # sentence batches: the pages touched are unmapped after about this much
_STREAM_RELEASE_BLOCKS = 1024  # stream blocks: ... every this many blocks (a stream crosses a folio every ~10^4)


class _MappedPages:
    """What the batchers do for ids that are a memory map of a file (np.memmap, or a view of one; nothing for an
    array in memory): advise random access (no read-ahead of pages no stream reads), and every `every` calls of
    `touched` unmap the pages read so far (MADV_DONTNEED: clean pages of a read-only map, read again from the
    page cache when needed). Without it an epoch would leave the whole file mapped: reclaimable page cache, but
    counted in the process's resident memory. With it, about B folios per stream block (each stream stays in
    its folio for thousands of blocks) or `every` batches' worth of sentences stay mapped, whatever the size of
    the corpus (measured: 22 MiB for B = 32 streams, 35 MiB for sentence batches of 32, on a 40 MB file).
    Cost: an madvise and B page faults per release (about 0.1 ms)."""

    def __init__(self, ids: np.ndarray, every: int):
        found = getattr(ids, "_mmap", None)
        self.map = found if isinstance(found, mmap.mmap) else None
        self.every = max(1, int(every))
        self.calls = 0
        self._advise("MADV_RANDOM")

    def _advise(self, name: str) -> None:
        advice = getattr(mmap, name, None)
        if self.map is None or advice is None:
            return
        try:
            self.map.madvise(advice)
        except (OSError, ValueError):  # a platform without it, or a closed map: only memory is at stake
            pass

    def touched(self) -> None:
        if self.map is None:
            return
        self.calls += 1
        if self.calls % self.every == 0:
            self._advise("MADV_DONTNEED")


class StreamBatches:
    """Continuous batching: B contiguous streams, hidden state carried from one block to the next.

    With N tokens, L = (N - 1) // B; stream b is ids[b*L : b*L + L + 1] (the trailing remainder is
    dropped). Block i covers stream positions [i*T, min((i+1)*T, L)):
        inputs[t, b]  = stream_b[i*T + t]       targets[t, b] = stream_b[i*T + t + 1]
    both (T_i, B) int64 with T_i = T except possibly for the last block. len() = ceil(L / T).

    Lazy: only a reference to the ids is kept (an array or a read-only np.memmap of any integer
    dtype); each block is gathered from it when asked for, (T_i + 1)·B ids converted to int64, so the
    memory does not grow with the corpus (for a memory map, the pages read are unmapped now and then:
    _MappedPages).
    """

    def __init__(self, corpus_ids: np.ndarray, batch_size: int, block: int):
        self.batch_size = B = checks.positive_int("--batch", batch_size)
        self.block_size = checks.positive_int("block length", block)
        self._ids = np.asarray(corpus_ids).reshape(-1)  # a view: a memmap stays a map of its file
        self._pages = _MappedPages(corpus_ids, _STREAM_RELEASE_BLOCKS)
        self.stream_length = L = stream_length(len(self._ids), B)
        self._stream_starts = np.arange(B, dtype=np.int64) * L  # (B,): where stream b begins in ids
        self._len = -(-L // self.block_size)

    def __len__(self) -> int:
        return self._len

    def block(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of block i, each (T_i, B) int64."""
        if not 0 <= i < self._len:
            raise IndexError(f"block {i} out of range (0..{self._len - 1})")
        lo = i * self.block_size
        hi = min(lo + self.block_size, self.stream_length)
        # (T_i + 1, B): column b is stream_b[lo : hi + 1]; inputs are its first T_i rows, targets its last
        positions = self._stream_starts[None, :] + np.arange(lo, hi + 1, dtype=np.int64)[:, None]
        window = torch.from_numpy(self._ids[positions].astype(np.int64))
        self._pages.touched()
        return window[:-1], window[1:]

    def iter_from(self, i: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Blocks i, i+1, ..., len-1 (to resume an interrupted epoch)."""
        for j in range(max(0, i), self._len):
            yield self.block(j)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)


class SentenceBatches:
    """Sentence-independent batching (rnnlm -independent): the state restarts at every sentence.

    A sentence w1..wn (with its `<eos>`) gives inputs [<eos>, w1..wn] and targets [w1..wn, <eos>],
    length n + 1. Batches take B sentences in corpus order (or a numpy Generator(seed) permutation when
    shuffle=True), padded to the longest one:
        inputs (T, B) int64, targets (T, B) int64, mask (T, B) bool
    with mask False and id 0 at padding positions. The last batch may have fewer than B columns.

    The token ids are read lazily (a reference to corpus.ids, an array or a read-only np.memmap of any
    integer dtype; each batch gathers its sentences and converts them to int64). The per-sentence
    arrays stay in memory: the starts (a view of corpus.sentence_starts when it is int64), the lengths
    and the order, 8 bytes each per sentence.
    """

    def __init__(self, corpus: Corpus, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.batch_size = checks.positive_int("--batch", batch_size)
        self._ids = np.asarray(corpus.ids).reshape(-1)  # a view: a memmap stays a map of its file
        self._pages = _MappedPages(corpus.ids, _RELEASE_BYTES // (self.batch_size * _MAPPED_PER_FAULT))
        self._starts = np.asarray(corpus.sentence_starts, dtype=np.int64)
        self._lengths = np.diff(np.append(self._starts, len(self._ids)))
        n = len(self._starts)
        if n == 0:
            raise ValueError(f"{corpus.path}: no sentences to batch")
        self.order = np.random.Generator(np.random.PCG64(seed)).permutation(n) if shuffle else np.arange(n)
        self._len = -(-n // self.batch_size)

    def __len__(self) -> int:
        return self._len

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, mask) of batch i, each (T, B_i); T = longest sentence in the batch."""
        if not 0 <= i < self._len:
            raise IndexError(f"batch {i} out of range (0..{self._len - 1})")
        sel = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        starts, lengths = self._starts[sel], self._lengths[sel]
        t = np.arange(int(lengths.max()))[:, None]  # (T, 1)
        mask = t < lengths[None, :]  # (T, B_i)
        pos = np.where(mask, starts[None, :] + t, 0)  # target positions, 0 where padded
        targets = np.where(mask, self._ids[pos].astype(np.int64), 0)
        prev = np.where(t > 0, self._ids[np.maximum(pos - 1, 0)].astype(np.int64), EOS_ID)
        inputs = np.where(mask, prev, 0)
        self._pages.touched()
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i in range(self._len):
            yield self.batch(i)
