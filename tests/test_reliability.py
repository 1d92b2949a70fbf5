"""Reliability in process: divergence (a faulty step is rolled back, never applied, never saved),
signals, and metrics.jsonl kept consistent with the training state. tests/test_crash.py kills real
processes.

Faults are injected by wrapping the trainer's engine (or model) so that the gradients or the loss of
a chosen step are NaN, Inf or huge; nothing in the production code knows about it.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from bptt.storage.checkpoint import load_checkpoint, save_checkpoint
from bptt.cli import main
from bptt.commands.plot import read_metrics
from bptt.storage.saved_model import load_model
from bptt.engine.tbptt import TruncatedBPTT
from bptt.training.trainer import MAX_ROLLBACKS, STATE_DIR, Trainer, TrainConfig, TrainingDiverged
from conftest import write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "train.txt", 40, 0), write_corpus(tmp_path / "valid.txt", 10, 1)


def config(corpus, model_dir, **kw) -> TrainConfig:
    base = dict(train=corpus[0], valid=corpus[1], model=str(model_dir), hidden_size=6, batch=2, bptt=4,
                optimizer="sgd", epochs=2, lr=1.0, progress=False)
    return TrainConfig.from_options(**{**base, **kw})


def inject(trainer: Trainer, faulty_calls, fault: str = "nan") -> list[int]:
    """Make the engine's n-th call (1-based, n in faulty_calls) return a faulty loss or gradient."""
    real, calls = trainer.engine.step, []

    def step(x, y, mask=None):
        loss, grads = real(x, y)
        calls.append(len(calls) + 1)
        if calls[-1] in faulty_calls:
            if fault == "nan":
                grads["W"][0, 0] = math.nan
            elif fault == "inf":
                grads["V"][1, 1] = math.inf
            elif fault == "huge":
                for g in grads.values():
                    g.mul_(1e9)
            elif fault == "loss":
                loss = torch.tensor(math.nan)
        return loss, grads

    trainer.engine.step = step
    return calls


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_transient_fault_rolls_back_halves_lr_and_matches_a_clean_run(corpus, tmp_path, capsys):
    """A NaN gradient at step 7 (checkpoints every 3 steps): back to step 6 at lr/2, then on as normal."""
    faulty = Trainer(config(corpus, tmp_path / "f"))
    inject(faulty, {7})
    result = faulty.run(checkpoint_every=3)
    assert result.finished
    (event,) = result.events
    assert event["event"] == "rollback" and "non-finite gradients" in event["reason"]
    assert event["global_step"] == 7 and event["restored_step"] == 6 and event["lr"] == 0.5
    assert result.history[0]["lr"] == 0.5
    err = capsys.readouterr().err
    assert "rollback: non-finite gradients (norm nan) at step 7" in err
    assert "learning rate halved to 0.5" in err
    # the same as a run that was never faulty and whose rate was halved after step 6
    clean = Trainer(config(corpus, tmp_path / "c"))
    clean.run(max_steps=6, checkpoint_every=3)
    clean.lr *= 0.5
    clean.run(checkpoint_every=3)
    for k, p in clean.model.params.items():
        assert torch.equal(faulty.model.params[k], p), k
    # only finite values on disk; metrics.jsonl holds the event before the epoch it happened in
    tensors, state = load_checkpoint(tmp_path / "f" / STATE_DIR)
    assert all_finite(tensors) and state["events"] == [event]
    model, _, _ = load_model(tmp_path / "f")
    assert all_finite(model.params)
    lines = [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == event and [r["epoch"] for r in lines[1:]] == [1, 2]
    assert [r["epoch"] for r in read_metrics(tmp_path / "f" / "metrics.jsonl")] == [1, 2]  # plot skips events


@pytest.mark.parametrize("fault, reason", [("inf", "non-finite gradients"), ("loss", "non-finite loss"),
                                           ("huge", "above --max-grad-norm 1000")])
def test_each_kind_of_fault_is_rolled_back(corpus, tmp_path, fault, reason):
    trainer = Trainer(config(corpus, tmp_path / "m", epochs=1))
    inject(trainer, {2}, fault)
    result = trainer.run()
    assert [e["event"] for e in result.events] == ["rollback"] and reason in result.events[0]["reason"]
    assert result.events[0]["restored_step"] == 0  # no checkpoint yet: back to the start
    assert all_finite(load_checkpoint(tmp_path / "m" / STATE_DIR)[0])


def test_max_grad_norm_zero_turns_the_bound_off(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path / "m", epochs=1, max_grad_norm=0.0))
    inject(trainer, {2}, "huge")
    assert trainer.run().events == []  # applied (clipped to --clip), not rolled back
    with pytest.raises(ValueError, match="--max-grad-norm"):
        config(corpus, tmp_path / "x", max_grad_norm=-1.0).validate()


def test_max_grad_norm_option(corpus, tmp_path, capsys):
    argv = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", str(tmp_path / "m"), "--hidden", "6",
            "--batch", "2", "--bptt", "4", "--epochs", "1", "--quiet"]
    assert main([*argv, "--max-grad-norm", "-1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--max-grad-norm" in err
    assert main([*argv, "--max-grad-norm", "0"]) == 0
    assert load_checkpoint(tmp_path / "m" / STATE_DIR)[1]["training"]["max_grad_norm"] == 0.0


def test_independent_mode_fault_is_rolled_back(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path / "m", epochs=1, independent=True))
    real = trainer.stepper.gradients
    calls = []

    def gradients(*args, **kwargs):
        loss, tokens = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            trainer.stepper.grads["U"].fill_(math.nan)
        return loss, tokens

    trainer.stepper.gradients = gradients
    result = trainer.run(checkpoint_every=2)
    assert [(e["global_step"], e["restored_step"]) for e in result.events] == [(3, 2)]
    assert all_finite(load_checkpoint(tmp_path / "m" / STATE_DIR)[0])


def test_rollback_after_resume_returns_where_the_uninterrupted_run_returns(corpus, tmp_path):
    """Stopped at step 5 (between checkpoints) and resumed: a fault at step 6 rolls back to the state the run
    that did not stop returns to (here the start: no checkpoint before step 5), not to the stop's save, and
    the two runs go on alike."""
    first = Trainer(config(corpus, tmp_path / "m"))
    first.run(max_steps=5)
    resumed = Trainer.resume(tmp_path / "m", progress=False)
    inject(resumed, {1})
    resumed.run(max_steps=6)  # step 6 fails once: back to step 0 at half the rate, then steps 1-6 again
    assert [(e["global_step"], e["restored_step"]) for e in resumed.events] == [(6, 0)] and resumed.lr == 0.5
    again = Trainer(config(corpus, tmp_path / "a"))
    inject(again, {6})
    again.run(max_steps=6)
    assert [(e["global_step"], e["restored_step"]) for e in again.events] == [(6, 0)]
    for k, p in again.model.params.items():
        assert torch.equal(resumed.model.params[k], p), k
    clean = Trainer.resume(tmp_path / "m", progress=False)  # the state saved at the second stop
    assert clean.global_step == 6 and all(torch.equal(clean.model.params[k], p) for k, p in again.model.params.items())


def test_permanent_fault_stops_after_max_rollbacks(corpus, tmp_path, capsys):
    trainer = Trainer(config(corpus, tmp_path / "m"))
    inject(trainer, set(range(9, 1000)))
    with pytest.raises(TrainingDiverged) as info:
        trainer.run(checkpoint_every=4)
    msg = str(info.value)
    assert "\n" not in msg and f"{MAX_ROLLBACKS} rollbacks in a row" in msg
    assert "training diverged" in msg and str(tmp_path / "m" / STATE_DIR) in msg and "step 8" in msg
    tensors, state = load_checkpoint(tmp_path / "m" / STATE_DIR)
    assert all_finite(tensors) and state["global_step"] == 8
    assert [e["event"] for e in state["events"]] == ["rollback"] * (MAX_ROLLBACKS - 1) + ["diverged"]
    assert state["lr"] == 1.0 / 2**MAX_ROLLBACKS
    assert capsys.readouterr().err.count("rollback: ") == MAX_ROLLBACKS


def test_permanent_fault_through_the_cli_exits_1_with_one_error_line(corpus, tmp_path, monkeypatch, capsys):
    real = TruncatedBPTT.step

    def step(self, inputs, targets, mask=None):
        loss, grads = real(self, inputs, targets, mask)
        grads["W"].fill_(math.inf)
        return loss, grads

    monkeypatch.setattr(TruncatedBPTT, "step", step)
    model_dir = str(tmp_path / "m")
    argv = ["train", "--train", corpus[0], "--valid", corpus[1], "--model", model_dir, "--hidden", "6",
            "--batch", "2", "--bptt", "4", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training diverged") and str(tmp_path / "m" / STATE_DIR) in err[-1]
    assert len([line for line in err if not line.startswith("rollback: ")]) == 1
    assert "Traceback" not in "\n".join(err)


def test_save_checkpoint_refuses_nan_from_the_trainer_state(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path / "m"))
    trainer.model.params["V"][0, 0] = math.nan
    with pytest.raises(ValueError, match="tensor 'param.V' holds NaN or Inf"):
        trainer.save_state()
    assert not (tmp_path / "m" / STATE_DIR).exists()
    with pytest.raises(ValueError, match="'x'"):
        save_checkpoint(tmp_path / "n", {"x": torch.tensor([1.0, math.inf])}, {})


def test_non_finite_weights_at_a_checkpoint_are_rolled_back_not_saved(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path / "m", epochs=1))
    real = trainer.optimizer.step
    calls = []

    def step(grads, lr):
        real(grads, lr)
        calls.append(1)
        if len(calls) == 4:
            trainer.model.params["W"][0, 0] = math.inf  # finite gradients, but the update overflowed

    trainer.optimizer.step = step
    result = trainer.run(checkpoint_every=2)
    assert [(e["reason"], e["global_step"], e["restored_step"]) for e in result.events] == [
        ("non-finite weights or optimizer state", 4, 2)
    ]
    assert all_finite(load_checkpoint(tmp_path / "m" / STATE_DIR)[0])


# -- signals, in process -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_at_the_next_step_with_the_state_saved(corpus, tmp_path, sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = Trainer(config(corpus, tmp_path / "m"))
    real = trainer.train_step

    def train_step(x, y, mask):
        applied = real(x, y, mask)
        if trainer.global_step == 5:
            os.kill(os.getpid(), sig)  # the handler only sets a flag
        return applied

    trainer.train_step = train_step
    result = trainer.run()  # no periodic checkpoints: only the interruption saves mid-epoch
    assert result.interrupted == sig and not result.finished
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back
    _, state = load_checkpoint(tmp_path / "m" / STATE_DIR)
    assert state["global_step"] == 5 and state["step_in_epoch"] == 5 and not state["done"]
    resumed = Trainer.resume(tmp_path / "m", progress=False)
    assert resumed.run().finished
    straight = Trainer(config(corpus, tmp_path / "s"))
    straight.run()
    for k, p in straight.model.params.items():
        assert torch.equal(resumed.model.params[k], p), k


def test_second_sigint_raises_at_once(corpus, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    trainer = Trainer(config(corpus, tmp_path / "m"))
    real = trainer.train_step

    def train_step(x, y, mask):
        applied = real(x, y, mask)
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return applied

    trainer.train_step = train_step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) == before
    assert not (tmp_path / "m" / STATE_DIR).exists()  # nothing written after the second signal


def test_train_function_raises_keyboard_interrupt_after_saving(corpus, tmp_path, monkeypatch):
    """train() (the demo's entry) does not carry on after a signal: it saves, then raises."""
    from bptt.training.trainer import train

    real = Trainer.train_step

    def train_step(self, x, y, mask):
        applied = real(self, x, y, mask)
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return applied

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        train(config(corpus, tmp_path / "m"))
    assert load_checkpoint(tmp_path / "m" / STATE_DIR)[1]["global_step"] == 3


def test_metrics_jsonl_is_rewritten_from_the_saved_state(corpus, tmp_path):
    """A process killed after appending an epoch line but before saving the state used to leave a
    duplicated line after --resume; now the file is rewritten from the state, after the state."""
    first = Trainer(config(corpus, tmp_path / "m", epochs=3))
    n_epoch = sum(1 for _ in first._batches())
    first.run(max_steps=n_epoch + 2)
    metrics = tmp_path / "m" / "metrics.jsonl"
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1]
    metrics.write_text(metrics.read_text() * 2 + '{"epoch": 2}\n')  # stale lines the state does not hold
    resumed = Trainer.resume(tmp_path / "m", progress=False)
    resumed.run()
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [r["epoch"] for r in resumed.history] == list(range(1, len(resumed.history) + 1))
