"""`bptt eval`: perplexity, entropy (bits per token), tokens and OOV rate of a text under a model.

The text is scored as one stream from <eos> (bptt.evaluation); every <eos> counts as a token. With
--dynamic, rnnlm's dynamic evaluation: each block is scored, then the model takes one SGD step on it
(the saved model is not changed). With --data DATA --split S, a split of a directory written by
`bptt prepare` (memory-mapped) instead of a text: the same numbers as evaluating its text.
"""

from __future__ import annotations

import json

from bptt import interpolation
from bptt.data import EOS, CorpusError, encode, read_lines
from bptt.evaluation import evaluate_corpus, stream_token_ln_probs
from bptt.prepared import SPLITS, VOCAB_FILE, load_prepared
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
    if (args.test is None) == (args.data is None):
        raise ValueError("bptt eval needs --test F or --data DATA" if args.test is None
                         else "--data: give either --test F or --data DATA, not both")
    if args.split is not None and args.data is None:
        raise ValueError("--split: only with --data DATA")
    interpolation.check_arguments(args)  # the option errors, before the model is loaded
    if args.lam is not None and args.dynamic is not None:
        raise ValueError("--dynamic does not combine with --lm-prob or --ngram (the interpolated model is not trained)")
    if args.ngram is not None and args.data is not None:
        raise ValueError("--ngram reads the words of the text: give --test F, not --data")
    model, vocab, config = load_model(args.model, args.device)
    if args.data is not None:
        prepared = load_prepared(args.data)
        if prepared.vocab.words != vocab.words or prepared.unit != saved_unit(config, vocab):
            raise CorpusError(prepared.path / VOCAB_FILE, f"is not the vocabulary of the model {args.model} (prepared "
                              "from other texts or options): evaluate its text with --test instead")
        corpus = prepared.split(args.split or "test")
    else:
        corpus = encode(args.test, vocab, saved_unit(config, vocab))
    def valid_ln_probs(path):  # --lambda auto: bptt's tokens of the validation text, read as one stream
        valid = encode(path, vocab, unit)
        return stream_token_ln_probs(model, valid.ids, vocab.id(EOS)), read_lines(path, unit)

    unit = saved_unit(config, vocab)
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
