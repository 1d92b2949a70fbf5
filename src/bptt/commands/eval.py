"""`bptt eval`: perplexity, entropy (bits per token), tokens and OOV rate of a text under a model.

The text is scored as one stream from <eos> (bptt.evaluation); every <eos> counts as a token. With
--dynamic, rnnlm's dynamic evaluation: each block is scored, then the model takes one SGD step on it
(the saved model is not changed). With --data DATA --split S, a split of a directory written by
`bptt prepare` (memory-mapped) instead of a text: the same numbers as evaluating its text.
"""

from __future__ import annotations

import json

from bptt import interpolation
from bptt.commands import sources
from bptt.data import EOS, encode, read_lines
from bptt.evaluation import evaluate_corpus, stream_token_ln_probs
from bptt.prepared import SPLITS
from bptt.storage.saved_model import load_model, saved_unit

EXAMPLES = """examples:
  bptt eval --model m --test ptb.test.txt
  bptt eval --model m --test ptb.test.txt --json
  bptt eval --model m --test ptb.test.txt --dynamic 0.01    # rnnlm -dynamic: learn from the text as it is read
  bptt eval --model m --data ptb-data --split test          # a split of bptt prepare's DATA: the same numbers
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--test", help="text to evaluate, one sentence per line (.txt or .gz)")
    parser.add_argument("--data", metavar="DATA", help="instead of --test: a directory written by bptt prepare "
                        "with the model's vocabulary")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="with --data: the split to evaluate (default test)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    interpolation.add_arguments(parser)
    parser.add_argument("--dynamic", type=float, default=None, metavar="LR",
                        help="dynamic evaluation (rnnlm -dynamic): after scoring each block, one SGD step on it "
                        "with rate LR per token; the saved model is not changed")
    parser.add_argument("--dynamic-block", type=int, default=35, metavar="K",
                        help="tokens per dynamic update, back-propagated through (default 35)")


def run(args) -> int:
    text = sources.check_source(args, "test")
    interpolation.check_arguments(args)  # the option errors, before the model is loaded
    if args.lam is not None and args.dynamic is not None:
        raise ValueError("--dynamic does not combine with --lm-prob or --ngram (the interpolated model is not trained)")
    model, vocab, config = load_model(args.model, args.device)
    unit = saved_unit(config, vocab)
    corpus = sources.load_source(args, text, vocab, unit)

    def valid_ln_probs(path):  # --lambda auto: bptt's tokens of the validation text, read as one stream
        valid = encode(path, vocab, unit)
        return stream_token_ln_probs(model, valid.ids, vocab.id(EOS)), read_lines(path, unit)

    sentences = interpolation.text_sentences(args.test, unit) if args.ngram is not None else None
    other = interpolation.from_arguments(args, corpus.tokens, sentences, valid_ln_probs)
    result = evaluate_corpus(model, corpus, vocab, args.dynamic, args.dynamic_block, other)
    dynamic = {} if args.dynamic is None else {"dynamic_lr": args.dynamic, "dynamic_block": args.dynamic_block}
    if args.json:
        mixed = {} if other is None else {"interpolated_with": other.path, "lambda": other.lam}
        print(json.dumps({**result.to_json(), **dynamic, **mixed}))
    else:
        print(
            f"{corpus.path}: perplexity {result.perplexity:.2f}, entropy {result.entropy_bits:.4f} bits/token, "
            f"{result.tokens} tokens, {result.oov} OOV ({100 * result.oov / result.tokens:.2f} %)"
            + (f"; dynamic evaluation, rate {args.dynamic:g}, blocks of {args.dynamic_block}" if dynamic else "")
            + (f"; interpolated with {other.path}, lambda {other.lam:.6g}" if other is not None else "")
        )
    return 0
