"""Linear interpolation of bptt's probabilities with another model's: P = λ·P_bptt + (1−λ)·P_other per token.

The other model's probabilities come as a file of one linear probability per token scored, `</s>` (each
sentence's end) included, in the order the command scores them (rnnlm's -lm-prob): `bptt eval` reads its
text as one stream, token by token; `bptt score` sentence by sentence; `bptt rescore` hypothesis by
hypothesis. A file with too few or too many numbers, or a number outside (0, 1], is refused with one
line naming the file and line.
"""

from __future__ import annotations

import gzip
import math
import os

import numpy as np

from bptt.data import CorpusError


def open_text(path: str | os.PathLike):
    """A UTF-8 text file (gzip-compressed when its name ends in .gz), strict decoding, for reading lines."""
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def number_field(path, line: int, text: str, what: str) -> float:
    """A finite number read from `text` on line `line` of `path`; CorpusError naming them otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise CorpusError(path, f"{what} {text[:40]!r} is not a number", line) from None
    if not math.isfinite(value):
        raise CorpusError(path, f"{what} {text[:40]!r} is not finite", line)
    return value


class OtherModel:
    """Another model's probabilities for linear interpolation: one per token, in scoring order."""

    def __init__(self, probs: np.ndarray, lam: float, path: str = ""):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"--lambda must be in [0, 1], got {lam}")
        self.probs, self.lam, self.path = probs, float(lam), path
        self.used = 0

    @classmethod
    def read(cls, path: str | os.PathLike, lam: float, expected: int) -> OtherModel:
        """A file of linear probabilities (whitespace-separated, usually one per line), each in (0, 1], exactly
        `expected` of them; CorpusError naming the file and line otherwise."""
        values: list[float] = []
        try:
            with open_text(path) as f:
                for number, raw in enumerate(f, 1):
                    for text in raw.split():
                        value = number_field(path, number, text, "probability")
                        if not 0.0 < value <= 1.0:
                            raise CorpusError(path, f"probability {text[:40]} is outside (0, 1]", number)
                        values.append(value)
                        if len(values) > expected:
                            raise CorpusError(path, f"more probabilities than the {expected} tokens scored "
                                                    "(one per word and </s>)", number)
        except UnicodeDecodeError as e:
            raise CorpusError(path, f"not UTF-8 text ({e.reason})") from None
        except OSError as e:
            raise CorpusError(path, f"cannot read: {e.strerror or e}") from None
        if len(values) < expected:
            raise CorpusError(path, f"{len(values)} probabilities for the {expected} tokens scored (one per word "
                                    "and </s>)")
        return cls(np.asarray(values, dtype=np.float64), lam, os.fspath(path))

    def mix(self, ln_p: np.ndarray) -> np.ndarray:
        """The next len(ln_p) tokens' ln P under the mixture: ln(λ·e^ln_p + (1−λ)·p_other)."""
        other = self.probs[self.used : self.used + len(ln_p)]
        if len(other) != len(ln_p):
            raise RuntimeError("the interpolated model ran out of probabilities")  # read() counted them
        self.used += len(ln_p)
        return np.log(self.lam * np.exp(ln_p) + (1.0 - self.lam) * other)


def add_arguments(parser) -> None:
    """--lm-prob F and --lambda L, for the commands that interpolate."""
    parser.add_argument("--lm-prob", metavar="F", help="interpolate with another model: F holds its linear "
                        "probability of every token scored (</s> included), in order (rnnlm's -lm-prob)")
    parser.add_argument("--lambda", dest="lam", type=float, default=None, metavar="L",
                        help="with --lm-prob: the weight of bptt's probability, L·p_bptt + (1−L)·p_other")


def from_arguments(args, tokens: int) -> OtherModel | None:
    """The OtherModel of --lm-prob/--lambda for `tokens` tokens scored, or None; ValueError naming the option."""
    if (args.lm_prob is None) != (args.lam is None):
        raise ValueError("--lm-prob and --lambda go together" if args.lm_prob is None
                         else "--lm-prob needs --lambda L (the weight of bptt's probability)")
    if args.lm_prob is None:
        return None
    if not 0.0 <= args.lam <= 1.0:
        raise ValueError(f"--lambda must be in [0, 1], got {args.lam}")
    return OtherModel.read(args.lm_prob, args.lam, tokens)
