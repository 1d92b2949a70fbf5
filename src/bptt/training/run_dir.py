"""A run directory: what `bptt train --model DIR` writes there, and how it is read back to resume.

    DIR/model.safetensors, config.json, vocab.json   the best model on valid (what eval, score and
                                                     generate read; storage/saved_model.py)
    DIR/checkpoint/                                  the whole training state, for --resume
    DIR/metrics.jsonl                                one JSON line per epoch (and per rollback event),
                                                     rewritten from the checkpoint, never ahead of it
    DIR/epochs/epoch-N/                              with --keep-epochs: each accepted epoch's model
                                                     (bptt average)

Every file is written atomically, the checkpoint's weights first (storage/checkpoint.py), so a run
killed at any instant leaves DIR and DIR/checkpoint loadable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bptt.files import atomic_write_bytes, remove_files_and_dir
from bptt.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bptt.storage.saved_model import VOCAB_FILE, VOCAB_SHA_KEY, WEIGHTS_FILE, file_sha256, refuse_pickle_files, save_model

STATE_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
EPOCHS_DIR = "epochs"
ROLLBACK_DIR = "rollback"  # DIR/checkpoint/rollback: a stopped run's rollback target (Trainer._checkpoint)
# what `bptt train --model DIR` writes directly in DIR (besides STATE_DIR/ and EPOCHS_DIR/)
RUN_FILES = (WEIGHTS_FILE, "config.json", VOCAB_FILE, METRICS_FILE)


def epoch_dir(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / EPOCHS_DIR / f"epoch-{int(epoch)}"


def kept_epochs(run_dir: str | Path) -> list[int]:
    """The epochs of a run kept by --keep-epochs, in order."""
    root = Path(run_dir) / EPOCHS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith("epoch-") and name[6:].isdigit():
            found.append(int(name[6:]))
    return sorted(found)


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_dir = self.path / STATE_DIR
        self.metrics_path = self.path / METRICS_FILE
        self.vocab_path = self.path / VOCAB_FILE

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def start_metrics(self) -> None:
        """An empty metrics.jsonl: a new run."""
        self.metrics_path.write_text("")

    def vocab_sha(self) -> str:
        return file_sha256(self.vocab_path)

    # -- the training state --------------------------------------------------------------------------

    def write_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        save_checkpoint(self.state_dir, tensors, state, transposed=True)  # U as stored: no copy

    @property
    def rollback_dir(self) -> Path:
        return self.state_dir / ROLLBACK_DIR

    def write_rollback_target(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """The state a rollback returns to, when a stop's save is not it (Trainer._checkpoint(stop=True))."""
        save_checkpoint(self.rollback_dir, tensors, state, transposed=True)

    def read_rollback_target(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        if not self.rollback_dir.is_dir():
            return None
        refuse_pickle_files(self.rollback_dir)
        return load_checkpoint(self.rollback_dir)

    def drop_rollback_target(self) -> None:
        """Remove DIR/checkpoint/rollback (a regular checkpoint is the rollback target again)."""
        if self.rollback_dir.is_dir() and not self.rollback_dir.is_symlink():
            remove_files_and_dir(self.rollback_dir)

    def write_metrics(self, records: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write_bytes(self.metrics_path, text.encode("utf-8"))

    def read_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The checkpoint's tensors and JSON state; CheckpointError (one line) for a pickle file in DIR or
        DIR/checkpoint, a torn or malformed checkpoint, or a vocab.json that is not the run's."""
        refuse_pickle_files(self.path)
        refuse_pickle_files(self.state_dir)
        tensors, state = load_checkpoint(self.state_dir)
        vocab_sha = state.get(VOCAB_SHA_KEY)  # absent in checkpoints written before it was recorded
        if vocab_sha is not None and vocab_sha != self.vocab_sha():
            raise CheckpointError(f"{self.vocab_path}: does not match the vocabulary this run was trained with "
                                  f"(sha256 in {self.state_dir / 'config.json'})")
        return tensors, state

    # -- models --------------------------------------------------------------------------------------

    def save_best(self, model, extra: dict) -> None:
        save_model(self.path, model, extra)

    def save_epoch(self, epoch: int, model, extra: dict, vocab) -> None:
        save_model(epoch_dir(self.path, epoch), model, extra, vocab)
