"""The text a command reads: a file (--test/--text) or a split of `bptt prepare`'s DATA (--data, --split),
shared by `bptt eval` and `bptt score`."""

from __future__ import annotations

from bptt.data import Corpus, CorpusError, encode
from bptt.prepared import VOCAB_FILE, load_prepared


def check_source(args, option: str) -> str | None:
    """The option errors of `--{option} F` against `--data DATA [--split S]` (before anything is loaded);
    returns the text file's path, or None for DATA. --ngram needs the text's words: not with --data."""
    text = getattr(args, option)
    command = getattr(args, "command", None) or "this command"
    if (text is None) == (args.data is None):
        raise ValueError(f"bptt {command} needs --{option} F or --data DATA" if text is None
                         else f"--data: give either --{option} F or --data DATA, not both")
    if args.split is not None and args.data is None:
        raise ValueError("--split: only with --data DATA")
    if getattr(args, "ngram", None) is not None and args.data is not None:
        raise ValueError(f"--ngram reads the words of the text: give --{option} F, not --data")
    return text


def load_source(args, text: str | None, vocab, unit: str) -> Corpus:
    """The corpus to read: the text encoded with the model's vocabulary, or the DATA split, whose vocabulary
    must be the model's."""
    if text is not None:
        return encode(text, vocab, unit)
    prepared = load_prepared(args.data)
    if prepared.vocab.words != vocab.words or prepared.unit != unit:
        raise CorpusError(prepared.path / VOCAB_FILE, f"is not the vocabulary of the model {args.model} (prepared "
                          "from other texts or options): give its text instead")
    return prepared.split(args.split or "test")
