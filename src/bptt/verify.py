"""Gradient checks: the explicit BPTT gradients of every (F, f, loss) combination against references.

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

Relative error of a gradient G against a reference R: max|G − R| / max(max|G|, max|R|).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bptt.engine.activations import HIDDEN_ACTIVATIONS
from bptt.model import ElmanLM
from bptt.oracle import autograd_loss_and_grads

# (output nonlinearity f, loss) pairs that are valid; cross-entropy needs a softmax output.
OUTPUT_LOSSES = (("softmax", "cross_entropy"), ("softmax", "quadratic"), ("sigmoid", "quadratic"), ("identity", "quadratic"))

# Thresholds on the relative error, per dtype and reference.
THRESHOLDS = {
    torch.float64: {"fd": 1e-6, "autograd": 1e-10, "rtrl": 1e-10, "trunc": 1e-10},
    torch.float32: {"fd": 1e-3, "autograd": 1e-5, "rtrl": 1e-5, "trunc": 1e-5},
}


def combinations() -> list[tuple[str, str, str]]:
    """Every valid (hidden activation F, output activation f, loss)."""
    return [(F, f, loss) for F in HIDDEN_ACTIVATIONS for f, loss in OUTPUT_LOSSES]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max(max|got|, max|ref|); 0 when both are all zeros."""
    got, ref = got.double(), ref.double()
    scale = max(float(got.abs().max()), float(ref.abs().max()))
    return 0.0 if scale == 0.0 else float((got - ref).abs().max()) / scale


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
