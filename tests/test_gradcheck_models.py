"""`bptt gradcheck --cell/--layers/--dropout`: the checks of a model configuration (bptt.verify.check_model)
pass on the engine, fail (exit 1, the rows of the broken parameters marked) when a gradient loses a term,
and each reference column (finite differences, autograd, truncated autograd, BPTT(k1, k2)) sees what it
is there for."""

from __future__ import annotations

import re

import pytest
import torch

import bptt.engine.cells.gru as gru
import bptt.engine.cells.lstm as lstm
import bptt.engine.network as network
from bptt.engine import native
from bptt.cli import main
from bptt.verify import THRESHOLDS, bptt_blocks, check_model, embedding_variants

SMALL = ["--vocab", "5", "--hidden", "3", "--steps", "6", "--batch", "2"]
OUTPUT = {"V", "c"}  # the output layer's parameters: their gradient does not go through time


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (the command sets it itself; check_model called directly does not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("cell=")]


def _param(row: str) -> str:
    """The parameter of a row: the word after "bias=on" / "bias=off"."""
    return row.split(" bias=")[1].split()[1]


def _flagged(out: str, tied: bool = False) -> set[str]:
    """The parameters of the rows with an entry over its threshold, of the tied models or the others."""
    return {_param(line) for line in _rows(out) if "!" in line and (" tied " in line) == tied}


def test_an_lstm_stack_with_dropout_passes_every_check(capsys):
    assert main(["gradcheck", "--cell", "lstm", "--layers", "2", "--dropout", "0.3", *SMALL]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("bptt gradcheck: cell=lstm layers=2 dropout=0.3 V=5 m=3 T=6 B=2 dtype=float64")
    assert "finite diff <= 1e-06" in lines[1] and "BPTT(2,4) <= 1e-10" in lines[1] and "trunc k=2" in lines[1]
    assert lines[2].split() == ["model", "param", "finite", "diff", "autograd", "trunc", "k=2", "BPTT(2,4)"]
    rows = _rows(out)
    cell_params = {f"layer{k}.{name}" for k in range(2) for name in "UWb"}
    per_variant = {  # (bias on, bias off): no embedding; an embedding of size m + 1; the tied embedding (E ≡ V)
        "no-emb": cell_params | OUTPUT, "emb=4": cell_params | OUTPUT | {"E"}, "emb tied": cell_params | OUTPUT}
    for variant, params in per_variant.items():
        for bias, names in (("on", params), ("off", {p for p in params if not p.endswith(("b", "c"))})):
            label = f"cell=lstm L=2 {variant} dropout=0.3 bias={bias} "
            assert {_param(line) for line in rows if line.startswith(label)} == names, label
    assert len(rows) == (8 + 9 + 8) + (5 + 6 + 5)
    assert f"all {len(rows) * 4} checks passed" in out and "!" not in out


def test_a_gru_in_float32_without_bias_and_without_truncation(capsys):
    argv = ["gradcheck", "--cell", "gru", *SMALL, "--dtype", "float32", "--bias", "off", "--truncation", "-1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trunc" not in out.splitlines()[2] and f"finite diff <= {THRESHOLDS[torch.float32]['fd']:.0e}" in out
    rows = _rows(out)
    assert {_param(line) for line in rows} == {"U", "W", "V", "E"}  # one layer: the cell's own names
    assert len(rows) == 3 + 4 + 3 and f"all {len(rows) * 3} checks passed" in out


def test_an_elman_stack_is_checked_with_layers_alone(capsys):
    """--layers 2 without --cell checks a 2-layer Elman model; Elman also has the tied model without an
    embedding (U ≡ Vᵀ, no U)."""
    assert main(["gradcheck", "--layers", "2", *SMALL, "--bias", "on", "--truncation", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bptt gradcheck: cell=elman layers=2 dropout=0")
    labels = {line.split(" bias=")[0] for line in _rows(out)}
    assert labels == {f"cell=elman L=2 {v} dropout=0" for v, _, _ in embedding_variants("elman", 3)}
    tied = [_param(line) for line in _rows(out) if "no-emb tied" in line]
    assert tied == ["layer0.W", "layer0.b", "layer1.U", "layer1.W", "layer1.b", "V", "c"]


def test_no_memory_carry_in_the_lstm_makes_the_command_fail(monkeypatch, capsys):
    """∂L/∂c^{t-1} without f^t ⊙ E^t: every reference rejects the weights below the output layer (and,
    when tied, V, which is also the embedding). The mutant is in the eager code: the compiled sweeps
    (engine/native.py, held equal to it by test_native.py) are turned off."""
    monkeypatch.setattr(native, "_enabled", False)
    monkeypatch.setattr(lstm, "memory_carry", lambda E, f: torch.zeros_like(E))
    assert main(["gradcheck", "--cell", "lstm", *SMALL, "--bias", "on"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAILED: \d+ of \d+ checks over threshold", out)
    assert _flagged(out) == {"U", "W", "b", "E"} and _flagged(out, tied=True) == {"U", "W", "b", "V"}
    for line in _rows(out):
        if _param(line) in {"W", "b"}:
            assert line.count("!") == 4, line  # finite differences, autograd, truncated, BPTT(k1, k2)


def test_a_gru_whose_backward_forgets_the_reset_gate_fails(monkeypatch, capsys):
    """The error of W_hn h^{t-1} + b_hn taken as δ_n instead of δ_n ⊙ r (in the eager code: the compiled
    sweeps are turned off)."""
    monkeypatch.setattr(native, "_enabled", False)
    real = gru.gate_derivatives
    monkeypatch.setattr(gru, "gate_derivatives", lambda *a: (lambda P, R, z: (P, P.clone(), z))(*real(*a)))
    assert main(["gradcheck", "--cell", "gru", "--layers", "2", *SMALL, "--bias", "on"]) == 1
    flagged = _flagged(capsys.readouterr().out)
    assert {"layer0.W", "layer1.W", "layer1.b_hn"} <= flagged and not flagged & OUTPUT  # (untied models)


def test_a_dropout_mask_forgotten_in_the_backward_fails(monkeypatch, capsys):
    """The masks are frozen, so the references see the same dropped model: a backward that ignores the
    mask disagrees with all of them."""
    monkeypatch.setattr(network, "dropout_backward", lambda dX, mask: dX)
    assert main(["gradcheck", "--cell", "lstm", "--dropout", "0.5", *SMALL, "--bias", "on"]) == 1
    assert "FAILED" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["gradcheck", "--cell", "lstm", "--dropout", "0.5", *SMALL, "--bias", "on"]) == 0


def _check(cell="lstm", **kwargs):
    options = dict(layers=2, dropout=0.3, embedding_size=4, tied=False, vocab=5, hidden=3, steps=6, batch=2,
                   bias=True, dtype=torch.float64, seed=1, truncation=1)
    rows = check_model(cell, **{**options, **kwargs})
    return {ref: max(row.errors[ref] for row in rows) for ref in rows[0].errors}


def test_the_truncated_column_checks_the_truncation(monkeypatch):
    """A truncated backward that keeps one hop too many passes the full-BPTT references and fails the
    truncated one."""
    assert max(_check().values()) <= 1e-6
    real = lstm.lstm_deltas
    monkeypatch.setattr(lstm, "lstm_deltas", lambda W, G, P, Q, dH, truncation=None:
                        real(W, G, P, Q, dH, None if truncation is None else truncation + 1))
    errors = _check()
    assert errors["fd"] <= 1e-6 and errors["autograd"] <= 1e-10 and errors["k1k2"] <= 1e-10
    assert errors["trunc"] > 1e-3


def test_the_bptt_k1_k2_column_checks_the_kept_history(monkeypatch):
    """BPTT(k1, k2) keeping one step of history too few: only the k1k2 column sees it."""
    assert bptt_blocks(6) == (2, 4) and bptt_blocks(2) == (1, 2) and bptt_blocks(1) == (1, 1)
    real = network.Network.tail
    monkeypatch.setattr(network.Network, "tail", lambda self, cache, keep: real(self, cache, keep - 1))
    errors = _check(cell="gru")
    assert errors["fd"] <= 1e-6 and errors["autograd"] <= 1e-10 and errors["trunc"] <= 1e-10
    assert errors["k1k2"] > 1e-3


@pytest.mark.parametrize("argv, option", [
    (["--layers", "0"], "--layers"), (["--layers", "5"], "--layers"), (["--dropout", "1"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"), (["--cell", "rnn"], "--cell"),
])
def test_bad_model_options_give_one_line_and_exit_2(argv, option, capsys):
    assert main(["gradcheck", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err and "Traceback" not in err


def test_a_nan_in_any_check_fails_it():
    """A NaN gradient or reference is an error of NaN, never 0: relative_error returns NaN and the worst of
    several blocks keeps it (Python's max(0.0, nan) is 0.0)."""
    from bptt.verify import relative_error, worse

    nan = torch.tensor([float("nan"), 0.0, 0.0])
    assert relative_error(torch.zeros(3), nan) != relative_error(torch.zeros(3), nan)  # NaN
    assert relative_error(nan, torch.zeros(3)) != relative_error(nan, torch.zeros(3))
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert worse(0.0, float("nan")) != worse(0.0, float("nan")) and worse(float("nan"), 1.0) != worse(float("nan"), 1.0)
    assert worse(1e-9, 1e-12) == 1e-9 and worse(1e-12, 1e-9) == 1e-9


def test_a_nan_in_the_bptt_k1_k2_gradient_fails_the_command(monkeypatch, capsys):
    """The BPTT(k1, k2) check over several windows: one window's NaN gradient makes gradcheck exit 1."""
    from bptt.engine.tbptt import TruncatedBPTT

    real = TruncatedBPTT.step

    def step(self, *args, **kwargs):
        loss, grads = real(self, *args, **kwargs)
        grads["W"][(0,) * grads["W"].dim()] = float("nan")
        return loss, grads

    monkeypatch.setattr(TruncatedBPTT, "step", step)
    assert main(["gradcheck", "--cell", "gru", *SMALL, "--bias", "on"]) == 1
    assert re.search(r"FAILED: \d+ of \d+ checks over threshold", capsys.readouterr().out)
