"""Shared helpers: small random models and the comparison used by every gradient test."""

from __future__ import annotations

import torch

from bptt.gradcheck import combinations, random_model, relative_error

torch.set_default_dtype(torch.float64)

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
