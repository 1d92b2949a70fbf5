"""Divergence handling, in one place: when a step is not applied, and when a run is declared diverged.

A step whose loss is not finite, whose gradient norm (of the per-token mean gradient, before
clipping) is not finite, or whose norm exceeds --max-grad-norm (when > 0) is not kept: the trainer
returns to the last saved state (weights, optimizer, schedule, data position, random generators),
halves the learning rate and goes on (Trainer._rollback). Every rollback is an event in
metrics.jsonl ("event": "rollback") and a line on stderr; MAX_ROLLBACKS of them in a row, without a
good checkpoint in between, stop the run ("event": "diverged", TrainingDiverged, exit code 1). A
checkpoint whose state holds NaN or Inf is never written: the trainer rolls back instead.
"""

from __future__ import annotations

import math

import torch

MAX_ROLLBACKS = 5  # rollbacks in a row (no good checkpoint in between) before the run is declared diverged
ROLLBACK_LR_SCALE = 0.5


class TrainingDiverged(ValueError):
    """MAX_ROLLBACKS rollbacks in a row; the one-line message says where the last good state is."""


def step_fault(loss: float, norm: float, max_grad_norm: float) -> str | None:
    """Why a step must not be applied, or None: a non-finite loss or gradient norm, or a norm above the
    bound (max_grad_norm > 0)."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if not math.isfinite(norm):
        return f"non-finite gradients (norm {norm})"
    if max_grad_norm > 0 and norm > max_grad_norm:
        return f"gradient norm {norm:.4g} above --max-grad-norm {max_grad_norm:g}"
    return None


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """No NaN or Inf in any floating-point tensor (a state that may be checkpointed)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


class RollbackCounter:
    """Rollbacks in a row since the last good checkpoint, and the events they make."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def good_checkpoint(self) -> None:
        self.in_a_row = 0

    def rollback(self, reason: str, *, epoch: int, fault_step: int, restored_step: int, lr: float) -> dict:
        """Count one rollback -> its event record; "event" is "diverged" for the MAX_ROLLBACKS-th in a row."""
        self.in_a_row += 1
        event = "diverged" if self.diverged else "rollback"
        return {"event": event, "epoch": epoch, "global_step": fault_step, "reason": reason,
                "restored_step": restored_step, "lr": lr}

    @property
    def diverged(self) -> bool:
        return self.in_a_row >= MAX_ROLLBACKS
