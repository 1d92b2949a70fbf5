"""Gradient checks: the explicit BPTT gradients of every (F, f, loss) combination against references,
and of the models of a ModelConfig (a cell, a stack, an embedding, tying, dropout) — check_model.

For each combination and each parameter it prints the largest relative error of the BPTT gradient
against two independent references, central finite differences of the loss and an autograd model of
the seed's equations (bptt.oracle), and against the forward-mode RTRL recursion. RTRL is not
independent: it runs the same cell F′ and output-layer forward/backward as BPTT (bptt.engine.rtrl),
so it checks the propagation through time and the gradients of U, W and b; an error in F′ or in an
output layer's gradient shows against finite differences and autograd, never against RTRL. With
--truncation k it also checks truncated BPTT against the autograd model truncated the same way. The
factorized output layers (class, hsm, nce, sampled; tanh cell, cross-entropy) and the direct
connections are checked against finite differences, their one independent reference here, and RTRL.
Exit status 1 if any entry is over its threshold.

check_model checks one model configuration (Elman, LSTM or GRU layers, a stack, with or without an
embedding, tied, dropout with frozen masks) against finite differences of its loss (every parameter),
the independent autograd model of the stack (bptt.oracle.stack_autograd_loss_and_grads), truncated
BPTT against the truncated autograd model, and BPTT(k1, k2) (engine.tbptt.TruncatedBPTT over a stream
of blocks) against autograd over each block's window.

Relative error of a gradient G against a reference R: max|G − R| / max(max|G|, max|R|).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch

from bptt.engine.activations import HIDDEN_ACTIVATIONS
from bptt.engine.network import State
from bptt.engine.sweep import loss_and_grads, output_loss
from bptt.engine.tbptt import TruncatedBPTT
from bptt.model import ElmanLM, LanguageModel, ModelConfig
from bptt.oracle import autograd_loss_and_grads, stack_autograd_loss_and_grads

# (output nonlinearity f, loss) pairs that are valid; cross-entropy needs a softmax output.
OUTPUT_LOSSES = (("softmax", "cross_entropy"), ("softmax", "quadratic"), ("sigmoid", "quadratic"), ("identity", "quadratic"))

# Thresholds on the relative error, per dtype and reference.
THRESHOLDS = {
    torch.float64: {"fd": 1e-6, "autograd": 1e-10, "rtrl": 1e-10, "trunc": 1e-10, "k1k2": 1e-10},
    torch.float32: {"fd": 1e-3, "autograd": 1e-5, "rtrl": 1e-5, "trunc": 1e-5, "k1k2": 1e-5},
}


def combinations() -> list[tuple[str, str, str]]:
    """Every valid (hidden activation F, output activation f, loss)."""
    return [(F, f, loss) for F in HIDDEN_ACTIVATIONS for f, loss in OUTPUT_LOSSES]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max(max|got|, max|ref|); 0 when both are all zeros; NaN when either holds a NaN (a
    check must fail then: Python's max() would drop a NaN beside a number)."""
    got, ref = got.double(), ref.double()
    if bool(torch.isnan(got).any()) or bool(torch.isnan(ref).any()):
        return math.nan
    scale = max(float(got.abs().max()), float(ref.abs().max()))
    return 0.0 if scale == 0.0 else float((got - ref).abs().max()) / scale


def worse(a: float, b: float) -> float:
    """The worse of two errors, a NaN being the worst."""
    return b if math.isnan(b) or b > a else a


def finite_differences(params: dict[str, torch.Tensor], loss, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Central differences (L(θ + ε) − L(θ − ε)) / 2ε of loss() (a float of the current params), one
    parameter element at a time, each put back afterwards -> {name: float64 tensor like the param}."""
    grads = {}
    for name, p in params.items():
        g = torch.zeros(p.shape, dtype=torch.float64)
        for idx in range(p.numel()):
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), p.shape))
            original = p[where].item()
            p[where] = original + eps
            up = float(loss())
            p[where] = original - eps
            down = float(loss())
            p[where] = original
            g[where] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


def finite_difference_grads(
    model: ElmanLM, inputs: torch.Tensor, targets: torch.Tensor, h0: torch.Tensor, eps: float = 1e-6,
    context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Central differences of an ElmanLM's loss (masked if given), one element at a time."""
    return finite_differences(model.params, lambda: model.loss(inputs, targets, h0, mask=mask, context=context), eps)


def random_model(
    F: str, f: str, loss: str, vocab: int, hidden: int, bias: bool, dtype: torch.dtype, seed: int, **model_kwargs
) -> ElmanLM:
    """A model with weights large enough for every term of the gradient to matter, biases non-zero.

    model_kwargs go to ElmanLM (e.g. output="class", classes=3, word_counts=...).
    """
    model = ElmanLM(vocab, hidden, F, f, loss, bias=bias, dtype=dtype, seed=seed, init_range=0.6, **model_kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    for p in model.params.values():
        if p.dim() == 1:
            p.copy_((torch.rand(p.shape, generator=generator, dtype=torch.float64) - 0.5).to(dtype))
    return model


@dataclass
class CheckRow:
    combination: str
    parameter: str
    errors: dict[str, float] = field(default_factory=dict)


def check_combination(
    F: str, f: str, loss: str, *, vocab: int, hidden: int, steps: int, batch: int, bias: bool,
    dtype: torch.dtype, seed: int, truncation: int | None, tied: bool = False,
) -> list[CheckRow]:
    """All checks of one combination -> one row per parameter with its errors per reference.

    tied=True: the input weights tied to the output layer's (U ≡ Vᵀ); no RTRL reference for it.
    """
    model = random_model(F, f, loss, vocab, hidden, bias, dtype, seed, tied=tied)
    generator = torch.Generator().manual_seed(seed + 2)
    inputs = torch.randint(0, vocab, (steps, batch), generator=generator)
    targets = torch.randint(0, vocab, (steps, batch), generator=generator)
    h0 = ((torch.rand(batch, hidden, generator=generator, dtype=torch.float64) - 0.5)).to(dtype)  # a carried state

    _, grads, _ = model.loss_and_grads(inputs, targets, h0)
    references = {}
    # Finite differences always in float64 (a float32 difference quotient is all rounding noise).
    model64 = random_model(F, f, loss, vocab, hidden, bias, torch.float64, seed, tied=tied)
    for name, p in model.params.items():
        model64.params[name].copy_(p.double())
    references["fd"] = finite_difference_grads(model64, inputs, targets, h0.double())
    references["autograd"] = autograd_loss_and_grads(model.params, F, f, loss, inputs, targets, h0)[1]
    if not tied:
        references["rtrl"] = model.loss_and_grads(inputs, targets, h0, method="rtrl")[1]
    truncated = None
    if truncation is not None:
        truncated = model.loss_and_grads(inputs, targets, h0, truncation=truncation)[1]
        references["trunc"] = autograd_loss_and_grads(
            model.params, F, f, loss, inputs, targets, h0, truncation=truncation
        )[1]
    label = f"F={F} f={f} loss={loss}{' tied' if tied else ''} bias={'on' if bias else 'off'}"
    rows = []
    for name in model.params:
        row = CheckRow(label, name)
        for ref_name, ref in references.items():
            got = truncated[name] if ref_name == "trunc" else grads[name]
            row.errors[ref_name] = relative_error(got, ref[name])
        rows.append(row)
    return rows


FACTORIZED_OUTPUTS = ("class", "hsm", "nce", "sampled")
DIRECT_OUTPUTS = ("softmax", "class")  # the layers with maxent direct connections
DIRECT_ORDER = 3


def direct_size(vocab: int) -> int:
    """A small hash for the checks: room for the class layer's span (V + 3 classes) plus a few offsets,
    so that n-gram features collide and the scatter-add of repeated windows is exercised."""
    return 2 * vocab + 7


def check_output_layer(
    output: str, *, vocab: int, hidden: int, steps: int, batch: int, bias: bool, dtype: torch.dtype, seed: int,
    direct: int = 0,
) -> list[CheckRow]:
    """BPTT through an output layer (tanh cell) against finite differences and RTRL.

    Finite differences are the independent reference: RTRL runs this layer's own forward/backward, so
    a wrong layer gradient would pass against it. The autograd model covers the seed's full output
    layer only; each factorized layer is also checked against autograd of its own formula, with and
    without position weights, and with a mask against finite differences, in the tests. NCE and sampled
    softmax are checked with their noise words frozen (a fixed draw), so that the objective is a
    deterministic function. direct > 0 adds maxent direct connections of order DIRECT_ORDER (hash
    size `direct`) and a carried n-gram context.
    """
    counts = [1000 // (rank + 1) for rank in range(vocab)]  # Zipf-like, for classes and the tree
    layer = dict(output=output, classes=3, word_counts=counts)
    if direct:
        layer.update(direct=direct, direct_order=DIRECT_ORDER)
    model = random_model("tanh", "softmax", "cross_entropy", vocab, hidden, bias, dtype, seed, **layer)
    generator = torch.Generator().manual_seed(seed + 2)
    if hasattr(model.output, "freeze_noise"):
        model.output.freeze_noise(torch.randint(0, vocab, (5,), generator=generator))
    inputs = torch.randint(0, vocab, (steps, batch), generator=generator)
    targets = torch.randint(0, vocab, (steps, batch), generator=generator)
    h0 = (torch.rand(batch, hidden, generator=generator, dtype=torch.float64) - 0.5).to(dtype)
    context = torch.randint(0, vocab, (DIRECT_ORDER - 1, batch), generator=generator) if direct else None
    _, grads, _ = model.loss_and_grads(inputs, targets, h0, context=context)
    model64 = model if dtype == torch.float64 else None
    if model64 is None:  # finite differences in float64 on a copy
        model64 = ElmanLM(vocab, hidden, bias=bias, dtype=torch.float64, seed=seed, **layer)
        for name, p in model.params.items():
            model64.params[name].copy_(p.double())
        if hasattr(model.output, "freeze_noise"):
            model64.output.freeze_noise(model.output.draw())
    fd = finite_difference_grads(model64, inputs, targets, h0.double(), context=context)
    rtrl = model.loss_and_grads(inputs, targets, h0, method="rtrl", context=context)[1]
    label = f"F=tanh output={output}{'+direct' if direct else ''} bias={'on' if bias else 'off'}"
    return [
        CheckRow(label, name, {"fd": relative_error(grads[name], fd[name]), "rtrl": relative_error(grads[name], rtrl[name])})
        for name in model.params
    ]


# -- the models of a ModelConfig: cells, stacks, embeddings, tying, dropout ----------------------------

MODEL_CELLS = ("elman", "lstm", "gru")


def embedding_variants(cell: str, hidden: int) -> list[tuple[str, int, bool]]:
    """(label, embedding size e, tied) of the input side checked for a cell: no embedding (the first layer
    reads U x^t; tied: U ≡ Vᵀ, Elman only), an embedding of a size other than m (so that no transpose
    can pass by accident), and the tied embedding (E ≡ V, e = m)."""
    variants = [("no-emb", 0, False)]
    if cell == "elman":
        variants.append(("no-emb tied", 0, True))
    return variants + [(f"emb={hidden + 1}", hidden + 1, False), ("emb tied", hidden, True)]


def bptt_blocks(steps: int) -> tuple[int, int]:
    """(k1, k2) of the BPTT(k1, k2) check over a stream of `steps` steps: about three blocks, each
    error sent back through its block and one block of history."""
    k1 = max(1, steps // 3)
    return k1, min(steps, 2 * k1)


def random_language_model(config: ModelConfig, seed: int) -> LanguageModel:
    """A LanguageModel of `config` (init_range as given) with every 1-D parameter (the biases) drawn
    uniform in ±0.5, so that every term of the gradient matters."""
    model = LanguageModel(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for p in model.params.values():
        if p.dim() == 1:
            p.copy_((torch.rand(p.shape, generator=generator, dtype=torch.float64) - 0.5).to(p.dtype))
    return model


def _model_loss(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, state: State,
                masks: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The summed loss of a block with frozen dropout masks: the network's forward, then the output layer."""
    H, _, cache = model.net.forward(model.params, inputs, state, masks)
    return output_loss(model.net.output, model.params, H, targets, features=cache.features)


def _random_state(model: LanguageModel, batch: int, generator: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """A carried state: per layer the cell's state tuple, uniform in ±0.5."""
    zero = model.zero_state(batch)
    return [tuple((torch.rand(t.shape, generator=generator, dtype=torch.float64) - 0.5).to(t.dtype) for t in layer)
            for layer in zero.layers]


def check_model(
    cell: str, *, layers: int, dropout: float, embedding_size: int, tied: bool, vocab: int, hidden: int,
    steps: int, batch: int, bias: bool, dtype: torch.dtype, seed: int, truncation: int | None,
    label: str | None = None,
) -> list[CheckRow]:
    """All checks of one model configuration -> one row per parameter with its errors per reference.

    The model: `layers` layers of `cell` (tanh Elman, LSTM, GRU) reading the words through an embedding
    of size embedding_size (0: none), tied or not, full softmax with cross-entropy, dropout at rate
    `dropout` (between layers, before the output layer and on the first layer's input) with masks drawn
    once from a seeded generator and frozen, a random carried state. References: "fd" central finite
    differences of the loss in float64 (every element of every parameter), "autograd" the stack's
    autograd model (bptt.oracle), "trunc" truncated BPTT (truncation k) against the truncated autograd
    model, "k1k2" BPTT(k1, k2) of engine.tbptt over `steps` steps in blocks (bptt_blocks), with the
    same masks drawn in the same order, against autograd over each block's window (the largest error
    over the blocks).
    """
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, cell=cell, layers=layers, bias=bias, tied=tied,
                         embedding_size=embedding_size, dropout=dropout, dtype=str(dtype).removeprefix("torch."),
                         init_range=0.6)
    model = random_language_model(config, seed)
    net, embedding = model.net, bool(model.config.embedding)
    generator = torch.Generator().manual_seed(seed + 2)
    inputs = torch.randint(0, vocab, (steps, batch), generator=generator)
    targets = torch.randint(0, vocab, (steps, batch), generator=generator)
    state0 = _random_state(model, batch, generator)
    masks = net.draw_masks(steps, batch, torch.Generator().manual_seed(seed + 3), dtype=dtype, device="cpu")
    _, grads, _ = loss_and_grads(net, model.params, inputs, targets, State(tuple(state0)), masks=masks)

    # references in float64, on a float64 copy of the weights, the masks and the state (exact casts)
    model64 = model if dtype == torch.float64 else random_language_model(
        ModelConfig(**{**config.to_json(), "dtype": "float64"}), seed)
    for name, p in model.params.items():
        model64.params[name].copy_(p.double())
    masks64 = None if masks is None else {site: m.double() for site, m in masks.items()}
    state64 = [tuple(t.double() for t in layer) for layer in state0]
    references = {"fd": finite_differences(
        model64.params, lambda: _model_loss(model64, inputs, targets, State(tuple(state64)), masks64))}
    oracle = dict(embedding=embedding, hidden_activation=config.hidden_activation)
    references["autograd"] = stack_autograd_loss_and_grads(model64.params, cell, inputs, targets, state64,
                                                           masks=masks64, **oracle)[1]
    got = dict.fromkeys(references, grads)
    if truncation is not None:
        got["trunc"] = loss_and_grads(net, model.params, inputs, targets, State(tuple(state0)), masks=masks,
                                      truncation=truncation)[1]
        references["trunc"] = stack_autograd_loss_and_grads(model64.params, cell, inputs, targets, state64,
                                                            masks=masks64, truncation=truncation, **oracle)[1]
    errors = {ref: {name: relative_error(got[ref][name], references[ref][name]) for name in model.params}
              for ref in references}
    errors["k1k2"] = _check_blocks(model, model64, inputs, targets, seed, oracle)
    label = label or f"cell={cell} L={layers} dropout={dropout:g}"
    label = f"{label} bias={'on' if bias else 'off'}"
    return [CheckRow(label, name, {ref: errors[ref][name] for ref in errors}) for name in model.params]


def _check_blocks(model: LanguageModel, model64: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor,
                  seed: int, oracle: dict) -> dict[str, float]:
    """BPTT(k1, k2) of TruncatedBPTT over the stream (from the zero state, weights unchanged between the
    blocks) against autograd over each block's window of k2 steps (the state before the window taken
    from an untruncated run, a constant; the loss of the block's k1 steps) -> the largest error per
    parameter over the blocks."""
    steps, batch = inputs.shape
    k1, k2 = bptt_blocks(steps)
    net = model.net
    has_dropout = bool(net.dropout_sites())
    engine = TruncatedBPTT(model, k1, k2, generator=torch.Generator().manual_seed(seed + 4) if has_dropout else None)
    replay = torch.Generator().manual_seed(seed + 4)  # the same masks, drawn in the same order
    zero = [tuple(t.double() for t in layer) for layer in model64.zero_state(batch).layers]
    masks: dict[str, list[torch.Tensor]] = {}
    worst = dict.fromkeys(model.params, 0.0)
    for start in range(0, steps, k1):
        end = min(start + k1, steps)
        block_masks = net.draw_masks(end - start, batch, replay, dtype=model.dtype, device="cpu") if has_dropout else None
        for site, m in (block_masks or {}).items():
            masks.setdefault(site, []).append(m.double())
        _, grads = engine.step(inputs[start:end], targets[start:end])
        first = max(0, end - k2)  # the window: the block and up to k2 − k1 steps before it
        stream_masks = {site: torch.cat(ms) for site, ms in masks.items()} or None
        if first:  # the state before the window: the stream run from the zero state, untruncated
            head = None if stream_masks is None else {site: m[:first] for site, m in stream_masks.items()}
            state = stack_autograd_loss_and_grads(model64.params, net.cells[0].name, inputs[:first], targets[:first],
                                                  zero, masks=head, **oracle)[2]
        else:
            state = zero
        window = None if stream_masks is None else {site: m[first:end] for site, m in stream_masks.items()}
        ref = stack_autograd_loss_and_grads(model64.params, net.cells[0].name, inputs[first:end], targets[first:end],
                                            state, masks=window, loss_from=start - first, **oracle)[1]
        for name in worst:
            worst[name] = worse(worst[name], relative_error(grads[name], ref[name]))
    return worst
