"""Recurrent cells: the interface every cell implements, and the registry `CELLS` (name -> class).

A cell maps an input term A and the previous state to the next state, step by step, and back.
Shapes: T = time, B = streams, m = hidden, G = the cell's gates (1 for Elman, 4 for an LSTM), n = the
size of the layer's input (V for the first layer, the hidden size of the layer below otherwise).

    A (T,B,G·m)  the input term U x^t for every step, computed *outside* the cell (engine/inputs.py):
                 a row gather of U for the first layer (x^t one-hot: U x^t is a column of U), a product
                 X Uᵀ for a layer that reads the one below. A is the cell's to overwrite: the forward
                 may turn it into its own output in place (Elman does), so callers hand over a fresh A.
    state        a tuple of (B,m) tensors: (h,) for Elman, (h, c) for an LSTM.
    H (T,B,m)    the output h^1..h^T, which the next layer or the output layer reads.

A cell class has
    name, gates, options       its registry name; G; the ModelConfig fields its constructor takes
    param_shapes(input_size, hidden_size, bias) -> {name: shape}, the input weights named "U"
                               (G·m, input_size), read by the input term, not by the cell
    initial_state(params, B) -> the zero state, a tuple of (B,m) tensors
    forward(params, A, state0) -> (H, final state, cache)
    backward(params, cache, dH, grads, truncation) -> dA (T,B,G·m)
                               dH = ∂L/∂h^t from above (the output layer, the next layer); the cell
                               accumulates (+=) the gradients of its own parameters (all but "U")
                               into grads and returns ∂L/∂A, from which the input term makes ∂L/∂U
                               and the error of the layer below. truncation=k keeps, for each error,
                               only the paths through at most k recurrent connections (None: full)
    state_at(cache, t) -> the state after step t (0-based) of the cache: what a window cut before
                               step t+1 starts from (truncated BPTT keeps such windows, tbptt.py)
    cache_floats               floats per position and hidden unit that a block holds from the forward
                               to the end of the backward (cache, errors, temporaries): the memory
                               guard's estimate (training/resources.py); 4 for Elman
    initialize(params, init_range, generator), optional: starting values of the cell's own choosing,
                               applied after the model's default draw (matrices uniform in
                               [-init_range, init_range], vectors zero), e.g. a forget-gate bias of 1

Conventions the rest of the engine relies on: state[0] is the output h (State.hidden reads it, the
next layer reads H); initial_state returns distinct tensors (a carried state is copied into them in
place, tbptt.py); the names of cached steps contain no "." (checkpoint keys "hist.{layer}.{name}").

The cache is a CellCache: the state the forward started from and the time-major tensors the backward
reads (step t at index t), always including the output "H". Because every cached tensor is
time-major, caches of consecutive blocks join along time and cut at any step (join_caches,
tail_cache), whatever the cell.

New cells are one file plus one entry here (or register_cell), with their gradient tests; the
network, the engine and the trainer stay as they are (docs/architecture.md, "how to add a cell").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

Tensor = torch.Tensor
CellState = tuple[Tensor, ...]
INPUT_WEIGHT = "U"  # every cell's input weights: (G·m, input_size), applied by the input term


@dataclass
class CellCache:
    """What a cell's backward needs from its forward: the state before the first step and time-major
    tensors (index t = step t), "H" (T,B,m) among them."""

    state0: CellState
    steps: dict[str, Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.steps["H"].shape[0]


class Cell(Protocol):
    name: ClassVar[str]
    gates: ClassVar[int]
    options: ClassVar[tuple[str, ...]]
    cache_floats: ClassVar[int]

    def param_shapes(self, input_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]: ...

    def initial_state(self, params: dict[str, Tensor], batch_size: int) -> CellState: ...

    def forward(self, params: dict[str, Tensor], A: Tensor, state0: CellState) -> tuple[Tensor, CellState, CellCache]:
        ...

    def backward(self, params: dict[str, Tensor], cache: CellCache, dH: Tensor, grads: dict[str, Tensor],
                 truncation: int | None = None) -> Tensor: ...

    def state_at(self, cache: CellCache, t: int) -> CellState: ...

    # optional, for `bptt diagnose`: ∂L/∂h^t at every step (T,B,m) of a full backward, from its dA and the
    # errors dH that arrived from above (hidden_errors below: the cells whose h enters the next step only
    # through W h)
    # def hidden_errors(self, params, cache, dA, dH) -> Tensor: ...



def full_bptt(truncation: int | None, T: int) -> bool:
    """Whether a truncation (a checked int or None, the cells' `truncation` argument) keeps every path of a
    T-step window: None, or k >= T − 1 (no path crosses more than T − 1 recurrent connections)."""
    return truncation is None or truncation >= T - 1


def hidden_errors(W: Tensor, dA: Tensor, dH: Tensor) -> Tensor:
    """W (G·m,m), dA (T,B,G·m) = ∂L/∂A^t of a full backward, dH (T,B,m) the errors arriving from above ->
    ∂L/∂h^t (T,B,m) at every step, for a cell whose h^t reaches step t+1 only through the gate
    pre-activations G^{t+1} = A^{t+1} + W h^t + b (Elman: G = 1; the LSTM, whose c carries its own
    error):
        ∂L/∂h^t = dH^t + Wᵀ ∂L/∂G^{t+1} = dH^t + Wᵀ dA^{t+1}     (∂G/∂A = I: dA is ∂L/∂G)
    and ∂L/∂h^T = dH^T at the last step (nothing after the window)."""
    T, B, Gm = dA.shape
    out = dH.clone(memory_format=torch.contiguous_format)
    if T > 1:
        out[:-1].view(-1, W.shape[1]).addmm_(dA[1:].reshape(-1, Gm), W)
    return out


def join_caches(first: CellCache, second: CellCache) -> CellCache:
    """The cache of two consecutive runs of a cell as one: second started where first ended."""
    return CellCache(first.state0, {k: torch.cat((first.steps[k], second.steps[k])) for k in first.steps})


def tail_cache(cell: Cell, cache: CellCache, keep: int) -> CellCache:
    """The last `keep` steps of a cache, starting from the state after the step before them."""
    cut = cache.length - keep
    if cut <= 0:
        return cache
    return CellCache(cell.state_at(cache, cut - 1), {k: v[cut:] for k, v in cache.steps.items()})


from bptt.engine.cells.elman import ElmanCell  # noqa: E402  (the registry's entries, after the interface)
from bptt.engine.cells.gru import GRUCell  # noqa: E402
from bptt.engine.cells.lstm import LSTMCell  # noqa: E402

CELLS: dict[str, type] = {"elman": ElmanCell, "lstm": LSTMCell, "gru": GRUCell}


def register_cell(cls: type) -> type:
    """Add a cell class to CELLS under cls.name (a decorator); refuses a name already taken by another class."""
    if not isinstance(cls, type):
        raise ValueError(f"register_cell takes a cell class (the Cell protocol), not {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a cell class needs a non-empty string attribute 'name', {cls!r} has {name!r}")
    missing = [m for m in ("gates", "options", "cache_floats", "param_shapes", "initial_state", "forward",
                           "backward", "state_at") if not hasattr(cls, m)]
    if missing:
        raise ValueError(f"the cell class {name!r} lacks {', '.join(missing)} of the Cell protocol (cells/__init__.py)")
    if CELLS.get(name, cls) is not cls:
        raise ValueError(f"a cell named {name!r} is registered already ({CELLS[name]!r})")
    CELLS[name] = cls
    return cls


__all__ = ["CELLS", "INPUT_WEIGHT", "Cell", "CellCache", "CellState", "ElmanCell", "GRUCell", "LSTMCell", "join_caches",
           "register_cell", "tail_cache"]
