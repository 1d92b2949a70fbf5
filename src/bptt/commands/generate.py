"""`bptt generate`: sample text from a model — temperature, top-k, a prompt; one sentence per line.

The history starts at <eos>, followed by the prompt; deterministic for a given --seed (bptt.sampling).
"""

from __future__ import annotations

from bptt.sampling import check_sampling_options, format_text, sample
from bptt.storage.saved_model import load_model, saved_unit

EXAMPLES = """examples:
  bptt generate --model m
  bptt generate --model m --words 200 --temperature 0.8 --top-k 20 --seed 7
  bptt generate --model m --prompt "the company said" --top-k 1
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--words", type=int, default=50, help="tokens to sample, <eos> included (default 50)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature > 0 (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely words only")
    parser.add_argument("--prompt", default="", help="text that the sample continues (printed first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def run(args) -> int:
    # the cheap checks first, before loading the model
    check_sampling_options(args.words, args.temperature, args.top_k)
    model, vocab, config = load_model(args.model, args.device)
    unit = saved_unit(config, vocab)
    prompt = list(args.prompt.strip()) if unit == "char" else args.prompt.split()
    try:
        words = sample(model, vocab, args.words, args.temperature, args.top_k, prompt, args.seed)
    except ValueError as e:
        raise ValueError(f"{args.model}: {e}") from None
    text = format_text(prompt + words, unit)
    if text:
        print(text)
    return 0
