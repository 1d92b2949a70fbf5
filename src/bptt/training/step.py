"""One training step on a block, the same for every caller (the trainer, sentence mode, `bptt bench`):

    gradients   the engine: BPTT(k1, k2) with the state carried across blocks (engine/tbptt.py), or,
                for sentences (--independent), one sweep from the zero state (engine/sweep.py)
    rows        with row-sparse updates (training/sparse_rows.py), the rows of the word-indexed matrices
                the block wrote, gathered
    reduction   where data-parallel training combines the gradients of several processes: one
                all-reduce of the flat gradient buffer (training/distributed.py, GradientSum; the
                identity in one process; with model averaging, LocalSteps, only the loss and tokens)
    mean        the gradients divided by the block's counted tokens
    clipping    to a global norm (the norm before clipping is returned, for the divergence checks)
    update      the optimizer's rule over the flat parameter buffer

compute() does the first four and reads the loss and the norm back to the host (one synchronisation);
apply(lr) does the update. The trainer checks the two numbers in between (training/divergence.py).

StaticTrainStep is the same step in the form a CUDA graph can capture (`bptt train --graph`): the
block copied into static input buffers, the carried state updated in place (engine/tbptt.py, k2 = k1),
the learning rate and the optimizer's step count as tensors on the device, and the update inside the
step — so the whole step, update included, is one replay of a graph (training/cuda_graph.py), and the
loss and the norm are read after it. On the CPU the same static step runs eagerly; it gives the plain
step's numbers bit for bit (tests/test_graph_step.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bptt.engine.dropout import Masks
from bptt.engine.flat import Flat
from bptt.engine.sweep import loss_and_grads
from bptt.engine.tbptt import TruncatedBPTT
from bptt.training.cuda_graph import GraphedStep
from bptt.training.optim import Optimizer, clip_grad_norm_
from bptt.training.sparse_rows import RowSparseGrads

Tensor = torch.Tensor

# (flat gradients, summed loss, counted tokens) -> (loss, tokens) over every process, gradients summed in place
Reduction = Callable[[Flat, Tensor, int], tuple[Tensor, int]]


def read_back(loss: Tensor, norm: Tensor) -> tuple[float, float]:
    """The step's loss and gradient norm as Python floats: one synchronisation with the device."""
    loss_value, norm_value = torch.stack(
        [loss.detach().to(torch.float64).reshape(()), norm.to(loss.device, torch.float64)]
    ).tolist()
    return loss_value, norm_value


def no_reduction(grads: Flat, loss: Tensor, tokens: int) -> tuple[Tensor, int]:
    """One process: the gradients, the loss and the token count are already the whole batch's."""
    return loss, tokens


class TrainStep:
    """A model's training step; independent=True for sentence batches (every sentence from the zero
    state, padding masked), else continuous streams with BPTT(k1, k2) and the state carried."""

    def __init__(self, model, optimizer: Optimizer, *, k1: int, k2: int, truncation: int | None = None,
                 ar: float = 0.0, tar: float = 0.0, clip: float = 0.0, independent: bool = False,
                 check_inputs: bool = True, reduce: Reduction = no_reduction,
                 generator: torch.Generator | None = None):
        self.model, self.optimizer = model, optimizer
        self.independent, self.truncation, self.clip = independent, truncation, clip
        self.check_inputs = check_inputs
        self.engine = TruncatedBPTT(model, k1, k2, truncation, ar, tar, generator)  # generator: dropout's masks
        self.engine.check_inputs = check_inputs
        if optimizer.sparse_rows:  # the optimizer updates these matrices row by row: gradients that keep rows
            self.engine.grads = RowSparseGrads(model.flat, optimizer.sparse_rows)
        self.grads: Flat = self.engine.grads
        self.reduce = reduce

    @property
    def ar(self) -> float:
        return self.engine.ar

    @property
    def tar(self) -> float:
        return self.engine.tar

    def set_penalties(self, ar: float, tar: float) -> None:
        self.engine.ar, self.engine.tar = ar, tar

    def gradients(self, x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, int]:
        """The block's summed loss (0-d) and its counted tokens; the gradients (sums) in self.grads."""
        if not self.independent:
            loss, _ = self.engine.step(x, y)
            return loss, y.numel()
        model = self.model
        x, y, weights = model.prepare(x, y, mask, check=self.check_inputs)
        state = model.zero_state(x.shape[1])  # every sentence starts from s^0 = 0
        loss, _, _ = loss_and_grads(model.net, model.params, x, y, state, truncation=self.truncation,
                                    weights=weights, grads=self.grads, ar=self.ar, tar=self.tar,
                                    masks=self.engine.masks(*x.shape))
        return loss, int(mask.sum())

    def forward_backward(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """Gradients, reduction, mean over the counted tokens, clipping -> (loss 0-d, norm before clipping
        0-d, tokens): the loss summed over the block's tokens, the norm of the mean gradient, both on the
        device (nothing is read back to the host)."""
        loss, own = self.gradients(x, y, mask)
        grads = self.grads
        grads.gather_()  # row-sparse gradients: their matrices' rows (a no-op for a dense buffer)
        loss, tokens = self.reduce(grads, loss, own)
        # the mean over the block's counted tokens; model averaging (distributed.LocalSteps): this rank's own
        grads.div_(tokens if getattr(self.reduce, "sums_gradients", True) else max(own, 1))
        norm = clip_grad_norm_(grads, self.clip)
        grads.store_()
        return loss, norm, tokens

    def compute(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> tuple[float, float, int]:
        """forward_backward, with the loss and the norm read back to the host (one synchronisation)."""
        loss, norm, tokens = self.forward_backward(x, y, mask)
        return (*read_back(loss, norm), tokens)

    def discard(self) -> None:
        """Forget a rejected step's gradients, the whole buffer (row-sparse gradients otherwise zero only the
        rows the engine wrote: whatever else a fault left in the buffer goes too)."""
        self.grads.zero_()
        self.grads.data.zero_()

    def apply(self, lr: float) -> None:
        """The update rule over the parameters with the gradients of the last compute()."""
        self.optimizer.step(self.grads, lr)


class StaticTrainStep:
    """A TrainStep (continuous streams, k2 = k1) whose forward, backward, clipping and update run as one
    static step: captured as a CUDA graph on CUDA (capture=None: when the model is on CUDA), the same
    static step run eagerly otherwise. Blocks of another shape than the first (an epoch's last, short
    block) run the same operations eagerly.

    run(x, y, lr) -> (loss, norm before clipping, tokens), like TrainStep.compute, but the update has
    been applied: a caller that rejects the step restores the state it saved (the trainer's rollback
    does, in place: the graph keeps reading the same tensors).
    """

    def __init__(self, step: TrainStep, capture: bool | None = None):
        if step.independent or step.engine.k2 != step.engine.k1:
            raise ValueError("--graph needs continuous streams with k2 = k1 (no --independent, no --bptt-block)")
        self.step, self.capture = step, capture
        self.engine, self.optimizer = step.engine, step.optimizer
        data = step.model.flat.data  # the rate, read by the update: float64 on the CPU; on CUDA torch's fused
        # kernels take it in the parameters' dtype
        self.lr = torch.zeros((), dtype=torch.float64 if data.device.type == "cpu" else data.dtype, device=data.device)
        self.engine.check_inputs = False  # the caller checks the block on the host, before it is copied in
        self._graphed: GraphedStep | None = None
        self._shape: tuple[int, ...] | None = None
        self.captured: list[Tensor] = []
        self._masks: Masks | None = None  # dropout: the fixed tensors the step reads its masks from

    def _static_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss, norm, _ = self.step.forward_backward(x, y)
        self.optimizer.step(self.step.grads, self.lr)
        return loss, norm

    def _state(self) -> list[Tensor]:
        """Every tensor the step changes in place: the weights, the optimizer's buffers, the carried state."""
        return [self.step.model.flat.data, *self.optimizer.state_tensors(), *self.engine.state.tensors().values()]

    def _draw_masks(self, T: int, B: int) -> None:
        """Dropout: the block's masks drawn now, eagerly, from the engine's generator (the same draws, in the
        same order, as the plain step makes inside its step), into the fixed tensors the step reads; a
        variational mask keeps its layout, one (1,B,n) tensor expanded over T."""
        masks = self.engine.masks(T, B)
        if masks is None:
            return
        if self._masks is None:
            self._masks = {site: m[:1].clone().expand_as(m) if m.stride(0) == 0 else m.clone()
                           for site, m in masks.items()}
            self.engine.fixed_masks = self._masks
            return
        for site, m in masks.items():
            buffer = self._masks[site]
            if buffer.stride(0) == 0:
                buffer[:1].copy_(m[:1])  # the expanded tensor's one row
            else:
                buffer.copy_(m)

    def run(self, x: Tensor, y: Tensor, lr: float) -> tuple[float, float, int]:
        x, y, _ = self.step.model.prepare(x, y)  # the word-id check on the host's copy, then to the device
        T, B = x.shape
        if self.engine.restarting:
            self.engine.start(B)  # zeroes the carried state in place: the graph reads the same tensors
        self.lr.fill_(float(lr))
        if self._shape is None:
            self._shape = tuple(x.shape)
        if tuple(x.shape) != self._shape:  # another shape: the same operations, eagerly, fresh masks
            fixed, self.engine.fixed_masks = self.engine.fixed_masks, None
            try:
                loss, norm = self._static_step(x, y)
            finally:
                self.engine.fixed_masks = fixed
        else:
            self._draw_masks(T, B)  # before the graph is captured too: its warm-up steps read them
            if self._graphed is None:
                self.optimizer.load_state_dict(self.optimizer.state_dict())  # its buffers exist before the capture
                t = self.optimizer.t
                self.captured = self._state()  # the tensors the step reads and writes, from now on in place
                self._graphed = GraphedStep(self._static_step, (x, y), self.captured, capture=self.capture)
                self.optimizer.t = t  # the warm-up and capture steps were undone
            loss, norm = self._graphed(x, y)
            if self._graphed.graph is not None:
                self.optimizer.t += 1  # a replay runs no Python: count the step here
        return (*read_back(loss, norm), y.numel())
