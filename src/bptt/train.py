"""Train an Elman RNN language model on a text corpus with the explicit-BPTT engine.

Continuous mode (default): B parallel streams over the corpus, the hidden state carried from block to
block, BPTT(k1, k2) with k1 = --bptt-block (default --bptt) and k2 = --bptt + --bptt-block when a
block is given (rnnlm's -bptt/-bptt-block), else k2 = --bptt (PyTorch's word_language_model).
Sentence mode (--independent, rnnlm's -independent): the state is reset at every sentence; sentences
are batched with padding masked out of the loss and the gradient.

Gradients (with the AR/TAR penalties of --ar/--tar on the hidden states, regularizers.py, if
given) are averaged over the block's counted tokens, clipped to --clip (global norm), and applied
by an explicit update rule (--optimizer; Adam by default: on Penn Treebank it reaches in one epoch
what SGD at lr 5 needs many for, see docs/results.md). The learning rate follows Mikolov's schedule: after every
epoch the valid entropy is measured; once its relative improvement drops under --min-improvement
the rate is halved every epoch, and training stops when it drops under it again (or, with
--schedule plateau, the rate is divided on a plateau and training stops early). The best model on
valid is kept in DIR (model.safetensors, config.json, vocab.json); metrics.jsonl logs every epoch.

Reliability: every file is written atomically and each weights file carries its own config, so a
run killed at any instant (even SIGKILL, even mid-write) leaves DIR and DIR/checkpoint loadable, and
`bptt train --resume DIR` continues from the last checkpoint to the same weights as an uninterrupted
run. SIGINT (Ctrl-C) and SIGTERM stop at the next step boundary after saving the state (exit codes 130
and 143). A step whose loss or gradients are not finite, or whose gradient norm (per-token mean,
before clipping) exceeds --max-grad-norm, is not applied: the run rolls back to the last saved
state, halves the learning rate and goes on; 5 rollbacks in a row without a checkpoint in between
stop it (exit code 1). No checkpoint ever holds NaN or Inf.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from bptt.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    pack_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_state,
)
from bptt.data import SentenceBatches, StreamBatches, Vocab, encode
from bptt.evaluate import Evaluation, evaluate_corpus
from bptt.model import ElmanLM, check_device
from bptt.outputs import OUTPUT_LAYERS
from bptt.optim import MikolovSchedule, PlateauSchedule, clip_grad_norm_, make_optimizer
from bptt.saved_model import VOCAB_FILE, VOCAB_SHA_KEY, copy_params, file_sha256, refuse_pickle_files, save_model
from bptt.average import epoch_dir
from bptt.resources import guard_training
from bptt.tbptt import TruncatedBPTT

EXAMPLES = """examples:
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m
  bptt train --train a.txt --valid b.txt --model m --hidden 300 --bptt 4 --bptt-block 10 --lr 5
  bptt train --train a.txt --valid b.txt --model m --independent --optimizer sgd --lr 5
  bptt train --resume m      # after a kill, Ctrl-C (exit 130) or SIGTERM (exit 143): same weights in the end
  # PTB in under a minute on 2 cores (test perplexity 148.6): class softmax, the last epoch at half the rate
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m --output class --classes 100 \\
             --hidden 150 --batch 160 --lr 0.0055 --epochs 3 --min-improvement 1.5
  # the best full-softmax model so far (test perplexity 120.9 after 10 epochs, 120.8 after 13): four at the full
  # rate, clipped (the 4th is rejected and the halving starts), then the annealing unclipped, with AR/TAR
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m --hidden 400 --batch 20 \\
             --weight-decay 0.1 --min-improvement 1.001 --halving-factor 0.3 --seed 1 --epochs 4
  bptt train --resume m --clip 0 --ar 2 --tar 2 --epochs 40
  bptt train --resume m --min-improvement 1.0 --epochs 13      # a few more epochs of the annealing

reliability: a kill at any instant leaves m/ and m/checkpoint/ loadable; Ctrl-C or SIGTERM saves the
state at the next step and exits; a step with a non-finite loss or gradient, or a gradient norm above
--max-grad-norm, is undone (back to the last checkpoint, learning rate halved; logged on stderr and in
metrics.jsonl as "event": "rollback"), and 5 rollbacks in a row stop the run with exit code 1.
"""

SCHEDULES = ("mikolov", "plateau")
MAX_LR = 1e4  # a larger rate is a typo, not a setting
DEFAULT_LR = {"sgd": 5.0, "adam": 2e-3, "adagrad": 0.1, "rmsprop": 1e-3}


@dataclass
class TrainConfig:
    train: str
    valid: str
    model: str
    unit: str = "word"
    min_count: int = 1
    max_vocab: int | None = None
    hidden: int = 200
    activation: str = "tanh"
    output: str = "softmax"  # or "class": Mikolov's class-based softmax with `classes` classes
    classes: int = 100
    direct: int = 0  # maxent direct connections: hash size in weights (rnnlm -direct, in millions there); 0: none
    direct_order: int = 3  # n-gram features of orders 0 .. direct_order−1
    tie: bool = False  # input weights tied to the output layer's: U ≡ Vᵀ (cells/elman_tied.py)
    batch: int = 32
    bptt: int = 35
    bptt_block: int | None = None
    truncation: int | None = None  # cap every error's path at this many recurrent connections (0: none)
    independent: bool = False
    epochs: int = 20
    lr: float | None = None
    optimizer: str = "adam"
    clip: float = 0.25
    max_grad_norm: float = 1e3  # a step with a larger gradient norm (per-token mean) is rolled back; 0: off
    l2: float = 0.0
    init_range: float = 0.1  # weight matrices start uniform in [-init_range, init_range]
    weight_decay: float = 0.0  # decoupled (AdamW-style): p *= 1 − lr·λ on weight matrices every step
    ar: float = 0.0  # activation regularization: α · mean s² on the hidden states (regularizers.py)
    tar: float = 0.0  # temporal activation regularization: β · mean (s^t − s^{t−1})²
    keep_epochs: bool = False  # also keep each accepted epoch's weights in DIR/epochs/epoch-N (bptt average)
    min_improvement: float = 1.003
    halving_factor: float = 0.5  # Mikolov's schedule: the rate's factor per epoch once it anneals
    schedule: str = "mikolov"  # or "plateau": divide by lr_decay after `patience` flat epochs
    lr_decay: float = 0.25
    patience: int = 0
    max_decays: int = 3  # plateau: stop early instead of a further decay
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        for option in ("hidden", "batch", "bptt", "epochs", "min_count", "classes"):
            value = getattr(self, option)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{option.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.truncation is not None and self.truncation < 0:
            raise ValueError(f"--truncation must be >= 0, got {self.truncation}")
        if self.bptt_block is not None and self.bptt_block < 1:
            raise ValueError(f"--bptt-block must be a positive integer, got {self.bptt_block}")
        if self.direct < 0 or self.direct_order < 1:
            raise ValueError(f"--direct must be >= 0 and --direct-order >= 1, got {self.direct} and {self.direct_order}")
        if self.tie and self.output not in ("softmax", "class"):
            raise ValueError(f"--tie needs --output softmax or class (a matrix V with a row per word), got {self.output!r}")
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise ValueError(f"--lr must be positive and at most {MAX_LR:g}, got {self.lr}")
        if not 0 <= self.clip < math.inf:
            raise ValueError(f"--clip must be >= 0 (0: off), got {self.clip}")
        for option in ("ar", "tar"):
            if not 0 <= getattr(self, option) < math.inf:
                raise ValueError(f"--{option} must be >= 0 (0: off), got {getattr(self, option)}")
        if not 0 < self.init_range < math.inf:
            raise ValueError(f"--init-range must be positive, got {self.init_range}")
        if not 0 <= self.l2 < 1:
            raise ValueError(f"--l2 must be in [0, 1), got {self.l2}")
        if self.optimizer in DEFAULT_LR:
            lr = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
            if not (0 <= self.weight_decay < math.inf and lr * self.weight_decay < 1):
                raise ValueError(f"--weight-decay must be >= 0 with lr × decay < 1 (lr {lr:g}), got {self.weight_decay}")
        if not 1 <= self.min_improvement < math.inf:  # below 1 the schedule would never halve nor stop
            raise ValueError(f"--min-improvement is a ratio of entropies, at least 1 (1.003: improve by 0.3 %), "
                             f"got {self.min_improvement}")
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"--optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.halving_factor < 1:
            raise ValueError(f"--halving-factor must be in (0, 1), got {self.halving_factor}")
        if not 0 < self.lr_decay < 1:
            raise ValueError(f"--lr-decay must be in (0, 1), got {self.lr_decay}")
        if self.patience < 0 or self.max_decays < 0:
            raise ValueError("--patience and --max-decays must be >= 0")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"--max-grad-norm must be >= 0 (0: off), got {self.max_grad_norm}")
        check_device(self.device)  # before the corpora are read

    @property
    def k1(self) -> int:
        return self.bptt_block or self.bptt

    @property
    def k2(self) -> int:
        return self.bptt + self.bptt_block if self.bptt_block else self.bptt


@dataclass
class TrainResult:
    best_valid: Evaluation
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    finished: bool = True  # False when stopped by max_steps or a signal (resume with --resume)
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
    events: list[dict] = field(default_factory=list)  # rollbacks, as in metrics.jsonl


def _perplexity(bits: float) -> float:
    """2^bits, inf where that overflows (a diverging run, or an NCE objective far from a probability)."""
    return 2.0**bits if bits < 1000 else math.inf


STATE_DIR = "checkpoint"  # DIR/checkpoint/: the training state, for --resume
METRICS_FILE = "metrics.jsonl"
MAX_ROLLBACKS = 5  # rollbacks in a row (no good checkpoint in between) before the run is declared diverged
ROLLBACK_LR_SCALE = 0.5


class TrainingDiverged(ValueError):
    """MAX_ROLLBACKS rollbacks in a row; the one-line message says where the last good state is."""


class Trainer:
    """One training run: model, optimizer, schedule, engine and data position; saves and resumes.

    DIR/model.safetensors + DIR/config.json + DIR/vocab.json: the best model on valid (what eval,
    score and generate read). DIR/checkpoint/: the whole training state (current weights, best
    weights, optimizer buffers, the carried BPTT state, RNG state as tensors; config, epoch, step
    within the epoch, learning rate, schedule, metrics as JSON), written atomically every
    --checkpoint-every steps, at the end of every epoch, and when stopped; DIR/metrics.jsonl is
    rewritten from it, so it never holds an epoch the checkpoint does not. The last state saved is
    also kept in memory: a diverging step rolls back to it (see train_step).
    """

    def __init__(self, config: TrainConfig, vocab: Vocab | None = None):
        config.validate()
        self.config = config
        self.out = Path(config.model)
        self.out.mkdir(parents=True, exist_ok=True)
        if vocab is None:
            vocab = Vocab.build(config.train, config.unit, config.min_count, config.max_vocab)
            vocab.save(self.out / VOCAB_FILE)
        self.vocab = vocab
        self._vocab_sha = file_sha256(self.out / VOCAB_FILE)  # recorded in checkpoints, checked on resume
        self.train_corpus = encode(config.train, vocab, config.unit)
        self.valid_corpus = encode(config.valid, vocab, config.unit)
        guard_training(config, vocab, self.train_corpus, self.valid_corpus)  # refuse before allocating
        torch.manual_seed(config.seed)
        self.model = ElmanLM(
            len(vocab), config.hidden, config.activation, seed=config.seed, device=config.device,
            output=config.output, classes=config.classes, word_counts=vocab.counts,
            direct=config.direct, direct_order=config.direct_order, init_range=config.init_range, tied=config.tie,
        )
        self.optimizer = make_optimizer(config.optimizer, weight_decay=config.l2,
                                        decoupled_weight_decay=config.weight_decay)
        self.schedule = (
            MikolovSchedule(config.min_improvement, config.halving_factor)
            if config.schedule == "mikolov"
            else PlateauSchedule(config.lr_decay, config.patience, config.min_improvement, config.max_decays)
        )
        self.engine = TruncatedBPTT(self.model, config.k1, config.k2, config.truncation, config.ar, config.tar)
        self.lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
        self.best = {k: p.clone() for k, p in self.model.params.items()}
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
        self._rollbacks_in_a_row = 0
        self._metrics_written: tuple[int, int] | None = None  # (epochs, events) in metrics.jsonl
        self._stop_signal: int | None = None

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

        The step is not applied when the loss or the gradient norm (of the per-token mean gradient,
        before clipping) is not finite, or the norm exceeds --max-grad-norm (> 0): the trainer returns
        to the last saved state with half the learning rate (see _rollback). One host sync per step.
        """
        model = self.model
        if self._snapshot is None:  # called outside run(): the state before the first step
            self._snapshot = self._copy_state(*self._state())
        if self.config.independent:  # every sentence starts from s^0 = 0; padding is masked out
            c = self.config
            loss, grads, _ = model.loss_and_grads(x, y, mask=mask, truncation=c.truncation, ar=c.ar, tar=c.tar)
            tokens = int(mask.sum())
        else:
            loss, grads = self.engine.step(x, y)
            tokens = y.numel()
        for g in grads.values():
            g.div_(tokens)  # the mean over the block's counted tokens
        norm = clip_grad_norm_(grads, self.config.clip)
        loss_value, norm_value = torch.stack(
            [loss.detach().to(torch.float64).reshape(()), norm.to(loss.device, torch.float64)]
        ).tolist()
        bound = self.config.max_grad_norm
        if not math.isfinite(loss_value):
            self._rollback(f"non-finite loss ({loss_value})")
            return False
        if not math.isfinite(norm_value):
            self._rollback(f"non-finite gradients (norm {norm_value})")
            return False
        if bound > 0 and norm_value > bound:
            self._rollback(f"gradient norm {norm_value:.4g} above --max-grad-norm {bound:g}")
            return False
        self.optimizer.step(model.params, grads, self.lr)
        self.epoch_nats += loss_value
        self.epoch_tokens += tokens
        self.step_in_epoch += 1
        self.global_step += 1
        return True

    def run(self, max_steps: int | None = None, checkpoint_every: int = 0) -> TrainResult:
        """Train until the schedule stops, the epochs run out, or global_step reaches max_steps.

        SIGINT and SIGTERM (caught while this runs, in the main thread; the previous handlers are
        restored on return) stop the run at the next step boundary with the state saved: the result
        has finished=False and interrupted=the signal number. A second SIGINT raises
        KeyboardInterrupt at once, without saving (the last checkpoint stands). TrainingDiverged after
        MAX_ROLLBACKS rollbacks in a row.
        """
        c = self.config
        started = time.perf_counter()
        self._stop_signal = None
        with self._signals_caught():
            if self.best_eval is None:
                self.best_eval = evaluate_corpus(self.model, self.valid_corpus, self.vocab)
                if c.progress:
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
                           unit="tok", disable=not c.progress, leave=False, mininterval=0.5)
                rolled_back = False
                for x, y, mask in self._batches():
                    at_max = max_steps is not None and self.global_step >= max_steps
                    if self._stop_signal is not None or at_max:
                        bar.close()
                        self.epoch_seconds += time.perf_counter() - t0
                        if not self._checkpoint():
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
                if not self._finite(self._state()[0]):
                    self._rollback("non-finite weights or optimizer state", self.global_step)
                    continue
                if self._stop_signal is not None:  # stop before the (possibly long) validation
                    self.save_state()
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

    def _end_epoch(self) -> None:
        c = self.config
        valid = evaluate_corpus(self.model, self.valid_corpus, self.vocab)
        decision = self.schedule.update(valid.entropy_bits)
        if decision.accept and valid.nats <= self.best_eval.nats or not (self.out / "model.safetensors").exists():
            self.best_eval = valid
            copy_params(self.model.params, self.best)
            save_model(self.out, self.model, {"training": asdict(c), "epoch": self.epoch, "valid": valid.to_json()})
        elif not decision.accept:
            copy_params(self.best, self.model.params)  # rnnlm: an epoch that made valid worse is undone
        if c.keep_epochs and decision.accept:  # for checkpoint averaging (bptt average)
            save_model(epoch_dir(self.out, self.epoch), self.model,
                       {"training": asdict(c), "epoch": self.epoch, "valid": valid.to_json()}, self.vocab)
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
        if c.progress:
            print(
                f"epoch {self.epoch}: lr {self.lr:.3g}  train ppl {_perplexity(record['train_entropy_bits']):.1f}  "
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
                           finished, interrupted=self._stop_signal, events=self.events)

    # -- divergence ------------------------------------------------------------------------------------

    @staticmethod
    def _finite(tensors: dict[str, torch.Tensor]) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())

    def _checkpoint(self) -> bool:
        """save_state; but if the state holds NaN or Inf, roll back instead and return False."""
        tensors, state = self._state()
        if not self._finite(tensors):
            self._rollback("non-finite weights or optimizer state", self.global_step)
            return False
        self._write_state(tensors, state)
        self._rollbacks_in_a_row = 0
        return True

    def _rollback(self, reason: str, fault_step: int | None = None) -> None:
        """Return to the last saved state with the learning rate halved; log it; save that state.

        fault_step: the step whose result was bad (default: the step being tried, global_step + 1).

        The rollback is recorded in self.events (metrics.jsonl: "event": "rollback") and on stderr.
        The MAX_ROLLBACKS-th in a row without a good checkpoint in between ("event": "diverged")
        raises TrainingDiverged after saving: a later --resume starts again from the last good state
        at the halved rate.
        """
        assert self._snapshot is not None  # taken by run() or the first train_step
        fault_epoch = self.epoch
        fault_step = self.global_step + 1 if fault_step is None else fault_step
        lr = self.lr * ROLLBACK_LR_SCALE
        self._rollbacks_in_a_row += 1
        diverged = self._rollbacks_in_a_row >= MAX_ROLLBACKS
        self.load_state(*self._snapshot)
        self.lr = lr
        self.events.append({"event": "diverged" if diverged else "rollback", "epoch": fault_epoch,
                            "global_step": fault_step, "reason": reason, "restored_step": self.global_step,
                            "lr": lr})
        state_dir = self.out / STATE_DIR
        print(f"rollback: {reason} at step {fault_step} (epoch {fault_epoch}); back to the state of step "
              f"{self.global_step} in {state_dir}, learning rate halved to {lr:.3g}",
              file=sys.stderr, flush=True)
        self._write_state(*self._state())
        if diverged:
            raise TrainingDiverged(
                f"training diverged: {MAX_ROLLBACKS} rollbacks in a row without a good checkpoint in between "
                f"(the last: {reason} at step {fault_step}); the last good state (step {self.global_step}) "
                f"is in {state_dir} and the best model in {self.out}; bptt train --resume {self.out} "
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
        opt_tensors, opt_scalars = pack_state("opt", self.optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors.update(rng_state())
        state = {
            "training": asdict(self.config),
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
    def _copy_state(tensors: dict[str, torch.Tensor], state: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """A private copy, as load_checkpoint would return it: tensors copied to the CPU (host memory, the
        size of the checkpoint; none on the GPU), state through JSON."""
        return {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}, json.loads(json.dumps(state))

    def _write_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        save_checkpoint(self.out / STATE_DIR, tensors, state)
        self._snapshot = self._copy_state(tensors, state)
        written = (len(self.history), len(self.events))
        if written != self._metrics_written:  # after the checkpoint: never ahead of it
            text = "".join(json.dumps(r) + "\n" for r in self._metrics())
            atomic_write_bytes(self.out / METRICS_FILE, text.encode("utf-8"))
            self._metrics_written = written

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
        self._write_state(*self._state())
        self._rollbacks_in_a_row = 0

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Put the trainer in a state as _state() returns it or load_checkpoint reads it back.

        Shared by resume and rollback; the trainer never aliases the given tensors or lists.
        """
        device = self.model.device
        for k, p in self.model.params.items():
            p.copy_(tensors[f"param.{k}"])
            self.best[k].copy_(tensors[f"best.{k}"])
        engine = {k.removeprefix("engine."): t for k, t in tensors.items() if k.startswith("engine.")}
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
        self.events = [dict(r) for r in state.get("events", [])]  # older checkpoints have none
        self.best_eval = Evaluation(**state["best_eval"]) if state["best_eval"] else None

    @classmethod
    def resume(cls, directory: str | Path, progress: bool = True) -> Trainer:
        """Rebuild a trainer from DIR/checkpoint exactly as it was saved."""
        directory = Path(directory)
        where = directory / STATE_DIR / "config.json"
        refuse_pickle_files(directory)
        refuse_pickle_files(directory / STATE_DIR)
        tensors, state = load_checkpoint(directory / STATE_DIR)
        try:
            config = TrainConfig(**state["training"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: bad training section: {e}") from None
        config.model, config.progress = str(directory), progress
        vocab_sha = state.get(VOCAB_SHA_KEY)  # absent in checkpoints written before it was recorded
        if vocab_sha is not None and vocab_sha != file_sha256(directory / VOCAB_FILE):
            raise CheckpointError(
                f"{directory / VOCAB_FILE}: does not match the vocabulary this run was trained with (sha256 in {where})"
            )
        trainer = cls(config, vocab=Vocab.load(directory / VOCAB_FILE))
        try:
            trainer.load_state(tensors, state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{where}: the training state does not fit this run: {str(e)[:200]}") from None
        trainer._snapshot = (tensors, state)
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

    ADJUSTABLE = ("clip", "ar", "tar")

    def adjust(self, **options: float) -> None:
        """New values of the options in ADJUSTABLE (clipping threshold, AR and TAR strengths) for the
        steps from here on, e.g. adjust(clip=0); saved with the state, so a later resume keeps them.
        Nothing else changes: the run goes on where it stood."""
        unknown = sorted(set(options) - set(self.ADJUSTABLE))
        if unknown:
            raise ValueError(f"a resumed run can change only {list(self.ADJUSTABLE)}, not {unknown}")
        new = replace(self.config, **options)
        new.validate()  # before anything changes
        for name in options:
            setattr(self.config, name, getattr(new, name))
        self.engine.ar, self.engine.tar = self.config.ar, self.config.tar


def train(config: TrainConfig, max_steps: int | None = None, checkpoint_every: int = 0) -> TrainResult:
    """Train as configured; the best model on valid ends up in config.model. Returns the metrics.

    A SIGINT or SIGTERM stops the run at the next step with the state saved (Trainer.resume continues
    it) and then raises KeyboardInterrupt, so that a caller such as the demo stops too.
    """
    trainer = Trainer(config)
    (trainer.out / "metrics.jsonl").write_text("")
    result = trainer.run(max_steps, checkpoint_every)
    if result.interrupted is not None:
        name = signal.Signals(result.interrupted).name
        raise KeyboardInterrupt(f"{name}: training state saved in {trainer.out / STATE_DIR}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", help="training text, one sentence per line (.txt or .gz)")
    parser.add_argument("--valid", help="validation text for the schedule and model selection")
    parser.add_argument("--model", help="output directory")
    parser.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR exactly where it stopped")
    parser.add_argument("--unit", choices=("word", "char"), default="word", help="tokens: words or characters")
    parser.add_argument("--min-count", type=int, default=1, help="rarer words map to <unk>")
    parser.add_argument("--max-vocab", type=int, default=None, help="keep at most N entries (incl. <eos>, <unk>)")
    parser.add_argument("--hidden", type=int, default=200, help="hidden units m (default 200)")
    parser.add_argument("--activation", choices=("tanh", "sigmoid", "relu", "identity"), default="tanh")
    parser.add_argument("--output", choices=sorted(OUTPUT_LAYERS), default="softmax",
                        help="output layer: softmax (full), class (class-based softmax, frequency binning), ...")
    parser.add_argument("--classes", type=int, default=100, help="classes for --output class (default 100)")
    parser.add_argument("--direct", type=float, default=0, metavar="M",
                        help="maxent direct connections with a hash of M million weights (rnnlm -direct; "
                        "--output softmax or class; default 0: none)")
    parser.add_argument("--direct-order", type=int, default=3, metavar="N",
                        help="n-gram order of the direct connections' features (default 3)")
    parser.add_argument("--tie", action="store_true",
                        help="tie the input weights to the output layer's (U = Vᵀ: a word's input vector is its "
                        "output vector; half the weights; --output softmax or class)")
    parser.add_argument("--batch", type=int, default=32, help="parallel streams B (default 32)")
    parser.add_argument("--bptt", type=int, default=35, help="BPTT steps (default 35)")
    parser.add_argument("--bptt-block", type=int, default=None, help="update every K1 steps, rnnlm style")
    parser.add_argument("--truncation", type=int, default=None, metavar="K",
                        help="send every error back through at most K recurrent connections (0: no BPTT at all)")
    parser.add_argument("--independent", action="store_true", help="reset the state at every sentence")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"at most N epochs (default {TrainConfig.epochs}; with --resume: a new limit)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: adam 0.002, sgd 5, "
                        "adagrad 0.1, rmsprop 0.001)")
    parser.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="adam",
                        help="update rule (default adam; sgd is rnnlm's and PyTorch's classic)")
    parser.add_argument("--clip", type=float, default=None, metavar="X",
                        help=f"gradient-norm clipping, 0 = off (default {TrainConfig.clip}); with --resume: a new "
                             "threshold from here on (e.g. --clip 0 once the rate is being halved)")
    parser.add_argument("--max-grad-norm", type=float, default=1e3, metavar="X",
                        help="a step whose gradient norm (per-token mean, before clipping) exceeds X, or "
                        "whose loss or gradients are not finite, is undone: back to the last checkpoint, "
                        "rate halved; 0 = no norm bound (default 1000)")
    parser.add_argument("--l2", type=float, default=0.0, help="L2 weight decay on weight matrices")
    parser.add_argument("--init-range", type=float, default=0.1, metavar="R",
                        help="weight matrices start uniform in [-R, R] (default 0.1, rnnlm's); the recurrent "
                        "W's spectral radius grows like R·sqrt(m/3), so wide layers may want a smaller R (docs/results.md)")
    parser.add_argument("--keep-epochs", action="store_true",
                        help="also keep every accepted epoch's weights as a model in DIR/epochs/epoch-N, for "
                        "bptt average (checkpoint averaging) or to evaluate any epoch")
    parser.add_argument("--weight-decay", type=float, default=0.0, metavar="LAMBDA",
                        help="decoupled weight decay on weight matrices (AdamW with adam): w *= 1 - lr*LAMBDA "
                        "every step; unlike --l2 it is not divided by Adam's sqrt(v), so rare words' rows "
                        "shrink no faster than frequent ones (default 0)")
    parser.add_argument("--ar", type=float, default=None, metavar="ALPHA",
                        help="activation regularization (AWD-LSTM's AR): adds ALPHA * mean(s^2) over the hidden "
                        "states to the objective's gradient (default 0; with --resume: a new value from here on)")
    parser.add_argument("--tar", type=float, default=None, metavar="BETA",
                        help="temporal activation regularization (TAR): adds BETA * mean((s^t - s^(t-1))^2) "
                        "within each block (default 0; with --resume: a new value from here on)")
    parser.add_argument("--min-improvement", type=float, default=None,
                        help="Mikolov's schedule: halve the rate when the ratio old/new valid entropy falls under "
                        f"this, a ratio >= 1 (default {TrainConfig.min_improvement}: 0.3 %%); with --resume: a new "
                        "threshold, and a run the schedule had stopped goes on (1.0: until valid gets worse)")
    parser.add_argument("--halving-factor", type=float, default=0.5, metavar="F",
                        help="Mikolov's schedule: once it anneals, multiply the rate by F every epoch (default "
                        "0.5, rnnlm's halving; on PTB 0.3-0.4 end as well in fewer epochs and 0.7 overfits: "
                        "docs/results.md)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="mikolov",
                        help="mikolov: halve every epoch once valid stalls, stop when it stalls again; "
                        "plateau: multiply by --lr-decay after --patience stalled epochs, stop after --max-decays")
    parser.add_argument("--lr-decay", type=float, default=0.25, help="plateau schedule factor (default 0.25)")
    parser.add_argument("--patience", type=int, default=0, help="plateau schedule patience in epochs (default 0)")
    parser.add_argument("--max-decays", type=int, default=3, help="plateau schedule: early stop after N decays")
    parser.add_argument("--seed", type=int, default=0, help="seed: a CPU run is reproducible bit for bit")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="save the training state every N steps (it is always saved at each epoch's end)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N steps in all (resumable with --resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--force", action="store_true", help="train into a --model DIR that holds a model or training state: its model, vocabulary, metrics and state are deleted first")


def _direct_weights(millions: float) -> int:
    """--direct M (millions of weights, rnnlm's unit) -> the hash size in weights."""
    if not math.isfinite(millions) or millions < 0 or millions > 4096:
        raise ValueError(f"--direct must be between 0 and 4096 (millions of weights), got {millions}")
    return int(round(millions * 1_000_000))


def run(args: argparse.Namespace) -> int:
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.max_steps is not None and args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    if args.resume:
        trainer = Trainer.resume(args.resume, progress=not args.quiet)
        changes = {name: getattr(args, name) for name in Trainer.ADJUSTABLE if getattr(args, name) is not None}
        if changes:
            trainer.adjust(**changes)
        if args.epochs is not None or args.min_improvement is not None:
            trainer.extend(args.epochs, args.min_improvement)
    else:
        missing = [f"--{name}" for name in ("train", "valid", "model") if not getattr(args, name)]
        if missing:
            raise ValueError(f"bptt train needs {', '.join(missing)} (or --resume DIR)")
        config = TrainConfig(
            train=args.train, valid=args.valid, model=args.model, unit=args.unit, min_count=args.min_count,
            max_vocab=args.max_vocab, hidden=args.hidden, activation=args.activation, output=args.output,
            classes=args.classes, direct=_direct_weights(args.direct), direct_order=args.direct_order, tie=args.tie, batch=args.batch,
            bptt=args.bptt, bptt_block=args.bptt_block, truncation=args.truncation,
            independent=args.independent, epochs=TrainConfig.epochs if args.epochs is None else args.epochs,
            lr=args.lr, optimizer=args.optimizer, clip=TrainConfig.clip if args.clip is None else args.clip,
            ar=args.ar or 0.0, tar=args.tar or 0.0, l2=args.l2, init_range=args.init_range, weight_decay=args.weight_decay,
            keep_epochs=args.keep_epochs,
            max_grad_norm=args.max_grad_norm,
            min_improvement=TrainConfig.min_improvement if args.min_improvement is None else args.min_improvement,
            halving_factor=args.halving_factor, schedule=args.schedule, lr_decay=args.lr_decay,
            patience=args.patience, max_decays=args.max_decays, seed=args.seed, device=args.device, progress=not args.quiet,
        )
        trainer = Trainer(config)
        (trainer.out / "metrics.jsonl").write_text("")
    try:
        result = trainer.run(args.max_steps, args.checkpoint_every)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: nothing saved since the last checkpoint
        print(f"interrupted at once; the last checkpoint in {trainer.out / STATE_DIR} stands: "
              f"bptt train --resume {trainer.out}", file=sys.stderr)
        return 130
    if result.interrupted is not None:
        print(f"interrupted: training state saved in {trainer.out / STATE_DIR}; "
              f"continue with bptt train --resume {trainer.out}", file=sys.stderr)
        return 128 + int(result.interrupted)
    best = result.best_valid
    status = "finished" if result.finished else f"stopped at step {trainer.global_step} (--resume {trainer.out})"
    print(
        f"{status}: best valid perplexity {best.perplexity:.2f} ({best.entropy_bits:.4f} bits/token), "
        f"{result.seconds:.1f} s; model in {trainer.out}"
    )
    return 0
