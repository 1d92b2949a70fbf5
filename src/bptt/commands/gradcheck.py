"""`bptt gradcheck`: check the explicit BPTT gradients of every (F, f, loss) combination, the tied model,
the factorized output layers and the direct connections against finite differences, the independent
autograd model (bptt.oracle), RTRL and truncated autograd (bptt.verify). Exit status 1 if any entry is
over its threshold.

Finite differences and autograd are the independent references. RTRL is not: it runs the same cell F′
and output-layer code as BPTT, so it checks the propagation through time only (a wrong F′ or
output-layer gradient passes against it); the output layers' rows rest on finite differences.
"""

from __future__ import annotations

import argparse

from bptt import checks
from bptt.model import resolve_dtype
from bptt.verify import (
    DIRECT_OUTPUTS,
    FACTORIZED_OUTPUTS,
    THRESHOLDS,
    CheckRow,
    check_combination,
    check_output_layer,
    combinations,
    direct_size,
)

EXAMPLES = """examples:
  bptt gradcheck                              # every combination, float64, small random model
  bptt gradcheck --hidden 8 --vocab 12 --steps 10 --batch 4 --seed 3
  bptt gradcheck --dtype float32 --bias off   # float32 engine (looser thresholds)
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


def _validate(args: argparse.Namespace) -> None:
    for option in ("vocab", "hidden", "steps", "batch"):
        checks.positive_int(f"--{option}", getattr(args, option))
    checks.integer("--truncation", args.truncation, minimum=-1, what="an integer >= 0 (or -1 to skip)")
    if args.hidden > 12 or args.vocab > 64:
        raise ValueError("--hidden <= 12 and --vocab <= 64: RTRL and finite differences are for small models")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    dtype = resolve_dtype(args.dtype)
    thresholds = THRESHOLDS[dtype]
    truncation = None if args.truncation < 0 else args.truncation
    biases = {"on": (True,), "off": (False,), "both": (True, False)}[args.bias]
    columns = ["fd", "autograd", "rtrl"] + (["trunc"] if truncation is not None else [])
    titles = {"fd": "finite diff", "autograd": "autograd", "rtrl": "RTRL", "trunc": f"trunc k={truncation}"}
    print(
        f"bptt gradcheck: V={args.vocab} m={args.hidden} T={args.steps} B={args.batch} dtype={args.dtype} "
        f"seed={args.seed}; max relative error of the BPTT gradient"
    )
    print("thresholds: " + ", ".join(f"{titles[c]} <= {thresholds[c]:.0e}" for c in columns))
    header = f"{'combination':<52} {'param':<5} " + " ".join(f"{titles[c]:>12}" for c in columns)
    print(header)
    print("-" * len(header))
    failures = checks = 0
    sizes = dict(vocab=args.vocab, hidden=args.hidden, steps=args.steps, batch=args.batch, dtype=dtype, seed=args.seed)
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
    for row in rows:
        cells = []
        for c in columns:
            if c not in row.errors:  # no such reference for this layer
                cells.append(f"{'-':>11} ")
                continue
            error = row.errors[c]
            bad = not error <= thresholds[c]  # NaN counts as a failure
            failures += bad
            checks += 1
            cells.append(f"{error:>11.2e}{'!' if bad else ' '}")
        print(f"{row.combination:<52} {row.parameter:<5} " + " ".join(cells))
    if failures:
        print(f"FAILED: {failures} of {checks} checks over threshold (marked !)")
        return 1
    print(f"all {checks} checks passed")
    return 0
