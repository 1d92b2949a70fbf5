"""The seed's Elman cell: a^t = W s^{t-1} + U x^t + b, s^t = F(a^t), and its exact backward.

Shapes: T = time, B = streams, m = hidden, n = input size (V for the first layer).
  U (m,n)  W (m,m)  b (m,)  A (T,B,m) = U x^t for every step  s^0 (B,m)  S (T,B,m) holds s^1..s^T.
The input term A is computed outside the cell (engine/inputs.py): for the first layer x^t is one-hot
and U x^t is column x^t of U, a gather, never a product with a one-hot matrix. The cell adds b and the
recurrence, in place over A, and keeps S (its output H) as its cache: F' is rebuilt from S in the
backward (tanh' = 1 − s², see activations.py), so nothing else is stored.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bptt.checks import optional_int
from bptt.engine.activations import HiddenActivation
from bptt.engine.activations import hidden_activation as lookup_hidden_activation
from bptt.engine.cells import CellCache, CellState, full_bptt, hidden_errors

Tensor = torch.Tensor


def elman_forward(W: Tensor, b: Tensor | None, F: HiddenActivation, A: Tensor, h0: Tensor) -> Tensor:
    """A (T,B,m) = U x^t, h0 (B,m) -> S (T,B,m), S[t] = s^{t+1} (0-based time index), written over A.

    a^t = W s^{t-1} + U x^t + b    (the paper's s^t = W s^{t-1} + U x^t, with F and b added)
    s^t = F(a^t)
    The loop does one (B,m)×(m,m) product per step, written in place into A: no allocation per step.
    """
    S = A
    if b is not None:
        S.add_(b)
    Wt = W.t()
    s = h0
    for a in S.unbind(0):  # the steps' views made once (indexing inside the loop costs host time per step)
        a.addmm_(s, Wt)  # a^t = U x^t + b + s^{t-1} Wᵀ
        s = F.forward_(a)  # s^t = F(a^t), in place
    return S


def elman_backward(
    W: Tensor,
    F: HiddenActivation,
    h0: Tensor,
    S: Tensor,
    dS: Tensor,
    grads: dict[str, Tensor],
    truncation: int | None = None,
) -> Tensor:
    """dS (T,B,m) = direct errors ∂L^t/∂s^t -> δ (T,B,m) = ∂L/∂a^t = ∂L/∂A; accumulates dW (m,m), db (m,).

    forward was a^t = W s^{t-1} + U x^t + b, s^t = F(a^t). With δ^t = ∂L/∂a^t (T,B,m):
      ∂L/∂s^t  = dS^t + Wᵀ δ^{t+1}            (s^t feeds o^t directly and a^{t+1} through W)
      δ^t      = ∂L/∂s^t ⊙ F'(a^t)            (the F' the printed paper omits)
      ∂L/∂W    = Σ_t δ^t s^{t-1}ᵀ             -> one (m,T·B)×(T·B,m) product after the sweep
      ∂L/∂b    = Σ_t δ^t
      ∂L/∂A^t  = δ^t                          (A^t = U x^t enters a^t with coefficient 1; the input
                                               term turns it into ∂L/∂U_:w = Σ_{t: x^t = w} δ^t)
    truncation=k keeps, for the error of each L^t, only the paths through at most k recurrent
    connections (∂s^t/∂s^{t-j} with j > k dropped); None, or k >= T-1, is full BPTT in one sweep.
    """
    delta = backward_deltas(W, F, S, dS, truncation)
    T, B, m = S.shape
    flat_delta = delta.view(T * B, m)
    # S_prev[t] = s^{t-1}: h0 then the states of all but the last step
    S_prev = torch.cat((h0.unsqueeze(0), S[:-1]), dim=0).view(T * B, m)
    grads["W"].addmm_(flat_delta.t(), S_prev)  # ∂L/∂W = Σ_t δ^t s^{t-1}ᵀ
    if "b" in grads:
        grads["b"].add_(flat_delta.sum(dim=0))  # ∂L/∂b = Σ_t δ^t
    return delta


def recurrent_backward_add(direct: Tensor, delta_next: Tensor, W: Tensor, out: Tensor) -> Tensor:
    """dS^t (B,m), δ^{t+1} (B,m) -> ∂L/∂s^t = dS^t + Wᵀ δ^{t+1}, written into out (B,m): one product.

    forward was a^{t+1} = W s^t + ... and o^t from s^t; so s^t receives its direct error and Wᵀ δ^{t+1}.
    """
    return torch.addmm(direct, delta_next, W, out=out)


def recurrent_backward(delta_next: Tensor, W: Tensor) -> Tensor:
    """δ^{t+1} (...,m) -> its contribution to ∂L/∂s^t (...,m).

    forward was a^{t+1} = W s^t + ...; so ∂L/∂s^t gets Wᵀ δ^{t+1}, i.e. δ^{t+1} W for row vectors.
    """
    return delta_next @ W


def backward_deltas(
    W: Tensor, F: HiddenActivation, S: Tensor, dS: Tensor, truncation: int | None = None
) -> Tensor:
    """S, dS (T,B,m) -> δ (T,B,m), δ^t = ∂L/∂a^t under the given truncation."""
    truncation = optional_int("truncation", truncation)
    T = S.shape[0]
    F_prime = F.derivative(S)  # F'(a^t) from s^t, (T,B,m)
    if full_bptt(truncation, T):
        # Full BPTT: one reverse sweep, two operations per step (one (B,m)×(m,m) product that also adds
        # the direct error, one product with F'), written in place: no allocation inside the loop.
        delta = torch.empty_like(S)
        dSs, Fs, deltas = dS.unbind(0), F_prime.unbind(0), delta.unbind(0)  # the steps' views, made once
        torch.mul(dSs[T - 1], Fs[T - 1], out=deltas[T - 1])  # the last step has no δ^{t+1}
        for t in range(T - 2, -1, -1):
            recurrent_backward_add(dSs[t], deltas[t + 1], W, out=deltas[t])  # ∂L/∂s^t = dS^t + Wᵀ δ^{t+1}
            deltas[t].mul_(Fs[t])  # δ^t = ∂L/∂s^t ⊙ F'(a^t)
        return delta
    # Truncated BPTT, vectorised over time. D_j[τ] = the error of L^{τ+j} after j recurrent hops,
    # arrived at a^τ:  D_0 = dS ⊙ F',  D_j[τ] = (Wᵀ D_{j-1}[τ+1]) ⊙ F'[τ].  δ^τ = Σ_{j<=k} D_j[τ].
    # Each hop is one (T·B,m)×(m,m) product over all positions: O(T·k) work, k products.
    D = dS * F_prime
    delta = D.clone()
    for j in range(1, truncation + 1):
        D = recurrent_backward(D[1:], W).mul_(F_prime[: T - j])
        delta[: T - j].add_(D)
    return delta


class ElmanCell:
    """Elman recurrence with hidden nonlinearity F; parameters U (m,n), W (m,m), b (m,)."""

    name: ClassVar[str] = "elman"
    gates: ClassVar[int] = 1
    options: ClassVar[tuple[str, ...]] = ("hidden_activation",)
    cache_floats: ClassVar[int] = 4  # S (the cache), the errors dS, δ, F'(a)

    def __init__(self, hidden_activation: str = "tanh"):
        self.F = lookup_hidden_activation(hidden_activation)

    @staticmethod
    def param_shapes(input_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"U": (hidden_size, input_size), "W": (hidden_size, hidden_size)}
        if bias:
            shapes["b"] = (hidden_size,)
        return shapes

    @staticmethod
    def initial_state(params: dict[str, Tensor], batch_size: int) -> CellState:
        """s^0 = 0, (B,m)."""
        W = params["W"]
        return (W.new_zeros(batch_size, W.shape[0]),)

    def forward(self, params: dict[str, Tensor], A: Tensor, state0: CellState) -> tuple[Tensor, CellState, CellCache]:
        """A (T,B,m), (s^0,) -> (S (T,B,m), (s^T,), cache {"H": S}); S is A, overwritten."""
        S = elman_forward(params["W"], params.get("b"), self.F, A, state0[0])
        return S, (S[-1],), CellCache(state0, {"H": S})

    def backward(self, params: dict[str, Tensor], cache: CellCache, dH: Tensor, grads: dict[str, Tensor],
                 truncation: int | None = None) -> Tensor:
        """dH (T,B,m) -> dA (T,B,m) = δ; accumulates dW, db."""
        return elman_backward(params["W"], self.F, cache.state0[0], cache.steps["H"], dH, grads, truncation)

    @staticmethod
    def hidden_errors(params: dict[str, Tensor], cache: CellCache, dA: Tensor, dH: Tensor) -> Tensor:
        """∂L/∂h^t (T,B,m) at every step of a full backward (bptt diagnose): h^t reaches step t+1 only
        through W h^t, so ∂L/∂h^t = dH^t + Wᵀ dA^{t+1} (cells.hidden_errors)."""
        return hidden_errors(params["W"], dA, dH)

    @staticmethod
    def state_at(cache: CellCache, t: int) -> CellState:
        return (cache.steps["H"][t],)
