"""Evaluation: the fast path (forward's exact NLL) and the general one (all V log-probabilities) agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bptt import ElmanLM
from bptt.evaluation import dynamic_stream_nats, stream_nats
from bptt.model import ModelConfig, build_model

COUNTS = [40, 20, 10, 8, 6, 5, 3, 2, 1, 1, 1, 1]
# the cells beyond the seed's, with dropout: evaluation (static and dynamic) never drops anything
CELLS = {"lstm": dict(cell="lstm", layers=2, dropout=0.5), "gru": dict(cell="gru", dropout=0.5, variational=True)}


def make_model(cell: str, V: int, m: int, **kw):
    """The seed's ElmanLM, or a model of another cell (with dropout) built from its ModelConfig."""
    if cell == "elman":
        return ElmanLM(V, m, dtype=torch.float64, **kw)
    seed = kw.pop("seed", 0)
    word_counts = kw.pop("word_counts", None)
    config = ModelConfig(vocab_size=V, hidden_size=m, dtype="float64", **CELLS[cell], **kw)
    return build_model(config, word_counts=word_counts, seed=seed)


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
    from bptt.evaluation import EVAL_BLOCK_MAX, EVAL_BLOCK_MIN, EVAL_SCORES, eval_block

    assert eval_block(12) == EVAL_BLOCK_MAX
    assert eval_block(10_000) == EVAL_SCORES // 10_000  # the (block, V) scores stay under EVAL_SCORES
    assert eval_block(10_000) * 10_000 <= EVAL_SCORES
    assert eval_block(10_000_000) == EVAL_BLOCK_MIN


# -- dynamic evaluation (rnnlm -dynamic) ------------------------------------------------------------


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
@pytest.mark.parametrize("output", ["softmax", "class", "hsm"])
def test_dynamic_evaluation_at_rate_zero_is_the_static_one(output, cell):
    model = make_model(cell, 12, 6, output=output, classes=3, word_counts=COUNTS, init_range=0.5)
    ids = np.random.default_rng(3).integers(0, 12, size=400).astype(np.int32)
    before = {k: p.clone() for k, p in model.params.items()}
    assert dynamic_stream_nats(model, ids, eos_id=0, lr=0.0, block=9) == pytest.approx(
        stream_nats(model, ids, eos_id=0), rel=1e-12)
    assert all(torch.equal(before[k], model.params[k]) for k in before)


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_dynamic_evaluation_learns_from_the_text_and_never_scores_a_word_it_has_seen(cell):
    model = make_model(cell, 12, 8, seed=1)
    phrase = np.random.default_rng(4).integers(0, 12, size=20).astype(np.int32)
    ids = np.tile(phrase, 30)  # a text that repeats itself: a model that adapts must gain
    static = stream_nats(model, ids, eos_id=0)
    dynamic = dynamic_stream_nats(make_model(cell, 12, 8, seed=1), ids, eos_id=0, lr=0.1, block=10)
    # the gated cells adapt more slowly at this rate (their gates scale every error down; measured 0.947
    # of the static nats for both, where the Elman model reaches < 0.8), and diverge at rates near 1
    assert dynamic < (0.8 if cell == "elman" else 0.97) * static
    # the first block is scored before any update: a text of one block scores the same at any rate
    short = ids[:10]
    fresh = [make_model(cell, 12, 8, seed=1) for _ in range(2)]
    assert dynamic_stream_nats(fresh[0], short, 0, lr=5.0, block=10) == pytest.approx(
        dynamic_stream_nats(fresh[1], short, 0, lr=0.0, block=10), rel=1e-12)
    # ... and the second block by weights that took one step on the first (an update after scoring)
    two = ids[:20]
    a, b = (make_model(cell, 12, 8, seed=1) for _ in range(2))
    assert dynamic_stream_nats(a, two, 0, lr=0.05, block=10) != pytest.approx(
        dynamic_stream_nats(b, two, 0, lr=0.0, block=10), rel=1e-9)


def test_dynamic_evaluation_refuses_sampled_objectives_and_bad_rates():
    ids = np.arange(10, dtype=np.int32) % 12
    with pytest.raises(ValueError, match="exact log-likelihood"):
        dynamic_stream_nats(ElmanLM(12, 4, output="nce", word_counts=COUNTS), ids, 0, lr=0.1)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="--dynamic"):
            dynamic_stream_nats(ElmanLM(12, 4), ids, 0, lr=bad)
    with pytest.raises(ValueError, match="--dynamic-block"):
        dynamic_stream_nats(ElmanLM(12, 4), ids, 0, lr=0.1, block=0)


def test_perplexity_of_a_diverged_model_is_inf_not_an_error():
    """exp(nats/token) overflows a float for a diverged model: the perplexity is inf (printed, saved),
    never an OverflowError (the fuzz campaign found one behind `eval --dynamic 9e18`)."""
    import math

    from bptt.evaluation import Evaluation

    assert Evaluation(10, 1e9, 0).perplexity == math.inf
    assert Evaluation(10, 10 * 699.0, 0).perplexity == math.exp(699.0)
    assert Evaluation(4, 8.0, 0).to_json()["perplexity"] == math.exp(2.0)
