"""Training tokens/s and peak memory of each output layer as the vocabulary grows (issue 18, item 5).

    python benchmarks/make_corpus.py --tokens 10000000 --out-dir /tmp/corpora/zipf10m     # V 800k process
    python benchmarks/vocab_scale.py --corpus /tmp/corpora/zipf10m --vocab 10000 100000 0

For each --vocab V (0: every word of the training text), `bptt prepare --max-vocab V` once; then for each
output layer a fresh process builds bptt's trainer on that DATA (`--hidden`, `--batch`, `--bptt`, Adam;
class: √V classes), trains --warmup blocks, then times --steps blocks (validation excluded) and reports
tokens/s and its peak RSS (the kernel's ru_maxrss of that process: model, optimizer, rollback snapshot,
one checkpoint written after the timed steps), once per --sparse-updates mode (off: every row of every
matrix zeroed, clipped and updated each step; on: the rows the step used, training/sparse_rows.py;
Adam's lazy form), with the memory guard's estimate beside the peak. The full softmax is skipped above --max-softmax words (at
V = 800k one step of it is over a teraflop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from bptt.training.trainer import TrainConfig, Trainer
data, model, output, hidden, batch, bptt, warmup, steps, threads, sparse = sys.argv[1:11]
torch.set_num_threads(int(threads))
options = dict(output=output, hidden_size=int(hidden))
if output == "class":
    from bptt.prepared import load_prepared
    options["classes"] = max(2, round(len(load_prepared(data).vocab) ** 0.5))
config = TrainConfig.from_options(train=None, valid=None, data=data, model=model, batch=int(batch), bptt=int(bptt),
                                  sparse_updates=sparse, progress=False, **options)
trainer = Trainer(config)
from bptt.training.resources import estimate_for_config
estimate = estimate_for_config(config, trainer.model.config, word_counts=trainer.vocab.counts).total
blocks = trainer._batches()
for _ in range(int(warmup)):
    trainer.train_step(*next(blocks))
tokens = trainer.epoch_tokens
start = time.perf_counter()
for _ in range(int(steps)):
    trainer.train_step(*next(blocks))
seconds = time.perf_counter() - start
trainer.save_state()
print(json.dumps({"vocab": len(trainer.vocab), "tokens_per_s": (trainer.epoch_tokens - tokens) / seconds,
                  "step_ms": 1000 * seconds / int(steps), "sparse": sparse, "rows": list(trainer.sparse_rows),
                  "estimate_mib": estimate / 2**20,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="a directory with train.txt, valid.txt (make_corpus.py --out-dir)")
    p.add_argument("--vocab", type=int, nargs="+", default=[10_000, 100_000, 0], help="--max-vocab values (0: all words)")
    p.add_argument("--outputs", nargs="+", default=["softmax", "class", "hsm", "nce", "sampled"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-softmax", type=int, default=200_000, help="skip the full softmax above this vocabulary")
    p.add_argument("--sparse-updates", nargs="+", default=["off", "on"], choices=["off", "on", "auto"],
                   help="the modes to run each cell in (default: off and on)")
    p.add_argument("--work", help="keep the prepared corpora here (default: a temporary directory); each run's "
                   "directory is removed once it has reported")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vocab_scale."))
    print(f"machine: {os.cpu_count()} cores, {args.threads} threads; hidden {args.hidden}, B {args.batch}, "
          f"T {args.bptt}, Adam; {args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    for V in args.vocab:
        data = work / f"data-{V or 'all'}"
        if not (data / "meta.json").exists():
            cmd = [sys.executable, "-m", "bptt", "prepare", "--train", str(args.corpus / "train.txt"),
                   "--valid", str(args.corpus / "valid.txt"), "--out", str(data), "--quiet"]
            if V:
                cmd += ["--max-vocab", str(V)]
            subprocess.run(cmd, check=True)
        for output, sparse in ((o, s) for o in args.outputs for s in args.sparse_updates):
            if output == "softmax" and (V == 0 or V > args.max_softmax):
                continue
            model = work / f"run-{V or 'all'}-{output}-{sparse}"
            run = subprocess.run([sys.executable, "-c", CHILD, str(data), str(model), output, str(args.hidden),
                                  str(args.batch), str(args.bptt), str(args.warmup), str(args.steps), str(args.threads),
                                  sparse], capture_output=True, text=True)
            shutil.rmtree(model, ignore_errors=True)  # its checkpoint: several GB at V 800k, not kept
            if run.returncode != 0:
                print(f"V {V or 'all'} {output}: failed: {run.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            r["output"] = output
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| V | output | sparse updates | tokens/s | ms per step | peak RSS MiB | guard's estimate MiB |\n"
          "|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        mode = f"{r['sparse']} ({', '.join(r['rows']) or 'none'})" if r["sparse"] != "off" else "off"
        print(f"| {r['vocab']:,} | {r['output']} | {mode} | {r['tokens_per_s']:,.0f} | {r['step_ms']:,.0f} | "
              f"{r['peak_rss_mib']:,.0f} | {r['estimate_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
