"""`bptt prepare`: encode the training, validation and test texts once into a directory that
`bptt train --data` and `bptt eval --data` read as memory maps.

The texts (.txt or .gz) are streamed: the training text's vocabulary is counted (as `bptt train`
counts it: --unit, --min-count, --max-vocab), then each text is encoded chunk by chunk into
DATA/{train,valid,test}.ids (little-endian uint32 token ids, `<eos>` closing every line, exactly the
ids `bptt train --train` would use) and .starts (int64 sentence starts), with DATA/vocab.json and
DATA/meta.json (sizes and sha256 of every file and of the sources). Memory stays bounded whatever the
size of the texts. The directory appears complete or not at all: it is built beside DATA and renamed
into place at the end (library: bptt.prepared).
"""

from __future__ import annotations

import argparse

from bptt.prepared import prepare

EXAMPLES = """examples:
  bptt prepare --train ptb.train.txt --valid ptb.valid.txt --test ptb.test.txt --out ptb-data
  bptt prepare --train big.train.txt.gz --valid big.valid.txt.gz --out big-data --min-count 3 --max-vocab 100000
  bptt train --data ptb-data --model m        # the same model as --train ptb.train.txt --valid ptb.valid.txt
  bptt eval --model m --data ptb-data --split test
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True,
                        help="training text, one sentence per line (.txt or .gz); the vocabulary is counted on it")
    parser.add_argument("--valid", required=True, help="validation text")
    parser.add_argument("--test", default=None, help="test text (optional)")
    parser.add_argument("--out", required=True, metavar="DATA", help="output directory (must not exist or be empty)")
    parser.add_argument("--unit", choices=("word", "char"), default="word", help="tokens: words or characters")
    parser.add_argument("--min-count", type=int, default=1, help="rarer words map to <unk>")
    parser.add_argument("--max-vocab", type=int, default=None, help="keep at most N entries (incl. <eos>, <unk>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    parser.add_argument("--force", action="store_true",
                        help="replace a DATA written by an earlier bptt prepare (anything else is refused)")


def run(args: argparse.Namespace) -> int:
    result = prepare(args.out, args.train, args.valid, args.test, unit=args.unit, min_count=args.min_count,
                     max_vocab=args.max_vocab, force=args.force, progress=not args.quiet)
    if not args.quiet:
        meta, seconds = result.meta, max(result.seconds, 1e-9)
        splits = "; ".join(f"{name} {s['tokens']:,} tokens, {s['oov']:,} OOV" for name, s in meta["splits"].items())
        print(f"{result.path}: vocabulary {meta['vocab']['size']:,} entries; {splits}; {seconds:.1f} s "
              f"({result.tokens / seconds:,.0f} tokens/s, {result.bytes_read / seconds / 1e6:.1f} MB/s of text read)")
    return 0
