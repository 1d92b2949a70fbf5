"""Dropout (Srivastava et al. 2014) on the non-recurrent connections of a network, as Zaremba et al. (2014)
place it: on the first layer's input (the embedding), between layers, and before the output layer —
never on the recurrence — in its standard form (a fresh mask at every position) or its variational /
locked form (Gal & Ghahramani 2016: one mask per stream for the whole block, the same at every step).

Shapes: T = time, B = streams, n = the width of the connection dropped.

A mask is an explicit value: drawn from a torch.Generator for a training block (draw_masks), kept in the
network's cache for the backward, and absent (None) in evaluation, scoring, generation and dynamic
evaluation, where nothing is dropped. Inverted dropout: a kept unit is scaled by 1/(1 − p), so that the
expected value of x ⊙ mask is x and evaluation needs no rescaling.

    forward   x̃ = x ⊙ mask
    backward  ∂L/∂x = ∂L/∂x̃ ⊙ mask           (the mask is a constant of the block)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
Masks = dict[str, Tensor]  # site -> (T,B,n)


@dataclass(frozen=True)
class Dropout:
    """Rates per kind of connection: `input` on the first layer's input, `hidden` between layers and
    before the output layer; variational: one mask per stream and block instead of one per position."""

    input: float = 0.0
    hidden: float = 0.0
    variational: bool = False

    def __post_init__(self):
        for name in ("input", "hidden"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"dropout rate {name!r} must be in [0, 1), got {p!r}")

    @property
    def active(self) -> bool:
        return self.input > 0 or self.hidden > 0


SEED_OFFSET = 0x9E3779B97F4A7C15  # dropout's stream is not the weights' (seeded with the same run seed)


def dropout_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a run's dropout masks, on the masks' device: seeded from the run's seed, but
    apart from the stream the starting weights are drawn from (masks uncorrelated with the weights)."""
    return torch.Generator(device=device).manual_seed((int(seed) + SEED_OFFSET) % (1 << 64))


def draw_mask(p: float, T: int, B: int, n: int, generator: torch.Generator, *, variational: bool,
              dtype: torch.dtype, device: torch.device) -> Tensor:
    """A mask (T,B,n) with entries 0 (probability p) or 1/(1 − p); variational: one (B,n) draw for all T
    steps (an expanded view: the same tensor at every step)."""
    shape = (1, B, n) if variational else (T, B, n)
    mask = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p, generator=generator).div_(1 - p)
    return mask.expand(T, B, n) if variational else mask


def dropout_forward(X: Tensor, mask: Tensor | None) -> Tensor:
    """X (T,B,n), mask (T,B,n)|None -> X ⊙ mask (a new tensor), or X itself without a mask."""
    return X if mask is None else X * mask


def dropout_backward(dX: Tensor, mask: Tensor | None) -> Tensor:
    """dX̃ (T,B,n) -> ∂L/∂X = dX̃ ⊙ mask (in place: dX̃ is the caller's error, read once).

    forward was X̃ = X ⊙ mask."""
    return dX if mask is None else dX.mul_(mask)
