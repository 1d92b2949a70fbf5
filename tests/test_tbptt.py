"""BPTT(k1, k2) on a stream: each block's gradient against autograd over the same window."""

from __future__ import annotations

import pytest
import torch

from bptt import TruncatedBPTT
from bptt.oracle import autograd_loss_and_grads
from conftest import make_case, max_rel_error


@pytest.mark.parametrize("k1, k2, truncation", [(5, 5, None), (5, 8, None), (3, 10, None), (4, 9, 2), (5, 5, 0), (1, 4, None)])
def test_blocks_match_autograd_over_their_windows(k1, k2, truncation):
    N, B = 23, 2  # 23 is not a multiple of k1: the last block is short
    model, x, y, _ = make_case("tanh", "softmax", "cross_entropy", V=9, m=4, T=N, B=B, carried_h0=False)
    engine = TruncatedBPTT(model, k1, k2, truncation)
    S = model.forward(x)  # the weights do not change here, so these are the states the engine sees
    for start in range(0, N, k1):
        end = min(start + k1, N)
        loss, grads = engine.step(x[start:end], y[start:end])
        window_start = max(0, start - (k2 - k1))  # the block plus k2 − k1 steps of history
        h = S[window_start - 1] if window_start > 0 else None
        mask = torch.zeros(end - window_start, B)
        mask[start - window_start:] = 1  # errors come from the block's positions only
        ref_loss, ref = autograd_loss_and_grads(
            model.params, "tanh", "softmax", "cross_entropy", x[window_start:end], y[window_start:end], h,
            truncation=truncation, mask=mask,
        )
        assert abs(float(loss - ref_loss)) <= 1e-10 and max_rel_error(grads, ref) <= 1e-10
        torch.testing.assert_close(engine.state.hidden, S[end - 1])


def test_k1_equals_k2_is_loss_and_grads_with_the_carried_state():
    model, x, y, _ = make_case("relu", "softmax", "cross_entropy", V=9, m=4, T=12, B=3, carried_h0=False)
    engine = TruncatedBPTT(model, 4)
    h = None
    for start in range(0, 12, 4):
        loss, grads = engine.step(x[start:start + 4], y[start:start + 4])
        ref_loss, ref_grads, h = model.loss_and_grads(x[start:start + 4], y[start:start + 4], h)
        assert float(loss) == float(ref_loss) and max_rel_error(grads, ref_grads) == 0.0


def test_reset_forgets_state_and_history():
    model, x, y, _ = make_case("tanh", "softmax", "cross_entropy", V=9, m=4, T=8, B=2, carried_h0=False)
    engine = TruncatedBPTT(model, 4, 6)
    first = engine.step(x[:4], y[:4])[0]
    engine.step(x[4:], y[4:])
    engine.reset()
    assert float(engine.step(x[:4], y[:4])[0]) == float(first)


@pytest.mark.parametrize(
    "args, message",
    [((0,), "k1"), ((4, 3), "k2"), ((4, 4, -1), "truncation"), ((2.5,), "k1")],
)
def test_invalid_settings(args, message):
    model = make_case("tanh", "softmax", "cross_entropy")[0]
    with pytest.raises(ValueError, match=message):
        TruncatedBPTT(model, *args)


def test_block_longer_than_k1_and_changed_batch_are_errors():
    model, x, y, _ = make_case("tanh", "softmax", "cross_entropy", T=6, B=3)
    engine = TruncatedBPTT(model, 4)
    with pytest.raises(ValueError, match="at most k1"):
        engine.step(x, y)
    engine.step(x[:4], y[:4])
    with pytest.raises(ValueError, match="reset"):
        engine.step(x[:4, :2], y[:4, :2])
