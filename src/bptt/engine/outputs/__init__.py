"""Output layers: map hidden states s^t to a loss against the next word, and back to ∂L/∂s^t.

An output layer (the `OutputLayer` protocol below) is a class with
    param_shapes(vocab_size, hidden_size, bias) -> {name: shape}
    forward(params, S (N,m), targets (N,), weights (N,)|None) -> (loss 0-d, cache)
    backward(params, S (N,m), cache, targets, weights, grads) -> dS (N,m), accumulating into grads
    log_probs(params, S (N,m)) -> (N,V) natural-log probabilities, exactly normalized over the
        vocabulary, for evaluation and scoring (whatever the training objective)
    forward_is_nll: True where forward's loss is exactly −Σ ln P(target) (full softmax with
        cross-entropy, class, hsm): evaluation then skips the (N,V) log_probs
    forward_backward(params, S, targets, weights, grads) -> (loss, dS), optional: the pair in one
        call, which the engine uses when present (the full softmax runs it over chunks of positions
        so that its memory does not grow with N·V)
    direct_span(vocab_size), optional: the output units maxent direct connections address; a layer
        that has it takes `features` (N,K) in forward, forward_backward and log_probs (direct.py)

OUTPUT_LAYERS maps the name used by ModelConfig(output=...) and `bptt train --output` to a builder
    builder(vocab_size, *, loss, output_activation, classes, word_counts, seed, class_binning) -> layer
(classes and class_binning: the class layer's, which the others ignore)
A layer that draws random numbers (NCE, sampled softmax) seeds its own generator with `seed` and has
state_dict()/load_state_dict() for it, which the trainer's checkpoints keep.
New layers are a new file plus one entry here; the model, the engine and the trainer stay as they are
(docs/architecture.md, "how to add an output layer").
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from bptt.engine.outputs.class_softmax import CLASS_BINNINGS, ClassSoftmaxOutput, frequency_classes
from bptt.engine.outputs.full import FullOutput
from bptt.engine.outputs.hsm import HierarchicalSoftmaxOutput
from bptt.engine.outputs.sampled import NCEOutput, SampledSoftmaxOutput

Tensor = torch.Tensor


class OutputLayer(Protocol):
    forward_is_nll: bool

    def param_shapes(self, vocab_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]: ...

    def forward(self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None = None
                ) -> tuple[Tensor, Any]: ...

    def backward(self, params: dict[str, Tensor], S: Tensor, cache: Any, targets: Tensor, weights: Tensor | None,
                 grads: dict[str, Tensor]) -> Tensor: ...

    def log_probs(self, params: dict[str, Tensor], S: Tensor) -> Tensor: ...


def _full(vocab_size, *, loss, output_activation, classes, word_counts, seed, class_binning):
    return FullOutput(output_activation, loss)


def _class(vocab_size, *, loss, output_activation, classes, word_counts, seed, class_binning):
    return ClassSoftmaxOutput(frequency_classes(word_counts, classes, class_binning), loss, output_activation)


def _hsm(vocab_size, *, loss, output_activation, classes, word_counts, seed, class_binning):
    return HierarchicalSoftmaxOutput(word_counts, loss, output_activation)


def _nce(vocab_size, *, loss, output_activation, classes, word_counts, seed, class_binning):
    return NCEOutput(word_counts, loss, output_activation, seed=seed)


def _sampled(vocab_size, *, loss, output_activation, classes, word_counts, seed, class_binning):
    return SampledSoftmaxOutput(word_counts, loss, output_activation, seed=seed)


OUTPUT_LAYERS: dict[str, Callable[..., Any]] = {
    "softmax": _full,
    "class": _class,
    "nce": _nce,
    "sampled": _sampled,
    "hsm": _hsm,
}


def make_output(
    name: str, vocab_size: int, *, loss: str, output_activation: str, classes: int = 100, word_counts: Any = None,
    seed: int = 0, class_binning: str = "frequency",
):
    """Build the output layer `name`; word_counts (V,) default to all ones (no frequency information)."""
    if name not in OUTPUT_LAYERS:
        raise ValueError(f"unknown output {name!r}; choose one of {list(OUTPUT_LAYERS)}")
    counts = list(word_counts) if word_counts is not None else [1] * vocab_size
    if len(counts) != vocab_size:
        raise ValueError(f"word_counts has {len(counts)} entries, the vocabulary {vocab_size}")
    return OUTPUT_LAYERS[name](
        vocab_size, loss=loss, output_activation=output_activation, classes=classes, word_counts=counts, seed=seed,
        class_binning=class_binning,
    )


__all__ = [
    "CLASS_BINNINGS", "OUTPUT_LAYERS", "OutputLayer", "ClassSoftmaxOutput", "FullOutput", "HierarchicalSoftmaxOutput", "NCEOutput",
    "SampledSoftmaxOutput", "make_output",
]
