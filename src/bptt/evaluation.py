"""Evaluation: exactly normalized log-probabilities of a corpus under a model, perplexity and entropy.

Continuous mode carries the state through the whole corpus in one stream (B = 1), the way rnnlm
scores a test file; the first word is predicted from <eos> as history. Units: entropy in bits per
token, perplexity = 2^entropy; every <eos> counts as a token (Mikolov's convention). The model runs
over the corpus through the engine's one streaming helper (engine/stream.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bptt import checks
from bptt.data import EOS
from bptt.engine.outputs.full import rows_within
from bptt.engine.stream import Stream, token_blocks

EVAL_BLOCK_MAX = 4096  # positions per evaluation block (stream_nats) ...
EVAL_BLOCK_MIN = 256
EVAL_SCORES = 1 << 24  # ... as long as a block's (positions, V) score matrix stays under 16M values
MAX_DYNAMIC_LR = 1e4  # a larger --dynamic rate is a typo, not a setting (as for --lr)


def eval_block(vocab_size: int) -> int:
    """Positions per evaluation block for a vocabulary of V: large blocks amortize the per-block work
    (the class layer's per-class products), the (block, V) score matrix of a full softmax bounds it."""
    return max(EVAL_BLOCK_MIN, min(EVAL_BLOCK_MAX, rows_within(EVAL_SCORES, vocab_size)))


def perplexity_of(nats_per_token: float) -> float:
    """exp(nats per token); inf where that overflows (a diverged model, an absurd --dynamic rate)."""
    return math.exp(nats_per_token) if nats_per_token < 700 else math.inf


@dataclass
class Evaluation:
    tokens: int  # predicted tokens, <eos> included
    nats: float  # −Σ ln P, summed over tokens
    oov: int  # tokens mapped to <unk>
    path: str = ""

    @property
    def entropy_bits(self) -> float:
        return self.nats / self.tokens / math.log(2)

    @property
    def perplexity(self) -> float:
        return perplexity_of(self.nats / self.tokens)

    def to_json(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "entropy_bits": self.entropy_bits,
            "tokens": self.tokens,
            "oov": self.oov,
            "oov_rate": self.oov / self.tokens if self.tokens else 0.0,
            **{k: v for k, v in asdict(self).items() if k not in ("tokens", "oov")},
        }


@torch.no_grad()
def stream_nats(model, ids: np.ndarray, eos_id: int, block: int | None = None) -> float:
    """−Σ ln P(w_t | w_<t) over a token array (int32), one stream, history starting from <eos>.

    block: positions per output-layer call (default: eval_block(V)); the result does not depend on
    it beyond float rounding, the time does (3.3 s at 256 against 0.95 s at 4096 for PTB valid with
    the class layer: its per-class work is per block).
    """
    if block is None:
        block = eval_block(model.vocab_size)
    stream = Stream(model, 1)
    total = 0.0
    for x, y in token_blocks(ids, eos_id, block, model.device):
        total += float(stream.nll(x, y))
    return total


@torch.no_grad()
def dynamic_stream_nats(model, ids: np.ndarray, eos_id: int, lr: float, block: int = 35) -> float:
    """Dynamic evaluation (rnnlm's -dynamic): −Σ ln P over a token array, one stream from <eos>, the
    model learning from the text as it reads it.

    Each block of `block` tokens is scored with the weights as they stand, then — its words now being
    history — the weights take one SGD step down that block's BPTT gradient: p −= lr · Σ_t ∂(−ln P(w_t))/∂p,
    a rate per token as in rnnlm (BPTT within the block, the carried state a constant). No word is
    ever scored by weights that have seen it. Changes model.params in place (the eval command loads a
    fresh model). Needs an output layer whose training loss is exactly −Σ ln P (softmax, class, hsm).
    """
    if not getattr(model.output, "forward_is_nll", False):
        raise ValueError(f"--dynamic needs an output layer trained on the exact log-likelihood (softmax, class, "
                         f"hsm), not {model.config.output!r}")
    checks.number("--dynamic", lr, 0, MAX_DYNAMIC_LR, what=f"a learning rate >= 0 and at most {MAX_DYNAMIC_LR:g}")
    block = checks.positive_int("--dynamic-block", block)
    stream = Stream(model, 1)
    grads = model.zero_grads()
    total = 0.0
    for x, y in token_blocks(ids, eos_id, block, model.device):
        loss, grads = stream.loss_and_grads(x, y, grads)  # scored before the update
        total += float(loss)
        if lr:
            model.flat.data.sub_(grads.data, alpha=lr)  # p −= lr · g (SGD)
    return total


@torch.no_grad()
def stream_token_ln_probs(model, ids: np.ndarray, eos_id: int, block: int | None = None) -> np.ndarray:
    """ln P(w_t | w_<t) of every token of a token array, one stream from <eos>, in order: (N,) float64."""
    if block is None:
        block = eval_block(model.vocab_size)
    stream = Stream(model, 1)
    out = np.empty(len(ids), dtype=np.float64)
    done = 0
    for x, y in token_blocks(ids, eos_id, block, model.device):
        picked = stream.log_probs(x).gather(2, y.unsqueeze(2)).reshape(-1)
        out[done : done + picked.numel()] = picked.double().cpu().numpy()
        done += picked.numel()
    return out


def evaluate_corpus(model, corpus, vocab, dynamic: float | None = None, block: int = 35, other=None) -> Evaluation:
    """An encoded corpus (bptt.data.Corpus) as one stream -> its Evaluation (nats, tokens, OOV).

    dynamic=lr: dynamic evaluation (dynamic_stream_nats, blocks of `block` tokens; changes the model).
    other: an interpolation.OtherModel: each token's probability mixed with the other model's.
    """
    if other is not None:
        if dynamic is not None:
            raise ValueError("--dynamic does not combine with --lm-prob (the interpolated model is not trained)")
        ln_p = stream_token_ln_probs(model, corpus.ids, vocab.id(EOS))
        return Evaluation(corpus.tokens, -float(other.mix(ln_p).sum()), corpus.oov, corpus.path)
    if dynamic is None:
        nats = stream_nats(model, corpus.ids, vocab.id(EOS))
    else:
        nats = dynamic_stream_nats(model, corpus.ids, vocab.id(EOS), dynamic, block)
    return Evaluation(corpus.tokens, nats, corpus.oov, corpus.path)
