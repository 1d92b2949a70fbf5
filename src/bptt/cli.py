"""The `bptt` command: a thin layer over the Python API.

Every subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`.
Bad input gives one line on stderr naming the option or file, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
}


class UsageError(Exception):
    """A bad option value or input file: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        raise UsageError(f"{self.prog}: {message}")


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
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from bptt import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
