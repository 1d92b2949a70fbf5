"""Real-time recurrent learning: the paper's forward recursion (eq. 5–8), exact, for checking.

Not an independent reference: RTRL runs the cell's F′ (cell.F.derivative) and the output layer's own
forward and backward (each step's loss and error e^t), the same code that BPTT runs. Agreement with
BPTT checks the propagation through time and the gradients of U, W and b (sensitivities carried
forward against errors sent backward), and nothing about F′ or the output layers: a wrong F′ or
output-layer gradient is wrong in both, and they still agree (tests/test_gradients.py shows it).
The independent references are finite differences of the loss (bptt.verify.finite_difference_grads)
and autograd of independently written formulas (bptt.oracle for the seed's full-softmax network,
per-layer autograd models in the tests).

Instead of sending errors backwards, RTRL carries the sensitivities P^t = ∂s^t/∂θ forward in time and
contracts them with each step's error. Shapes: B streams, m hidden, V vocabulary:
  P_W (B,m,m,m)  P_W[b,r,i,j] = ∂s_r^t/∂W_ij
  P_U (B,m,m,V)  P_U[b,r,i,j] = ∂s_r^t/∂U_ij
  P_b (B,m,m)    P_b[b,r,i]   = ∂s_r^t/∂b_i
Cost per step O(B·m⁴) for W and O(B·m³·V) for U: meant for small models, never for training.
The printed recursion drops F' and collapses the sum over r to r = i; the corrected form is
  ∂s_r^t/∂W_ij = F'(a_r^t) (δ_ri s_j^{t-1} + Σ_p W_rp ∂s_p^{t-1}/∂W_ij)        (eq. 6, corrected)
  ∂s_r^t/∂U_ij = F'(a_r^t) (δ_ri x_j^t   + Σ_p W_rp ∂s_p^{t-1}/∂U_ij)        (eq. 8, corrected)
"""

from __future__ import annotations

import torch

from bptt.engine.cells.elman import ElmanCell
from bptt.engine.outputs.full import FullOutput

Tensor = torch.Tensor


def elman_rtrl(
    params: dict[str, Tensor],
    cell: ElmanCell,
    output: FullOutput,
    inputs: Tensor,
    targets: Tensor,
    h0: Tensor,
    weights: Tensor | None = None,
    features: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """inputs, targets (T,B); h0 (B,m); weights (T,B)|None; features (T·B,K)|None (direct connections)
    -> (loss, grads, s^T), exact gradients."""
    U, W, b = params["U"], params["W"], params.get("b")
    T, B = inputs.shape
    m, V = U.shape
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    opts = dict(dtype=U.dtype, device=U.device)
    P_W = torch.zeros(B, m, m, m, **opts)
    P_U = torch.zeros(B, m, m, V, **opts)
    P_b = torch.zeros(B, m, m, **opts) if b is not None else None
    eye = torch.eye(m, **opts)
    batch_index = torch.arange(B, device=U.device).unsqueeze(1)  # (B,1)
    unit_index = torch.arange(m, device=U.device).unsqueeze(0)  # (1,m)
    s = h0
    loss = torch.zeros((), **opts)
    for t in range(T):
        x = inputs[t]
        a = s @ W.t() + U.t()[x]  # a^t = W s^{t-1} + U x^t (+ b): the gather again
        if b is not None:
            a = a + b
        s_new = cell.F.forward_(a.clone())
        F_prime = cell.F.derivative(s_new).view(B, m, 1, 1)
        # Σ_p W_rp ∂s_p^{t-1}/∂θ, then the direct terms, then F'(a_r^t)
        P_W = torch.einsum("rp,bpij->brij", W, P_W)
        P_W += eye.view(1, m, m, 1) * s.view(B, 1, 1, m)  # δ_ri s_j^{t-1}
        P_W *= F_prime
        P_U = torch.einsum("rp,bpij->brij", W, P_U)
        P_U[batch_index, unit_index, unit_index, x.unsqueeze(1)] += 1.0  # δ_ri x_j^t: a scatter
        P_U *= F_prime
        if P_b is not None:
            P_b = (torch.einsum("rp,bpi->bri", W, P_b) + eye) * F_prime.view(B, m, 1)
        s = s_new
        # The output at step t: L^t and e^t = ∂L^t/∂s^t (eq. 2–5); dV and dc accumulate directly.
        w_t = None if weights is None else weights[t]
        direct = {} if features is None else {"features": features.view(T, B, -1)[t]}
        loss_t, cache = output.forward(params, s, targets[t], w_t, **direct)
        e = output.backward(params, s, cache, targets[t], w_t, grads)  # (B,m)
        loss = loss + loss_t
        # ∂L^t/∂θ = Σ_r e_r^t ∂s_r^t/∂θ   (eq. 4/7 contracted with the carried sensitivities)
        grads["W"] += torch.einsum("br,brij->ij", e, P_W)
        grads["U"] += torch.einsum("br,brij->ij", e, P_U)
        if P_b is not None:
            grads["b"] += torch.einsum("br,bri->i", e, P_b)
    return loss, grads, s
