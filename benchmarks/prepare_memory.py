"""Peak memory of `bptt prepare` and of a short `bptt train --data` against the size of the corpus, and the
speed of prepare (issue 18: neither should grow with the corpus).

For each --tokens N: a corpus of N training tokens (benchmarks/make_corpus.py when it is there, a Zipf
stream of the same shape written inline otherwise; or --train/--valid/--test files), then, each in its
own process, measured from outside (os.wait4: the child's ru_maxrss and wall time):

    prepare      bptt prepare --train --valid --test --out DATA --max-vocab V
    epoch-read   one epoch of StreamBatches (B 32, T 35) and of shuffled SentenceBatches (32) from DATA, no model
    train-data   bptt train --data DATA --model M (a small model, --max-steps S: a few hundred blocks)
    train-text   the same run from the texts (--train/--valid), for comparison (--no-text to skip)

    .venv/bin/python benchmarks/prepare_memory.py --tokens 1000000 10000000
    .venv/bin/python benchmarks/prepare_memory.py --train big.txt.gz --valid v.txt --test t.txt

The baseline, a process that only imports bptt (and with it torch), is printed first: the runs' peak RSS
includes it. Peak RSS counts the file-backed pages of a memory map that the process has touched (they stay in the page
cache, reclaimable, and are shared): a few hundred blocks touch B streams' worth of pages, not the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BPTT = [sys.executable, "-m", "bptt"]


def measured(argv: list[str], env: dict | None = None) -> dict:
    """Run argv; its peak RSS (MiB, from the kernel's rusage of that child only) and wall seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): {stderr.strip()[-500:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds, "stdout": stdout.strip()}


# one epoch of batches from DATA, both kinds, without a model: what the batchers keep resident
EPOCH = """
import sys
from bptt.data import SentenceBatches, StreamBatches
from bptt.prepared import load_prepared
train = load_prepared(sys.argv[1]).split("train")
for batches in (StreamBatches(train.ids, 32, 35), SentenceBatches(train, 32, shuffle=True)):
    for block in batches:
        pass
"""


def write_zipf(path: Path, tokens: int, vocab: int, seed: int) -> None:
    """A fallback corpus: Zipf(1) words over `vocab` types, sentences of 5..50 words, streamed in chunks."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    cdf = np.cumsum(p / p.sum())
    words = np.array([f"w{i}" for i in range(vocab)])
    with open(path, "w") as f:
        left = tokens
        while left > 0:
            n = min(left, 1 << 20)
            ids = np.minimum(np.searchsorted(cdf, rng.random(n)), vocab - 1)
            cuts = np.cumsum(rng.integers(5, 51, n // 5 + 2))
            cuts = cuts[cuts < n]
            f.write("\n".join(" ".join(s) for s in np.split(words[ids], cuts) if len(s)) + "\n")
            left -= n


def make_corpus(directory: Path, tokens: int, vocab: int, seed: int) -> dict[str, Path]:
    maker = ROOT / "benchmarks" / "make_corpus.py"
    if maker.exists():
        subprocess.run([sys.executable, str(maker), "--tokens", str(tokens), "--vocab", str(vocab), "--seed", str(seed),
                        "--out-dir", str(directory), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        return {split: directory / f"{split}.txt" for split in ("train", "valid", "test")}
    held_out = max(1000, tokens // 100)
    files = {"train": tokens, "valid": held_out, "test": held_out}
    for i, (split, n) in enumerate(files.items()):
        write_zipf(directory / f"{split}.txt", n, vocab, seed + i)
    return {split: directory / f"{split}.txt" for split in files}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1_000_000],
                    help="corpus sizes to generate (training words)")
    ap.add_argument("--train", help="use these files instead (with --valid, optional --test)")
    ap.add_argument("--valid")
    ap.add_argument("--test")
    ap.add_argument("--vocab", type=int, default=10_000, help="word types of the generated corpus (default 10,000)")
    ap.add_argument("--max-vocab", type=int, default=10_000, help="prepare's --max-vocab (default 10,000)")
    ap.add_argument("--steps", type=int, default=200, help="training blocks (default 200)")
    ap.add_argument("--train-options", default="--hidden 32 --batch 32 --bptt 35 --output class --classes 100",
                    help="the model of the training runs")
    ap.add_argument("--no-text", action="store_true", help="skip the comparison run from the texts")
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object per corpus")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: steadier timings on a shared machine
    cases = [("files", None)] if args.train else [(f"{n:,} tokens", n) for n in args.tokens]
    base = measured([sys.executable, "-c", "import bptt.prepared, bptt.training.trainer"], env)
    print(f"baseline (python + the imports of bptt and torch): peak RSS {base['peak_rss_mib']:.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        for label, tokens in cases:
            work = root / (f"n{tokens}" if tokens else "files")
            work.mkdir(exist_ok=True)
            if tokens:
                t0 = time.perf_counter()
                texts = make_corpus(work, tokens, args.vocab, args.seed)
                made = time.perf_counter() - t0
            else:
                texts = {"train": Path(args.train), "valid": Path(args.valid)} | (
                    {"test": Path(args.test)} if args.test else {})
                made = 0.0
            data = work / "data"
            argv = [*BPTT, "prepare", "--train", str(texts["train"]), "--valid", str(texts["valid"]),
                    *(["--test", str(texts["test"])] if "test" in texts else []), "--out", str(data), "--force",
                    "--max-vocab", str(args.max_vocab), "--quiet"]
            prep = measured(argv, env)
            meta = json.loads((data / "meta.json").read_text())
            n_tok = sum(s["tokens"] for s in meta["splits"].values())
            n_bytes = sum(s["source"]["bytes"] for s in meta["splits"].values())
            result = {
                "corpus": label, "train_tokens": meta["splits"]["train"]["tokens"], "tokens": n_tok,
                "text_mb": n_bytes / 1e6, "generated_s": made,
                "prepare": {"peak_rss_mib": prep["peak_rss_mib"], "seconds": prep["seconds"],
                            "tokens_per_s": n_tok / prep["seconds"], "mb_per_s": n_bytes / 1e6 / prep["seconds"]},
            }
            epoch = measured([sys.executable, "-c", EPOCH, str(data)], env)
            result["epoch_read"] = {"peak_rss_mib": epoch["peak_rss_mib"], "seconds": epoch["seconds"]}
            train = [*BPTT, "train", "--max-steps", str(args.steps), "--force", "--quiet", *args.train_options.split()]
            run = measured([*train, "--data", str(data), "--model", str(work / "m-data")], env)
            result["train_data"] = {"peak_rss_mib": run["peak_rss_mib"], "seconds": run["seconds"]}
            if not args.no_text:
                run = measured([*train, "--train", str(texts["train"]), "--valid", str(texts["valid"]),
                                "--max-vocab", str(args.max_vocab), "--model", str(work / "m-text")], env)
                result["train_text"] = {"peak_rss_mib": run["peak_rss_mib"], "seconds": run["seconds"]}
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                p = result["prepare"]
                line = (f"{label}: {result['text_mb']:.1f} MB of text, {n_tok:,} tokens; prepare peak RSS "
                        f"{p['peak_rss_mib']:.0f} MiB, {p['seconds']:.1f} s ({p['tokens_per_s'] / 1e6:.2f} M tokens/s, "
                        f"{p['mb_per_s']:.1f} MB/s); one epoch of stream and sentence batches read from DATA: peak RSS "
                        f"{result['epoch_read']['peak_rss_mib']:.0f} MiB; train --data ({args.steps} steps) peak RSS "
                        f"{result['train_data']['peak_rss_mib']:.0f} MiB, {result['train_data']['seconds']:.1f} s")
                if "train_text" in result:
                    line += (f"; from the texts: peak RSS {result['train_text']['peak_rss_mib']:.0f} MiB, "
                             f"{result['train_text']['seconds']:.1f} s")
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
