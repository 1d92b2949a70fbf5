"""The GRU cell (Cho et al. 2014) in PyTorch's formulation — the reset gate multiplies W_hn h + b_hn —
so that it is exactly torch.nn.GRU, and its backward through time written out.

Shapes: T = time, B = streams, m = hidden, n = the layer's input size. Gates in PyTorch's order
(r, z, n), each a block of m rows:
  U (3m,n) the input weights (read by the input term, engine/inputs.py)   W (3m,m) = [W_hr ; W_hz ; W_hn]
  b (3m,) the input side's biases (PyTorch's b_ir + b_hr, b_iz + b_hz, b_in)   b_hn (m,)
  A (T,B,3m) = U x^t for every step      state (h,), (B,m)

    r^t = σ(A_r^t + b_r + W_hr h^{t-1})
    z^t = σ(A_z^t + b_z + W_hz h^{t-1})
    q^t = W_hn h^{t-1} + b_hn                     the recurrent part of the candidate, before the reset
    n^t = tanh(A_n^t + b_n + r^t ⊙ q^t)
    h^t = (1 − z^t) ⊙ n^t + z^t ⊙ h^{t-1}

One (B,m)×(m,3m) product per step gives W h^{t-1} for the three gates. The forward overwrites A with
G = [r ; z ; n] (the cache) and keeps q^t and H.

The backward (dH^t = the error arriving at h^t from above; ∂L/∂h^t its total):
    ∂L/∂h^t   = dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1} + W_hᵀ γ^{t+1}       (h^t feeds h^{t+1} directly and through W)
    δ_n^t = ∂L/∂h^t ⊙ (1 − z^t) ⊙ tanh'           the candidate's pre-activation
    δ_z^t = ∂L/∂h^t ⊙ (h^{t-1} − n^t) ⊙ σ'(z)
    δ_r^t = δ_n^t ⊙ q^t ⊙ σ'(r)
    γ^t   = [δ_r^t ; δ_z^t ; δ_n^t ⊙ r^t]         the error of W h^{t-1} (+ b_hn): the reset gate scales q
    ∂L/∂A^t = [δ_r ; δ_z ; δ_n]    ∂L/∂b = Σ_t ∂L/∂A^t    ∂L/∂b_hn = Σ_t δ_n^t ⊙ r^t    ∂L/∂W = Σ_t γ^t h^{t-1}ᵀ
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bptt.checks import optional_int
from bptt.engine.cells import CellCache, CellState
from bptt.engine.cells.lstm import sigmoid_derivative, tanh_derivative

Tensor = torch.Tensor


def reset_candidate_(pre: Tensor, r: Tensor, q: Tensor) -> Tensor:
    """pre = A_n + b_n (B,m), r, q = W_hn h^{t-1} + b_hn -> n = tanh(pre + r ⊙ q), written over pre."""
    return pre.addcmul_(r, q).tanh_()


def gru_forward(W: Tensor, b: Tensor | None, b_hn: Tensor | None, A: Tensor, h0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A (T,B,3m) = U x^t, h0 (B,m) -> (H (T,B,m), Qn (T,B,m) = q^t, G (T,B,3m) = [r;z;n]); G is A, overwritten."""
    T, B, three_m = A.shape
    m = three_m // 3
    G = A
    if b is not None:
        G.add_(b)
    H, Qn = A.new_empty(T, B, m), A.new_empty(T, B, m)
    Wt = W.t()
    recurrent = A.new_empty(B, three_m)
    h = h0
    for t in range(T):
        torch.mm(h, Wt, out=recurrent)  # W h^{t-1} for r, z and n: one product
        g = G[t]
        torch.sigmoid_(g[:, : 2 * m].add_(recurrent[:, : 2 * m]))  # r, z
        q = recurrent[:, 2 * m :] if b_hn is None else torch.add(recurrent[:, 2 * m :], b_hn)
        Qn[t].copy_(q)
        n = reset_candidate_(g[:, 2 * m :], g[:, :m], Qn[t])  # n = tanh(A_n + b_n + r ⊙ q)
        h = torch.sub(h, n, out=H[t]).mul_(g[:, m : 2 * m]).add_(n)  # h = n + z ⊙ (h^{t-1} − n)
    return H, Qn, G


def gate_derivatives(G: Tensor, Qn: Tensor, H_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """G = [r;z;n] (T,B,3m), q (T,B,m), h^{t-1} (T,B,m) -> (P (T,B,3m), R (T,B,3m), z): the local derivatives.

    forward was h = (1 − z) n + z h^{t-1}, n = tanh(a_n + r ⊙ q); so, per unit of ∂L/∂h^t,
      P = ∂L/∂A = [q (1 − z) tanh'(n) σ'(r) ; (h^{t-1} − n) σ'(z) ; (1 − z) tanh'(n)]
      R = the error of W h^{t-1} (+ b_hn) = [P_r ; P_z ; P_n ⊙ r]
    """
    m = Qn.shape[-1]
    r, z, n = G[..., :m], G[..., m : 2 * m], G[..., 2 * m :]
    Pn = (1 - z) * tanh_derivative(n)
    Pr = Pn * Qn * sigmoid_derivative(r)
    Pz = (H_prev - n) * sigmoid_derivative(z)
    return torch.cat((Pr, Pz, Pn), -1), torch.cat((Pr, Pz, Pn * r), -1), z


def gru_deltas(W: Tensor, P: Tensor, R: Tensor, z: Tensor, dH: Tensor,
               truncation: int | None = None) -> tuple[Tensor, Tensor]:
    """dH (T,B,m) -> (δ = ∂L/∂A (T,B,3m), γ = ∂L/∂(W h^{t-1}) (T,B,3m)) under the truncation: paths
    through at most k recurrent connections (h^{t-1} -> h^t is one); None, or k >= T-1, is full BPTT."""
    truncation = optional_int("truncation", truncation)
    T, B, m = dH.shape
    delta, gamma = torch.empty_like(P), torch.empty_like(R)
    if truncation is None or truncation >= T - 1:
        P3, R3, d3, g3 = P.view(T, B, 3, m), R.view(T, B, 3, m), delta.view(T, B, 3, m), gamma.view(T, B, 3, m)
        dh = dH[T - 1]
        for t in range(T - 1, -1, -1):
            if t < T - 1:  # ∂L/∂h^t = dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1} + W_hᵀ γ^{t+1}
                dh = torch.addcmul(dH[t], dh, z[t + 1]).addmm_(gamma[t + 1], W)
            torch.mul(dh.unsqueeze(1), P3[t], out=d3[t])
            torch.mul(dh.unsqueeze(1), R3[t], out=g3[t])
        return delta, gamma
    delta.zero_()
    gamma.zero_()
    Dh = dH  # after j hops: the error of L^{τ+j} arrived at h^τ
    for j in range(truncation + 1):
        n = T - j
        step_g = Dh.unsqueeze(2) * R[:n].view(n, B, 3, m)
        delta[:n].add_((Dh.unsqueeze(2) * P[:n].view(n, B, 3, m)).view(n, B, 3 * m))
        gamma[:n].add_(step_g.view(n, B, 3 * m))
        if n > 1:
            Dh = torch.matmul(step_g[1:].reshape(n - 1, B, 3 * m), W).addcmul_(Dh[1:], z[1:n])
    return delta, gamma


class GRUCell:
    """torch.nn.GRU's cell; parameters U (3m,n), W (3m,m), b (3m,), b_hn (m,); state (h,)."""

    name: ClassVar[str] = "gru"
    gates: ClassVar[int] = 3
    options: ClassVar[tuple[str, ...]] = ()
    embedding: ClassVar[bool] = True  # reads words through an embedding of size e (default m), like PyTorch's
    # per position and unit: G (3), q, H cached; in the backward h^{t-1}, P (3), R (3), δ (3), γ (3), the
    # next layer's error (1)
    cache_floats: ClassVar[int] = 19

    @staticmethod
    def param_shapes(input_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"U": (3 * hidden_size, input_size), "W": (3 * hidden_size, hidden_size)}
        if bias:
            shapes["b"] = (3 * hidden_size,)
            shapes["b_hn"] = (hidden_size,)
        return shapes

    @staticmethod
    def initial_state(params: dict[str, Tensor], batch_size: int) -> CellState:
        W = params["W"]
        return (W.new_zeros(batch_size, W.shape[1]),)

    @staticmethod
    def forward(params: dict[str, Tensor], A: Tensor, state0: CellState) -> tuple[Tensor, CellState, CellCache]:
        """A (T,B,3m), (h^0,) -> (H (T,B,m), (h^T,), cache {"H", "Q", "G"}); G is A, overwritten."""
        H, Qn, G = gru_forward(params["W"], params.get("b"), params.get("b_hn"), A, state0[0])
        return H, (H[-1],), CellCache(state0, {"H": H, "Q": Qn, "G": G})

    @staticmethod
    def backward(params: dict[str, Tensor], cache: CellCache, dH: Tensor, grads: dict[str, Tensor],
                 truncation: int | None = None) -> Tensor:
        """dH (T,B,m) -> dA (T,B,3m) = δ; accumulates dW, db, db_hn."""
        H, Qn, G = cache.steps["H"], cache.steps["Q"], cache.steps["G"]
        T, B, m = H.shape
        H_prev = torch.cat((cache.state0[0].unsqueeze(0), H[:-1]))
        P, R, z = gate_derivatives(G, Qn, H_prev)
        delta, gamma = gru_deltas(params["W"], P, R, z, dH, truncation)
        flat_gamma = gamma.view(T * B, 3 * m)
        grads["W"].addmm_(flat_gamma.t(), H_prev.view(T * B, m))  # ∂L/∂W = Σ_t γ^t h^{t-1}ᵀ
        if "b" in grads:
            grads["b"].add_(delta.view(T * B, 3 * m).sum(dim=0))  # ∂L/∂b = Σ_t δ^t
            grads["b_hn"].add_(flat_gamma[:, 2 * m :].sum(dim=0))  # ∂L/∂b_hn = Σ_t δ_n^t ⊙ r^t
        return delta

    @staticmethod
    def state_at(cache: CellCache, t: int) -> CellState:
        return (cache.steps["H"][t],)
