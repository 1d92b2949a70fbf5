"""The graph-capturable training step (`bptt train --graph`, training/step.py's StaticTrainStep): on the
CPU the static step runs eagerly and must give the plain step's numbers bit for bit — weights, optimizer
state, carried state, metrics — through whole epochs, a rollback and a resume. On CUDA the same object
replays the step as a graph (tests/test_cuda.py compares that with eager on the device)."""

from __future__ import annotations

import json

import pytest
import torch

from bptt.cli import main
from bptt.storage.checkpoint import load_checkpoint
from bptt.training.config import TrainConfig
from bptt.training.run_dir import STATE_DIR
from bptt.training.step import StaticTrainStep
from bptt.training.trainer import Trainer
from conftest import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-step")
    return write_corpus(root / "train.txt", 90, 0), write_corpus(root / "valid.txt", 20, 1)


def _config(corpus, directory, **kw):
    base = dict(train=corpus[0], valid=corpus[1], model=str(directory), hidden_size=10, batch=3, bptt=5, epochs=2,
                progress=False, seed=4)
    return TrainConfig.from_options(**{**base, **kw})


def _state(directory):
    return load_checkpoint(directory / STATE_DIR)


@pytest.mark.parametrize("options", [
    dict(),
    dict(optimizer="sgd", lr=0.5, weight_decay=0.1),
    dict(optimizer="adagrad", lr=0.05, l2=0.01),
    dict(optimizer="rmsprop", clip=0.1, ar=1.0, tar=1.0),
    dict(optimizer="adam", weight_decay=0.2, truncation=2, direct=300, direct_order=3),
    dict(cell="lstm", layers=2, optimizer="sgd", lr=20.0, clip=0.25, sparse_updates="off"),
    dict(cell="gru", layers=2, optimizer="adam", lr=0.01, clip=0.1, sparse_updates="off"),
    dict(cell="lstm", layers=2, dropout=0.4, dropout_embedding=0.2, optimizer="sgd", lr=2.0, sparse_updates="off"),
    dict(cell="gru", layers=2, dropout=0.3, variational=True, tied=True, optimizer="adam"),
], ids=["adam", "sgd-decoupled", "adagrad-l2", "rmsprop-ar-tar", "adamw-truncation-direct", "lstm-sgd-clipped",
        "gru-adam-clipped", "lstm-dropout", "gru-variational-tied"])
def test_the_static_step_is_the_plain_step_bit_for_bit(corpus, tmp_path, options):
    plain = Trainer(_config(corpus, tmp_path / "plain", **options))
    static = Trainer(_config(corpus, tmp_path / "static", graph=True, **options))
    assert isinstance(static.static_step, StaticTrainStep) and plain.static_step is None
    a, b = plain.run(), static.run()
    assert [r["valid_entropy_bits"] for r in a.history] == [r["valid_entropy_bits"] for r in b.history]
    assert [r["train_entropy_bits"] for r in a.history] == [r["train_entropy_bits"] for r in b.history]
    (ta, sa), (tb, sb) = _state(tmp_path / "plain"), _state(tmp_path / "static")
    assert ta.keys() == tb.keys()
    for key in ta:
        if key != "rng.torch":
            assert torch.equal(ta[key], tb[key]), key
    assert sa["optimizer"] == sb["optimizer"] and sa["global_step"] == sb["global_step"] > 10


# (the static step's update is dense; a plain run with row-sparse updates would take the clipping norm over
# gathered rows, which rounds differently in the last bit: docs/performance.md)
DROPOUT = dict(cell="lstm", layers=2, dropout=0.3, variational=True, sparse_updates="off")


@pytest.mark.parametrize("options", [dict(), DROPOUT], ids=["elman", "lstm-dropout"])
def test_a_rollback_in_the_static_step_restores_in_place(corpus, tmp_path, options):
    """A step whose gradients are not finite: the static step has already applied it; the rollback puts
    the saved state back into the same tensors (what a graph reads), and the run ends like the plain
    one with the same fault (with dropout: the masks drawn again from the restored generator)."""
    runs = {}
    for name, graph in (("plain", False), ("static", True)):
        trainer = Trainer(_config(corpus, tmp_path / name, graph=graph, epochs=1, **options))
        calls = []
        real = trainer.stepper.gradients

        def gradients(x, y, mask, real=real, trainer=trainer, calls=calls):
            loss, tokens = real(x, y, mask)
            if trainer.global_step == 3 and not calls:  # the 4th step, once (not the static step's warm-up)
                calls.append(1)
                trainer.stepper.grads["W" if "W" in trainer.stepper.grads else "layer0.W"].fill_(float("nan"))
            return loss, tokens

        trainer.stepper.gradients = gradients
        result = trainer.run(checkpoint_every=2)
        assert [(e["global_step"], e["restored_step"]) for e in result.events] == [(4, 2)]
        if graph:  # weights, optimizer buffers and step counts, carried state: the very tensors captured
            now = trainer.static_step._state()
            assert len(now) == len(trainer.static_step.captured) > 3
            assert all(a is b for a, b in zip(now, trainer.static_step.captured))
        runs[name] = _state(tmp_path / name)[0]
    for key in runs["plain"]:
        if key != "rng.torch":
            assert torch.equal(runs["plain"][key], runs["static"][key]), key


@pytest.mark.parametrize("options", [dict(), DROPOUT], ids=["elman", "lstm-dropout"])
def test_resume_of_a_static_run_is_exact(corpus, tmp_path, options):
    full = Trainer(_config(corpus, tmp_path / "full", graph=True, **options))
    full.run()
    stopped = Trainer(_config(corpus, tmp_path / "stopped", graph=True, **options))
    stopped.run(max_steps=7)
    resumed = Trainer.resume(tmp_path / "stopped", progress=False)
    resumed.run()
    a, b = _state(tmp_path / "full")[0], _state(tmp_path / "stopped")[0]
    for key in a:
        if key != "rng.torch":
            assert torch.equal(a[key], b[key]), key


def test_graph_option_and_its_limits_on_the_command_line(corpus, tmp_path, capsys):
    argv = ["train", "--train", corpus[0], "--valid", corpus[1], "--hidden", "6", "--batch", "3", "--bptt", "4",
            "--epochs", "1", "--quiet"]
    assert main([*argv, "--model", str(tmp_path / "m"), "--graph"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["training"]["graph"] is True
    for extra, needle in ((["--independent"], "--graph"), (["--bptt-block", "2"], "--graph"),
                          (["--output", "class"], "--output softmax")):
        capsys.readouterr()
        assert main([*argv, "--model", str(tmp_path / "n"), "--graph", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err
