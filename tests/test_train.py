"""Training, checkpoints and exact resume, on tiny corpora; the train and eval commands."""

from __future__ import annotations

import json

import pytest
import torch

from bptt.storage.checkpoint import load_checkpoint
from bptt.cli import main
from bptt.storage.saved_model import load_model
from bptt.training.trainer import STATE_DIR, Trainer, TrainConfig, train
from conftest import one_error_line, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "train.txt", 150, 0), write_corpus(tmp_path / "valid.txt", 30, 1)


def config(corpus, model_dir, **kw) -> TrainConfig:
    base = dict(train=corpus[0], valid=corpus[1], model=str(model_dir), hidden_size=12, batch=4, bptt=5,
                optimizer="sgd", epochs=3, lr=1.0, progress=False)
    return TrainConfig.from_options(**{**base, **kw})


def test_training_learns_the_toy_language(corpus, tmp_path):
    result = train(config(corpus, tmp_path / "m", epochs=4))
    assert result.best_valid.perplexity < 6.0  # 14 word types; the language is far from uniform
    for name in ("model.safetensors", "config.json", "vocab.json", "metrics.jsonl"):
        assert (tmp_path / "m" / name).is_file()
    metrics = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))
    model, vocab, saved = load_model(tmp_path / "m")
    assert saved["valid"]["perplexity"] == pytest.approx(result.best_valid.perplexity)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(bptt=3, bptt_block=2), dict(independent=True), dict(optimizer="adam", lr=0.01, schedule="plateau"),
     dict(output="nce"), dict(output="class", classes=3), dict(direct=500, bptt=3, bptt_block=2),
     dict(output="class", classes=3, direct=500, direct_order=4), dict(optimizer="adam", lr=0.01, weight_decay=2.0),
     dict(cell="lstm", layers=2, dropout=0.3, tied=True),
     dict(cell="lstm", layers=2, dropout=0.3, dropout_embedding=0.1, variational=True, bptt=3, bptt_block=2),
     dict(cell="gru", dropout=0.3, independent=True), dict(cell="gru", layers=2, embedding_size=5, schedule="step",
                                                           decay_start=1, optimizer="adam", lr=0.01),
     # B·m·4 = 72 bytes a step: the kept steps and the carried state, views into a block's tensors, sit at
     # offsets that are not multiples of 64 bytes, where a resumed run's are freshly allocated
     dict(hidden_size=6, batch=3, bptt=3, bptt_block=2, optimizer="adam", lr=0.01),
     dict(cell="lstm", layers=2, hidden_size=6, batch=3, bptt=3, bptt_block=2, dropout=0.3)],
    ids=["continuous", "bptt-block", "independent", "adam-plateau", "nce", "class", "direct", "class-direct",
         "adamw", "lstm-dropout-tied", "lstm-variational-bptt-block", "gru-dropout-independent", "gru-step",
         "bptt-block-unaligned", "lstm-bptt-block-unaligned"],
)
def test_resume_is_exact(corpus, tmp_path, kw):
    """Train 2N steps == train N, stop, resume, train N: identical weights, optimizer and position."""
    straight = Trainer(config(corpus, tmp_path / "a", **kw))
    n_epoch = sum(1 for _ in straight._batches())
    N = n_epoch + 3  # the stop falls in the second epoch, after an epoch boundary
    straight.run(max_steps=2 * N)
    first = Trainer(config(corpus, tmp_path / "b", **kw))
    assert not first.run(max_steps=N).finished
    resumed = Trainer.resume(tmp_path / "b", progress=False)
    assert resumed.global_step == N
    resumed.run(max_steps=2 * N)
    a, _ = load_checkpoint(tmp_path / "a" / STATE_DIR)
    b, _ = load_checkpoint(tmp_path / "b" / STATE_DIR)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    timeless = lambda history: [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in history]
    assert straight.lr == resumed.lr and timeless(straight.history) == timeless(resumed.history)


@pytest.mark.parametrize("source", ["texts", "data"])
def test_resume_from_another_directory_reads_the_runs_own_corpora(tmp_path, monkeypatch, capsys, source):
    """Relative --train/--valid or --data are read from the directory the run started in, wherever --resume
    is given (a file of the same name in the new directory is not the run's): the run ends as one run."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    write_corpus(start / "train.txt", 150, 0), write_corpus(start / "valid.txt", 30, 1)
    write_corpus(elsewhere / "train.txt", 150, 7), write_corpus(elsewhere / "valid.txt", 30, 8)
    monkeypatch.chdir(start)
    corpora = ["--train", "train.txt", "--valid", "valid.txt"]
    if source == "data":
        assert main(["prepare", *corpora, "--out", "data", "--quiet"]) == 0
        corpora = ["--data", "data"]
        assert main(["prepare", "--train", "train.txt", "--valid", "valid.txt", "--out", str(elsewhere / "data"),
                     "--min-count", "2", "--quiet"]) == 0
    options = [*corpora, "--hidden", "8", "--batch", "4", "--bptt", "5", "--epochs", "2", "--seed", "1", "--quiet"]
    assert main(["train", *options, "--model", "straight"]) == 0
    assert main(["train", *options, "--model", "stopped", "--max-steps", "9"]) == 0
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(start / "stopped"), "--quiet"]) == 0
    a, _ = load_checkpoint(start / "straight" / STATE_DIR)
    b, _ = load_checkpoint(start / "stopped" / STATE_DIR)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ROLLBACK_RUN = ["--hidden", "6", "--batch", "3", "--bptt", "4", "--optimizer", "sgd", "--lr", "1.0", "--epochs", "2",
                "--max-grad-norm", "0.55", "--quiet"]  # a step of epoch 2 is rolled back (its norm), deterministically


def test_checkpoint_every_is_kept_by_resume(tmp_path):
    """--checkpoint-every is part of the run: resumed without it, the run still saves every N steps, so a
    later rollback returns to the state the uninterrupted run returns to and the runs end alike."""
    data = ["--train", write_corpus(tmp_path / "t.txt", 40, 0), "--valid", write_corpus(tmp_path / "v.txt", 10, 1)]
    assert main(["train", *data, *ROLLBACK_RUN, "--model", str(tmp_path / "full"), "--checkpoint-every", "5"]) == 0
    assert main(["train", *data, *ROLLBACK_RUN, "--model", str(tmp_path / "cut"), "--checkpoint-every", "5",
                 "--max-steps", "10"]) == 0  # the stop falls on a periodic checkpoint
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    a, sa = load_checkpoint(tmp_path / "full" / STATE_DIR)
    b, sb = load_checkpoint(tmp_path / "cut" / STATE_DIR)
    rollbacks = [(e["global_step"], e["restored_step"]) for e in sa["events"]]
    assert rollbacks and all(fault > 10 and restored % 5 == 0 and restored > 10 for fault, restored in rollbacks)
    assert [(e["global_step"], e["restored_step"]) for e in sb["events"]] == rollbacks
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sb["training"]["checkpoint_every"] == 5


def test_a_stop_does_not_move_the_rollback_target(tmp_path):
    """Stopped by --max-steps between checkpoints and resumed: a later rollback returns to the last regular
    checkpoint, as in the run that did not stop (the stop's save keeps it in DIR/checkpoint/rollback, which
    the next regular checkpoint removes and --force deletes); the two runs end alike."""
    data = ["--train", write_corpus(tmp_path / "t.txt", 40, 0), "--valid", write_corpus(tmp_path / "v.txt", 10, 1)]
    assert main(["train", *data, *ROLLBACK_RUN, "--model", str(tmp_path / "full")]) == 0
    _, sa = load_checkpoint(tmp_path / "full" / STATE_DIR)
    (fault, restored), = [(e["global_step"], e["restored_step"]) for e in sa["events"]]
    stop = fault - 2
    assert restored < stop < fault  # the case: the stop falls between the rollback's target and its fault
    assert main(["train", *data, *ROLLBACK_RUN, "--model", str(tmp_path / "cut"), "--max-steps", str(stop)]) == 0
    assert (tmp_path / "cut" / STATE_DIR / "rollback" / "model.safetensors").is_file()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    a, _ = load_checkpoint(tmp_path / "full" / STATE_DIR)
    b, sb = load_checkpoint(tmp_path / "cut" / STATE_DIR)
    assert [(e["global_step"], e["restored_step"]) for e in sb["events"]] == [(fault, restored)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / STATE_DIR / "rollback").exists()  # removed by the next regular checkpoint
    assert main(["train", *data, *ROLLBACK_RUN, "--model", str(tmp_path / "cut"), "--max-steps", str(stop),
                 "--force"]) == 0
    assert (tmp_path / "cut" / STATE_DIR / "rollback").is_dir()
    assert main(["train", *data, *ROLLBACK_RUN, "--model", str(tmp_path / "cut"), "--max-steps", "0", "--force"]) == 0
    assert not (tmp_path / "cut" / STATE_DIR / "rollback").exists()  # --force deleted the earlier run's (a stop
    # at step 0 has no other rollback target)


def test_a_signal_during_the_last_validation_still_finishes_the_run(corpus, tmp_path):
    """SIGTERM while the last epoch is being validated: the run has nothing left to do, so it is finished
    (interrupted None: `bptt train` exits 0), not reported as stopped."""
    import os
    import signal

    trainer = Trainer(config(corpus, tmp_path / "m", epochs=2))
    real = trainer._validate

    def validate():
        if trainer.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real()

    trainer._validate = validate
    result = trainer.run()
    assert result.finished and result.interrupted is None and trainer.done and result.epochs == 2


_KILLED_AFTER_BEST = """
import os, signal, sys
from bptt.training import run_dir
from bptt.training.trainer import Trainer, TrainConfig
real = run_dir.RunDirectory.save_best
def save_best(self, model, extra):
    real(self, model, extra)
    os.kill(os.getpid(), signal.SIGKILL)  # after the best model's rename, before the epoch's state
run_dir.RunDirectory.save_best = save_best
Trainer(TrainConfig.from_options(train=sys.argv[1], valid=sys.argv[2], model=sys.argv[3], **eval(sys.argv[4]))).run()
"""


def test_a_kill_between_the_best_model_and_the_epochs_state_changes_nothing(tmp_path):
    """Killed right after epoch 1's best model is written and before its state: the resumed run redoes the
    end of epoch 1 as the uninterrupted run did (whether a best model was saved is the state's, not DIR's),
    here where epoch 1 is worse on valid than the initial weights and epoch 2 is rejected."""
    import subprocess
    import sys

    train, valid = write_corpus(tmp_path / "t.txt", 40, 0), write_corpus(tmp_path / "v.txt", 10, 1)
    options = dict(hidden_size=6, batch=3, bptt=4, optimizer="sgd", lr=20.0, clip=0.5, epochs=4, checkpoint_every=5,
                   progress=False)
    full = Trainer(TrainConfig.from_options(train=train, valid=valid, model=str(tmp_path / "full"), **options))
    full.run()
    assert not all(h["accepted"] for h in full.history)  # the case: a rejected epoch restores the best weights
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_BEST, train, valid, str(tmp_path / "cut"), repr(options)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    Trainer.resume(tmp_path / "cut", progress=False).run()
    a, sa = load_checkpoint(tmp_path / "full" / STATE_DIR)
    b, sb = load_checkpoint(tmp_path / "cut" / STATE_DIR)
    assert all(torch.equal(a[k], b[k]) for k in a) and sa["history"][-1]["valid_entropy_bits"] == sb["history"][-1][
        "valid_entropy_bits"]


@pytest.mark.parametrize("extra", [["--lr", "100"], ["--hidden", "99"], ["--cell", "lstm"], ["--optimizer", "sgd"],
                                   ["--seed", "3"], ["--batch", "2"], ["--force"]])
def test_resume_refuses_the_options_it_would_ignore(corpus, tmp_path, capsys, extra):
    """--resume DIR keeps the run's model, data and optimizer: another value is refused in one line naming
    the option (exit 2), not silently ignored; the options a resumed run takes still work."""
    base = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / "m"), "--hidden", "8",
            "--batch", "4", "--bptt", "5", "--quiet"]
    assert main([*base, "--max-steps", "3"]) == 0
    before = (tmp_path / "m" / STATE_DIR / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(tmp_path / "m"), *extra, "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, extra[0])
    assert (tmp_path / "m" / STATE_DIR / "model.safetensors").read_bytes() == before
    assert main(["train", "--resume", str(tmp_path / "m"), "--max-steps", "4", "--clip", "0.5", "--epochs", "3",
                 "--checkpoint-every", "2", "--quiet"]) == 0


def test_the_closing_line_names_a_model_only_once_there_is_one(corpus, tmp_path, capsys):
    """Stopped before the first epoch's end, DIR holds no model yet: the last line says so instead of
    pointing at one; after an epoch it names DIR."""
    base = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / "m"), "--hidden", "8",
            "--batch", "4", "--bptt", "5", "--quiet"]
    assert main([*base, "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "no model yet" in out and not (tmp_path / "m" / "model.safetensors").exists()
    assert main(["train", "--resume", str(tmp_path / "m"), "--epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"model in {tmp_path / 'm'}" in out and (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("key, value", [("epoch", "x"), ("global_step", None), ("lr", "fast"), ("done", 3),
                                        ("epoch_nats", float("inf")), ("best_eval", [1]), ("history", {}),
                                        ("training.train", 7), ("training.seed", None), ("training.clip", -1.0)])
def test_an_edited_training_state_is_one_line_naming_the_file(corpus, tmp_path, capsys, key, value):
    """A checkpoint's config.json edited by hand (a field of the wrong type or out of range): --resume says so
    in one line naming the file (exit 2), not an internal error further on."""
    base = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / "m"), "--hidden", "8",
            "--batch", "4", "--bptt", "5", "--quiet", "--max-steps", "3"]
    assert main(base) == 0
    capsys.readouterr()
    path = tmp_path / "m" / STATE_DIR / "config.json"
    state = json.loads(path.read_text())
    where, _, name = key.rpartition(".")
    (state[where] if where else state)[name] = value
    path.write_text(json.dumps(state))
    assert main(["train", "--resume", str(tmp_path / "m"), "--epochs", "2", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, str(path))


def test_weight_decay_option_shrinks_the_matrices(corpus, tmp_path, capsys):
    """--weight-decay reaches the optimizer (decoupled: the weight matrices end smaller, biases are
    not decayed more than by the gradient) and is recorded in the saved training config."""
    runs = {}
    for wd in ("0", "20"):
        argv = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / wd), "--hidden", "12",
                "--batch", "4", "--bptt", "5", "--epochs", "1", "--lr", "0.01", "--weight-decay", wd, "--quiet"]
        assert main(argv) == 0
        runs[wd] = load_model(tmp_path / wd)
    assert runs["20"][2]["training"]["weight_decay"] == 20.0
    for name in ("U", "W", "V"):
        assert runs["20"][0].params[name].norm() < 0.9 * runs["0"][0].params[name].norm(), name
    capsys.readouterr()
    bad = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / "x"), "--weight-decay"]
    for value in ("-1", "1000", "nan"):  # 1000 × the default Adam rate 0.002 >= 1
        assert main([*bad, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--weight-decay" in err


def test_init_range_option_sets_the_initial_weights(corpus, tmp_path, capsys):
    """--init-range R: every weight matrix starts uniform in [-R, R] (it fills the range), recorded in
    the saved config; a range that is not positive is refused with one line naming the option."""
    for r in (0.1, 0.03):
        trainer = Trainer(config(corpus, tmp_path / str(r), init_range=r))
        for name in ("U", "W", "V"):
            p = trainer.model.params[name]
            assert p.abs().max() <= r and p.abs().max() > 0.9 * r, name
            assert p.std() == pytest.approx(r / 3**0.5, rel=0.15), name  # uniform: std = R / sqrt(3)
        trainer.run(max_steps=2)
        _, state = load_checkpoint(tmp_path / str(r) / STATE_DIR)
        assert state["training"]["model_config"]["init_range"] == r
    bad = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / "x"), "--init-range"]
    for value in ("0", "-0.1", "inf"):
        assert main([*bad, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--init-range" in err


def test_same_seed_same_model_different_seed_different(corpus, tmp_path):
    train(config(corpus, tmp_path / "a", epochs=1))
    train(config(corpus, tmp_path / "b", epochs=1))
    train(config(corpus, tmp_path / "c", epochs=1, seed=1))
    a, b, c = (load_checkpoint(tmp_path / d)[0] for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["W"], c["W"])


def test_checkpoint_every_writes_the_state(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path / "m"))
    trainer.run(max_steps=5, checkpoint_every=2)
    _, state = load_checkpoint(tmp_path / "m" / STATE_DIR)
    assert state["global_step"] == 5 and state["step_in_epoch"] == 5


def test_train_and_eval_commands(corpus, tmp_path, capsys):
    model_dir = str(tmp_path / "m")
    argv = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", model_dir, "--hidden", "8",
            "--batch", "4", "--bptt", "5", "--epochs", "2", "--quiet"]
    assert main(argv) == 0
    assert "best valid perplexity" in capsys.readouterr().out
    assert main(["eval", "--model", model_dir, "--test", corpus[1], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "entropy_bits", "tokens", "oov"} <= result.keys()
    assert result["perplexity"] == pytest.approx(2 ** result["entropy_bits"])
    assert result["tokens"] == sum(len(line.split()) + 1 for line in open(corpus[1]))


def test_eval_dynamic_adapts_without_changing_the_saved_model(corpus, tmp_path, capsys):
    model_dir = tmp_path / "m"
    train(config(corpus, model_dir, epochs=1))
    saved = (model_dir / "model.safetensors").read_bytes()
    results = []
    for extra in ([], ["--dynamic", "0.0"], ["--dynamic", "0.05", "--dynamic-block", "5"]):
        assert main(["eval", "--model", str(model_dir), "--test", corpus[1], "--json", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    static, zero, dynamic = results
    assert "dynamic_lr" not in static and zero["dynamic_lr"] == 0.0 and dynamic["dynamic_block"] == 5
    assert zero["perplexity"] == pytest.approx(static["perplexity"], rel=1e-5)
    assert dynamic["perplexity"] != pytest.approx(static["perplexity"], rel=1e-5)  # the rate reached the model
    assert (model_dir / "model.safetensors").read_bytes() == saved


def test_resume_command_continues(corpus, tmp_path, capsys):
    model_dir = str(tmp_path / "m")
    argv = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", model_dir, "--hidden", "8",
            "--batch", "4", "--bptt", "5", "--epochs", "2", "--quiet", "--max-steps", "4"]
    assert main(argv) == 0
    assert "stopped at step 4" in capsys.readouterr().out
    assert main(["train", "--resume", model_dir, "--quiet"]) == 0
    assert "finished" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--valid", "v.txt", "--model", "m"], "--train"),
        (["train", "--train", "missing.txt", "--valid", "missing.txt", "--model", "{tmp}/m"], "missing.txt"),
        (["train", "--resume", "{tmp}/nothing"], "nothing"),
        (["eval", "--model", "{tmp}/nothing", "--test", "x.txt"], "nothing"),
        (["train", "--train", "t", "--valid", "v", "--model", "m", "--hidden", "0"], "--hidden"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank-lines"])
def test_empty_training_file_is_one_line_and_exit_2(tmp_path, capsys, content):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(content)
    assert main(["train", "--train", str(empty), "--valid", str(empty), "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "empty" in err and len(err.strip().splitlines()) == 1


def test_gzip_corpus_and_eval_oov(corpus, tmp_path, capsys):
    import gzip

    gz = tmp_path / "train.txt.gz"
    gz.write_bytes(gzip.compress(open(corpus[0], "rb").read()))
    test = tmp_path / "test.txt"
    test.write_text("the purple cat meows\nthe dog barks\n")  # 'purple' is not in the vocabulary
    model_dir = str(tmp_path / "m")
    assert main(["train", "--train", str(gz), "--valid", corpus[1], "--model", model_dir, "--hidden", "8",
                 "--batch", "4", "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", model_dir, "--test", str(test), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["oov"] == 1 and result["tokens"] == 9


def test_undecodable_training_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a b c\nd e f\ng \xff h\n")
    assert main(["train", "--train", str(bad), "--valid", str(bad), "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and len(err.strip().splitlines()) == 1


def test_plateau_schedule_stops_early(corpus, tmp_path):
    result = train(config(corpus, tmp_path / "m", epochs=30, lr=3.0, schedule="plateau", max_decays=1,
                          min_improvement=1.05))
    assert result.epochs < 30  # stopped by the schedule, not by the epoch limit
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == 3.0 and min(lrs) == pytest.approx(0.75)


def test_halving_factor_sets_the_annealing_rate(corpus, tmp_path):
    # min_improvement 1.5: every epoch counts as stalled, so annealing starts after epoch 2 and stops
    # after epoch 3; the rate of epoch 3 is lr × factor
    result = train(config(corpus, tmp_path / "m", epochs=10, lr=1.0, min_improvement=1.5, halving_factor=0.7))
    assert [r["lr"] for r in result.history] == pytest.approx([1.0, 1.0, 0.7])


def test_resume_with_a_new_threshold_continues_a_finished_run(corpus, tmp_path, capsys):
    model_dir = tmp_path / "m"
    first = train(config(corpus, model_dir, epochs=10, lr=1.0, min_improvement=1.5))  # stops after epoch 3
    assert first.finished and len(first.history) == 3
    state_files = {p.name: p.read_bytes() for p in (model_dir / STATE_DIR).iterdir()}
    # a finished run resumed as it is stays finished: nothing is trained
    assert main(["train", "--resume", str(model_dir), "--quiet"]) == 0
    assert len(Trainer.resume(model_dir, progress=False).history) == 3
    # a bad new threshold: one line, exit 2, the state untouched
    assert main(["train", "--resume", str(model_dir), "--min-improvement", "0.5", "--quiet"]) == 2
    assert "--min-improvement" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (model_dir / STATE_DIR).iterdir()} == state_files
    # stop only when valid gets worse, at most 5 epochs in all: it goes on at the rate it had reached
    assert main(["train", "--resume", str(model_dir), "--min-improvement", "1.0", "--epochs", "5", "--quiet"]) == 0
    history = Trainer.resume(model_dir, progress=False).history
    assert 4 <= len(history) <= 5 and history[:3] == first.history
    assert history[3]["lr"] == history[2]["lr"]
    saved = json.loads((model_dir / STATE_DIR / "config.json").read_text())
    assert saved["training"]["min_improvement"] == 1.0 and saved["training"]["epochs"] == 5


@pytest.mark.parametrize("independent", [False, True])
def test_truncation_option_reaches_the_engine(corpus, tmp_path, independent):
    full = Trainer(config(corpus, tmp_path / "a", independent=independent))
    cut = Trainer(config(corpus, tmp_path / "b", independent=independent, truncation=0))
    assert cut.engine.truncation == 0
    full.run(max_steps=3)
    cut.run(max_steps=3)
    assert not torch.equal(full.model.params["W"], cut.model.params["W"])  # ∂L/∂W lost its recurrent terms


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "score", "generate", "train"])
def test_cuda_without_cuda_is_one_line_and_exit_2(corpus, tmp_path, capsys, command):
    model_dir = str(tmp_path / "m")
    train(config(corpus, model_dir, epochs=1))
    argv = {
        "eval": ["eval", "--model", model_dir, "--test", corpus[1]],
        "score": ["score", "--model", model_dir, "--text", corpus[1]],
        "generate": ["generate", "--model", model_dir],
        "train": ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / "n")],
    }[command]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--device cuda" in err and "Traceback" not in err


@pytest.mark.parametrize("option, before, after", [("clip", "0.25", "0"), ("ar", "0", "2"), ("tar", "0", "2")])
def test_resume_with_a_new_setting_applies_it_from_there_on(corpus, tmp_path, capsys, option, before, after):
    """`bptt train --resume DIR --clip X` (or --ar, --tar): the steps after the resume use X — a run
    stopped before its first step and resumed with `--clip 0` computes what a run with --clip 0 computes."""
    base = ["train", "--train", corpus[0], "--valid", corpus[1], "--hidden", "8", "--batch", "4", "--bptt", "5",
            "--optimizer", "sgd", "--lr", "1.0", "--epochs", "3", "--quiet"]
    flag = f"--{option}"
    weights = {}
    for name, value in (("before", before), ("after", after)):
        assert main([*base, "--model", str(tmp_path / name), flag, value, "--max-steps", "40"]) == 0
        weights[name] = load_checkpoint(tmp_path / name / STATE_DIR)[0]
    switched = tmp_path / "switched"
    assert main([*base, "--model", str(switched), flag, before, "--max-steps", "0"]) == 0  # no step taken
    state_files = {p.name: p.read_bytes() for p in (switched / STATE_DIR).iterdir()}
    assert main(["train", "--resume", str(switched), flag, "-1", "--quiet"]) == 2  # bad: one line, nothing changed
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (switched / STATE_DIR).iterdir()} == state_files
    assert main(["train", "--resume", str(switched), flag, after, "--max-steps", "25", "--quiet"]) == 0
    assert main(["train", "--resume", str(switched), "--max-steps", "40", "--quiet"]) == 0  # the new value is kept
    got = load_checkpoint(switched / STATE_DIR)[0]
    assert any(not torch.equal(weights["before"][k], weights["after"][k]) for k in got)  # the setting acted
    for key in got:
        torch.testing.assert_close(got[key], weights["after"][key], rtol=0, atol=0)
    saved = json.loads((switched / STATE_DIR / "config.json").read_text())
    assert saved["training"][option] == float(after)
