"""Learning-rate schedules, driven by the validation entropy after each epoch: Mikolov's (rnnlm's
halving) and a plateau schedule. Each returns a Decision: scale the rate, stop, keep or undo the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bptt import checks


@dataclass(frozen=True)
class Decision:
    """What a schedule decides after an epoch's validation.

    lr_scale: multiply the current learning rate by this for the next epoch.
    stop: end training now.
    accept: keep this epoch's weights; False means restore the last accepted weights.
    """

    lr_scale: float
    stop: bool
    accept: bool


class MikolovSchedule:
    """rnnlm's (Mikolov's) rule, driven by the validation entropy after each epoch.

    Let ratio = prev / new, where prev is the entropy of the last accepted epoch.
    - An epoch whose entropy is worse than prev (new > prev) is rejected (accept=False): the caller
      restores the previous weights. prev then stays the accepted entropy (rnnlm overwrites it with
      the rejected value; keeping the entropy of the weights actually kept is the consistent choice).
    - Not yet halving: if ratio < min_improvement, halving starts (lr_scale=factor from this epoch on).
    - Halving: lr_scale=factor every epoch; if ratio < min_improvement again, stop=True.
    factor is rnnlm's 0.5; a larger one (0.6, 0.7) anneals more slowly, over more epochs.
    The first call only records the entropy (accept, lr_scale=1, no stop).
    """

    def __init__(self, min_improvement: float = 1.003, factor: float = 0.5):
        self.min_improvement = float(min_improvement)
        self.factor = checks.number("factor", factor, 0, 1, low_open=True, high_open=True)
        self.prev: float | None = None
        self.halving = False

    def update(self, valid_entropy: float) -> Decision:
        new = float(valid_entropy)
        if self.prev is None:
            self.prev = new
            return Decision(1.0, False, True)
        accept = new <= self.prev
        small = new * self.min_improvement > self.prev  # prev/new < min_improvement, without dividing by 0
        if accept:
            self.prev = new
        if small:
            if self.halving:
                return Decision(1.0, True, accept)
            self.halving = True
        return Decision(self.factor if self.halving else 1.0, False, accept)

    def state_dict(self) -> dict[str, Any]:
        return {"min_improvement": self.min_improvement, "factor": self.factor, "prev": self.prev,
                "halving": self.halving}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.min_improvement = float(d["min_improvement"])
        self.factor = float(d.get("factor", 0.5))  # states saved before the factor was an option: rnnlm's
        self.prev = None if d["prev"] is None else float(d["prev"])
        self.halving = bool(d["halving"])


class StepSchedule:
    """Zaremba et al.'s (2014) fixed decay: the rate stays for the first `start` epochs, then is multiplied
    by `factor` after every epoch. Every epoch is accepted and the schedule never stops a run (the epochs
    end it); the trainer still keeps the best weights on valid."""

    def __init__(self, start: int = 4, factor: float = 0.5):
        self.start = checks.non_negative_int("start", start)
        self.factor = checks.number("factor", factor, 0, 1, low_open=True, high_open=True)
        self.epochs = 0

    def update(self, valid_entropy: float) -> Decision:
        self.epochs += 1
        return Decision(self.factor if self.epochs >= self.start else 1.0, False, True)

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "factor": self.factor, "epochs": self.epochs}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.start, self.factor, self.epochs = int(d["start"]), float(d["factor"]), int(d["epochs"])


class PlateauSchedule:
    """Divide the learning rate on a plateau, stop early after max_decays decays.

    An epoch improves when best / new > min_improvement (best: lowest accepted entropy so far);
    it is accepted when new <= best (otherwise the caller restores the best weights). After more
    than `patience` consecutive epochs without improvement the learning rate is multiplied by
    `factor` (lr_scale=factor) and the count restarts. A plateau that would need decay number
    max_decays + 1 stops training instead (max_decays=None: never stop).
    """

    def __init__(self, factor: float = 0.25, patience: int = 0, min_improvement: float = 1.0,
                 max_decays: int | None = None):
        self.factor = checks.number("factor", factor, 0, 1, low_open=True, high_open=True)
        self.patience = checks.non_negative_int("patience", patience)
        self.min_improvement = float(min_improvement)
        self.max_decays = None if max_decays is None else int(max_decays)
        self.best: float | None = None
        self.bad_epochs = 0
        self.decays = 0

    def update(self, valid_entropy: float) -> Decision:
        new = float(valid_entropy)
        if self.best is None:
            self.best = new
            return Decision(1.0, False, True)
        improved = new * self.min_improvement < self.best
        accept = new <= self.best
        if accept:
            self.best = new
        if improved:
            self.bad_epochs = 0
            return Decision(1.0, False, accept)
        self.bad_epochs += 1
        if self.bad_epochs <= self.patience:
            return Decision(1.0, False, accept)
        self.bad_epochs = 0
        if self.max_decays is not None and self.decays >= self.max_decays:
            return Decision(1.0, True, accept)
        self.decays += 1
        return Decision(self.factor, False, accept)

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "patience": self.patience, "min_improvement": self.min_improvement,
                "max_decays": self.max_decays, "best": self.best, "bad_epochs": self.bad_epochs,
                "decays": self.decays}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.factor = float(d["factor"])
        self.patience = int(d["patience"])
        self.min_improvement = float(d["min_improvement"])
        self.max_decays = None if d["max_decays"] is None else int(d["max_decays"])
        self.best = None if d["best"] is None else float(d["best"])
        self.bad_epochs = int(d["bad_epochs"])
        self.decays = int(d["decays"])
