"""Score sentences: the log10 probability of every line of a text under a model (rnnlm -nbest style).

Each sentence is scored on its own: the hidden state starts from zero with <eos> as the only history
(rnnlm -independent / -nbest scoring), and the score includes the probability of the sentence's final
<eos>. Output: one number per non-blank input line, in input order (blank lines are skipped, as by
every reader of this package, so they get no output line). Words outside the vocabulary are scored
as <unk> and counted. A summary (lines, tokens with <eos>, OOV, total log10 probability, perplexity
over these sentences) goes to stderr at the end.

Sentences are scored in padded batches of 64: one forward pass and one output-layer pass per batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from bptt.data import Corpus, SentenceBatches, Vocab, encode
from bptt.model import ElmanLM

LN10 = math.log(10)
_MAX_ROWS_X_VOCAB = 1 << 24  # cap on the (rows, V) log-probability block computed at once

EXAMPLES = """examples:
  bptt score --model m --text nbest.txt > scores.txt
  bptt score --model m --text test.txt --ln
  bptt score --model m --text test.txt --json
"""


@dataclass
class ScoredText:
    """Per-sentence results, in corpus order (one entry per non-blank line)."""

    ln_probs: np.ndarray  # (S,) float64, ln P(sentence + <eos>)
    tokens: np.ndarray  # (S,) int64, predicted tokens per sentence, <eos> included
    oov: np.ndarray  # (S,) int64, words mapped to <unk> per sentence
    path: str = ""

    @property
    def log10_probs(self) -> np.ndarray:
        return self.ln_probs / LN10

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def total_oov(self) -> int:
        return int(self.oov.sum())

    @property
    def perplexity(self) -> float:
        return math.exp(-float(self.ln_probs.sum()) / self.total_tokens)


@torch.no_grad()
def sentence_ln_probs(model: ElmanLM, corpus: Corpus, batch_size: int = 64) -> np.ndarray:
    """(S,) float64: ln P(w_1 .. w_n <eos>) of every sentence, each from a fresh state with history <eos>.

    Sentences are batched with padding (SentenceBatches); only the unpadded positions go through the
    output layer, in row chunks so that the (rows, V) block stays bounded.
    """
    batches = SentenceBatches(corpus, batch_size)
    out = np.empty(len(corpus.sentence_starts), dtype=np.float64)
    chunk = max(1, _MAX_ROWS_X_VOCAB // model.vocab_size)
    for i, (x, y, mask) in enumerate(batches):
        x, y, mask = x.to(model.device), y.to(model.device), mask.to(model.device)
        S = model.forward(x)  # (T,B,m), zero initial state: every column a fresh sentence
        rows = mask.nonzero(as_tuple=True)  # unpadded (t, b) positions
        states, targets, columns = S[rows], y[rows], rows[1]
        picked = torch.empty(targets.shape[0], dtype=torch.float64, device=model.device)
        for lo in range(0, targets.shape[0], chunk):
            log_p = model.output.log_probs(model.params, states[lo : lo + chunk])
            picked[lo : lo + chunk] = log_p.gather(1, targets[lo : lo + chunk, None]).squeeze(1).double()
        sums = torch.zeros(x.shape[1], dtype=torch.float64, device=model.device)
        sums.index_add_(0, columns, picked)
        sel = batches.order[i * batch_size : i * batch_size + x.shape[1]]
        out[sel] = sums.cpu().numpy()
    return out


def score_file(model: ElmanLM, vocab: Vocab, path: str | os.PathLike, unit: str = "word") -> ScoredText:
    corpus = encode(path, vocab, unit)
    oov = corpus.sentence_oov.astype(np.int64)
    return ScoredText(sentence_ln_probs(model, corpus), corpus.sentence_lengths, oov, corpus.path)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--text", required=True, help="sentences to score, one per line (.txt or .gz)")
    parser.add_argument("--ln", action="store_true", help="natural logarithms instead of log10")
    parser.add_argument(
        "--json", action="store_true",
        help="one JSON object per line: sentence (1-based, over non-blank lines), tokens, oov, "
        "log10_prob (ln_prob with --ln)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def run(args) -> int:
    import json
    import sys

    from bptt.saved_model import load_model

    model, vocab, config = load_model(args.model, args.device)
    unit = config.get("training", {}).get("unit", vocab.unit)
    result = score_file(model, vocab, args.text, unit)
    scores = result.ln_probs if args.ln else result.log10_probs
    key = "ln_prob" if args.ln else "log10_prob"
    lines = []
    for i, score in enumerate(scores.tolist()):
        if args.json:
            record = {"sentence": i + 1, "tokens": int(result.tokens[i]), "oov": int(result.oov[i])}
            lines.append(json.dumps({**record, key: score}))
        else:
            lines.append(f"{score:.6f}")
    sys.stdout.write("\n".join(lines) + "\n")
    total_log10 = float(result.log10_probs.sum())
    print(
        f"{result.path}: {len(scores)} lines, {result.total_tokens} tokens, {result.total_oov} OOV, "
        f"total log10 prob {total_log10:.4f}, perplexity {result.perplexity:.2f}",
        file=sys.stderr,
    )
    return 0
