"""The training loop: epochs of blocks, validation after each, the learning-rate schedule, checkpoints.

Continuous mode (default): B parallel streams over the corpus, the state carried from block to
block, BPTT(k1, k2) with k1 = --bptt-block (default --bptt) and k2 = --bptt + --bptt-block when a
block is given (rnnlm's -bptt/-bptt-block), else k2 = --bptt (PyTorch's word_language_model).
Sentence mode (--independent, rnnlm's -independent): the state is reset at every sentence; sentences
are batched with padding masked out of the loss and the gradient.

Each block is one TrainStep (training/step.py): gradients (with the AR/TAR penalties of --ar/--tar on
the top layer's states, if given), averaged over the block's counted tokens, clipped to --clip
(global norm), and applied by the update rule (--optimizer; Adam by default: on Penn Treebank it
reaches in one epoch what SGD at lr 5 needs many for, see docs/results.md). The learning rate follows
Mikolov's schedule (training/schedules.py): after every epoch the valid entropy is measured; once its
relative improvement drops under --min-improvement the rate is multiplied by --halving-factor every
epoch, and training stops when it drops under it again (or, with --schedule plateau, the rate is
divided on a plateau and training stops early). The best model on valid is kept in DIR.

Where things live: the run directory's layout and files in run_dir.py; when a step is undone and
when a run has diverged in divergence.py; the configuration in config.py.

Reliability: every file is written atomically and each weights file carries its own config, so a
run killed at any instant (even SIGKILL, even mid-write) leaves DIR and DIR/checkpoint loadable, and
`bptt train --resume DIR` continues from the last checkpoint to the same weights as an uninterrupted
run. SIGINT (Ctrl-C) and SIGTERM stop at the next step boundary after saving the state (exit codes 130
and 143). A step whose loss or gradients are not finite, or whose gradient norm (per-token mean,
before clipping) exceeds --max-grad-norm, is not applied: the run rolls back to the last saved
state, halves the learning rate and goes on; 5 rollbacks in a row without a checkpoint in between
stop it (exit code 1). No checkpoint ever holds NaN or Inf.

Data-parallel training (training/distributed.py): under torchrun every rank runs a Trainer on its
share of the B streams and the same steps; the gradients are summed over the ranks inside the step,
rank 0 alone validates (the result is broadcast), prints and writes DIR, with the carried state of
every rank joined, so that a checkpoint is the one-process run's whatever the number of ranks. With
--average-every K (model averaging) each rank steps alone and the models are averaged every K steps,
before validation and before every checkpoint (_average).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from bptt.data import SentenceBatches, StreamBatches, Vocab, encode
from bptt.prepared import load_prepared
from bptt.evaluation import Evaluation, evaluate_corpus, perplexity_of
from bptt.model import build_model
from bptt.storage.checkpoint import CheckpointError, pack_state, rng_state, set_rng_state, unpack_state
from bptt.storage.saved_model import VOCAB_FILE, VOCAB_SHA_KEY
from bptt.training import distributed, sparse_rows
from bptt.training.config import TrainConfig
from bptt.training.divergence import (
    MAX_ROLLBACKS,
    ROLLBACK_LR_SCALE,
    RollbackCounter,
    TrainingDiverged,
    all_finite,
    step_fault,
)
from bptt.training.optim import make_optimizer
from bptt.training.resources import guard_training
from bptt.training.run_dir import STATE_DIR, RunDirectory
from bptt.engine.dropout import dropout_generator
from bptt.training.schedules import MikolovSchedule, PlateauSchedule, StepSchedule
from bptt.training.step import StaticTrainStep, TrainStep, no_reduction

__all__ = ["MAX_ROLLBACKS", "STATE_DIR", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "train"]


@dataclass
class TrainResult:
    best_valid: Evaluation
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    finished: bool = True  # False when stopped by max_steps or a signal (resume with --resume)
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
    events: list[dict] = field(default_factory=list)  # rollbacks, as in metrics.jsonl


def perplexity(bits: float) -> float:
    """2^bits, inf where that overflows (a diverging run, or an NCE objective far from a probability)."""
    return perplexity_of(bits * math.log(2))


ROLLBACK_FOR = "rollback_target_for_step"  # in a stop's rollback target: the step of the state it goes with


def _check_state_fields(state: dict) -> None:
    """TypeError/ValueError naming a checkpoint's scalar field of the wrong type (an edited config.json)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def flag(v):
        return isinstance(v, bool)

    kinds = {count: "a non-negative integer", number: "a finite number", flag: "true or false"}
    fields = {"epoch": count, "step_in_epoch": count, "global_step": count, "epoch_tokens": count,
              "epoch_nats": number, "epoch_seconds": number, "lr": number, "done": flag}
    for key, ok in fields.items():
        if not ok(state[key]):
            raise ValueError(f"{key} {str(state[key])[:40]!r} is not {kinds[ok]}")
    if not isinstance(state["history"], list) or not isinstance(state.get("events", []), list):
        raise ValueError("history and events must be lists")
    best = state["best_eval"]
    if best is not None:
        if not isinstance(best, dict):
            raise ValueError("best_eval is not an object")
        Evaluation(**best)  # TypeError for unknown or missing fields
        if not all(isinstance(best[k], (int, float)) and not isinstance(best[k], bool) for k in ("nats", "tokens")):
            raise ValueError("best_eval holds a non-number")


class Trainer:
    """One training run: model, optimizer, schedule, step and data position; saves and resumes.

    DIR/model.safetensors + DIR/config.json + DIR/vocab.json: the best model on valid. DIR/checkpoint/:
    the whole training state (current weights, best weights, optimizer buffers, the carried BPTT state,
    RNG state as tensors; config, epoch, step within the epoch, learning rate, schedule, metrics as
    JSON), written atomically every --checkpoint-every steps, at the end of every epoch, and when
    stopped; DIR/metrics.jsonl is rewritten from it, so it never holds an epoch the checkpoint does
    not. The last state saved is also kept in memory: a diverging step rolls back to it (train_step).
    """

    def __init__(self, config: TrainConfig, vocab: Vocab | None = None, *, backend: str | None = None,
                 dist_timeout: float | None = None):
        config.validate()
        if config.workdir is None:  # where relative corpus paths are read from, now and after --resume
            config.workdir = os.getcwd()
        self.config = config
        # data-parallel training under torchrun (training/distributed.py): the process group, this rank's
        # place; one process without torchrun's environment. backend, dist_timeout: --backend, --dist-timeout
        self.dist = distributed.setup(config.device, backend, dist_timeout)
        if self.dist.active:
            if config.graph:
                raise ValueError("--graph runs without a process group (its reduction is not captured): "
                                 "one process, without --backend")
            if config.batch < self.dist.world:
                raise ValueError(f"--batch {config.batch}: fewer streams than the {self.dist.world} processes "
                                 "(each runs a share of the B streams)")
        self.run_dir = RunDirectory(config.model)
        self.run_dir.create()
        self.out = self.run_dir.path
        prepared = None
        if config.data is not None:  # `bptt prepare`'s DATA: its vocabulary, its corpora memory-mapped
            prepared = load_prepared(config.data, expected_sha256=config.data_sha256)  # resume: the same DATA
            config.unit, config.min_count, config.max_vocab = prepared.unit, prepared.min_count, prepared.max_vocab
            config.data_sha256 = prepared.sha256
        if vocab is None:
            if prepared is not None:
                vocab = prepared.vocab
            else:
                vocab = Vocab.build(config.train, config.unit, config.min_count, config.max_vocab)
            if self.dist.is_main:  # one writer (several ranks: rank 0)
                vocab.save(self.run_dir.vocab_path)
        self.vocab = vocab
        # recorded in checkpoints, checked on resume; several ranks: rank 0's, once it has written the file
        self._vocab_sha = self.dist.broadcast(self.run_dir.vocab_sha() if self.dist.is_main else None)
        if prepared is not None:
            self.train_corpus, self.valid_corpus = prepared.split("train"), prepared.split("valid")
        else:
            self.train_corpus = encode(config.train, vocab, config.unit)
            self.valid_corpus = encode(config.valid, vocab, config.unit)
        model_config = config.model_config.with_vocab(len(vocab))
        guard_training(config, model_config, vocab, self.train_corpus, self.valid_corpus,  # refuse before allocating
                       **self._memory_share())
        torch.manual_seed(config.seed)
        self.model = build_model(model_config, word_counts=vocab.counts, seed=config.seed,
                                 device=self.dist.device(config.device))
        capturable = config.graph and self.model.device.type == "cuda"  # the step count on the device
        self.sparse_rows = sparse_rows.choose(  # the matrices updated row by row (training/sparse_rows.py)
            config.sparse_updates, rule=config.optimizer, weight_decay=config.l2,
            decoupled_weight_decay=config.weight_decay, vocab_size=len(vocab), row_sparse=self.model.net.row_sparse(),
            graph=config.graph)
        self.optimizer = make_optimizer(config.optimizer, self.model.flat, lr=config.initial_lr, weight_decay=config.l2,
                                        decoupled_weight_decay=config.weight_decay, capturable=capturable,
                                        sparse_rows=self.sparse_rows)
        if config.schedule == "mikolov":
            self.schedule = MikolovSchedule(config.min_improvement, config.halving_factor)
        elif config.schedule == "step":
            self.schedule = StepSchedule(config.decay_start, config.halving_factor)
        else:
            self.schedule = PlateauSchedule(config.lr_decay, config.patience, config.min_improvement, config.max_decays)
        generator = None  # dropout's masks come from their own generator, saved in every checkpoint
        if self.model.net.dropout.active:
            generator = dropout_generator(config.seed, self.model.device)
        self.stepper = TrainStep(self.model, self.optimizer, k1=config.k1, k2=config.k2, truncation=config.truncation,
                                 ar=config.ar, tar=config.tar, clip=config.clip, independent=config.independent,
                                 generator=generator)
        self._since_average = 0  # local steps since the models were last averaged (--average-every)
        self._use_reduction()
        self.static_step = StaticTrainStep(self.stepper) if config.graph else None  # --graph
        self.lr = config.initial_lr
        self.best = self.model.flat.like(self.model.flat.data.clone())  # the best weights on valid so far
        self.best_eval: Evaluation | None = None
        self.history: list[dict] = []  # one record per epoch
        self.events: list[dict] = []  # one record per rollback
        self.epoch = 1  # the epoch in progress (1-based)
        self.step_in_epoch = 0  # blocks of this epoch already trained on
        self.global_step = 0
        self.epoch_nats = 0.0
        self.epoch_tokens = 0
        self.epoch_seconds = 0.0
        self.done = False
        self._snapshot: tuple[dict[str, torch.Tensor], dict] | None = None  # the last state saved
        self.rollbacks = RollbackCounter()
        self._metrics_written: tuple[int, int] | None = None  # (epochs, events) in metrics.jsonl
        self._stop_signal: int | None = None

    @property
    def engine(self):
        """The BPTT(k1, k2) engine that carries the state across blocks (engine/tbptt.py)."""
        return self.stepper.engine

    @property
    def _progress(self) -> bool:
        """The progress bar and the per-epoch lines: rank 0's alone."""
        return self.config.progress and self.dist.is_main

    # -- data-parallel training (training/distributed.py) ----------------------------------------------

    def _memory_share(self) -> dict:
        """What the memory guard needs of this rank: its largest share of --batch, and how many ranks share
        this machine's memory (the CPU's ranks on one machine; each CUDA rank has its own device)."""
        if not self.dist.active:
            return {}
        B, N = self.config.batch, self.dist.world
        shared = self.dist.local_world if self.dist.device(self.config.device).type == "cpu" else 1
        return {"streams": -(-B // N), "processes": shared}

    def _share_block(self, x, y, mask):
        """This rank's columns of a block (see distributed.py); the engine draws the masks of the whole
        batch and keeps the same columns. An empty share (sentence mode, a short last batch) is one column
        masked out: loss 0, gradients 0, 0 tokens, and the same draws and collectives as the other ranks."""
        T, B = x.shape
        start, stop = self.dist.share(B)
        if stop == start:
            self.engine.columns = (0, 1, B)
            pad = torch.zeros((T, 1), dtype=x.dtype)
            return pad, pad.clone(), torch.zeros((T, 1), dtype=torch.bool)
        self.engine.columns = (start, stop, B)
        part = None if mask is None else mask[:, start:stop]
        c = self.config
        if c.independent and c.tar and mask is not None:
            # TAR's term is scaled by counted positions / counted pairs (engine/regularizers.py), which the
            # engine reads from its own columns: scale it to the whole batch's ratio
            def ratio(m):
                m = torch.as_tensor(m, dtype=torch.float64)
                return float(m.sum()), float((m[1:] * m[:-1]).sum())
            n, pairs = ratio(mask)
            n_own, pairs_own = ratio(part)
            scale = n * pairs_own / (pairs * n_own) if pairs > 0 and pairs_own > 0 else 1.0
            self.stepper.set_penalties(c.ar, c.tar * scale)
        return x[:, start:stop], y[:, start:stop], part

    def _stop_requested(self) -> int | None:
        """The signal that stops the run at this step boundary: this process's own; with several ranks the
        one they agreed on in the last step's reduction (the same on every rank: all stop at the same step)."""
        if self._reduction is None:
            return self._stop_signal
        if self._reduction.signal is not None:
            self._stop_signal = self._reduction.signal
        return self._reduction.signal

    def _agree_stop(self) -> int | None:
        """A stop signal any rank got (a collective: called by every rank at the same point)."""
        self._stop_signal = self.dist.agree_signal(self._stop_signal)
        return self._stop_signal

    def _all_finite(self, tensors: dict[str, torch.Tensor]) -> bool:
        """all_finite on every rank's state (the carried state differs between ranks)."""
        return self.dist.all_agree(all_finite(tensors))

    def _validate(self) -> tuple[Evaluation, bool]:
        """(the valid evaluation, whether the run has saved a best model): rank 0's, broadcast to every rank."""
        if self.dist.is_main:
            # an epoch has ended (and the first end always saves a best model): from the training state, not
            # from DIR, which a kill between writing the best model and the state leaves ahead of the state
            result = evaluate_corpus(self.model, self.valid_corpus, self.vocab), bool(self.history)
        else:
            result = None
        return self.dist.broadcast(result)

    def _joined(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The state to write: the engine's carried state gathered from every rank along the streams, as
        one process running all B streams would save it (rank 0; None on the others)."""
        if not self.dist.active:
            return tensors
        return _map_engine_state(tensors, self.dist.gather_streams)

    def _own_columns(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of _joined: this rank's columns of the engine state of a checkpoint."""
        if not self.dist.active:
            return tensors
        return _map_engine_state(tensors, self.dist.take_streams)

    # -- data ----------------------------------------------------------------------------------------

    def _batches(self):
        """The current epoch's blocks, from self.step_in_epoch on: (inputs, targets, mask|None)."""
        c = self.config
        if c.independent:
            batches = SentenceBatches(self.train_corpus, c.batch, shuffle=True, seed=c.seed + self.epoch)
            for i in range(self.step_in_epoch, len(batches)):
                yield (*batches.batch(i),)
        else:
            for x, y in StreamBatches(self.train_corpus.ids, c.batch, c.k1).iter_from(self.step_in_epoch):
                yield x, y, None

    # -- training ------------------------------------------------------------------------------------

    def train_step(self, x, y, mask) -> bool:
        """One update; True if applied. False if the step diverged and the trainer was rolled back.

        The step is not applied when training/divergence.py says so (a non-finite loss or gradient
        norm, a norm above --max-grad-norm): the trainer returns to the last saved state with half the
        learning rate (see _rollback). One host sync per step.
        """
        if self._snapshot is None:  # called outside run(): the state before the first step
            self._snapshot = self._copy_state(*self._state())
        if self.dist.active:
            x, y, mask = self._share_block(x, y, mask)
        if self.static_step is not None:  # --graph: the update is part of the replayed step
            loss_value, norm_value, tokens = self.static_step.run(x, y, self.lr)
        else:
            loss_value, norm_value, tokens = self.stepper.compute(x, y, mask)
        reason = step_fault(loss_value, norm_value, self.config.max_grad_norm)
        if self._average_every:  # each rank judged its own gradient: a fault anywhere rolls back everywhere
            reason = self.dist.agree_fault(reason)
        if reason is not None:
            self._rollback(reason)  # undoes an update already applied, in place
            return False
        if self.static_step is None:
            self.stepper.apply(self.lr)
        self.epoch_nats += loss_value
        self.epoch_tokens += tokens
        self.step_in_epoch += 1
        self.global_step += 1
        if self._average_every:
            self._since_average += 1
            if self._since_average >= self._average_every:
                self._average()
        return True

    def _use_reduction(self) -> None:
        """The step's Reduction for config.average_every: several ranks sum their gradients, with the loss,
        the tokens and a stop signal (GradientSum); with --average-every K they keep them and the models are
        averaged every K steps (LocalSteps); one process needs none (step.no_reduction)."""
        self._average_every = self.config.average_every if self.dist.active else 0
        self._reduction = self.dist.reduction(lambda: self._stop_signal, self._average_every)
        self.stepper.reduce = self._reduction or no_reduction

    def _average(self) -> None:
        """Model averaging (--average-every): the weights and the optimizer's buffers replaced by their mean
        over the ranks, if any rank stepped alone since the last time (a collective: every rank calls it at
        the same points — every K steps, before validation and before every checkpoint)."""
        if self._since_average == 0:
            return
        buffers = [t for t in self.optimizer.state_tensors() if t.is_floating_point() and t.dim() > 0]
        self.dist.average([self.model.flat.data, *buffers])  # not the step counts: the same everywhere
        self._since_average = 0

    def run(self, max_steps: int | None = None, checkpoint_every: int | None = None) -> TrainResult:
        """Train until the schedule stops, the epochs run out, or global_step reaches max_steps.

        checkpoint_every: save the state every N steps too (None: config.checkpoint_every, which a resumed
        run keeps).

        SIGINT and SIGTERM (caught while this runs, in the main thread; the previous handlers are
        restored on return) stop the run at the next step boundary with the state saved: the result
        has finished=False and interrupted=the signal number. A second SIGINT raises
        KeyboardInterrupt at once, without saving (the last checkpoint stands). TrainingDiverged after
        MAX_ROLLBACKS rollbacks in a row.
        """
        c = self.config
        checkpoint_every = c.checkpoint_every if checkpoint_every is None else checkpoint_every
        started = time.perf_counter()
        self._stop_signal = None
        if self._reduction is not None:
            self._reduction.signal = None
        with self._signals_caught():
            if self.best_eval is None:
                self.best_eval, _ = self._validate()
                if self._progress:
                    v = self.valid_corpus
                    print(
                        f"vocabulary {len(self.vocab)} entries; train {self.train_corpus.tokens:,} tokens, "
                        f"{self.train_corpus.oov:,} mapped to <unk>; valid {v.tokens:,} tokens, "
                        f"{v.oov:,} OOV ({100 * v.oov_rate:.2f} %); k1={c.k1} k2={c.k2}",
                        flush=True,
                    )
            if self._snapshot is None or self._snapshot[1]["best_eval"] is None:  # before the first save
                self._snapshot = self._copy_state(*self._state())
            while not self.done and self.epoch <= c.epochs:
                if self.step_in_epoch == 0:
                    self.engine.reset()
                t0 = time.perf_counter()
                bar = tqdm(total=self.train_corpus.tokens, initial=self.epoch_tokens, desc=f"epoch {self.epoch}",
                           unit="tok", disable=not self._progress, leave=False, mininterval=0.5)
                rolled_back = False
                for x, y, mask in self._batches():
                    at_max = max_steps is not None and self.global_step >= max_steps
                    if self._stop_requested() is not None or at_max:
                        bar.close()
                        self.epoch_seconds += time.perf_counter() - t0
                        if not self._checkpoint(stop=True):
                            rolled_back = True
                            break
                        return self._result(started, finished=False)
                    before = self.epoch_tokens
                    if not self.train_step(x, y, mask):
                        rolled_back = True
                        break
                    bar.update(self.epoch_tokens - before)
                    bar.set_postfix(loss=f"{self.epoch_nats / self.epoch_tokens:.3f}", lr=f"{self.lr:.3g}", refresh=False)
                    if checkpoint_every and self.global_step % checkpoint_every == 0:
                        if not self._checkpoint():
                            rolled_back = True
                            break
                bar.close()
                if rolled_back:
                    continue  # the epoch goes on from the restored position
                self.epoch_seconds += time.perf_counter() - t0
                self._average()  # validation and the checkpoint see one model
                if not self._all_finite(self._state()[0]):
                    self._rollback("non-finite weights or optimizer state", self.global_step)
                    continue
                if self._agree_stop() is not None:  # stop before the (possibly long) validation
                    self._checkpoint(stop=True)  # the state is finite: checked just above
                    return self._result(started, finished=False)
                self._end_epoch()
                self.save_state()
            self.done = True
            self.save_state()
            return self._result(started, finished=True)

    @contextlib.contextmanager
    def _signals_caught(self) -> Iterator[None]:
        """While inside: SIGINT/SIGTERM set self._stop_signal (checked at step boundaries; nothing is
        written from the handler). A second SIGINT raises KeyboardInterrupt. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _model_extra(self, valid: Evaluation) -> dict:
        return {"training": self.config.to_json(), "epoch": self.epoch, "valid": valid.to_json()}

    def _end_epoch(self) -> None:
        c = self.config
        valid, has_best = self._validate()
        decision = self.schedule.update(valid.entropy_bits)
        if decision.accept and valid.nats <= self.best_eval.nats or not has_best:
            self.best_eval = valid
            self.best.data.copy_(self.model.flat.data)
            if self.dist.is_main:
                self.run_dir.save_best(self.model, self._model_extra(valid))
        elif not decision.accept:
            self.model.flat.data.copy_(self.best.data)  # rnnlm: an epoch that made valid worse is undone
        if c.keep_epochs and decision.accept and self.dist.is_main:  # for checkpoint averaging (bptt average)
            self.run_dir.save_epoch(self.epoch, self.model, self._model_extra(valid), self.vocab)
        record = {
            "epoch": self.epoch,
            "lr": self.lr,
            "train_entropy_bits": self.epoch_nats / max(self.epoch_tokens, 1) / math.log(2),
            "valid_entropy_bits": valid.entropy_bits,
            "valid_perplexity": valid.perplexity,
            "accepted": decision.accept,
            "seconds": self.epoch_seconds,
            "tokens_per_s": self.epoch_tokens / max(self.epoch_seconds, 1e-9),
        }
        self.history.append(record)  # metrics.jsonl is rewritten from it by save_state
        if self._progress:
            print(
                f"epoch {self.epoch}: lr {self.lr:.3g}  train ppl {perplexity(record['train_entropy_bits']):.1f}  "
                f"valid ppl {valid.perplexity:.2f}  {record['tokens_per_s']:,.0f} tok/s"
                + ("" if decision.accept else "  (rejected, weights restored)"),
                flush=True,
            )
        self.lr *= decision.lr_scale
        self.done = decision.stop
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_nats, self.epoch_tokens, self.epoch_seconds = 0.0, 0, 0.0

    def _result(self, started: float, finished: bool) -> TrainResult:
        return TrainResult(self.best_eval, len(self.history), time.perf_counter() - started, self.history,
                           finished, interrupted=None if finished else self._stop_signal, events=self.events)

    # -- divergence (the policy: training/divergence.py) ----------------------------------------------

    def _checkpoint(self, stop: bool = False) -> bool:
        """save_state; but if the state holds NaN or Inf, roll back instead and return False.

        stop: the save of a run that stops here (--max-steps, a signal) and will be resumed. The state a
        rollback returns to stays the last regular checkpoint's, as in a run that does not stop: it is
        written beside the state (DIR/checkpoint/rollback, for this step) and a resumed run takes it back."""
        self._average()
        tensors, state = self._state()
        if not self._all_finite(tensors):
            self._rollback("non-finite weights or optimizer state", self.global_step)
            return False
        if stop:
            target = self._snapshot
            if target is not None and target[1]["global_step"] != self.global_step:
                joined = self._joined(target[0])  # before _write_state, which reuses the snapshot's tensors
                if self.dist.is_main:
                    self.run_dir.write_rollback_target(joined, {**target[1], ROLLBACK_FOR: self.global_step})
            self._write_state(tensors, state, keep_rollback_target=True)
            return True
        self._write_state(tensors, state)
        self.rollbacks.good_checkpoint()
        return True

    def _rollback(self, reason: str, fault_step: int | None = None) -> None:
        """Return to the last saved state with the learning rate halved; log it; save that state.

        fault_step: the step whose result was bad (default: the step being tried, global_step + 1).
        The MAX_ROLLBACKS-th in a row without a good checkpoint in between raises TrainingDiverged
        after saving: a later --resume starts again from the last good state at the halved rate.
        """
        assert self._snapshot is not None  # taken by run() or the first train_step
        fault_epoch = self.epoch
        fault_step = self.global_step + 1 if fault_step is None else fault_step
        lr = self.lr * ROLLBACK_LR_SCALE
        self.load_state(*self._snapshot)
        self.stepper.discard()
        self.lr = lr
        self.events.append(self.rollbacks.rollback(reason, epoch=fault_epoch, fault_step=fault_step,
                                                   restored_step=self.global_step, lr=lr))
        state_dir = self.run_dir.state_dir
        if self.dist.is_main:
            print(f"rollback: {reason} at step {fault_step} (epoch {fault_epoch}); back to the state of step "
                  f"{self.global_step} in {state_dir}, learning rate halved to {lr:.3g}",
                  file=sys.stderr, flush=True)
        self._write_state(*self._state())
        if self.rollbacks.diverged:
            raise TrainingDiverged(
                f"training diverged: {MAX_ROLLBACKS} rollbacks in a row without a good checkpoint in between "
                f"(the last: {reason} at step {fault_step}); the last good state (step {self.global_step}) "
                f"is in {state_dir}" + (f" and the best model in {self.out}" if self.history else "")
                + f"; bptt train --resume {self.out} "
                f"retries at lr {lr:.3g}"
            )

    # -- checkpoints -----------------------------------------------------------------------------------

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything save_state writes: (tensors, JSON-able state). The tensors may alias live ones."""
        tensors = {f"param.{k}": p for k, p in self.model.params.items()}
        tensors.update({f"best.{k}": p for k, p in self.best.items()})
        tensors.update({f"engine.{k}": t for k, t in self.engine.state_dict().items()})
        if hasattr(self.model.output, "state_dict"):  # e.g. the noise generator of NCE / sampled softmax
            tensors.update({f"output.{k}": t for k, t in self.model.output.state_dict().items()})
        opt_tensors, opt_scalars = pack_state("opt", self.optimizer.state_dict(copy=False))  # views
        tensors.update(opt_tensors)
        tensors.update(rng_state())
        state = {
            "training": self.config.to_json(),
            "vocab_file": f"../{VOCAB_FILE}",
            VOCAB_SHA_KEY: self._vocab_sha,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_nats": self.epoch_nats,
            "epoch_tokens": self.epoch_tokens,
            "epoch_seconds": self.epoch_seconds,
            "lr": self.lr,
            "done": self.done,
            "optimizer": opt_scalars,
            "schedule": self.schedule.state_dict(),
            "best_eval": asdict(self.best_eval) if self.best_eval else None,
            "history": self.history,
            "events": self.events,
        }
        return tensors, state

    @staticmethod
    def _copy_state(tensors: dict[str, torch.Tensor], state: dict,
                    into: tuple[dict[str, torch.Tensor], dict] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """A private copy, as load_checkpoint would return it: tensors copied to the CPU (host memory, the
        size of the checkpoint; none on the GPU), state through JSON. into: an earlier copy whose tensors
        are overwritten where the shapes agree, so that a new snapshot does not sit beside the old one
        (for a large vocabulary each is gigabytes)."""
        old = into[0] if into is not None else {}
        copy = {}
        for k, t in tensors.items():
            t = t.detach()
            kept = old.get(k)
            if kept is not None and kept.shape == t.shape and kept.dtype == t.dtype and kept.device.type == "cpu":
                copy[k] = kept.copy_(t)
            else:
                copy[k] = t.to("cpu", copy=True)
        return copy, json.loads(json.dumps(state))

    def _write_state(self, tensors: dict[str, torch.Tensor], state: dict, keep_rollback_target: bool = False) -> None:
        """Rank 0 writes the state of all ranks (the carried state joined); every rank keeps its own copy,
        the state a rollback returns to (a stop's save leaves it as it was: see _checkpoint)."""
        joined = self._joined(tensors)
        if self.dist.is_main:
            self.run_dir.write_state(joined, state)
            if not keep_rollback_target:
                self.run_dir.drop_rollback_target()  # after the state: a kill between leaves it for another step
        if not (keep_rollback_target and self._snapshot is not None):
            self._snapshot = self._copy_state(tensors, state, into=self._snapshot)
        written = (len(self.history), len(self.events))
        if written != self._metrics_written:  # after the checkpoint: never ahead of it
            if self.dist.is_main:
                self.run_dir.write_metrics(self._metrics())
            self._metrics_written = written
        # the other ranks wait for rank 0's writes here, on the patient group, not in the next step's
        # all-reduce, where --dist-timeout would count a large checkpoint on a slow disk as a lost rank
        self.dist.barrier()

    def _metrics(self) -> list[dict]:
        """The epoch records with the rollback events of each epoch before it, in order."""
        events = list(self.events)
        out: list[dict] = []
        for record in self.history:
            while events and events[0]["epoch"] <= record["epoch"]:
                out.append(events.pop(0))
            out.append(record)
        return out + events

    def save_state(self) -> None:
        """Write the whole training state to DIR/checkpoint atomically, then DIR/metrics.jsonl from it.

        Also kept in memory as the state a rollback returns to; a good checkpoint ends a run of
        rollbacks. ValueError (nothing written) if it holds NaN or Inf.
        """
        self._average()
        self._write_state(*self._state())
        self.rollbacks.good_checkpoint()

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Put the trainer in a state as _state() returns it or load_checkpoint reads it back.

        Shared by resume and rollback; the trainer never aliases the given tensors or lists.
        """
        device = self.model.device
        # the whole buffers first: their padding (engine/flat.py) back to zero, whatever a faulty step left there
        self.model.flat.data.zero_()
        self.best.data.zero_()
        for k, p in self.model.params.items():
            p.copy_(tensors[f"param.{k}"])
            self.best[k].copy_(tensors[f"best.{k}"])
        engine = _engine_state(tensors)
        self.engine.load_state_dict({k: t.to(device, copy=True) for k, t in engine.items()})
        opt = unpack_state("opt", {k: t.to(device) for k, t in tensors.items() if k.startswith("opt.")},
                           state["optimizer"])
        self.optimizer.load_state_dict(opt)  # copies its buffers
        if hasattr(self.model.output, "load_state_dict"):
            self.model.output.load_state_dict(
                {k.removeprefix("output."): t.clone() for k, t in tensors.items() if k.startswith("output.")}
            )
        self.schedule.load_state_dict(state["schedule"])
        set_rng_state(tensors)
        for key in ("epoch", "step_in_epoch", "global_step", "epoch_nats", "epoch_tokens", "epoch_seconds", "lr",
                    "done"):
            setattr(self, key, state[key])
        self.history = [dict(r) for r in state["history"]]
        self._since_average = 0  # the state saved was averaged (every rank loads the same)
        self.events = [dict(r) for r in state.get("events", [])]  # older checkpoints have none
        self.best_eval = Evaluation(**state["best_eval"]) if state["best_eval"] else None

    @classmethod
    def resume(cls, directory: str | Path, progress: bool = True, *, backend: str | None = None,
               dist_timeout: float | None = None) -> Trainer:
        """Rebuild a trainer from DIR/checkpoint exactly as it was saved (with any number of ranks: each
        takes its columns of the carried state)."""
        run_dir = RunDirectory(directory)
        where = run_dir.state_dir / "config.json"
        tensors, state = run_dir.read_state()
        try:
            _check_state_fields(state)
            config = TrainConfig.from_json(state["training"])
            for name in ("train", "valid", "data", "workdir"):
                if not isinstance(getattr(config, name), (str, type(None))):
                    raise TypeError(f"{name} is not a path")
            config.validate()
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"{where}: bad training state: {str(e)[:200]}") from None
        config.model, config.progress = str(run_dir.path), progress
        config = config.resolved_paths()  # resumed from another directory: the run's own corpora
        trainer = cls(config, vocab=Vocab.load(run_dir.vocab_path), backend=backend, dist_timeout=dist_timeout)
        try:
            tensors = trainer._own_columns(tensors)
            trainer.load_state(tensors, state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{where}: the training state does not fit this run: {str(e)[:200]}") from None
        trainer._snapshot = (tensors, state)
        target = run_dir.read_rollback_target()  # a stop's: the state a rollback returns to, for this step only
        if target is not None and target[1].get(ROLLBACK_FOR) == state["global_step"]:
            try:
                target_state = {k: v for k, v in target[1].items() if k != ROLLBACK_FOR}
                trainer._snapshot = (trainer._own_columns(target[0]), target_state)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{run_dir.state_dir}: the rollback target does not fit this run: "
                                      f"{str(e)[:200]}") from None
        return trainer

    def extend(self, epochs: int | None = None, min_improvement: float | None = None) -> None:
        """Let a resumed run go past its end: a new epoch limit and/or a new stopping threshold for the
        schedule. A run that had ended (its schedule stopped it, or its epochs ran out) goes on at the
        rate it had reached; run() stops it again by the new rules."""
        c = self.config
        new = replace(c, epochs=c.epochs if epochs is None else epochs,
                      min_improvement=c.min_improvement if min_improvement is None else min_improvement)
        new.validate()  # before anything changes
        c.epochs, c.min_improvement = new.epochs, new.min_improvement
        self.schedule.min_improvement = float(new.min_improvement)
        self.done = False

    ADJUSTABLE = ("clip", "ar", "tar", "average_every", "keep_epochs", "checkpoint_every")

    def adjust(self, **options: float) -> None:
        """New values of the options in ADJUSTABLE (clipping threshold, AR and TAR strengths, how several
        ranks combine their work, whether accepted epochs are kept for `bptt average`) for the steps from
        here on, e.g. adjust(clip=0); saved with the state, so a later resume keeps them.
        Nothing else changes: the run goes on where it stood."""
        unknown = sorted(set(options) - set(self.ADJUSTABLE))
        if unknown:
            raise ValueError(f"a resumed run can change only {list(self.ADJUSTABLE)}, not {unknown}")
        new = replace(self.config, **options)
        new.validate()  # before anything changes
        for name in options:
            setattr(self.config, name, getattr(new, name))
        self.stepper.clip = self.config.clip
        self.stepper.set_penalties(self.config.ar, self.config.tar)
        if "average_every" in options:  # between steps, with every rank holding the same model
            self._average()
            self._use_reduction()


def _engine_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The engine's part of a training state ("engine.*"), under the engine's own names."""
    return {k.removeprefix("engine."): t for k, t in tensors.items() if k.startswith("engine.")}


def _map_engine_state(tensors: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor] | None:
    """tensors with their engine part replaced by fn(engine part); None when fn gives None."""
    engine = fn(_engine_state(tensors))
    if engine is None:
        return None
    return {**{k: t for k, t in tensors.items() if not k.startswith("engine.")},
            **{f"engine.{k}": t for k, t in engine.items()}}


def train(config: TrainConfig, max_steps: int | None = None, checkpoint_every: int | None = None) -> TrainResult:
    """Train as configured; the best model on valid ends up in config.model. Returns the metrics.

    A SIGINT or SIGTERM stops the run at the next step with the state saved (Trainer.resume continues
    it) and then raises KeyboardInterrupt, so that a caller such as the demo stops too.
    """
    trainer = Trainer(config)
    if trainer.dist.is_main:
        trainer.run_dir.start_metrics()
    result = trainer.run(max_steps, checkpoint_every)
    if result.interrupted is not None:
        name = signal.Signals(result.interrupted).name
        raise KeyboardInterrupt(f"{name}: training state saved in {trainer.run_dir.state_dir}")
    return result
