"""The LSTM cell (Hochreiter & Schmidhuber 1997, with a forget gate: Gers et al. 2000), exactly
torch.nn.LSTM's, and its backward through time written out.

Shapes: T = time, B = streams, m = hidden, n = the layer's input size (the embedding size e for the
first layer). Gates in PyTorch's order (i, f, g, o), each a block of m rows:
  U (4m,n) the input weights (read by the input term, engine/inputs.py)   W (4m,m)   b (4m,)
  A (T,B,4m) = U x^t for every step      state (h, c), each (B,m)

    a^t = U x^t + W h^{t-1} + b                  one fused (B,m)×(m,4m) product per step
    i^t = σ(a_i^t)   f^t = σ(a_f^t)   g^t = tanh(a_g^t)   o^t = σ(a_o^t)
    c^t = f^t ⊙ c^{t-1} + i^t ⊙ g^t              the memory: its recurrence is element-wise
    h^t = o^t ⊙ tanh(c^t)                        the output, read by the layer above / the output layer

PyTorch keeps two biases, b_ih and b_hh; they only ever appear summed, so bptt keeps one, b = b_ih + b_hh
(export: bias_ih = b, bias_hh = 0). The forward overwrites A with the gate activations
G = [i ; f ; g ; o] (the cache), and keeps C, H and K = tanh(C), which the backward reads.

The backward, in the seed's style (δ^t = ∂L/∂a^t, E^t = ∂L/∂c^t, dH^t = the error arriving at h^t from
above), from t = T down to 1:
    ∂L/∂h^t = dH^t + Wᵀ δ^{t+1}                                  (h^t feeds a^{t+1} through W)
    E^t     = f^{t+1} ⊙ E^{t+1} + ∂L/∂h^t ⊙ o^t ⊙ (1 − tanh²(c^t))  (c^t feeds c^{t+1} and h^t)
    δ_i^t = E^t ⊙ g^t ⊙ σ'(a_i)       δ_f^t = E^t ⊙ c^{t-1} ⊙ σ'(a_f)
    δ_g^t = E^t ⊙ i^t ⊙ tanh'(a_g)    δ_o^t = ∂L/∂h^t ⊙ tanh(c^t) ⊙ σ'(a_o)
with σ'(a) = σ(1 − σ) and tanh'(a) = 1 − tanh², both from the cached activations. Then
    ∂L/∂W = Σ_t δ^t h^{t-1}ᵀ (one product after the sweep)   ∂L/∂b = Σ_t δ^t   ∂L/∂A^t = δ^t.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bptt.checks import number, optional_int
from bptt.engine import native
from bptt.engine.cells import CellCache, CellState, full_bptt, hidden_errors

Tensor = torch.Tensor


def sigmoid_derivative(y: Tensor) -> Tensor:
    """σ'(a) from y = σ(a): y (1 − y)."""
    return y * (1 - y)


def tanh_derivative(y: Tensor) -> Tensor:
    """tanh'(a) from y = tanh(a): 1 − y²."""
    return 1 - y * y


def lstm_forward(W: Tensor, b: Tensor | None, A: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A (T,B,4m) = U x^t, (h0, c0) (B,m) -> (H, C, K = tanh(C) (T,B,m), G (T,B,4m) = [i;f;g;o]); G is A,
    overwritten.

    a^t = A^t + b + W h^{t-1};  i, f, o = σ(·), g = tanh(·);  c^t = f ⊙ c^{t-1} + i ⊙ g;  h^t = o ⊙ tanh(c^t).
    Eight operations per step, on views made before the loop (one unbind per gate block: indexing
    inside the loop would cost as much as the step's element-wise work). The same sweep runs compiled
    where it can (native.sweeps: lstm_cpu.cpp on the CPU, lstm_triton.py on CUDA: the product, then the
    step's element-wise work in one loop or kernel); their lstm_forward_sweep(W, G, h0, c0, H, C, K) fills
    what this function returns.
    """
    T, B, four_m = A.shape
    m = four_m // 4
    G = A
    if b is not None:
        G.add_(b)
    H, C, K = A.new_empty(T, B, m), A.new_empty(T, B, m), A.new_empty(T, B, m)
    sweeps = native.sweeps("lstm", G, strided=(W,))  # cells/lstm_cpu.cpp, cells/lstm_triton.py, or None
    if sweeps is not None:
        sweeps.lstm_forward_sweep(W, G, h0, c0, H, C, K)
        return H, C, K, G
    Wt = W.t()
    steps = zip(G.unbind(0), G[..., : 2 * m].unbind(0), G[..., :m].unbind(0), G[..., m : 2 * m].unbind(0),
                G[..., 2 * m : 3 * m].unbind(0), G[..., 3 * m :].unbind(0), C.unbind(0), K.unbind(0), H.unbind(0))
    h, c = h0, c0
    for a, i_f, i, f, g, o, c_out, k_out, h_out in steps:
        a.addmm_(h, Wt)  # a^t = U x^t + b + W h^{t-1}: one product for the four gates
        torch.sigmoid_(i_f)  # i, f
        torch.tanh_(g)
        torch.sigmoid_(o)
        c = torch.mul(f, c, out=c_out).addcmul_(i, g)  # c^t = f ⊙ c^{t-1} + i ⊙ g
        h = torch.mul(torch.tanh(c, out=k_out), o, out=h_out)  # h^t = o ⊙ tanh(c^t), tanh(c^t) kept
    return H, C, K, G


def gate_derivatives(G: Tensor, C_prev: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """G (T,B,4m) = [i;f;g;o], c^{t-1} (T,B,m), K = tanh(c^t) (T,B,m) -> (P (T,B,4m), Q (T,B,m)): the
    local derivatives the sweep multiplies by, all positions at once (no recurrence in them).

    forward was c^t = f ⊙ c^{t-1} + i ⊙ g and h^t = o ⊙ tanh(c^t); so
      P = [∂c/∂a_i ; ∂c/∂a_f ; ∂c/∂a_g ; ∂h/∂a_o] = [g σ'(a_i) ; c^{t-1} σ'(a_f) ; i tanh'(a_g) ; tanh(c) σ'(a_o)]
      Q = ∂h^t/∂c^t = o ⊙ tanh'(c^t)
    P starts as σ' of the four gate blocks at once; each block is then multiplied in place (the g
    block overwritten with i tanh'(a_g)).
    """
    m = K.shape[-1]
    i, f, g, o = G.unflatten(-1, (4, m)).unbind(-2)
    P = sigmoid_derivative(G)  # σ'(a_i), σ'(a_f), ·, σ'(a_o)
    Pi, Pf, Pg, Po = P.unflatten(-1, (4, m)).unbind(-2)
    Pi.mul_(g)
    Pf.mul_(C_prev)
    torch.mul(i, tanh_derivative(g), out=Pg)
    Po.mul_(K)
    return P, o * tanh_derivative(K)


def memory_carry(E: Tensor, f: Tensor) -> Tensor:
    """E^t = ∂L/∂c^t, f^t -> the part of ∂L/∂c^{t-1} that comes through c^t = f^t ⊙ c^{t-1} + …: f^t ⊙ E^t."""
    return E * f


def lstm_deltas(W: Tensor, G: Tensor, P: Tensor, Q: Tensor, dH: Tensor, truncation: int | None = None) -> Tensor:
    """dH (T,B,m) -> δ (T,B,4m) = ∂L/∂a^t under the truncation (see the module's docstring).

    truncation=k keeps, for the error of each L^t, only the paths through at most k recurrent
    connections (a step from the state (h, c)^{t-1} to (h, c)^t is one); None, or k >= T-1, is full BPTT."""
    truncation = optional_int("truncation", truncation)
    T, B, m = dH.shape
    f = G[..., m : 2 * m]
    delta = torch.empty_like(G)
    if full_bptt(truncation, T):
        # per-step views, made once: (B,3,m) blocks [i;f;g] and (B,m) blocks o of P and δ
        P3, d3 = P.unflatten(-1, (4, m))[..., :3, :].unbind(0), delta.unflatten(-1, (4, m))[..., :3, :].unbind(0)
        Po, do = P[..., 3 * m :].unbind(0), delta[..., 3 * m :].unbind(0)
        dHs, Qs, fs, deltas = dH.unbind(0), Q.unbind(0), f.unbind(0), delta.unbind(0)
        dh = dHs[T - 1]
        E = dh * Qs[T - 1]  # E^T = ∂L/∂h^T ⊙ o ⊙ tanh'(c^T)
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dh = torch.addmm(dHs[t], deltas[t + 1], W)  # ∂L/∂h^t = dH^t + Wᵀ δ^{t+1}
                E = memory_carry(E, fs[t + 1]).addcmul_(dh, Qs[t])  # E^t = f^{t+1} ⊙ E^{t+1} + ∂L/∂h^t ⊙ Q^t
            torch.mul(E.unsqueeze(1), P3[t], out=d3[t])  # δ_i, δ_f, δ_g
            torch.mul(dh, Po[t], out=do[t])  # δ_o
        return delta
    # Truncated, vectorised over time. After j hops, (Dh_j, Dc_j)[τ] = the error of L^{τ+j} arrived at
    # (h^τ, c^τ); D_0 = (dH, 0). Each hop back is one product over all positions: O(T·k).
    delta.zero_()
    Dh, Dc = dH, torch.zeros_like(dH)
    for j in range(truncation + 1):
        n = T - j
        E = torch.addcmul(Dc, Dh, Q[:n])
        step = torch.cat((E.unsqueeze(2) * P[:n].view(n, B, 4, m)[:, :, :3],
                          (Dh * P[:n, :, 3 * m :]).unsqueeze(2)), dim=2).view(n, B, 4 * m)
        delta[:n].add_(step)
        if n > 1:
            Dh = torch.matmul(step[1:], W)  # to h^{τ-1} through a^τ = … + W h^{τ-1}
            Dc = memory_carry(E[1:], f[1:n])  # to c^{τ-1} through c^τ = f^τ ⊙ c^{τ-1} + …
    return delta


class LSTMCell:
    """torch.nn.LSTM's cell; parameters U (4m,n), W (4m,m), b (4m,); state (h, c)."""

    name: ClassVar[str] = "lstm"
    gates: ClassVar[int] = 4
    options: ClassVar[tuple[str, ...]] = ("forget_bias",)
    embedding: ClassVar[bool] = True  # reads words through an embedding of size e (default m), like PyTorch's
    # per position and unit, held from the forward to the end of the backward: G (4), C, H, K = tanh(C)
    # cached; in the backward c^{t-1}, h^{t-1}, Q (4), P (4), δ (4) and the next layer's error (1)
    cache_floats: ClassVar[int] = 18

    def __init__(self, forget_bias: float = 0.0):
        self.forget_bias = number("forget_bias", forget_bias, what="a finite number")

    @staticmethod
    def param_shapes(input_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"U": (4 * hidden_size, input_size), "W": (4 * hidden_size, hidden_size)}
        if bias:
            shapes["b"] = (4 * hidden_size,)
        return shapes

    def initialize(self, params: dict[str, Tensor], init_range: float, generator: torch.Generator) -> None:
        """The forget gate's bias starts at forget_bias (Gers et al.; Jozefowicz et al. 2015 use 1)."""
        if "b" in params and self.forget_bias:
            m = params["W"].shape[1]
            params["b"][m : 2 * m] = self.forget_bias

    @staticmethod
    def initial_state(params: dict[str, Tensor], batch_size: int) -> CellState:
        W = params["W"]
        return (W.new_zeros(batch_size, W.shape[1]), W.new_zeros(batch_size, W.shape[1]))

    @staticmethod
    def forward(params: dict[str, Tensor], A: Tensor, state0: CellState) -> tuple[Tensor, CellState, CellCache]:
        """A (T,B,4m), (h^0, c^0) -> (H (T,B,m), (h^T, c^T), cache {"H", "C", "K", "G"}); G is A, overwritten."""
        H, C, K, G = lstm_forward(params["W"], params.get("b"), A, state0[0], state0[1])
        return H, (H[-1], C[-1]), CellCache(state0, {"H": H, "C": C, "K": K, "G": G})

    @staticmethod
    def backward(params: dict[str, Tensor], cache: CellCache, dH: Tensor, grads: dict[str, Tensor],
                 truncation: int | None = None) -> Tensor:
        """dH (T,B,m) -> dA (T,B,4m) = δ; accumulates dW, db."""
        W = params["W"]
        H, C, K, G = cache.steps["H"], cache.steps["C"], cache.steps["K"], cache.steps["G"]
        h0, c0 = cache.state0
        T, B, m = H.shape
        truncation = optional_int("truncation", truncation)
        sweeps = native.sweeps("lstm", G, C, K, dH, strided=(W,)) if full_bptt(truncation, T) else None
        if sweeps is not None:
            # full BPTT, compiled: gate_derivatives' P and Q formed inside lstm_deltas' loop
            delta = torch.empty_like(G)
            sweeps.lstm_backward_sweep(W, G, C, K, c0, dH, delta)
        else:
            C_prev = torch.cat((c0.unsqueeze(0), C[:-1]))
            P, Q = gate_derivatives(G, C_prev, K)
            delta = lstm_deltas(W, G, P, Q, dH, truncation)
        H_prev = torch.cat((h0.unsqueeze(0), H[:-1])).view(T * B, m)
        flat = delta.view(T * B, 4 * m)
        grads["W"].addmm_(flat.t(), H_prev)  # ∂L/∂W = Σ_t δ^t h^{t-1}ᵀ
        if "b" in grads:
            grads["b"].add_(flat.sum(dim=0))  # ∂L/∂b = Σ_t δ^t
        return delta

    @staticmethod
    def hidden_errors(params: dict[str, Tensor], cache: CellCache, dA: Tensor, dH: Tensor) -> Tensor:
        """∂L/∂h^t (T,B,m) at every step of a full backward (bptt diagnose): h^t reaches step t+1 only
        through W h^t, so ∂L/∂h^t = dH^t + Wᵀ dA^{t+1} (cells.hidden_errors)."""
        return hidden_errors(params["W"], dA, dH)

    @staticmethod
    def state_at(cache: CellCache, t: int) -> CellState:
        return (cache.steps["H"][t], cache.steps["C"][t])
