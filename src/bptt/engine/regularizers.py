"""Activation regularization of the hidden states: AR and TAR (Merity, Keskar & Socher 2017, AWD-LSTM).

Two terms on the states s^t of a block, as means per element like AWD-LSTM's:

    AR   α · mean over counted positions of (1/m) ‖s^t‖²                  small activations
    TAR  β · mean over consecutive counted pairs of (1/m) ‖s^t − s^{t−1}‖²  slowly changing states

(T time, B streams, m hidden; the pairs are those inside the block, so T − 1 per stream.) The engine
works with sums over positions (the trainer divides the gradients by the N counted tokens), so both
functions below use the penalty multiplied by N:

    R = (α/m) Σ_{t,b} w ‖s‖²  +  (β N / (P m)) Σ_{t≥2,b} w^t w^{t−1} ‖s^t − s^{t−1}‖²

with w the position weights (1 counted, 0 padding; all 1 when None), N = Σ w and P = Σ w^t w^{t−1}.
R adds only to the gradient: the training entropy reported stays the model's own cross-entropy.
"""

from __future__ import annotations

import torch

from bptt import checks

Tensor = torch.Tensor


def check_strengths(ar: float, tar: float) -> tuple[float, float]:
    """-> (α, β) as floats; ValueError unless both are finite numbers >= 0."""
    return checks.non_negative("ar", ar), checks.non_negative("tar", tar)


def _weights(S: Tensor, weights: Tensor | None) -> tuple[Tensor | None, float, float]:
    """-> (w (T,B,1)|None, N, P): position weights, counted positions and counted consecutive pairs."""
    T, B, _ = S.shape
    if weights is None:
        return None, float(T * B), float((T - 1) * B)
    w = weights.reshape(T, B).to(S.dtype)
    return w.unsqueeze(-1), float(w.sum()), float((w[1:] * w[:-1]).sum())


def activation_penalty_forward(S: Tensor, weights: Tensor | None, ar: float, tar: float) -> Tensor:
    """S (T,B,m), weights (T,B)|None -> R, a 0-d tensor (the sum form above)."""
    m = S.shape[-1]
    w, n, pairs = _weights(S, weights)
    sq = S * S if w is None else S * S * w
    penalty = (ar / m) * sq.sum()
    if tar and pairs > 0:
        d = S[1:] - S[:-1]
        dd = d * d if w is None else d * d * (w[1:] * w[:-1])
        penalty = penalty + (tar * n / (pairs * m)) * dd.sum()
    return penalty


def activation_penalty_backward(S: Tensor, weights: Tensor | None, ar: float, tar: float, dS: Tensor) -> Tensor:
    """S (T,B,m) -> dS (T,B,m) += ∂R/∂S, in place; returns dS.

    forward was R = (α/m) Σ w ‖s^t‖² + c Σ w^t w^{t−1} ‖s^t − s^{t−1}‖², c = β N / (P m); so
    ∂R/∂s^t = (2α/m) w^t s^t + 2c [w^t w^{t−1} (s^t − s^{t−1}) − w^{t+1} w^t (s^{t+1} − s^t)]:
    each difference d^t = s^t − s^{t−1} pushes s^t by +d^t and s^{t−1} by −d^t.
    """
    m = S.shape[-1]
    w, n, pairs = _weights(S, weights)
    if ar:
        dS += (2 * ar / m) * (S if w is None else S * w)
    if tar and pairs > 0:
        d = S[1:] - S[:-1]  # (T−1,B,m): d[t−1] = s^t − s^{t−1}
        if w is not None:
            d = d * (w[1:] * w[:-1])
        g = torch.zeros_like(S)
        g[1:] += d
        g[:-1] -= d
        dS += (2 * tar * n / (pairs * m)) * g
    return dS
