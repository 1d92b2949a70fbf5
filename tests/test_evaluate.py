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


@pytest.mark.parametrize("output", ["softmax", "class"])
def test_block_size_does_not_change_the_result(output):
    """The state and the direct-connection context carry across blocks: one block of 5000 positions
    (the default here), blocks of 7 and blocks of 1 give the same −Σ ln P."""
    model = ElmanLM(12, 6, output=output, classes=3, word_counts=COUNTS, dtype=torch.float64, init_range=0.5,
                    direct=64, direct_order=3)
    model.params["D"].normal_(generator=torch.Generator().manual_seed(2))  # D starts at zero: make it count
    ids = np.random.default_rng(1).integers(0, 12, size=5000).astype(np.int32)
    whole = stream_nats(model, ids, eos_id=0)
    assert stream_nats(model, ids, eos_id=0, block=7) == pytest.approx(whole, rel=1e-12)
    assert stream_nats(model, ids[:300], eos_id=0, block=1) == pytest.approx(
        stream_nats(model, ids[:300], eos_id=0), rel=1e-12)


def test_eval_block_bounds():
    from bptt.resources import EVAL_BLOCK_MAX, EVAL_BLOCK_MIN, EVAL_SCORES, eval_block

    assert eval_block(12) == EVAL_BLOCK_MAX
    assert eval_block(10_000) == EVAL_SCORES // 10_000  # the (block, V) scores stay under EVAL_SCORES
    assert eval_block(10_000) * 10_000 <= EVAL_SCORES
    assert eval_block(10_000_000) == EVAL_BLOCK_MIN
