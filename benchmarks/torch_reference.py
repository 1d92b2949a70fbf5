"""bptt's LSTM training against the same recipe trained by PyTorch's own modules and autograd, epoch by epoch.

    python benchmarks/torch_reference.py --hidden 200 --dropout 0.5 --epochs 3
    python benchmarks/torch_reference.py --hidden 650 --dropout 0.5 --init-range 0.05 --lr 35 --clip 0.143 \
        --decay-start 6 --halving-factor 0.833 --epochs 39        # Zaremba et al.'s medium model

A check of the training dynamics rather than of the gradients (those are checked to the last digit in the
tests): the reference is written here from PyTorch's modules only and shares no code with bptt —
nn.Embedding (e) -> dropout -> nn.LSTM(m, layers, dropout between layers) -> dropout -> nn.Linear(V), the
per-token mean cross-entropy, loss.backward(), clip_grad_norm_, plain SGD — with bptt's recipe: every weight
uniform in ±R and biases zero (PyTorch's LSTM has two bias vectors, b_ih and b_hh, whose sum is bptt's one
bias: both start at zero, and with --one-bias b_hh stays zero), B contiguous streams of the training text (each line followed by <eos>) cut into
blocks of T steps with the state carried across blocks, the rate kept for `--decay-start` epochs and then
multiplied by `--halving-factor` every epoch (Zaremba's schedule, bptt's `--schedule step`), validation as
one stream from <eos> with the state carried through the whole text. bptt runs the same options through its
trainer (`bptt train --cell lstm ...`, the same as the command line) after the reference, or alone with
--only bptt. The dropout masks differ (each side draws its own), so the two curves agree up to the spread of
the seed; a systematic gap would point at a difference in the recipe or the engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"


def read_ids(path: Path, vocab: dict[str, int] | None) -> tuple[list[int], dict[str, int]]:
    """The text's words, each line followed by <eos>, as ids; the vocabulary grows from the training text."""
    words = []
    with open(path) as f:
        for line in f:
            words.extend(line.split())
            words.append("<eos>")
    if vocab is None:
        vocab = {"<eos>": 0}
        for w in words:
            vocab.setdefault(w, len(vocab))
    return [vocab[w] for w in words], vocab


class Reference(nn.Module):
    def __init__(self, V: int, m: int, layers: int, dropout: float, init_range: float, one_bias: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(V, m)
        self.lstm = nn.LSTM(m, m, layers, dropout=dropout)
        self.decoder = nn.Linear(m, V)
        self.drop = nn.Dropout(dropout)
        for name, p in self.named_parameters():
            with torch.no_grad():
                p.zero_() if "bias" in name else p.uniform_(-init_range, init_range)
            if one_bias and name.startswith("lstm.bias_hh"):
                p.requires_grad_(False)  # b_hh stays zero: b_ih alone is bptt's one bias

    def forward(self, x, state):
        h, state = self.lstm(self.drop(self.embedding(x)), state)
        return self.decoder(self.drop(h)), state


def train_reference(args, train: list[int], valid: list[int], V: int) -> list[float]:
    torch.manual_seed(args.seed)
    model = Reference(V, args.hidden, args.layers, args.dropout, args.init_range, args.one_bias)
    B, T = args.batch, args.bptt
    n = (len(train) - 1) // B
    stream = torch.tensor(train[: n * B + 1])
    inputs = stream[:-1].view(B, n).t()  # (n, B): stream b is the b-th contiguous share of the text
    targets = stream[1:].view(B, n).t()
    valid_x = torch.tensor([0] + valid[:-1]).view(-1, 1)  # one stream from <eos>
    valid_y = torch.tensor(valid).view(-1, 1)
    curve, lr = [], args.lr
    for epoch in range(1, args.epochs + 1):
        if epoch > args.decay_start:
            lr *= args.halving_factor
        model.train()
        state, started, train_nats, train_tokens = None, time.perf_counter(), 0.0, 0
        for i in range(0, n - T + 1, T):
            x, y = inputs[i:i + T], targets[i:i + T]
            if state is not None:
                state = tuple(s.detach() for s in state)
            model.zero_grad(set_to_none=True)
            logits, state = model(x, state)
            loss = nn.functional.cross_entropy(logits.view(-1, V), y.reshape(-1))
            loss.backward()
            train_nats, train_tokens = train_nats + loss.item() * y.numel(), train_tokens + y.numel()
            trained = [p for p in model.parameters() if p.requires_grad]
            if args.clip > 0:
                nn.utils.clip_grad_norm_(trained, args.clip)
            with torch.no_grad():
                for p in trained:
                    p.sub_(p.grad, alpha=lr)
        model.eval()
        with torch.no_grad():
            state, nats = None, 0.0
            for i in range(0, len(valid), 1000):
                logits, state = model(valid_x[i:i + 1000], state)
                nats += float(nn.functional.cross_entropy(logits.view(-1, V), valid_y[i:i + 1000].reshape(-1),
                                                          reduction="sum"))
        curve.append(math.exp(nats / len(valid)))
        print(f"reference epoch {epoch}: lr {lr:.4g}, train {math.exp(train_nats / train_tokens):.2f} (dropout on), "
              f"valid {curve[-1]:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return curve


def train_bptt(args, model_dir: str) -> list[float]:
    from bptt.training.trainer import TrainConfig, Trainer

    config = TrainConfig.from_options(
        train=str(args.data / "ptb.train.txt"), valid=str(args.data / "ptb.valid.txt"), model=model_dir,
        cell="lstm", layers=args.layers, hidden_size=args.hidden, dropout=args.dropout, init_range=args.init_range,
        batch=args.batch, bptt=args.bptt, optimizer="sgd", lr=args.lr, clip=args.clip, schedule="step",
        decay_start=args.decay_start, halving_factor=args.halving_factor, epochs=args.epochs, seed=args.seed,
        progress=False)
    Trainer(config).run()
    epochs = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
    for e in epochs:
        print(f"bptt epoch {e['epoch']}: lr {e['lr']:.4g}, train {2 ** e['train_entropy_bits']:.2f} (dropout on), "
              f"valid {e['valid_perplexity']:.2f}", flush=True)
    return [e["valid_perplexity"] for e in epochs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=PTB, help="the directory of ptb.{train,valid}.txt")
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--init-range", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--lr", type=float, default=35.0, help="per-token rate (Zaremba's 1 on a 35-step sum)")
    p.add_argument("--clip", type=float, default=0.143, help="per-token clip (Zaremba's 5 on a 35-step sum)")
    p.add_argument("--decay-start", type=int, default=6)
    p.add_argument("--halving-factor", type=float, default=0.833)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["reference", "bptt"], help="run one side only")
    p.add_argument("--one-bias", action="store_true",
                   help="the reference's LSTM trains b_ih only (b_hh kept at zero), as bptt's one bias per gate")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} threads; {vars(args)}", flush=True)
    curves = {}
    if args.only != "bptt":
        train, vocab = read_ids(args.data / "ptb.train.txt", None)
        valid, _ = read_ids(args.data / "ptb.valid.txt", vocab)
        curves["reference"] = train_reference(args, train, valid, len(vocab))
    if args.only != "reference":
        with tempfile.TemporaryDirectory() as tmp:
            curves["bptt"] = train_bptt(args, os.path.join(tmp, "m"))
    if len(curves) == 2:
        print("\n| epoch | reference valid | bptt valid | bptt / reference |\n|---:|---:|---:|---:|")
        for epoch, (r, b) in enumerate(zip(curves["reference"], curves["bptt"]), 1):
            print(f"| {epoch} | {r:.2f} | {b:.2f} | {b / r:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
