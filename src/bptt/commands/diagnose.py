"""`bptt diagnose`: how far errors really travel back in time in a trained model — the norm of
∂L^t/∂h^(t−j) against the lag j (mean and spread over positions of a text), the norms of the Jacobian
products the seed's recursion multiplies, the spectral radius of W, and what truncating BPTT to k steps
throws away. A plot (matplotlib: pip install 'bptt[plot]') and/or JSON. See bptt/diagnostics.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from bptt import checks
from bptt.data import encode
from bptt.diagnostics import gradient_flow, plot, summary
from bptt.storage.saved_model import load_model, saved_unit

EXAMPLES = """examples:
  bptt diagnose --model m --text ptb.valid.txt --out grad_flow.png
  bptt diagnose --model m --text ptb.valid.txt --lags 50 --positions 256 --json > flow.json
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--text", required=True, help="a text to take the positions from (.txt or .gz)")
    parser.add_argument("--lags", type=int, default=35, metavar="K", help="lags 0..K (default 35)")
    parser.add_argument("--positions", type=int, default=64, metavar="N",
                        help="positions (windows) of the text averaged over (default 64)")
    parser.add_argument("--warmup", type=int, default=50, metavar="W",
                        help="tokens read before each window, from the zero state (default 50)")
    parser.add_argument("--out", metavar="PNG", help="write the plot here")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def run(args) -> int:
    checks.positive_int("--lags", args.lags)
    checks.integer("--positions", args.positions, 1, 100_000)  # each is a backward of --lags steps
    checks.integer("--lags", args.lags, 1, 100_000)
    checks.non_negative_int("--warmup", args.warmup)
    if args.out is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--out: plotting needs matplotlib (pip install 'bptt[plot]')")
    model, vocab, config = load_model(args.model, args.device)
    corpus = encode(args.text, vocab, saved_unit(config, vocab))
    result = gradient_flow(model, corpus.ids, lags=args.lags, positions=args.positions, warmup=args.warmup)
    result["text"] = corpus.path
    if args.out is not None:
        plot(result, args.out, title=os.path.basename(os.path.normpath(args.model)))
    if args.json:
        print(json.dumps(result))
    else:
        print(summary(result))
    if args.out is not None:
        print(f"plot written to {args.out}", file=sys.stderr)
    return 0
