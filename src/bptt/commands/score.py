"""`bptt score`: the log10 (or ln) probability of every line of a text, each sentence from a fresh
state with <eos> as its history (rnnlm -nbest style), <eos> included; a summary on stderr.

With --data DATA --split S, the sentences of a split of `bptt prepare`'s DATA (memory-mapped: a test
set of any size), which must have been prepared with the model's vocabulary.
"""

from __future__ import annotations

import json
import sys

from bptt import interpolation
from bptt.commands import sources
from bptt.data import encode, read_lines
from bptt.scoring import score_corpus, token_ln_probs
from bptt.storage.saved_model import load_model, saved_unit

EXAMPLES = """examples:
  bptt score --model m --text nbest.txt > scores.txt
  bptt score --model m --text test.txt --ln
  bptt score --model m --text test.txt --json
  bptt score --model m --data ptb-data --split test    # a split of bptt prepare's DATA
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--text", help="sentences to score, one per line (.txt or .gz)")
    parser.add_argument("--data", metavar="DATA", help="instead of --text: a directory written by bptt prepare "
                        "with the model's vocabulary")
    parser.add_argument("--split", choices=("train", "valid", "test"), default=None,
                        help="with --data: the split to score (default test)")
    parser.add_argument("--ln", action="store_true", help="natural logarithms instead of log10")
    parser.add_argument(
        "--json", action="store_true",
        help="one JSON object per line: sentence (1-based, over non-blank lines), tokens, oov (null for a DATA "
        "prepared before per-sentence counts were kept), log10_prob (ln_prob with --ln)",
    )
    interpolation.add_arguments(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def run(args) -> int:
    text = sources.check_source(args, "text")
    interpolation.check_arguments(args)  # the option errors, before the model is loaded
    model, vocab, config = load_model(args.model, args.device)
    unit = saved_unit(config, vocab)
    corpus = sources.load_source(args, text, vocab, unit)

    def valid_ln_probs(path):  # --lambda auto: bptt's tokens of the validation text, sentence by sentence
        return token_ln_probs(model, encode(path, vocab, unit)), read_lines(path, unit)

    sentences = interpolation.text_sentences(args.text, unit) if args.ngram is not None else None
    other = interpolation.from_arguments(args, corpus.tokens, sentences, valid_ln_probs)
    result = score_corpus(model, corpus, other)
    scores = result.ln_probs if args.ln else result.log10_probs
    key = "ln_prob" if args.ln else "log10_prob"
    lines = []
    for i, score in enumerate(scores.tolist()):
        if args.json:
            oov = None if result.oov is None else int(result.oov[i])
            record = {"sentence": i + 1, "tokens": int(result.tokens[i]), "oov": oov}
            lines.append(json.dumps({**record, key: score}))
        else:
            lines.append(f"{score:.6f}")
    sys.stdout.write("\n".join(lines) + "\n")
    total_log10 = float(result.log10_probs.sum())
    print(
        f"{result.path}: {len(scores)} lines, {result.total_tokens} tokens, {result.total_oov} OOV, "
        f"total log10 prob {total_log10:.4f}, perplexity {result.perplexity:.2f}"
        + (f"; interpolated with {other.path}, lambda {other.lam:.6g}" if other is not None else ""),
        file=sys.stderr,
    )
    return 0
