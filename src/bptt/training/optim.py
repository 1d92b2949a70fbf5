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
from torch.optim import adagrad as _adagrad
from torch.optim import adam as _adam
from torch.optim import rmsprop as _rmsprop
from torch.optim import sgd as _sgd

from bptt import checks
from bptt.engine.flat import Flat
from bptt.training.sparse_rows import RowBuffer, RowSparseGrads, dense_slices

Tensor = torch.Tensor

OPTIMIZERS = ("sgd", "adam", "adagrad", "rmsprop")
BUFFERS = {"sgd": {}, "adam": {"m": "exp_avg", "v": "exp_avg_sq"}, "adagrad": {"sum": "sum"},
           "rmsprop": {"sq": "square_avg"}}  # our checkpoint names -> torch.optim's state keys
FUSED = ("sgd", "adam", "adagrad")  # rules with a fused kernel in torch.optim
FUSED_CPU_ONLY = ("adagrad",)  # torch.optim's fused Adagrad runs on the CPU only (CUDA: foreach)


@torch.no_grad()
def clip_grad_norm_(grads: dict[str, Tensor], max_norm: float | None) -> Tensor:
    """Global L2 norm over all grads; scale them in place by min(1, max_norm / (norm + 1e-6)).

    The norm of each tensor (a view of the flat buffer; for row-sparse gradients each dense slice and
    each matrix's gathered rows: training/sparse_rows.py), then the norm of those norms in float64; the
    scale is applied once to the whole flat buffer (one pass; per tensor for a plain dict; to the same
    parts for row-sparse gradients). max_norm None or <= 0: no clipping (the norm is still returned).
    Returns the norm before clipping as a 0-d tensor on the grads' device; nothing is synchronised with
    the host.
    """
    flat = isinstance(grads, Flat)
    tensors = grads.parts() if flat else list(grads.values())
    if not tensors:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2).to(torch.float64) for g in tensors])
    total = torch.linalg.vector_norm(norms, 2)
    if max_norm is not None and max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if flat:
            grads.mul_(scale.to(grads.data.dtype))
        else:
            for g in tensors:
                g.mul_(scale.to(g.dtype))
    return total.to(tensors[0].dtype)


class Optimizer:
    """One of torch.optim's rules over a Flat of parameters; step(grads, lr) with a Flat of gradients.

    sparse_rows: matrices updated row by row (training/sparse_rows.py): step() then takes their
    gathered rows from a RowSparseGrads and applies the same rule (torch.optim's functional form) to
    those rows and their buffers only; every other parameter is updated as before."""

    def __init__(self, rule: str, params: Flat, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 decoupled_weight_decay: float = 0.0, capturable: bool = False, sparse_rows: tuple[str, ...] = (),
                 **hyper: float):
        self.rule = checks.choice("--optimizer", str(rule).lower(), OPTIMIZERS)
        if not isinstance(params, Flat):
            raise TypeError("an Optimizer steps a Flat of parameters (engine/flat.py)")
        self.params = params
        self.weight_decay = checks.non_negative("weight decay", float(weight_decay))
        self.decoupled_weight_decay = checks.non_negative("decoupled weight decay", float(decoupled_weight_decay))
        self.sparse_rows = tuple(sparse_rows)
        unknown = [n for n in self.sparse_rows if n not in params or params[n].dim() != 2]
        if unknown:
            raise ValueError(f"sparse_rows names no matrix of the model: {unknown}")
        padded = [n for n in self.sparse_rows if n in params.strides]
        if padded:  # their runs of rows must be contiguous: the fused rules read memory, not strides
            raise ValueError(f"row-sparse matrices are stored without row padding (Flat's unpadded): {padded}")
        if self.sparse_rows and capturable:
            raise ValueError("row-sparse updates cannot be captured (their shapes change from step to step)")
        data = params.data
        # the dense part: whole segments without sparse rows, else the slices between the row-sparse matrices
        self.segments = dense_slices(params, self.sparse_rows)
        self.tensors = [torch.nn.Parameter(data[s]) for s in self.segments]  # share the flat buffer's memory
        decays = [s.start < params.matrices.stop for s in self.segments]  # the matrices' segment decays
        self.decaying = [s for s, d in zip(self.segments, decays) if d]
        self.adamw = self.rule == "adam" and self.decoupled_weight_decay > 0
        coupled = self.weight_decay if not self.adamw else 0.0  # AdamW has no coupled term: added by step() then
        groups = []
        for tensor, decays_ in zip(self.tensors, decays):
            wd = (self.decoupled_weight_decay if self.adamw else coupled) if decays_ else 0.0
            groups.append({"params": [tensor], "weight_decay": wd})
        self.fused = self.rule in FUSED and (data.device.type == "cpu" or self.rule not in FUSED_CPU_ONLY)
        kind: dict[str, bool] = {"fused": True} if self.fused else {"foreach": True}
        if capturable and self.rule in ("adam", "rmsprop"):  # their step count lives on the device
            kind["capturable"] = True
        self.capturable = capturable
        hyper = {k: float(v) for k, v in hyper.items()}
        self.hyper = hyper
        if self.rule == "sgd":
            self._torch = torch.optim.SGD(groups or _placeholder(data), lr=lr, **kind)
        elif self.rule == "adam":
            cls = torch.optim.AdamW if self.adamw else torch.optim.Adam
            self._torch = cls(groups or _placeholder(data), lr=lr,
                              betas=(hyper.get("beta1", 0.9), hyper.get("beta2", 0.999)), eps=hyper.get("eps", 1e-8),
                              **kind)
        elif self.rule == "adagrad":
            self._torch = torch.optim.Adagrad(groups or _placeholder(data), lr=lr, eps=hyper.get("eps", 1e-10),
                                              initial_accumulator_value=0.0, **kind)
        else:
            self._torch = torch.optim.RMSprop(groups or _placeholder(data), lr=lr, alpha=hyper.get("alpha", 0.99),
                                              eps=hyper.get("eps", 1e-8), **kind)
        # the row-sparse matrices' buffers, (rows, width) like Flat.rows: name -> torch.optim state key -> tensor
        self.sparse_state: dict[str, dict[str, Tensor]] = {
            name: {theirs: torch.zeros_like(params.rows(name)) for theirs in BUFFERS[self.rule].values()}
            for name in self.sparse_rows}
        self._space = {name: {k: RowBuffer(params.rows(name)) for k in ("param", *BUFFERS[self.rule].values())}
                       for name in self.sparse_rows}  # where the rows are gathered for the update
        self.t = 0  # steps taken
        self._scratch: Tensor | None = None

    def _decay_matrices_(self, lr: float | Tensor) -> None:
        """Decoupled decay outside the rule (all rules but Adam, which is AdamW then): p ← p (1 − lr·λ)."""
        for s in self.decaying:
            self.params.data[s].mul_(1.0 - lr * self.decoupled_weight_decay)

    @torch.no_grad()
    def step(self, grads: Flat, lr: float | Tensor) -> None:
        """One update of the parameters with the gradients `grads` (a Flat of the parameters' layout, not
        modified; a RowSparseGrads, gathered, for an optimizer with sparse_rows) at learning rate lr (a
        float, or a 0-d tensor)."""
        if grads.data.shape != self.params.data.shape:
            raise ValueError(f"the gradients have {grads.data.numel()} elements, the parameters {self.params.data.numel()}")
        if self.sparse_rows and not isinstance(grads, RowSparseGrads):
            raise TypeError("an optimizer with row-sparse matrices steps with RowSparseGrads (training/sparse_rows.py)")
        self.t += 1
        g = grads.data
        if self.adamw and self.weight_decay:  # AdamW + coupled L2 on the matrices
            if self._scratch is None:
                self._scratch = torch.empty_like(g)
            g = self._scratch
            for s in self.segments:
                g[s] = grads.data[s]
            for s in self.decaying:
                torch.add(grads.data[s], self.params.data[s], alpha=self.weight_decay, out=g[s])
        for group in self._torch.param_groups:
            group["lr"] = lr
        if self.decoupled_weight_decay and self.rule != "adam":
            self._decay_matrices_(lr)
        if self.rule == "sgd":  # stateless: torch.optim's functional rule without Optimizer.step's wrapper
            self._sgd_dense(g, lr)  # (≈ 50 µs of host work per step, which a small step on a GPU waits for)
        else:
            for tensor, segment in zip(self.tensors, self.segments):
                tensor.grad = g[segment]
            if self.tensors:
                self._torch.step()
            for tensor in self.tensors:
                tensor.grad = None
        for name in self.sparse_rows:
            self._step_rows(name, grads, lr)

    @torch.no_grad()
    def _sgd_dense(self, g: Tensor, lr: float | Tensor) -> None:
        """p ← p − lr·(g + wd·p) on the dense segments: the functional rule (_functional), the same fused kernel
        that SGD.step calls, with each group's weight decay."""
        for tensor, segment, group in zip(self.tensors, self.segments, self._torch.param_groups):
            self._functional([tensor], [g[segment]], {}, lr, weight_decay=group["weight_decay"])

    def _step_rows(self, name: str, grads: RowSparseGrads, lr: float | Tensor) -> None:
        """The rule on the rows of a row-sparse matrix that the step used, with their buffers: in place on
        views of runs of consecutive rows (grads.runs), or gathered, updated and scattered back; the same
        torch.optim functional rule as the dense update runs."""
        ids = grads.ids[name]
        if ids.numel() == 0:
            return
        rows, buffers, runs = self.params.rows(name), self.sparse_state[name], grads.runs[name]
        if (runs is None and self.rule == "sgd" and not self.weight_decay and not self.decoupled_weight_decay
                and not isinstance(lr, Tensor)):
            rows.index_add_(0, ids, grads.row_values[name], alpha=-lr)  # p ← p − lr·g on the rows: nothing gathered
            return
        if runs is not None:  # views of runs of consecutive rows: contiguous (the matrix is unpadded)
            p = [rows[a:b] for a, b in runs]
            state = {k: [v[a:b] for a, b in runs] for k, v in buffers.items()}
        else:
            space = self._space[name]
            p = [space["param"].gather(rows, ids)]
            state = {k: [space[k].gather(v, ids)] for k, v in buffers.items()}
        g = grads.row_views(name)
        wd = self.weight_decay
        if self.adamw and wd:
            g = [gi + wd * pi for gi, pi in zip(g, p)]  # AdamW + coupled L2
        if self.decoupled_weight_decay and self.rule != "adam":
            torch._foreach_mul_(p, 1.0 - lr * self.decoupled_weight_decay)
        self._functional(p, g, state, lr)
        if runs is None:
            rows.index_copy_(0, ids, p[0])
            for k, v in buffers.items():
                v.index_copy_(0, ids, state[k][0])

    def _functional(self, p: list[Tensor], g: list[Tensor], state: dict[str, list[Tensor]], lr: float | Tensor,
                    weight_decay: float | None = None) -> None:
        """torch.optim's functional form of the rule over lists of tensors (updated in place), at step self.t;
        weight_decay: the coupled decay (default: the optimizer's)."""
        group, wd = self._torch.defaults, self.weight_decay if weight_decay is None else weight_decay
        fused = self.fused
        if self.rule == "sgd":  # stateless: no step count
            _sgd.sgd(p, g, [None] * len(p), fused=fused, weight_decay=wd, momentum=0.0, lr=lr, dampening=0.0,
                     nesterov=False, maximize=False)
            return
        steps = list(torch.full((len(p),), float(self.t - 1), dtype=torch.float32,
                                device=p[0].device if fused else "cpu").unbind())  # one per tensor: each is advanced
        if self.rule == "adam":
            beta1, beta2 = group["betas"]
            _adam.adam(p, g, state["exp_avg"], state["exp_avg_sq"], [], steps, fused=fused,
                       decoupled_weight_decay=self.adamw, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                       weight_decay=self.decoupled_weight_decay if self.adamw else wd, eps=group["eps"], maximize=False)
        elif self.rule == "adagrad":
            _adagrad.adagrad(p, g, state["sum"], steps, fused=fused, lr=lr, weight_decay=wd, lr_decay=0.0,
                             eps=group["eps"], maximize=False)
        else:
            _rmsprop.rmsprop(p, g, state["square_avg"], [], [], steps, foreach=False, lr=lr, alpha=group["alpha"],
                             eps=group["eps"], weight_decay=wd, momentum=0.0, centered=False)

    # -- state ---------------------------------------------------------------------------------------

    def _buffers(self) -> dict[str, Flat]:
        """The rule's buffers as Flats of the parameters' layout (copies), keyed by our names."""
        out = {}
        for ours, theirs in BUFFERS[self.rule].items():
            pieces = [self._torch.state.get(t, {}).get(theirs) for t in self.tensors]
            if any(p is None for p in pieces) or (not pieces and not self.t):
                continue
            flat = self.params.like()
            for piece, segment in zip(pieces, self.segments):
                flat.data[segment] = piece
            for name, buffers in self.sparse_state.items():
                flat.rows(name).copy_(buffers[theirs])
            out[ours] = flat
        return out

    def state_tensors(self) -> list[Tensor]:
        """The tensors of torch.optim's state (buffers, step counts) as they are: what a captured step
        updates in place."""
        return [t for tensor in self.tensors for t in self._torch.state.get(tensor, {}).values()
                if isinstance(t, Tensor)] + [t for buffers in self.sparse_state.values() for t in buffers.values()]

    def state_dict(self, copy: bool = True) -> dict[str, Tensor | int | float]:
        """{"t": steps, "<buffer>.<parameter>": tensor, ...}: copies, or with copy=False views of the live
        buffers in the parameters' shapes and layouts (no memory: what a checkpoint writes and the
        rollback snapshot copies; they change with the next step)."""
        out: dict[str, Tensor | int | float] = {"t": self.t}
        if copy:
            for ours, flat in self._buffers().items():
                out.update({f"{ours}.{name}": view for name, view in flat.items()})  # the flat is a fresh copy
            return out
        for ours, theirs in BUFFERS[self.rule].items():
            pieces = [self._torch.state.get(t, {}).get(theirs) for t in self.tensors]
            if any(p is None for p in pieces) or (not pieces and not self.t):
                continue  # before the first step: no buffers yet
            for name, shape in self.params.shapes.items():
                out[f"{ours}.{name}"] = self._buffer_view(name, shape, pieces, theirs)
        return out

    def _buffer_view(self, name: str, shape: tuple[int, ...], pieces: list[Tensor], theirs: str) -> Tensor:
        """Parameter `name`'s part of a buffer of the rule, as a view in the parameter's shape and layout."""
        if name in self.sparse_state:
            rows = self.sparse_state[name][theirs]  # (rows, width), as Flat.rows
            return rows.t() if name in self.params.column_major else rows
        a, b = self.params.offsets[name]
        segment, piece = next((s, p) for s, p in zip(self.segments, pieces) if s.start <= a and b <= s.stop)
        return self.params.view_of(name, piece[a - segment.start:b - segment.start])

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
            for name, buffers in self.sparse_state.items():
                buffers[theirs].copy_(flat.rows(name))
        for tensor in self.tensors:
            state = self._torch.state[tensor]
            if self.rule == "sgd":
                continue
            step = state.get("step")
            if step is None:
                on_device = self.capturable or self.fused
                state["step"] = torch.tensor(float(t), dtype=torch.float32,
                                             device=tensor.device if on_device else "cpu")
            else:
                step.fill_(float(t))
        self.t = t


def _placeholder(data: Tensor) -> list[dict[str, Any]]:
    """A parameter group for a torch.optim rule with nothing dense to update (every parameter row-sparse):
    torch.optim refuses an empty list; this zero-size parameter is never stepped."""
    return [{"params": [torch.nn.Parameter(data[:0])], "weight_decay": 0.0}]


def make_optimizer(name: str, params: Flat, *, lr: float = 1e-3, weight_decay: float = 0.0,
                   decoupled_weight_decay: float = 0.0, capturable: bool = False, sparse_rows: tuple[str, ...] = (),
                   **hyper: float) -> Optimizer:
    """'sgd' | 'adam' | 'adagrad' | 'rmsprop' (case-insensitive) over a Flat of parameters.

    weight_decay: L2 on weight matrices (g + wd·p); decoupled_weight_decay=λ: p ← p (1 − lr·λ) for weight
    matrices before each update (AdamW with adam). hyper: beta1, beta2, eps (adam), eps (adagrad),
    alpha, eps (rmsprop). capturable: the step count on the device, for a step captured as a CUDA graph.
    sparse_rows: matrices updated row by row (training/sparse_rows.py)."""
    try:
        rule = checks.choice("--optimizer", str(name).lower(), OPTIMIZERS)
    except ValueError:
        raise ValueError(f"unknown --optimizer {name!r}; choose one of {list(OPTIMIZERS)}") from None
    return Optimizer(rule, params, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                     capturable=capturable, sparse_rows=sparse_rows, **hyper)


class SGD(Optimizer):
    """p ← p − lr · (g + wd·p): torch.optim.SGD (fused) over a Flat of parameters."""

    def __init__(self, params: Flat, lr: float = 1.0, weight_decay: float = 0.0):
        super().__init__("sgd", params, lr=lr, weight_decay=weight_decay)
