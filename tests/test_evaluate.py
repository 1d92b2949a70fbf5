"""Evaluation: the fast path (forward's exact NLL) and the general one (all V log-probabilities) agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bptt import ElmanLM
from bptt.evaluate import stream_nats

COUNTS = [40, 20, 10, 8, 6, 5, 3, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("output", ["softmax", "class", "hsm"])
def test_nll_fast_path_equals_log_probs_path(output, monkeypatch):
    model = ElmanLM(12, 6, output=output, classes=3, word_counts=COUNTS, dtype=torch.float64, init_range=0.5)
    ids = np.random.default_rng(0).integers(0, 12, size=300).astype(np.int32)
    assert model.output.forward_is_nll
    fast = stream_nats(model, ids, eos_id=0, block=64)
    monkeypatch.setattr(model.output, "forward_is_nll", False, raising=False)
    slow = stream_nats(model, ids, eos_id=0, block=64)
    assert fast == pytest.approx(slow, rel=1e-12)
