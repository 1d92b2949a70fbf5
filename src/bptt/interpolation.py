"""Linear interpolation of bptt's probabilities with another model's: P = λ·P_bptt + (1−λ)·P_other per token.

The other model's probabilities come as a file of one linear probability per token scored, `</s>` (each
sentence's end) included, in the order the command scores them (rnnlm's -lm-prob): `bptt eval` reads its
text as one stream, token by token; `bptt score` sentence by sentence; `bptt rescore` hypothesis by
hypothesis. A file with too few or too many numbers, or a number outside (0, 1], is refused with one
line naming the file and line.

Or an ARPA n-gram model (`NgramModel`), queried through KenLM's Python module (the optional extra
`bptt[ngram]`): each sentence scored from `<s>`, its words then `</s>`, in the same token order. The ARPA
file is checked line by line first (its header counts, each section's lines: a log10 probability, N
words, an optional back-off weight), so a file that does not parse is one line naming the file and line.

λ "auto" (`fit_lambda`): EM on the mixture weight over a validation text's tokens: with
r_t = λ p_bptt / (λ p_bptt + (1−λ) p_other), λ ← mean_t r_t, until it moves by less than 1e-7; each step
does not lower the validation likelihood.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys

import numpy as np

from bptt.data import CorpusError, numbered_lines, read_lines


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity|nan)", re.IGNORECASE | re.ASCII)


def number_field(path, line: int, text: str, what: str) -> float:
    """A finite number read from `text` on line `line` of `path` (decimal, ASCII: not Python's '1_0' or other
    scripts' digits, which float() takes); CorpusError naming them otherwise."""
    if not _NUMBER.fullmatch(text):
        raise CorpusError(path, f"{what} {text[:40]!r} is not a number", line)
    value = float(text)
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
        for number, fields in numbered_lines(path):
            for text in fields:
                value = number_field(path, number, text, "probability")
                if not 0.0 < value <= 1.0:
                    raise CorpusError(path, f"probability {text[:40]} is outside (0, 1]", number)
                values.append(value)
                if len(values) > expected:
                    raise CorpusError(path, f"more probabilities than the {expected} tokens scored "
                                            "(one per word and </s>)", number)
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
        if self.lam == 1.0:  # the model alone, exactly (even where e^ln_p underflows)
            return np.asarray(ln_p, dtype=np.float64)
        with np.errstate(divide="ignore"):  # an n-gram probability under 1e-308 is 0 here: ln 0 = -inf, no warning
            ln_other = np.log(other)
        if self.lam == 0.0:
            return ln_other
        # in the log domain: a probability below e^-745 (a float64's least) still counts
        return np.logaddexp(math.log(self.lam) + np.asarray(ln_p, dtype=np.float64), math.log1p(-self.lam) + ln_other)


def add_arguments(parser) -> None:
    """--lm-prob F / --ngram ARPA, --lambda L|auto and --lambda-valid F, for the commands that interpolate."""
    parser.add_argument("--lm-prob", metavar="F", help="interpolate with another model: F holds its linear "
                        "probability of every token scored (</s> included), in order (rnnlm's -lm-prob)")
    parser.add_argument("--ngram", metavar="ARPA", help="interpolate with an ARPA n-gram model, queried through "
                        "KenLM (pip install 'bptt[ngram]')")
    parser.add_argument("--lambda", dest="lam", default=None, metavar="L",
                        help="with --lm-prob or --ngram: the weight of bptt's probability, L·p_bptt + (1−L)·p_other; "
                        "auto (with --ngram): fitted by EM on --lambda-valid's text")
    parser.add_argument("--lambda-valid", metavar="F", help="with --lambda auto: the validation text λ is fitted on")


def check_arguments(args) -> None:
    """The option errors of --lm-prob/--ngram/--lambda/--lambda-valid (before anything is loaded)."""
    if args.lm_prob is not None and args.ngram is not None:
        raise ValueError("--ngram: give either --lm-prob F or --ngram ARPA, not both")
    source = args.lm_prob is not None or args.ngram is not None
    if source != (args.lam is not None):
        raise ValueError("--lambda needs --lm-prob F or --ngram ARPA" if not source
                         else "--lm-prob and --ngram need --lambda L (the weight of bptt's probability)")
    if args.lam == "auto":
        if args.ngram is None:
            raise ValueError("--lambda auto needs --ngram (the n-gram scores the validation text too)")
        if args.lambda_valid is None:
            raise ValueError("--lambda auto needs --lambda-valid F, the text to fit it on")
    elif args.lam is not None:
        try:
            lam = float(args.lam)
        except ValueError:
            raise ValueError(f"--lambda must be a number in [0, 1] or auto, got {args.lam!r}") from None
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"--lambda must be in [0, 1], got {args.lam}")
    if args.lambda_valid is not None and args.lam != "auto":
        raise ValueError("--lambda-valid: only with --lambda auto")


def from_arguments(args, tokens: int, sentences=None, valid_ln_probs=None) -> OtherModel | None:
    """The OtherModel of the options for `tokens` tokens scored, or None. With --ngram: `sentences` gives the
    words of each sentence scored, in order (a callable returning an iterable); with --lambda auto,
    valid_ln_probs(path) gives bptt's ln P of --lambda-valid's tokens, and its sentences are read as words.
    The options were checked by check_arguments, before the model was loaded."""
    if args.lam is None:
        return None
    if args.lm_prob is not None:
        return OtherModel.read(args.lm_prob, float(args.lam), tokens)
    ngram = NgramModel(args.ngram)
    probs = ngram.probabilities(sentences())
    if len(probs) != tokens:
        raise RuntimeError(f"the n-gram scored {len(probs)} tokens, bptt {tokens}")
    if args.lam == "auto":
        valid_ln, valid_sentences = valid_ln_probs(args.lambda_valid)
        lam = fit_lambda(valid_ln, ngram.probabilities(valid_sentences))
    else:
        lam = float(args.lam)
    return OtherModel(probs, lam, ngram.path)


def check_arpa(path: str | os.PathLike) -> list[int]:
    """The n-gram counts of an ARPA file, every line checked; CorpusError naming the file and line."""
    counts: list[int] = []
    section = 0  # 0: before \data\; -1: the header; N: inside \N-grams:
    seen = 0
    ended = False
    for number, fields in numbered_lines(path):
        line = " ".join(fields)
        if not line:
            continue
        if ended:
            raise CorpusError(path, f"text after \\end\\: {line[:40]!r}", number)
        if section == 0:
            if line != "\\data\\":
                raise CorpusError(path, f"expected \\data\\ to start an ARPA file, got {line[:40]!r}", number)
            section = -1
            continue
        if line.startswith("\\") and line.endswith("-grams:"):
            n = line[1:-len("-grams:")]
            if not n.isdigit() or int(n) != (section if section > 0 else 0) + 1 or int(n) > len(counts):
                raise CorpusError(path, f"unexpected section {line[:40]!r}", number)
            if section > 0 and seen != counts[section - 1]:
                raise CorpusError(path, f"{seen} {section}-grams, the header says {counts[section - 1]}",
                                  number)
            section, seen = int(n), 0
            continue
        if line == "\\end\\":
            if section != len(counts) or not counts or seen != counts[-1]:
                raise CorpusError(path, "\\end\\ before every n-gram the header announces", number)
            ended = True
            continue
        if section == -1:
            key, _, value = line.partition("=")
            if not key.startswith("ngram ") or key[6:].strip() != str(len(counts) + 1) or not value.isdigit():
                raise CorpusError(path, f"expected 'ngram {len(counts) + 1}=COUNT' in the header, got "
                                        f"{line[:40]!r}", number)
            counts.append(int(value))
            continue
        fields = line.split()
        if len(fields) not in (section + 1, section + 2):
            raise CorpusError(path, f"a {section}-gram line holds a log10 probability, {section} words and "
                                    f"an optional back-off weight; got {len(fields)} fields", number)
        number_field(path, number, fields[0], "log10 probability")
        if len(fields) == section + 2:
            number_field(path, number, fields[-1], "back-off weight")
        seen += 1
    if not ended:
        raise CorpusError(path, "no \\end\\ line: truncated ARPA file")
    return counts


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null for the duration (what C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class NgramModel:
    """An ARPA n-gram model queried through KenLM's Python module (pip install 'bptt[ngram]')."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.order = len(check_arpa(path))  # a malformed file is named with its line, KenLM or not
        try:
            import kenlm  # the optional extra
        except ImportError:
            raise ValueError("--ngram needs KenLM's Python module: pip install 'bptt[ngram]' (it builds from "
                             "source: a C++ compiler and cmake)") from None
        config = kenlm.Config()
        config.show_progress = False  # KenLM's own progress bar on stderr
        try:
            with _quiet_stderr():  # KenLM's C++ writes "Loading the LM will be faster ..." there
                self.model = kenlm.Model(self.path, config)
        except (OSError, RuntimeError, ValueError) as e:
            raise CorpusError(path, f"KenLM cannot read it: {str(e).splitlines()[0][:200] if str(e) else e}") from None

    def probabilities(self, sentences) -> np.ndarray:
        """Linear probabilities of every token (each sentence's words, then </s>), sentence by sentence from <s>."""
        out: list[float] = []
        for words in sentences:
            out.extend(10.0 ** log10 for log10, _, _ in self.model.full_scores(" ".join(words), bos=True, eos=True))
        return np.asarray(out, dtype=np.float64)


def fit_lambda(ln_p: np.ndarray, other: np.ndarray, start: float = 0.5, tolerance: float = 1e-7,
               max_iterations: int = 1000) -> float:
    """EM for λ in λ·p + (1−λ)·q over tokens with ln p = ln_p and q = other (both (N,)): the weight that
    maximises Σ ln(λ p + (1−λ) q)."""
    p = np.exp(ln_p)
    lam = float(start)
    for _ in range(max_iterations):
        mixed = lam * p + (1.0 - lam) * other
        new = float(np.mean(lam * p / mixed))
        if abs(new - lam) < tolerance:
            return new
        lam = new
    return lam


def require_words(unit: str) -> None:
    """--ngram scores words: refused for a character model."""
    if unit != "word":
        raise ValueError("--ngram: only for word models (an n-gram model over words scores the same tokens)")


def text_sentences(path: str | os.PathLike, unit: str):
    """A callable giving the words of every non-blank line of a text, in order (what an n-gram scores)."""
    require_words(unit)
    return lambda: read_lines(path, unit)
