"""The memory guard's estimate against the measured peak of a real training run (issue 17: within
0.8–1.3× for LSTM runs).

Each configuration runs in a fresh process: the corpora are read and encoded, then the process's
resident memory is read (VmRSS), the trainer is built and trains a few steps, validates on the whole
valid set and writes a checkpoint; the growth of the peak resident memory (VmHWM − that VmRSS) is the
measured peak, and the estimate is the guard's (training/resources.py) for the same run.

    .venv/bin/python benchmarks/memory.py --train ptb.train.txt --valid ptb.valid.txt \\
        --run "--cell lstm --layers 2 --hidden 200 --batch 20 --bptt 20 --optimizer sgd" \\
        --run "--cell lstm --layers 2 --hidden 650 --batch 20 --bptt 35 --dropout 0.5 --optimizer sgd"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys
import torch
torch.set_num_threads(2)
from bptt.commands.train import add_arguments, config_from_args
import argparse
import bptt.training.trainer as trainer_module
from bptt.training.resources import estimate_for_config
train, valid, out, steps, options = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
parser = argparse.ArgumentParser()
add_arguments(parser)
args = parser.parse_args(["--train", train, "--valid", valid, "--model", out, "--quiet", *options])
config = config_from_args(args)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

seen = {}
guard = trainer_module.guard_training
def measured_guard(config, model_config, vocab, train_corpus, valid_corpus):
    seen["estimate"] = guard(config, model_config, vocab, train_corpus, valid_corpus)
    seen["before"] = status("VmRSS")
    return seen["estimate"]
trainer_module.guard_training = measured_guard
trainer = trainer_module.Trainer(config)
trainer.run(max_steps=steps)
from bptt.evaluation import evaluate_corpus
evaluate_corpus(trainer.model, trainer.valid_corpus, trainer.vocab)
trainer.save_state()
est = seen["estimate"]
print(json.dumps({"estimate": est.total, "parts": est.parts, "grown": status("VmHWM") - seen["before"]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--run", action="append", required=True, help="bptt train options of one configuration")
    parser.add_argument("--steps", type=int, default=5, help="training steps per run (default 5)")
    args = parser.parse_args()
    print("| configuration | estimate MiB | measured peak growth MiB | estimate / measured |")
    print("|---|---:|---:|---:|")
    for options in args.run:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-c", CHILD, args.train, args.valid, f"{tmp}/m", str(args.steps),
                                   *shlex.split(options)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| `{options}` | failed: {proc.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| `{options}` | {r['estimate'] / 2**20:,.0f} | {r['grown'] / 2**20:,.0f} | "
              f"{r['estimate'] / r['grown']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
