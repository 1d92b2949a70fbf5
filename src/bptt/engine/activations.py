"""Nonlinearities of the seed model, each a forward/backward pair.

Hidden nonlinearity F (elementwise, s = F(a)) and output nonlinearity f (o = f(g), softmax couples the
whole vocabulary row). Every derivative is written out; nothing here calls autograd.

Hidden derivatives are expressed through the *output* s = F(a) (tanh' = 1 - s², sigmoid' = s(1 - s),
relu' = [s > 0], identity' = 1), so the engine never needs to keep the pre-activations a^t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------
# Hidden nonlinearity F.  forward_(a) overwrites a with s = F(a); derivative(s) returns F'(a) from s.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiddenActivation:
    name: str
    forward_: Callable[[Tensor], Tensor]  # in place: a -> s = F(a)
    derivative: Callable[[Tensor], Tensor]  # s -> F'(a), same shape, new tensor


def _tanh_derivative(s: Tensor) -> Tensor:
    # forward was s = tanh(a); tanh'(a) = 1 - tanh(a)^2 = 1 - s^2
    return 1.0 - s * s


def _sigmoid_derivative(s: Tensor) -> Tensor:
    # forward was s = 1 / (1 + exp(-a)); sigmoid'(a) = s (1 - s)
    return s * (1.0 - s)


def _relu_derivative(s: Tensor) -> Tensor:
    # forward was s = max(a, 0); relu'(a) = 1 where a > 0, which is where s > 0
    return (s > 0).to(s.dtype)


def _identity_derivative(s: Tensor) -> Tensor:
    # forward was s = a; the derivative is 1 (the case the paper's printed recursion is exact for)
    return torch.ones_like(s)


HIDDEN_ACTIVATIONS: dict[str, HiddenActivation] = {
    "tanh": HiddenActivation("tanh", torch.tanh_, _tanh_derivative),
    "sigmoid": HiddenActivation("sigmoid", torch.sigmoid_, _sigmoid_derivative),
    "relu": HiddenActivation("relu", torch.relu_, _relu_derivative),
    "identity": HiddenActivation("identity", lambda a: a, _identity_derivative),
}


def hidden_activation(name: str) -> HiddenActivation:
    """Look up F by name; a clear ValueError for an unknown name."""
    try:
        return HIDDEN_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown hidden_activation {name!r}; choose one of {sorted(HIDDEN_ACTIVATIONS)}"
        ) from None


# ---------------------------------------------------------------------------------------------------
# Output nonlinearity f.  forward(g) -> o (N,V); backward(o, do) -> dg (N,V), a vector-Jacobian product.
# ---------------------------------------------------------------------------------------------------


def softmax_forward(g: Tensor) -> Tensor:
    """g (N,V) -> o (N,V), o_k = exp(g_k) / sum_j exp(g_j), row-wise."""
    return torch.softmax(g, dim=-1)


def softmax_backward(o: Tensor, do: Tensor) -> Tensor:
    """o, do (N,V) -> dg (N,V).

    forward was o_k = exp(g_k) / sum_j exp(g_j); its Jacobian is do_k/dg_i = o_k (δ_ki - o_i), so
    dg_i = sum_k do_k o_k (δ_ki - o_i) = o_i (do_i - sum_k o_k do_k).
    """
    return o * (do - (o * do).sum(dim=-1, keepdim=True))


def sigmoid_forward(g: Tensor) -> Tensor:
    """g (N,V) -> o (N,V), elementwise logistic."""
    return torch.sigmoid(g)


def sigmoid_backward(o: Tensor, do: Tensor) -> Tensor:
    """forward was o = sigmoid(g); dg = do * o (1 - o)."""
    return do * o * (1.0 - o)


def identity_forward(g: Tensor) -> Tensor:
    """g (N,V) -> o = g."""
    return g


def identity_backward(o: Tensor, do: Tensor) -> Tensor:
    """forward was o = g; dg = do."""
    return do


@dataclass(frozen=True)
class OutputActivation:
    name: str
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]


OUTPUT_ACTIVATIONS: dict[str, OutputActivation] = {
    "softmax": OutputActivation("softmax", softmax_forward, softmax_backward),
    "sigmoid": OutputActivation("sigmoid", sigmoid_forward, sigmoid_backward),
    "identity": OutputActivation("identity", identity_forward, identity_backward),
}


def output_activation(name: str) -> OutputActivation:
    """Look up f by name; a clear ValueError for an unknown name."""
    try:
        return OUTPUT_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown output_activation {name!r}; choose one of {sorted(OUTPUT_ACTIVATIONS)}"
        ) from None
