"""Explicit update rules and learning-rate schedules over dicts of tensors.

Parameters and gradients are plain dicts {name: Tensor} with the same keys (as ElmanLM.params and the
engine's grads). Every rule is written-out tensor arithmetic under torch.no_grad(); nothing here
uses autograd or torch.optim. The rules match torch.optim's SGD, Adam, Adagrad and RMSprop.

Weight decay is L2 (the gradient becomes g + wd·p) and applies to weight matrices only: 1-D
parameters (the bias vectors "b", "c") are never decayed. torch.optim reproduces this with one
param group of 2-D params with weight_decay=wd and one of 1-D params with weight_decay=0.

Decoupled weight decay (Loshchilov & Hutter, "AdamW"; `decoupled_weight_decay=λ`) is applied before
the rule's own update and outside it: p ← p · (1 − lr·λ), again for weight matrices only. With Adam
the difference matters: coupled L2 is divided by sqrt(v) like the gradient, so a rarely seen word's
row, whose gradient is mostly the decay term, shrinks at the full step size; decoupled decay shrinks
every row at the same rate lr·λ. Adam with it matches torch.optim.AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor

OPTIMIZERS = ("sgd", "adam", "adagrad", "rmsprop")


@torch.no_grad()
def clip_grad_norm_(grads: dict[str, Tensor], max_norm: float | None) -> Tensor:
    """Global L2 norm over all grads; scale them in place by min(1, max_norm / (norm + 1e-6)).

    max_norm None or <= 0: no clipping (the norm is still returned). Returns the norm before
    clipping as a 0-d tensor on the grads' device; nothing is synchronised with the host.
    """
    tensors = list(grads.values())
    if not tensors:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2).to(torch.float64) for g in tensors])
    total = torch.linalg.vector_norm(norms, 2)
    if max_norm is not None and max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in tensors:
            g.mul_(scale.to(g.dtype))
    return total.to(tensors[0].dtype)


def _decayed(name: str, p: Tensor, g: Tensor, weight_decay: float) -> Tensor:
    """g + wd·p for weight matrices; g itself for 1-D params (biases) or wd == 0. Never modifies g."""
    if weight_decay == 0.0 or p.dim() < 2:
        return g
    return g.add(p, alpha=weight_decay)


class Optimizer:
    """Common interface: step(params, grads, lr) updates params in place.

    State buffers are created lazily (zeros with each parameter's shape, dtype, device and memory
    layout) and exported by state_dict() as a flat dict: tensors keyed "<buffer>.<param name>"
    (e.g. "m.U", "v.U") and scalars (e.g. "t", the number of steps taken).
    """

    buffers: tuple[str, ...] = ()
    decoupled_weight_decay: float = 0.0  # p *= 1 − lr·λ for weight matrices, before the update

    def __init__(self) -> None:
        self.t = 0
        self.state: dict[str, dict[str, Tensor]] = {b: {} for b in self.buffers}
        self._scratch: dict[str, Tensor] = {}  # per-parameter workspace for the denominator, not state

    def _buffer(self, kind: str, name: str, p: Tensor) -> Tensor:
        store = self.state[kind]
        if name not in store:
            store[name] = torch.zeros_like(p)
        return store[name]

    def _sqrt(self, name: str, x: Tensor) -> Tensor:
        """sqrt(x) written into a workspace kept from step to step: the same values as x.sqrt(), without
        a fresh multi-megabyte tensor (and its page faults) per parameter and step."""
        w = self._scratch.get(name)
        if w is None or w.shape != x.shape or w.dtype != x.dtype or w.device != x.device:
            w = self._scratch[name] = torch.empty_like(x)
        return torch.sqrt(x, out=w)

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr: float) -> None:
        if params.keys() != grads.keys():
            raise ValueError(
                f"params and grads must have the same keys, got {sorted(params)} and {sorted(grads)}"
            )
        self.t += 1
        lam = self.decoupled_weight_decay
        for name, p in params.items():
            if lam and p.dim() >= 2:  # decoupled decay: p ← p (1 − lr·λ), outside the rule
                p.mul_(1.0 - float(lr) * lam)
            self._update(name, p, grads[name], float(lr))

    def _update(self, name: str, p: Tensor, g: Tensor, lr: float) -> None:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor | int | float]:
        out: dict[str, Tensor | int | float] = {"t": self.t}
        for kind, store in self.state.items():
            for name, buf in store.items():
                out[f"{kind}.{name}"] = buf.clone()
        return out

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "t" not in d:
            raise ValueError(f"{type(self).__name__} state has no 't'")
        state: dict[str, dict[str, Tensor]] = {b: {} for b in self.buffers}
        for key, value in d.items():
            if key == "t":
                continue
            kind, _, name = key.partition(".")
            if kind not in state or not name or not isinstance(value, Tensor):
                raise ValueError(f"unexpected key {key!r} in {type(self).__name__} state")
            state[kind][name] = value.detach().clone()
        self.t = int(d["t"])
        self.state = state


class SGD(Optimizer):
    """p -= lr · (g + wd·p)."""

    def __init__(self, weight_decay: float = 0.0):
        super().__init__()
        self.weight_decay = float(weight_decay)

    def _update(self, name, p, g, lr):
        p.sub_(_decayed(name, p, g, self.weight_decay), alpha=lr)


class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba), as torch.optim.Adam (amsgrad=False).

    m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;
    p -= lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)
    """

    buffers = ("m", "v")

    def __init__(
        self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
    ):
        super().__init__()
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, name, p, g, lr):
        g = _decayed(name, p, g, self.weight_decay)
        m = self._buffer("m", name, p)
        v = self._buffer("v", name, p)
        m.lerp_(g, 1 - self.beta1)  # β1 m + (1−β1) g in one pass
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bias1 = 1 - self.beta1 ** self.t
        root2 = math.sqrt(1 - self.beta2 ** self.t)
        # lr/bias1 · m / (sqrt(v)/root2 + eps) = (lr·root2/bias1) · m / (sqrt(v) + eps·root2): one pass fewer
        denom = self._sqrt(name, v).add_(self.eps * root2)
        p.addcdiv_(m, denom, value=-lr * root2 / bias1)


class Adagrad(Optimizer):
    """Adagrad as torch.optim.Adagrad (lr_decay=0, initial_accumulator_value=0).

    sum += g²;  p -= lr · g / (sqrt(sum) + eps)
    """

    buffers = ("sum",)

    def __init__(self, eps: float = 1e-10, weight_decay: float = 0.0):
        super().__init__()
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, name, p, g, lr):
        g = _decayed(name, p, g, self.weight_decay)
        acc = self._buffer("sum", name, p)
        acc.addcmul_(g, g, value=1.0)
        p.addcdiv_(g, self._sqrt(name, acc).add_(self.eps), value=-lr)


class RMSProp(Optimizer):
    """RMSProp as torch.optim.RMSprop (centered=False, momentum=0).

    sq = α sq + (1−α) g²;  p -= lr · g / (sqrt(sq) + eps)
    """

    buffers = ("sq",)

    def __init__(self, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__()
        self.alpha, self.eps = float(alpha), float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, name, p, g, lr):
        g = _decayed(name, p, g, self.weight_decay)
        sq = self._buffer("sq", name, p)
        sq.mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
        p.addcdiv_(g, self._sqrt(name, sq).add_(self.eps), value=-lr)


_CLASSES = {"sgd": SGD, "adam": Adam, "adagrad": Adagrad, "rmsprop": RMSProp}


def make_optimizer(name: str, decoupled_weight_decay: float = 0.0, **kw: Any) -> Optimizer:
    """'sgd' | 'adam' | 'adagrad' | 'rmsprop' (case-insensitive) -> an optimizer built with **kw.

    decoupled_weight_decay=λ > 0 adds p ← p (1 − lr·λ) for weight matrices before each update."""
    try:
        cls = _CLASSES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown --optimizer {name!r}; choose one of {list(OPTIMIZERS)}") from None
    if not 0.0 <= float(decoupled_weight_decay) < math.inf:
        raise ValueError(f"decoupled weight decay must be >= 0, got {decoupled_weight_decay!r}")
    optimizer = cls(**kw)
    optimizer.decoupled_weight_decay = float(decoupled_weight_decay)
    return optimizer
