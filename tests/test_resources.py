"""The resource guard: the memory estimate of a training run against what a real run holds, and the
refusal of a run that does not fit, before anything of its size is allocated."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import bptt.training.resources as resources
from bptt.cli import main
from bptt.model import ElmanLM
from bptt.training.resources import (
    GIB,
    MemoryEstimate,
    ResourceError,
    available_memory,
    check_memory,
    estimate_for_config,
    estimate_training_memory,
    parameter_count,
)
from bptt.model import ModelConfig
from bptt.training.trainer import TrainConfig, Trainer

OUTPUTS = ["softmax", "class", "hsm", "nce", "sampled"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resources")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    (root / "t.txt").write_text("\n".join(lines) + "\n")
    return str(root / "t.txt")


def _config(corpus, directory, **kw):
    settings = dict(train=corpus, valid=corpus, model=str(directory), hidden_size=16, batch=8, bptt=6, epochs=1,
                    progress=False)
    settings.update(kw)
    return TrainConfig.from_options(**settings)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_the_model(output, bias):
    counts = [50, 0] + [random.Random(i).randint(1, 100) for i in range(38)]
    model = ElmanLM(40, 7, output=output, classes=6, word_counts=counts, bias=bias)
    config = ModelConfig(vocab_size=40, hidden_size=7, output=output, classes=6, bias=bias)
    assert parameter_count(config, counts) == sum(p.numel() for p in model.params.values())
    skewed = [10_000, 0] + [1] * 38  # one word holds most of the mass: frequency binning drops empty bins
    model = ElmanLM(40, 7, output=output, classes=6, word_counts=skewed, bias=bias)
    assert parameter_count(config, skewed) == sum(p.numel() for p in model.params.values())
    if output == "class":
        assert parameter_count(config, skewed) < parameter_count(config, counts)  # fewer classes


@pytest.mark.parametrize("output", ["softmax", "class"])
def test_parameter_count_with_direct_connections(output):
    counts = [50, 0] + [random.Random(i).randint(1, 100) for i in range(38)]
    model = ElmanLM(40, 7, output=output, classes=6, word_counts=counts, direct=500, direct_order=2)
    config = ModelConfig(vocab_size=40, hidden_size=7, output=output, classes=6, direct=500, direct_order=2)
    assert parameter_count(config, counts) == sum(p.numel() for p in model.params.values())
    assert parameter_count(config, counts) == parameter_count(ModelConfig(**{**config.to_json(), "direct": 0}),
                                                              counts) + 500


def test_direct_connections_too_large_are_refused(corpus, tmp_path, capsys):
    argv = ["train", "--train", corpus, "--valid", corpus, "--model", str(tmp_path / "m"), "--hidden", "8",
            "--direct", "4096"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --direct 4096 (million weights): needs about")


@pytest.mark.parametrize("optimizer, buffers, decay", [("adam", 2, {}), ("adagrad", 1, {}), ("rmsprop", 1, {}),
                                                       ("sgd", 0, {}), ("adam", 2, {"l2": 0.01, "weight_decay": 0.1})],
                         ids=["adam", "adagrad", "rmsprop", "sgd", "adamw-l2"])
@pytest.mark.parametrize("output", ["softmax", "class"])
def test_estimate_matches_the_tensors_of_a_real_trainer(corpus, tmp_path, optimizer, buffers, decay, output):
    """After one step: the parameters, gradient buffers (AdamW with --l2: and the step's second one, where
    the L2 term is added), optimizer state and best copy a Trainer holds are exactly the estimate's — their
    flat buffers, the alignment padding included (engine/flat.py) — and the views inside them are no
    larger; the (N,V) output workspace is within a factor 2."""
    config = _config(corpus, tmp_path / "m", optimizer=optimizer, output=output, classes=20, **decay)
    trainer = Trainer(config)
    x, y, mask = next(trainer._batches())
    trainer.train_step(x, y, mask)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    est = estimate_for_config(config, trainer.model.config, trainer.train_corpus.tokens, trainer.valid_corpus.tokens,
                              word_counts=trainer.vocab.counts)
    params = nbytes([trainer.model.flat.data])
    assert est.parts["parameters"] == params >= nbytes(trainer.model.params.values())
    scratch = trainer.optimizer._scratch
    assert (scratch is not None) == bool(decay)
    assert est.parts["gradients"] == nbytes([trainer.engine.grads.data] + ([scratch] if decay else []))
    assert est.parts["best model"] == nbytes([trainer.best.data])
    state = [t for t in trainer.optimizer.state_tensors() if t.is_floating_point() and t.dim() > 0]
    assert est.parts["optimizer"] == nbytes(state) == buffers * params
    workspace = getattr(trainer.model.output, "_workspace", None)
    if output == "softmax" and workspace is not None:
        assert workspace.shape == (config.k1 * config.batch, len(trainer.vocab))
        assert 1 <= est.parts["output workspace"] / nbytes([workspace]) <= 2


_MEASURE = textwrap.dedent("""
    import json, random, sys
    import torch
    torch.set_num_threads(1)
    from bptt.training.resources import estimate_for_config
    from bptt.model import ModelConfig
    from bptt.training.trainer import TrainConfig, Trainer
    path, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rng = random.Random(0)
    words = [f"w{i}" for i in range(8000)]
    for name, n in ((path, 1500), (path + ".valid", 40)):
        with open(name, "w") as f:
            for _ in range(n):
                f.write(" ".join(rng.choice(words) for _ in range(20)) + "\\n")
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    options = {"hidden_size": 200, "batch": 32, "bptt": 20, **options}
    config = TrainConfig.from_options(train=path, valid=path + ".valid", model=out, epochs=1, progress=False, **options)
    import bptt.training.trainer
    seen = {}
    def guard(config, model_config, vocab, train, valid):
        seen["estimate"] = estimate_for_config(config, model_config, train.tokens, valid.tokens,
                                               word_counts=vocab.counts).total
        seen["before"] = status("VmRSS")
    bptt.training.trainer.guard_training = guard
    trainer = Trainer(config)
    trainer.run(max_steps=4)
    trainer.save_state()
    print(json.dumps({"estimate": seen["estimate"], "grown": status("VmHWM") - seen["before"]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("options", [{}, {"cell": "lstm", "layers": 2, "dropout": 0.5, "bptt": 35},
                                     {"cell": "gru", "layers": 2, "hidden_size": 300, "optimizer": "sgd"}],
                         ids=["elman", "lstm", "gru"])
def test_estimate_against_the_peak_memory_of_a_real_run(tmp_path, options):
    """A fresh process: the growth of its peak resident memory over a few training steps, an
    evaluation and a checkpoint is within a factor 2 of the estimate (measured: 0.9 to 1.3)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "t.txt"), str(tmp_path / "m"),
                           json.dumps(options)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = result["estimate"] / result["grown"]
    print(options, result, ratio)
    assert 0.5 <= ratio <= 2, result


def test_an_absurd_run_is_refused_at_once(corpus, tmp_path):
    config = _config(corpus, tmp_path / "m", hidden_size=1_000_000)
    started = time.perf_counter()
    with pytest.raises(ResourceError) as info:
        Trainer(config)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert message.startswith("--hidden 1000000 (vocabulary ") and "\n" not in message
    assert "needs about" in message and "available" in message and "parameters" in message
    assert not (tmp_path / "m" / "model.safetensors").exists()


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_refusal_allocates_nothing_of_the_runs_size(corpus, tmp_path, capsys):
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident memory
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak resident memory")
    before = _peak_rss()
    argv = ["train", "--train", corpus, "--valid", corpus, "--model", str(tmp_path / "m"), "--hidden", "300000"]
    assert main(argv) == 2
    assert _peak_rss() - before < 64 * 2**20  # the run would need hundreds of GiB
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--hidden 300000" in err and "GiB" in err


def test_batch_and_bptt_are_named_when_the_blocks_do_not_fit(corpus, tmp_path):
    config = _config(corpus, tmp_path / "m", hidden_size=8, batch=4, bptt=10**9)
    with pytest.raises(ResourceError, match=r"^--batch 4 --bptt 1000000000 \(--output softmax"):
        Trainer(config)


def test_check_memory_against_a_given_budget():
    config = ModelConfig(vocab_size=10_000, hidden_size=100_000)
    est = estimate_training_memory(config, batch=32, k1=35, optimizer="adam")
    assert est.parts["parameters"] == 4 * parameter_count(config)
    assert est.parts["optimizer"] == 2 * est.parts["parameters"]
    check_memory(est, "cpu", "--hidden 100000", available=est.total)  # fits exactly
    with pytest.raises(ResourceError) as info:
        check_memory(est, "cpu", "--hidden 100000", available=int(21.3 * GIB))
    message = str(info.value)
    assert message.startswith("--hidden 100000: needs about ")
    assert message.endswith("this machine has 21.3 GiB available")
    assert "rollback copy" in message and "optimizer" in message


def test_sgd_needs_less_than_adam_and_hsm_less_than_softmax():
    config = ModelConfig(vocab_size=50_000, hidden_size=256)
    sgd = estimate_training_memory(config, optimizer="sgd", batch=64, k1=35).total
    adam = estimate_training_memory(config, optimizer="adam", batch=64, k1=35).total
    hsm = estimate_training_memory(ModelConfig(vocab_size=50_000, hidden_size=256, output="hsm"), optimizer="adam",
                                   batch=64, k1=35).total
    two_layers = estimate_training_memory(ModelConfig(vocab_size=50_000, hidden_size=256, layers=2), optimizer="adam",
                                          batch=64, k1=35)
    assert sgd < adam and hsm < adam and adam < two_layers.total
    one_layer = estimate_training_memory(config, optimizer="adam", batch=64, k1=35)
    assert two_layers.parts["activations"] == 2 * one_layer.parts["activations"]


def test_absurd_sizes_do_not_overflow():
    config = ModelConfig(vocab_size=10**6, hidden_size=2**62)
    est = estimate_training_memory(config, batch=2**62, k1=2**62, optimizer="adam")
    assert est.total > 2**125 and "GiB" in est.describe()


def _meminfo_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, read here on its own; None where there is no such file or line."""
    try:
        with open("/proc/meminfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            _, value, unit = line.split()
            assert unit == "kB", line
            return int(value) * 1024
    return None


def _has_cgroup_v2_limit() -> bool:
    """Whether this process's cgroup (v2) sets memory.max, which may leave less than MemAvailable."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.split(":", 2)[2] for line in f.read().splitlines() if line.startswith("0::")), None)
        if rel is None:
            return False
        with open(("/sys/fs/cgroup/" + rel.strip("/")).rstrip("/") + "/memory.max") as f:
            return f.read().strip() != "max"
    except OSError:
        return False


def test_available_memory_is_plausible():
    before = _meminfo_available_bytes()
    available = available_memory("cpu")
    after = _meminfo_available_bytes()
    if not (sys.platform.startswith("linux") and before is not None and after is not None):
        assert available is None or 0 < available < 2**50  # elsewhere: os.sysconf, or unknown
        return
    # Linux with /proc/meminfo: the guard must know, and agree with MemAvailable (read just before and
    # just after), give or take what other processes did meanwhile; a cgroup limit may only lower it
    assert available is not None
    slack = 256 * 2**20
    assert 0 < available <= max(before, after) + slack, (available, before, after)
    if not _has_cgroup_v2_limit():
        assert available >= min(before, after) - slack, (available, before, after)


def test_cuda_uses_the_devices_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GIB, 2 * GIB))
    assert available_memory("cuda") == GIB
    est = MemoryEstimate({"parameters": 2 * GIB}, 10, 10)
    with pytest.raises(ResourceError, match="cuda has 1.0 GiB available"):
        check_memory(est, "cuda", "--hidden 10")


def test_unknown_available_memory_lets_the_run_go(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device: None)
    check_memory(MemoryEstimate({"parameters": 2**80}, 10, 10), "cpu", "--hidden 10")


def test_full_softmax_workspace_is_one_chunk_not_n_times_v():
    """The full softmax trains over chunks of OUTPUT_CHUNK_SCORES scores (outputs/full.py): past one
    chunk, the estimate's output workspace no longer grows with B·T."""
    from bptt.training.resources import OUTPUT_CHUNK_SCORES

    def workspace(batch, vocab=100_000):
        config = ModelConfig(vocab_size=vocab, hidden_size=512)
        return estimate_training_memory(config, batch=batch, k1=32).parts["output workspace"]

    rows = OUTPUT_CHUNK_SCORES // 100_000
    assert workspace(64) == workspace(1024) == 2 * rows * 100_000 * 4
    assert workspace(1, vocab=10_000) == 2 * 32 * 10_000 * 4  # a block smaller than a chunk: all of it
