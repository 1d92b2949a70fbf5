"""Score sentences: the log10 probability of every line of a text under a model (rnnlm -nbest style).

Each sentence is scored on its own: the hidden state starts from zero with <eos> as the only history
(rnnlm -independent / -nbest scoring), and the score includes the probability of the sentence's final
<eos>. Output: one number per non-blank input line, in input order (blank lines are skipped, as by
every reader of this package, so they get no output line). Words outside the vocabulary are scored
as <unk> and counted. A summary (lines, tokens with <eos>, OOV, total log10 probability, perplexity
over these sentences) goes to stderr at the end.

Sentences are scored in padded batches of up to 64 sentences of similar lengths; a long line goes
through in pieces with the state carried, so memory stays bounded whatever the input.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from bptt import checks
from bptt.data import EOS_ID, Corpus, Vocab, encode
from bptt.engine.network import State
from bptt.engine.stream import Stream
from bptt.evaluation import perplexity_of

LN10 = math.log(10)
_MAX_ROWS_X_VOCAB = 1 << 24  # cap on the (rows, V) log-probability block computed at once
_POSITIONS_PER_PASS = 1 << 16  # cap on the padded (T, B) positions of one forward pass
SENTENCES_PER_BATCH = 64  # sentences of similar lengths scored together (padded)

@dataclass
class ScoredText:
    """Per-sentence results, in corpus order (one entry per non-blank line)."""

    ln_probs: np.ndarray  # (S,) float64, ln P(sentence + <eos>)
    tokens: np.ndarray  # (S,) int64, predicted tokens per sentence, <eos> included
    oov: np.ndarray | None  # (S,) int64, words mapped to <unk> per sentence (None: not known per sentence)
    path: str = ""
    total_oov_known: int | None = None  # the corpus's OOV count when `oov` is None

    @property
    def log10_probs(self) -> np.ndarray:
        return self.ln_probs / LN10

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def total_oov(self) -> int:
        return int(self.oov.sum()) if self.oov is not None else int(self.total_oov_known or 0)

    @property
    def perplexity(self) -> float:
        return perplexity_of(-float(self.ln_probs.sum()) / self.total_tokens)


@torch.no_grad()
def sentence_ln_probs(model, corpus: Corpus, batch_size: int = SENTENCES_PER_BATCH, per_token: np.ndarray | None = None,
                      start: State | None = None) -> np.ndarray:
    """(S,) float64: ln P(w_1 .. w_n <eos>) of every sentence, each from a fresh state with history <eos>
    (start: a one-stream state every sentence starts from instead; its history is then read before <eos>).

    Sentences go through the model sorted by length, up to `batch_size` of similar lengths at a time
    (padded to the longest of them, the padding masked out), and a batch goes through time in pieces
    of at most _POSITIONS_PER_PASS // B steps with the state carried: memory stays bounded whatever
    the length of a line. Only the unpadded positions go through the output layer, in row chunks so
    that the (rows, V) block stays bounded too. per_token: an (N,) float64 array that receives each
    token's ln P, in corpus order (for interpolation).
    """
    batch_size = checks.positive_int("batch_size", batch_size)
    ids = corpus.ids  # int32 in memory or a prepared corpus's uint32 memory map: read where gathered
    starts = np.asarray(corpus.sentence_starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, len(ids)))
    out = np.zeros(len(starts), dtype=np.float64)
    order = np.argsort(lengths, kind="stable")
    rows_per_chunk = max(1, _MAX_ROWS_X_VOCAB // model.vocab_size)
    for first in range(0, len(order), batch_size):
        sel = order[first : first + batch_size]
        b_starts, b_lengths = starts[sel], lengths[sel]
        B = len(sel)
        steps = max(1, _POSITIONS_PER_PASS // B)
        stream = Stream(model, B, None if start is None else start.stream(0, B))  # default: the zero state
        sums = torch.zeros(B, dtype=torch.float64, device=model.device)
        for lo in range(0, int(b_lengths.max()), steps):
            t = np.arange(lo, min(lo + steps, int(b_lengths.max())))[:, None]  # (T', 1)
            mask = t < b_lengths[None, :]  # (T', B)
            pos = np.where(mask, b_starts[None, :] + t, 0)  # target positions, 0 where padded
            targets = np.where(mask, ids[pos], 0).astype(np.int64)
            inputs = np.where(mask & (t > 0), ids[np.maximum(pos - 1, 0)], EOS_ID).astype(np.int64)
            x = torch.from_numpy(inputs).to(model.device)
            y = torch.from_numpy(targets).to(model.device)
            H, features = stream.forward(x)  # (T', B, m), the state carried to the next piece
            rows = torch.from_numpy(mask).to(model.device).nonzero(as_tuple=True)  # unpadded (t, b)
            states, wanted, columns = H[rows], y[rows], rows[1]
            features = None if features is None else features.view(*x.shape, -1)[rows]  # (n, K) or None
            for r in range(0, wanted.shape[0], rows_per_chunk):
                chunk = None if features is None else features[r : r + rows_per_chunk]
                log_p = model.net.log_probs(model.params, states[r : r + rows_per_chunk], chunk)
                picked = log_p.gather(1, wanted[r : r + rows_per_chunk, None]).squeeze(1).double()
                sums.index_add_(0, columns[r : r + rows_per_chunk], picked)
                if per_token is not None:
                    t_rows, b_rows = (x[r : r + rows_per_chunk].cpu().numpy() for x in rows)
                    per_token[pos[t_rows, b_rows]] = picked.cpu().numpy()
        out[sel] = sums.cpu().numpy()
    return out


def token_ln_probs(model, corpus: Corpus) -> np.ndarray:
    """(N,) float64: ln P of every token of a corpus in order, each sentence from a fresh state."""
    per_token = np.zeros(corpus.tokens, dtype=np.float64)
    sentence_ln_probs(model, corpus, per_token=per_token)
    return per_token


def score_corpus(model, corpus: Corpus, other=None) -> ScoredText:
    """Every sentence of an encoded corpus (a text's, or a split of `bptt prepare`'s DATA) scored; other: an
    interpolation.OtherModel, whose probabilities are mixed with bptt's token by token."""
    oov = None if corpus.sentence_oov is None else np.asarray(corpus.sentence_oov, dtype=np.int64)
    if other is None:
        ln_probs = sentence_ln_probs(model, corpus)
    else:
        starts = np.asarray(corpus.sentence_starts, dtype=np.int64)
        mixed = other.mix(token_ln_probs(model, corpus))
        ln_probs = np.add.reduceat(mixed, starts) if len(starts) else np.zeros(0)
    return ScoredText(ln_probs, corpus.sentence_lengths, oov, corpus.path, corpus.oov)


def score_file(model, vocab: Vocab, path: str | os.PathLike, unit: str = "word") -> ScoredText:
    return score_corpus(model, encode(path, vocab, unit))
