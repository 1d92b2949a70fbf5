"""Stacked Elman layers (ModelConfig(layers=N)): layer k > 0 reads layer k−1's output through the input
term's product A_k = H_{k−1} U_kᵀ; the gradients through the whole stack against finite differences and
against an autograd model of the stack written here, sharing no code with the engine."""

from __future__ import annotations

import pytest
import torch

from bptt.engine.sweep import loss_and_grads
from bptt.model import LanguageModel, ModelConfig
from bptt.verify import finite_differences, relative_error

V, M = 7, 4


def _model(layers: int, F: str = "tanh", bias: bool = True, seed: int = 0) -> LanguageModel:
    model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=M, layers=layers, hidden_activation=F, bias=bias,
                                      dtype="float64", init_range=0.7), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.params.values():
        if p.dim() == 1:
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5)
    return model


def _reference(model: LanguageModel, x, y, h0: list, weights=None, truncation=None, no_recurrence=False) -> dict:
    """Autograd of the stack, step by step, one-hot inputs. truncation=k: the error of each L^t reaches
    back to step t − k at most, in every layer at once (the window semantics of truncated autograd).
    no_recurrence: every layer's s^{t−1} enters its step as a constant (no gradient through time in any
    layer; the error still goes down the stack at the same step)."""
    F = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}[model.config.hidden_activation]
    L = model.config.layers
    names = model.net.prefixes
    with torch.enable_grad():
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in model.params.items()}
        T, B = x.shape

        def run(start_states, t0, t1):
            """Layer states from t0 to t1 (exclusive) starting from start_states (list per layer)."""
            states = list(start_states)
            outs = []
            for t in range(t0, t1):
                inp = torch.nn.functional.one_hot(x[t], V).double()
                for k in range(L):
                    p = names[k]
                    prev = states[k].detach() if no_recurrence else states[k]
                    a = inp @ leaves[p + "U"].T + prev @ leaves[p + "W"].T
                    if p + "b" in leaves:
                        a = a + leaves[p + "b"]
                    states[k] = F(a)
                    inp = states[k]
                outs.append(list(states))
            return outs

        def loss_at(t, top):
            logits = top @ leaves["V"].T + (leaves["c"] if "c" in leaves else 0.0)
            per = -torch.log_softmax(logits, -1).gather(1, y[t].unsqueeze(1)).squeeze(1)
            return (per if weights is None else per * weights[t]).sum()

        total = 0.0
        if truncation is None:
            for t, states in enumerate(run(h0, 0, T)):
                total = total + loss_at(t, states[-1])
        else:
            with torch.no_grad():
                full = [list(h0)] + run(h0, 0, T)
            for t in range(T):
                start = max(0, t - truncation)
                states = run([s.detach() for s in full[start]], start, t + 1)[-1]
                total = total + loss_at(t, states[-1])
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)}


def _fd(model, x, y, state, weights=None) -> dict:
    from bptt.engine.sweep import sequence_loss

    return finite_differences(model.params, lambda: sequence_loss(model.net, model.params, x, y, state, weights=weights))


def _case(layers, seed=0, T=5, B=3):
    g = torch.Generator().manual_seed(10 + seed)
    x, y = torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)
    h0 = [(torch.rand(B, M, generator=g, dtype=torch.float64) - 0.5) for _ in range(layers)]
    return x, y, h0


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("F", ["tanh", "relu"])
@pytest.mark.parametrize("masked", [False, True])
def test_stack_gradients_match_autograd_and_finite_differences(layers, F, masked):
    from bptt.engine.network import State

    model = _model(layers, F)
    assert set(model.params) == {f"layer{k}.{n}" for k in range(layers) for n in "UWb"} | {"V", "c"}
    x, y, h0 = _case(layers)
    weights = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.3).double() if masked else None
    state = State(tuple((h,) for h in h0))
    _, grads, new_state = loss_and_grads(model.net, model.params, x, y, state, weights=weights)
    ref = _reference(model, x, y, h0, weights)
    for k in grads:
        assert relative_error(grads[k], ref[k]) <= 1e-10, k
    fd = _fd(model, x, y, state, weights)
    for k in grads:
        assert relative_error(grads[k], fd[k]) <= 1e-6, k
    assert len(new_state.layers) == layers


def test_truncation_in_a_stack_is_per_layer():
    """truncation=k caps the hops of each error *within each layer*, counted from where the error enters
    that layer (the engine composes layers: layer k−1 receives dH = dA_k U_k at every step, and truncates
    from there). So k = 0 is no BPTT in any layer — autograd with every recurrent input a constant — and
    k >= T − 1 is full BPTT; in between, an error can reach further down than k steps in the lower layer
    (k hops in the layer above, then k more below), unlike a window of k steps over the whole stack."""
    from bptt.engine.network import State

    model = _model(2)
    x, y, h0 = _case(2, T=6)
    state = State(tuple((h,) for h in h0))

    def engine(truncation):
        return loss_and_grads(model.net, model.params, x, y, state, truncation=truncation)[1]

    for name, ref in (("no recurrence", _reference(model, x, y, h0, no_recurrence=True)),):
        got = engine(0)
        assert max(relative_error(got[k], ref[k]) for k in got) <= 1e-10, name
    full = _reference(model, x, y, h0)
    for k, g in engine(5).items():
        assert relative_error(g, full[k]) <= 1e-10
    window = _reference(model, x, y, h0, truncation=1)  # not what the engine does at k = 1, for 2 layers:
    got = engine(1)
    assert relative_error(got["layer1.W"], window["layer1.W"]) <= 1e-10  # the top layer: the same
    assert relative_error(got["layer0.W"], window["layer0.W"]) > 1e-6  # below: errors travel further
    assert relative_error(got["layer0.W"], full["layer0.W"]) > 1e-6  # and less far than full BPTT


def test_a_stack_without_the_error_sent_down_is_rejected(monkeypatch):
    """The input term's backward returns the error of the layer below (dH_{k−1} = dA_k U_k); without
    it, the lower layer learns only from... nothing: the check must fail."""
    import bptt.engine.network as network
    from bptt.engine.network import State

    model = _model(2)
    x, y, h0 = _case(2)
    state = State(tuple((h,) for h in h0))
    ref = _reference(model, x, y, h0)
    real = network.project_backward
    monkeypatch.setattr(network, "project_backward", lambda U, X, dA, dU: real(U, X, dA, dU).zero_())
    _, grads, _ = loss_and_grads(model.net, model.params, x, y, state)
    assert max(relative_error(grads[k], ref[k]) for k in grads) > 1e-3
    monkeypatch.undo()
    _, grads, _ = loss_and_grads(model.net, model.params, x, y, state)
    assert max(relative_error(grads[k], ref[k]) for k in grads) <= 1e-10
