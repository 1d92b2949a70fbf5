"""Tied input and output weights (U ≡ Vᵀ, engine/network.py): gradients, the model, the command."""

from __future__ import annotations

import json

import pytest
import torch

import bptt.engine.network as network
from bptt.cli import main
from bptt.verify import finite_difference_grads, random_model
from bptt.model import ElmanLM
from bptt.oracle import autograd_loss_and_grads
from bptt.storage.saved_model import load_model
from bptt.engine.tbptt import TruncatedBPTT
from conftest import max_rel_error, random_data, write_corpus

V, M = 7, 5


def tied_case(F="tanh", f="softmax", loss="cross_entropy", seed=3, T=5, B=3):
    model = random_model(F, f, loss, V, M, True, torch.float64, seed, tied=True)
    x, y, h0 = random_data(T, B, V, M, seed)
    return model, x, y, h0


def test_a_tied_model_has_no_U_and_reads_V_transposed():
    model = ElmanLM(V, M, tied=True, dtype="float64", seed=1)
    assert "U" not in model.params and set(model.params) == {"W", "b", "V", "c"}
    untied = ElmanLM(V, M, dtype="float64", seed=1)
    for name in ("W", "b", "V", "c"):
        untied.params[name].copy_(model.params[name])
    untied.params["U"].copy_(model.params["V"].t())
    x, y, h0 = random_data(6, 2, V, M)
    torch.testing.assert_close(model.forward(x, h0), untied.forward(x, h0), rtol=0, atol=0)
    torch.testing.assert_close(model.loss(x, y, h0), untied.loss(x, y, h0), rtol=0, atol=0)
    # the untied model's two gradients of the one matrix add up to the tied model's
    _, tied_grads, _ = model.loss_and_grads(x, y, h0)
    _, grads, _ = untied.loss_and_grads(x, y, h0)
    torch.testing.assert_close(tied_grads["V"], grads["V"] + grads["U"].t(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tied_grads["W"], grads["W"], rtol=0, atol=0)


@pytest.mark.parametrize("F,f,loss", [("tanh", "softmax", "cross_entropy"), ("sigmoid", "sigmoid", "quadratic"),
                                      ("relu", "identity", "quadratic")])
@pytest.mark.parametrize("truncation", [None, 2])
def test_tied_gradients_match_autograd_and_finite_differences(F, f, loss, truncation):
    model, x, y, h0 = tied_case(F, f, loss)
    value, grads, _ = model.loss_and_grads(x, y, h0, truncation=truncation)
    ref_value, ref = autograd_loss_and_grads(model.params, F, f, loss, x, y, h0, truncation=truncation)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-12)
    assert max_rel_error(grads, ref) <= 1e-10
    if truncation is None:
        assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) <= 1e-6


def test_tied_gradients_with_a_mask_and_the_class_output():
    model = random_model("tanh", "softmax", "cross_entropy", V, M, True, torch.float64, 4, tied=True,
                         output="class", classes=3, word_counts=[9, 7, 5, 4, 3, 2, 1])
    x, y, h0 = random_data(4, 3, V, M, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    _, grads, _ = model.loss_and_grads(x, y, h0, mask=mask)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0, mask=mask)) <= 1e-6


def test_a_tied_backward_without_the_input_path_is_rejected(monkeypatch):
    """Drop (∂L/∂U)ᵀ from ∂L/∂V (the input term's scatter-add into V's rows): both checks must fail."""
    model, x, y, h0 = tied_case()

    def without_input_path(inputs, dA, dU):
        pass

    monkeypatch.setattr(network, "embed_backward", without_input_path)
    _, broken, _ = model.loss_and_grads(x, y, h0)
    _, ref = autograd_loss_and_grads(model.params, "tanh", "softmax", "cross_entropy", x, y, h0)
    assert max_rel_error(broken, ref) > 1e-3
    assert max_rel_error(broken, finite_difference_grads(model, x, y, h0)) > 1e-3
    monkeypatch.undo()
    _, intact, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(intact, ref) <= 1e-10


def test_truncated_bptt_stream_with_a_tied_model_matches_autograd():
    model, x, y, h0 = tied_case(T=6, B=2)
    engine = TruncatedBPTT(model, 6)
    engine.load_state_dict({"state.0.0": h0.clone()})  # a carried state
    _, grads = engine.step(x, y)
    _, ref = autograd_loss_and_grads(model.params, "tanh", "softmax", "cross_entropy", x, y, h0)
    assert max_rel_error(grads, ref) <= 1e-10


def test_rtrl_and_outputs_without_a_word_matrix_are_refused():
    model = ElmanLM(V, M, tied=True)
    x, y, _ = random_data(3, 2, V, M)
    with pytest.raises(ValueError, match="rtrl"):
        model.loss_and_grads(x, y, method="rtrl")
    with pytest.raises(ValueError, match="tied"):
        ElmanLM(V, M, tied=True, output="hsm", word_counts=list(range(V, 0, -1)))
    with pytest.raises(ValueError, match="tied must be"):
        ElmanLM(V, M, tied=1)


def test_train_tie_saves_a_tied_model_that_eval_reads(tmp_path, capsys):
    train_file = write_corpus(tmp_path / "train.txt", 120, 0)
    valid_file = write_corpus(tmp_path / "valid.txt", 30, 1)
    model_dir = tmp_path / "m"
    argv = ["train", "--train", train_file, "--valid", valid_file, "--model", str(model_dir), "--hidden", "8",
            "--batch", "4", "--bptt", "5", "--epochs", "2", "--lr", "0.01", "--tie", "--quiet", "--seed", "2"]
    assert main(argv) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"]["tied"] is True and config["training"]["model_config"]["tied"] is True
    model, vocab, _ = load_model(model_dir)
    assert model.tied and "U" not in model.params
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--test", valid_file, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(config["valid"]["perplexity"], rel=1e-9)
    assert result["perplexity"] < 0.6 * len(vocab)  # it learned something: uniform is len(vocab)


def test_tie_with_an_output_that_has_no_word_matrix_is_one_line_exit_2(tmp_path, capsys):
    train_file = write_corpus(tmp_path / "train.txt", 20, 0)
    argv = ["train", "--train", train_file, "--valid", train_file, "--model", str(tmp_path / "m"), "--tie",
            "--output", "hsm"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tie" in err
    assert not (tmp_path / "m" / "model.safetensors").exists()
