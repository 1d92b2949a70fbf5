"""A built-in stochastic grammar with an exactly known entropy rate and a long-range dependency.

In the spirit of the embedded Reber grammar, every sentence is

    a_k  w w ... w  z_k            (the toolkit appends <eos>)

an opening word a_k of one of K kinds (uniform), a filler of L words (L uniform in [min_len, max_len])
drawn i.i.d. from a fixed non-uniform distribution over F filler words, and the closing word z_k of
the *same* kind. Whether the sentence stops after a filler word is visible only through the closing
word; which closing word it is can be predicted only by remembering the opening word L + 1 steps back.

The optimal predictor (it knows the grammar and remembers the kind) pays, per sentence,

    log2 K  (the opening)  +  E[L]·H(filler)  +  H(L)  (the stop/continue decisions)  +  0 (<eos>)

bits over E[L] + 3 tokens: that ratio is the true entropy rate, 2^rate the true perplexity. A model
that does not carry the kind across the filler pays log2 K more at every closing word (the
"memoryless" bound). `closing_stats` measures what a model pays on the closing words alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from bptt.data import EOS
from bptt.engine.stream import Stream, token_blocks

__all__ = ["Grammar", "ClosingStats", "closing_stats", "token_log_probs"]


def _default_filler_probs() -> tuple[float, ...]:
    weights = [1.0 / (i + 1) for i in range(10)]  # Zipf-like over w0..w9
    total = sum(weights)
    return tuple(w / total for w in weights)


@dataclass(frozen=True)
class Grammar:
    kinds: int = 4  # K: opening words a0.., closing words z0..
    min_len: int = 1  # filler length L uniform in [min_len, max_len]
    max_len: int = 8
    filler_probs: tuple[float, ...] = field(default_factory=_default_filler_probs)  # over w0..w{F-1}

    def __post_init__(self) -> None:
        if self.kinds < 1:
            raise ValueError(f"kinds must be >= 1, got {self.kinds}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        p = np.asarray(self.filler_probs, dtype=np.float64)
        if p.ndim != 1 or len(p) < 1 or (p <= 0).any() or abs(p.sum() - 1.0) > 1e-9:
            raise ValueError("filler_probs must be positive and sum to 1")

    # --- vocabulary -------------------------------------------------------------------------------
    @property
    def openers(self) -> list[str]:
        return [f"a{k}" for k in range(self.kinds)]

    @property
    def closers(self) -> list[str]:
        return [f"z{k}" for k in range(self.kinds)]

    @property
    def fillers(self) -> list[str]:
        return [f"w{i}" for i in range(len(self.filler_probs))]

    # --- length distribution ----------------------------------------------------------------------
    def length_pmf(self) -> dict[int, float]:
        n = self.max_len - self.min_len + 1
        return {length: 1.0 / n for length in range(self.min_len, self.max_len + 1)}

    def stop_probability(self, fillers_so_far: int) -> float:
        """P(L = n | L >= n): the chance that the closing word follows n filler words (the hazard)."""
        pmf = self.length_pmf()
        tail = sum(p for length, p in pmf.items() if length >= fillers_so_far)
        return pmf.get(fillers_so_far, 0.0) / tail if tail > 0 else 1.0

    # --- sampling ---------------------------------------------------------------------------------
    def sample_sentences(self, n: int, seed: int = 0) -> list[list[str]]:
        """n sentences (without <eos>), deterministic for a given seed."""
        rng = np.random.Generator(np.random.PCG64(seed))
        kinds = rng.integers(0, self.kinds, size=n)
        lengths = rng.integers(self.min_len, self.max_len + 1, size=n)
        fillers = self.fillers
        words = rng.choice(len(fillers), size=int(lengths.sum()), p=np.asarray(self.filler_probs))
        out, pos = [], 0
        for k, length in zip(kinds.tolist(), lengths.tolist()):
            body = [fillers[i] for i in words[pos : pos + length].tolist()]
            pos += length
            out.append([f"a{k}", *body, f"z{k}"])
        return out

    def write_corpus(self, path: str | os.PathLike, n: int, seed: int = 0) -> None:
        """Write n sampled sentences to `path`, one per line."""
        with open(path, "w", encoding="utf-8") as f:
            for sentence in self.sample_sentences(n, seed):
                f.write(" ".join(sentence) + "\n")

    def is_valid(self, sentence: list[str]) -> bool:
        """Whether a sentence (without <eos>) can be produced by the grammar."""
        if len(sentence) < 2 or sentence[0] not in self.openers:
            return False
        body = sentence[1:-1]
        fillers = set(self.fillers)
        return (
            sentence[-1] == "z" + sentence[0][1:]
            and self.min_len <= len(body) <= self.max_len
            and all(w in fillers for w in body)
        )

    # --- the optimal predictor --------------------------------------------------------------------
    def next_token_probs(self, prefix: list[str]) -> dict[str, float]:
        """P(next token | the sentence so far), for a prefix of a valid sentence (without <eos>).

        The empty prefix gives the opening words; after the closing word comes <eos> for sure.
        """
        if not prefix:
            return {w: 1.0 / self.kinds for w in self.openers}
        if prefix[-1] in self.closers:
            return {EOS: 1.0}
        n = len(prefix) - 1  # filler words so far
        stop = self.stop_probability(n)
        probs = {w: (1.0 - stop) * p for w, p in zip(self.fillers, self.filler_probs) if stop < 1.0}
        if stop > 0.0:
            probs["z" + prefix[0][1:]] = stop
        return probs

    def sentence_bits(self, sentence: list[str]) -> float:
        """−log2 P(sentence + <eos>) under the grammar, token by token from next_token_probs."""
        bits = 0.0
        for i, word in enumerate([*sentence, EOS]):
            p = self.next_token_probs(sentence[:i]).get(word, 0.0)
            if p <= 0.0:
                return math.inf
            bits -= math.log2(p)
        return bits

    def score(self, sentences: list[list[str]]) -> tuple[float, int, float]:
        """The optimal predictor on sentences -> (total bits, tokens with <eos>, mean closing-word bits)."""
        bits = sum(self.sentence_bits(s) for s in sentences)
        tokens = sum(len(s) + 1 for s in sentences)
        closing = [-math.log2(self.next_token_probs(s[:-1]).get(s[-1], 0.0) or math.nan) for s in sentences]
        return bits, tokens, sum(closing) / len(closing) if closing else math.nan

    # --- exact rates ------------------------------------------------------------------------------
    def filler_entropy_bits(self) -> float:
        return -sum(p * math.log2(p) for p in self.filler_probs)

    def length_entropy_bits(self) -> float:
        return -sum(p * math.log2(p) for p in self.length_pmf().values() if p > 0)

    def mean_length(self) -> float:
        return sum(length * p for length, p in self.length_pmf().items())

    def tokens_per_sentence(self) -> float:
        """E[tokens] per sentence, <eos> included: opening + E[L] + closing + <eos>."""
        return self.mean_length() + 3.0

    def bits_per_sentence(self) -> float:
        """E[−log2 P(sentence)] under the optimal predictor (closed form)."""
        fillers = self.mean_length() * self.filler_entropy_bits()
        return math.log2(self.kinds) + fillers + self.length_entropy_bits()

    def entropy_rate_bits(self) -> float:
        """The true entropy rate, bits per token (<eos> counted): the optimal predictor's log-loss."""
        return self.bits_per_sentence() / self.tokens_per_sentence()

    def memoryless_rate_bits(self) -> float:
        """The best rate of a predictor that forgets the opening kind: log2 K more per closing word."""
        return (self.bits_per_sentence() + math.log2(self.kinds)) / self.tokens_per_sentence()

    def perplexity_bound(self) -> float:
        return 2.0 ** self.entropy_rate_bits()

    def memoryless_perplexity(self) -> float:
        return 2.0 ** self.memoryless_rate_bits()

    def closing_bits(self) -> float:
        """E[−log2 P(closing word)] of the optimal predictor: the stop decision alone, E[−log2 hazard(L)]."""
        return sum(-p * math.log2(self.stop_probability(length)) for length, p in self.length_pmf().items())

    def describe(self) -> str:
        return (
            f"a_k w..w z_k, K={self.kinds} kinds, filler length {self.min_len}..{self.max_len} of "
            f"{len(self.filler_probs)} words (H={self.filler_entropy_bits():.3f} bits), "
            f"{self.tokens_per_sentence():.1f} tokens/sentence"
        )


# --- what a trained model pays on the closing words --------------------------------------------------


@torch.no_grad()
def token_log_probs(model, ids: np.ndarray, eos_id: int, block: int = 256) -> torch.Tensor:
    """log P(w | w_<t) (nats) over the vocabulary at every token of a stream (history starting from
    <eos>), with the model run by the engine's streaming helper like evaluation's stream_nats (direct
    connections included) -> (N,V) float64 on the CPU: row t is the distribution of token t."""
    stream = Stream(model, 1)
    out = [stream.log_probs(x)[:, 0].double().cpu() for x, _ in token_blocks(ids, eos_id, block, model.device)]
    return torch.cat(out)


@dataclass
class ClosingStats:
    """A model's log-loss on the closing words z_k, the long-range part of the grammar."""

    count: int  # closing words scored
    bits: float  # mean −log2 P(z_k): the stop decision plus the kind
    kind_bits: float  # mean −log2 P(z_k | some closing word): the kind alone (0 optimal, log2 K memoryless)
    kind_accuracy: float  # how often z_k is the most likely closing word


def closing_stats(model, vocab, ids: np.ndarray, grammar: Grammar) -> ClosingStats:
    """Score the closing words of an encoded corpus (ids with <eos>, as bptt.data.encode gives)."""
    log_p = token_log_probs(model, ids, vocab.id(EOS))
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
    closer_ids = torch.tensor([vocab.id(w) for w in grammar.closers])
    at = torch.nonzero(torch.isin(ids_t, closer_ids)).squeeze(1)
    if at.numel() == 0:
        return ClosingStats(0, math.nan, math.nan, math.nan)
    target = ids_t[at]
    lp = log_p[at]  # (n,V)
    word_lp = lp.gather(1, target.unsqueeze(1)).squeeze(1)
    closer_lp = lp[:, closer_ids]  # (n,K)
    kind_lp = word_lp - torch.logsumexp(closer_lp, dim=1)
    correct = closer_ids[closer_lp.argmax(dim=1)] == target
    ln2 = math.log(2)
    return ClosingStats(
        int(at.numel()),
        float(-word_lp.mean()) / ln2,
        float(-kind_lp.mean()) / ln2,
        float(correct.double().mean()),
    )
