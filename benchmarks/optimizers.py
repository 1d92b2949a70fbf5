"""The update rules, timed: bptt's written-out rules (training/optim.py) against torch.optim's foreach and
fused implementations, on the parameters of the PTB recipes' models, in one process, alternating.

    python benchmarks/optimizers.py                       # both models, every rule, 5 rounds of 40 steps
    python benchmarks/optimizers.py --rounds 3 --steps 20 --threads 1

For each model (the one-minute recipe's: V = 10k, m = 150, class softmax with 100 classes; the best
full-softmax recipe's: V = 10k, m = 400) and each rule, every variant steps the same parameters with the
same gradients (assigned to .grad for torch.optim, as explicit gradients would be):

    written/views   the written-out rules bptt had before issue 16 (kept below, for this measurement:
                    the package now uses torch.optim), over the per-parameter views
    written/flat    the same rules over the flat buffer (one pass per operation over all parameters)
    torch/foreach   torch.optim with foreach=True over the per-parameter tensors
    bptt/torch.optim torch.optim with fused=True over the two flat segments (matrices, the rest): what
                    bptt.training.optim does now (foreach for RMSprop, which has no fused kernel)

Reported: milliseconds per update (the median round), and how far each variant's parameters are from
the written rule's after the timed steps (max relative difference: 0 = the same bits).
"""

from __future__ import annotations

import argparse
import math
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


def _model(options: dict) -> ElmanLM:
    counts = (1e6 / torch.arange(1, options["vocab_size"] + 1)).tolist()
    return ElmanLM(**options, word_counts=counts, seed=0)


def _gradients(model: ElmanLM, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(model.flat.numel, generator=g) * 1e-3 for _ in range(steps)]


class WrittenRule:
    """The written-out update rules of bptt before issue 16 (no weight decay: the models are stepped
    with none here), one tensor at a time: `update(key, p, g, lr)`."""

    def __init__(self, rule: str):
        self.rule, self.t, self.state, self.scratch = rule, 0, {}, {}

    def _buffer(self, key, p):
        if key not in self.state:
            self.state[key] = torch.zeros_like(p)
        return self.state[key]

    def _sqrt(self, key, x):
        w = self.scratch.get(key)
        if w is None:
            w = self.scratch[key] = torch.empty_like(x)
        return torch.sqrt(x, out=w)

    def update(self, key, p, g, lr):
        if self.rule == "sgd":
            p.sub_(g, alpha=lr)
        elif self.rule == "adam":
            m, v = self._buffer(("m", key), p), self._buffer(("v", key), p)
            m.lerp_(g, 0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            bias1, root2 = 1 - 0.9**self.t, math.sqrt(1 - 0.999**self.t)
            p.addcdiv_(m, self._sqrt(key, v).add_(1e-8 * root2), value=-lr * root2 / bias1)
        elif self.rule == "adagrad":
            acc = self._buffer(("sum", key), p)
            acc.addcmul_(g, g, value=1.0)
            p.addcdiv_(g, self._sqrt(key, acc).add_(1e-10), value=-lr)
        else:
            sq = self._buffer(("sq", key), p)
            sq.mul_(0.99).addcmul_(g, g, value=0.01)
            p.addcdiv_(g, self._sqrt(key, sq).add_(1e-8), value=-lr)


class Written:
    def __init__(self, model: ElmanLM, rule: str, flat: bool):
        self.model, self.flat = model, flat
        self.grads = model.flat.like()
        self.opt = WrittenRule(rule)

    def step(self, g: torch.Tensor, lr: float) -> None:
        self.grads.data.copy_(g)
        self.opt.t += 1
        if self.flat:
            self.opt.update("all", self.model.flat.data, self.grads.data, lr)
        else:
            for name, p in self.model.params.items():
                self.opt.update(name, p, self.grads[name], lr)


class Torch:
    def __init__(self, model: ElmanLM, rule: str, fused: bool):
        self.model, self.fused = model, fused
        self.grads = model.flat.like()
        if fused:  # bptt's own: torch.optim over the flat buffer's two segments (training/optim.py)
            self.opt = make_optimizer(rule, model.flat, lr=LR[rule])
        else:
            self.params = [torch.nn.Parameter(p) for p in model.params.values()]
            for p, g in zip(self.params, self.grads.values()):
                p.grad = g
            self.opt = TORCH[rule](self.params, lr=LR[rule], foreach=True)

    def step(self, g: torch.Tensor, lr: float) -> None:
        self.grads.data.copy_(g)
        if self.fused:
            self.opt.step(self.grads, lr)
        else:
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
            for name in ("written/views", "written/flat", "torch/foreach", "bptt/torch.optim"):
                model = _model(options)
                if name.startswith("written"):
                    variants[name] = Written(model, rule, flat=name.endswith("flat"))
                else:
                    variants[name] = Torch(model, rule, fused=name.startswith("bptt"))
            grads = _gradients(base, args.steps)
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, v in variants.items():
                    start = time.perf_counter()
                    for g in grads:
                        v.step(g, LR[rule])
                    times[name].append((time.perf_counter() - start) / args.steps * 1e3)
            ref = variants["written/views"].model.params
            for name, v in variants.items():
                other = v.model.params  # the views: the flat buffer's padding is not a parameter
                diff = max(float((other[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
                print(f"  {rule:<8} {name:<14} {statistics.median(times[name]):7.2f} ms   "
                      f"(rounds {min(times[name]):.2f}-{max(times[name]):.2f})   vs written/views {diff:.1e}")


if __name__ == "__main__":
    main()
