"""Model directories and a stopped training run written by bptt before the redesign (commit 80d6429,
config.json format 1, and format 0 copies) still load, and give the numbers that code computed on them
(tests/fixtures/expected.json, written by tests/fixtures/make_fixtures.py with that code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bptt.data import encode
from bptt.evaluation import dynamic_stream_nats, evaluate_corpus
from bptt.sampling import sample
from bptt.storage.saved_model import load_model
from bptt.scoring import score_file

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
MODELS = sorted(name for name in EXPECTED if name != "run-stopped")
X = torch.tensor([[0, 3, 5], [4, 2, 7], [9, 1, 0], [2, 2, 3]])
Y = torch.tensor([[3, 5, 2], [2, 7, 1], [1, 0, 4], [6, 3, 8]])


# A float64 model must give that code's numbers to 1e-9; a float32 one to 1e-6 relative (a few float32
# rounding steps): the arithmetic may be reordered for speed (issue 18: the hierarchical softmax's sparse
# products sum each path in another order), which moves float32 results in their last bits, never more.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-6}


def _close(got: float, want: float, scale: float = 1.0, tol: float = 1e-9) -> None:
    assert abs(got - want) <= tol * max(abs(want), scale), (got, want)


@pytest.mark.parametrize("name", MODELS)
def test_format_1_models_give_the_same_numbers(name):
    model, vocab, config = load_model(FIXTURES / "format1" / name)
    want = EXPECTED[name]
    tol = TOLERANCE[model.flat.data.dtype]
    if "eval_nats" in want:
        test = encode(FIXTURES / "test.txt", vocab)
        _close(evaluate_corpus(model, test, vocab).nats, want["eval_nats"], tol=tol)
        got = score_file(model, vocab, FIXTURES / "test.txt").ln_probs.tolist()
        assert len(got) == len(want["score_ln"])
        for g, w in zip(got, want["score_ln"]):
            _close(g, w, tol=tol)
        assert sample(model, vocab, words=20, temperature=0.9, top_k=8, prompt=["the"], seed=3) == want["sample"]
    if "dynamic_nats" in want:
        _close(dynamic_stream_nats(model, test.ids, 0, lr=0.05, block=5), want["dynamic_nats"], tol=tol)
        model, vocab, config = load_model(FIXTURES / "format1" / name)  # dynamic evaluation changed it
    if hasattr(model.output, "freeze_noise"):
        model.output.freeze_noise(torch.tensor([1, 4, 4, 9]))
    loss, grads, h = model.loss_and_grads(X, Y)
    _close(float(loss), want["loss"], tol=tol)
    assert sorted(grads) == sorted(want["grad_sums"])
    for k, g in grads.items():
        _close(float(g.double().sum()), want["grad_sums"][k], scale=want["grad_abs_sums"][k], tol=tol)
        _close(float(g.double().abs().sum()), want["grad_abs_sums"][k], tol=tol)
    _close(float(h.double().sum()), want["h_sum"], scale=1.0, tol=tol)


@pytest.mark.parametrize("name", ["softmax", "class"])
def test_format_0_models_load_as_their_format_1_twins(name):
    old, _, config = load_model(FIXTURES / "format0" / name)
    assert "format_version" not in json.loads((FIXTURES / "format0" / name / "config.json").read_text())
    new, _, _ = load_model(FIXTURES / "format1" / name)
    assert old.params.keys() == new.params.keys()
    for k, p in old.params.items():
        assert torch.equal(p, new.params[k])


def test_a_run_stopped_by_the_old_code_resumes_to_the_same_end(tmp_path):
    from bptt.training.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run-stopped", run)
    shutil.copy(FIXTURES / "train.txt", tmp_path / "train.txt")
    path = run / "checkpoint" / "config.json"
    state = json.loads(path.read_text())
    state["training"]["train"] = state["training"]["valid"] = str(tmp_path / "train.txt")
    path.write_text(json.dumps(state))
    trainer = Trainer.resume(run, progress=False)
    result = trainer.run()
    want = EXPECTED["run-stopped"]
    assert abs(result.best_valid.nats - want["best_valid_nats"]) <= 1e-6 * want["best_valid_nats"]
    for k, p in trainer.model.params.items():
        assert abs(float(p.double().sum()) - want["param_sums"][k]) <= 1e-5, k
