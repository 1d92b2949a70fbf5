"""Plot the learning curves of a training run: train and valid perplexity per epoch, and the learning rate.

Reads DIR/metrics.jsonl (one JSON object per epoch, written by bptt train), draws perplexity = 2^entropy
(bits/token) of train and valid against the epoch, marks the epochs whose weights were rejected
(valid got worse, weights restored), draws the learning rate on a second axis, and writes a PNG
(default DIR/curves.png). Prints the path of the image.

Needs matplotlib, an optional extra: pip install 'bptt[plot]'. Rendered with the Agg backend, no
display needed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from bptt.data import CorpusError

METRICS_FILE = "metrics.jsonl"
NEEDS_MATPLOTLIB = "bptt plot needs matplotlib: pip install 'bptt[plot]'"
_NUMBERS = ("epoch", "lr", "train_entropy_bits", "valid_entropy_bits")
# plausible ranges: 2^1000 is still a float; an epoch count or a rate beyond these is not from bptt train
_RANGES = {"epoch": (0, 1e6), "lr": (0, 1e6), "train_entropy_bits": (0, 1000), "valid_entropy_bits": (0, 1000)}

EXAMPLES = """examples:
  bptt plot --model m
  bptt plot --model m --out m-curves.png
"""


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Epoch records of a metrics.jsonl file; blank lines and event records ("event": "rollback", ...)
    skipped. CorpusError "FILE:LINE: ..." if malformed."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise CorpusError(name, "no such file")
    records = []
    with open(name, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(name, f"not a JSON object: {e.msg}", lineno) from None
            except (RecursionError, ValueError) as e:  # nested too deep; an integer of thousands of digits
                raise CorpusError(name, f"not a metrics record ({type(e).__name__})", lineno) from None
            if not isinstance(record, dict):
                raise CorpusError(name, "not a JSON object", lineno)
            if "event" in record:  # a training event (e.g. a rollback), not an epoch
                continue
            for key in _NUMBERS:
                value = record.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise CorpusError(name, f"{key!r} missing or not a finite number", lineno)
                low, high = _RANGES[key]
                if not low <= value <= high:
                    raise CorpusError(name, f"{key!r} = {value!r} is outside [{low:g}, {high:g}]", lineno)
            records.append(record)
    if not records:
        raise CorpusError(name, "no epochs recorded")
    return records


def plot_curves(records: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Write the PNG; ImportError if matplotlib is missing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    train_ppl = [2.0 ** r["train_entropy_bits"] for r in records]
    valid_ppl = [2.0 ** r["valid_entropy_bits"] for r in records]
    lrs = [r["lr"] for r in records]

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, independent of pyplot's global state
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, train_ppl, "o-", color="tab:blue", label="train perplexity")
    ax.plot(epochs, valid_ppl, "s-", color="tab:orange", label="valid perplexity")
    rejected = [(e, p) for r, e, p in zip(records, epochs, valid_ppl) if r.get("accepted") is False]
    if rejected:
        ax.plot(*zip(*rejected), "x", color="tab:red", markersize=10, label="rejected epoch")
    values = [p for p in train_ppl + valid_ppl if p > 0]
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)

    ax_lr = ax.twinx()
    ax_lr.step(epochs, lrs, where="post", color="tab:gray", linestyle="--", label="learning rate")
    if all(lr > 0 for lr in lrs) and max(lrs) / min(lrs) > 10:
        ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")

    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax_lr.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="best")
    if title:
        ax.set_title(title)
    out = Path(out)
    with warnings.catch_warnings():  # e.g. a degenerate axis range: not the user's problem, keep stderr clean
        warnings.simplefilter("ignore")
        fig.tight_layout()
        fig.savefig(out, format="png")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--out", default=None, help="PNG to write (default DIR/curves.png)")


def run(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(NEEDS_MATPLOTLIB) from None
    records = read_metrics(Path(args.model) / METRICS_FILE)
    out = Path(args.out) if args.out else Path(args.model) / "curves.png"
    path = plot_curves(records, out, title=str(args.model))
    print(path)
    return 0
