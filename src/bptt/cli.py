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
--resume or a new directory) unless --force is given, which deletes that run's files first
(commands/train.py).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

from bptt.commands import COMMANDS


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


def _add_command(sub, name: str) -> None:
    module_name, help_text = COMMANDS[name]
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `bptt` parser. With a command name, only that command's module is imported and its options
    added (the others are listed with their help); without one, every command's."""
    parser = _Parser(
        prog="bptt",
        description="Recurrent neural network language models trained with explicit back-propagation through time.",
    )
    parser.add_argument("--version", action="version", version=f"bptt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        if command is None or name == command:
            _add_command(sub, name)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from bptt import __version__

    return __version__


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory" + (": try a smaller --hidden, --batch or --bptt" if command == "train" else ""),
              file=sys.stderr)
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
