"""`bptt score`: the log10 (or ln) probability of every line of a text, each sentence from a fresh
state with <eos> as its history (rnnlm -nbest style), <eos> included; a summary on stderr.
"""

from __future__ import annotations

import json
import sys

from bptt.scoring import score_file
from bptt.storage.saved_model import load_model, saved_unit

EXAMPLES = """examples:
  bptt score --model m --text nbest.txt > scores.txt
  bptt score --model m --text test.txt --ln
  bptt score --model m --text test.txt --json
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--text", required=True, help="sentences to score, one per line (.txt or .gz)")
    parser.add_argument("--ln", action="store_true", help="natural logarithms instead of log10")
    parser.add_argument(
        "--json", action="store_true",
        help="one JSON object per line: sentence (1-based, over non-blank lines), tokens, oov, "
        "log10_prob (ln_prob with --ln)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def run(args) -> int:
    model, vocab, config = load_model(args.model, args.device)
    unit = saved_unit(config, vocab)
    result = score_file(model, vocab, args.text, unit)
    scores = result.ln_probs if args.ln else result.log10_probs
    key = "ln_prob" if args.ln else "log10_prob"
    lines = []
    for i, score in enumerate(scores.tolist()):
        if args.json:
            record = {"sentence": i + 1, "tokens": int(result.tokens[i]), "oov": int(result.oov[i])}
            lines.append(json.dumps({**record, key: score}))
        else:
            lines.append(f"{score:.6f}")
    sys.stdout.write("\n".join(lines) + "\n")
    total_log10 = float(result.log10_probs.sum())
    print(
        f"{result.path}: {len(scores)} lines, {result.total_tokens} tokens, {result.total_oov} OOV, "
        f"total log10 prob {total_log10:.4f}, perplexity {result.perplexity:.2f}",
        file=sys.stderr,
    )
    return 0
