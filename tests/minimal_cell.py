"""A minimal gated cell, written outside the package: the worked example of docs/architecture.md, "How to
add a cell". Nothing under src/ knows it; tests/test_minimal_cell.py registers it (register_cell), trains
it from the command line and checks its gradients.

Two gates (G = 2), a diagonal recurrence through a memory c, and the state (h, c):

    x̃^t = tanh(A_x^t + b_x)                        the candidate
    f^t = σ(A_f^t + v ⊙ c^{t-1} + b_f)             the forget gate, with a diagonal peephole v on c^{t-1}
    c^t = f^t ⊙ c^{t-1} + (1 − f^t) ⊙ x̃^t          the memory: the recurrence, element by element
    h^t = tanh(c^t)                                the output, which the layer above or the output layer reads

Shapes: T = time, B = streams, m = hidden, n = the layer's input size (V for the first layer).
  U (2m,n) = [U_f ; U_x]  v (m,)  b (2m,) = [b_f ; b_x]  A (T,B,2m) = [A_f ; A_x] = U x^t for every step
  state (h, c), each (B,m)  H, C (T,B,m) hold h^1..h^T, c^1..c^T  G (T,B,2m) holds [f^t ; x̃^t]
U is read by the input term (engine/inputs.py), never here. The forward turns A into G in place.
The memory's recurrence is element-wise, so the backward is too: no product with a matrix per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch

from bptt.checks import optional_int
from bptt.engine.cells import CELLS, CellCache, CellState, register_cell

Tensor = torch.Tensor


def gated_forward(v: Tensor, b: Tensor | None, A: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A (T,B,2m) = U x^t, c0 (B,m) -> (H (T,B,m), C (T,B,m), G (T,B,2m) = [f^t ; x̃^t]); G is A, overwritten.

    x̃^t = tanh(A_x^t + b_x)                  all steps at once, before the loop
    f^t = σ(A_f^t + b_f + v ⊙ c^{t-1})       one step at a time: it reads c^{t-1}
    c^t = f^t ⊙ c^{t-1} + (1 − f^t) ⊙ x̃^t    written as x̃^t + f^t ⊙ (c^{t-1} − x̃^t)
    h^t = tanh(c^t)                          all steps at once, after the loop
    """
    T, B, two_m = A.shape
    m = two_m // 2
    G = A
    if b is not None:
        G.add_(b)  # A_f + b_f, A_x + b_x
    Fg, X = G[..., :m], G[..., m:]  # views: f^t and x̃^t are written over them
    torch.tanh_(X)  # x̃^t = tanh(A_x^t + b_x)
    C = A.new_empty(T, B, m)
    c = c0
    for t in range(T):
        f = torch.sigmoid_(Fg[t].addcmul_(v, c))  # f^t = σ(A_f^t + b_f + v ⊙ c^{t-1}), in place
        c = torch.sub(c, X[t], out=C[t]).mul_(f).add_(X[t])  # c^t = x̃^t + f^t ⊙ (c^{t-1} − x̃^t)
    H = torch.tanh(C)  # h^t = tanh(c^t)
    return H, C, G


def recurrent_jacobian(Fg: Tensor, gate: Tensor, v: Tensor) -> Tensor:
    """f (T,B,m), gate = ∂c^t/∂a_f^t (T,B,m), v (m,) -> J (T,B,m), J^t = ∂c^t/∂c^{t-1} (diagonal).

    forward was c^t = f^t ⊙ c^{t-1} + (1 − f^t) ⊙ x̃^t with f^t = σ(A_f^t + v ⊙ c^{t-1} + b_f); so c^{t-1}
    reaches c^t along two paths, both one recurrent connection:
      the leak:      f^t
      the peephole:  (c^{t-1} − x̃^t) ⊙ f^t (1 − f^t) ⊙ v = gate ⊙ v
    """
    return torch.addcmul(Fg, gate, v)


def memory_errors(direct: Tensor, J: Tensor, truncation: int | None = None) -> Tensor:
    """direct (T,B,m) = ∂L^t/∂c^t through h^t only, J (T,B,m) -> E (T,B,m), E^t = ∂L/∂c^t under the truncation.

    forward was c^{t+1} = function of c^t (J^{t+1} = ∂c^{t+1}/∂c^t) and h^t = tanh(c^t); so
      ∂L/∂c^t = direct^t + J^{t+1} ⊙ ∂L/∂c^{t+1}           (∂L/∂c^{T+1} = 0)
    truncation=k keeps, for the error of each L^t, only the paths through at most k recurrent
    connections (c^{t-j} with j > k gets nothing from L^t); None, or k >= T-1, is full BPTT in one sweep.
    """
    truncation = optional_int("truncation", truncation)
    T = direct.shape[0]
    if truncation is None or truncation >= T - 1:
        E = torch.empty_like(direct)
        E[T - 1] = direct[T - 1]  # the last step has no c^{t+1}
        for t in range(T - 2, -1, -1):
            torch.addcmul(direct[t], J[t + 1], E[t + 1], out=E[t])  # direct^t + J^{t+1} ⊙ ∂L/∂c^{t+1}
        return E
    # Truncated: D_j[τ] = the error of L^{τ+j} after j recurrent hops, arrived at c^τ:
    # D_0 = direct, D_j[τ] = J^{τ+1} ⊙ D_{j-1}[τ+1];  ∂L/∂c^τ = Σ_{j<=k} D_j[τ].  O(T·k) element-wise work.
    D = direct
    E = direct.clone()
    for j in range(1, truncation + 1):
        D = J[1 : T - j + 1] * D[1:]
        E[: T - j].add_(D)
    return E


def gated_backward(
    v: Tensor, c0: Tensor, H: Tensor, C: Tensor, G: Tensor, dH: Tensor, grads: dict[str, Tensor],
    truncation: int | None = None,
) -> Tensor:
    """dH (T,B,m) = ∂L^t/∂h^t from above -> dA (T,B,2m) = ∂L/∂A = [δ_f ; δ_x]; accumulates dv (m,), db (2m,).

    forward was x̃^t = tanh(a_x^t), f^t = σ(a_f^t), a_x^t = A_x^t + b_x, a_f^t = A_f^t + v ⊙ c^{t-1} + b_f,
    c^t = f^t ⊙ c^{t-1} + (1 − f^t) ⊙ x̃^t, h^t = tanh(c^t). With E^t = ∂L/∂c^t (memory_errors):
      direct^t = dH^t ⊙ (1 − (h^t)²)                        (h^t = tanh(c^t))
      δ_f^t = ∂L/∂a_f^t = E^t ⊙ (c^{t-1} − x̃^t) ⊙ f^t (1 − f^t)
      δ_x^t = ∂L/∂a_x^t = E^t ⊙ (1 − f^t) ⊙ (1 − (x̃^t)²)
      ∂L/∂v = Σ_t δ_f^t ⊙ c^{t-1}     ∂L/∂b = Σ_t [δ_f^t ; δ_x^t]
      ∂L/∂A^t = [δ_f^t ; δ_x^t]       (A^t enters a^t with coefficient 1: the input term makes ∂L/∂U)
    """
    T, B, m = H.shape
    Fg, X = G[..., :m], G[..., m:]
    C_prev = torch.cat((c0.unsqueeze(0), C[:-1]))  # c^{t-1}: c^0, then all but the last step's
    gate = Fg * (1 - Fg) * (C_prev - X)  # ∂c^t/∂a_f^t = f^t (1 − f^t) (c^{t-1} − x̃^t)
    direct = dH * (1 - H * H)  # ∂L^t/∂c^t through h^t = tanh(c^t)
    E = memory_errors(direct, recurrent_jacobian(Fg, gate, v), truncation)
    dA = torch.empty_like(G)
    torch.mul(E, gate, out=dA[..., :m])  # δ_f^t
    torch.mul(E, (1 - Fg) * (1 - X * X), out=dA[..., m:])  # δ_x^t
    grads["v"].add_((dA[..., :m] * C_prev).sum(dim=(0, 1)))  # ∂L/∂v = Σ_t δ_f^t ⊙ c^{t-1}
    if "b" in grads:
        grads["b"].add_(dA.sum(dim=(0, 1)))  # ∂L/∂b = Σ_t [δ_f^t ; δ_x^t]
    return dA


class MinimalGatedCell:
    """The cell of this module's docstring; parameters U (2m,n), v (m,), b (2m,); state (h, c)."""

    name: ClassVar[str] = "minimal_gated"
    gates: ClassVar[int] = 2
    options: ClassVar[tuple[str, ...]] = ()  # no ModelConfig field configures it
    cache_floats: ClassVar[int] = 8  # per position and unit: H, C, G (2) cached; E, J, dA (2) in the backward

    @staticmethod
    def param_shapes(input_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"U": (2 * hidden_size, input_size), "v": (hidden_size,)}
        if bias:
            shapes["b"] = (2 * hidden_size,)
        return shapes

    @staticmethod
    def initial_state(params: dict[str, Tensor], batch_size: int) -> CellState:
        """h^0 = c^0 = 0, two distinct (B,m) tensors (a carried state is copied into them in place)."""
        v = params["v"]
        return (v.new_zeros(batch_size, v.shape[0]), v.new_zeros(batch_size, v.shape[0]))

    @staticmethod
    def forward(params: dict[str, Tensor], A: Tensor, state0: CellState) -> tuple[Tensor, CellState, CellCache]:
        """A (T,B,2m), (h^0, c^0) -> (H (T,B,m), (h^T, c^T), cache {"H", "C", "G"}); G is A, overwritten."""
        H, C, G = gated_forward(params["v"], params.get("b"), A, state0[1])
        return H, (H[-1], C[-1]), CellCache(state0, {"H": H, "C": C, "G": G})

    @staticmethod
    def backward(params: dict[str, Tensor], cache: CellCache, dH: Tensor, grads: dict[str, Tensor],
                 truncation: int | None = None) -> Tensor:
        """dH (T,B,m) -> dA (T,B,2m); accumulates dv, db (not dU: the input term does that)."""
        s = cache.steps
        return gated_backward(params["v"], cache.state0[1], s["H"], s["C"], s["G"], dH, grads, truncation)

    @staticmethod
    def state_at(cache: CellCache, t: int) -> CellState:
        """(h^{t+1}, c^{t+1}): the state after step t (0-based)."""
        return (cache.steps["H"][t], cache.steps["C"][t])


@contextlib.contextmanager
def registered(cls: type = MinimalGatedCell) -> Iterator[str]:
    """CELLS with `cls` registered (register_cell) inside the block, and as it was before it afterwards."""
    had = cls.name in CELLS
    register_cell(cls)
    try:
        yield cls.name
    finally:
        if not had:
            del CELLS[cls.name]
