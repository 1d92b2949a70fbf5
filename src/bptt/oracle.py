"""An independent autograd model of the seed's equations: the oracle the checks compare against.

Nothing in the engine uses this module; only `bptt gradcheck` and the tests do. It is written
literally, in the paper's notation: a one-hot x^t, matrix-vector products U x^t, the loss of eq. 1
against a one-hot d^t, one step at a time, and autograd differentiates it. It shares no code with the
engine (not even the activation functions), so a slip in one does not hide in the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

Tensor = torch.Tensor

_F = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda a: a}
_f = {"softmax": lambda g: torch.softmax(g, dim=-1), "sigmoid": torch.sigmoid, "identity": lambda g: g}


def _step(params: dict[str, Tensor], F, s_prev: Tensor, x_onehot: Tensor) -> Tensor:
    U = params["U"] if "U" in params else params["V"].T  # a tied model has no U: U = Vᵀ
    a = s_prev @ params["W"].T + x_onehot @ U.T  # a^t = W s^{t-1} + U x^t
    if "b" in params:
        a = a + params["b"]
    return F(a)


def _step_loss(params, f_name: str, loss: str, s: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    g = s @ params["V"].T  # g^t = V s^t
    if "c" in params:
        g = g + params["c"]
    d = nnf.one_hot(target, g.shape[-1]).to(g.dtype)
    if loss == "cross_entropy":
        per = -(d * torch.log_softmax(g, dim=-1)).sum(-1)
    else:
        o = _f[f_name](g)
        per = 0.5 * ((d - o) ** 2).sum(-1)  # eq. 1
    return per.sum() if weight is None else (per * weight).sum()


def autograd_loss_and_grads(
    params: dict[str, Tensor],
    hidden_activation: str,
    output_activation: str,
    loss: str,
    inputs: Tensor,
    targets: Tensor,
    h0: Tensor | None = None,
    truncation: int | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference loss and gradients by autograd. inputs, targets (T,B); h0 (B,m).

    truncation=k: L^t is differentiated through the last k+1 steps only, starting from s^{t-k-1}
    taken as a constant (recomputed per t: O(T·k), fine for checks).
    """
    F = _F[hidden_activation]
    T, B = inputs.shape
    V = params["V"].shape[0]
    m = params["W"].shape[0]
    with torch.enable_grad():
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        s0 = torch.zeros(B, m, dtype=params["W"].dtype) if h0 is None else h0.detach()
        x = [nnf.one_hot(inputs[t], V).to(s0.dtype) for t in range(T)]
        weight = (lambda t: None) if mask is None else (lambda t: mask[t].to(s0.dtype))
        total = torch.zeros((), dtype=s0.dtype)
        if truncation is None:
            s = s0
            for t in range(T):
                s = _step(leaves, F, s, x[t])
                total = total + _step_loss(leaves, output_activation, loss, s, targets[t], weight(t))
        else:
            with torch.no_grad():  # the untruncated states, used as constant starting points
                states, s = [s0], s0
                for t in range(T):
                    s = _step(leaves, F, s, x[t])
                    states.append(s)
            for t in range(T):
                start = max(0, t - truncation)
                s = states[start]  # s^{start}, a constant
                for tau in range(start, t + 1):
                    s = _step(leaves, F, s, x[tau])
                total = total + _step_loss(leaves, output_activation, loss, s, targets[t], weight(t))
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return total.detach(), {
        k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)
    }
