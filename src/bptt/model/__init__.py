"""Models: the description (ModelConfig), the general model built from it (LanguageModel), the seed's
ElmanLM, RNNLM (any cell, depth and size, with the users' methods), build_model, which gives the right
class for a configuration, and the export to PyTorch's layout (export.py)."""

from __future__ import annotations

from typing import Any

import torch

from bptt.model.config import DTYPES, ModelConfig
from bptt.model.elman import ElmanLM, resolve_dtype
from bptt.model.language_model import LanguageModel
from bptt.model.rnnlm import RNNLM


def build_model(config: ModelConfig, *, word_counts: Any = None, seed: int = 0,
                device: str | torch.device = "cpu") -> LanguageModel:
    """The model of a configuration: an ElmanLM (the seed's API) for one Elman layer reading words directly,
    else an RNNLM (bptt.RNNLM: loss_and_grads, log_probs with an explicit State)."""
    if ElmanLM.represents(config):
        return ElmanLM.from_config(config, word_counts=word_counts, seed=seed, device=device)
    return RNNLM.from_config(config, word_counts=word_counts, seed=seed, device=device)


__all__ = ["DTYPES", "ElmanLM", "LanguageModel", "ModelConfig", "RNNLM", "build_model", "resolve_dtype"]
