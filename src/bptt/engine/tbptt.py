"""Truncated BPTT for training on a stream: Williams & Peng's BPTT(k2; k1), rnnlm's bptt/bptt-block.

The stream (B parallel streams) is processed in blocks of k1 steps. After each block, one backward
sweep runs over the last k2 >= k1 steps: the errors of the block's k1 positions are sent back through
the block and through the k2 − k1 steps before it, kept from earlier blocks (their caches as they were
computed: the states, gates and dropout masks of the time; the backward through them uses the current
weights, as rnnlm's does, and an embedding's output is recomputed from the current embedding). The state
is carried from block to block.

    k1 = k2 = K            PyTorch's word_language_model (--bptt K): each block back-propagated alone
    k1 = K, k2 = K + N     rnnlm's `-bptt N -bptt-block K`: every error goes back at least N steps
    truncation = k         additionally cap every error's path at k recurrent connections

Cost per block: one forward of k1 steps, one output layer over k1·B positions, one backward sweep of
k2 steps (k products of (k2·B, m)×(m, m) with a truncation cap k instead).

A block is the engine's sweep (sweep.loss_and_grads) with a longer backward: the block run from the
carried state by the streaming helper (stream.Stream.advance), the output layer's errors, the AR/TAR
penalties, then the network's backward over the window made of the kept history and the block
(network.join), of which the last k2 − k1 steps are kept (network.tail); then the state after the
block is carried (Stream.carry).
"""

from __future__ import annotations

import torch

from bptt.checks import optional_int, positive_int
from bptt.engine.cells import CellCache
from bptt.engine.dropout import Masks
from bptt.engine.network import NetCache, State
from bptt.engine.regularizers import activation_penalty_backward, check_strengths
from bptt.engine.stream import Stream
from bptt.engine.sweep import output_errors, zero_

Tensor = torch.Tensor


class TruncatedBPTT:
    """BPTT(k1, k2) over a model's network; `step` returns the block's loss and grads.

    model: anything with `net` (engine.network.Network), `params` and `zero_grads()` (a model of
    bptt.model), and optionally `prepare(inputs, targets, mask)` to check a block.
    """

    def __init__(self, model, k1: int, k2: int | None = None, truncation: int | None = None,
                 ar: float = 0.0, tar: float = 0.0, generator: torch.Generator | None = None):
        k1 = positive_int("k1 (block length)", k1)
        k2 = k1 if k2 is None else k2
        if isinstance(k2, bool) or not isinstance(k2, int) or k2 < k1:
            raise ValueError(f"k2 (backward window) must be an integer >= k1 = {k1}, got {k2!r}")
        self.model, self.k1, self.k2 = model, k1, k2
        self.truncation = optional_int("truncation", truncation)
        self.ar, self.tar = check_strengths(ar, tar)  # AR/TAR on each block's top-layer states (regularizers.py)
        self.grads = model.zero_grads()  # reused buffers, refilled by every step
        self.check_inputs = True  # step() has the model check each block's word ids (model.prepare)
        # the dropout masks' source (None: no dropout); its state is part of state_dict, so that a
        # resumed run draws the same masks
        self.generator = generator
        # (start, stop, total): the blocks are the streams start:stop of a batch of `total` (data-parallel
        # training, training/distributed.py); the masks are drawn for the whole batch and these columns kept,
        # so that each part of the batch is dropped exactly as in one process. None: the block is the batch.
        self.columns: tuple[int, int, int] | None = None
        # masks drawn by the caller ahead of the step and read from fixed tensors (a step replayed as a CUDA
        # graph, training/step.py StaticTrainStep), used instead of fresh ones; None: step() draws its own
        self.fixed_masks: Masks | None = None
        self.reset()

    def masks(self, T: int, B: int) -> Masks | None:
        """Fresh dropout masks for a block of T steps and B streams, or None (no generator, no dropout).
        With `columns` set, the masks of the whole batch (T, total, n) are drawn and columns start:stop kept."""
        if self.generator is None:
            return None
        flat = self.model.flat.data
        if self.columns is None:
            return self.model.net.draw_masks(T, B, self.generator, dtype=flat.dtype, device=flat.device)
        start, stop, total = self.columns
        if stop - start != B or not 0 <= start <= stop <= total:
            raise ValueError(f"a block of {B} streams is not the columns {start}:{stop} of a batch of {total}")
        masks = self.model.net.draw_masks(T, total, self.generator, dtype=flat.dtype, device=flat.device)
        return None if masks is None else {site: m[:, start:stop] for site, m in masks.items()}

    def reset(self) -> None:
        """Forget the carried state and the history (start of a new stream)."""
        if not hasattr(self, "stream"):
            self.stream: Stream | None = None  # runs the blocks and carries the state (engine/stream.py)
        self._restart = True  # the next block starts from the zero state
        self.history: NetCache | None = None  # the last k2 − k1 steps before the next block

    @property
    def restarting(self) -> bool:
        """True until the first block of a new stream (after reset()) has started it."""
        return self.stream is None or self._restart

    @property
    def state(self) -> State | None:
        """The state after the last block (None before the first)."""
        return None if self.stream is None else self.stream.state

    def start(self, batch_size: int) -> State:
        """The zero state of B parallel streams, as the carried state.

        With k2 = k1 (no history kept) the state is carried *in place* (Stream(in_place=True)): every
        block's final state is copied into the same tensors, and a new stream of the same width zeroes
        them, so that a step captured as a CUDA graph reads and writes the state at fixed addresses.
        """
        if self.stream is None:
            self.stream = Stream(self.model, batch_size, in_place=self.k2 == self.k1)
        else:
            self.stream.start(batch_size)
        self._restart = False
        return self.stream.state

    def state_dict(self) -> dict[str, Tensor]:
        """The carried state and history as tensors (empty at the start of a stream), for checkpoints.

        Keys: the state's ("state.{layer}.{i}", "context"), and the history's inputs ("hist.inputs"),
        and per layer its start state ("hist.{layer}.state0.{i}") and cached steps ("hist.{layer}.{name}"),
        its dropout masks ("hist.mask.{site}"), and the dropout generator's state ("dropout_rng")."""
        carried = self.state is not None and not self._restart
        out = {k: t.clone() for k, t in self.state.tensors().items()} if carried else {}
        if self.generator is not None:
            out["dropout_rng"] = self.generator.get_state()
        if self.history is not None:
            out["hist.inputs"] = self.history.inputs.clone()
            for k, cache in enumerate(self.history.layers):
                out.update({f"hist.{k}.state0.{i}": t.clone() for i, t in enumerate(cache.state0)})
                out.update({f"hist.{k}.{name}": t.clone() for name, t in cache.steps.items()})
            out.update({f"hist.mask.{site}": t.clone(memory_format=torch.contiguous_format) for site, t in (self.history.masks or {}).items()})
        return out

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Inverse of state_dict; also reads the keys of checkpoints written before the redesign (a
        one-layer Elman model: "state", "hist_inputs", "hist_S", "hist_start")."""
        d = _legacy_keys(d)
        if self.generator is not None and "dropout_rng" in d:
            self.generator.set_state(d["dropout_rng"].cpu())
        loaded = State.from_tensors(d)
        self.reset()
        if loaded is not None:
            if self.stream is None or self.stream.state.batch_size != loaded.batch_size:
                self.start(loaded.batch_size)  # the carried tensors, then the loaded values into them
            self.stream.carry(loaded)
            self._restart = False
        if "hist.inputs" in d:
            layers = []
            for k in range(len(self.model.net.cells)):
                state0, i = [], 0
                while f"hist.{k}.state0.{i}" in d:
                    state0.append(d[f"hist.{k}.state0.{i}"])
                    i += 1
                lead = f"hist.{k}."
                steps = {key[len(lead):]: t for key, t in d.items() if key.startswith(lead) and ".state0." not in key}
                layers.append(CellCache(tuple(state0), steps))
            masks = {key.removeprefix("hist.mask."): t for key, t in d.items() if key.startswith("hist.mask.")}
            self.history = NetCache(d["hist.inputs"], layers, masks=masks or None)

    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """inputs, targets (T,B) with T <= k1 -> (loss of the block 0-d, grads). grads is reused."""
        model = self.model
        weights = mask
        if hasattr(model, "prepare"):
            inputs, targets, weights = model.prepare(inputs, targets, mask, check=self.check_inputs)
        T, B = inputs.shape
        if T > self.k1:
            raise ValueError(f"a block has at most k1 = {self.k1} steps, got {T}")
        if self.state is None or self._restart:
            self.start(B)
        elif self.state.batch_size != B:
            raise ValueError(f"the stream has {self.state.batch_size} parallel streams, this block has {B}; call reset()")
        net, params = model.net, model.params
        zero_(self.grads)
        masks = self.fixed_masks if self.fixed_masks is not None else self.masks(T, B)
        H, new_state, cache = self.stream.advance(inputs, masks)
        loss, dH = output_errors(net.output, params, H, targets, self.grads, weights=weights, features=cache.features)
        if self.ar or self.tar:  # the block's own states only; the carried history has no new errors
            activation_penalty_backward(H, weights, self.ar, self.tar, dH)
        if self.history is not None:
            window = net.join(self.history, cache)
            dH = torch.cat((torch.zeros_like(self.history.layers[-1].steps["H"]), dH))  # history: no new errors
        else:
            window = cache
        net.backward(params, window, dH, self.grads, self.truncation)
        keep = min(self.k2 - self.k1, window.length)
        self.history = net.tail(window, keep) if keep > 0 else None
        self.stream.carry(new_state)  # after the backward, which read the state the block started from
        return loss, self.grads


def stream_dim(key: str) -> int | None:
    """The dimension of a state_dict() tensor that runs over the B parallel streams: 0 for the carried
    state (B,m) and the history's start states, 1 for the time-major ones (the direct connections' context
    (K−1,B), the history's inputs (T,B), cached steps and masks (T,B,…)); None for what all streams share
    (the dropout generator). Data-parallel training joins and splits the state along it."""
    if key == "dropout_rng":
        return None
    if key.startswith("state") or ".state0." in key or key == "hist_start":  # "state" and "hist_start": legacy
        return 0
    return 1


def _legacy_keys(d: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint keys of the one-layer Elman engine before the redesign -> today's."""
    renames = {"state": "state.0.0", "hist_inputs": "hist.inputs", "hist_S": "hist.0.H", "hist_start": "hist.0.state0.0"}
    return {renames.get(k, k): t for k, t in d.items()}
