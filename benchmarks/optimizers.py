"""The update rules, timed: bptt's written-out rules (training/optim.py) against torch.optim's foreach and
fused implementations, on the parameters of the PTB recipes' models, in one process, alternating.

    python benchmarks/optimizers.py                       # both models, every rule, 5 rounds of 40 steps
    python benchmarks/optimizers.py --rounds 3 --steps 20 --threads 1

For each model (the one-minute recipe's: V = 10k, m = 150, class softmax with 100 classes; the best
full-softmax recipe's: V = 10k, m = 400) and each rule, every variant steps the same parameters with the
same gradients (assigned to .grad for torch.optim, as explicit gradients would be):

    written/views   bptt's rule over the per-parameter views (one pass per operation and parameter)
    written/flat    bptt's rule over the flat buffer (one pass per operation over all parameters)
    torch/foreach   torch.optim with foreach=True over the per-parameter tensors
    torch/fused     torch.optim with fused=True over the two flat segments (matrices, the rest)

Reported: milliseconds per update (the median round), and how far each variant's parameters are from
the written rule's after the timed steps (max relative difference: 0 = the same bits).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bptt.model import ElmanLM
from bptt.training.optim import make_optimizer

MODELS = {
    "one-minute (V=10k, m=150, class 100)": dict(vocab_size=10_000, hidden_size=150, output="class", classes=100),
    "best full softmax (V=10k, m=400)": dict(vocab_size=10_000, hidden_size=400),
}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}
LR = {"sgd": 0.1, "adam": 2e-3, "adagrad": 0.1, "rmsprop": 1e-3}
FUSED = {"sgd", "adam", "adagrad"}  # torch.optim's CPU fused rules in this torch


def _model(options: dict) -> ElmanLM:
    counts = (1e6 / torch.arange(1, options["vocab_size"] + 1)).tolist()
    return ElmanLM(**options, word_counts=counts, seed=0)


def _gradients(model: ElmanLM, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(model.flat.numel, generator=g) * 1e-3 for _ in range(steps)]


class Written:
    def __init__(self, model: ElmanLM, rule: str, flat: bool):
        self.model, self.flat = model, flat
        self.grads = model.flat.like()
        self.opt = make_optimizer(rule)

    def step(self, g: torch.Tensor, lr: float) -> None:
        self.grads.data.copy_(g)
        if self.flat:
            self.opt.t += 1
            self.opt._update("all", self.model.flat.data, self.grads.data, lr)
        else:
            self.opt.step(self.model.params, self.grads, lr)


class Torch:
    def __init__(self, model: ElmanLM, rule: str, fused: bool):
        self.model = model
        flat = model.flat
        if fused:
            self.params = [torch.nn.Parameter(flat.data[flat.matrices]), torch.nn.Parameter(flat.data[flat.matrices.stop:])]
            self.grads = model.flat.like()
            segments = [self.grads.data[flat.matrices], self.grads.data[flat.matrices.stop:]]
            for p, s in zip(self.params, segments):
                p.grad = s
        else:
            self.params = [torch.nn.Parameter(p) for p in model.params.values()]
            self.grads = model.flat.like()
            for p, g in zip(self.params, self.grads.values()):
                p.grad = g
        kind = {"fused": True} if fused else {"foreach": True}
        self.opt = TORCH[rule](self.params, lr=LR[rule], **kind)

    def step(self, g: torch.Tensor, lr: float) -> None:
        self.grads.data.copy_(g)
        self.opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rules", default="adam,sgd,adagrad,rmsprop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per update, median of "
          f"{args.rounds} rounds of {args.steps} steps (alternating)")
    for title, options in MODELS.items():
        base = _model(options)
        print(f"\n{title}: {sum(p.numel() for p in base.params.values()):,} parameters")
        for rule in args.rules.split(","):
            variants = {}
            for name in ("written/views", "written/flat", "torch/foreach", "torch/fused"):
                if name == "torch/fused" and rule not in FUSED:
                    continue
                model = _model(options)
                if name.startswith("written"):
                    variants[name] = Written(model, rule, flat=name.endswith("flat"))
                else:
                    variants[name] = Torch(model, rule, fused=name.endswith("fused"))
            grads = _gradients(base, args.steps)
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, v in variants.items():
                    start = time.perf_counter()
                    for g in grads:
                        v.step(g, LR[rule])
                    times[name].append((time.perf_counter() - start) / args.steps * 1e3)
            ref = variants["written/views"].model.flat.data
            for name, v in variants.items():
                other = v.model.flat.data
                diff = float((other - ref).abs().max() / ref.abs().max())
                print(f"  {rule:<8} {name:<14} {statistics.median(times[name]):7.2f} ms   "
                      f"(rounds {min(times[name]):.2f}-{max(times[name]):.2f})   vs written/views {diff:.1e}")


if __name__ == "__main__":
    main()
