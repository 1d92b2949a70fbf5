"""`bptt diagnose` (bptt/diagnostics.py) and the cells' hidden_errors it is built on.

hidden_errors (∂L/∂h^t at every step, from a full backward's dA and the errors that arrived from above)
is checked against autograd over the step functions of tests/reference_rnn.py, which share no code with
the engine; the diagnostics against what they must be in cases known by hand: W = 0 (nothing travels
back), the one-step Jacobian diag(F'(a)) W of the Elman cell, the output layer's own error at lag 0,
and full BPTT as truncation k = K.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bptt.cli import main
from bptt.diagnostics import gradient_flow
from bptt.model import ModelConfig, build_model
from bptt.storage.saved_model import load_model
from conftest import one_error_line, write_corpus
from reference_rnn import elman_step, gru_step, lstm_step

STEPS = {"elman": elman_step, "lstm": lstm_step, "gru": gru_step}


@pytest.mark.parametrize("cell, activation", [("elman", "tanh"), ("elman", "sigmoid"), ("elman", "relu"),
                                              ("lstm", "tanh"), ("gru", "tanh")])
def test_hidden_errors_are_autograds_dL_dh(cell, activation):
    torch.manual_seed(0)
    T, B, m, n = 6, 3, 5, 4
    model = build_model(ModelConfig(vocab_size=9, hidden_size=m, cell=cell, hidden_activation=activation,
                                    embedding_size=n if cell != "elman" else 0, dtype="float64"), seed=1)
    layer = model.net.cells[0]
    params = {k: v.clone() for k, v in model.net.layer_view(model.params, 0).items()}
    params["W"] = params["W"] * 4  # errors that travel some steps
    G = params["W"].shape[0]
    A = torch.randn(T, B, G, dtype=torch.float64)
    state0 = tuple(torch.randn(B, m, dtype=torch.float64) * 0.5 for _ in layer.initial_state(params, B))
    dH = torch.randn(T, B, m, dtype=torch.float64)
    H, _, cache = layer.forward(params, A.clone(), state0)
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    dA = layer.backward(params, cache, dH.clone(), grads, None)
    E = layer.hidden_errors(params, cache, dA, dH)
    # autograd over the reference steps: L = Σ_t <dH^t, h^t>; h^t.grad is ∂L/∂h^t
    step = STEPS[cell]
    state = tuple(s.clone().requires_grad_(True) for s in state0)
    outs = []
    for t in range(T):
        state = step(params, A[t], state, activation) if cell == "elman" else step(params, A[t], state)
        state[0].retain_grad()
        outs.append(state[0])
    sum((dH[t] * outs[t]).sum() for t in range(T)).backward()
    expected = torch.stack([h.grad for h in outs])
    torch.testing.assert_close(E, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(E[:-1], dH[:-1])  # the recurrent term matters


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    return write_corpus(root / "t.txt", 120, 0), write_corpus(root / "v.txt", 40, 1), root


def trained(corpus, name, *extra):
    train, valid, root = corpus
    model = root / name
    if not model.exists():
        assert main(["train", "--train", train, "--valid", valid, "--model", str(model), "--hidden", "6", "--epochs", "1",
                     "--quiet", *extra]) == 0
    return model


def test_with_w_zero_no_error_travels_back(corpus):
    model, vocab, _ = load_model(trained(corpus, "elman"))
    model.params["W"].zero_()
    from bptt.data import encode
    ids = encode(corpus[1], vocab).ids
    r = gradient_flow(model, ids, lags=6, positions=5, warmup=3, jacobian_windows=2)
    mean = r["error_norm"]["layer0"]["mean"]
    assert mean[0] > 0 and all(v == 0 for v in mean[1:])
    assert r["jacobian_norm"]["layer0"]["q50"][0] == pytest.approx(1.0) and max(r["jacobian_norm"]["layer0"]["q90"][1:]) == 0
    assert r["spectral_radius"]["layer0"]["W"] == 0
    assert all(row["relative_error"] < 1e-12 for row in r["truncation"])  # nothing to truncate


def test_the_elman_numbers_by_hand(corpus):
    """One window: lag 0 is the output layer's error ‖Vᵀ(softmax(V h + c) − e_y)‖ (written out here), lag 1's
    Jacobian is ‖diag(1 − h²) W‖₂ for tanh at the window's last step, and truncation k = K is full BPTT."""
    from bptt.data import encode
    from bptt.diagnostics import windows
    from bptt.engine.stream import Stream

    model, vocab, _ = load_model(trained(corpus, "elman"))
    model.params["W"].mul_(3)  # errors that travel
    ids = encode(corpus[1], vocab).ids
    K, warm = 4, 5
    r = gradient_flow(model, ids, lags=K, positions=1, warmup=warm, jacobian_windows=1)
    x, y = windows(ids, K, 1, warm)
    stream = Stream(model, 1)
    H, _ = stream.forward(x)
    h = H[-1, 0].double()
    V, c = model.params["V"].double(), model.params["c"].double()
    p = torch.softmax(V @ h + c, dim=0)
    p[y[-1, 0]] -= 1.0
    assert r["error_norm"]["layer0"]["mean"][0] == pytest.approx(float(torch.linalg.vector_norm(V.t() @ p)), rel=1e-5)
    J1 = torch.diag(1 - h * h) @ model.params["W"].double()
    assert r["jacobian_norm"]["layer0"]["q50"][1] == pytest.approx(float(torch.linalg.matrix_norm(J1, ord=2)), rel=1e-5)
    rows = {row["k"]: row["relative_error"] for row in r["truncation"]}
    assert rows[K] < 1e-6 and rows[0] > 1e-3


@pytest.mark.parametrize("cell, extra", [("lstm", ["--layers", "2"]), ("gru", []), ("elman", ["--activation", "relu"])])
def test_diagnose_command_for_every_cell(corpus, tmp_path, capsys, cell, extra):
    model = trained(corpus, f"{cell}{len(extra)}", "--cell", cell, *extra)
    png = tmp_path / "flow.png"
    capsys.readouterr()
    assert main(["diagnose", "--model", str(model), "--text", corpus[1], "--lags", "8", "--positions", "6",
                 "--warmup", "4", "--json", "--out", str(png)]) == 0
    r = json.loads(capsys.readouterr().out)
    layers = 2 if "--layers" in extra else 1
    assert sorted(r["error_norm"]) == [f"layer{k}" for k in range(layers)] == sorted(r["jacobian_norm"])
    for stats in r["error_norm"].values():
        assert len(stats["mean"]) == 9 and all(math.isfinite(v) and v >= 0 for v in stats["mean"])
        assert stats["q10"][0] <= stats["q50"][0] <= stats["q90"][0]
    gates = {"lstm": 4, "gru": 3, "elman": 1}[cell]
    assert all(len(blocks) == gates for blocks in r["spectral_radius"].values())
    assert png.stat().st_size > 10_000
    assert r["truncation"][-1]["k"] == 8 and r["truncation"][-1]["relative_error"] < 1e-6


@pytest.mark.parametrize("argv, needle", [(["--lags", "0"], "--lags"), (["--positions", "-1"], "--positions"),
                                          (["--lags", "100000"], "tokens")])
def test_bad_options(corpus, capsys, argv, needle):
    model = trained(corpus, "elman")
    capsys.readouterr()
    assert main(["diagnose", "--model", str(model), "--text", corpus[1], *argv]) == 2
    one_error_line(capsys.readouterr().err, needle)


def test_a_cell_without_hidden_errors_is_refused_in_one_line(corpus, monkeypatch):
    from bptt.data import encode
    from bptt.engine.cells.elman import ElmanCell

    model, vocab, _ = load_model(trained(corpus, "elman"))
    monkeypatch.delattr(ElmanCell, "hidden_errors")
    with pytest.raises(ValueError, match="elman has none"):
        gradient_flow(model, encode(corpus[1], vocab).ids, lags=3, positions=2, warmup=1)
