"""`bptt eval`: perplexity, entropy (bits per token), tokens and OOV rate of a text under a model.

The text is scored as one stream from <eos> (bptt.evaluation); every <eos> counts as a token. With
--dynamic, rnnlm's dynamic evaluation: each block is scored, then the model takes one SGD step on it
(the saved model is not changed).
"""

from __future__ import annotations

import json

from bptt.data import encode
from bptt.evaluation import evaluate_corpus
from bptt.storage.saved_model import load_model, saved_unit

EXAMPLES = """examples:
  bptt eval --model m --test ptb.test.txt
  bptt eval --model m --test ptb.test.txt --json
  bptt eval --model m --test ptb.test.txt --dynamic 0.01    # rnnlm -dynamic: learn from the text as it is read
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--test", required=True, help="text to evaluate, one sentence per line (.txt or .gz)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dynamic", type=float, default=None, metavar="LR",
                        help="dynamic evaluation (rnnlm -dynamic): after scoring each block, one SGD step on it "
                        "with rate LR per token; the saved model is not changed")
    parser.add_argument("--dynamic-block", type=int, default=35, metavar="K",
                        help="tokens per dynamic update, back-propagated through (default 35)")


def run(args) -> int:
    model, vocab, config = load_model(args.model, args.device)
    corpus = encode(args.test, vocab, saved_unit(config, vocab))
    result = evaluate_corpus(model, corpus, vocab, args.dynamic, args.dynamic_block)
    dynamic = {} if args.dynamic is None else {"dynamic_lr": args.dynamic, "dynamic_block": args.dynamic_block}
    if args.json:
        print(json.dumps({**result.to_json(), **dynamic}))
    else:
        print(
            f"{corpus.path}: perplexity {result.perplexity:.2f}, entropy {result.entropy_bits:.4f} bits/token, "
            f"{result.tokens} tokens, {result.oov} OOV ({100 * result.oov / result.tokens:.2f} %)"
            + (f"; dynamic evaluation, rate {args.dynamic:g}, blocks of {args.dynamic_block}" if dynamic else "")
        )
    return 0
