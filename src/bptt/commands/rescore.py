"""`bptt rescore`: rescore a speech recognizer's n-best lists with a model (rnnlm, Kaldi or SRILM format 3),
one output line per input line, in order, written as each utterance is scored; OOV and token counts on
stderr. Every hypothesis scores `</s>` too. See bptt/rescoring.py for the formats and the state rules.

Output per format:
  rnnlm   one log10 P per line (rnnlm -nbest)
  kaldi   `uttid-k cost`, cost = −ln P (Kaldi's compute_sentence_scores); --per-word: `uttid-k c1 … c(n+1)`,
          the −ln cost of every token (for lattice rescoring scripts)
  srilm3  the input line with its lscore replaced by lm_weight · log10 P + word_penalty · nwords (by default
          the new log10 P)

The whole input (and the --lm-prob file) is checked before anything is scored: a malformed line is one
error naming the file and line, exit 2, and nothing is written.
"""

from __future__ import annotations

import math
import sys

from bptt import interpolation
from bptt.data import encode, read_lines
from bptt.rescoring import CARRY, FORMATS, Rescorer, count_tokens, parse_nbest, read_scores, utterances
from bptt.scoring import token_ln_probs
from bptt.storage.saved_model import load_model, saved_unit

EXAMPLES = """examples:
  bptt rescore --model m --nbest nbest.txt --format rnnlm > scores.txt
  bptt rescore --model m --nbest nbest.txt --format rnnlm --carry first --oov-logprob -5
  bptt rescore --model m --nbest nbest.txt --format kaldi --carry best --scores decoder_scores.txt
  bptt rescore --model m --nbest nbest.txt --format kaldi --per-word > costs.txt
  bptt rescore --model m --nbest utt1.nbest --format srilm3 --lm-weight 12 --word-penalty -0.5
  bptt rescore --model m --nbest nbest.txt --format rnnlm --lm-prob ngram.probs --lambda 0.5
  bptt rescore --model m --nbest nbest.txt --format kaldi --ngram 5gram.arpa --lambda auto --lambda-valid valid.txt
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--nbest", required=True, help="the n-best list (.txt or .gz), one hypothesis per line")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the n-best format (see above)")
    parser.add_argument("--carry", choices=CARRY, default="none",
                        help="the state a hypothesis starts from: none (zero, default), first (rnnlm's: after the "
                        "previous utterance's first hypothesis), best (after its best one)")
    parser.add_argument("--scores", metavar="F", help="with --carry best: one score per hypothesis (a line each, in "
                        "order, higher is better, e.g. the decoder's total log-likelihood) that picks the best one")
    parser.add_argument("--oov-logprob", type=float, default=None, metavar="X",
                        help="score words outside the vocabulary at log10 probability X (rnnlm's -5 style; "
                        "default: the model's <unk> probability)")
    parser.add_argument("--per-word", action="store_true", help="kaldi: the −ln cost of every token, </s> included")
    parser.add_argument("--lm-weight", type=float, default=1.0, help="srilm3: the weight of the new log10 P (default 1)")
    parser.add_argument("--word-penalty", type=float, default=0.0,
                        help="srilm3: added per word to the weighted LM score (default 0)")
    interpolation.add_arguments(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


MAX_WEIGHT = 1e6  # |--lm-weight|, |--word-penalty|: recognisers use units to tens


def run(args) -> int:
    if args.scores is not None and args.carry != "best":
        raise ValueError("--scores: only with --carry best (it picks the hypothesis whose state is carried)")
    if args.per_word and args.format != "kaldi":
        raise ValueError("--per-word: only with --format kaldi")
    if (args.lm_weight != 1.0 or args.word_penalty != 0.0) and args.format != "srilm3":
        raise ValueError("--lm-weight and --word-penalty: only with --format srilm3")
    for option, value in (("--lm-weight", args.lm_weight), ("--word-penalty", args.word_penalty)):
        if not (math.isfinite(value) and abs(value) <= MAX_WEIGHT):  # the new lscore stays a finite number
            raise ValueError(f"{option} must be a finite number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, got {value}")
    interpolation.check_arguments(args)  # the option errors, before the model is loaded
    if args.oov_logprob is not None and not (math.isfinite(args.oov_logprob) and args.oov_logprob <= 0):
        raise ValueError(f"--oov-logprob must be a finite log10 probability <= 0, got {args.oov_logprob}")
    model, vocab, config = load_model(args.model, args.device)
    unit = saved_unit(config, vocab)
    hyps = parse_nbest(args.nbest, args.format)  # the whole input checked before anything is written
    def valid_ln_probs(path):  # --lambda auto: bptt's tokens of the validation text, sentence by sentence
        return token_ln_probs(model, encode(path, vocab, unit)), read_lines(path, unit)

    if args.ngram is not None:
        interpolation.require_words(unit)
    other = interpolation.from_arguments(args, count_tokens(hyps, unit), lambda: (h.words for h in hyps),
                                         valid_ln_probs)
    given = None if args.scores is None else read_scores(args.scores, len(hyps))
    rescorer = Rescorer(model, vocab, unit, args.carry, args.oov_logprob, other)
    n_utterances = done = 0
    for group in utterances(hyps):
        n_utterances += 1
        picks = None if given is None else given[done : done + len(group)]
        done += len(group)
        scores = rescorer.score_utterance(group, args.lm_weight, args.word_penalty, picks)
        lines = []
        for hyp, ln_p in zip(group, scores):
            total = float(ln_p.sum())
            if args.format == "rnnlm":
                lines.append(f"{total / math.log(10):.6f}")
            elif args.format == "kaldi" and args.per_word:
                lines.append(hyp.key + " " + " ".join(f"{-v:.6f}" for v in ln_p.tolist()))
            elif args.format == "kaldi":
                lines.append(f"{hyp.key} {-total:.6f}")
            else:
                lscore = args.lm_weight * total / math.log(10) + args.word_penalty * len(hyp.words)
                lines.append(" ".join([hyp.fields[0], f"{lscore:.6f}", hyp.fields[2], *hyp.words]))
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    oov_rule = "the model's <unk>" if args.oov_logprob is None else f"log10 {args.oov_logprob:g}"
    mixed = "" if other is None else f"; interpolated with {other.path}, lambda {other.lam:.6g}"
    print(f"{args.nbest}: {len(hyps)} hypotheses, {n_utterances} utterance{'' if n_utterances == 1 else 's'}, "
          f"{rescorer.tokens} tokens (</s> included), {rescorer.oov} OOV (scored as {oov_rule}); carry {args.carry}{mixed}", file=sys.stderr)
    return 0
