"""`bptt demo`, the built-in default: learn a grammar whose true entropy is known, and see what full BPTT buys.

Generates train/valid/test corpora from bptt.grammar (sentences `a_k w..w z_k`: the closing word must
match the opening word up to 9 steps back), trains an Elman model with full BPTT (every error goes
back at least as far as the longest sentence), and prints its test perplexity next to the true
perplexity (the bound no model can beat in expectation: a finite test set can fall a little below it by
chance, so the optimal predictor's perplexity on the same test set is printed too) and the memoryless bound
(a model that forgets the opening
word), the learning curve, sampled sentences, and the same model trained with truncation 0
(--bptt 1: each error reaches only its own step, no gradient through the recurrent weights in time).
The two are compared on the closing words, the long-range part. 10–20 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bptt import checks
from bptt.data import EOS, encode
from bptt.evaluation import Evaluation, evaluate_corpus
from bptt.grammar import ClosingStats, Grammar, closing_stats
from bptt.model import ModelConfig
from bptt.sampling import sample
from bptt.storage.saved_model import load_model
from bptt.training.config import TrainConfig
from bptt.training.trainer import TrainResult, train

EXAMPLES = """examples:
  bptt demo
  bptt demo --out demo-run --seed 1
  bptt demo --quick
"""

MIN_KIND_GAIN_BITS = 0.2  # full BPTT must beat truncation 0 by this much on the closing words' kind


@dataclass
class Settings:
    train_sentences: int = 8000
    valid_sentences: int = 400
    test_sentences: int = 1000
    hidden: int = 64
    epochs: int = 20
    batch: int = 32
    optimizer: str = "adam"
    lr: float = 0.01
    min_improvement: float = 1.001


QUICK = Settings(train_sentences=300, valid_sentences=60, test_sentences=200, hidden=16, epochs=2)


@dataclass
class Run:
    name: str
    result: TrainResult
    test: Evaluation
    closing: ClosingStats
    valid_samples: int
    samples: list[list[str]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=None, help="directory for the corpora and models (default: a temporary one)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpora, the models and the samples")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden units (default {Settings.hidden})")
    parser.add_argument("--epochs", type=int, default=None, help=f"most epochs (default {Settings.epochs})")
    parser.add_argument(
        "--sentences", type=int, default=None, help=f"training sentences (default {Settings.train_sentences})"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny corpus and 2 epochs: seconds, for tests")


def _settings(args: argparse.Namespace) -> Settings:
    s = Settings(**vars(QUICK)) if args.quick else Settings()
    for option, attr in (("hidden", "hidden"), ("epochs", "epochs"), ("sentences", "train_sentences")):
        value = getattr(args, option)
        if value is not None:
            setattr(s, attr, checks.positive_int(f"--{option}", value))
    # enough sentences for the demo's batch of streams, few enough for memory: said in terms of --sentences
    checks.integer("--sentences", s.train_sentences, 4 * s.batch, 10_000_000,
                   what=f"an integer from {4 * s.batch} (the demo's {s.batch} streams) to 10,000,000")
    return s


def _train_and_test(name, directory, grammar, settings, seed, **bptt) -> Run:
    config = TrainConfig(
        train=str(directory / "train.txt"), valid=str(directory / "valid.txt"), model=str(directory / name),
        model_config=ModelConfig(hidden_size=settings.hidden), batch=settings.batch, epochs=settings.epochs,
        optimizer=settings.optimizer, lr=settings.lr, min_improvement=settings.min_improvement, seed=seed, progress=False, **bptt,
    )
    result = train(config)
    model, vocab, _ = load_model(config.model)  # the best epoch on valid
    test = encode(directory / "test.txt", vocab)
    evaluation = evaluate_corpus(model, test, vocab)
    words = sample(model, vocab, words=400, seed=seed)
    sentences, current = [], []
    for w in words:
        if w == EOS:
            sentences.append(current)
            current = []
        else:
            current.append(w)
    return Run(
        name, result, evaluation, closing_stats(model, vocab, test.ids, grammar),
        sum(grammar.is_valid(s) for s in sentences), sentences,
    )


def _bar(value: float, low: float, high: float, width: int = 30) -> str:
    if not high > low:
        return ""
    return "#" * max(0, min(width, round(width * (value - low) / (high - low))))


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and leaves a core to the rest
    try:
        if args.out is not None:
            directory = Path(args.out)
            directory.mkdir(parents=True, exist_ok=True)
            return _demo(directory, settings, args.seed, args.quick, keep=True)
        with tempfile.TemporaryDirectory(prefix="bptt-demo-") as tmp:
            return _demo(Path(tmp), settings, args.seed, args.quick, keep=False)
    finally:
        torch.set_num_threads(threads)


def _demo(directory: Path, settings: Settings, seed: int, quick: bool, keep: bool) -> int:
    started = time.perf_counter()
    grammar = Grammar()
    for name, n, offset in (("train", settings.train_sentences, 0), ("valid", settings.valid_sentences, 1),
                            ("test", settings.test_sentences, 2)):
        grammar.write_corpus(directory / f"{name}.txt", n, seed=3 * seed + offset)
    bound, memoryless = grammar.perplexity_bound(), grammar.memoryless_perplexity()
    # the optimal predictor on this very test set: the finite-sample counterpart of the bound
    test_sentences = grammar.sample_sentences(settings.test_sentences, seed=3 * seed + 2)  # = test.txt
    opt_bits, opt_tokens, opt_closing = grammar.score(test_sentences)
    opt_rate = opt_bits / opt_tokens
    log2k = math.log2(grammar.kinds)
    print("bptt demo: an Elman language model on a grammar with a long-range dependency")
    print(f"  sentences: {grammar.describe()}")
    print(f"  e.g.       {' '.join(grammar.sample_sentences(1, seed=seed + 99)[0])} <eos>")
    print(f"  corpora:   train {settings.train_sentences}, valid {settings.valid_sentences}, "
          f"test {settings.test_sentences} sentences" + (f", in {directory}" if keep else ""))
    print(f"  true entropy rate {grammar.entropy_rate_bits():.4f} bits/token: perplexity bound {bound:.3f}")
    print(f"  memoryless bound  {grammar.memoryless_rate_bits():.4f} bits/token: perplexity {memoryless:.3f} "
          f"(forgetting the opening word costs log2 {grammar.kinds} = {log2k:g} bits per closing word)")

    span = grammar.max_len + 3  # the longest sentence, <eos> included
    block = 10
    print()
    print(f"training  full BPTT      BPTT(k1={block}, k2={block + span}): "
          f"every error goes back >= {span} steps, "
          f"hidden {settings.hidden}, {settings.optimizer} lr {settings.lr:g}", flush=True)
    full = _train_and_test("full-bptt", directory, grammar, settings, seed, bptt=span, bptt_block=block)
    print(f"          ... {full.result.epochs} epochs, {full.result.seconds:.1f} s")
    print("training  truncation 0  --bptt 1, BPTT(1, 1): each error reaches only its own step", flush=True)
    trunc = _train_and_test("truncation-0", directory, grammar, settings, seed, bptt=1)
    print(f"          ... {trunc.result.epochs} epochs, {trunc.result.seconds:.1f} s")

    print()
    print(f"learning curve: valid perplexity per epoch (bound {bound:.3f}; bar: full BPTT above the bound)")
    print(f"  {'epoch':>5}  {'full BPTT':>9}  {'trunc 0':>9}")
    curves = [full.result.history, trunc.result.history]
    high = max(h["valid_perplexity"] for h in full.result.history)
    for e in range(max(len(c) for c in curves)):
        cells = [f"{c[e]['valid_perplexity']:9.3f}" if e < len(c) else " " * 9 for c in curves]
        bar = _bar(curves[0][e]["valid_perplexity"], bound, high) if e < len(curves[0]) else ""
        print(f"  {e + 1:>5}  {cells[0]}  {cells[1]}  {bar}")

    print()
    print(f"test perplexity ({full.test.tokens} tokens)")
    for label, ppl, bits in (
        ("full BPTT", full.test.perplexity, full.test.entropy_bits),
        ("truncation 0", trunc.test.perplexity, trunc.test.entropy_bits),
        ("true bound", bound, grammar.entropy_rate_bits()),
        ("  this test set", 2.0**opt_rate, opt_rate),
        ("memoryless bound", memoryless, grammar.memoryless_rate_bits()),
    ):
        print(f"  {label:<17} {ppl:8.3f}   {bits:.4f} bits/token")

    print()
    print(f"closing words z_k, the long-range part ({full.closing.count} in test): "
          "mean bits, and the kind's share")
    print("  (kind bits = -log2 P(z_k | a closing word comes): 0 remembers the opening word, "
          f"{log2k:g} forgets it)")
    print(f"  {'':<17} {'bits':>7} {'kind bits':>10} {'kind right':>11}")
    rows = [
        ("optimal", grammar.closing_bits(), 0.0, 1.0),
        ("  this test set", opt_closing, 0.0, 1.0),
        ("full BPTT", full.closing.bits, full.closing.kind_bits, full.closing.kind_accuracy),
        ("truncation 0", trunc.closing.bits, trunc.closing.kind_bits, trunc.closing.kind_accuracy),
        ("memoryless", grammar.closing_bits() + log2k, log2k, 1.0 / grammar.kinds),
    ]
    for label, bits, kind_bits, accuracy in rows:
        print(f"  {label:<17} {bits:7.3f} {kind_bits:10.3f} {100 * accuracy:10.1f}%")

    print()
    print("sampled sentences (full BPTT model)")
    for sentence in full.samples[:5]:
        print(f"  {'ok ' if grammar.is_valid(sentence) else 'BAD'}  {' '.join([*sentence, '<eos>'])}")
    for run_ in (full, trunc):
        label = "full BPTT" if run_ is full else "truncation 0"
        print(f"  {label}: {run_.valid_samples} of {len(run_.samples)} sampled sentences are grammatical")

    gain = trunc.closing.kind_bits - full.closing.kind_bits
    excess = full.test.entropy_bits - opt_rate
    print()
    print(f"total {time.perf_counter() - started:.1f} s")
    if gain >= MIN_KIND_GAIN_BITS:
        print(f"verdict: full BPTT learned the long-range dependency: {full.closing.kind_bits:.3f} bits "
              f"per closing word on its kind vs {trunc.closing.kind_bits:.3f} with truncation 0 "
              f"({log2k:g} = memoryless); test perplexity {full.test.perplexity:.3f}, "
              f"{excess:+.4f} bits/token from the optimal predictor on the same text ({2.0**opt_rate:.3f})")
    else:
        why = " (--quick: too little training to show it)" if quick else ""
        print(f"verdict: not shown by this run{why}: kind bits full BPTT {full.closing.kind_bits:.3f} vs "
              f"truncation 0 {trunc.closing.kind_bits:.3f}; test perplexity {full.test.perplexity:.3f}, "
              f"optimal {2.0**opt_rate:.3f}")
    return 0
