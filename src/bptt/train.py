"""Train an Elman RNN language model on a text corpus with the explicit-BPTT engine.

Continuous mode (default): B parallel streams over the corpus, the hidden state carried from block to
block, BPTT(k1, k2) with k1 = --bptt-block (default --bptt) and k2 = --bptt + --bptt-block when a
block is given (rnnlm's -bptt/-bptt-block), else k2 = --bptt (PyTorch's word_language_model).
Sentence mode (--independent, rnnlm's -independent): the state is reset at every sentence; sentences
are batched with padding masked out of the loss and the gradient.

Gradients are averaged over the block's counted tokens, clipped to --clip (global norm), and applied
by an explicit update rule (--optimizer). The learning rate follows Mikolov's schedule: after every
epoch the valid entropy is measured; once its relative improvement drops under --min-improvement
the rate is halved every epoch, and training stops when it drops under it again. The best model on
valid is kept in DIR (model.safetensors, config.json, vocab.json); metrics.jsonl logs every epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bptt.data import SentenceBatches, StreamBatches, Vocab, encode
from bptt.evaluate import Evaluation, stream_nats
from bptt.model import ElmanLM
from bptt.optim import MikolovSchedule, clip_grad_norm_, make_optimizer
from bptt.saved_model import VOCAB_FILE, copy_params, save_model
from bptt.tbptt import TruncatedBPTT

EXAMPLES = """examples:
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m
  bptt train --train a.txt --valid b.txt --model m --hidden 300 --bptt 4 --bptt-block 10 --lr 5
  bptt train --train a.txt --valid b.txt --model m --independent --optimizer adam
"""

DEFAULT_LR = {"sgd": 5.0, "adam": 2e-3, "adagrad": 0.1, "rmsprop": 1e-3}


@dataclass
class TrainConfig:
    train: str
    valid: str
    model: str
    unit: str = "word"
    min_count: int = 1
    max_vocab: int | None = None
    hidden: int = 200
    activation: str = "tanh"
    batch: int = 32
    bptt: int = 35
    bptt_block: int | None = None
    independent: bool = False
    epochs: int = 20
    lr: float | None = None
    optimizer: str = "sgd"
    clip: float = 0.25
    l2: float = 0.0
    min_improvement: float = 1.003
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        for option in ("hidden", "batch", "bptt", "epochs", "min_count"):
            value = getattr(self, option)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{option.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.bptt_block is not None and self.bptt_block < 1:
            raise ValueError(f"--bptt-block must be a positive integer, got {self.bptt_block}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"--optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")

    @property
    def k1(self) -> int:
        return self.bptt_block or self.bptt

    @property
    def k2(self) -> int:
        return self.bptt + self.bptt_block if self.bptt_block else self.bptt


@dataclass
class TrainResult:
    best_valid: Evaluation
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def evaluate_corpus(model: ElmanLM, corpus, vocab: Vocab) -> Evaluation:
    return Evaluation(corpus.tokens, stream_nats(model, corpus.ids, vocab.id("<eos>")), corpus.oov, corpus.path)


def _blocks(config: TrainConfig, corpus, epoch: int):
    """Yield (inputs, targets, mask|None, reset) for one epoch."""
    if config.independent:
        for x, y, mask in SentenceBatches(corpus, config.batch, shuffle=True, seed=config.seed + epoch):
            yield x, y, mask
    else:
        for x, y in StreamBatches(corpus.ids, config.batch, config.k1):
            yield x, y, None


def train(config: TrainConfig) -> TrainResult:
    """Train as configured; the best model on valid ends up in config.model. Returns the metrics."""
    config.validate()
    torch.manual_seed(config.seed)
    out = Path(config.model)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Vocab.build(config.train, config.unit, config.min_count, config.max_vocab)
    vocab.save(out / VOCAB_FILE)
    train_corpus = encode(config.train, vocab, config.unit)
    valid_corpus = encode(config.valid, vocab, config.unit)
    device = torch.device(config.device)
    model = ElmanLM(len(vocab), config.hidden, config.activation, seed=config.seed, device=device)
    optimizer = make_optimizer(config.optimizer, weight_decay=config.l2)
    schedule = MikolovSchedule(config.min_improvement)
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
    engine = TruncatedBPTT(model, config.k1, config.k2)
    best = {k: p.clone() for k, p in model.params.items()}
    best_eval = evaluate_corpus(model, valid_corpus, vocab)
    history: list[dict] = []
    started = time.perf_counter()
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        engine.reset()
        t0 = time.perf_counter()
        total_nats, total_tokens = 0.0, 0
        bar = tqdm(total=train_corpus.tokens, desc=f"epoch {epoch}", unit="tok", disable=not config.progress, leave=False)
        for x, y, mask in _blocks(config, train_corpus, epoch):
            if config.independent:
                loss, grads, _ = model.loss_and_grads(x, y, mask=mask)
                engine_tokens = int(mask.sum())
            else:
                loss, grads = engine.step(x, y)
                engine_tokens = y.numel()
            for g in grads.values():
                g.div_(engine_tokens)  # the mean over the block's tokens
            clip_grad_norm_(grads, config.clip)
            optimizer.step(model.params, grads, lr)
            total_nats += float(loss)
            total_tokens += engine_tokens
            bar.update(engine_tokens)
            bar.set_postfix(loss=f"{total_nats / total_tokens:.3f}", lr=f"{lr:.3g}")
        bar.close()
        valid = evaluate_corpus(model, valid_corpus, vocab)
        decision = schedule.update(valid.entropy_bits)
        if decision.accept and valid.nats <= best_eval.nats:
            best_eval = valid
            copy_params(model.params, best)
            save_model(out, model, {"training": asdict(config), "epoch": epoch, "valid": valid.to_json()})
        elif not decision.accept:
            copy_params(best, model.params)  # rnnlm: an epoch that made valid worse is undone
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_entropy_bits": total_nats / max(total_tokens, 1) / math.log(2),
            "valid_entropy_bits": valid.entropy_bits,
            "valid_perplexity": valid.perplexity,
            "accepted": decision.accept,
            "seconds": time.perf_counter() - t0,
            "tokens_per_s": total_tokens / (time.perf_counter() - t0),
        }
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if config.progress:
            print(
                f"epoch {epoch}: lr {lr:.3g}  train ppl {2 ** record['train_entropy_bits']:.1f}  "
                f"valid ppl {valid.perplexity:.2f}  {record['tokens_per_s']:,.0f} tok/s"
                + ("" if decision.accept else "  (rejected, weights restored)")
            )
        lr *= decision.lr_scale
        if decision.stop:
            break
    if not (out / "model.safetensors").exists():
        save_model(out, model, {"training": asdict(config), "epoch": epoch, "valid": best_eval.to_json()})
    return TrainResult(best_eval, epoch, time.perf_counter() - started, history)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="training text, one sentence per line (.txt or .gz)")
    parser.add_argument("--valid", required=True, help="validation text for the schedule and model selection")
    parser.add_argument("--model", required=True, help="output directory")
    parser.add_argument("--unit", choices=("word", "char"), default="word")
    parser.add_argument("--min-count", type=int, default=1)
    parser.add_argument("--max-vocab", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--activation", choices=("tanh", "sigmoid", "relu", "identity"), default="tanh")
    parser.add_argument("--batch", type=int, default=32, help="parallel streams B")
    parser.add_argument("--bptt", type=int, default=35, help="BPTT steps")
    parser.add_argument("--bptt-block", type=int, default=None, help="update every K1 steps (rnnlm)")
    parser.add_argument("--independent", action="store_true", help="reset the state at every sentence")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default per optimizer: sgd 5)")
    parser.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="sgd")
    parser.add_argument("--clip", type=float, default=0.25, help="gradient-norm clipping (0: off)")
    parser.add_argument("--l2", type=float, default=0.0, help="L2 weight decay")
    parser.add_argument("--min-improvement", type=float, default=1.003)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(
        train=args.train, valid=args.valid, model=args.model, unit=args.unit, min_count=args.min_count,
        max_vocab=args.max_vocab, hidden=args.hidden, activation=args.activation, batch=args.batch,
        bptt=args.bptt, bptt_block=args.bptt_block, independent=args.independent, epochs=args.epochs,
        lr=args.lr, optimizer=args.optimizer, clip=args.clip, l2=args.l2,
        min_improvement=args.min_improvement, seed=args.seed, device=args.device, progress=not args.quiet,
    )
    result = train(config)
    print(
        f"best valid perplexity {result.best_valid.perplexity:.2f} "
        f"({result.best_valid.entropy_bits:.4f} bits/token) after {result.epochs} epochs, "
        f"{result.seconds:.1f} s; model in {config.model}"
    )
    return 0
