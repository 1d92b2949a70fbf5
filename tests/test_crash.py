"""Crash safety of `bptt train`, with real processes: SIGKILL at random moments and in the middle of
checkpoint writes, SIGINT and SIGTERM. After every kill DIR and DIR/checkpoint must load, and the run
resumed with `bptt train --resume DIR` until it finishes must end bit for bit where an uninterrupted
run ends.

To keep this fast, the killed runs are forked from a "zygote" process that has imported bptt once:
each child is `bptt.cli.main([...])` in a fresh process, the same code the `bptt` command runs,
without paying for the torch import ~25 times. The uninterrupted reference run and the runs stopped
by SIGINT and SIGTERM are the real `bptt` command.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bptt.storage.checkpoint import load_checkpoint
from bptt.storage.saved_model import load_model
from conftest import write_corpus

STATE = "checkpoint"
TIMEOUT = 120  # seconds for any one process; only reached if something hangs
MIN_KILLS = 24
# a two-layer LSTM with dropout: its training state holds all an Elman run's does, and more (two state
# tensors per layer, the dropout generator, whose state a resumed run must continue from)
FIELDS = ["--cell", "lstm", "--layers", "2", "--dropout", "0.3", "--hidden", "8", "--batch", "2", "--bptt", "5",
          "--epochs", "3", "--seed", "1", "--quiet"]

# The zygote: reads one JSON job per line, forks a child that runs bptt.cli.main(job["argv"]) (its
# stdout and stderr into job["log"]), waits for it and answers {"status": exit status, -9 if killed}.
# job["delay"]: SIGKILL the child after that many seconds if it still runs (the zygote kills it: it has
# not reaped it yet, so the pid cannot have been reused). job["kill"] = {"path", "nth", "when"}: the
# child SIGKILLs itself at the nth os.replace onto that path, with the temp file written, just before
# ("before") or just after ("after") the rename.
ZYGOTE = r"""
import json, os, signal, sys, time
import bptt.cli
bptt.cli.build_parser()  # imports every command module once, here
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            kill = job.get("kill")
            if kill:
                real, seen = os.replace, []

                def replace(src, dst, *args, **kwargs):
                    if os.path.abspath(dst) != kill["path"]:
                        return real(src, dst, *args, **kwargs)
                    seen.append(dst)
                    if len(seen) == kill["nth"] and kill["when"] == "before":
                        os.kill(os.getpid(), signal.SIGKILL)
                    real(src, dst, *args, **kwargs)
                    if len(seen) == kill["nth"]:
                        os.kill(os.getpid(), signal.SIGKILL)

                os.replace = replace
            code = bptt.cli.main(job["argv"])
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = None if job["delay"] is None else time.monotonic() + job["delay"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def bptt_command() -> list[str]:
    script = Path(sys.executable).with_name("bptt")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bptt.cli"]


class Zygote:
    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=cwd)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()

    def run(self, argv: list[str], log: Path, kill: dict | None = None, delay: float | None = None) -> int:
        """The exit status of `bptt argv` in a forked child (-9: SIGKILLed)."""
        job = {"argv": argv, "log": str(log), "kill": kill, "delay": delay}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        try:
            return json.loads(self.lines.get(timeout=TIMEOUT))["status"]
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no answer from the zygote in {TIMEOUT} s") from None

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


class Setup:
    """The corpus, the uninterrupted reference run (the real command) and a zygote, started at once."""

    def __init__(self, root: Path):
        self.root = root
        self.train = write_corpus(root / "train.txt", 60, 0)
        self.valid = write_corpus(root / "valid.txt", 15, 1)
        self.reference_dir = root / "reference"
        self._reference = subprocess.Popen(
            [*bptt_command(), *self.fresh_argv(self.reference_dir)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.zygote = Zygote(root)
        self._done = False

    def fresh_argv(self, directory: Path) -> list[str]:
        return ["train", "--train", self.train, "--valid", self.valid, "--model", str(directory),
                *FIELDS, "--checkpoint-every", "1"]

    def reference(self) -> Path:
        if not self._done:
            out, err = self._reference.communicate(timeout=TIMEOUT)
            assert self._reference.returncode == 0, err
            self._done = True
        return self.reference_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = Setup(tmp_path_factory.mktemp("crash"))
    yield s
    s.zygote.close()
    if not s._done:
        s._reference.kill()


def torn(directory: Path) -> bool:
    """Whether config.json's weights_sha256 is not the weights' (a save killed between its renames)."""
    config, weights = directory / "config.json", directory / "model.safetensors"
    if not (config.is_file() and weights.is_file()):
        return weights.is_file()
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    return json.loads(config.read_text())["weights_sha256"] != sha


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def assert_same_as_reference(directory: Path, reference: Path) -> None:
    """Best model and whole training state equal bit for bit; metrics.jsonl one line per epoch."""
    for sub in ("", STATE):
        got, _ = load_checkpoint(directory / sub)
        want, _ = load_checkpoint(reference / sub)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{directory / sub}: {key}"
    _, state = load_checkpoint(directory / STATE)
    _, ref_state = load_checkpoint(reference / STATE)
    timeless = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in h]
    assert state["done"] and state["global_step"] == ref_state["global_step"]
    assert state["lr"] == ref_state["lr"]
    assert timeless(state["history"]) == timeless(ref_state["history"])
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [r["epoch"] for r in ref_state["history"]]  # no duplicated epoch
    assert not [p.name for p in directory.rglob("*.tmp")]  # the last saves removed the killed ones' leftovers


def test_sigkill_at_random_moments_and_during_writes(setup):
    """>= 24 SIGKILLs: random delays, and at chosen renames of every file a save writes."""
    rng = np.random.default_rng(20240611)
    root = setup.root / "killed"
    root.mkdir()
    # kills at a rename: the checkpoint's two files (the nth of this process), the best model's two files
    # and metrics.jsonl (the next one: at an epoch end); before and after the rename
    targets = [(f"{STATE}/model.safetensors", 0), (f"{STATE}/config.json", 0), ("model.safetensors", 1),
               ("config.json", 1), ("metrics.jsonl", 1)]
    plan = [("write", t, when) for t in targets for when in ("before", "after")]
    plan += [("timed", None, None)] * (MIN_KILLS - len(plan))
    plan = [plan[i] for i in rng.permutation(len(plan))]
    # the epoch-end kills first (the best model's, then metrics.jsonl's), while epoch ends lie ahead
    order = {"model.safetensors": 0, "config.json": 0, "metrics.jsonl": 1}
    plan.sort(key=lambda p: order.get(p[1][0], 2) if p[1] else 2)
    started = time.perf_counter()
    kills = {"timed": 0, "write": 0}
    stats = {"torn pairs recovered": 0, "restarts from scratch": 0, "runs finished": 0}
    chain = 0
    while plan:
        chain += 1
        directory = root / f"run{chain}"
        last_step, segment = -1, 0
        while True:  # one run, killed again and again, until it finishes
            segment += 1
            state_dir = directory / STATE
            if (state_dir / "model.safetensors").is_file() or (state_dir / "config.json").is_file():
                argv = ["train", "--resume", str(directory), "--checkpoint-every", "1", "--quiet"]
            else:  # killed before its first checkpoint: nothing to resume, start again
                if directory.exists():
                    shutil.rmtree(directory)
                    stats["restarts from scratch"] += 1
                argv = setup.fresh_argv(directory)
            kind, target, when = plan[0] if plan else ("none", None, None)
            kill = None
            if kind == "write":
                name, epoch_end = target
                kill = {"path": str((directory / name).absolute()), "when": when,
                        "nth": 1 if epoch_end else int(rng.integers(1, 6))}
            log = root / f"run{chain}.{segment}.log"
            delay = float(rng.uniform(0.0, 0.5)) if kind == "timed" else None
            status = setup.zygote.run(argv, log, kill, delay)
            if status == 0:
                break
            assert status == -signal.SIGKILL, f"exit status {status}:\n{log.read_text()}"
            kills[kind] += 1
            plan.pop(0)
            # after every kill: what exists loads; the training state never goes back
            if (state_dir / "model.safetensors").is_file() or (state_dir / "config.json").is_file():
                stats["torn pairs recovered"] += torn(state_dir)
                tensors, state = load_checkpoint(state_dir)
                assert finite(tensors) and state["global_step"] >= last_step
                last_step = state["global_step"]
            else:
                assert last_step == -1, "a checkpoint was lost"
            if (directory / "model.safetensors").is_file() or (directory / "config.json").is_file():
                stats["torn pairs recovered"] += torn(directory)
                model, _, _ = load_model(directory)
                assert finite(model.params)
        stats["runs finished"] += 1
        assert_same_as_reference(directory, setup.reference())
    total = kills["timed"] + kills["write"]
    print(f"\ncrash test: {total} SIGKILLs survived ({kills['timed']} at random moments, {kills['write']} "
          f"at a rename); {stats}; {time.perf_counter() - started:.1f} s")
    assert total >= MIN_KILLS and stats["torn pairs recovered"] >= 1


def test_sigint_and_sigterm_save_the_state_and_exit_130_and_143(setup):
    """The real command, interrupted after its first checkpoint; then resumed to the end."""
    rng = random.Random(7)
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        directory = setup.root / f"signal-{sig.name}"
        runs[sig] = directory, subprocess.Popen([*bptt_command(), *setup.fresh_argv(directory)],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for sig, (directory, proc) in runs.items():
        deadline = time.monotonic() + TIMEOUT
        while not (directory / STATE / "config.json").exists():  # training has started
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(sig)
    for sig, (directory, proc) in runs.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 128 + sig, err
        assert err.strip().splitlines() == [f"interrupted: training state saved in {directory / STATE}; "
                                            f"continue with bptt train --resume {directory}"]
        _, state = load_checkpoint(directory / STATE)
        assert not state["done"] and state["global_step"] > 0
        log = setup.root / f"resume-{sig.name}.log"
        assert setup.zygote.run(["train", "--resume", str(directory), "--quiet"], log) == 0, log.read_text()
        assert "finished" in log.read_text()
        assert_same_as_reference(directory, setup.reference())
