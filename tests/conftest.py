"""Shared helpers: small random models and the comparison used by every gradient test."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bptt.engine import native
from bptt.verify import combinations, random_model, relative_error

torch.set_default_dtype(torch.float64)


COMPILER = bool((shutil.which("c++") or shutil.which("g++")) and shutil.which("ninja"))


def compiled_or_skip(name: str, what: str):
    """native.kernels(name), built; the test skipped where the CPU kernels are turned off or there is no C++
    compiler and ninja, and failed where there are and the build did not succeed. what: "the lstm cell's"."""
    if not native.enabled("cpu"):
        pytest.skip("the CPU kernels are turned off (BPTT_NATIVE=0 or BPTT_NATIVE_CPU=0)")
    built = native.kernels(name)
    if built is None:
        if COMPILER:
            pytest.fail(f"a C++ compiler and ninja are here, but {what} CPU kernels did not build")
        pytest.skip("no C++ compiler or ninja: the eager code runs")
    return built


@pytest.fixture(autouse=True, scope="session")
def compiled_cells():
    """The cells' and the full softmax's CPU kernels built once, before any test (engine/native.py; on a fresh machine about half a
    minute each): the build's notice on stderr then lands in no test's output, and the commands run in
    subprocesses find the build made."""
    native.kernels("lstm")
    native.kernels("gru")
    native.kernels("softmax")

COMBINATIONS = combinations()  # every valid (F, f, loss)
COMBO_IDS = [f"{F}-{f}-{loss}" for F, f, loss in COMBINATIONS]


def make_case(F, f, loss, *, V=7, m=5, T=5, B=3, bias=True, seed=0, carried_h0=True):
    """A float64 model with non-trivial weights, random data and (optionally) a carried h0."""
    model = random_model(F, f, loss, V, m, bias, torch.float64, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    inputs = torch.randint(0, V, (T, B), generator=g)
    targets = torch.randint(0, V, (T, B), generator=g)
    h0 = (torch.rand(B, m, generator=g) - 0.5) if carried_h0 else None
    return model, inputs, targets, h0


def max_rel_error(grads: dict, ref: dict) -> float:
    assert grads.keys() == ref.keys()
    return max(relative_error(grads[k], ref[k]) for k in grads)


def random_data(T: int, B: int, V: int, m: int, seed: int = 0):
    """inputs, targets (T,B) and a carried h0 (B,m), float64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g),
            torch.rand(B, m, generator=g, dtype=torch.float64) - 0.5)


def layer_model(output: str, counts, *, bias=True, seed=0, m=5, **kwargs):
    """A float64 tanh model with a factorized output layer, large weights and non-zero biases."""
    return random_model("tanh", "softmax", "cross_entropy", len(counts), m, bias, torch.float64, seed,
                        output=output, word_counts=list(counts), **kwargs)


def assert_normalized_and_matches_loss(model, x, y, h0) -> torch.Tensor:
    """log P (T,B,V) of random histories sums to 1 over the vocabulary, and −Σ log P(target) is the
    training loss (layers whose loss is the exact NLL). Returns log P for further checks."""
    T, B = x.shape
    log_probs, _ = model.log_probs(x, h0)
    assert log_probs.shape == (T, B, model.vocab_size)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(T, B, dtype=torch.float64))
    torch.testing.assert_close(model.loss(x, y, h0), -log_probs.gather(2, y.unsqueeze(2)).sum())
    return log_probs


def check_layer_against_autograd(layer, params, names, S, y, weights, reference) -> tuple[float, float]:
    """An output layer's forward/backward on (S, y, weights) against autograd of reference(leaves, S):
    the gradients of the parameters `names` and dS agree to 1e-12 (asserted here), and so do those of its
    forward_backward where it has one. reference gets the
    parameters as leaves {name: tensor} and S as a leaf and returns the loss written out independently.
    Returns (the layer's loss, the reference loss) for the caller's own check of the loss."""
    grads = {k: torch.zeros_like(params[k]) for k in names}
    loss, cache = layer.forward(params, S, y, weights)
    dS = layer.backward(params, S, cache, y, weights, grads)
    leaves = {k: params[k].clone().requires_grad_(True) for k in names}
    S_leaf = S.clone().requires_grad_(True)
    with torch.enable_grad():
        total = reference(leaves, S_leaf)
        ref = torch.autograd.grad(total, [*leaves.values(), S_leaf])
    for got, want in zip([*grads.values(), dS], ref):
        assert relative_error(got, want) <= 1e-12
    if hasattr(layer, "forward_backward"):  # the pair in one call, what the engine runs (compiled where it can be)
        fused = {k: torch.zeros_like(params[k]) for k in names}
        loss_fb, dS_fb = layer.forward_backward(params, S, y, weights, fused)
        assert abs(float(loss_fb) - float(loss)) <= 1e-12 * max(1.0, abs(float(loss)))
        for got, want in zip([*fused.values(), dS_fb], ref):
            assert relative_error(got, want) <= 1e-12
    return float(loss), float(total.detach())


def one_error_line(err: str, *needles: str) -> str:
    """The single stderr line of a refused input; it must hold every needle and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_corpus(path, lines: int, seed: int) -> str:
    """A toy language: 'the <adj>? <noun> <verb>s' with agreement between noun and verb; a few hundred tokens."""
    rng = random.Random(seed)
    nouns = {"cat": "meows", "dog": "barks", "bird": "sings", "cow": "moos"}
    text = []
    for _ in range(lines):
        noun = rng.choice(sorted(nouns))
        adj = rng.choice(["", "big ", "small ", "old "])
        text.append(f"the {adj}{noun} {nouns[noun]}" + (" loudly" if rng.random() < 0.3 else ""))
    Path(path).write_text("\n".join(text) + "\n")
    return str(path)


def write_ten_word_corpus(path: Path, lines: int = 120, seed: int = 0) -> str:
    """`lines` random lines of 3-7 words over ten words (12 types with <eos> and <unk>)."""
    words = "the a cat dog sat ran on mat fast slow".split()
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 8))) for _ in range(lines)) + "\n")
    return str(path)


def train_tiny_model(root: Path, words: list[str], seed: int) -> Path:
    """root/t.txt (60 random lines over `words`) and a model trained on it for one epoch in root/m."""
    from bptt.training.trainer import TrainConfig, train

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 7))) for _ in range(60)]
    (root / "t.txt").write_text("\n".join(lines) + "\n")
    train(TrainConfig.from_options(train=str(root / "t.txt"), valid=str(root / "t.txt"), model=str(root / "m"), hidden_size=8,
                      batch=4, bptt=5, epochs=1, progress=False))
    return root / "m"
