"""Models: the description (ModelConfig), the general model built from it (LanguageModel), the seed's
ElmanLM, and build_model, which gives the right class for a configuration."""

from __future__ import annotations

from typing import Any

import torch

from bptt.model.config import DTYPES, ModelConfig
from bptt.model.elman import ElmanLM, resolve_dtype
from bptt.model.language_model import LanguageModel


def build_model(config: ModelConfig, *, word_counts: Any = None, seed: int = 0,
                device: str | torch.device = "cpu") -> LanguageModel:
    """The model of a configuration: an ElmanLM (the seed's API) for one Elman layer, else a LanguageModel."""
    if config.cell == "elman" and config.layers == 1 and config.embedding == 0:
        return ElmanLM.from_config(config, word_counts=word_counts, seed=seed, device=device)
    return LanguageModel(config, word_counts=word_counts, seed=seed, device=device)


__all__ = ["DTYPES", "ElmanLM", "LanguageModel", "ModelConfig", "build_model", "resolve_dtype"]
