"""The checks reject a backward with one term removed: they are able to fail.

Each test swaps one function of the engine for a copy with a term dropped (monkeypatch, undone after
the test) and shows that finite differences and autograd both reject the result, while the intact
engine passes the very same comparison.
"""

from __future__ import annotations

import pytest
import torch

import bptt.engine.activations as activations
import bptt.engine.cells.elman as elman
import bptt.engine.outputs.full as full
from bptt.engine import native
from bptt.verify import finite_difference_grads, relative_error
from bptt.oracle import autograd_loss_and_grads
from conftest import make_case, max_rel_error


def errors(F="tanh", f="softmax", loss="cross_entropy", T=4):
    """(error vs finite differences, error vs autograd) of the engine's BPTT gradient."""
    model, x, y, h0 = make_case(F, f, loss, T=T, B=2, seed=7)
    _, grads, _ = model.loss_and_grads(x, y, h0)
    fd = finite_difference_grads(model, x, y, h0)
    _, ref = autograd_loss_and_grads(model.params, F, f, loss, x, y, h0)
    return max_rel_error(grads, fd), max_rel_error(grads, ref)


def assert_rejected(fd_error, autograd_error):
    assert fd_error > 1e-3 and autograd_error > 1e-3, (fd_error, autograd_error)


def test_intact_engine_passes():
    fd_error, autograd_error = errors()
    assert fd_error <= 1e-6 and autograd_error <= 1e-10


def test_missing_F_prime_is_rejected(monkeypatch):
    """The paper's printed recursion (no F') is wrong for tanh: the checks must say so."""
    broken = activations.HiddenActivation("tanh", torch.tanh_, lambda s: torch.ones_like(s))
    monkeypatch.setitem(activations.HIDDEN_ACTIVATIONS, "tanh", broken)
    assert_rejected(*errors())


def drop_recurrent_term(monkeypatch):
    """∂L/∂s^t without W^T δ^{t+1}, in both forms the engine uses (full sweep and truncated hops)."""
    monkeypatch.setattr(elman, "recurrent_backward", lambda delta_next, W: torch.zeros_like(delta_next))
    monkeypatch.setattr(elman, "recurrent_backward_add", lambda direct, delta_next, W, out: out.copy_(direct))


@pytest.mark.parametrize("truncation", [None, 2])
def test_missing_recurrent_term_is_rejected(monkeypatch, truncation):
    """Drop W^T δ^{t+1} from ∂L/∂s^t (the recursion through time): only the direct terms remain."""
    drop_recurrent_term(monkeypatch)
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=4, B=2, seed=7)
    _, grads, _ = model.loss_and_grads(x, y, h0, truncation=truncation)
    monkeypatch.undo()
    _, intact, _ = model.loss_and_grads(x, y, h0, truncation=truncation)
    assert max_rel_error(grads, intact) > 1e-3
    if truncation is None:
        drop_recurrent_term(monkeypatch)
        assert_rejected(*errors())


def test_missing_recurrent_term_is_rejected_only_where_it_acts(monkeypatch):
    """The checks are specific: they reject exactly the gradients a dropped term changes.

    Without W^T δ^{t+1} (T = 4, so the mutant computes something else than the intact engine) the
    gradients of U, W and b, which reach back through time, are wrong and both checks reject them;
    those of the output layer (V, c: Σ_t ∂L/∂g^t s^tᵀ, no path through time) are unchanged, and both
    checks pass them.
    """
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=4, B=2, seed=7)
    _, intact, _ = model.loss_and_grads(x, y, h0)
    drop_recurrent_term(monkeypatch)
    _, broken, _ = model.loss_and_grads(x, y, h0)
    fd = finite_difference_grads(model, x, y, h0)
    _, ref = autograd_loss_and_grads(model.params, "tanh", "softmax", "cross_entropy", x, y, h0)
    for name in ("U", "W", "b"):
        assert relative_error(broken[name], intact[name]) > 1e-3, name  # the mutant differs here
        assert relative_error(broken[name], fd[name]) > 1e-3 and relative_error(broken[name], ref[name]) > 1e-3, name
    for name in ("V", "c"):
        assert torch.equal(broken[name], intact[name]), name
        assert relative_error(broken[name], fd[name]) <= 1e-6 and relative_error(broken[name], ref[name]) <= 1e-10, name


def test_missing_softmax_jacobian_term_is_rejected(monkeypatch):
    """softmax backward without the −o Σ o·do term (quadratic loss, which uses the full Jacobian)."""
    broken = activations.OutputActivation("softmax", activations.softmax_forward, lambda o, do: o * do)
    monkeypatch.setitem(activations.OUTPUT_ACTIVATIONS, "softmax", broken)
    assert_rejected(*errors(f="softmax", loss="quadratic"))


def test_missing_target_term_in_cross_entropy_is_rejected(monkeypatch):
    """dL/dg = o − d with the −d (the target's −1) forgotten (in the eager code: the compiled pass,
    outputs/softmax_cpu.cpp, off; its own mutants are in tests/test_native.py)."""
    monkeypatch.setattr(native, "_enabled", False)
    monkeypatch.setattr(full, "softmax_cross_entropy_backward_", lambda o, targets, weights: o)
    assert_rejected(*errors())


def test_missing_output_bias_gradient_is_rejected(monkeypatch):
    def no_bias_grad(V, S, dg, grads, bias):
        grads["V"].addmm_(dg.t(), S)
        return dg @ V

    monkeypatch.setattr(native, "_enabled", False)  # the eager code's dc (the compiled pass forms its own)
    monkeypatch.setattr(full, "linear_backward", no_bias_grad)
    assert_rejected(*errors())


@pytest.mark.parametrize("k", [0, 2])
def test_truncation_off_by_one_is_rejected(monkeypatch, k):
    """A truncated backward that keeps one hop too many disagrees with truncated autograd."""
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=6, B=2, seed=8)
    _, grads, _ = model.loss_and_grads(x, y, h0, truncation=k + 1)
    _, ref = autograd_loss_and_grads(model.params, "tanh", "softmax", "cross_entropy", x, y, h0, truncation=k)
    assert max_rel_error(grads, ref) > 1e-3


def test_gradcheck_rejects_a_broken_factorized_layer(monkeypatch):
    """The output-layer rows of bptt gradcheck fail when a layer's gradient loses a term."""
    from bptt.verify import check_output_layer
    from bptt.engine.outputs.hsm import HierarchicalSoftmaxOutput

    original = HierarchicalSoftmaxOutput.backward

    def without_bias_gradient(self, params, S, cache, targets, weights, grads):
        dS = original(self, params, S, cache, targets, weights, grads)
        grads["c"].zero_()
        return dS

    intact = check_output_layer("hsm", vocab=7, hidden=4, steps=4, batch=2, bias=True, dtype=torch.float64, seed=0)
    assert max(row.errors["fd"] for row in intact) <= 1e-6
    monkeypatch.setattr(HierarchicalSoftmaxOutput, "backward", without_bias_gradient)
    broken = check_output_layer("hsm", vocab=7, hidden=4, steps=4, batch=2, bias=True, dtype=torch.float64, seed=0)
    assert {row.parameter for row in broken if row.errors["fd"] > 1e-3} == {"c"}
