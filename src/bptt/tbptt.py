"""Truncated BPTT for training on a stream: Williams & Peng's BPTT(k2; k1), rnnlm's bptt/bptt-block.

The stream (B parallel streams) is processed in blocks of k1 steps. After each block, one backward
sweep runs over the last k2 >= k1 steps: the errors of the block's k1 positions are sent back through
the block and through the k2 − k1 steps before it, kept from earlier blocks (their states as they were
computed, with the weights of the time). The hidden state is carried from block to block.

    k1 = k2 = K            PyTorch's word_language_model (--bptt K): each block back-propagated alone
    k1 = K, k2 = K + N     rnnlm's `-bptt N -bptt-block K`: every error goes back at least N steps
    truncation = k         additionally cap every error's path at k recurrent connections

Cost per block: one forward of k1 steps, one output layer over k1·B positions, one backward sweep of
k2 steps (k products of (k2·B, m)×(m, m) with a truncation cap k instead).
"""

from __future__ import annotations

import torch

from bptt.engine import output_errors, zeros_like_params
from bptt.regularizers import activation_penalty_backward, check_strengths

Tensor = torch.Tensor


class TruncatedBPTT:
    """BPTT(k1, k2) over a model's cell and output layer; `step` returns the block's loss and grads."""

    def __init__(self, model, k1: int, k2: int | None = None, truncation: int | None = None,
                 ar: float = 0.0, tar: float = 0.0):
        if isinstance(k1, bool) or not isinstance(k1, int) or k1 < 1:
            raise ValueError(f"k1 (block length) must be a positive integer, got {k1!r}")
        k2 = k1 if k2 is None else k2
        if isinstance(k2, bool) or not isinstance(k2, int) or k2 < k1:
            raise ValueError(f"k2 (backward window) must be an integer >= k1 = {k1}, got {k2!r}")
        if truncation is not None and (not isinstance(truncation, int) or truncation < 0):
            raise ValueError(f"truncation must be a non-negative integer or None, got {truncation!r}")
        self.model, self.k1, self.k2, self.truncation = model, k1, k2, truncation
        self.ar, self.tar = check_strengths(ar, tar)  # AR/TAR on each block's states (regularizers.py)
        self.grads = zeros_like_params(model.params)  # reused buffers, refilled by every step
        self.reset()

    def reset(self) -> None:
        """Forget the carried state and the history (start of a new stream)."""
        self.state: Tensor | None = None  # s at the end of the last block, (B,m)
        self._hist_inputs: Tensor | None = None  # (h,B) inputs of the kept history steps
        self._hist_S: Tensor | None = None  # (h,B,m) their states
        self._hist_start: Tensor | None = None  # (B,m) the state before the history
        self.context: Tensor | None = None  # (K−1,B) the last input words, for maxent direct connections

    def state_dict(self) -> dict[str, Tensor]:
        """The carried state and history as tensors (empty at the start of a stream), for checkpoints."""
        parts = {"state": self.state, "hist_inputs": self._hist_inputs, "hist_S": self._hist_S,
                 "hist_start": self._hist_start, "context": self.context}
        return {k: v.clone() for k, v in parts.items() if v is not None}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.reset()
        self.state = d.get("state")
        self._hist_inputs, self._hist_S = d.get("hist_inputs"), d.get("hist_S")
        self._hist_start = d.get("hist_start")
        self.context = d.get("context")

    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """inputs, targets (T,B) with T <= k1 -> (loss of the block 0-d, grads). grads is reused."""
        model = self.model
        inputs, targets, weights = model.prepare(inputs, targets, mask)
        T, B = inputs.shape
        if T > self.k1:
            raise ValueError(f"a block has at most k1 = {self.k1} steps, got {T}")
        if self.state is not None and self.state.shape[0] != B:
            raise ValueError(f"the stream has {self.state.shape[0]} parallel streams, this block has {B}; call reset()")
        if self.state is None:
            self.state = model.initial_state(B)
            self._hist_start = self.state
        for g in self.grads.values():
            g.zero_()
        params, cell = model.params, model.cell
        S = cell.forward(params, inputs, self.state)
        features = model.direct_features(inputs, self.context)  # None without direct connections
        loss, dS = output_errors(model.output, params, S, targets, weights, self.grads, features)
        if self.ar or self.tar:  # the block's own states only; the carried history has no new errors
            activation_penalty_backward(S, weights, self.ar, self.tar, dS)
        self.context = model.next_context(inputs, self.context)
        if self._hist_S is not None:
            win_inputs = torch.cat((self._hist_inputs, inputs))
            win_S = torch.cat((self._hist_S, S))
            win_dS = torch.cat((torch.zeros_like(self._hist_S), dS))  # history positions: no new errors
        else:
            win_inputs, win_S, win_dS = inputs, S, dS
        cell.backward(params, win_inputs, self._hist_start, win_S, win_dS, self.grads, self.truncation)
        keep = min(self.k2 - self.k1, win_inputs.shape[0])
        if keep > 0:
            cut = win_inputs.shape[0] - keep
            self._hist_start = win_S[cut - 1] if cut > 0 else self._hist_start
            self._hist_inputs, self._hist_S = win_inputs[cut:], win_S[cut:]
        else:
            self._hist_start = S[-1]
        self.state = S[-1]
        return loss, self.grads
