"""`bptt gradcheck`: check the explicit BPTT gradients of every (F, f, loss) combination, the tied model,
the factorized output layers and the direct connections against finite differences, the independent
autograd model (bptt.oracle), RTRL and truncated autograd (bptt.verify). Exit status 1 if any entry is
over its threshold.

Finite differences and autograd are the independent references. RTRL is not: it runs the same cell F′
and output-layer code as BPTT, so it checks the propagation through time only (a wrong F′ or
output-layer gradient passes against it); the output layers' rows rest on finite differences.

With --cell, --layers N > 1 or --dropout p > 0 it checks that model configuration instead (Elman, LSTM
or GRU layers, full softmax, cross-entropy): every parameter against finite differences and the
autograd model of the stack, truncated BPTT against truncated autograd, and BPTT(k1, k2) against
autograd over each block's window; with biases and without, for each input side (no embedding, an
embedding, the tied embedding), with dropout masks drawn once and frozen (bptt.verify.check_model).
"""

from __future__ import annotations

import argparse

import torch

from bptt import checks
from bptt.model import resolve_dtype
from bptt.verify import (
    DIRECT_OUTPUTS,
    FACTORIZED_OUTPUTS,
    MODEL_CELLS,
    THRESHOLDS,
    CheckRow,
    bptt_blocks,
    check_combination,
    check_model,
    check_output_layer,
    combinations,
    direct_size,
    embedding_variants,
)

MAX_LAYERS = 4  # finite differences of every weight: small stacks only

EXAMPLES = """examples:
  bptt gradcheck                              # every combination, float64, small random model
  bptt gradcheck --hidden 8 --vocab 12 --steps 10 --batch 4 --seed 3
  bptt gradcheck --dtype float32 --bias off   # float32 engine (looser thresholds)
  bptt gradcheck --cell lstm --layers 2        # a 2-layer LSTM: no embedding, an embedding, tied
  bptt gradcheck --cell gru --dropout 0.3      # a GRU with frozen dropout masks
  bptt gradcheck --layers 3 --truncation 1     # a 3-layer Elman stack, truncated BPTT with k = 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=7, help="vocabulary size V (default 7)")
    parser.add_argument("--hidden", type=int, default=5, help="hidden size m (default 5)")
    parser.add_argument("--steps", type=int, default=6, help="time steps T (default 6)")
    parser.add_argument("--batch", type=int, default=3, help="parallel streams B (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="engine dtype (default float64)")
    parser.add_argument("--bias", choices=("on", "off", "both"), default="both", help="check with biases, without, or both")
    parser.add_argument(
        "--truncation", type=int, default=2,
        help="also check truncated BPTT with this k against truncated autograd (default 2; -1 skips)",
    )
    parser.add_argument(
        "--cell", choices=MODEL_CELLS, default=None,
        help="check the model of this cell (with --layers, --dropout) instead of the seed's Elman combinations",
    )
    parser.add_argument("--layers", type=int, default=1,
                        help=f"stacked layers of the model checked (1 to {MAX_LAYERS}; default 1; > 1 checks a model)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout rate of the model checked, masks frozen (default 0; > 0 checks a model)")


def _validate(args: argparse.Namespace) -> None:
    for option in ("vocab", "hidden", "steps", "batch"):
        checks.positive_int(f"--{option}", getattr(args, option))
    for option in ("steps", "batch"):  # finite differences over a small model: more is only slower
        checks.integer(f"--{option}", getattr(args, option), 1, 1000)
    checks.integer("--truncation", args.truncation, minimum=-1, what="an integer >= 0 (or -1 to skip)")
    if args.hidden > 12 or args.vocab > 64:
        raise ValueError("--hidden <= 12 and --vocab <= 64: RTRL and finite differences are for small models")
    checks.integer("--layers", args.layers, 1, MAX_LAYERS)
    checks.number("--dropout", args.dropout, 0, 1, high_open=True)


def _model_mode(args: argparse.Namespace) -> bool:
    """A model configuration is checked (not the seed's combinations) with --cell, --layers > 1 or --dropout > 0."""
    return args.cell is not None or args.layers > 1 or args.dropout > 0


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if _model_mode(args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: on a busy machine OpenMP's hand-offs cost milliseconds each
        try:
            return _run_model(args)
        finally:
            torch.set_num_threads(threads)
    thresholds, truncation, biases, sizes = _shared_options(args)
    columns = ["fd", "autograd", "rtrl"] + (["trunc"] if truncation is not None else [])
    titles = {"fd": "finite diff", "autograd": "autograd", "rtrl": "RTRL", "trunc": f"trunc k={truncation}"}
    _header(args, "", columns, titles, thresholds)
    rows: list[CheckRow] = []
    for bias in biases:
        for F, f, loss in combinations():
            rows += check_combination(F, f, loss, bias=bias, truncation=truncation, **sizes)
        rows += check_combination("tanh", "softmax", "cross_entropy", bias=bias, truncation=truncation, tied=True,
                                  **sizes)  # U ≡ Vᵀ (--tie)
        for output in FACTORIZED_OUTPUTS:
            rows += check_output_layer(output, bias=bias, **sizes)
        for output in DIRECT_OUTPUTS:
            rows += check_output_layer(output, bias=bias, direct=direct_size(args.vocab), **sizes)
    return _report(rows, columns, titles, thresholds, "combination")


def _run_model(args: argparse.Namespace) -> int:
    """The checks of one model configuration (check_model), every input side and bias setting."""
    thresholds, truncation, biases, sizes = _shared_options(args)
    cell = args.cell or "elman"
    k1, k2 = bptt_blocks(args.steps)
    columns = ["fd", "autograd"] + (["trunc"] if truncation is not None else []) + ["k1k2"]
    titles = {"fd": "finite diff", "autograd": "autograd", "trunc": f"trunc k={truncation}", "k1k2": f"BPTT({k1},{k2})"}
    _header(args, f"cell={cell} layers={args.layers} dropout={args.dropout:g} ", columns, titles, thresholds)
    rows: list[CheckRow] = []
    for bias in biases:
        for variant, embedding_size, tied in embedding_variants(cell, args.hidden):
            label = f"cell={cell} L={args.layers} {variant} dropout={args.dropout:g}"
            rows += check_model(cell, layers=args.layers, dropout=args.dropout, embedding_size=embedding_size,
                                tied=tied, bias=bias, truncation=truncation, label=label, **sizes)
    return _report(rows, columns, titles, thresholds, "model")


def _shared_options(args: argparse.Namespace) -> tuple[dict[str, float], int | None, tuple[bool, ...], dict]:
    """What both kinds of check read from the options: the dtype's thresholds, the truncation (None: full),
    the bias settings, and the sizes every check takes (vocab, hidden, steps, batch, dtype, seed)."""
    dtype = resolve_dtype(args.dtype)
    truncation = None if args.truncation < 0 else args.truncation
    biases = {"on": (True,), "off": (False,), "both": (True, False)}[args.bias]
    sizes = dict(vocab=args.vocab, hidden=args.hidden, steps=args.steps, batch=args.batch, dtype=dtype, seed=args.seed)
    return THRESHOLDS[dtype], truncation, biases, sizes


def _header(args: argparse.Namespace, what: str, columns: list[str], titles: dict[str, str],
            thresholds: dict[str, float]) -> None:
    """The two lines above the table: what is checked, with which sizes, and each column's threshold."""
    print(f"bptt gradcheck: {what}V={args.vocab} m={args.hidden} T={args.steps} B={args.batch} dtype={args.dtype} "
          f"seed={args.seed}; max relative error of the BPTT gradient")
    print("thresholds: " + ", ".join(f"{titles[c]} <= {thresholds[c]:.0e}" for c in columns))


def _report(rows: list[CheckRow], columns: list[str], titles: dict[str, str], thresholds: dict[str, float],
            first: str) -> int:
    """The table of rows (a '-' where a row has no such reference), then the verdict: exit status 1 if
    any entry is over its threshold (NaN included), else 0."""
    label_width = max(len(first), *(len(row.combination) for row in rows))
    param_width = max(len("param"), *(len(row.parameter) for row in rows))
    header = f"{first:<{label_width}} {'param':<{param_width}} " + " ".join(f"{titles[c]:>12}" for c in columns)
    print(header)
    print("-" * len(header))
    failures = count = 0
    for row in rows:
        cells = []
        for c in columns:
            if c not in row.errors:  # no such reference for this row
                cells.append(f"{'-':>11} ")
                continue
            error = row.errors[c]
            bad = not error <= thresholds[c]  # NaN counts as a failure
            failures += bad
            count += 1
            cells.append(f"{error:>11.2e}{'!' if bad else ' '}")
        print(f"{row.combination:<{label_width}} {row.parameter:<{param_width}} " + " ".join(cells))
    if failures:
        print(f"FAILED: {failures} of {count} checks over threshold (marked !)")
        return 1
    print(f"all {count} checks passed")
    return 0
