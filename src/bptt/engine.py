"""The BPTT engine: forward through the cell, the output layer over all positions, back again.

It only calls the forward/backward pairs of a cell and an output layer, in order; it knows neither
the cell's equations nor the output layer's. Shapes: T time, B streams, m hidden, V vocabulary.
"""

from __future__ import annotations

import torch

from bptt.regularizers import activation_penalty_backward

Tensor = torch.Tensor


def zeros_like_params(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gradient buffers with the same shapes (and memory layouts) as the parameters."""
    return {name: torch.zeros_like(p) for name, p in params.items()}


def _flat(S: Tensor, targets: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(T,B,m), (T,B), (T,B)|None -> the same over N = T·B positions."""
    T, B, m = S.shape
    return S.reshape(T * B, m), targets.reshape(-1), None if weights is None else weights.reshape(-1)


def _direct(features: Tensor | None) -> dict[str, Tensor]:
    """The output layers' keyword for maxent direct-connection offsets (N,K), passed only when present."""
    return {} if features is None else {"features": features}


def sequence_loss(
    cell, output, params: dict[str, Tensor], inputs: Tensor, targets: Tensor, h0: Tensor,
    weights: Tensor | None = None, features: Tensor | None = None,
) -> Tensor:
    """Forward only: the loss summed over all T·B positions (0-d)."""
    S = cell.forward(params, inputs, h0)
    return output.forward(params, *_flat(S, targets, weights), **_direct(features))[0]


def output_errors(
    output, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None,
    grads: dict[str, Tensor], features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """S (T,B,m), targets (T,B), weights (T,B)|None, features (T·B,K)|None -> (loss, dS (T,B,m) = ∂L^t/∂s^t direct).

    The output layer runs once over all T·B positions; its own gradients accumulate into grads.
    features: the n-gram offsets of maxent direct connections (outputs/direct.py), if the model has them.
    """
    flat_S, flat_targets, flat_weights = _flat(S, targets, weights)
    fused = getattr(output, "forward_backward", None)  # a layer may run its pair in chunks (outputs/full.py)
    if fused is not None:
        loss, dS = fused(params, flat_S, flat_targets, flat_weights, grads, **_direct(features))
    else:
        loss, cache = output.forward(params, flat_S, flat_targets, flat_weights, **_direct(features))
        dS = output.backward(params, flat_S, cache, flat_targets, flat_weights, grads)
    return loss, dS.view(S.shape)


def bptt_loss_and_grads(
    cell,
    output,
    params: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    h0: Tensor,
    truncation: int | None = None,
    weights: Tensor | None = None,
    grads: dict[str, Tensor] | None = None,
    features: Tensor | None = None,
    ar: float = 0.0,
    tar: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """One forward and one backward sweep -> (loss summed over positions, grads, S (T,B,m)).

    grads, if given, are zeroed and filled in place (buffers reused across calls). ar, tar > 0 add
    the activation penalties of regularizers.py to the gradients (not to the loss returned).
    """
    if grads is None:
        grads = zeros_like_params(params)
    else:
        for g in grads.values():
            g.zero_()
    S = cell.forward(params, inputs, h0)
    loss, dS = output_errors(output, params, S, targets, weights, grads, features)
    if ar or tar:
        activation_penalty_backward(S, weights, ar, tar, dS)
    cell.backward(params, inputs, h0, S, dS, grads, truncation)
    return loss, grads, S
