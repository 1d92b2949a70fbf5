"""TrainConfig: how a run trains — the corpora, the batching and BPTT windows, the update rule and its
schedule — with the model it trains as a nested ModelConfig (model/config.py).

`bptt train` maps its options onto these two dataclasses (commands/train.py); a checkpoint stores
to_json() and resume reads it back with from_json(), which also reads the flat layout of checkpoints
written before the model description was its own dataclass (hidden, activation, output, ..., tie).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from bptt import checks
from bptt.model.config import ModelConfig

SCHEDULES = ("mikolov", "plateau", "step")
MAX_LR = 1e4  # a larger rate is a typo, not a setting
DEFAULT_LR = {"sgd": 5.0, "adam": 2e-3, "adagrad": 0.1, "rmsprop": 1e-3}

# the command-line names of the model's fields, for the messages of validate()
MODEL_LABELS = {f.name: f.metadata["cli"] for f in dataclasses.fields(ModelConfig) if "cli" in f.metadata}
# keys of the flat "training" sections written before ModelConfig -> ModelConfig fields
LEGACY_MODEL_KEYS = {"hidden": "hidden_size", "activation": "hidden_activation", "output": "output",
                     "classes": "classes", "direct": "direct", "direct_order": "direct_order", "tie": "tied",
                     "init_range": "init_range"}


MIN_IMPROVEMENT = {"mikolov": 1.003, "plateau": 1.0, "step": 1.003}  # --min-improvement's default per --schedule


@dataclass
class TrainConfig:
    train: str | None  # the training text (None with data)
    valid: str | None  # the validation text (None with data)
    model: str  # the run directory
    model_config: ModelConfig = field(default_factory=ModelConfig)  # what is trained (vocab_size from the corpus)
    unit: str = "word"
    min_count: int = 1
    max_vocab: int | None = None
    batch: int = 32
    bptt: int = 35
    bptt_block: int | None = None
    truncation: int | None = None  # cap every error's path at k recurrent connections; 0: no BPTT at all (None: no cap)
    independent: bool = False
    epochs: int = 20
    lr: float | None = None
    optimizer: str = "adam"
    clip: float = 0.25
    max_grad_norm: float = 1e3  # a step with a larger gradient norm (per-token mean) is rolled back; 0: off
    l2: float = 0.0
    weight_decay: float = 0.0  # decoupled (AdamW-style): p *= 1 − lr·λ on weight matrices every step
    ar: float = 0.0  # activation regularization: α · mean s² on the hidden states (regularizers.py)
    tar: float = 0.0  # temporal activation regularization: β · mean (s^t − s^{t−1})²
    keep_epochs: bool = False  # also keep each accepted epoch's weights in DIR/epochs/epoch-N (bptt average)
    # the schedule's threshold on old/new valid entropy; None: the schedule's own (MIN_IMPROVEMENT: rnnlm's
    # 0.3 % for mikolov, 1.0 for plateau — PyTorch word_language_model's "any improvement")
    min_improvement: float | None = None
    halving_factor: float = 0.5  # Mikolov's schedule: the rate's factor per epoch once it anneals
    schedule: str = "mikolov"  # or "plateau": divide by lr_decay after `patience` flat epochs; "step": Zaremba's
    decay_start: int = 4  # step schedule: the rate is multiplied by halving_factor after every epoch from this one
    lr_decay: float = 0.25
    patience: int = 0
    max_decays: int = 3  # plateau: stop early instead of a further decay
    seed: int = 0
    device: str = "cpu"
    # the word-indexed matrices (embedding, factorized output rows) zeroed, clipped and updated row by row:
    # auto | on | off (training/sparse_rows.py)
    sparse_updates: str = "auto"
    # under torchrun: 0 = the gradients all-reduced every step; K > 0 = model averaging, each rank steps
    # alone and the models are averaged every K steps (training/distributed.py)
    average_every: int = 0
    # save the training state every N steps besides each epoch's end (0: only there); kept by --resume
    checkpoint_every: int = 0
    graph: bool = False  # each block's whole step (update included) replayed as one CUDA graph (static step)
    progress: bool = True
    # a directory written by `bptt prepare`, instead of train and valid: its vocabulary and its memory-mapped
    # corpora; the trainer sets unit, min_count and max_vocab from it, and data_sha256 (the sha256 of its
    # meta.json), which a resumed run checks
    data: str | None = None
    data_sha256: str | None = None
    # the working directory the run started in (absolute; set by the trainer): a resumed run reads relative
    # train/valid/data paths from there, wherever it is resumed from (resolved_paths)
    workdir: str | None = None

    def __post_init__(self) -> None:
        if self.min_improvement is None:
            self.min_improvement = MIN_IMPROVEMENT.get(self.schedule, MIN_IMPROVEMENT["mikolov"])

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """TrainConfig(...) with the model's fields given alongside the training ones:
        from_options(train=..., valid=..., model=DIR, hidden_size=8, batch=4)."""
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model = {k: options.pop(k) for k in list(options) if k in model_fields}
        base = options.pop("model_config", ModelConfig())
        return cls(**options, model_config=dataclasses.replace(base, **model))

    def validate(self) -> TrainConfig:
        """ValueError naming the command-line option of a bad value."""
        if self.data is not None and (self.train is not None or self.valid is not None):
            raise ValueError("--data: give either --data DATA or --train and --valid, not both")
        if self.data is None and (not self.train or not self.valid):
            raise ValueError(f"bptt train needs {'--valid' if self.train else '--train'} (or --data DATA)")
        self.model_config.validate(MODEL_LABELS)
        for option in ("batch", "bptt", "epochs", "min_count"):
            checks.positive_int(f"--{option.replace('_', '-')}", getattr(self, option))
        if self.truncation is not None:
            checks.integer("--truncation", self.truncation, minimum=0, what="an integer >= 0 (0: no back-propagation through time at all)")
        if self.bptt_block is not None:
            checks.positive_int("--bptt-block", self.bptt_block)
        if self.lr is not None:
            checks.number("--lr", self.lr, 0, MAX_LR, low_open=True, what=f"positive and at most {MAX_LR:g}")
        checks.non_negative_int("--checkpoint-every", self.checkpoint_every)
        checks.integer("--seed", self.seed, 0, (1 << 64) - 1)
        checks.number("--clip", self.clip, 0, what="a finite number >= 0 (0: off)")
        for option in ("ar", "tar"):
            checks.number(f"--{option}", getattr(self, option), 0, what="a finite number >= 0 (0: off)")
        checks.number("--l2", self.l2, 0, 1, high_open=True)
        checks.choice("--optimizer", self.optimizer, sorted(DEFAULT_LR))
        lr = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
        if not (0 <= self.weight_decay < math.inf and lr * self.weight_decay < 1):
            raise ValueError(f"--weight-decay must be >= 0 with lr × decay < 1 (lr {lr:g}), got {self.weight_decay}")
        # below 1 the schedule would never halve nor stop
        checks.number("--min-improvement", self.min_improvement, 1,
                      what="a ratio of entropies, at least 1 (1.003: improve by 0.3 %)")
        checks.choice("--schedule", self.schedule, SCHEDULES)
        checks.number("--halving-factor", self.halving_factor, 0, 1, low_open=True, high_open=True)
        checks.number("--lr-decay", self.lr_decay, 0, 1, low_open=True, high_open=True)
        checks.non_negative_int("--patience", self.patience)
        checks.non_negative_int("--decay-start", self.decay_start)
        checks.non_negative_int("--max-decays", self.max_decays)
        checks.number("--max-grad-norm", self.max_grad_norm, 0, what="a finite number >= 0 (0: off)")
        checks.choice("--sparse-updates", self.sparse_updates, ("auto", "on", "off"))
        checks.non_negative_int("--average-every", self.average_every)
        if self.graph and self.sparse_updates == "on":
            raise ValueError("--sparse-updates on does not go with --graph (a captured step has fixed shapes)")
        checks.device(self.device)  # before the corpora are read
        if self.graph:
            if self.independent or (self.bptt_block is not None and self.bptt_block != self.bptt):
                raise ValueError("--graph needs continuous streams with one window per block (no --independent, "
                                 "no --bptt-block)")
            if self.model_config.output != "softmax":
                raise ValueError(f"--graph needs --output softmax (the {self.model_config.output!r} layer's shapes or "
                                 "noise depend on the data), got " + repr(self.model_config.output))
        return self

    @property
    def k1(self) -> int:
        """Steps per block (an update every k1 steps)."""
        return self.bptt_block or self.bptt

    @property
    def k2(self) -> int:
        """Steps of each backward sweep (k1 + the history kept from earlier blocks)."""
        return self.bptt + self.bptt_block if self.bptt_block else self.bptt

    @property
    def initial_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def resolved_paths(self) -> TrainConfig:
        """A resumed run's corpora: relative train/valid/data paths taken from `workdir` (the directory the
        run started in) when they are there, else as they are (from the current directory)."""
        if self.workdir is None:
            return self
        def resolve(path: str | None) -> str | None:
            if path is None or os.path.isabs(path):
                return path
            there = os.path.join(self.workdir, path)
            return there if os.path.exists(there) else path
        return dataclasses.replace(self, train=resolve(self.train), valid=resolve(self.valid), data=resolve(self.data))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> TrainConfig:
        """A checkpoint's "training" section -> TrainConfig; the flat layout of older checkpoints too."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        if "model_config" in d:
            model = ModelConfig.from_json(d.pop("model_config"))
        else:
            legacy = {LEGACY_MODEL_KEYS[k]: d.pop(k) for k in list(d) if k in LEGACY_MODEL_KEYS}
            model = ModelConfig(**legacy)
        floats = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, float)}
        for name in floats & d.keys():  # a number written as an integer (e.g. by hand): as the CLI would give it
            if isinstance(d[name], int) and not isinstance(d[name], bool):
                d[name] = float(d[name])
        return cls(**d, model_config=model)
