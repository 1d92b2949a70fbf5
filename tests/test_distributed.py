"""Data-parallel training (training/distributed.py): N ranks on gloo train the one model one process trains.

The ranks of most tests are forked from this process (torch imported once) with torchrun's environment
set (RANK, WORLD_SIZE, MASTER_ADDR, ...), each running the trainer's Python API in float64, so that the
comparison with the one-process run can be tight (1e-10): the only difference is the order of the sums.
The slow tests run the real `torchrun ... -m bptt train` (float32, 1e-5), kill a rank with SIGKILL and
resume the run.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from bptt.storage.checkpoint import load_checkpoint
from bptt.training import distributed
from bptt.training.trainer import STATE_DIR, Trainer, TrainConfig, TrainingDiverged
from conftest import write_corpus

TIMEOUT = 60  # seconds for one group of ranks; only reached if something hangs
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

ELMAN = dict(hidden_size=8, batch=5, bptt=4)  # 5 streams: shares 2 and 3 on 2 ranks
LSTM = dict(cell="lstm", layers=2, hidden_size=8, dropout=0.3, dropout_embedding=0.2, variational=True, batch=4,
            bptt=3, bptt_block=2, output="nce")
SENTENCES = dict(cell="gru", hidden_size=8, batch=4, independent=True, dropout=0.3, ar=1.0, tar=1.0,
                 output="sampled")  # 41 sentences: the last batch has 1, and rank 0's share of it is empty


@pytest.fixture(autouse=True)
def no_torchrun_environment(monkeypatch):
    """This process is the one-process run: no torchrun variables (they would make it a rank)."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "train.txt", 41, 0), write_corpus(tmp_path / "valid.txt", 12, 1)


def config(corpus, model_dir, **kw) -> TrainConfig:
    base = dict(train=corpus[0], valid=corpus[1], model=str(model_dir), dtype="float64", epochs=4, seed=3,
                optimizer="adam", lr=0.01, progress=False)
    return TrainConfig.from_options(**{**base, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job, out: Path) -> None:
    code = 1
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        trainer, result = job(rank)
        torch.save({"flat": trainer.model.flat.data.clone(), "best": trainer.best.data.clone(),
                    "opt": [t.clone() for t in trainer.optimizer.state_tensors()], "step": trainer.global_step,
                    "interrupted": None if result is None else result.interrupted}, out / f"rank{rank}.pt")
        code = 0
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
    finally:
        os._exit(code)


def run_ranks(world: int, job, out: Path) -> list[dict]:
    """job(rank) -> (trainer, result) in `world` forked processes forming one process group; returns each
    rank's final flat parameters, global step and stop signal. Fails (after killing them) on a hang."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = "".join((out / f"rank{r}.err").read_text() for r in range(world) if (out / f"rank{r}.err").exists())
    assert not hung and all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def fresh(cfg: TrainConfig, max_steps: int):
    def job(rank):
        trainer = Trainer(cfg)
        return trainer, trainer.run(max_steps=max_steps)
    return job


def resumed(directory: Path, max_steps: int):
    def job(rank):
        trainer = Trainer.resume(directory, progress=False)
        return trainer, trainer.run(max_steps=max_steps)
    return job


def assert_same_state(a_dir: Path, b_dir: Path, tol: float) -> None:
    """Two checkpoints hold the same training state: every tensor (weights, best weights, optimizer
    buffers, the carried state and history, generators) to `tol`, the JSON state (epoch, step, rate,
    schedule, metrics) exactly but for timings."""
    a, sa = load_checkpoint(a_dir / STATE_DIR)
    b, sb = load_checkpoint(b_dir / STATE_DIR)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=tol, atol=tol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    for key in ("epoch", "step_in_epoch", "global_step", "lr", "done", "events", "epoch_tokens"):
        assert sa[key] == sb[key], key
    assert sa["schedule"].keys() == sb["schedule"].keys()
    for key, value in sa["schedule"].items():  # the valid entropy it remembers: the weights' rounding
        if isinstance(value, float):
            assert sb["schedule"][key] == pytest.approx(value, rel=tol, abs=tol), key
        else:
            assert sb["schedule"][key] == value, key
    assert sb["epoch_nats"] == pytest.approx(sa["epoch_nats"], rel=tol, abs=tol)
    assert [r["accepted"] for r in sa["history"]] == [r["accepted"] for r in sb["history"]]
    for ra, rb in zip(sa["history"], sb["history"]):
        for key in ("valid_entropy_bits", "train_entropy_bits"):
            assert rb[key] == pytest.approx(ra[key], rel=tol, abs=tol), key


def steps_per_epoch(cfg: TrainConfig) -> int:
    return sum(1 for _ in Trainer(cfg)._batches())


SPARSE_SGD = dict(ELMAN, output="class", classes=4, optimizer="sgd", lr=0.5)  # row-sparse (auto: exact)
SPARSE_ADAM = dict(LSTM, sparse_updates="on")  # row-sparse, lazy


@pytest.mark.parametrize("kw", [ELMAN, LSTM, SENTENCES, SPARSE_SGD, SPARSE_ADAM],
                         ids=["elman-uneven", "lstm-dropout-bptt-block", "sentences", "sparse-sgd", "sparse-adam"])
def test_two_ranks_train_the_one_process_model(corpus, tmp_path, kw):
    """2 ranks == 1 process over several steps across an epoch end (validation, schedule, best model):
    the same checkpoint (weights, optimizer, carried state joined along the streams) to 1e-10 in
    float64, and every rank's weights identical bit for bit. Row-sparse updates too: the ranks'
    gathered rows (different rows on each rank) summed over the union of their ids."""
    one = config(corpus, tmp_path / "one", **kw)
    steps = steps_per_epoch(config(corpus, tmp_path / "count", **kw)) + 3
    Trainer(one).run(max_steps=steps)
    ranks = run_ranks(2, fresh(config(corpus, tmp_path / "two", **kw), steps), tmp_path / "out")
    assert [r["step"] for r in ranks] == [steps, steps]
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])
    assert_same_state(tmp_path / "one", tmp_path / "two", 1e-10)
    assert (tmp_path / "two" / "model.safetensors").is_file()  # the best model, written by rank 0


def test_one_process_with_a_backend_runs_its_collectives_and_the_same_run(corpus, tmp_path):
    """torchrun with one process and --backend (NCCL's path on a single GPU): a process group of one is
    started, every step's gradients go through its all-reduce, and the run is the plain one bit for bit."""
    steps = steps_per_epoch(config(corpus, tmp_path / "count", **LSTM)) + 3
    Trainer(config(corpus, tmp_path / "one", **LSTM)).run(max_steps=steps)

    def job(rank):
        reduce, calls = torch.distributed.all_reduce, []

        def counted(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return reduce(tensor, *args, **kwargs)
        torch.distributed.all_reduce = counted
        trainer = Trainer(config(corpus, tmp_path / "group", **LSTM), backend="gloo")
        assert trainer.dist.active and torch.distributed.get_world_size() == 1
        result = trainer.run(max_steps=steps)
        flat = trainer.model.flat.data.numel()
        assert sum(n == flat for n in calls) == steps, calls  # the flat gradient buffer, once a step
        return trainer, result
    (rank,) = run_ranks(1, job, tmp_path / "out")
    assert rank["step"] == steps
    assert_same_state(tmp_path / "one", tmp_path / "group", 0.0)


def test_a_slow_checkpoint_write_is_not_a_lost_rank(corpus, tmp_path):
    """Rank 0 writing a checkpoint for longer than --dist-timeout (a large model, a slow disk): the others wait
    for it on the patient group, not in the next step's all-reduce, and the run goes on."""
    import time as clock

    def job(rank):
        trainer = Trainer(config(corpus, tmp_path / "two", hidden_size=8, batch=5, bptt=4, checkpoint_every=3),
                          dist_timeout=1.0)
        if rank == 0:
            write = trainer.run_dir.write_state

            def slow(*args, **kwargs):
                clock.sleep(2.5)
                return write(*args, **kwargs)
            trainer.run_dir.write_state = slow
        return trainer, trainer.run(max_steps=4)
    assert [r["step"] for r in run_ranks(2, job, tmp_path / "out")] == [4, 4]


def test_a_checkpoint_does_not_depend_on_the_number_of_ranks(corpus, tmp_path):
    """Stopped with 2 ranks and resumed with 1, or stopped with 1 and resumed with 2: the weights of the
    uninterrupted run (the carried state and BPTT history are gathered on save and split on resume)."""
    steps = steps_per_epoch(config(corpus, tmp_path / "count", **LSTM))
    stop, end = steps - 2, steps + 4  # a stop inside the first epoch, an end inside the second
    Trainer(config(corpus, tmp_path / "straight", **LSTM)).run(max_steps=end)

    run_ranks(2, fresh(config(corpus, tmp_path / "two-one", **LSTM), stop), tmp_path / "a")
    Trainer.resume(tmp_path / "two-one", progress=False).run(max_steps=end)
    assert_same_state(tmp_path / "straight", tmp_path / "two-one", 1e-10)

    Trainer(config(corpus, tmp_path / "one-two", **LSTM)).run(max_steps=stop)
    run_ranks(2, resumed(tmp_path / "one-two", end), tmp_path / "b")
    assert_same_state(tmp_path / "straight", tmp_path / "one-two", 1e-10)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(corpus, tmp_path):
    """SIGTERM to rank 1 alone at step 4: every rank stops after the same step with the state saved
    (the flag travels in the step's reduction), and the resumed run ends where an uninterrupted one does."""
    steps = steps_per_epoch(config(corpus, tmp_path / "count", **ELMAN)) + 3
    Trainer(config(corpus, tmp_path / "straight", **ELMAN)).run(max_steps=steps)
    cfg = config(corpus, tmp_path / "two", **ELMAN)

    def job(rank):
        trainer = Trainer(cfg)
        if rank == 1:
            step = trainer.train_step

            def train_step(*args):
                if trainer.global_step == 4:
                    os.kill(os.getpid(), signal.SIGTERM)
                return step(*args)
            trainer.train_step = train_step
        return trainer, trainer.run(max_steps=steps)

    ranks = run_ranks(2, job, tmp_path / "out")
    assert [(r["step"], r["interrupted"]) for r in ranks] == [(5, signal.SIGTERM)] * 2
    _, state = load_checkpoint(tmp_path / "two" / STATE_DIR)
    assert state["global_step"] == 5
    run_ranks(2, resumed(tmp_path / "two", steps), tmp_path / "out2")
    assert_same_state(tmp_path / "straight", tmp_path / "two", 1e-10)


def test_the_ranks_roll_back_together(corpus, tmp_path):
    """A gradient norm over --max-grad-norm is decided on the all-reduced gradient, the same on every rank:
    the ranks roll back together, 5 times in a row, and stop as one process does (TrainingDiverged), with
    the same events and the same state saved."""
    kw = dict(ELMAN, max_grad_norm=1e-6)

    def diverge(cfg):
        trainer = Trainer(cfg)
        with pytest.raises(TrainingDiverged):
            trainer.run(max_steps=20)
        return trainer, None

    diverge(config(corpus, tmp_path / "one", **kw))
    ranks = run_ranks(2, lambda rank: diverge(config(corpus, tmp_path / "two", **kw)), tmp_path / "out")
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])
    _, state = load_checkpoint(tmp_path / "two" / STATE_DIR)
    assert len(state["events"]) == 5
    assert_same_state(tmp_path / "one", tmp_path / "two", 1e-10)


def test_shares_cover_the_batch_in_order():
    for total in range(0, 12):
        for world in range(1, 5):
            shares = [distributed.share(total, r, world) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            sizes = [stop - start for start, stop in shares]
            assert max(sizes) - min(sizes) <= 1


def test_memory_guard_estimates_one_ranks_share(corpus, tmp_path):
    """The guard estimates a rank's activations with its share of --batch and divides the machine's memory
    among the ranks on it."""
    from bptt.data import Vocab, encode
    from bptt.training.resources import ResourceError, guard_training

    cfg = config(corpus, tmp_path / "m", hidden_size=64, batch=4, bptt=35)
    vocab = Vocab.build(cfg.train)
    train, valid = encode(cfg.train, vocab), encode(cfg.valid, vocab)
    model_config = cfg.model_config.with_vocab(len(vocab))
    whole = guard_training(cfg, model_config, vocab, train, valid, available=1 << 40)
    half = guard_training(cfg, model_config, vocab, train, valid, available=1 << 40, streams=2)
    assert half.parts["activations"] * 2 == whole.parts["activations"]
    with pytest.raises(ResourceError):
        guard_training(cfg, model_config, vocab, train, valid, available=whole.total + 1, processes=2)


# -- the real torchrun ----------------------------------------------------------------------------------

CLI = ["--hidden", "8", "--batch", "5", "--bptt", "4", "--epochs", "3", "--seed", "1", "--quiet"]


def torchrun(args: list[str], tmp_path: Path, *, timeout: float = TIMEOUT, nproc: int = 2,
             logs: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    extra = ["--log-dir", str(logs), "--redirects", "3"] if logs is not None else []
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), *extra, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def one_process(args: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    done = subprocess.run([sys.executable, "-m", "bptt", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("nproc, backend, tol", [(2, [], 1e-5), (1, ["--backend", "gloo"], 0.0)],
                         ids=["two-processes", "one-process-group-of-one"])
def test_torchrun_trains_the_one_process_model(corpus, tmp_path, nproc, backend, tol):
    """`torchrun --standalone --nproc-per-node 2 -m bptt train ...` == `python -m bptt train ...` (float32);
    with one process and --backend (a group of one, NCCL's path on a single GPU) bit for bit."""
    data = ["--train", corpus[0], "--valid", corpus[1], *CLI, "--max-steps", "12"]
    one_process(["train", *data, "--model", "one"], tmp_path)
    done = torchrun(["-m", "bptt", "train", *data, "--model", "two", *backend], tmp_path, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stopped at step 12") == 1  # rank 0 alone prints
    assert_same_state(tmp_path / "one", tmp_path / "two", tol)


@pytest.mark.slow
def test_torchrun_with_model_averaging(corpus, tmp_path):
    """`torchrun ... -m bptt train --average-every 1` with SGD, no clipping and equal shares == one process."""
    data = ["--train", corpus[0], "--valid", corpus[1], *CLI, "--batch", "4", "--optimizer", "sgd", "--lr", "0.5",
            "--clip", "0", "--max-steps", "12"]
    one_process(["train", *data, "--model", "one"], tmp_path)
    done = torchrun(["-m", "bptt", "train", *data, "--model", "two", "--average-every", "1"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(tmp_path / "one", tmp_path / "two", 1e-5)
    _, state = load_checkpoint(tmp_path / "two" / STATE_DIR)
    assert state["training"]["average_every"] == 1


# torchrun runs this instead of `-m bptt` to kill rank KILL_RANK with SIGKILL just before its step KILL_STEP
KILLED_WORKER = """
import os, signal, sys, time
from bptt.training.trainer import Trainer
if os.environ.get("RANK") == os.environ["KILL_RANK"]:
    step = Trainer.train_step
    def train_step(self, *args):
        if self.global_step == int(os.environ["KILL_STEP"]):
            with open("killed_at", "w") as f:  # the wall-clock time of the kill, for the test's bound
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args)
    Trainer.train_step = train_step
from bptt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_and_resume_finishes_it(corpus, tmp_path):
    """SIGKILL to rank 1 mid-run: torchrun exits non-zero within the --dist-timeout of the kill (plus the
    teardown; the bound is from the kill, so that a slow start on a busy machine does not count), the
    surviving rank says so in one line (no traceback), and `--resume` with torchrun finishes the run where an
    uninterrupted one ends."""
    data = ["--train", corpus[0], "--valid", corpus[1], *CLI]
    one_process(["train", *data, "--model", "straight"], tmp_path)
    (tmp_path / "worker.py").write_text(KILLED_WORKER)
    os.environ.update(KILL_RANK="1", KILL_STEP="7")
    try:
        done = torchrun(["worker.py", "train", *data, "--model", "two", "--checkpoint-every", "3",
                         "--dist-timeout", "30"], tmp_path, timeout=180, logs=tmp_path / "logs")
        ended = time.time()
    finally:
        del os.environ["KILL_RANK"], os.environ["KILL_STEP"]
    after_kill = ended - float((tmp_path / "killed_at").read_text())
    assert done.returncode != 0 and 0 < after_kill < 30 + 15, (done.returncode, after_kill)
    survivor = Path(glob.glob(str(tmp_path / "logs" / "**" / "0" / "stderr.log"), recursive=True)[0]).read_text()
    lines = [line for line in survivor.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 of 2:"), survivor
    assert "--resume two" in lines[0]
    _, state = load_checkpoint(tmp_path / "two" / STATE_DIR)
    assert state["global_step"] == 6  # the last checkpoint before the kill
    done = torchrun(["-m", "bptt", "train", "--resume", "two"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(tmp_path / "straight", tmp_path / "two", 1e-5)


# -- model averaging (--average-every K) ----------------------------------------------------------------

AVERAGE_SGD = dict(hidden_size=8, batch=4, bptt=4, optimizer="sgd", lr=0.5, clip=0.0)  # shares of 2 and 2 streams


def test_model_averaging_every_step_is_the_gradient_all_reduce_for_sgd(corpus, tmp_path):
    """K = 1, plain SGD, no clipping, equal shares: the mean of the ranks' own updates θ − lr g_r/n_r is the
    update with the mean gradient, so 2 ranks averaging their models every step train the one-process
    model (float64, 1e-10) across an epoch end — each rank divides by its own tokens and the models meet."""
    steps = steps_per_epoch(config(corpus, tmp_path / "count", **AVERAGE_SGD)) + 3
    Trainer(config(corpus, tmp_path / "one", **AVERAGE_SGD)).run(max_steps=steps)
    ranks = run_ranks(2, fresh(config(corpus, tmp_path / "two", average_every=1, **AVERAGE_SGD), steps),
                      tmp_path / "out")
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])
    assert_same_state(tmp_path / "one", tmp_path / "two", 1e-10)

    # switched on at a resume (`bptt train --resume DIR --average-every 1`) after 3 all-reduced steps
    run_ranks(2, fresh(config(corpus, tmp_path / "switched", **AVERAGE_SGD), 3), tmp_path / "out2")

    def switch(rank):
        trainer = Trainer.resume(tmp_path / "switched", progress=False)
        trainer.adjust(average_every=1)
        assert trainer.stepper.reduce is trainer._reduction and not trainer._reduction.sums_gradients
        return trainer, trainer.run(max_steps=steps)
    run_ranks(2, switch, tmp_path / "out3")
    assert_same_state(tmp_path / "one", tmp_path / "switched", 1e-10)
    _, state = load_checkpoint(tmp_path / "switched" / STATE_DIR)
    assert state["training"]["average_every"] == 1  # kept for a later resume


def test_model_averaging_meets_before_validation_and_checkpoints(corpus, tmp_path):
    """K larger than the run (dropout, nce, Adam): the ranks step alone the whole time, and still every
    validation and the checkpoint see one model — the same weights on both ranks, a checkpoint that one
    process resumes — while the run is not the gradient all-reduce's (the ranks did step alone)."""
    kw = dict(LSTM, average_every=1000)
    steps = steps_per_epoch(config(corpus, tmp_path / "count", **LSTM)) + 3
    ranks = run_ranks(2, fresh(config(corpus, tmp_path / "avg", **kw), steps), tmp_path / "a")
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])
    assert torch.equal(ranks[0]["best"], ranks[1]["best"])  # the model validated at the epoch's end
    assert len(ranks[0]["opt"]) > 0
    for a, b in zip(ranks[0]["opt"], ranks[1]["opt"]):  # Adam's moments averaged too
        assert torch.equal(a, b)
    run_ranks(2, fresh(config(corpus, tmp_path / "sum", **LSTM), steps), tmp_path / "b")
    avg, state = load_checkpoint(tmp_path / "avg" / STATE_DIR)
    summed, _ = load_checkpoint(tmp_path / "sum" / STATE_DIR)
    assert state["global_step"] == steps and len(state["history"]) == 1
    params = [k for k in avg if k.startswith("param.")]
    assert max(float((avg[k] - summed[k]).abs().max()) for k in params) > 1e-6
    resumed_run = Trainer.resume(tmp_path / "avg", progress=False)
    torch.testing.assert_close(resumed_run.model.flat.data, ranks[0]["flat"], rtol=0, atol=0)
    resumed_run.run(max_steps=steps + 2)  # one process goes on from the averaged state
    assert resumed_run.global_step == steps + 2


def test_model_averaging_rolls_every_rank_back_for_one_ranks_fault(corpus, tmp_path):
    """Each rank judges its own gradient: a fault on rank 1 alone (its norm made infinite at step 3) rolls
    both ranks back together, to the same state, with one rollback event."""
    cfg = config(corpus, tmp_path / "two", average_every=2, **ELMAN)

    def job(rank):
        trainer = Trainer(cfg)
        if rank == 1:
            compute, done = trainer.stepper.compute, []

            def faulty(*args):
                loss, norm, tokens = compute(*args)
                if trainer.global_step == 3 and not done:
                    done.append(True)
                    return loss, float("inf"), tokens
                return loss, norm, tokens
            trainer.stepper.compute = faulty
        return trainer, trainer.run(max_steps=6)

    ranks = run_ranks(2, job, tmp_path / "out")
    assert [r["step"] for r in ranks] == [6, 6]
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])
    _, state = load_checkpoint(tmp_path / "two" / STATE_DIR)
    assert [e["event"] for e in state["events"]] == ["rollback"]
    assert "other rank" in state["events"][0]["reason"] and state["events"][0]["global_step"] == 4
