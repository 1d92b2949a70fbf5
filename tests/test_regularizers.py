"""AR and TAR (regularizers.py): the explicit gradients against autograd, alone and through BPTT.

The oracle is written here from AWD-LSTM's definitions (α · mean of s², β · mean of (s^t − s^{t−1})²
within the block, over counted positions), times the N counted tokens, as the engine's sums are; the
model's part is the literal one-step-at-a-time forward of the seed's equations, differentiated by autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

import bptt.engine.sweep as engine
from bptt.engine.regularizers import activation_penalty_backward, activation_penalty_forward
from bptt.engine.tbptt import TruncatedBPTT
from conftest import make_case, max_rel_error


def oracle_penalty(S, mask, ar, tar):
    """N · (α mean ‖s‖²/m + β mean ‖Δs‖²/m), written with masked means (the AWD-LSTM form)."""
    T, B, m = S.shape
    w = torch.ones(T, B, dtype=S.dtype) if mask is None else mask.to(S.dtype)
    n = w.sum()
    ar_term = ((S**2).sum(-1) / m * w).sum() / n
    pair = w[1:] * w[:-1]
    tar_term = ((S[1:] - S[:-1]) ** 2).sum(-1).div(m).mul(pair).sum() / pair.sum() if T > 1 else 0.0
    return n * (ar * ar_term + tar * tar_term)


def random_states(T, B, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(T, B, m, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.rand(T, B, generator=g) < 0.7
    mask[0] = True  # every column has a counted position
    return S, mask


@pytest.mark.parametrize("T", [1, 2, 6])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ar, tar", [(1.0, 0.0), (0.0, 1.0), (2.0, 0.5)])
def test_penalty_pair_matches_autograd(T, masked, ar, tar):
    S, mask = random_states(T, 3, 4, seed=T)
    mask = mask if masked else None
    leaf = S.clone().requires_grad_(True)
    with torch.enable_grad():
        ref = oracle_penalty(leaf, mask, ar, tar)
        (ref_grad,) = torch.autograd.grad(ref, leaf) if ref.requires_grad else (torch.zeros_like(S),)
    torch.testing.assert_close(activation_penalty_forward(S, mask, ar, tar), ref.detach(), rtol=1e-12, atol=1e-12)
    base = torch.rand(S.shape, dtype=torch.float64)  # the output layer's errors, to which the penalty adds
    got = activation_penalty_backward(S, mask, ar, tar, base.clone())
    torch.testing.assert_close(got - base, ref_grad, rtol=1e-10, atol=1e-12)


def autograd_with_penalty(model, x, y, h0, ar, tar, mask=None):
    """Cross-entropy of the tanh/softmax Elman model plus the penalty, differentiated by autograd."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in model.params.items()}
    T, B = x.shape
    V = p["V"].shape[0]
    with torch.enable_grad():
        s, states, total = h0, [], torch.zeros((), dtype=torch.float64)
        for t in range(T):
            s = torch.tanh(s @ p["W"].T + nnf.one_hot(x[t], V).double() @ p["U"].T + p["b"])
            states.append(s)
            per = -torch.log_softmax(s @ p["V"].T + p["c"], dim=-1).gather(1, y[t].unsqueeze(1)).squeeze(1)
            total = total + (per if mask is None else per * mask[t]).sum()
        total = total + oracle_penalty(torch.stack(states), mask, ar, tar)
        grads = torch.autograd.grad(total, list(p.values()))
    return dict(zip(p, grads))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ar, tar", [(1.0, 0.0), (0.0, 1.0), (2.0, 1.0)])
def test_bptt_gradients_with_the_penalties_match_autograd(masked, ar, tar):
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=5, B=3, seed=3)
    mask = random_states(5, 3, 1, seed=9)[1] if masked else None
    plain = model.loss_and_grads(x, y, h0, mask=mask)
    loss, grads, _ = model.loss_and_grads(x, y, h0, mask=mask, ar=ar, tar=tar)
    assert torch.equal(loss, plain[0])  # the penalty is in the gradients, not in the reported loss
    ref = autograd_with_penalty(model, x, y, h0, ar, tar, mask)
    assert max_rel_error(grads, ref) < 1e-9
    assert max_rel_error(plain[1], ref) > 1e-3  # and it changes them


def _without_the_earlier_push(S, weights, ar, tar, dS):
    """TAR's gradient with the −d^t on s^{t−1} left out (only s^t is pulled towards s^{t−1})."""
    m, T = S.shape[-1], S.shape[0]
    dS += (2 * ar / m) * S
    g = torch.zeros_like(S)
    g[1:] += S[1:] - S[:-1]
    dS += (2 * tar * T / ((T - 1) * m)) * g
    return dS


def _without_ar(S, weights, ar, tar, dS):
    return activation_penalty_backward(S, weights, 0.0, tar, dS)


@pytest.mark.parametrize("broken", [_without_the_earlier_push, _without_ar])
def test_a_missing_term_is_rejected(monkeypatch, broken):
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=5, B=3, seed=3)
    ref = autograd_with_penalty(model, x, y, h0, 2.0, 1.0)
    monkeypatch.setattr(engine, "activation_penalty_backward", broken)
    _, grads, _ = model.loss_and_grads(x, y, h0, ar=2.0, tar=1.0)
    assert max_rel_error(grads, ref) > 1e-3
    monkeypatch.undo()
    _, grads, _ = model.loss_and_grads(x, y, h0, ar=2.0, tar=1.0)
    assert max_rel_error(grads, ref) < 1e-9


def test_truncated_bptt_applies_the_penalties_per_block():
    """Blocks of the stream engine: each block's gradient is the one-block BPTT gradient with the
    penalties from the carried state (k1 = k2: no history); TAR pairs stay inside a block."""
    model, x, y, _ = make_case("tanh", "softmax", "cross_entropy", T=8, B=3, seed=5)
    stream = TruncatedBPTT(model, k1=4, ar=1.5, tar=0.7)
    h = None
    for lo in (0, 4):
        _, grads = stream.step(x[lo:lo + 4], y[lo:lo + 4])
        _, ref, h = model.loss_and_grads(x[lo:lo + 4], y[lo:lo + 4], h, ar=1.5, tar=0.7)
        for k in ref:
            torch.testing.assert_close(grads[k], ref[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), True])
def test_bad_strengths_are_refused(bad):
    model, *_ = make_case("tanh", "softmax", "cross_entropy")
    with pytest.raises(ValueError, match="ar must be"):
        TruncatedBPTT(model, k1=3, ar=bad)
    x, y = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="tar must be"):
        model.loss_and_grads(x, y, tar=bad)
