"""Losses of the seed model, each a forward/backward pair over N = T·B positions.

The target d^t is the one-hot vector of the next word; it is never built: every formula below is
rewritten so that only the target's column is read (a gather) or written (a scatter).
`weights` (N,) multiplies each position's loss (1 = counted, 0 = padding or history); None = all 1.
Units: natural log (nats) for cross-entropy.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _pick(x: Tensor, targets: Tensor) -> Tensor:
    """x (N,V), targets (N,) -> x[n, targets[n]] (N,): the target's column, a gather."""
    return x.gather(1, targets.unsqueeze(1)).squeeze(1)


def _weighted_sum(per_position: Tensor, weights: Tensor | None) -> Tensor:
    return per_position.sum() if weights is None else (per_position * weights).sum()


def quadratic_forward(o: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """o (N,V), targets (N,) -> L = ½ Σ_n w_n Σ_k (d_k − o_k)²  (eq. 1), a 0-d tensor.

    With d one-hot at y: Σ_k (d_k − o_k)² = Σ_k o_k² − 2 o_y + 1.
    """
    per_position = 0.5 * ((o * o).sum(dim=1) - 2.0 * _pick(o, targets) + 1.0)
    return _weighted_sum(per_position, weights)


def quadratic_backward(o: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """-> dL/do (N,V).

    forward was L = ½ Σ_n w_n Σ_k (d_k − o_k)²; so dL/do_k = w_n (o_k − d_k): a copy of o with 1
    subtracted at the target column (eq. 2's factor (o_k^t − d_k^t)).
    """
    do = o.clone()
    do.scatter_add_(1, targets.unsqueeze(1), torch.full_like(do[:, :1], -1.0))
    if weights is not None:
        do.mul_(weights.unsqueeze(1))
    return do


def softmax_cross_entropy_forward_(
    g: Tensor, targets: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """g (N,V) logits -> (L, o), with L = −Σ_n w_n log o_y and o = softmax(g) (N,V).

    Fused and in place: g is overwritten by o, which the backward turns into the gradient. The loss
    is −log o_y = log Σ_k exp(g_k − max g) + max g − g_y, computed stably from the target's logit
    and the row maximum (both read first). torch.softmax writes o over g (out=g: each row is read
    before it is written) in fewer passes than max/subtract/exp/sum/divide; its largest entry is
    exp(0)/Σ = 1/Σ_k exp(g_k − max g), so the row sum is read back as 1 / max_k o_k.
    """
    picked = _pick(g, targets)  # g_y (N,)
    row_max = g.amax(dim=1)  # (N,)
    o = torch.softmax(g, dim=1, out=g)  # o = softmax(g), in place
    inv_sum = o.amax(dim=1)  # (N,) = 1 / Σ_k exp(g_k − max g)
    per_position = row_max.sub_(picked).sub_(inv_sum.log_())  # −log o_y
    return _weighted_sum(per_position, weights), o


def softmax_cross_entropy_backward_(
    o: Tensor, targets: Tensor, weights: Tensor | None = None
) -> Tensor:
    """o (N,V) from the forward -> dL/dg (N,V), in place over o.

    forward was L = −Σ_n w_n log softmax(g)_y; the softmax Jacobian and the log cancel to
    dL/dg_k = w_n (o_k − d_k): subtract 1 at the target column of o and scale by w. No pass over the
    (N,V) matrix beyond the scatter (and the scaling when weights are given), no Jacobian, no one-hot.
    """
    dg = o
    dg.scatter_add_(1, targets.unsqueeze(1), torch.full_like(dg[:, :1], -1.0))
    if weights is not None:
        dg.mul_(weights.unsqueeze(1))
    return dg


LOSSES = ("quadratic", "cross_entropy")
