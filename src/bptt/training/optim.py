"""Update rules (torch.optim's, over the flat parameter buffer) and gradient-norm clipping.

The gradients are written out by the engine; the update rules are not the derivation, so they come
from a well-kept library: torch.optim's SGD, Adam (AdamW with decoupled decay), Adagrad and RMSprop,
fused where torch has a fused kernel for the rule (SGD, Adam, Adagrad: one pass over the parameters
instead of one per operation), foreach otherwise (RMSprop). benchmarks/optimizers.py measured them
against the written-out rules this module held before (docs/performance.md, "The update rules"):
fused Adam and Adagrad are 2.0–2.1× faster per update; SGD and RMSprop give the same bits as before
(10–20 % slower per update, under 1 % of a training step).

The parameters are one flat buffer (engine/flat.py) whose first segment holds every weight matrix and
whose second holds the 1-D parameters (biases, the direct connections' D); torch.optim sees these two
segments as two parameters in two groups, so a step is one update over each.

Weight decay applies to weight matrices only, never to biases or D:
* L2 (`weight_decay=wd`, --l2): the gradient becomes g + wd·p (torch.optim's weight_decay).
* decoupled (`decoupled_weight_decay=λ`, --weight-decay; Loshchilov & Hutter): p ← p · (1 − lr·λ)
  before the rule's own update and outside it. With Adam that is torch.optim.AdamW; for the other rules
  it is applied here, the same way. With Adam the difference matters: coupled L2 is divided by
  sqrt(v) like the gradient, so a rarely seen word's row, whose gradient is mostly the decay term,
  shrinks at the full step size; decoupled decay shrinks every row at the same rate lr·λ.

state_dict() exports the rule's buffers as tensors named "<buffer>.<parameter>" (m.U, v.U for Adam,
sum.U for Adagrad, sq.U for RMSprop) and the step count "t": the names checkpoints have always used,
so a run checkpointed by an earlier bptt resumes. The learning rate may be a tensor (on the device: a
step captured as a CUDA graph reads it from there).
"""

from __future__ import annotations

from typing import Any

import torch

from bptt import checks
from bptt.engine.flat import Flat

Tensor = torch.Tensor

OPTIMIZERS = ("sgd", "adam", "adagrad", "rmsprop")
BUFFERS = {"sgd": {}, "adam": {"m": "exp_avg", "v": "exp_avg_sq"}, "adagrad": {"sum": "sum"},
           "rmsprop": {"sq": "square_avg"}}  # our checkpoint names -> torch.optim's state keys
FUSED = ("sgd", "adam", "adagrad")  # rules with a fused kernel in torch.optim


@torch.no_grad()
def clip_grad_norm_(grads: dict[str, Tensor], max_norm: float | None) -> Tensor:
    """Global L2 norm over all grads; scale them in place by min(1, max_norm / (norm + 1e-6)).

    The norm of each tensor (a view of the flat buffer), then the norm of those norms in float64; the
    scale is applied once to the whole flat buffer (one pass; per tensor for a plain dict). max_norm
    None or <= 0: no clipping (the norm is still returned). Returns the norm before clipping as a
    0-d tensor on the grads' device; nothing is synchronised with the host.
    """
    tensors = list(grads.values())
    if not tensors:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2).to(torch.float64) for g in tensors])
    total = torch.linalg.vector_norm(norms, 2)
    if max_norm is not None and max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if isinstance(grads, Flat):
            grads.data.mul_(scale.to(grads.data.dtype))
        else:
            for g in tensors:
                g.mul_(scale.to(g.dtype))
    return total.to(tensors[0].dtype)


class Optimizer:
    """One of torch.optim's rules over a Flat of parameters; step(grads, lr) with a Flat of gradients."""

    def __init__(self, rule: str, params: Flat, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 decoupled_weight_decay: float = 0.0, capturable: bool = False, **hyper: float):
        self.rule = checks.choice("--optimizer", str(rule).lower(), OPTIMIZERS)
        if not isinstance(params, Flat):
            raise TypeError("an Optimizer steps a Flat of parameters (engine/flat.py)")
        self.params = params
        self.weight_decay = checks.non_negative("weight decay", float(weight_decay))
        self.decoupled_weight_decay = checks.non_negative("decoupled weight decay", float(decoupled_weight_decay))
        data = params.data
        self.segments = [s for s in (params.matrices, slice(params.matrices.stop, params.numel)) if s.stop > s.start]
        self.tensors = [torch.nn.Parameter(data[s]) for s in self.segments]  # share the flat buffer's memory
        decays = [s.start < params.matrices.stop for s in self.segments]  # the matrices' segment decays
        adamw = self.rule == "adam" and self.decoupled_weight_decay > 0
        coupled = self.weight_decay if not adamw else 0.0  # AdamW has no coupled term: added by step() then
        groups = []
        for tensor, decays_ in zip(self.tensors, decays):
            wd = (self.decoupled_weight_decay if adamw else coupled) if decays_ else 0.0
            groups.append({"params": [tensor], "weight_decay": wd})
        kind: dict[str, bool] = {"fused": True} if self.rule in FUSED else {"foreach": True}
        if capturable and self.rule in ("adam", "rmsprop"):  # their step count lives on the device
            kind["capturable"] = True
        self.capturable = capturable
        hyper = {k: float(v) for k, v in hyper.items()}
        if self.rule == "sgd":
            self._torch = torch.optim.SGD(groups, lr=lr, **kind)
        elif self.rule == "adam":
            cls = torch.optim.AdamW if adamw else torch.optim.Adam
            self._torch = cls(groups, lr=lr, betas=(hyper.get("beta1", 0.9), hyper.get("beta2", 0.999)),
                              eps=hyper.get("eps", 1e-8), **kind)
        elif self.rule == "adagrad":
            self._torch = torch.optim.Adagrad(groups, lr=lr, eps=hyper.get("eps", 1e-10), initial_accumulator_value=0.0,
                                              **kind)
        else:
            self._torch = torch.optim.RMSprop(groups, lr=lr, alpha=hyper.get("alpha", 0.99), eps=hyper.get("eps", 1e-8),
                                              **kind)
        self.t = 0  # steps taken
        self._scratch: Tensor | None = None

    def _decay_matrices_(self, lr: float | Tensor) -> None:
        """Decoupled decay outside the rule (all rules but Adam, which is AdamW then): p ← p (1 − lr·λ)."""
        matrices = self.params.data[self.params.matrices]
        matrices.mul_(1.0 - lr * self.decoupled_weight_decay)

    @torch.no_grad()
    def step(self, grads: Flat, lr: float | Tensor) -> None:
        """One update of the parameters with the gradients `grads` (a Flat of the parameters' layout, not
        modified) at learning rate lr (a float, or a 0-d tensor)."""
        if grads.data.shape != self.params.data.shape:
            raise ValueError(f"the gradients have {grads.data.numel()} elements, the parameters {self.params.data.numel()}")
        self.t += 1
        g = grads.data
        if self.rule == "adam" and self.decoupled_weight_decay and self.weight_decay:  # AdamW + coupled L2
            if self._scratch is None:
                self._scratch = torch.empty_like(g)
            g = torch.add(g, self.params.data, alpha=self.weight_decay, out=self._scratch)
            g[self.params.matrices.stop:] = grads.data[self.params.matrices.stop:]  # only the matrices decay
        for tensor, segment in zip(self.tensors, self.segments):
            tensor.grad = g[segment]
        for group in self._torch.param_groups:
            group["lr"] = lr
        if self.decoupled_weight_decay and self.rule != "adam":
            self._decay_matrices_(lr)
        self._torch.step()
        for tensor in self.tensors:
            tensor.grad = None

    # -- state ---------------------------------------------------------------------------------------

    def _buffers(self) -> dict[str, Flat]:
        """The rule's buffers as Flats of the parameters' layout (copies), keyed by our names."""
        out = {}
        for ours, theirs in BUFFERS[self.rule].items():
            pieces = [self._torch.state.get(t, {}).get(theirs) for t in self.tensors]
            if any(p is None for p in pieces):
                continue
            flat = self.params.like()
            for piece, segment in zip(pieces, self.segments):
                flat.data[segment] = piece
            out[ours] = flat
        return out

    def state_tensors(self) -> list[Tensor]:
        """The tensors of torch.optim's state (buffers, step counts) as they are: what a captured step
        updates in place."""
        return [t for tensor in self.tensors for t in self._torch.state.get(tensor, {}).values()
                if isinstance(t, Tensor)]

    def state_dict(self) -> dict[str, Tensor | int | float]:
        """{"t": steps, "<buffer>.<parameter>": tensor, ...} (copies)."""
        out: dict[str, Tensor | int | float] = {"t": self.t}
        for ours, flat in self._buffers().items():
            out.update({f"{ours}.{name}": view.clone() for name, view in flat.items()})
        return out

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a state_dict (buffers copied, in place where they exist); a state without buffers
        (saved before the first step) starts them at zero."""
        if "t" not in d:
            raise ValueError(f"{type(self).__name__} state has no 't'")
        names = BUFFERS[self.rule]
        for key, value in d.items():
            if key == "t":
                continue
            kind, _, name = key.partition(".")
            if kind not in names or name not in self.params or not isinstance(value, Tensor):
                raise ValueError(f"unexpected key {key!r} in {self.rule} optimizer state")
        t = int(d["t"])
        for ours, theirs in names.items():
            flat = self.params.like()
            for name, view in flat.items():
                if f"{ours}.{name}" in d:
                    view.copy_(d[f"{ours}.{name}"])
            for tensor, segment in zip(self.tensors, self.segments):
                state = self._torch.state[tensor]
                if theirs in state:
                    state[theirs].copy_(flat.data[segment])
                else:
                    state[theirs] = flat.data[segment].clone()
        for tensor in self.tensors:
            state = self._torch.state[tensor]
            if self.rule == "sgd":
                continue
            step = state.get("step")
            if step is None:
                on_device = self.capturable or self.rule in FUSED
                state["step"] = torch.tensor(float(t), dtype=torch.float32,
                                             device=tensor.device if on_device else "cpu")
            else:
                step.fill_(float(t))
        self.t = t


def make_optimizer(name: str, params: Flat, *, lr: float = 1e-3, weight_decay: float = 0.0,
                   decoupled_weight_decay: float = 0.0, capturable: bool = False, **hyper: float) -> Optimizer:
    """'sgd' | 'adam' | 'adagrad' | 'rmsprop' (case-insensitive) over a Flat of parameters.

    weight_decay: L2 on weight matrices (g + wd·p); decoupled_weight_decay=λ: p ← p (1 − lr·λ) for weight
    matrices before each update (AdamW with adam). hyper: beta1, beta2, eps (adam), eps (adagrad),
    alpha, eps (rmsprop). capturable: the step count on the device, for a step captured as a CUDA graph."""
    try:
        rule = checks.choice("--optimizer", str(name).lower(), OPTIMIZERS)
    except ValueError:
        raise ValueError(f"unknown --optimizer {name!r}; choose one of {list(OPTIMIZERS)}") from None
    return Optimizer(rule, params, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                     capturable=capturable, **hyper)


class SGD(Optimizer):
    """p ← p − lr · (g + wd·p): torch.optim.SGD (fused) over a Flat of parameters."""

    def __init__(self, params: Flat, lr: float = 1.0, weight_decay: float = 0.0):
        super().__init__("sgd", params, lr=lr, weight_decay=weight_decay)
