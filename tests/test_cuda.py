"""The CUDA path against the CPU path (issue 5, item 1): same model, same data, same results to float
tolerance. Runs only where torch sees a CUDA device (the GPU machines); skipped on CPU-only CI.

A seed gives the same weights on every device (they are drawn on the CPU, and so are the noise words
of NCE and sampled softmax), so each check builds the model twice, runs the same step on both devices
and compares losses and every gradient.
"""

from __future__ import annotations

import json

import pytest
import torch

from bptt import ElmanLM
from bptt.training.optim import clip_grad_norm_, make_optimizer
from bptt.engine.tbptt import TruncatedBPTT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

COUNTS = [50, 30, 20, 12, 9, 7, 5, 4, 3, 3, 2, 2, 1, 1, 1, 1]
V = len(COUNTS)


def _both(**kw):
    models = [ElmanLM(V, 6, dtype=torch.float64, seed=4, bias=True, word_counts=COUNTS, device=d, **kw)
              for d in ("cpu", "cuda")]
    if "D" in models[0].params:  # D starts at zero: give it values, the same on both devices
        D = torch.randn(models[0].params["D"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        for m in models:
            m.params["D"].copy_(D)
    return models


def _tokens(seed: int, T: int = 7, B: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(output="class", classes=4), dict(output="hsm"), dict(direct=200, direct_order=3),
     dict(output="class", classes=4, direct=200, direct_order=2), dict(hidden_activation="sigmoid"),
     dict(output_activation="sigmoid", loss="quadratic"), dict(output="nce"), dict(output="sampled"),
     dict(tied=True)],
    ids=["softmax", "class", "hsm", "direct", "class-direct", "sigmoid", "quadratic", "nce", "sampled", "tied"],
)
@pytest.mark.parametrize("truncation", [None, 2])
def test_loss_and_gradients_match_the_cpu(kw, truncation):
    cpu, cuda = _both(**kw)
    x, y = _tokens(1)
    mask = torch.ones(7, 3)
    mask[5:, 1] = 0  # padding in one stream
    out = [m.loss_and_grads(x.to(m.device), y.to(m.device), mask=mask.to(m.device), truncation=truncation)
           for m in (cpu, cuda)]
    _close(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    for name in out[0][1]:
        _close(out[0][1][name], out[1][1][name])


def test_activation_penalties_match_the_cpu():
    """AR and TAR (regularizers.py) on CUDA: the masked one-sequence gradients and two stream blocks."""
    cpu, cuda = _both()
    x, y = _tokens(3)
    mask = torch.ones(7, 3)
    mask[4:, 2] = 0
    out = [m.loss_and_grads(x.to(m.device), y.to(m.device), mask=mask.to(m.device), ar=1.5, tar=0.7)
           for m in (cpu, cuda)]
    for name in out[0][1]:
        _close(out[0][1][name], out[1][1][name])
    engines = [TruncatedBPTT(m, k1=4, ar=2.0, tar=1.0) for m in (cpu, cuda)]
    for lo in (0, 4):
        grads = [e.step(x[lo:lo + 4].to(m.device), y[lo:lo + 4].to(m.device))[1]
                 for e, m in zip(engines, (cpu, cuda))]
        for name in grads[0]:
            _close(grads[0][name], grads[1][name])


def test_log_probs_are_normalized_and_match_the_cpu():
    for kw in (dict(), dict(output="class", classes=4), dict(output="hsm")):
        cpu, cuda = _both(**kw)
        x, _ = _tokens(2)
        lp = [m.log_probs(x.to(m.device))[0] for m in (cpu, cuda)]
        _close(lp[0], lp[1])
        _close(lp[1].exp().sum(-1), torch.ones_like(lp[1][..., 0]))


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad", "rmsprop"])
def test_truncated_bptt_training_steps_match_the_cpu(name):
    """Four TBPTT(k1=3, k2=5) steps with clipping and each update rule: the same weights on both devices."""
    models = _both(direct=100)
    engines = [TruncatedBPTT(m, k1=3, k2=5) for m in models]
    optimizers = [make_optimizer(name, m.params, decoupled_weight_decay=0.01) for m in models]
    for step in range(4):
        x, y = _tokens(10 + step, T=3)
        for model, engine, opt in zip(models, engines, optimizers):
            _, grads = engine.step(x.to(model.device), y.to(model.device))
            clip_grad_norm_(grads, 0.5)
            opt.step(grads, 0.05)
    for key in models[0].params:
        _close(models[0].params[key], models[1].params[key], tol=1e-9)


def test_the_full_softmax_chunks_match_on_cuda():
    cpu, cuda = _both()
    cuda.output.chunk_scores = 2 * V  # 2 positions per chunk on the device, one chunk on the CPU
    x, y = _tokens(3)
    a, b = cpu.loss_and_grads(x, y), cuda.loss_and_grads(x.cuda(), y.cuda())
    _close(a[0], b[0])
    for name in a[1]:
        _close(a[1][name], b[1][name])


def test_train_command_on_cuda_matches_the_cpu(tmp_path):
    """`bptt train --device cuda` and `--device cpu`, float32, one epoch: the same valid perplexity to
    float32 tolerance; the CUDA model loads and evaluates on the CPU."""
    from bptt.cli import main
    from conftest import write_corpus

    train, valid = write_corpus(tmp_path / "t.txt", 120, 0), write_corpus(tmp_path / "v.txt", 30, 1)
    result = {}
    for device in ("cpu", "cuda"):
        argv = ["train", "--train", train, "--valid", valid, "--model", str(tmp_path / device), "--hidden", "16",
                "--batch", "4", "--bptt", "5", "--epochs", "2", "--device", device, "--quiet"]
        assert main(argv) == 0
        metrics = [json.loads(line) for line in (tmp_path / device / "metrics.jsonl").read_text().splitlines()]
        result[device] = metrics[-1]["valid_perplexity"]
    assert result["cuda"] == pytest.approx(result["cpu"], rel=1e-3)
    assert main(["eval", "--model", str(tmp_path / "cuda"), "--test", valid]) == 0


def test_bench_runs_on_cuda(capsys):
    from bptt.cli import main

    assert main(["bench", "--device", "cuda", "--config", "V=500,m=32,B=8,T=5", "--steps", "3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["device"] == "cuda" and record["bptt_tokens_per_s"] > 0 and record["peer_tokens_per_s"] > 0


def test_cuda_graph_replay_trains_like_the_eager_step():
    """bench --graph: the captured step, replayed, gives the eager step's losses, weights and carried
    state (the same kernels; tolerance for atomics in the scatter-adds)."""
    from bptt.benchmark import BenchConfig, BpttTrainer, GraphedBpttTrainer, block, token_stream

    device = torch.device("cuda")
    config = BenchConfig(V=300, m=24, B=8, T=6)
    data = token_stream(config, 8, 0, device)
    eager = BpttTrainer(config, 0, device)
    graphed = GraphedBpttTrainer(config, 0, device)
    for i in range(8):
        a = eager.step(*block(data, i, config.T))
        b = graphed.step(*block(data, i, config.T))
        _close(a, b, 1e-4)
    assert graphed._graphed.graph is not None  # it was captured, not run eagerly
    for name in eager.model.params:
        _close(eager.model.params[name], graphed.model.params[name], 1e-5)
    _close(eager.h0, graphed.h0, 1e-5)


def test_bench_graph_option_runs_on_cuda(capsys):
    from bptt.cli import main

    assert main(["bench", "--device", "cuda", "--graph", "--config", "V=500,m=32,B=8,T=5", "--steps", "3",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["graph"] is True and record["bptt_tokens_per_s"] > 0


@pytest.mark.parametrize("kw", [dict(), dict(output="class", classes=4)], ids=["softmax", "class"])
def test_dynamic_evaluation_matches_the_cpu(kw):
    """`bptt eval --dynamic`: the same score and the same updated weights on both devices."""
    import numpy as np

    from bptt.evaluation import dynamic_stream_nats

    ids = np.random.default_rng(6).integers(0, V, 40).astype(np.int32)
    models = _both(**kw)
    nats = [dynamic_stream_nats(m, ids, eos_id=0, lr=0.05, block=6) for m in models]
    assert nats[1] == pytest.approx(nats[0], rel=1e-10)
    assert nats[0] != pytest.approx(dynamic_stream_nats(_both(**kw)[0], ids, eos_id=0, lr=0.0, block=6), rel=1e-6)
    for key in models[0].params:
        _close(models[0].params[key], models[1].params[key])


@pytest.mark.parametrize("optimizer, options", [
    ("adam", {}), ("sgd", {}), ("adagrad", {}), ("rmsprop", {}),
    ("sgd", dict(cell="lstm", layers=2, dropout=0.3, dropout_embedding=0.2)),
    ("adam", dict(cell="gru", layers=2, dropout=0.3, variational=True)),
], ids=["adam", "sgd", "adagrad", "rmsprop", "lstm-dropout", "gru-variational"])
def test_train_graph_replays_like_the_eager_static_step(tmp_path, optimizer, options):
    """`bptt train --device cuda --graph`: two epochs (an epoch boundary resets the carried state in
    place; the epoch's short last block runs eagerly) replayed as a CUDA graph give the weights, the
    optimizer state (its step count included) and the metrics of the same run without --graph, to the
    tolerance of atomics; a rollback inside the replayed run restores the captured tensors in place.
    With dropout the masks are drawn eagerly into the tensors the graph reads: the same masks."""
    from bptt.training.config import TrainConfig
    from bptt.training.trainer import Trainer
    from conftest import write_corpus

    train, valid = write_corpus(tmp_path / "t.txt", 120, 0), write_corpus(tmp_path / "v.txt", 30, 1)
    trainers = {}
    for graph in (False, True):
        config = TrainConfig.from_options(train=train, valid=valid, model=str(tmp_path / f"g{graph}"), hidden_size=16,
                                          batch=4, bptt=5, epochs=2, optimizer=optimizer, device="cuda",
                                          graph=graph, progress=False, seed=3, sparse_updates="off", **options)
        trainer = Trainer(config)
        real, calls = trainer.train_step, []

        def train_step(x, y, mask, real=real, trainer=trainer, calls=calls):
            if trainer.global_step == 6 and not calls:  # a weight turns NaN before step 7: it is rolled back
                calls.append(1)
                trainer.model.params["W" if "W" in trainer.model.params else "layer0.W"][0, 0] = float("nan")
            return real(x, y, mask)

        trainer.train_step = train_step
        result = trainer.run(checkpoint_every=3)
        assert [e["global_step"] for e in result.events] == [7]
        trainers[graph] = trainer
    eager, graphed = trainers[False], trainers[True]
    assert graphed.static_step._graphed.graph is not None  # captured and replayed
    assert graphed.optimizer.t == graphed.global_step == eager.global_step
    for name in eager.model.params:
        _close(eager.model.params[name], graphed.model.params[name], 1e-5)
    for key, value in eager.optimizer.state_dict().items():
        if key != "t":
            _close(value, graphed.optimizer.state_dict()[key], 1e-5)
    assert [r["valid_perplexity"] for r in eager.history] == pytest.approx(
        [r["valid_perplexity"] for r in graphed.history], rel=1e-5)


@pytest.mark.parametrize("cell, options", [
    ("lstm", dict(layers=2, dropout=0.3, tied=True)),
    ("gru", dict(layers=2, dropout=0.3, variational=True, embedding_size=5)),
    ("lstm", dict(embedding_size=0)),
], ids=["lstm-dropout-tied", "gru-variational", "lstm-no-embedding"])
@pytest.mark.parametrize("truncation", [None, 2])
def test_the_new_cells_match_the_cpu(cell, options, truncation):
    """The LSTM and the GRU (issue 17) on CUDA: the same masks (drawn on the CPU, moved), the same loss
    and gradients; the embedding's product takes the per-position path there (no torch.unique)."""
    from bptt.engine.sweep import loss_and_grads
    from bptt.model import ModelConfig, build_model

    config = ModelConfig(vocab_size=V, hidden_size=6, cell=cell, dtype="float64", init_range=0.5, **options)
    models = [build_model(config, seed=4, device=d) for d in ("cpu", "cuda")]
    x, y = _tokens(2)
    masks = models[0].net.draw_masks(7, 3, torch.Generator().manual_seed(1), dtype=torch.float64, device="cpu")
    out = []
    for m in models:
        moved = None if masks is None else {k: v.to(m.device) for k, v in masks.items()}
        out.append(loss_and_grads(m.net, m.params, x.to(m.device), y.to(m.device), m.zero_state(3),
                                  truncation=truncation, masks=moved))
    _close(out[0][0], out[1][0])
    for name in out[0][1]:
        _close(out[0][1][name], out[1][1][name])
