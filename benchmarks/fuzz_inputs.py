"""Fuzz campaign: bad input never crashes bptt, and model files are data.

    python benchmarks/fuzz_inputs.py [--seed 0] [--minutes 4] [--big-line-mb 100] [--json]

Runs in-process, seeded (the same seed tries the same inputs), over these kinds of input:

    corpus     random bytes and mutated text (NUL, invalid UTF-8, BOM, CRLF, Unicode white space,
               long lines, gzip, truncated gzip, empty files) through Vocab.build and encode, with
               random read sizes; whatever decodes must give exactly the tokens of a plain split
    big-line   one line of --big-line-mb MB (words), and one of as many bytes without white space
    vocab      vocab.json: random bytes, random JSON, wrong types, duplicate words, missing <eos>/<unk>
    config     config.json of a saved model: random edits, deleted keys, wrong types, absurd sizes
    weights    model.safetensors: truncated, bit-flipped, shapes and dtypes changed (with config.json's
               sha256 updated so that the parser and the shape checks are reached)
    text       `bptt score --model DIR --text F` (and eval --test F, train --train/--valid F) with random
               and mutated F
    cli        random options of train / eval / score / generate / plot with bad, absurd and odd values
    metrics    metrics.jsonl edited (records or bytes), then `bptt plot`

An input passes when it is accepted, or refused with a ValueError (library) or exit code 2 and one
line on stderr naming the file or an option (command line), within a time limit (a training run that
the trainer stops as diverged, exit 1 after its rollback lines, counts as accepted and is counted); any other outcome
(an exception of another type, a traceback, several lines, another exit code, a hang, the shared
model directory changed) is a failure and is printed. Exit status 1 if any input failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import hashlib
import io
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import torch

import bptt.data as data
from bptt.storage.checkpoint import CheckpointError, load_checkpoint
from bptt.cli import main as cli_main
from bptt.data import CorpusError, Vocab, encode
from bptt.storage.saved_model import load_model
from bptt.training.trainer import TrainConfig, train

WORDS = "the a cat dog sat ran on under mat rug big small red".split()
SLOW = 60.0  # seconds: an input that takes longer counts as a hang


class Tally:
    def __init__(self):
        self.tried: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.seconds: Counter[str] = Counter()
        self.slowest: dict[str, float] = defaultdict(float)
        self.diverged: Counter[str] = Counter()  # accepted runs that the trainer stopped as diverged

    def record(self, kind: str, outcome: str, seconds: float, detail: str = "") -> None:
        self.tried[kind] += 1
        self.seconds[kind] += seconds
        self.slowest[kind] = max(self.slowest[kind], seconds)
        if outcome == "ok" and seconds > SLOW:
            outcome, detail = "fail", f"took {seconds:.0f} s (> {SLOW:.0f} s): {detail}"
        if outcome == "ok":
            self.accepted[kind] += 1
        elif outcome == "refused":
            self.refused[kind] += 1
        else:
            self.failures[kind].append(detail)

    @property
    def total_failures(self) -> int:
        return sum(len(v) for v in self.failures.values())


def one_line_naming(message: str, *names: str) -> bool:
    return "\n" not in message.strip() and any(name in message for name in names if name)


# -- input generators ----------------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    alphabet = WORDS + ["é", "€", "𝄞", "日本", "<unk>", "<eos>"]
    lines = []
    for _ in range(rng.randint(0, 12)):
        n = rng.choice([0, 1, 3, 8, 30, rng.randint(0, 3000)])
        sep = rng.choice([" ", " ", "  ", "\t", "\u3000", "\x0b", "\xa0"])
        lines.append(sep.join(rng.choice(alphabet) for _ in range(n)))
    end = rng.choice(["\n", "\r\n", "\n\n"])
    return end.join(lines) + rng.choice(["", end])


def mutate(rng: random.Random, raw: bytes) -> bytes:
    raw = bytearray(raw)
    for _ in range(rng.choice([0, 1, 1, 2, 5])):
        kind = rng.choice(["nul", "byte", "cut", "bom", "dup", "lead", "flip"])
        at = rng.randint(0, len(raw))
        if kind == "nul":
            raw[at:at] = b"\x00"
        elif kind == "byte":
            raw[at:at] = bytes([rng.choice([0x80, 0xBF, 0xC0, 0xC3, 0xE2, 0xF0, 0xF8, 0xFF])])
        elif kind == "cut":
            del raw[at:]
        elif kind == "bom":
            raw[0:0] = b"\xef\xbb\xbf"
        elif kind == "dup" and raw:
            raw[at:at] = raw[: rng.randint(0, len(raw))]
        elif kind == "lead":
            raw[at:at] = b"\xe2\x82"
        elif kind == "flip" and raw:
            i = rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(8)
    return bytes(raw)


def corpus_bytes(rng: random.Random) -> tuple[bytes, str]:
    """(file content, file name)."""
    choice = rng.random()
    if choice < 0.25:
        raw = rng.randbytes(rng.choice([0, 1, 10, 100, 1000, 5000]))
    elif choice < 0.9:
        raw = mutate(rng, random_text(rng).encode("utf-8"))
    else:
        raw = random_text(rng).encode("utf-8")
    name = "c.txt"
    if rng.random() < 0.2:
        name = "c.txt.gz"
        packed = gzip.compress(raw)
        raw = mutate(rng, packed) if rng.random() < 0.5 else packed
    return raw, name


def reference_tokens(raw: bytes, unit: str) -> list[list[str]] | None:
    """The tokens of bytes that must decode (UTF-8, no NUL), by a plain split; None otherwise."""
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    lines = [line.split() if unit == "word" else list(line.strip()) for line in text.split("\n")]
    return [t for t in lines if t]


def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([None, True, False, 0, 1, -1, 2, 7, 8, 12, 13, 10**6, 10**12, 2**62, 2**64, 10**30,
                           1.5, float("nan"), float("inf"), "", "x", "float64", "int8", "softmax", "class",
                           "hsm", "relu", "char", "word", "<eos>", "<unk>", "../x", "/etc/passwd"])
    if r < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "model", "words", "counts", "unit", "x"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def edit_json(rng: random.Random, obj):
    """A random edit somewhere in a JSON object: set, size, delete, rename, or a type change."""
    obj = copy.deepcopy(obj)
    containers = []

    def walk(node):
        if isinstance(node, dict):
            containers.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            containers.append(node)
            for v in node:
                walk(v)

    for _ in range(rng.choice([1, 1, 2, 4])):
        containers.clear()
        walk(obj)
        if not containers:
            break
        node = rng.choice(containers)
        if not node:
            continue
        key = rng.choice(list(node.keys())) if isinstance(node, dict) else rng.randrange(len(node))
        action = rng.choice(["set", "set", "delete", "rename", "dup"])
        if action == "set":
            node[key] = random_json(rng)
        elif action == "delete":
            del node[key]
        elif action == "rename" and isinstance(node, dict):
            node[f"{key}_"] = node.pop(key)
        elif action == "dup" and isinstance(node, list):
            node.append(node[key])
    return obj


# -- the kinds -----------------------------------------------------------------------------------------


def fuzz_corpus(rng: random.Random, tmp: Path, tally: Tally) -> None:
    raw, name = corpus_bytes(rng)
    path = tmp / name
    path.write_bytes(raw)
    unit = rng.choice(["word", "char"])
    old = data._CHUNK
    data._CHUNK = rng.choice([1, 2, 3, 7, 64, 4096, 1 << 20])
    started = time.perf_counter()
    try:
        vocab = Vocab.build(path, unit)
        corpus = encode(path, vocab, unit)
    except CorpusError as e:
        ok = one_line_naming(str(e), str(path))
        tally.record("corpus", "refused" if ok else "fail", time.perf_counter() - started, f"{name}: {e}")
        return
    except Exception as e:  # noqa: BLE001 - any other exception is the failure we look for
        tally.record("corpus", "fail", time.perf_counter() - started, f"{name}: {type(e).__name__}: {e}")
        return
    finally:
        data._CHUNK = old
    try:
        expected = reference_tokens(gzip.decompress(raw) if name.endswith(".gz") else raw, unit)
    except Exception as e:  # noqa: BLE001
        tally.record("corpus", "fail", time.perf_counter() - started, f"{name}: read a gzip file that gzip "
                     f"refuses ({type(e).__name__}: {e})")
        return
    got = [[vocab.words[i] for i in corpus.ids[s : s + n - 1]] for s, n in zip(corpus.sentence_starts,
                                                                               corpus.sentence_lengths)]
    ok = expected is not None and got == expected
    tally.record("corpus", "ok" if ok else "fail", time.perf_counter() - started,
                 f"{name}: tokens differ from a plain split")


def fuzz_big_line(tmp: Path, megabytes: int, tally: Tally) -> list[str]:
    notes = []
    for kind, unit_text in (("words", None), ("one token", "x")):
        path = tmp / f"big-{kind.replace(' ', '-')}.txt"
        target = megabytes * 1_000_000
        with path.open("wb") as f:
            f.write(b"first line\n")
            block = (" ".join(f"w{i % 5000}" for i in range(20_000)) + " ").encode() if unit_text is None \
                else b"x" * 1_000_000
            written = 0
            while written < target:
                f.write(block)
                written += len(block)
            f.write(b"\nlast line\n")
        started = time.perf_counter()
        try:
            vocab = Vocab.build(path)
            corpus = encode(path, vocab)
            ok = len(corpus.sentence_starts) == 3 and corpus.sentence_lengths[0] == 3
            detail = f"{written / 1e6:.0f} MB line ({kind}): {corpus.tokens:,} tokens, vocabulary {len(vocab):,}"
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"{kind}: {type(e).__name__}: {e}"
        seconds = time.perf_counter() - started
        tally.record("big-line", "ok" if ok else "fail", seconds, detail)
        notes.append(f"{detail}, {seconds:.1f} s")
        path.unlink()
    return notes


def fuzz_vocab(rng: random.Random, tmp: Path, tally: Tally, good: dict) -> None:
    path = tmp / "vocab.json"
    r = rng.random()
    if r < 0.2:
        path.write_bytes(rng.randbytes(rng.choice([0, 1, 20, 500])))
    elif r < 0.3:
        path.write_bytes(mutate(rng, json.dumps(good).encode()))
    else:
        d = edit_json(rng, good)
        if rng.random() < 0.2:
            d["words"] = rng.choice([["<eos>", "<unk>", "a", "a"], ["<unk>", "<eos>"], ["a", "b"], [], ["<eos>"]])
            d["counts"] = [1] * len(d["words"])
        path.write_text(json.dumps(d))
    started = time.perf_counter()
    try:
        vocab = Vocab.load(path)
        ok = vocab.words[:2] == ["<eos>", "<unk>"] and len(set(vocab.words)) == len(vocab.words)
        tally.record("vocab", "ok" if ok else "fail", time.perf_counter() - started, "accepted a bad vocabulary")
    except CorpusError as e:
        tally.record("vocab", "refused" if one_line_naming(str(e), str(path)) else "fail",
                     time.perf_counter() - started, str(e))
    except Exception as e:  # noqa: BLE001
        tally.record("vocab", "fail", time.perf_counter() - started, f"{type(e).__name__}: {e}")


def _load(kind: str, directory: Path, tally: Tally, started: float) -> None:
    try:
        model, vocab, _ = load_model(directory)
        ok = len(vocab) == model.vocab_size and all(bool(torch.isfinite(p).all()) for p in model.params.values())
        tally.record(kind, "ok" if ok else "fail", time.perf_counter() - started, "inconsistent model loaded")
    except (CheckpointError, CorpusError) as e:
        tally.record(kind, "refused" if one_line_naming(str(e), str(directory)) else "fail",
                     time.perf_counter() - started, str(e))
    except Exception as e:  # noqa: BLE001
        tally.record(kind, "fail", time.perf_counter() - started,
                     f"{type(e).__name__}: {e} {traceback.format_exc(limit=-2)!r}")


def fuzz_config(rng: random.Random, model_dir: Path, tmp: Path, tally: Tally) -> None:
    directory = tmp / "cfg"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    if rng.random() < 0.1:
        (directory / "config.json").write_bytes(mutate(rng, (directory / "config.json").read_bytes()))
    else:
        section = rng.choice(["model", "model", "training", None])
        if section and rng.random() < 0.5:
            config[section] = edit_json(rng, {"x": config[section]}).get("x") if section in config else None
        else:
            config = edit_json(rng, config)
        (directory / "config.json").write_text(json.dumps(config))
    _load("config", directory, tally, time.perf_counter())


def fuzz_weights(rng: random.Random, model_dir: Path, tmp: Path, tally: Tally) -> None:
    from safetensors.torch import save as st_save

    directory = tmp / "weights"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(model_dir, directory)
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    r = rng.random()
    if r < 0.4:
        raw = mutate(rng, raw)
    else:
        tensors, _ = load_checkpoint(directory)
        name = rng.choice(sorted(tensors))
        t = tensors[name]
        change = rng.choice(["shape", "dtype", "drop", "extra", "nan", "big"])
        if change == "shape":
            tensors[name] = torch.zeros(*(n + rng.choice([-1, 1]) for n in t.shape)) if t.dim() else t
        elif change == "dtype":
            tensors[name] = t.to(rng.choice([torch.float64, torch.float16, torch.int32, torch.bfloat16]))
        elif change == "drop":
            del tensors[name]
        elif change == "extra":
            tensors["extra"] = torch.zeros(3)
        elif change == "nan":
            tensors[name] = t.clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(t.shape)
        else:
            tensors[name] = t * 1e30
        raw = st_save({k: v.contiguous() for k, v in tensors.items()})
    path.write_bytes(raw)
    if rng.random() < 0.9:  # past the sha256 check, to the parser and the model checks
        config = json.loads((directory / "config.json").read_text())
        config["weights_sha256"] = hashlib.sha256(raw).hexdigest()
        (directory / "config.json").write_text(json.dumps(config))
    _load("weights", directory, tally, time.perf_counter())


def run_cli(argv: list[str]) -> tuple[int | str, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc: int | str = cli_main(argv)
    except BaseException as e:  # noqa: BLE001 - SystemExit included: main must return
        rc = f"raised {type(e).__name__}: {e}"
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - started


def judge_cli(kind: str, argv: list[str], tally: Tally, names: list[str]) -> None:
    rc, out, err, seconds = run_cli(argv)
    shown = " ".join(argv)[:200]
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if rc == 0:
        tally.record(kind, "ok", seconds, shown)
    elif rc == 1 and argv[0] == "train" and last.startswith("error: training diverged") and "Traceback" not in err:
        tally.diverged[kind] += 1  # the trainer's own outcome for an absurd rate: rollbacks, then exit 1
        tally.record(kind, "ok", seconds, shown)
    elif rc == 2 and err.startswith("error: ") and one_line_naming(err, *names) and "Traceback" not in err:
        tally.record(kind, "refused", seconds)
    else:
        tally.record(kind, "fail", seconds, f"{shown} -> {rc!r}: {err.strip()[:300]!r}")


def fuzz_text(rng: random.Random, model_dir: Path, corpus: Path, tmp: Path, tally: Tally) -> None:
    """A random or mutated text file given to score (mostly), eval or train."""
    raw, name = corpus_bytes(rng)
    if rng.random() < 0.05:
        path = tmp / rng.choice(["missing.txt", "."])
    else:
        path = tmp / name
        path.write_bytes(raw)
    command = rng.choices(["score", "eval", "train"], [6, 2, 2])[0]
    if command == "score":
        argv = ["score", "--model", str(model_dir), "--text", str(path)] + rng.choice([[], ["--ln"], ["--json"]])
    elif command == "eval":
        argv = ["eval", "--model", str(model_dir), "--test", str(path)]
    else:
        files = [str(path), str(corpus)] if rng.random() < 0.5 else [str(corpus), str(path)]
        argv = ["train", "--train", files[0], "--valid", files[1], "--model", str(tmp / "text-run"), "--quiet",
                "--max-steps", "2", "--epochs", "1", "--hidden", "6", "--batch", "2", "--bptt", "4",
                "--unit", rng.choice(["word", "char"])]
    judge_cli("text", argv, tally, [str(path)])
    shutil.rmtree(tmp / "text-run", ignore_errors=True)


def fuzz_metrics(rng: random.Random, model_dir: Path, tmp: Path, tally: Tally) -> None:
    """metrics.jsonl edited (records or bytes), then `bptt plot`."""
    directory = tmp / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    if rng.random() < 0.2:
        raw = mutate(rng, "\n".join(lines).encode())
    else:
        records = [json.loads(line) for line in lines if line.strip()]
        records = edit_json(rng, records) if rng.random() < 0.7 else records
        if rng.random() < 0.3 and records and isinstance(records[0], dict):
            records[0][rng.choice(["train_entropy_bits", "valid_entropy_bits", "lr", "epoch"])] = rng.choice(
                [1e308, -1e308, 5000, -5000, 0, 1e-320, 2**70])
        raw = "\n".join(json.dumps(r) for r in (records if isinstance(records, list) else [records])).encode()
    (directory / "metrics.jsonl").write_bytes(raw)
    judge_cli("metrics", ["plot", "--model", str(directory), "--out", str(directory / "c.png")], tally,
              [str(directory)])


ODD_VALUES = ["0", "-1", "-3", "1", "2", "7", str(10**12), str(2**62), str(2**63), str(10**30), "nan", "inf",
              "-inf", "1e999", "-0", "0.5", "1e-320", "", "x", "1_0", " 3", "0x10", "--", "-", "é"]


def fuzz_cli(rng: random.Random, model_dir: Path, corpus: Path, tmp: Path, tally: Tally, parsers: dict,
             counter: list[int]) -> None:
    command = rng.choice(["train", "train", "train", "eval", "score", "generate", "generate", "plot"])
    counter[0] += 1
    new = tmp / f"run{counter[0]}"
    base = {
        "train": ["train", "--train", str(corpus), "--valid", str(corpus), "--model", str(new), "--quiet",
                  "--max-steps", "3", "--epochs", "1", "--hidden", "8", "--batch", "4", "--bptt", "5"],
        "eval": ["eval", "--model", str(model_dir), "--test", str(corpus)],
        "score": ["score", "--model", str(model_dir), "--text", str(corpus)],
        "generate": ["generate", "--model", str(model_dir), "--words", "5"],
        "plot": ["plot", "--model", str(model_dir), "--out", str(tmp / "c.png")],
    }[command]
    fixed = {"--max-steps", "--epochs", "--model", "--train", "--valid", "--test", "--text", "--resume", "--out",
             "--help", "--version", "-h"}
    options = [a for a in parsers[command]._actions if a.option_strings and a.option_strings[-1] not in fixed]
    argv = list(base)
    used = []
    for action in rng.sample(options, k=min(len(options), rng.choice([1, 1, 2, 3]))):
        option = action.option_strings[-1]
        used.append(option)
        if action.nargs == 0:
            argv.append(option)
        elif action.choices and rng.random() < 0.5:
            argv += [option, rng.choice(list(action.choices) + ["bogus", ""])]
        else:
            argv += [option, rng.choice(ODD_VALUES)]
        if option == "--words" and argv[-1].lstrip("-").isdigit() and 10_000 < int(argv[-1]) <= 10**7:
            argv[-1] = "10"  # a valid request that would merely take long to sample
    if rng.random() < 0.05:
        argv.append(rng.choice(["--no-such-option", "extra-positional"]))
        used.append(argv[-1])
    names = [a for a in argv if a.startswith("--")] + used + [str(new), str(model_dir), str(corpus)]
    judge_cli("cli", argv, tally, names)
    shutil.rmtree(new, ignore_errors=True)


# -- the campaign --------------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def campaign(seed: int, minutes: float, big_line_mb: int) -> tuple[Tally, list[str], float]:
    rng = random.Random(seed)
    tally = Tally()
    notes: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bptt-fuzz-") as root:
        root = Path(root)
        corpus = root / "train.txt"
        corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
                                    for _ in range(80)) + "\n")
        model_dir = root / "model"
        train(TrainConfig.from_options(train=str(corpus), valid=str(corpus), model=str(model_dir), hidden_size=8,
                                       batch=4, bptt=5, epochs=1, progress=False))
        before = snapshot(model_dir)
        good_vocab = json.loads((model_dir / "vocab.json").read_text())
        from bptt.cli import build_parser

        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        parsers = sub.choices
        work = root / "work"
        work.mkdir()
        if big_line_mb:
            notes += fuzz_big_line(work, big_line_mb, tally)
        deadline = time.perf_counter() + minutes * 60
        counter = [0]
        kinds = ["corpus", "vocab", "config", "weights", "text", "cli", "metrics"]
        weights = [3, 3, 3, 2, 3, 3, 1]
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "corpus":
                fuzz_corpus(rng, work, tally)
            elif kind == "vocab":
                fuzz_vocab(rng, work, tally, good_vocab)
            elif kind == "config":
                fuzz_config(rng, model_dir, work, tally)
            elif kind == "weights":
                fuzz_weights(rng, model_dir, work, tally)
            elif kind == "text":
                fuzz_text(rng, model_dir, corpus, work, tally)
            elif kind == "metrics":
                fuzz_metrics(rng, model_dir, work, tally)
            else:
                fuzz_cli(rng, model_dir, corpus, work, tally, parsers, counter)
        if snapshot(model_dir) != before:
            tally.record("model-dir", "fail", 0.0, "the shared model directory was changed")
    return tally, notes, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=4.0, help="time for the random inputs (default 4)")
    parser.add_argument("--big-line-mb", type=int, default=100, help="size of the long-line inputs, 0: none")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tally, notes, seconds = campaign(args.seed, args.minutes, args.big_line_mb)
    if args.json:
        print(json.dumps({"seed": args.seed, "seconds": seconds, "tried": tally.tried, "accepted": tally.accepted,
                          "diverged": tally.diverged,
                          "refused": tally.refused, "failures": tally.failures, "notes": notes}))
    else:
        print(f"fuzz campaign, seed {args.seed}: {sum(tally.tried.values()):,} inputs in {seconds:.0f} s")
        print(f"{'kind':<10} {'tried':>7} {'accepted':>9} {'refused':>8} {'failed':>7} {'slowest':>9}")
        for kind in tally.tried:
            print(f"{kind:<10} {tally.tried[kind]:>7,} {tally.accepted[kind]:>9,} {tally.refused[kind]:>8,} "
                  f"{len(tally.failures[kind]):>7,} {tally.slowest[kind]:>8.2f}s")
        for note in notes:
            print(f"  {note}")
        for kind, n in tally.diverged.items():
            print(f"  {kind}: {n} accepted runs stopped by the trainer as diverged (exit 1, by design)")
        for kind, details in tally.failures.items():
            for detail in details[:5]:
                print(f"FAIL {kind}: {detail}", file=sys.stderr)
        print("all inputs failed cleanly or were accepted" if not tally.total_failures
              else f"{tally.total_failures} inputs FAILED")
    return 1 if tally.total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
