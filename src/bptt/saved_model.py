"""A trained model on disk: DIR/model.safetensors (weights), DIR/config.json, DIR/vocab.json.

No pickle anywhere: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bptt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bptt.data import Vocab
from bptt.model import ElmanLM, check_device

VOCAB_FILE = "vocab.json"


def model_config(model: ElmanLM) -> dict:
    """The constructor arguments that rebuild `model` (JSON-able)."""
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "hidden_activation": model.hidden_activation,
        "output_activation": model.output_activation,
        "loss": model.loss_name,
        "bias": model.bias,
        "dtype": str(model.dtype).removeprefix("torch."),
        "output": model.output_name,
        "classes": model.classes,
    }


def save_model(directory: str | Path, model: ElmanLM, extra: dict | None = None) -> None:
    """Write the weights and config.json (with `extra`, e.g. training state and metrics) atomically."""
    config = {"model": model_config(model), "vocab_file": VOCAB_FILE, **(extra or {})}
    save_checkpoint(directory, dict(model.params), config)


def load_model(directory: str | Path, device: str = "cpu") -> tuple[ElmanLM, Vocab, dict]:
    """-> (model with the saved weights, its vocabulary, the whole config). CheckpointError if unusable."""
    directory = Path(directory)
    device = check_device(device)  # a clear error before any tensor is moved
    tensors, config = load_checkpoint(directory, device=device)
    vocab = Vocab.load(directory / config.get("vocab_file", VOCAB_FILE))
    try:
        model = ElmanLM(**config["model"], device=device, word_counts=vocab.counts)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: bad model section: {e}") from None
    for name, p in model.params.items():
        if name not in tensors or tensors[name].shape != p.shape:
            raise CheckpointError(f"{directory / 'model.safetensors'}: tensor {name!r} missing or of the wrong shape")
        p.copy_(tensors[name])
    if len(vocab) != model.vocab_size:
        raise CheckpointError(f"{directory / VOCAB_FILE}: {len(vocab)} words, the model has {model.vocab_size}")
    return model, vocab, config


def copy_params(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
    for name, p in dst.items():
        p.copy_(src[name])
