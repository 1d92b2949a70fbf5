"""Each layer's forward/backward pair on its own, against autograd of the same forward."""

from __future__ import annotations

import pytest
import torch

from bptt.engine.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
from bptt.engine.cells.elman import ElmanCell
from bptt.engine.inputs import embed_backward, embed_forward
from bptt.verify import OUTPUT_LOSSES, relative_error
from bptt.engine.outputs.full import FullOutput

gen = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.rand(*shape, generator=gen) * 2 - 1


@pytest.mark.parametrize("name", sorted(HIDDEN_ACTIVATIONS))
def test_hidden_derivative_from_the_output(name):
    F = HIDDEN_ACTIVATIONS[name]
    a = rand(50) * 3
    a_leaf = a.clone().requires_grad_(True)
    with torch.enable_grad():
        s_ref = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda v: v * 1}[name](a_leaf)
        (ref,) = torch.autograd.grad(s_ref.sum(), a_leaf)
    s = F.forward_(a.clone())
    torch.testing.assert_close(s, s_ref.detach())
    torch.testing.assert_close(F.derivative(s), ref)


@pytest.mark.parametrize("name", sorted(OUTPUT_ACTIVATIONS))
def test_output_activation_vector_jacobian_product(name):
    f = OUTPUT_ACTIVATIONS[name]
    g, do = rand(4, 6) * 2, rand(4, 6)
    g_leaf = g.clone().requires_grad_(True)
    with torch.enable_grad():
        (ref,) = torch.autograd.grad((f.forward(g_leaf) * do).sum(), g_leaf)
    torch.testing.assert_close(f.backward(f.forward(g), do), ref)


@pytest.mark.parametrize("f, loss", OUTPUT_LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_full_output_layer_pair(f, loss, weighted):
    N, m, V = 7, 4, 9
    layer = FullOutput(f, loss)
    params = {"V": rand(V, m), "c": rand(V)}
    S, targets = rand(N, m), torch.randint(0, V, (N,), generator=gen)
    weights = (torch.rand(N, generator=gen) > 0.3).double() if weighted else None
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    loss_value, cache = layer.forward(params, S, targets, weights)
    dS = layer.backward(params, S, cache, targets, weights, grads)
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    S_leaf = S.clone().requires_grad_(True)
    with torch.enable_grad():
        g = S_leaf @ leaves["V"].T + leaves["c"]
        d = torch.nn.functional.one_hot(targets, V).double()
        if loss == "cross_entropy":
            per = -(d * torch.log_softmax(g, -1)).sum(-1)
        else:
            o = {"softmax": lambda x: torch.softmax(x, -1), "sigmoid": torch.sigmoid, "identity": lambda x: x}[f](g)
            per = 0.5 * ((d - o) ** 2).sum(-1)
        total = (per if weights is None else per * weights).sum()
        ref = torch.autograd.grad(total, [leaves["V"], leaves["c"], S_leaf])
    assert abs(float(loss_value - total.detach())) < 1e-12
    for got, want in zip([grads["V"], grads["c"], dS], ref):
        assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("name", sorted(HIDDEN_ACTIVATIONS))
@pytest.mark.parametrize("truncation", [None, 0, 1, 3])
def test_elman_cell_pair(name, truncation):
    T, B, m, V = 5, 3, 4, 6
    cell = ElmanCell(name)
    params = {"U": rand(m, V), "W": rand(m, m), "b": rand(m)}
    inputs, h0 = torch.randint(0, V, (T, B), generator=gen), rand(B, m)
    dS = rand(T, B, m)  # arbitrary upstream errors ∂L/∂s^t
    # the cell between the input term's pair: A = U x^t (a gather), then ∂L/∂A back into ∂L/∂U
    S, (s_last,), cache = cell.forward(params, embed_forward(params["U"], inputs), (h0,))
    assert torch.equal(s_last, S[-1]) and torch.equal(cell.state_at(cache, 2)[0], S[2])
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    dA = cell.backward(params, cache, dS, grads, truncation)
    assert torch.equal(grads["U"], torch.zeros_like(grads["U"]))  # the input weights are not the cell's job
    embed_backward(inputs, dA, grads["U"])
    F = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda v: v}[name]
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        def run(s, t0, t1):
            states = []
            for t in range(t0, t1):
                s = F(s @ leaves["W"].T + leaves["U"][:, inputs[t]].T + leaves["b"])
                states.append(s)
            return states
        if truncation is None:
            total = sum((s * dS[t]).sum() for t, s in enumerate(run(h0, 0, T)))
        else:
            with torch.no_grad():
                full = [h0] + run(h0, 0, T)
            total = sum(
                (run(full[max(0, t - truncation)].detach(), max(0, t - truncation), t + 1)[-1] * dS[t]).sum()
                for t in range(T)
            )
        ref = torch.autograd.grad(total, list(leaves.values()))
    for k, want in zip(leaves, ref):
        assert relative_error(grads[k], want) <= 1e-12, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_loss_is_exact_for_extreme_logits(dtype):
    """The fused loss reads the row sum back from the softmax (1 / max o): it must stay exact where
    o_y underflows to 0 (target logit 200 below the maximum) and for logits of size 1e4."""
    from bptt.engine.losses import softmax_cross_entropy_forward_

    g = torch.randn(6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g[0, 3] = -200.0  # target of row 0: o_y = e^-200 is 0 in float32
    g[1] *= 1e4
    g[2, :] = 7.0  # all equal: o = 1/50 everywhere
    targets = torch.tensor([3, 5, 1, 0, 49, 7])
    expected = torch.logsumexp(g, dim=1) - g[torch.arange(6), targets]  # float64 reference
    expected_o = torch.softmax(g, dim=1)
    loss, o = softmax_cross_entropy_forward_(g.to(dtype).clone(), targets)  # overwrites its input
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(float(expected.sum()), rel=tol)
    assert torch.allclose(o.double(), expected_o, atol=tol, rtol=0)


@pytest.mark.parametrize("loss,f", [("cross_entropy", "softmax"), ("quadratic", "sigmoid")])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("direct", [False, True])
def test_chunked_forward_backward_equals_the_pair(loss, f, weighted, direct):
    """forward_backward over chunks of 3 positions (N = 10: chunks 3, 3, 3, 1) gives the loss, dS, dV,
    dc (and dD) of forward + backward over all 10 at once, and never holds more than 3 rows of scores."""
    from bptt.engine.outputs.direct import ngram_offsets

    V, m, N = 9, 4, 10
    gen = torch.Generator().manual_seed(7)
    params = {"V": torch.randn(V, m, generator=gen, dtype=torch.float64),
              "c": torch.randn(V, generator=gen, dtype=torch.float64)}
    S = torch.randn(N, m, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=gen)
    weights = torch.rand(N, generator=gen, dtype=torch.float64) if weighted else None
    features = None
    if direct:
        params["D"] = torch.randn(40, generator=gen, dtype=torch.float64)
        features = ngram_offsets(torch.randint(0, V, (5, 2), generator=gen), None, 3, 40, V)
    whole, chunked = FullOutput(f, loss), FullOutput(f, loss)
    chunked.chunk_scores = 3 * V + 2  # 3 rows per chunk
    assert chunked.chunk_rows(V) == 3
    grads_a = {k: torch.zeros_like(p) for k, p in params.items()}
    grads_b = {k: torch.zeros_like(p) for k, p in params.items()}
    kw = {} if features is None else {"features": features}
    loss_a, cache = whole.forward(params, S, targets, weights, **kw)
    dS_a = whole.backward(params, S, cache, targets, weights, grads_a)
    loss_b, dS_b = chunked.forward_backward(params, S, targets, weights, grads_b, **kw)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-13)
    torch.testing.assert_close(dS_b, dS_a, rtol=1e-13, atol=1e-13)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-12, atol=1e-13)
    assert chunked._workspace.shape == (3, V)  # the scores of 3 positions at a time, not 10


def test_engine_uses_the_chunks_and_training_is_unchanged():
    """The engine's sweep through a model whose full softmax runs in chunks of 2 positions equals the
    unchunked one (the engine calls forward_backward)."""
    from bptt import ElmanLM
    from bptt.engine.sweep import loss_and_grads

    def run(chunk_scores):
        model = ElmanLM(11, 5, dtype=torch.float64, seed=1, bias=True)
        model.output.chunk_scores = chunk_scores
        x = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(2))
        y = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(3))
        loss, grads, _ = loss_and_grads(model.net, model.params, x, y, model.zero_state(3))
        return loss, grads, model.output._workspace.shape

    (loss_a, grads_a, shape_a), (loss_b, grads_b, shape_b) = run(1 << 24), run(2 * 11)
    assert shape_a == (12, 11) and shape_b == (2, 11)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-13)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-12, atol=1e-13)
