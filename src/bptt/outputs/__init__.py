"""Output layers: map hidden states s^t to a loss against the next word, and back to ∂L/∂s^t.

An output layer is a class with
    param_shapes(vocab_size, hidden_size, bias) -> {name: shape}
    forward(params, S (N,m), targets (N,), weights (N,)|None) -> (loss 0-d, cache)
    backward(params, S (N,m), cache, targets, weights, grads) -> dS (N,m), accumulating into grads
    log_probs(params, S (N,m)) -> (N,V) natural-log probabilities, exactly normalized over the
        vocabulary, for evaluation and scoring (whatever the training objective)

OUTPUT_LAYERS maps the name used by ElmanLM(output=...) and `bptt train --output` to a builder
    builder(vocab_size, *, loss, output_activation, classes, word_counts) -> layer
New layers are a new file plus one entry here; the model, the engine and the trainer stay as they are.
"""

from __future__ import annotations

from typing import Any, Callable

from bptt.outputs.class_softmax import ClassSoftmaxOutput, frequency_classes
from bptt.outputs.full import FullOutput


def _full(vocab_size: int, *, loss: str, output_activation: str, classes: int, word_counts: Any) -> FullOutput:
    return FullOutput(output_activation, loss)


def _class(vocab_size: int, *, loss: str, output_activation: str, classes: int, word_counts: Any) -> ClassSoftmaxOutput:
    return ClassSoftmaxOutput(frequency_classes(word_counts, classes), loss, output_activation)


OUTPUT_LAYERS: dict[str, Callable[..., Any]] = {
    "softmax": _full,
    "class": _class,
}


def make_output(
    name: str, vocab_size: int, *, loss: str, output_activation: str, classes: int = 100, word_counts: Any = None
):
    """Build the output layer `name`; word_counts (V,) default to all ones (no frequency information)."""
    if name not in OUTPUT_LAYERS:
        raise ValueError(f"unknown output {name!r}; choose one of {list(OUTPUT_LAYERS)}")
    counts = list(word_counts) if word_counts is not None else [1] * vocab_size
    if len(counts) != vocab_size:
        raise ValueError(f"word_counts has {len(counts)} entries, the vocabulary {vocab_size}")
    return OUTPUT_LAYERS[name](
        vocab_size, loss=loss, output_activation=output_activation, classes=classes, word_counts=counts
    )


__all__ = ["OUTPUT_LAYERS", "ClassSoftmaxOutput", "FullOutput", "make_output"]
