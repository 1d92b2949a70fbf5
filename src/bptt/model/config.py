"""ModelConfig: the one description of a model, from which it is built, saved, estimated and mapped
from the command line.

    build     bptt.model.build_model(config, ...) / LanguageModel(config, ...)
    save      config.json's "model" section is config.to_json() (format_version 2, storage/saved_model.py)
    estimate  training/resources.py counts the parameters the model would allocate from it
    CLI       `bptt train` adds one option per field that has "cli" metadata (commands/train.py)

A new field is one line here (with its check in validate() and, for the command line, its option in
the metadata); everything else reads the dataclass. Model directories of format 0 and 1 hold the
arguments of ElmanLM, which from_legacy maps to a one-layer Elman ModelConfig.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from bptt import checks
from bptt.engine.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
from bptt.engine.cells import CELLS
from bptt.engine.losses import LOSSES
from bptt.engine.outputs import CLASS_BINNINGS, OUTPUT_LAYERS

MAX_DIRECT_ORDER = 16  # n-gram orders of the direct connections: each is a hash per position and order

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
TIED_OUTPUTS = ("softmax", "class")  # output layers with a matrix V of one row per word
DIRECT_OUTPUTS = ("softmax", "class")  # output layers that take maxent direct connections
MAX_DIRECT_MILLIONS = 4096
MAX_LAYERS = 1024  # a deeper stack is a typo (and each layer is a Python object before any weight exists)


def direct_weights(millions: float) -> int:
    """--direct M (millions of weights, rnnlm's unit) -> the hash size in weights."""
    millions = checks.number("--direct", millions, 0, MAX_DIRECT_MILLIONS,
                             what=f"between 0 and {MAX_DIRECT_MILLIONS} (millions of weights)")
    return int(round(millions * 1_000_000))


def _cli(option: str, help: str, **argparse_kwargs: Any) -> dict[str, Any]:
    return {"cli": option, "help": help, **argparse_kwargs}


@dataclass(frozen=True)
class ModelConfig:
    """The model: sizes, cell and depth, output layer, direct connections, tying, dtype, initialisation."""

    vocab_size: int = 0  # V; 0 until the vocabulary is known (a training configuration)
    hidden_size: int = field(default=200, metadata=_cli("--hidden", "hidden units m per layer (default 200)"))
    cell: str = field(default="elman", metadata=_cli(
        "--cell", "recurrent cell (default elman, the seed's)", choices=lambda: sorted(CELLS)))
    layers: int = field(default=1, metadata=_cli(
        "--layers", "stacked recurrent layers; layer k > 0 reads layer k-1's output (default 1)"))
    embedding_size: int | None = field(default=None, metadata=_cli(
        "--embedding", "embedding size e: the words are looked up in E (V,e) and the first layer reads them (default: "
        "the hidden size for lstm and gru; none for elman, whose first layer gathers U x^t, the seed's; 0: none)",
        metavar="E", type=int))
    forget_bias: float = field(default=0.0, metadata=_cli(
        "--forget-bias", "the LSTM's forget-gate bias at the start (default 0, PyTorch's; 1: Jozefowicz et al.)",
        metavar="X", type=float))
    dropout: float = field(default=0.0, metadata=_cli(
        "--dropout", "dropout rate between layers and before the output layer, and on the embedding unless "
        "--dropout-embedding says otherwise (training only; default 0)", metavar="P", type=float))
    dropout_embedding: float | None = field(default=None, metadata=_cli(
        "--dropout-embedding", "dropout rate on the first layer's input, the embedding (default: --dropout)",
        metavar="P", type=float))
    variational: bool = field(default=False, metadata=_cli(
        "--variational", "variational (locked) dropout: one mask per stream for the whole block (Gal & Ghahramani) "
        "instead of one per position", action="store_true"))
    hidden_activation: str = field(default="tanh", metadata=_cli(
        "--activation", "the Elman cell's hidden nonlinearity F (default tanh)", choices=lambda: sorted(HIDDEN_ACTIVATIONS)))
    output: str = field(default="softmax", metadata=_cli(
        "--output", "output layer: softmax (full), class (class-based softmax, --classes, --class-binning), hsm "
        "(hierarchical softmax, Huffman tree), nce, sampled (training-time approximations)",
        choices=lambda: sorted(OUTPUT_LAYERS)))
    output_activation: str = "softmax"  # f (sigmoid and identity with the quadratic loss: the seed's variants)
    loss: str = "cross_entropy"
    classes: int = field(default=100, metadata=_cli("--classes", "classes for --output class (default 100)"))
    class_binning: str = field(default="frequency", metadata=_cli(
        "--class-binning", "how --output class cuts the count-sorted vocabulary into classes: equal shares of the "
        "counts (frequency, rnnlm's -old-classes) or of their square roots (sqrt, rnnlm's default: smaller classes "
        "for the rare words, less arithmetic; default frequency)", choices=lambda: list(CLASS_BINNINGS)))
    bias: bool = True
    direct: int = field(default=0, metadata=_cli(
        "--direct", "maxent direct connections with a hash of M million weights (rnnlm -direct; --output softmax "
        "or class; default 0: none)", metavar="M", type=float, convert=direct_weights))
    direct_order: int = field(default=3, metadata=_cli(
        "--direct-order", "n-gram order of the direct connections' features (default 3)", metavar="N"))
    tied: bool = field(default=False, metadata=_cli(
        "--tie", "tie the input weights to the output layer's (U = Vᵀ: a word's input vector is its output vector; "
        "half the weights; --output softmax or class)", action="store_true"))
    dtype: str = "float32"
    init_range: float = field(default=0.1, metadata=_cli(
        "--init-range", "weight matrices start uniform in [-R, R] (default 0.1, rnnlm's); the recurrent W's spectral "
        "radius grows like R·sqrt(m/3), so wide layers may want a smaller R (docs/results.md)", metavar="R"))

    # -- checks ---------------------------------------------------------------------------------------

    def validate(self, labels: dict[str, str] | None = None) -> ModelConfig:
        """ValueError naming the field (or, with labels {field: "--option"}, the option) of a bad value."""
        name = (lambda f: (labels or {}).get(f, f))
        if self.vocab_size != 0:
            checks.integer(name("vocab_size"), self.vocab_size, minimum=2, what="an integer, at least 2")
        checks.positive_int(name("hidden_size"), self.hidden_size)
        checks.choice(name("cell"), self.cell, CELLS)
        checks.integer(name("layers"), self.layers, 1, MAX_LAYERS)
        if self.embedding_size is not None:
            checks.non_negative_int(name("embedding_size"), self.embedding_size)
        checks.number(name("forget_bias"), self.forget_bias, -1e6, 1e6, what="a number between -1e6 and 1e6")
        checks.number(name("dropout"), self.dropout, 0, 1, high_open=True)
        if self.dropout_embedding is not None:
            checks.number(name("dropout_embedding"), self.dropout_embedding, 0, 1, high_open=True)
        checks.flag(name("variational"), self.variational)
        if "hidden_activation" in getattr(CELLS[self.cell], "options", ()):
            checks.choice(name("hidden_activation"), self.hidden_activation, HIDDEN_ACTIVATIONS)
        checks.choice(name("output"), self.output, OUTPUT_LAYERS)
        checks.choice(name("output_activation"), self.output_activation, OUTPUT_ACTIVATIONS)
        checks.choice(name("loss"), self.loss, LOSSES)
        checks.positive_int(name("classes"), self.classes)
        checks.choice(name("class_binning"), self.class_binning, CLASS_BINNINGS)
        checks.flag(name("bias"), self.bias)
        checks.non_negative_int(name("direct"), self.direct)
        checks.integer(name("direct_order"), self.direct_order, 1, MAX_DIRECT_ORDER,
                       what=f"an integer from 1 to {MAX_DIRECT_ORDER} (rnnlm's orders are 2 to 4)")
        if self.direct and self.output not in DIRECT_OUTPUTS:
            raise ValueError(f"direct connections need {name('output')} 'softmax' or 'class', not {self.output!r}")
        checks.flag(name("tied"), self.tied)
        if self.tied and self.output not in TIED_OUTPUTS:
            raise ValueError(f"{name('tied')} needs {name('output')} 'softmax' or 'class' (a matrix V with a row per "
                             f"word), got {self.output!r}")
        if self.tied and self.embedding == 0 and getattr(CELLS[self.cell], "gates", 1) != 1:
            raise ValueError(f"{name('tied')} without an embedding ties the first layer's input weights U to Vᵀ, but the "
                             f"{self.cell} cell's U has {CELLS[self.cell].gates} gates' rows: give "
                             f"{name('embedding_size')} {self.hidden_size}")
        if self.tied and self.embedding not in (0, self.hidden_size):
            raise ValueError(f"{name('tied')} needs {name('embedding_size')} equal to {name('hidden_size')} "
                             f"{self.hidden_size} (the output layer's V is the embedding), got {self.embedding}")
        checks.choice(name("dtype"), self.dtype, DTYPES)
        checks.number(name("init_range"), self.init_range, low=0, high=1e3, low_open=True,
                      what="a positive number, at most 1e3")
        return self

    # -- derived --------------------------------------------------------------------------------------

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def embedding(self) -> int:
        """The embedding size e in effect: embedding_size, or by default the hidden size for a cell that
        reads words through an embedding (its class attribute `embedding`: lstm, gru) and 0 otherwise."""
        if self.embedding_size is not None:
            return self.embedding_size
        return self.hidden_size if getattr(CELLS.get(self.cell), "embedding", False) else 0

    @property
    def input_dropout(self) -> float:
        """The dropout rate on the first layer's input: dropout_embedding, by default dropout."""
        return self.dropout if self.dropout_embedding is None else self.dropout_embedding

    def cell_options(self) -> dict[str, Any]:
        """The fields the cell's constructor takes (its class attribute `options`)."""
        return {option: getattr(self, option) for option in getattr(CELLS[self.cell], "options", ())}

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(self, vocab_size=int(vocab_size))

    # -- files ----------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> ModelConfig:
        """A "model" section of format 2 -> ModelConfig, unchecked (call validate()); ValueError naming
        an unknown or missing key or a value of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}")
        for key in ("vocab_size", "hidden_size"):
            if key not in d:
                raise ValueError(f"no {key!r}")
        for key, value in d.items():
            _check_type(key, value, known[key].type)
        return cls(**d)

    @classmethod
    def from_legacy(cls, d: Any) -> ModelConfig:
        """The "model" section of format 0 or 1 (ElmanLM's arguments) -> a one-layer Elman ModelConfig."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("classes") is None:
            d["classes"] = 100
        return cls.from_json(d)


_TYPES = {"int": int, "str": str, "bool": bool, "float": (int, float)}


def _check_type(key: str, value: Any, annotation: str) -> None:
    annotation = str(annotation)
    if annotation.endswith(" | None"):
        if value is None:
            return
        annotation = annotation.removesuffix(" | None")
    want = _TYPES[annotation]
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        what = {"int": "an integer", "str": "a string", "bool": "true or false", "float": "a finite number"}[str(annotation)]
        raise ValueError(f"{key!r} must be {what}, got {value!r:.60}")
