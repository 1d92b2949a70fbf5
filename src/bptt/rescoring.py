"""N-best rescoring for speech recognition (`bptt rescore`) and linear interpolation with another model.

N-best formats (one hypothesis per line; the hypotheses of one utterance on consecutive lines):

    rnnlm    `ID w1 … wn`                   rnnlm's -nbest input; ID an integer, the utterance's
    kaldi    `uttid-k w1 … wn`               Kaldi's: the utterance is uttid (the key up to its last '-')
    srilm3   `ascore lscore nwords w1 … wn`  SRILM's n-best format 3 (log10 scores); a file is one utterance

Each hypothesis is scored as a sentence, `</s>` included: P(w1 … wn </s>), the words read after the
history `<eos>` (the same positions `bptt score` scores). Its state:

    none   every hypothesis from the zero state (`bptt score`'s)
    first  rnnlm's: every hypothesis of an utterance from the state after the previous utterance's first
           hypothesis (itself read from the state its utterance started from); the first utterance from zero
    best   the same with the previous utterance's best hypothesis: the one with the highest score in a
           column given with --scores F (one number per hypothesis, higher is better: e.g. the decoder's
           total log-likelihood); without it, the highest combined score for srilm3 (ascore + lm_weight ·
           new log10 P + word_penalty · nwords) and the highest new log10 P for rnnlm and kaldi

"The state after a hypothesis" is the state after reading `<eos> w1 … wn`: the next hypothesis reads its
`<eos>` next, as in one continuous stream.

Words outside the model's vocabulary are read as `<unk>` and scored with the model's `<unk>`
probability, or at a fixed log10 probability (`oov_log10`, rnnlm's -5 style); they are counted.

Interpolation (bptt/interpolation.py, `OtherModel`): one linear probability per token (`</s>` included)
from another model, in the order the tokens are scored (rnnlm's -lm-prob file); each token then scores
log(λ·p_bptt + (1−λ)·p_other).

Every input problem is a CorpusError naming the file and line, found by a first pass over the whole input
before anything is scored or written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bptt.data import EOS_ID, UNK, UNK_ID, Corpus, CorpusError, Vocab, numbered_lines
from bptt.engine.network import State
from bptt.engine.stream import Stream
from bptt.interpolation import OtherModel, number_field
from bptt.scoring import sentence_ln_probs

FORMATS = ("rnnlm", "kaldi", "srilm3")
CARRY = ("none", "first", "best")
LN10 = math.log(10)


@dataclass
class Hypothesis:
    line: int  # 1-based line of the n-best file
    key: str  # rnnlm: the ID; kaldi: uttid-k; srilm3: ""
    utterance: str  # hypotheses of one utterance share it
    words: list[str]
    fields: list[str]  # srilm3: the text of ascore, lscore, nwords as read
    ascore: float = 0.0  # srilm3's acoustic score (log10)


def _ascii_digits(text: str) -> bool:
    """0-9 only (str.isdigit also takes '²' and other digits that int() refuses or reads otherwise)."""
    return text.isascii() and text.isdigit()


def parse_nbest(path: str | os.PathLike, fmt: str) -> list[Hypothesis]:
    """Every hypothesis of an n-best file, checked; CorpusError (file:line) for a malformed line. Blank
    lines are refused too: each input line gets one output line."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    hyps: list[Hypothesis] = []
    seen: set[str] = set()
    for number, fields in numbered_lines(path):
        if not fields:
            raise CorpusError(path, "blank line (an n-best line holds a hypothesis)", number)
        if fmt == "rnnlm":
            key = fields[0]
            if not _ascii_digits(key.removeprefix("-")):
                raise CorpusError(path, f"the first field {key[:40]!r} is not an integer utterance ID "
                                        "(rnnlm n-best: ID w1 … wn)", number)
            hyp = Hypothesis(number, key, key, fields[1:], [])
        elif fmt == "kaldi":
            key = fields[0]
            utterance, dash, k = key.rpartition("-")
            if not dash or not utterance or not _ascii_digits(k):
                raise CorpusError(path, f"the key {key[:40]!r} is not uttid-k (Kaldi n-best: uttid-k w1 … wn)",
                                  number)
            hyp = Hypothesis(number, key, utterance, fields[1:], [])
        else:
            if len(fields) < 3:
                raise CorpusError(path, "expected 'ascore lscore nwords w1 … wn' (SRILM n-best format 3)",
                                  number)
            ascore = number_field(path, number, fields[0], "ascore")
            number_field(path, number, fields[1], "lscore")
            if not _ascii_digits(fields[2]) or len(fields[2]) > 18 or int(fields[2]) != len(fields) - 3:
                raise CorpusError(path, f"nwords {fields[2][:20]!r} is not the {len(fields) - 3} words that "
                                        "follow it", number)
            hyp = Hypothesis(number, "", "", fields[3:], fields[:3], ascore)
        if hyps and hyp.utterance != hyps[-1].utterance:
            seen.add(hyps[-1].utterance)
            if hyp.utterance in seen:
                raise CorpusError(path, f"utterance {hyp.utterance[:40]!r} again after others: the hypotheses "
                                        "of one utterance must be on consecutive lines", number)
        hyps.append(hyp)
    if not hyps:
        raise CorpusError(path, "no hypotheses (an empty n-best file)")
    return hyps


def utterances(hyps: list[Hypothesis]) -> Iterator[list[Hypothesis]]:
    """The hypotheses grouped by utterance, in order."""
    start = 0
    for i in range(1, len(hyps) + 1):
        if i == len(hyps) or hyps[i].utterance != hyps[start].utterance:
            yield hyps[start:i]
            start = i


def tokens_of(words: list[str], unit: str) -> list[str]:
    """The model's tokens of a hypothesis: its words, or the characters of the words joined by spaces."""
    return list(" ".join(words)) if unit == "char" else list(words)


class Rescorer:
    """Scores hypotheses token by token with a model, carrying the state between utterances (CARRY)."""

    def __init__(self, model, vocab: Vocab, unit: str = "word", carry: str = "none", oov_log10: float | None = None,
                 other: OtherModel | None = None):
        if carry not in CARRY:
            raise ValueError(f"--carry must be one of {', '.join(CARRY)}, got {carry!r}")
        self.model, self.vocab, self.unit, self.carry = model, vocab, unit, carry
        self.oov_log10, self.other = oov_log10, other
        self.state: State | None = None  # the carried state (one stream), None: zero
        self.oov = 0  # tokens outside the vocabulary met so far
        self.tokens = 0

    def ids(self, tokens: list[str]) -> tuple[list[int], list[bool]]:
        ids = [self.vocab.id(t) for t in tokens]
        oov = [i == UNK_ID and t != UNK for i, t in zip(ids, tokens)]
        return ids, oov

    def _ln_probs(self, hyp_ids: list[list[int]], start: State | None) -> list[np.ndarray]:
        """ln P of every target (w1 … wn, </s>) of each hypothesis, all from `start` (None: zero): the
        hypotheses scored as the sentences of a corpus (scoring.sentence_ln_probs)."""
        ids = np.fromiter((i for h in hyp_ids for i in (*h, EOS_ID)), dtype=np.int64)
        starts = np.cumsum([0] + [len(h) + 1 for h in hyp_ids[:-1]], dtype=np.int64)
        per_token = np.zeros(len(ids), dtype=np.float64)
        sentence_ln_probs(self.model, Corpus(ids, starts, len(ids), 0, ""), per_token=per_token, start=start)
        return np.split(per_token, starts[1:])

    @torch.no_grad()
    def _state_after(self, ids: list[int], start: State | None) -> State:
        """The state after reading `<eos> ids` from `start` (None: zero), one stream."""
        stream = Stream(self.model, 1, None if start is None else start.stream(0))
        x = torch.tensor([EOS_ID, *ids], dtype=torch.int64, device=self.model.device).unsqueeze(1)
        stream.forward(x)
        return stream.state

    def score_utterance(self, hyps: list[Hypothesis], lm_weight: float = 1.0, word_penalty: float = 0.0,
                        given: list[float] | None = None) -> list[np.ndarray]:
        """ln P of every token (w1 … wn, </s>) of each hypothesis of one utterance, after the OOV rule and
        interpolation; the carried state moves on (CARRY). given: the hypotheses' own scores (--scores),
        which pick the best one for --carry best."""
        all_ids, per_hyp = [], []
        for hyp in hyps:
            ids, oov = self.ids(tokens_of(hyp.words, self.unit))
            all_ids.append(ids)
            per_hyp.append(oov)
        start = self.state if self.carry != "none" else None
        scores = self._ln_probs(all_ids, start)
        out = []
        for ln_p, oov in zip(scores, per_hyp):
            if self.oov_log10 is not None and any(oov):
                ln_p = ln_p.copy()
                ln_p[: len(oov)][np.asarray(oov)] = self.oov_log10 * LN10
            if self.other is not None:
                ln_p = self.other.mix(ln_p)
            self.oov += sum(oov)
            self.tokens += len(ln_p)
            out.append(ln_p)
        if self.carry != "none":
            if self.carry == "first":
                pick = 0
            elif given is not None:
                pick = int(np.argmax(given))
            else:
                totals = [h.ascore + lm_weight * float(p.sum()) / LN10 + word_penalty * len(h.words)
                          for h, p in zip(hyps, out)]
                pick = int(np.argmax(totals))
            self.state = self._state_after(all_ids[pick], start)
        return out


def count_tokens(hyps: list[Hypothesis], unit: str) -> int:
    """The tokens a rescoring scores: each hypothesis' tokens and its </s>."""
    return sum(len(tokens_of(h.words, unit)) + 1 for h in hyps)


def read_scores(path: str | os.PathLike, expected: int) -> list[float]:
    """One number per line (one per hypothesis, in order), exactly `expected` of them; CorpusError naming the
    file and line otherwise."""
    values: list[float] = []
    for number, fields in numbered_lines(path):
        if len(fields) != 1:
            raise CorpusError(path, f"expected one score per line, got {len(fields)} fields", number)
        if len(values) == expected:
            raise CorpusError(path, f"more scores than the {expected} hypotheses", number)
        values.append(number_field(path, number, fields[0], "score"))
    if len(values) < expected:
        raise CorpusError(path, f"{len(values)} scores for the {expected} hypotheses (one per line)")
    return values
