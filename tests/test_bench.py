"""`bptt bench`: the output formats, option errors, and that both timed steps are real training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bptt.benchmark import (
    BenchConfig,
    BpttTrainer,
    PeerTrainer,
    block,
    parse_config,
    token_stream,
)
from bptt.cli import build_parser, main
from bptt.engine import native

TINY = ["bench", "--config", "V=50,m=8,B=4,T=5", "--steps", "2", "--warmup", "1"]
REQUIRED_KEYS = {
    "config", "bptt_tokens_per_s", "peer_tokens_per_s", "ratio", "device", "threads", "steps",
    "torch_version", "machine", "bptt_peak_rss_mb", "peer_peak_rss_mb",
}


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_lines(capsys, keep_threads):
    threads = torch.get_num_threads()
    argv = [*TINY, "--config", "V=30,m=6,B=2,T=3", "--threads", "1", "--seed", "3", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["config"] for r in records] == ["V=50,m=8,B=4,T=5", "V=30,m=6,B=2,T=3"]
    for r in records:
        assert REQUIRED_KEYS <= r.keys()
        assert _positive_finite(r["bptt_tokens_per_s"]) and _positive_finite(r["peer_tokens_per_s"])
        assert r["ratio"] == pytest.approx(r["bptt_tokens_per_s"] / r["peer_tokens_per_s"])
        assert r["tokens_per_step"] == r["T"] * r["B"]
        assert r["bptt_tokens_per_s"] == pytest.approx(r["tokens_per_step"] * 2 / r["bptt_seconds"])
        assert (r["device"], r["threads"], r["steps"], r["torch_version"]) == ("cpu", 1, 2, torch.__version__)
        assert r["machine"]["cpu_count"] >= 1 and r["machine"]["processor"]
        assert _positive_finite(r["bptt_peak_rss_mb"]) and r["peer_peak_rss_mb"] >= r["bptt_peak_rss_mb"]
    assert torch.get_num_threads() == threads  # --threads is undone after the run


def test_table(capsys):
    assert main([*TINY, "--config", "m=4,V=20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine: ") and torch.__version__ in lines[0] and "threads" in lines[0]
    header, rows = lines[1], lines[2:]
    assert header.split()[:3] == ["config", "bptt", "tok/s"] and "bptt/peer" in header
    assert [row.split()[0] for row in rows] == ["V=50,m=8,B=4,T=5", "V=20,m=4,B=32,T=35"]
    assert len({len(line) for line in (header, *rows)}) == 1  # aligned columns
    for row in rows:
        bptt, peer, ratio = row.split()[1:4]
        bptt, peer = float(bptt.replace(",", "")), float(peer.replace(",", ""))
        assert bptt > 0 and peer > 0 and ratio.endswith("x")


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--config", "V=abc"], "--config"),
        (["--config", "V=10,X=3"], "--config"),
        (["--config", "V=10,V=20"], "--config"),
        (["--config", "B=0"], "--config"),
        (["--config", "V10"], "--config"),
        (["--steps", "0"], "--steps"),
        (["--warmup", "-1"], "--warmup"),
        (["--threads", "0"], "--threads"),
        (["--rounds", "0"], "--rounds"),
    ],
)
def test_bad_options(capsys, argv, names):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0]
    assert "Traceback" not in captured.err


def test_parse_config():
    assert parse_config("V=10000,m=200,B=32,T=35") == BenchConfig(10000, 200, 32, 35)
    assert parse_config(" T = 5 , V=7") == BenchConfig(7, 200, 32, 5)  # the rest from the default
    assert str(parse_config("B=2,T=3,m=4,V=5")) == "V=5,m=4,B=2,T=3"
    with pytest.raises(ValueError, match=r"^--config 'V=abc': V must be a positive integer"):
        parse_config("V=abc")
    assert parse_config("out=class,C=10,direct=5000").direct == 5000
    assert str(parse_config("V=5,m=4,B=2,T=3,direct=100")) == "V=5,m=4,B=2,T=3,direct=100"
    with pytest.raises(ValueError, match="direct connections need"):
        parse_config("out=hsm,direct=100")


@pytest.mark.parametrize("out", ["softmax", "class"])
def test_bptt_step_with_direct_connections_trains_them_and_carries_the_context(out):
    config = BenchConfig(V=20, m=8, B=4, T=6, out=out, C=4, direct=200)
    trainer = BpttTrainer(config, seed=1, device=torch.device("cpu"))
    inputs, targets = block(token_stream(config, 1, seed=2, device=torch.device("cpu")), 0, config.T)
    trainer.step(inputs, targets)
    assert bool(trainer.model.params["D"].abs().sum() > 0)
    assert torch.equal(trainer.context, inputs[-2:])


def test_bptt_step_is_real_training():
    """The timed bptt step updates the weights and lowers the loss on a repeated block."""
    config = BenchConfig(V=20, m=16, B=4, T=6)
    trainer = BpttTrainer(config, seed=1, device=torch.device("cpu"))
    inputs, targets = block(token_stream(config, 1, seed=2, device=torch.device("cpu")), 0, config.T)
    model = trainer.model
    before = {name: p.clone() for name, p in model.params.items()}
    loss0 = float(model.loss(inputs, targets))
    # the first step starts from s^0 = 0, so its loss is the model's loss on the block
    assert float(trainer.step(inputs, targets)) == pytest.approx(loss0, rel=1e-5)
    for _ in range(14):
        trainer.step(inputs, targets)
    for name, p in model.params.items():
        assert not torch.equal(p, before[name]), name
    assert float(model.loss(inputs, targets)) < 0.9 * loss0
    assert trainer.h0.shape == (config.B, config.m) and bool(trainer.h0.abs().sum() > 0)  # state carried


def test_peer_step_is_real_training():
    config = BenchConfig(V=20, m=16, B=4, T=6)
    trainer = PeerTrainer(config, seed=1, device=torch.device("cpu"))
    inputs, targets = block(token_stream(config, 1, seed=2, device=torch.device("cpu")), 0, config.T)
    loss0 = float(trainer.step(inputs, targets))
    for _ in range(14):
        trainer.step(inputs, targets)
    with torch.no_grad():
        logits, _ = trainer.model(inputs, torch.zeros(1, config.B, config.m))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, config.V), targets.view(-1), reduction="sum")
    assert float(loss) < 0.9 * loss0
    assert all(p.grad is None for p in trainer.params)  # grads set to None after each update


def test_split_steps():
    from bptt.benchmark import split_steps

    assert split_steps(10, 3) == [4, 3, 3]
    assert split_steps(2, 5) == [1, 1]
    assert sum(split_steps(61, 6)) == 61


def test_rounds_alternate_without_changing_what_is_trained(capsys):
    """--rounds 3 trains both sides on the same blocks as --rounds 1 (same last losses, bit for bit on
    CPU); its overall ratio is a time-weighted mean of the per-round ratios, so it lies between them."""
    records = {}
    for rounds in ("1", "3"):
        assert main([*TINY, "--steps", "5", "--rounds", rounds, "--json"]) == 0
        records[rounds] = json.loads(capsys.readouterr().out)
    one, three = records["1"], records["3"]
    assert (one["rounds"], three["rounds"]) == (1, 3)
    assert one["ratio_min"] == one["ratio"] == one["ratio_max"]
    assert three["ratio_min"] <= three["ratio"] <= three["ratio_max"]
    for side in ("bptt", "peer"):
        assert three[f"{side}_last_loss_per_token"] == one[f"{side}_last_loss_per_token"]
    assert main([*TINY, "--rounds", "3"]) == 0
    assert "(rounds " in capsys.readouterr().out


def test_presets_expand_before_the_configs(capsys, monkeypatch):
    """--preset layers benches the five output layers (then any --config); the gpu preset is issue 5's table."""
    import bptt.benchmark as bench

    assert [str(parse_config(t)).split(",")[0] for t in bench.PRESETS["gpu"]] == ["V=10000"] * 4 + ["V=100000", "V=10000"]
    monkeypatch.setitem(bench.PRESETS, "layers", ["V=40,m=4,B=2,T=3,out=class,C=4", "V=40,m=4,B=2,T=3,out=hsm"])
    assert main(["bench", "--preset", "layers", "--config", "V=30,m=4,B=2,T=3", "--steps", "1", "--warmup", "0",
                 "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"] for r in records] == ["V=40,m=4,B=2,T=3,out=class,C=4", "V=40,m=4,B=2,T=3,out=hsm",
                                              "V=30,m=4,B=2,T=3"]
    assert main(["bench", "--preset", "nope"]) == 2


def test_bench_runs_in_plain_fp32_and_restores_the_tf32_flags(capsys, monkeypatch):
    """Both sides are timed with TF32 off in cuBLAS and cuDNN (issue 5 compares fp32 with fp32); the
    caller's flags come back afterwards, also when the bench fails."""
    import bptt.commands.bench as bench

    seen = []
    monkeypatch.setattr(bench, "_bench_all", lambda *a: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert main(["bench", "--steps", "1"]) == 0
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)

        def fail(*a):
            raise RuntimeError("boom")

        monkeypatch.setattr(bench, "_bench_all", fail)
        with pytest.raises(RuntimeError):
            bench.run(build_parser().parse_args(["bench", "--steps", "1"]))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved



def test_graphed_step_on_the_cpu_is_the_plain_step():
    """The --graph trainer's static-buffer step (run eagerly here; captured on a GPU, tests/test_cuda.py)
    trains exactly like the plain one: warm-up steps leave no trace, the state is carried in place."""
    from bptt.benchmark import BenchConfig, BpttTrainer, GraphedBpttTrainer, block, token_stream

    config = BenchConfig(V=60, m=7, B=3, T=4)
    data = token_stream(config, 6, 0, torch.device("cpu"))
    plain = BpttTrainer(config, 0, torch.device("cpu"))
    graphed = GraphedBpttTrainer(config, 0, torch.device("cpu"), capture=False)
    for i in range(6):
        a, b = plain.step(*block(data, i, config.T)), graphed.step(*block(data, i, config.T))
        assert torch.equal(a, b), i
    for name in plain.model.params:
        assert torch.equal(plain.model.params[name], graphed.model.params[name]), name
    assert torch.equal(plain.h0, graphed.h0)
    with pytest.raises(ValueError, match="captured for"):
        graphed.step(*block(data, 0, config.T)[0:1], data[:3, :2])


def test_graph_option_is_refused_where_it_cannot_run(capsys):
    from bptt.benchmark import BenchConfig, GraphedBpttTrainer
    from bptt.training.cuda_graph import GraphedStep

    assert main([*TINY, "--graph"]) == 2  # on the CPU
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--graph" in err and "cuda" in err
    with pytest.raises(ValueError, match="out=softmax"):
        GraphedBpttTrainer(BenchConfig(V=60, m=7, B=3, T=4, out="class", C=4), 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA tensors"):
        GraphedStep(lambda x: x, [torch.zeros(2)], [], capture=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cells_against_their_torch_peers(cell, capsys, keep_threads):
    """--cell lstm/gru --layers 2: bptt's LSTM/GRU stack against nn.LSTM/nn.GRU(num_layers=2), the record
    naming the cell and the depth, the per-round ratios, their median and the CPU-time ratio."""
    argv = ["bench", "--cell", cell, "--layers", "2", "--config", "V=40,m=6,B=3,T=4", "--steps", "4", "--warmup", "1",
            "--rounds", "2", "--threads", "1", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["config"], r["cell"], r["layers"]) == (f"V=40,m=6,B=3,T=4,{cell}x2", cell, 2)
    assert len(r["round_ratios"]) == r["rounds"] == 2
    assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    assert _positive_finite(r["cpu_ratio"]) and _positive_finite(r["bptt_cpu_seconds"])
    assert r["cpu_ratio"] == pytest.approx(r["peer_cpu_seconds"] / r["bptt_cpu_seconds"])
    # the record says what was timed: the cell's compiled sweeps (engine/native.py) or its eager code
    assert f"{cell}_sweeps" in r["machine"] and "elman_sweeps" not in r["machine"]
    assert main(["bench", "--cell", cell, "--config", "V=40,m=6,B=3,T=4", "--steps", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert f"V=40,m=6,B=3,T=4,{cell}x1" in out and "median" in out
    assert f"the {cell.upper()}'s sweeps " in out.splitlines()[0]


def test_the_lstm_bench_names_the_sweeps_it_timed(capsys, keep_threads, monkeypatch):
    argv = ["bench", "--cell", "lstm", "--config", "V=40,m=6,B=3,T=4", "--steps", "1", "--warmup", "1", "--rounds", "1",
            "--threads", "1", "--json"]
    monkeypatch.setenv("BPTT_NATIVE", "0")
    assert main(argv) == 0
    machine = json.loads(capsys.readouterr().out)["machine"]
    assert machine["lstm_sweeps"] == "eager" and machine["softmax_loss"] == "eager"
    monkeypatch.delenv("BPTT_NATIVE")
    assert main(argv) == 0
    machine = json.loads(capsys.readouterr().out)["machine"]
    for key, name in (("lstm_sweeps", "lstm"), ("softmax_loss", "softmax")):  # the cell's sweeps, the loss pass
        assert machine[key] == ("eager" if native.kernels(name) is None else native.describe(name))
        assert native.kernels(name) is None or machine[key].startswith("compiled (C++")


@pytest.mark.parametrize("cell, rnn", [("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU), ("elman", torch.nn.RNN)])
def test_the_peer_is_the_same_model(cell, rnn):
    """The peer of a cell is torch.nn's module of that cell with the same depth, embedding size m, and as
    many weights as bptt's model but PyTorch's second bias per layer (bptt keeps b = b_ih + b_hh; the GRU's
    b_hn is the n block of b_hh) and, for Elman, the first layer's input matrix after the embedding (bptt's
    seed model gathers U x^t, the two products in one)."""
    config = BenchConfig(V=30, m=5, B=2, T=3, cell=cell, layers=2)
    peer = PeerTrainer(config, seed=0, device=torch.device("cpu"))
    bptt = BpttTrainer(config, seed=0, device=torch.device("cpu"))
    assert isinstance(peer.model.rnn, rnn) and peer.model.rnn.num_layers == 2
    gates = {"lstm": 4, "gru": 3, "elman": 1}[cell]
    second_bias = 2 * (gates - 1) * config.m if cell == "gru" else 2 * gates * config.m
    folded = config.m * config.m if cell == "elman" else 0
    peer_weights = sum(p.numel() for p in peer.model.parameters())
    assert sum(p.numel() for p in bptt.model.params.values()) == peer_weights - second_bias - folded


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_both_sides_train_a_stack(cell, keep_threads):
    """The timed steps of both sides lower the loss of a repeated block (bptt's from its own engine)."""
    from bptt.engine.sweep import sequence_loss

    torch.set_num_threads(1)  # tiny tensors: OpenMP's hand-offs would cost milliseconds each on a busy machine
    config = BenchConfig(V=20, m=12, B=4, T=6, cell=cell, layers=2)
    inputs, targets = block(token_stream(config, 1, seed=2, device=torch.device("cpu")), 0, config.T)
    bptt, peer = BpttTrainer(config, 1, torch.device("cpu")), PeerTrainer(config, 1, torch.device("cpu"))
    model = bptt.model
    loss0 = float(sequence_loss(model.net, model.params, inputs, targets, model.zero_state(config.B)))
    assert float(bptt.step(inputs, targets)) == pytest.approx(loss0, rel=1e-5)  # the first step starts from zero
    peer0 = float(peer.step(inputs, targets))
    for _ in range(20):
        bptt.step(inputs, targets)
        peer.step(inputs, targets)
    assert float(sequence_loss(model.net, model.params, inputs, targets, model.zero_state(config.B))) < 0.9 * loss0
    assert float(peer.step(inputs, targets)) < 0.9 * peer0
    assert isinstance(peer.hidden, tuple) == (cell == "lstm")  # (h, c) for the LSTM, carried


@pytest.mark.parametrize("argv", [["--layers", "0"], ["--cell", "tanh"], ["--layers", "x"]])
def test_bad_cell_options(capsys, argv):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and argv[0] in err
