"""Running a model over a stream of tokens: the one helper behind evaluation, scoring, sampling,
dynamic evaluation, the demo's grammar check and truncated BPTT's carried state.

A `Stream` holds the state a model carries from one block to the next (every layer's state and the
direct connections' context, engine.network.State) and runs blocks through the network:
`forward` gives the top layer's output and the direct features of the block's positions,
`log_probs` the exactly normalized log-probabilities, `nll` −Σ ln P of given targets, `loss_and_grads`
a BPTT sweep within the block (the carried state a constant). `token_blocks` cuts a 1-D token array
into the (inputs, targets) blocks of one stream whose history starts at <eos>.

Shapes: T time, B streams, m hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from bptt.engine.network import State
from bptt.engine.sweep import loss_and_grads

Tensor = torch.Tensor


def token_blocks(ids, eos_id: int, block: int, device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """ids (N,) int -> blocks (x (T,1), y (T,1)) int64 of one stream: y are the N tokens, x the tokens
    before them, the first being <eos> (the history a corpus starts from); T = block but the last."""
    tokens = torch.from_numpy(np.concatenate(([eos_id], np.asarray(ids))).astype(np.int64)).to(device)
    for start in range(0, tokens.numel() - 1, block):
        y = tokens[start + 1 : start + block + 1].unsqueeze(1)
        x = tokens[start : start + y.shape[0]].unsqueeze(1)
        yield x, y


class Stream:
    """B parallel streams of one model; `state` is carried from block to block (None: start from zero)."""

    def __init__(self, model, batch_size: int = 1, state: State | None = None):
        self.model = model
        self.net, self.params = model.net, model.params
        self.state = self.net.initial_state(self.params, batch_size) if state is None else state

    @torch.no_grad()
    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """inputs (T,B) int64 on the model's device -> (H (T,B,m), direct features (T·B,K)|None); the
        state moves past the block."""
        H, self.state, cache = self.net.forward(self.params, inputs, self.state)
        return H, cache.features

    @torch.no_grad()
    def log_probs(self, inputs: Tensor) -> Tensor:
        """inputs (T,B) -> log P(w | history) (T,B,V) in nats, exactly normalized over the vocabulary."""
        H, features = self.forward(inputs)
        T, B, m = H.shape
        return self.net.log_probs(self.params, H.view(T * B, m), features).view(T, B, -1)

    @torch.no_grad()
    def nll(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """inputs, targets (T,B) -> −Σ ln P(target) over the block (0-d, nats): the output layer's own
        loss where it is exactly that (forward_is_nll: full softmax with cross-entropy, class, hsm),
        else from its exactly normalized log_probs."""
        H, features = self.forward(inputs)
        T, B, m = H.shape
        output, flat, y = self.net.output, H.view(T * B, m), targets.reshape(-1)
        if getattr(output, "forward_is_nll", False):  # −Σ ln P(y), without all V probabilities
            direct = {} if features is None else {"features": features}
            return output.forward(self.params, flat, y, **direct)[0]
        return -self.net.log_probs(self.params, flat, features).gather(1, y.unsqueeze(1)).sum()

    @torch.no_grad()
    def loss_and_grads(self, inputs: Tensor, targets: Tensor, grads: dict[str, Tensor] | None = None,
                       **options) -> tuple[Tensor, dict[str, Tensor]]:
        """One BPTT sweep over the block from the carried state (a constant: no gradient flows into
        it) -> (loss, grads); the state moves past the block. options: those of sweep.loss_and_grads."""
        loss, grads, self.state = loss_and_grads(self.net, self.params, inputs, targets, self.state, grads=grads,
                                                 **options)
        return loss, grads
