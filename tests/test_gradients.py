"""The explicit BPTT gradients against finite differences, autograd and RTRL, for every combination.

Finite differences and the autograd oracle (bptt.oracle) are the independent references. RTRL is not:
it runs the same F′ and output layer as BPTT, so it checks the propagation through time only
(test_rtrl_is_not_independent_of_F_prime_or_the_output_layer); every RTRL comparison here sits next
to an independent one.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bptt.verify import finite_difference_grads
from bptt.oracle import autograd_loss_and_grads
from conftest import COMBINATIONS, COMBO_IDS, make_case, max_rel_error

SHAPES = [(1, 1), (1, 4), (6, 1), (5, 3)]  # (T, B)


@pytest.mark.parametrize("F,f,loss", COMBINATIONS, ids=COMBO_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,B", SHAPES, ids=[f"T{t}B{b}" for t, b in SHAPES])
@pytest.mark.parametrize("carried_h0", [True, False], ids=["h0", "zeros"])
def test_bptt_matches_autograd_and_rtrl(F, f, loss, bias, T, B, carried_h0):
    model, x, y, h0 = make_case(F, f, loss, T=T, B=B, bias=bias, carried_h0=carried_h0)
    loss_bptt, grads, h_last = model.loss_and_grads(x, y, h0)
    loss_ref, ref = autograd_loss_and_grads(model.params, F, f, loss, x, y, h0)
    assert abs(float(loss_bptt - loss_ref)) <= 1e-10 * max(1.0, abs(float(loss_ref)))
    assert max_rel_error(grads, ref) <= 1e-10
    loss_rtrl, grads_rtrl, h_rtrl = model.loss_and_grads(x, y, h0, method="rtrl")
    assert abs(float(loss_rtrl - loss_bptt)) <= 1e-10 * max(1.0, abs(float(loss_bptt)))
    assert max_rel_error(grads_rtrl, grads) <= 1e-10
    torch.testing.assert_close(h_rtrl, h_last, rtol=0, atol=1e-12)


@pytest.mark.parametrize("F,f,loss", COMBINATIONS, ids=COMBO_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bptt_matches_finite_differences(F, f, loss, bias):
    model, x, y, h0 = make_case(F, f, loss, T=4, B=2, bias=bias, seed=1)
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) <= 1e-6


@pytest.mark.parametrize("F,f,loss", COMBINATIONS, ids=COMBO_IDS)
@pytest.mark.parametrize("k", [0, 1, 2, 5, 8])
def test_truncated_bptt_matches_truncated_autograd(F, f, loss, k):
    T = 5
    model, x, y, h0 = make_case(F, f, loss, T=T, B=2, seed=2)
    _, grads, _ = model.loss_and_grads(x, y, h0, truncation=k)
    _, ref = autograd_loss_and_grads(model.params, F, f, loss, x, y, h0, truncation=k)
    assert max_rel_error(grads, ref) <= 1e-10
    if k >= T:  # no path is longer than T - 1 connections: truncation at k >= T is full BPTT
        _, full, _ = model.loss_and_grads(x, y, h0)
        assert max_rel_error(grads, full) == 0.0


def test_truncation_zero_keeps_only_direct_terms():
    """k = 0: ∂L/∂W = Σ_t δ^t s^{t-1}ᵀ with δ^t = ∂L^t/∂s^t ⊙ F'(a^t), computed here by hand."""
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=4, B=2, bias=False)
    _, grads, _ = model.loss_and_grads(x, y, h0, truncation=0)
    S = model.forward(x, h0)
    p = model.params
    logits = S @ p["V"].T
    dg = torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, 7)
    delta = (dg @ p["V"]) * (1 - S**2)
    S_prev = torch.cat([h0[None], S[:-1]])
    torch.testing.assert_close(grads["W"], torch.einsum("tbi,tbj->ij", delta, S_prev))
    assert max_rel_error(grads, model.loss_and_grads(x, y, h0)[1]) > 1e-3  # and differs from full BPTT


@pytest.mark.parametrize("broken", ["F_prime", "output_bias"])
def test_rtrl_is_not_independent_of_F_prime_or_the_output_layer(monkeypatch, broken):
    """A wrong F′ or a wrong output-layer gradient is shared by BPTT and RTRL, which then agree, while
    finite differences and autograd reject both: why RTRL is never the only check of those parts."""
    import bptt.engine.activations as activations
    import bptt.engine.outputs.full as full

    if broken == "F_prime":  # the paper's printed recursion: F' = 1
        monkeypatch.setitem(activations.HIDDEN_ACTIVATIONS, "tanh",
                            activations.HiddenActivation("tanh", torch.tanh_, lambda s: torch.ones_like(s)))
    else:  # ∂L/∂c dropped from the full output layer's backward (the eager one: compiled passes off)
        from bptt.engine import native

        monkeypatch.setattr(native, "_enabled", False)

        def no_bias_grad(V, S, dg, grads, bias):
            grads["V"].addmm_(dg.t(), S)
            return dg @ V

        monkeypatch.setattr(full, "linear_backward", no_bias_grad)
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=4, B=2, seed=4)
    _, grads, _ = model.loss_and_grads(x, y, h0)
    _, grads_rtrl, _ = model.loss_and_grads(x, y, h0, method="rtrl")
    assert max_rel_error(grads_rtrl, grads) <= 1e-10  # RTRL agrees with the broken BPTT
    _, ref = autograd_loss_and_grads(model.params, "tanh", "softmax", "cross_entropy", x, y, h0)
    assert max_rel_error(grads, ref) > 1e-3 and max_rel_error(grads, finite_difference_grads(model, x, y, h0)) > 1e-3


@pytest.mark.parametrize("F,f,loss", COMBINATIONS[:4], ids=COMBO_IDS[:4])
def test_mask_drops_positions(F, f, loss):
    model, x, y, h0 = make_case(F, f, loss, T=5, B=3, seed=3)
    mask = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) > 0.4
    L, grads, _ = model.loss_and_grads(x, y, h0, mask=mask)
    L_ref, ref = autograd_loss_and_grads(model.params, F, f, loss, x, y, h0, mask=mask)
    assert abs(float(L - L_ref)) <= 1e-10 and max_rel_error(grads, ref) <= 1e-10
    _, grads_rtrl, _ = model.loss_and_grads(x, y, h0, mask=mask, method="rtrl")
    assert max_rel_error(grads_rtrl, grads) <= 1e-10
    # A masked position's target does not matter at all.
    y2 = y.clone()
    y2[~mask] = (y2[~mask] + 1) % 7
    L2, grads2, _ = model.loss_and_grads(x, y2, h0, mask=mask)
    assert float(L2) == float(L) and all(torch.equal(grads[k], grads2[k]) for k in grads)


@settings(max_examples=40, deadline=None)
@given(
    combo=st.sampled_from(COMBINATIONS),
    V=st.integers(2, 10),
    m=st.integers(1, 6),
    T=st.integers(1, 7),
    B=st.integers(1, 4),
    bias=st.booleans(),
    carried=st.booleans(),
    truncation=st.one_of(st.none(), st.integers(0, 8)),
    seed=st.integers(0, 10_000),
)
def test_random_shapes_against_autograd(combo, V, m, T, B, bias, carried, truncation, seed):
    F, f, loss = combo
    model, x, y, h0 = make_case(F, f, loss, V=V, m=m, T=T, B=B, bias=bias, seed=seed, carried_h0=carried)
    _, grads, _ = model.loss_and_grads(x, y, h0, truncation=truncation)
    _, ref = autograd_loss_and_grads(model.params, F, f, loss, x, y, h0, truncation=truncation)
    assert max_rel_error(grads, ref) <= 1e-10
