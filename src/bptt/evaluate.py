"""Evaluation: exactly normalized log-probabilities of a corpus under a model, perplexity and entropy.

Continuous mode carries the state through the whole corpus in one stream (B = 1), the way rnnlm
scores a test file; the first word is predicted from <eos> as history. Units: entropy in bits per
token, perplexity = 2^entropy; every <eos> counts as a token (Mikolov's convention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bptt.data import EOS
from bptt.model import ElmanLM
from bptt.optim import SGD
from bptt.resources import eval_block


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
        return math.exp(self.nats / self.tokens)

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
def stream_nats(model: ElmanLM, ids: np.ndarray, eos_id: int, block: int | None = None) -> float:
    """−Σ ln P(w_t | w_<t) over a token array (int32), one stream, history starting from <eos>.

    block: positions per output-layer call (default: resources.eval_block(V)); the result does not
    depend on it beyond float rounding, the time does (3.3 s at 256 against 0.95 s at 4096 for PTB
    valid with the class layer: its per-class work is per block).
    """
    if block is None:
        block = eval_block(model.vocab_size)
    tokens = torch.from_numpy(np.concatenate(([eos_id], ids)).astype(np.int64)).to(model.device)
    h = model.initial_state(1)
    context = None  # the n-gram history of direct connections, carried like h (None: <eos>)
    total = 0.0
    for start in range(0, tokens.numel() - 1, block):
        x = tokens[start : start + block].unsqueeze(1)  # (T,1)
        y = tokens[start + 1 : start + block + 1].unsqueeze(1)
        x = x[: y.shape[0]]
        S = model.forward(x, h)  # (T,1,m)
        direct = model.output_features(x, context)
        if getattr(model.output, "forward_is_nll", False):  # −Σ ln P(y), without all V probabilities
            total += float(model.output.forward(model.params, S[:, 0], y[:, 0], **direct)[0])
        else:
            log_p = model.output.log_probs(model.params, S[:, 0], **direct)  # (T,V), exactly normalized
            total -= float(log_p.gather(1, y).sum())
        h = S[-1]
        context = model.next_context(x, context)
    return total


@torch.no_grad()
def dynamic_stream_nats(model: ElmanLM, ids: np.ndarray, eos_id: int, lr: float, block: int = 35) -> float:
    """Dynamic evaluation (rnnlm's -dynamic): −Σ ln P over a token array, one stream from <eos>, the
    model learning from the text as it reads it.

    Each block of `block` tokens is scored with the weights as they stand, then — its words now being
    history — the weights take one SGD step down that block's BPTT gradient: p −= lr · Σ_t ∂(−ln P(w_t))/∂p,
    a rate per token as in rnnlm (BPTT within the block, the carried state s a constant). No word is
    ever scored by weights that have seen it. Changes model.params in place (the eval command loads a
    fresh model). Needs an output layer whose training loss is exactly −Σ ln P (softmax, class, hsm).
    """
    if not getattr(model.output, "forward_is_nll", False):
        raise ValueError(f"--dynamic needs an output layer trained on the exact log-likelihood (softmax, class, "
                         f"hsm), not {model.output_name!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"--dynamic must be a learning rate >= 0, got {lr}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"--dynamic-block must be a positive integer, got {block!r}")
    tokens = torch.from_numpy(np.concatenate(([eos_id], ids)).astype(np.int64))
    h = model.initial_state(1)
    context = None
    total = 0.0
    sgd = SGD()
    for start in range(0, tokens.numel() - 1, block):
        y = tokens[start + 1 : start + block + 1].unsqueeze(1)  # (T,1)
        x = tokens[start : start + y.shape[0]].unsqueeze(1)
        loss, grads, h = model.loss_and_grads(x, y, h0=h, context=context)  # scored before the update
        total += float(loss)
        context = model.next_context(x, context)
        if lr:
            sgd.step(model.params, grads, lr)  # p −= lr · g
    return total


def evaluate_corpus(model: ElmanLM, corpus, vocab, dynamic: float | None = None, block: int = 35) -> Evaluation:
    """An encoded corpus (bptt.data.Corpus) as one stream -> its Evaluation (nats, tokens, OOV).

    dynamic=lr: dynamic evaluation (dynamic_stream_nats, blocks of `block` tokens; changes the model).
    """
    if dynamic is None:
        nats = stream_nats(model, corpus.ids, vocab.id(EOS))
    else:
        nats = dynamic_stream_nats(model, corpus.ids, vocab.id(EOS), dynamic, block)
    return Evaluation(corpus.tokens, nats, corpus.oov, corpus.path)


EXAMPLES = """examples:
  bptt eval --model m --test ptb.test.txt
  bptt eval --model m --test ptb.test.txt --json
  bptt eval --model m --test ptb.test.txt --dynamic 0.01    # rnnlm -dynamic: learn from the text as it is read
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--test", required=True, help="text to evaluate, one sentence per line (.txt or .gz)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dynamic", type=float, default=None, metavar="LR",
                        help="dynamic evaluation (rnnlm -dynamic): after scoring each block, one SGD step on it "
                        "with rate LR per token; the saved model is not changed")
    parser.add_argument("--dynamic-block", type=int, default=35, metavar="K",
                        help="tokens per dynamic update, back-propagated through (default 35)")


def run(args) -> int:
    import json

    from bptt.data import encode
    from bptt.saved_model import load_model, saved_unit

    model, vocab, config = load_model(args.model, args.device)
    corpus = encode(args.test, vocab, saved_unit(config, vocab))
    result = evaluate_corpus(model, corpus, vocab, args.dynamic, args.dynamic_block)
    dynamic = {} if args.dynamic is None else {"dynamic_lr": args.dynamic, "dynamic_block": args.dynamic_block}
    if args.json:
        print(json.dumps({**result.to_json(), **dynamic}))
    else:
        print(
            f"{corpus.path}: perplexity {result.perplexity:.2f}, entropy {result.entropy_bits:.4f} bits/token, "
            f"{result.tokens} tokens, {result.oov} OOV ({100 * result.oov / result.tokens:.2f} %)"
            + (f"; dynamic evaluation, rate {args.dynamic:g}, blocks of {args.dynamic_block}" if dynamic else "")
        )
    return 0
