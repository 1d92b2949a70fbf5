"""Corpora, vocabulary and batching for recurrent language models (Mikolov rnnlm conventions).

A corpus is plain UTF-8 text (optionally gzip-compressed, `.gz`), one sentence per line. Every line is
closed by the end-of-sentence token `<eos>` (id 0); words outside the vocabulary map to `<unk>` (id 1).

Two batching schemes:

* `StreamBatches`: continuous streams with the hidden state carried across blocks (truncated BPTT,
  as in PyTorch's word_language_model). Blocks are (T, B) int64 tensors.
* `SentenceBatches`: rnnlm -independent: every sentence starts from a fresh state with `<eos>` as its
  first input. Batches are (T, B) int64 tensors plus a (T, B) bool mask for padding.
"""

from __future__ import annotations

import gzip
import json
import os
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bptt.checkpoint import atomic_write_json

EOS = "<eos>"
UNK = "<unk>"
EOS_ID = 0
UNK_ID = 1
UNITS = ("word", "char")
_VOCAB_FORMAT = "bptt-vocab"
_VOCAB_VERSION = 1


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


def _check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return unit


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def read_lines(path: str | os.PathLike, unit: str = "word") -> Iterator[list[str]]:
    """Yield the tokens of each non-blank line of `path` (without `<eos>`; callers append it).

    unit="word": whitespace-separated tokens. unit="char": the characters of the line with leading and
    trailing whitespace (and the newline) removed; inner spaces are kept as the token " ".
    `.gz` files are decompressed transparently. Bytes are decoded as strict UTF-8 line by line, so an
    undecodable byte raises CorpusError "FILE:LINE: ...". A missing file raises "FILE: no such file"
    and a file without any token "FILE: empty corpus". The unit and the file's existence are checked
    immediately; the decoding errors surface while iterating.
    """
    _check_unit(unit)
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise CorpusError(name, "no such file")
    return _read_lines(name, unit)


def _read_lines(name: str, unit: str) -> Iterator[list[str]]:
    opener = gzip.open if name.endswith(".gz") else open
    found = False
    try:
        with opener(name, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8", errors="strict")
                except UnicodeDecodeError as e:
                    msg = f"invalid UTF-8 (byte {e.start + 1} of the line)"
                    raise CorpusError(name, msg, lineno) from None
                if unit == "word":
                    tokens = text.split()
                else:
                    tokens = list(text.strip())
                if tokens:
                    found = True
                    yield tokens
    except OSError as e:  # e.g. a truncated or corrupt .gz file
        raise CorpusError(name, f"cannot read: {e}") from None
    if not found:
        raise CorpusError(name, "empty corpus")


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
            raise ValueError("vocabulary words must be unique")
        counts = [0] * len(words) if counts is None else [int(c) for c in counts]
        if len(counts) != len(words) or any(c < 0 for c in counts):
            raise ValueError("vocabulary counts must be one non-negative integer per word")
        self.words = words
        self.index = index
        self.counts = counts
        self.unit = _check_unit(unit)

    @classmethod
    def build(
        cls, path: str | os.PathLike, unit: str = "word", min_count: int = 1, max_vocab: int | None = None
    ) -> Vocab:
        """Count the words of the training file `path`.

        Words with count < min_count, and words beyond the first `max_vocab` entries (max_vocab counts
        every entry, `<eos>` and `<unk>` included, so it must be >= 2), map to `<unk>`.
        """
        min_count = _positive_int("--min-count", min_count)
        if max_vocab is not None and (_positive_int("--max-vocab", max_vocab) < 2):
            raise ValueError(f"--max-vocab must be at least 2 (<eos> and <unk>), got {max_vocab}")
        counter: Counter[str] = Counter()
        lines = 0
        for tokens in read_lines(path, unit):
            counter.update(tokens)
            lines += 1
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
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError("'counts' must hold integers")
        return cls(words, counts, d.get("unit", "word"))

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically: temp file in the same directory, fsync, os.replace."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a file written by `save`; CorpusError "FILE: ..." if it is missing or malformed."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CorpusError(path, "no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorpusError(path, f"malformed vocabulary: {e}") from None
        try:
            return cls.from_json(d)
        except ValueError as e:
            raise CorpusError(path, f"malformed vocabulary: {e}") from None


@dataclass
class Corpus:
    """An encoded corpus.

    ids:             (N,) int32, every token of the file in order, each line followed by the `<eos>` id.
    sentence_starts: (S,) int64, index into `ids` of each sentence's first token; S = number of lines.
    tokens:          N = len(ids), `<eos>` tokens included.
    oov:             tokens mapped to `<unk>` that were not a literal `<unk>` in the text.
    path:            the file it was read from.
    sentence_oov:    (S,) int32, those tokens per sentence.
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


def encode(path: str | os.PathLike, vocab: Vocab, unit: str = "word") -> Corpus:
    """Map every token of `path` to its id in `vocab` (OOV -> `<unk>`), appending `<eos>` to each line."""
    index = vocab.index
    ids = array("i")
    starts = array("q")
    sentence_oov = array("i")
    for tokens in read_lines(path, unit):
        starts.append(len(ids))
        line = [index.get(w, -1) for w in tokens]
        missing = line.count(-1)
        if missing:
            line = [UNK_ID if i < 0 else i for i in line]
        sentence_oov.append(missing)
        ids.extend(line)
        ids.append(EOS_ID)
    ids_np = np.frombuffer(ids, dtype=np.int32).copy() if ids.itemsize == 4 else np.asarray(ids, np.int32)
    starts_np = np.asarray(starts, dtype=np.int64)
    oov_np = np.asarray(sentence_oov, dtype=np.int32)
    return Corpus(ids_np, starts_np, int(len(ids_np)), int(oov_np.sum()), os.fspath(path), oov_np)


class StreamBatches:
    """Continuous batching: B contiguous streams, hidden state carried from one block to the next.

    With N tokens, L = (N - 1) // B; stream b is ids[b*L : b*L + L + 1] (the trailing remainder is
    dropped). Block i covers stream positions [i*T, min((i+1)*T, L)):
        inputs[t, b]  = stream_b[i*T + t]       targets[t, b] = stream_b[i*T + t + 1]
    both (T_i, B) int64 with T_i = T except possibly for the last block. len() = ceil(L / T).
    """

    def __init__(self, corpus_ids: np.ndarray, batch_size: int, block: int):
        self.batch_size = B = _positive_int("--batch", batch_size)
        self.block_size = T = _positive_int("block length", block)
        ids = np.asarray(corpus_ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        self.stream_length = L = (n - 1) // B if n > 0 else 0
        if L < 1:
            raise ValueError(f"--batch {B} is too large for a corpus of {n} tokens (each stream needs >= 2)")
        # (L, B): column b is stream b without / shifted by its first token.
        self._inputs = torch.from_numpy(np.ascontiguousarray(ids[: B * L].reshape(B, L).T))
        self._targets = torch.from_numpy(np.ascontiguousarray(ids[1 : B * L + 1].reshape(B, L).T))
        self._len = -(-L // T)

    def __len__(self) -> int:
        return self._len

    def block(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of block i, each (T_i, B) int64."""
        if not 0 <= i < self._len:
            raise IndexError(f"block {i} out of range (0..{self._len - 1})")
        lo = i * self.block_size
        hi = min(lo + self.block_size, self.stream_length)
        return self._inputs[lo:hi], self._targets[lo:hi]

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
    """

    def __init__(self, corpus: Corpus, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.batch_size = _positive_int("--batch", batch_size)
        self._ids = np.asarray(corpus.ids, dtype=np.int64)
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
        targets = np.where(mask, self._ids[pos], 0)
        prev = np.where(t > 0, self._ids[np.maximum(pos - 1, 0)], EOS_ID)
        inputs = np.where(mask, prev, 0)
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i in range(self._len):
            yield self.batch(i)
