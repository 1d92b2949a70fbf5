"""`bptt average`: average the weights of several epochs of one training run into a new model (checkpoint averaging).

`bptt train --keep-epochs` keeps every accepted epoch's weights as a model directory
DIR/epochs/epoch-N (loadable by eval, score and generate). This command averages the weights of the
epochs asked for, parameter by parameter, in float64, and writes the result as a model directory
with the run's vocabulary; with --valid it also prints the valid perplexity of each epoch and of the
average. Averaging the last epochs of a run, once the rate has come down, smooths the noise of the
last updates; averaging epochs that are still far apart usually makes things worse.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bptt import checks
from bptt.data import encode
from bptt.evaluation import evaluate_corpus
from bptt.storage.saved_model import load_model, save_model, saved_unit
from bptt.training.run_dir import EPOCHS_DIR, RUN_FILES, STATE_DIR, epoch_dir, kept_epochs

EXAMPLES = """examples:
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m --keep-epochs
  bptt average --model m --last 3 --out m-avg --valid ptb.valid.txt
  bptt average --model m --epochs 8-11 --out m-avg
  bptt eval --model m-avg --test ptb.test.txt
"""


def _epoch_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        a, b = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"--epochs must be N or A-B (epoch numbers), got {text!r}") from None
    if a < 1 or b < a:
        raise ValueError(f"--epochs must be N or A-B with 1 <= A <= B, got {text!r}")
    return a, b


def choose_epochs(run_dir: str | Path, epochs: str | None, last: int | None) -> list[int]:
    """The kept epochs selected by --epochs A-B or --last N (default: all kept)."""
    kept = kept_epochs(run_dir)
    if not kept:
        raise ValueError(f"{Path(run_dir) / EPOCHS_DIR}: no kept epochs (train with --keep-epochs)")
    if epochs is not None:
        a, b = _epoch_range(epochs)
        chosen = [e for e in kept if a <= e <= b]
        if not chosen:
            raise ValueError(f"--epochs {epochs}: none of them is kept in {Path(run_dir) / EPOCHS_DIR} (kept: {kept})")
        return chosen
    if last is not None:
        checks.positive_int("--last", last)
        return kept[-last:]
    return kept


def average_epochs(run_dir: str | Path, epochs: list[int], each=None):
    """-> (model holding the mean of the epochs' weights, vocabulary, config of the last epoch).

    each(epoch, model, vocab, config), if given, sees every epoch's model as it is loaded."""
    total: dict[str, torch.Tensor] = {}
    model = vocab = config = first = None
    for epoch in epochs:
        directory = epoch_dir(run_dir, epoch)
        model, vocab, config = load_model(directory)
        shapes = {name: tuple(p.shape) for name, p in model.params.items()}
        if first is None:
            first = (directory, model.config.to_json(), vocab.words, shapes)
        else:  # one run's epochs: the same model and vocabulary (a directory reused by another run is not)
            what = ("model" if model.config.to_json() != first[1] else "vocabulary" if vocab.words != first[2]
                    else "parameters" if shapes != first[3] else None)
            if what is not None:
                raise ValueError(f"{directory}: another {what} than {first[0]}'s; only one run's epochs can be "
                                 "averaged")
        if each is not None:
            each(epoch, model, vocab, config)
        for name, p in model.params.items():
            if name in total:
                total[name] += p.double()
            else:
                total[name] = p.double().clone()
    for name, p in model.params.items():
        p.copy_(total[name] / len(epochs))
    return model, vocab, config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a run directory of bptt train --keep-epochs")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--epochs", metavar="A-B", help="the kept epochs A to B (default: all kept)")
    which.add_argument("--last", type=int, metavar="N", help="the last N kept epochs")
    parser.add_argument("--out", required=True, help="directory for the averaged model (must not hold a model)")
    parser.add_argument("--valid", help="also print the valid perplexity of each chosen epoch and of the average")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    found = [name for name in (*RUN_FILES, STATE_DIR, EPOCHS_DIR) if (out / name).exists()]
    if found:
        raise ValueError(f"--out {out}: already holds a model or a run ({found[0]}); choose a new directory")
    epochs = choose_epochs(args.model, args.epochs, args.last)
    valid = []  # the encoded --valid corpus, once the first epoch's vocabulary is known

    def report(epoch, single, vocab, config):
        if args.valid:
            if not valid:
                valid.append(encode(args.valid, vocab, saved_unit(config, vocab)))
            print(f"epoch {epoch}: valid perplexity {evaluate_corpus(single, valid[0], vocab).perplexity:.2f}")

    model, vocab, config = average_epochs(args.model, epochs, report)
    extra = {k: v for k, v in config.items() if k in ("training",)}
    extra["averaged"] = {"run": str(Path(args.model)), "epochs": epochs}
    if valid:
        evaluation = evaluate_corpus(model, valid[0], vocab)
        extra["valid"] = evaluation.to_json()
        print(f"average of epochs {epochs}: valid perplexity {evaluation.perplexity:.2f}")
    save_model(out, model, extra, vocab)
    print(f"averaged {len(epochs)} epochs into {out}")
    return 0
