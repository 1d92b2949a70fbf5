"""`bptt train --keep-epochs` and `bptt average`: checkpoint averaging of a run's epochs."""

from __future__ import annotations

import json

import pytest
import torch

from bptt.training.run_dir import epoch_dir, kept_epochs
from bptt.cli import main
from bptt.storage.saved_model import load_model
from conftest import one_error_line, write_corpus


@pytest.fixture(scope="module", params=[[], ["--cell", "lstm", "--layers", "2", "--dropout", "0.2"]],
                ids=["elman", "lstm"])
def run_dir(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("avg")
    train, valid = write_corpus(root / "t.txt", 150, 0), write_corpus(root / "v.txt", 30, 1)
    argv = ["train", "--train", train, "--valid", valid, "--model", str(root / "m"), "--hidden", "12",
            "--batch", "4", "--bptt", "5", "--epochs", "4", "--optimizer", "sgd", "--lr", "1",
            "--keep-epochs", "--quiet", *request.param]
    assert main(argv) == 0
    return root


def test_every_accepted_epoch_is_kept_as_a_model(run_dir):
    metrics = [json.loads(line) for line in (run_dir / "m" / "metrics.jsonl").read_text().splitlines()]
    accepted = [r["epoch"] for r in metrics if r["accepted"]]
    assert kept_epochs(run_dir / "m") == accepted and len(accepted) >= 2
    for r in metrics:
        if r["accepted"]:
            model, _, config = load_model(epoch_dir(run_dir / "m", r["epoch"]))
            assert config["epoch"] == r["epoch"]
            assert config["valid"]["perplexity"] == pytest.approx(r["valid_perplexity"])
    best, _, best_config = load_model(run_dir / "m")  # the best model is one of the kept epochs
    kept_best, _, _ = load_model(epoch_dir(run_dir / "m", best_config["epoch"]))
    for name, p in best.params.items():
        assert torch.equal(p, kept_best.params[name])


def test_average_is_the_mean_of_the_chosen_epochs(run_dir, capsys):
    epochs = kept_epochs(run_dir / "m")[-2:]
    out = run_dir / "avg"
    assert main(["average", "--model", str(run_dir / "m"), "--last", "2", "--out", str(out),
                 "--valid", str(run_dir / "v.txt")]) == 0
    printed = capsys.readouterr().out
    assert f"average of epochs {epochs}: valid perplexity" in printed
    averaged, _, config = load_model(out)
    assert config["averaged"]["epochs"] == epochs
    singles = [load_model(epoch_dir(run_dir / "m", e))[0] for e in epochs]
    for name, p in averaged.params.items():
        mean = (singles[0].params[name].double() + singles[1].params[name].double()) / 2
        torch.testing.assert_close(p.double(), mean, rtol=0, atol=1e-7)
    assert main(["eval", "--model", str(out), "--test", str(run_dir / "v.txt")]) == 0


@pytest.mark.parametrize(
    "extra, needle",
    [(["--epochs", "90-99"], "--epochs 90-99"), (["--epochs", "3-1"], "--epochs"), (["--epochs", "x"], "--epochs"),
     (["--last", "0"], "--last")],
)
def test_bad_choices_are_one_line(run_dir, capsys, extra, needle):
    assert main(["average", "--model", str(run_dir / "m"), "--out", str(run_dir / "never"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (run_dir / "never").exists()


def test_no_kept_epochs_and_an_occupied_out_are_refused(run_dir, tmp_path, capsys):
    assert main(["average", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--keep-epochs" in capsys.readouterr().err
    assert main(["average", "--model", str(run_dir / "m"), "--out", str(run_dir / "m")]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_out_holding_a_run_is_refused_and_left_as_it_was(run_dir, tmp_path, capsys):
    """--out must not hold a run's files: a run stopped before its first epoch (vocab.json, metrics.jsonl,
    checkpoint/) would get another vocabulary and never resume; --out an existing file: one line."""
    stopped = tmp_path / "stopped"
    (stopped / "checkpoint").mkdir(parents=True)
    (stopped / "vocab.json").write_text("{}")
    for out, needle in ((stopped, "vocab.json"), (run_dir / "t.txt", "not a directory")):
        assert main(["average", "--model", str(run_dir / "m"), "--out", str(out)]) == 2
        one_error_line(capsys.readouterr().err, f"--out {out}", needle)
    assert (stopped / "vocab.json").read_text() == "{}" and sorted(p.name for p in stopped.iterdir()) == [
        "checkpoint", "vocab.json"]


def test_epochs_of_another_model_are_refused(tmp_path, capsys):
    """A directory reused by a run of another model still holds the old run's epochs beside the new one's:
    `bptt average` names the epoch that differs (exit 2) instead of averaging them or failing inside."""
    train = write_corpus(tmp_path / "t.txt", 60, 0)
    base = ["train", "--train", train, "--valid", train, "--hidden", "6", "--batch", "2", "--bptt", "4", "--quiet",
            "--keep-epochs"]
    assert main([*base, "--model", str(tmp_path / "old"), "--epochs", "3"]) == 0
    assert main([*base, "--model", str(tmp_path / "new"), "--epochs", "1", "--cell", "gru"]) == 0
    for epoch in (2, 3):  # as if the new run had been started in the old run's directory
        epoch_dir(tmp_path / "old", epoch).rename(epoch_dir(tmp_path / "new", epoch))
    assert kept_epochs(tmp_path / "new") == [1, 2, 3]
    assert main(["average", "--model", str(tmp_path / "new"), "--out", str(tmp_path / "avg")]) == 2
    one_error_line(capsys.readouterr().err, str(epoch_dir(tmp_path / "new", 2)), "another model")
    assert not (tmp_path / "avg").exists()


def test_a_new_run_refuses_a_directory_holding_kept_epochs(tmp_path, capsys):
    """epochs/ marks a run too: a new run there would mix its epochs with the old ones (--force clears them)."""
    train = write_corpus(tmp_path / "t.txt", 60, 0)
    base = ["train", "--train", train, "--valid", train, "--model", str(tmp_path / "m"), "--hidden", "6",
            "--batch", "2", "--bptt", "4", "--quiet"]
    assert main([*base, "--epochs", "2", "--keep-epochs"]) == 0
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "m" / name).unlink()
    import shutil
    shutil.rmtree(tmp_path / "m" / "checkpoint")
    assert main([*base, "--epochs", "1"]) == 2
    one_error_line(capsys.readouterr().err, "--model", "epochs")
    assert kept_epochs(tmp_path / "m") == [1, 2]


def test_force_deletes_the_kept_epochs_of_the_run_it_replaces(tmp_path):
    train = write_corpus(tmp_path / "t.txt", 60, 0)
    base = ["train", "--train", train, "--valid", train, "--model", str(tmp_path / "m"), "--hidden", "6",
            "--batch", "2", "--bptt", "4", "--quiet"]
    assert main([*base, "--epochs", "2", "--keep-epochs"]) == 0
    assert kept_epochs(tmp_path / "m")
    assert main([*base, "--epochs", "1", "--force"]) == 0
    assert kept_epochs(tmp_path / "m") == [] and not (tmp_path / "m" / "epochs").exists()


def test_keep_epochs_can_be_switched_on_when_resuming(tmp_path):
    """`bptt train --resume DIR --keep-epochs`: the epochs from the resume on are kept (a long run started
    without the option can still be averaged), and a later resume without the option keeps keeping them."""
    train = write_corpus(tmp_path / "t.txt", 60, 0)
    model = tmp_path / "m"
    base = ["train", "--train", train, "--valid", train, "--model", str(model), "--hidden", "6", "--batch", "2",
            "--bptt", "4", "--quiet", "--optimizer", "sgd", "--lr", "0.5", "--min-improvement", "1.0"]
    assert main([*base, "--epochs", "1"]) == 0
    assert kept_epochs(model) == []
    assert main(["train", "--resume", str(model), "--epochs", "3", "--keep-epochs", "--quiet"]) == 0
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    accepted = [r["epoch"] for r in metrics if r.get("accepted") and r["epoch"] > 1]
    assert kept_epochs(model) == accepted and accepted
    assert main(["train", "--resume", str(model), "--epochs", "4", "--quiet"]) == 0
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert kept_epochs(model) == [r["epoch"] for r in metrics if r.get("accepted") and r["epoch"] > 1]
    assert 4 in [r["epoch"] for r in metrics if "epoch" in r]
