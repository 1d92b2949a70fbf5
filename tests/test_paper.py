"""The paper's printed recursion (eq. 6) against the engine, for F = identity, as docs/derivation.md says.

Read literally, eq. 6 keeps only the r = i component of the sensitivity: q_ij^t = ∂s_i^t/∂W_ij =
s_j^{t-1} + W_ii q_ij^{t-1}. The corrected recursion keeps every r:
P_rij^t = δ_ri s_j^{t-1} + Σ_p W_rp P_pij^{t-1} (F = identity, so F' = 1).
"""

from __future__ import annotations

import torch

from bptt.verify import relative_error
from conftest import make_case


def paper_dW(model, x, y, corrected: bool):
    """∂L/∂W by the paper's forward recursion, one stream, F = f = identity, quadratic loss, no bias."""
    U, W, V = (model.params[k] for k in "UWV")
    m = W.shape[0]
    s = torch.zeros(m)
    P = torch.zeros(m, m, m)  # P[r, i, j] = ∂s_r/∂W_ij
    dW = torch.zeros(m, m)
    for t in range(x.shape[0]):
        s_prev, s = s, W @ s + U[:, x[t, 0]]  # s^t = W s^{t-1} + U x^t (the paper's state equation)
        if corrected:
            P = torch.einsum("rp,pij->rij", W, P) + torch.einsum("ri,j->rij", torch.eye(m), s_prev)
        else:  # printed: only r = i survives
            q = s_prev.unsqueeze(0) + W.diagonal().unsqueeze(1) * P.diagonal(dim1=0, dim2=1).T
            P = torch.zeros(m, m, m)
            P[torch.arange(m), torch.arange(m)] = q
        e_s = V.T @ (V @ s - torch.nn.functional.one_hot(y[t, 0], V.shape[0]))  # Σ_k (o_k − d_k) V_ki
        dW += torch.einsum("r,rij->ij", e_s, P)
    return dW


def test_corrected_recursion_with_identity_F_is_the_bptt_gradient():
    model, x, y, _ = make_case("identity", "identity", "quadratic", T=5, B=1, bias=False, carried_h0=False)
    _, grads, _ = model.loss_and_grads(x, y)
    assert relative_error(paper_dW(model, x, y, corrected=True), grads["W"]) <= 1e-12


def test_printed_recursion_is_exact_for_one_step_only():
    model, x, y, _ = make_case("identity", "identity", "quadratic", T=5, B=1, bias=False, carried_h0=False)
    _, grads_one, _ = model.loss_and_grads(x[:2], y[:2])  # s^0 = 0: the recurrent term starts at t = 2
    assert relative_error(paper_dW(model, x[:2], y[:2], corrected=False), grads_one["W"]) <= 1e-12
    _, grads, _ = model.loss_and_grads(x, y)
    assert relative_error(paper_dW(model, x, y, corrected=False), grads["W"]) > 1e-3
