"""Training throughput of the factorized output layers (hsm, class) on Penn Treebank, side by side with
faster-rnnlm's hierarchical softmax in the same run (issue 18, item 7).

    python benchmarks/factorized.py --faster-rnnlm /path/to/faster-rnnlm/rnnlm
    python benchmarks/factorized.py --hidden 100 256 --threads 2 --steps 60 --rounds 3

faster-rnnlm (github.com/yandex/faster-rnnlm; build it from its source for the measurement only, it is not
part of bptt) is run as its README runs it: hierarchical softmax, sigmoid hidden layer, `-bptt 32
-bptt-skip 8`, `-threads N`, no direct connections, on ptb.train.txt for --seconds seconds; its figure is the
median over the epochs it finished of the last "Kwords/sec" it printed in each (on stderr: its own average
over the epoch, validation excluded).

bptt is timed through its trainer (bptt.training.Trainer: the same step, checks and update as `bptt train`),
over --steps blocks of its PTB stream after 5 warm-up blocks, validation excluded like faster-rnnlm's
figure: tokens trained / seconds, for each output layer and hidden size, `--batch 160 --bptt 35`
(class: 100 classes by frequency binning; `class:sqrt` bins by square roots, `class:sqrt:60` into 60;
--activation: tanh, bptt's default, or sigmoid, faster-rnnlm's; --optimizer: adam, bptt's default, or sgd,
faster-rnnlm's rule, which also makes bptt update only the rows a step used: --sparse-updates auto). The
sides alternate in --rounds rounds so that a busy phase of a shared machine hits both; the table gives the
median round.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"
SPEED = re.compile(r"([0-9.]+) Kwords/sec")


def faster_rnnlm_words_per_s(binary: str, data: Path, hidden: int, threads: int, seconds: float) -> float:
    """Run faster-rnnlm for `seconds` on the training text and return the last words/s it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [binary, "-rnnlm", os.path.join(tmp, "model"), "-train", str(data / "ptb.train.txt"),
               "-valid", str(data / "ptb.valid.txt"), "-hidden", str(hidden), "-hidden-type", "sigmoid",
               "-bptt", "32", "-bptt-skip", "8", "-threads", str(threads), "-direct", "0"]
        try:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=seconds).stdout
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    epochs = out.replace("\r", "\n").split("entropy (bits) valid")
    finished = [SPEED.findall(e) for e in epochs[:-1]] or [SPEED.findall(epochs[-1])]
    speeds = [float(found[-1]) * 1000 for found in finished if found]
    if not speeds:
        raise SystemExit(f"faster-rnnlm printed no speed; its command: {' '.join(cmd)}")
    return statistics.median(speeds)


def bptt_trainer(data: Path, output: str, hidden: int, model_dir: str, activation: str = "tanh",
                 optimizer: str = "adam"):
    from bptt.training.trainer import TrainConfig, Trainer

    output, *spec = output.split(":")  # "class:sqrt:60": the class layer with sqrt binning into 60 classes
    options = dict(output=output, hidden_size=hidden, hidden_activation=activation)
    if output == "class":
        options["class_binning"] = spec[0] if spec else "frequency"
        options["classes"] = int(spec[1]) if len(spec) > 1 else 100
    config = TrainConfig.from_options(train=str(data / "ptb.train.txt"), valid=str(data / "ptb.valid.txt"),
                                      model=model_dir, batch=160, bptt=35, optimizer=optimizer, progress=False,
                                      **options)
    return Trainer(config)


def bptt_blocks(trainer):
    """The trainer's blocks without end: at the end of the epoch's stream (166 blocks of 160 × 35 on PTB,
    fewer than rounds × (steps + warm-up) may ask for) it starts again from the first block."""
    while True:
        yield from trainer._batches()
        trainer.step_in_epoch = 0


def bptt_tokens_per_s(trainer, steps: int, warmup: int = 5) -> float:
    batches = bptt_blocks(trainer)
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    tokens = trainer.epoch_tokens
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(batches))
    return (trainer.epoch_tokens - tokens) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faster-rnnlm", help="the faster-rnnlm binary (left out: bptt alone)")
    p.add_argument("--data", type=Path, default=PTB, help="the directory of ptb.{train,valid}.txt")
    p.add_argument("--hidden", type=int, nargs="+", default=[100, 256])
    p.add_argument("--outputs", nargs="+", default=["hsm", "class"],
                   help="hsm, class, or class:BINNING[:CLASSES] (e.g. class:sqrt, class:sqrt:60)")
    p.add_argument("--threads", type=int, default=2, help="threads of both sides")
    p.add_argument("--activation", default="tanh", help="bptt's hidden activation (faster-rnnlm: sigmoid)")
    p.add_argument("--optimizer", default="adam", help="bptt's update rule (faster-rnnlm: plain SGD, i.e. sgd)")
    p.add_argument("--steps", type=int, default=60, help="timed bptt blocks per round (160 × 35 tokens each)")
    p.add_argument("--seconds", type=float, default=25.0, help="faster-rnnlm's run per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} rounds, median shown; bptt: {args.activation}, {args.optimizer}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.hidden:
            trainers = {out: bptt_trainer(args.data, out, hidden, os.path.join(tmp, f"{out}{hidden}"),
                                     args.activation, args.optimizer)
                        for out in args.outputs}
            results: dict[str, list[float]] = {name: [] for name in ["faster-rnnlm", *args.outputs]}
            for _ in range(args.rounds):
                if args.faster_rnnlm:
                    results["faster-rnnlm"].append(
                        faster_rnnlm_words_per_s(args.faster_rnnlm, args.data, hidden, args.threads, args.seconds))
                for out, trainer in trainers.items():
                    results[out].append(bptt_tokens_per_s(trainer, args.steps))
            line = {name: statistics.median(v) for name, v in results.items() if v}
            rows.append((hidden, line))
            print(f"hidden {hidden}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in line.items()), flush=True)
    names = ["faster-rnnlm", *args.outputs] if args.faster_rnnlm else list(args.outputs)
    print("\n| hidden | " + " | ".join(f"{n} tokens/s" for n in names)
          + ("".join(f" | bptt {o} / faster-rnnlm" for o in args.outputs) if args.faster_rnnlm else "") + " |")
    print("|---:|" + "---:|" * (len(names) + (len(args.outputs) if args.faster_rnnlm else 0)))
    for hidden, line in rows:
        cells = [f"{line[n]:,.0f}" for n in names]
        if args.faster_rnnlm:
            cells += [f"{line[o] / line['faster-rnnlm']:.2f}×" for o in args.outputs]
        print(f"| {hidden} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
