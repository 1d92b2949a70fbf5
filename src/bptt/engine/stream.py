"""Running a model over a stream of tokens: the one helper behind evaluation, scoring, sampling,
dynamic evaluation, the demo's grammar check and truncated BPTT's carried state.

A `Stream` holds the state a model carries from one block to the next (every layer's state and the
direct connections' context, engine.network.State) and runs blocks through the network:
`forward` gives the top layer's output and the direct features of the block's positions,
`log_probs` the exactly normalized log-probabilities, `nll` −Σ ln P of given targets, `loss_and_grads`
a BPTT sweep within the block (the carried state a constant). A caller that runs its own backward
(TruncatedBPTT) takes the two halves apart: `advance` runs a block from the carried state and returns
the state after it without carrying it, `carry` makes it the carried state once the backward has read
the old one. With in_place=True the state lives in fixed tensors — each block's final state is copied
into them, a new stream of the same width zeroes them — which is what a step captured as a CUDA graph
needs. `token_blocks` cuts a 1-D token array into the (inputs, targets) blocks of one stream whose
history starts at <eos>.

Shapes: T time, B streams, m hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from bptt.engine.dropout import Masks
from bptt.checks import positive_int
from bptt.engine.inputs import check_word_ids, integer_ids
from bptt.engine.network import NetCache, State
from bptt.engine.sweep import loss_and_grads

Tensor = torch.Tensor


def token_blocks(ids, eos_id: int, block: int, device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """ids (N,) int -> blocks (x (T,1), y (T,1)) int64 of one stream: y are the N tokens, x the tokens
    before them, the first being <eos> (the history a corpus starts from); T = block but the last.

    Lazy: ids (an array or a read-only np.memmap, any integer dtype) is read block by block, T + 1
    tokens converted to int64 at a time, never copied whole."""
    ids = np.asarray(ids).reshape(-1)
    for start in range(0, len(ids), block):
        y = ids[start : start + block]
        x_first = ids[start - 1 : start] if start else np.array([eos_id])
        window = torch.from_numpy(np.concatenate((x_first, y)).astype(np.int64)).to(device)  # (T + 1,)
        yield window[:-1].unsqueeze(1), window[1:].unsqueeze(1)


class Stream:
    """B parallel streams of one model; `state` is carried from block to block (None: start from zero).

    in_place=True: the state is carried in the same tensors from block to block (see the module doc)."""

    def __init__(self, model, batch_size: int = 1, state: State | None = None, *, in_place: bool = False):
        self.model = model
        self.net, self.params = model.net, model.params
        self.in_place = in_place
        if state is None:
            positive_int("batch_size", batch_size)
        self.state: State = state if state is not None else self._zero_state(batch_size)

    def _check(self, inputs: Tensor, targets: Tensor | None = None) -> None:
        """A ValueError naming the argument, before the state moves: not (T,B) integer ids of this stream's
        B streams (and, on the CPU, where reading them costs no device sync, ids outside [0, V))."""
        V, B = self.net.vocab_size, self.state.batch_size
        for name, t in (("inputs", inputs), ("targets", targets)):
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.dim() != 2 or not integer_ids(t):
                raise ValueError(f"{name} must be an integer tensor of shape (T, B), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if t.shape[1] != B:
                raise ValueError(f"{name} has {t.shape[1]} streams, this stream {B}")
            if t.device.type == "cpu":
                check_word_ids(name, t, V)
        if targets is not None and targets.shape != inputs.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the same shape")

    def _zero_state(self, batch_size: int) -> State:
        state = self.net.initial_state(self.params, batch_size)
        if self.in_place and self.net.direct:  # the history <eos> as a tensor, to be copied into
            device = state.hidden.device
            eos = self.net.next_context(torch.zeros(0, batch_size, dtype=torch.long, device=device), None)
            state = State(state.layers, eos)
        return state

    def start(self, batch_size: int) -> State:
        """A new stream of B parallel streams from the zero state (the history <eos>): in place when the
        state is carried in place and has that width already."""
        if self.in_place and self.state.batch_size == batch_size:
            for layer in self.state.layers:
                for t in layer:
                    t.zero_()
            if self.state.context is not None:
                self.state.context.fill_(0)  # <eos> (EOS_ID 0)
        else:
            self.state = self._zero_state(batch_size)
        return self.state

    def advance(self, inputs: Tensor, masks: Masks | None = None) -> tuple[Tensor, State, NetCache]:
        """inputs (T,B), dropout masks|None -> (H (T,B,m), the state after the block, its cache) from the
        carried state, which is not replaced yet: call carry(state) when nothing reads the old one any more."""
        return self.net.forward(self.params, inputs, self.state, masks)

    def carry(self, new: State) -> None:
        """The state after a block becomes the carried state: copied into the carried tensors
        (in_place), else into fresh ones. Not views into the block's tensors: the next block's first
        product reads the state, and BLAS may round a product differently when an operand sits at another
        offset from a 64-byte boundary; a resumed run loads the state into fresh (aligned) tensors, so with
        views it would not be bit-identical (tests/test_train.py, "bptt-block-unaligned")."""
        if not self.in_place:
            self.state = new.map(torch.clone)
            return
        for old_layer, new_layer in zip(self.state.layers, new.layers):
            for old, value in zip(old_layer, new_layer):
                old.copy_(value)
        if self.state.context is not None:
            if new.context is None:
                self.state.context.fill_(0)  # the history <eos> (EOS_ID 0)
            else:
                self.state.context.copy_(new.context)

    @torch.no_grad()
    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """inputs (T,B) int64 on the model's device -> (H (T,B,m), direct features (T·B,K)|None); the
        state moves past the block."""
        H, state, cache = self.advance(inputs)
        self.carry(state)
        return H, cache.features

    @torch.no_grad()
    def log_probs(self, inputs: Tensor) -> Tensor:
        """inputs (T,B) -> log P(w | history) (T,B,V) in nats, exactly normalized over the vocabulary."""
        self._check(inputs)
        H, features = self.forward(inputs)
        T, B, m = H.shape
        return self.net.log_probs(self.params, H.view(T * B, m), features).view(T, B, -1)

    @torch.no_grad()
    def nll(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """inputs, targets (T,B) -> −Σ ln P(target) over the block (0-d, nats): the output layer's own
        loss where it is exactly that (forward_is_nll: full softmax with cross-entropy, class, hsm),
        else from its exactly normalized log_probs."""
        self._check(inputs, targets)
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
        self._check(inputs, targets)
        loss, grads, state = loss_and_grads(self.net, self.params, inputs, targets, self.state, grads=grads,
                                            **options)
        self.carry(state)
        return loss, grads
