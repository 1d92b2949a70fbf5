"""The `bptt` command: a thin layer over the Python API.

Every subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`.
Bad input gives one line on stderr naming the option or file, exit code 2, no traceback:

* every numeric option is checked as it is parsed: a float must be finite (no nan, no inf), an
  integer at most 2**62 in size, a --seed in [0, 2**32 - 1]; the commands check the ranges that are
  theirs (--hidden >= 1, --temperature > 0, ...);
* ValueError (CorpusError, CheckpointError, ResourceError, ...) and OSError from a command are bad
  input, reported as `error: <message>` on one line; running out of memory is reported the same way;
* anything else is a bug in bptt: one line "error: internal error ..." and exit code 1 (set
  BPTT_TRACEBACK=1 for the traceback).

`bptt train --model DIR` refuses a DIR that already holds a model or a training state (suggesting
--resume or a new directory) unless --force is given, which deletes that run's files first.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bptt.train", "train a language model on a text corpus"),
    "eval": ("bptt.evaluate", "perplexity, entropy (bits/token), tokens and OOV rate of a text under a model"),
    "gradcheck": ("bptt.gradcheck", "check the explicit gradients against finite differences, autograd and RTRL"),
    "bench": ("bptt.bench", "training tokens/s of bptt next to torch.nn.RNN + autograd, same shapes, same run"),
    "demo": ("bptt.demo", "learn a grammar with a known entropy rate; full BPTT vs truncation 0 on its long-range part"),
    "score": ("bptt.score", "log10 probability of every sentence of a text (rnnlm -nbest style)"),
    "generate": ("bptt.generate", "sample text from a model: temperature, top-k, prompt"),
    "plot": ("bptt.plot", "learning curves (perplexity, learning rate per epoch) of a training run as PNG"),
    "average": ("bptt.average", "average the weights of epochs kept by train --keep-epochs into a new model"),
}


class UsageError(Exception):
    """A bad option value or input file: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        raise UsageError(f"{self.prog}: {message}")


INT_LIMIT = 1 << 62  # no integer option is larger in size: no overflow in numpy, torch or the estimates
SEED_MAX = (1 << 32) - 1


def finite_float(text: str) -> float:
    """argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def bounded_int(text: str) -> int:
    """argparse type: an integer of at most 2**62 in size."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
    if abs(value) > INT_LIMIT:
        raise argparse.ArgumentTypeError(f"{text[:40]} is out of range (at most 2**62 in size)")
    return value


def seed(text: str) -> int:
    """argparse type: a seed in [0, 2**32 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be an integer in [0, {SEED_MAX}], got {text[:40]}")
    return value


def _checked_types(parser: argparse.ArgumentParser) -> None:
    """Replace the plain int and float types of the parser's options by the checked ones."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        elif action.type is int:
            action.type = seed if action.dest == "seed" else bounded_int


# what `bptt train --model DIR` leaves in DIR: a DIR holding any of RUN_MARKERS holds a model or a state
RUN_MARKERS = ("model.safetensors", "config.json", "checkpoint")
RUN_FILES = ("model.safetensors", "config.json", "vocab.json", "metrics.jsonl")


def _check_before_deleting(args: argparse.Namespace) -> None:
    """The cheap checks of a run (its input files exist, its options are valid), so that --force
    does not delete the previous run for a run that fails at once."""
    from dataclasses import fields

    from bptt.data import _check_input_file
    from bptt.train import TrainConfig

    for option in ("train", "valid"):
        if not getattr(args, option, None):
            raise UsageError(f"bptt train needs --{option} (or --resume DIR)")
        _check_input_file(getattr(args, option))
    known = {f.name for f in fields(TrainConfig)} - {"direct"}  # --direct is converted by bptt.train.run
    TrainConfig(**{k: v for k, v in vars(args).items() if k in known and v is not None}).validate()


def check_train_directory(args: argparse.Namespace) -> None:
    """Refuse `bptt train --model DIR` over an earlier run's DIR unless --force (which deletes that run)."""
    if getattr(args, "resume", None) or not getattr(args, "model", None):
        return
    directory = Path(args.model)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--model {directory}: exists and is not a directory")
    found = [name for name in RUN_MARKERS if (directory / name).exists()]
    if not found:
        return
    if not getattr(args, "force", False):
        raise UsageError(
            f"--model {directory}: already holds a model or training state ({found[0]}); continue it with "
            f"`bptt train --resume {directory}`, choose a new directory, or add --force to overwrite it"
        )
    _check_before_deleting(args)
    for name in RUN_FILES:
        _unlink(directory / name)
    _delete_files_and_dir(directory / "checkpoint")
    epochs = directory / "epochs"  # DIR/epochs/epoch-N of train --keep-epochs: each a model directory
    if epochs.is_dir():
        for sub in sorted(epochs.iterdir()):
            if sub.name.startswith("epoch-"):
                _delete_files_and_dir(sub)
        _delete_files_and_dir(epochs)


def _unlink(path: Path) -> None:
    if path.is_file() or path.is_symlink():
        path.unlink()


def _delete_files_and_dir(directory: Path) -> None:
    """The files directly in `directory`, then the directory itself if that left it empty."""
    if not directory.is_dir() or directory.is_symlink():
        _unlink(directory)
        return
    for path in sorted(directory.iterdir()):
        _unlink(path)
    if not any(directory.iterdir()):
        directory.rmdir()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bptt",
        description="Recurrent neural network language models trained with explicit back-propagation through time.",
    )
    parser.add_argument("--version", action="version", version=f"bptt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            epilog=getattr(module, "EXAMPLES", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        _checked_types(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from bptt import __version__

    return __version__


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        if args.command == "train":
            check_train_directory(args)
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory: try a smaller --hidden, --batch or --bptt", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line, unless asked for the traceback
        if "out of memory" in str(e):  # torch.OutOfMemoryError and friends
            print(f"error: out of memory: {_one_line(e)[:200]}", file=sys.stderr)
            return 2
        if os.environ.get("BPTT_TRACEBACK"):
            raise
        print(f"error: internal error (a bug in bptt; BPTT_TRACEBACK=1 shows where): "
              f"{type(e).__name__}: {_one_line(e)[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
