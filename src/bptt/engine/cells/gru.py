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

Two products per step: (B,m)×(m,2m) adds W_hr h^{t-1}, W_hz h^{t-1} to the r, z rows of G in place, and
(B,m)×(m,m) writes q^t (with b_hn) straight into its cache row — no (B,3m) temporary to add and copy.
The forward overwrites A with G = [r ; z ; n] (the cache) and keeps q^t and H.

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
from bptt.engine import native
from bptt.engine.cells import CellCache, CellState, full_bptt
from bptt.engine.cells.lstm import sigmoid_derivative, tanh_derivative

Tensor = torch.Tensor


def reset_candidate_(pre: Tensor, r: Tensor, q: Tensor) -> Tensor:
    """pre = A_n + b_n (B,m), r, q = W_hn h^{t-1} + b_hn -> n = tanh(pre + r ⊙ q), written over pre."""
    return pre.addcmul_(r, q).tanh_()


def gru_forward(W: Tensor, b: Tensor | None, b_hn: Tensor | None, A: Tensor, h0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A (T,B,3m) = U x^t, h0 (B,m) -> (H (T,B,m), Qn (T,B,m) = q^t, G (T,B,3m) = [r;z;n]); G is A, overwritten.

    Per step two products (W_hr, W_hz h^{t-1} added to the gates' rows of G; q^t = W_hn h^{t-1} + b_hn
    written into Qn) and four element-wise operations, on views made before the loop. The same sweep runs
    compiled where it can (native.sweeps: gru_cpu.cpp on the CPU, gru_triton.py on CUDA: the products, then
    the step's element-wise work in one loop or kernel).
    """
    T, B, three_m = A.shape
    m = three_m // 3
    G = A
    if b is not None:
        G.add_(b)
    H, Qn = A.new_empty(T, B, m), A.new_empty(T, B, m)
    sweeps = native.sweeps("gru", G, strided=(W,) if b_hn is None else (W, b_hn))  # gru_cpu.cpp, gru_triton.py
    if sweeps is not None:
        sweeps.gru_forward_sweep(W, b_hn, G, h0, Qn, H)
        return H, Qn, G
    Wt_rz, Wt_n = W[: 2 * m].t(), W[2 * m :].t()
    steps = zip(G[..., : 2 * m].unbind(0), G[..., :m].unbind(0), G[..., m : 2 * m].unbind(0),
                G[..., 2 * m :].unbind(0), Qn.unbind(0), H.unbind(0))
    h = h0
    for rz, r, z, pre_n, q, h_out in steps:
        torch.sigmoid_(rz.addmm_(h, Wt_rz))  # r, z = σ(A + b + W_h h^{t-1})
        if b_hn is None:
            torch.mm(h, Wt_n, out=q)  # q^t = W_hn h^{t-1}
        else:
            torch.addmm(b_hn, h, Wt_n, out=q)  # q^t = W_hn h^{t-1} + b_hn
        n = reset_candidate_(pre_n, r, q)  # n = tanh(A_n + b_n + r ⊙ q)
        h = torch.lerp(n, h, z, out=h_out)  # h = n + z ⊙ (h^{t-1} − n)
    return H, Qn, G


def gate_derivatives(G: Tensor, Qn: Tensor, H_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """G = [r;z;n] (T,B,3m), q (T,B,m), h^{t-1} (T,B,m) -> (P (T,B,3m), R (T,B,3m), z): the local derivatives.

    forward was h = (1 − z) n + z h^{t-1}, n = tanh(a_n + r ⊙ q); so, per unit of ∂L/∂h^t,
      P = ∂L/∂A = [q (1 − z) tanh'(n) σ'(r) ; (h^{t-1} − n) σ'(z) ; (1 − z) tanh'(n)]
      R = the error of W h^{t-1} (+ b_hn) = [P_r ; P_z ; P_n ⊙ r]
    Each block is written into its place in P and R.
    """
    m = Qn.shape[-1]
    r, z, n = G.unflatten(-1, (3, m)).unbind(-2)
    P, R = torch.empty_like(G), torch.empty_like(G)
    Pr, Pz, Pn = P.unflatten(-1, (3, m)).unbind(-2)
    torch.mul(1 - z, tanh_derivative(n), out=Pn)
    torch.mul(H_prev - n, sigmoid_derivative(z), out=Pz)
    torch.mul(Pn * Qn, sigmoid_derivative(r), out=Pr)
    R[..., : 2 * m] = P[..., : 2 * m]
    torch.mul(Pn, r, out=R[..., 2 * m :])
    return P, R, z


def gru_deltas(W: Tensor, P: Tensor, R: Tensor, z: Tensor, dH: Tensor,
               truncation: int | None = None) -> tuple[Tensor, Tensor]:
    """dH (T,B,m) -> (δ = ∂L/∂A (T,B,3m), γ = ∂L/∂(W h^{t-1}) (T,B,3m)) under the truncation: paths
    through at most k recurrent connections (h^{t-1} -> h^t is one); None, or k >= T-1, is full BPTT."""
    truncation = optional_int("truncation", truncation)
    T, B, m = dH.shape
    gamma = torch.empty_like(R)
    if full_bptt(truncation, T):
        # the sweep keeps ∂L/∂h^t of every step (DH) and forms γ, which the next step back needs;
        # δ = ∂L/∂h^t ⊙ P is one product over all steps afterwards
        DH = torch.empty_like(dH)
        DH[T - 1] = dH[T - 1]
        R3, g3 = R.unflatten(-1, (3, m)).unbind(0), gamma.unflatten(-1, (3, m)).unbind(0)
        dHs, DHs, zs, gammas = dH.unbind(0), DH.unbind(0), z.unbind(0), gamma.unbind(0)
        dh = DHs[T - 1]
        for t in range(T - 1, -1, -1):
            if t < T - 1:  # ∂L/∂h^t = dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1} + W_hᵀ γ^{t+1}
                dh = torch.addcmul(dHs[t], dh, zs[t + 1], out=DHs[t]).addmm_(gammas[t + 1], W)
            torch.mul(dh.unsqueeze(1), R3[t], out=g3[t])
        delta = torch.mul(DH.unsqueeze(2), P.unflatten(-1, (3, m))).view(T, B, 3 * m)
        return delta, gamma
    delta = torch.zeros_like(P)
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
        truncation = optional_int("truncation", truncation)
        sweeps = native.sweeps("gru", G, Qn, H, dH, strided=(params["W"],)) if full_bptt(truncation, T) else None
        if sweeps is not None:
            # full BPTT, compiled: gate_derivatives' P and R formed inside gru_deltas' loop
            delta, gamma = torch.empty_like(G), torch.empty_like(G)
            sweeps.gru_backward_sweep(params["W"], G, Qn, H, cache.state0[0], dH, delta, gamma)
        else:
            P, R, z = gate_derivatives(G, Qn, H_prev)
            delta, gamma = gru_deltas(params["W"], P, R, z, dH, truncation)
        flat_gamma = gamma.view(T * B, 3 * m)
        grads["W"].addmm_(flat_gamma.t(), H_prev.view(T * B, m))  # ∂L/∂W = Σ_t γ^t h^{t-1}ᵀ
        if "b" in grads:
            grads["b"].add_(delta.view(T * B, 3 * m).sum(dim=0))  # ∂L/∂b = Σ_t δ^t
            grads["b_hn"].add_(flat_gamma[:, 2 * m :].sum(dim=0))  # ∂L/∂b_hn = Σ_t δ_n^t ⊙ r^t
        return delta

    @staticmethod
    def hidden_errors(params: dict[str, Tensor], cache: CellCache, dA: Tensor, dH: Tensor) -> Tensor:
        """∂L/∂h^t (T,B,m) at every step of a full backward (bptt diagnose), from dA = [δ_r; δ_z; δ_n] and
        the errors dH from above. h^t reaches step t+1 directly and through W:
            ∂L/∂h^t = dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1} + Wᵀ γ^{t+1},   γ = [δ_r; δ_z; δ_n ⊙ r]
        (the module docstring's backward), from the last step (∂L/∂h^T = dH^T) down."""
        G = cache.steps["G"]
        T, B, three_m = G.shape
        m = three_m // 3
        gamma = dA.clone(memory_format=torch.contiguous_format)
        gamma[..., 2 * m :].mul_(G[..., :m])  # δ_n ⊙ r
        out = dH.clone(memory_format=torch.contiguous_format)
        if T > 1:
            out[:-1].view(-1, m).addmm_(gamma[1:].reshape(-1, three_m), params["W"])
        for t in range(T - 2, -1, -1):
            out[t].addcmul_(G[t + 1, :, m : 2 * m], out[t + 1])  # + z^{t+1} ⊙ ∂L/∂h^{t+1}
        return out

    @staticmethod
    def state_at(cache: CellCache, t: int) -> CellState:
        return (cache.steps["H"][t],)
