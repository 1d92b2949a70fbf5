"""The BPTT sweep: forward through the network, the output layer over all positions, back again.

It only calls the forward/backward pairs of the network (input term, cells) and of the output layer,
in order; it knows neither a cell's equations nor an output layer's. Shapes: T time, B streams,
m hidden, V vocabulary. Every function takes the tensors first and its options as keywords.
"""

from __future__ import annotations

import torch

from bptt.engine.dropout import Masks
from bptt.engine.flat import Flat
from bptt.engine.network import Network, State
from bptt.engine.regularizers import activation_penalty_backward

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


def output_loss(output, params: dict[str, Tensor], S: Tensor, targets: Tensor, *, weights: Tensor | None = None,
                features: Tensor | None = None) -> Tensor:
    """S (T,B,m), targets (T,B) -> the output layer's loss summed over the T·B positions (0-d), forward only."""
    return output.forward(params, *_flat(S, targets, weights), **_direct(features))[0]


def output_errors(
    output, params: dict[str, Tensor], S: Tensor, targets: Tensor, grads: dict[str, Tensor], *,
    weights: Tensor | None = None, features: Tensor | None = None,
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


def sequence_loss(net: Network, params: dict[str, Tensor], inputs: Tensor, targets: Tensor, state: State, *,
                  weights: Tensor | None = None) -> Tensor:
    """Forward only: the loss summed over all T·B positions (0-d)."""
    H, _, cache = net.forward(params, inputs, state)
    return output_loss(net.output, params, H, targets, weights=weights, features=cache.features)


def zero_(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Zero gradient buffers in place: one operation on a Flat's buffer, one per tensor otherwise."""
    if isinstance(grads, Flat):
        return grads.zero_()
    for g in grads.values():
        g.zero_()
    return grads


def loss_and_grads(
    net: Network,
    params: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    state: State,
    *,
    truncation: int | None = None,
    weights: Tensor | None = None,
    grads: dict[str, Tensor] | None = None,
    ar: float = 0.0,
    tar: float = 0.0,
    masks: Masks | None = None,
) -> tuple[Tensor, dict[str, Tensor], State]:
    """One forward and one backward sweep over a block -> (loss summed over positions, grads, state after it).

    grads, if given, are zeroed and filled in place (buffers reused across calls). ar, tar > 0 add
    the activation penalties of regularizers.py on the top layer's output to the gradients (not to
    the loss returned). truncation=k: every error goes back through at most k recurrent connections.
    masks: dropout masks of the block (Network.draw_masks; None: nothing dropped).
    """
    grads = zeros_like_params(params) if grads is None else zero_(grads)
    H, new_state, cache = net.forward(params, inputs, state, masks)
    loss, dH = output_errors(net.output, params, H, targets, grads, weights=weights, features=cache.features)
    if ar or tar:
        activation_penalty_backward(H, weights, ar, tar, dH)
    net.backward(params, cache, dH, grads, truncation)
    return loss, grads, new_state
