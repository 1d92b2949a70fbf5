"""Sample text from a trained model: temperature, top-k, an optional prompt.

The history starts at <eos> (a sentence start), followed by the prompt. Output: the prompt, then the
sampled words, one sentence per line (every sampled <eos> ends a line). Deterministic for a given
--seed. --temperature below 1 sharpens the distribution, above 1 flattens it; --top-k K samples among
the K most likely words only (--top-k 1 is greedy argmax decoding).
"""

from __future__ import annotations

import torch

from bptt import checks
from bptt.data import EOS, Vocab
from bptt.engine.stream import Stream

MAX_WORDS = 10_000_000  # the sampled tokens are held in memory (a list of strings)


def check_sampling_options(words: int, temperature: float, top_k: int | None) -> None:
    """A ValueError naming the option for a --words outside [0, MAX_WORDS], a non-positive or
    non-finite --temperature, or a --top-k below 1."""
    checks.number("--temperature", temperature, 0, low_open=True, what="a positive finite number")
    if top_k is not None:
        checks.positive_int("--top-k", top_k)
    checks.integer("--words", words, 0, MAX_WORDS, what=f"an integer >= 0 and at most {MAX_WORDS:,}")


@torch.no_grad()
def sample(
    model,
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
    x = torch.tensor(history, device=model.device).unsqueeze(1)  # (T,1)
    stream = Stream(model, 1)
    if x.shape[0] > 1:
        stream.forward(x[:-1])  # the history before the last word read ...
    out: list[str] = []
    last = x[-1:]
    for _ in range(words):
        log_p = stream.log_probs(last).view(-1)  # ... then the distribution after each word read
        log_p = log_p.double().cpu()
        log_p = (log_p - log_p.max()) / temperature  # the most likely word at 0: a tiny temperature cannot overflow
        if top_k is not None and top_k < log_p.numel():
            threshold = torch.topk(log_p, top_k).values[-1]
            log_p = log_p.masked_fill(log_p < threshold, float("-inf"))
        probs = torch.softmax(log_p, 0)
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("the model's probabilities are not finite (NaN or infinity): its weights overflow")
        word = int(torch.multinomial(probs, 1, generator=generator))
        out.append(vocab.words[word])
        last = torch.tensor([[word]], device=model.device)
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
