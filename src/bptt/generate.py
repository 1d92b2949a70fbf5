"""Sample text from a trained model: temperature, top-k, an optional prompt.

The history starts at <eos> (a sentence start), followed by the prompt. Output: the prompt, then the
sampled words, one sentence per line (every sampled <eos> ends a line). Deterministic for a given
--seed. --temperature below 1 sharpens the distribution, above 1 flattens it; --top-k K samples among
the K most likely words only (--top-k 1 is greedy argmax decoding).
"""

from __future__ import annotations

import math

import torch

from bptt.data import EOS, Vocab
from bptt.model import ElmanLM

EXAMPLES = """examples:
  bptt generate --model m
  bptt generate --model m --words 200 --temperature 0.8 --top-k 20 --seed 7
  bptt generate --model m --prompt "the company said" --top-k 1
"""


MAX_WORDS = 10_000_000  # the sampled tokens are held in memory (a list of strings)


def check_sampling_options(words: int, temperature: float, top_k: int | None) -> None:
    """A ValueError naming the option for a --words outside [0, MAX_WORDS], a non-positive or
    non-finite --temperature, or a --top-k below 1."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be a positive finite number, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {top_k}")
    if words < 0:
        raise ValueError(f"--words must be >= 0, got {words}")
    if words > MAX_WORDS:
        raise ValueError(f"--words must be at most {MAX_WORDS:,}, got {words:,}")


@torch.no_grad()
def sample(
    model: ElmanLM,
    vocab: Vocab,
    words: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    prompt: list[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """Sample `words` tokens after the history <eos> + prompt; returns them (<eos> marks sentence ends).

    P(w) ∝ exp(log P(w | history) / temperature), restricted to the top_k most likely words if given.
    Deterministic for a given seed (a private CPU generator).
    """
    check_sampling_options(words, temperature, top_k)
    generator = torch.Generator().manual_seed(int(seed))
    history = [vocab.id(EOS)] + [vocab.id(w) for w in (prompt or [])]
    h = model.initial_state(1)
    x = torch.tensor(history, device=model.device).unsqueeze(1)  # (T,1)
    S = model.forward(x, h)
    h = S[-1]
    last, context = x[-1:], model.next_context(x[:-1])  # direct connections: the word just read, the ones before
    out: list[str] = []
    for _ in range(words):
        direct = model.output_features(last, context)
        log_p = model.output.log_probs(model.params, h, **direct).squeeze(0).double().cpu() / temperature
        if top_k is not None and top_k < log_p.numel():
            threshold = torch.topk(log_p, top_k).values[-1]
            log_p = log_p.masked_fill(log_p < threshold, float("-inf"))
        probs = torch.softmax(log_p, 0)
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("the model's probabilities are not finite (NaN or infinity): its weights overflow")
        word = int(torch.multinomial(probs, 1, generator=generator))
        out.append(vocab.words[word])
        context = model.next_context(last, context)
        last = torch.tensor([[word]], device=model.device)
        h = model.forward(last, h)[-1]
    return out


def format_text(tokens: list[str], unit: str = "word") -> str:
    """Tokens -> text: <eos> ends a line; words are joined by spaces (characters, unit="char", by nothing)."""
    sep = "" if unit == "char" else " "
    lines, current = [], []
    for token in tokens:
        if token == EOS:
            lines.append(sep.join(current))
            current = []
        else:
            current.append(token)
    if current:
        lines.append(sep.join(current))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--words", type=int, default=50, help="tokens to sample, <eos> included (default 50)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature > 0 (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely words only")
    parser.add_argument("--prompt", default="", help="text that the sample continues (printed first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def run(args) -> int:
    from bptt.saved_model import load_model, saved_unit

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
