"""Maxent direct connections (rnnlm -direct/-direct-order, faster-rnnlm --direct): hashed n-gram features
of the history connected straight to the output scores, trained jointly with the network.

For the position that has just read x^t, feature k (k = 0 .. K−1, K = the order) is the n-gram of the
last k input words (x^{t−k+1} .. x^t; k = 0 is the empty context, a bias). Each feature hashes to an
offset h_k^t into one weight vector D (H,), and adds to the score of output unit j (a word, or a class
of the class-based layer):
    g_j^t += Σ_k D[h_k^t + j]                       (rnnlm: D[(h + j) mod H]; here h <= H − span, no wrap)
where span is the number of output units the layer addresses (V for the full softmax, V + C for the
class softmax: word w at h + w, class c at h + V + c). Words of the history before the first input of a
block come from `context` (the last K−1 inputs of the previous block, oldest first); without one,
the history is <eos> (id 0), the state a sentence starts from.

Shapes: T time, B streams, N = T·B positions, K order, H hash size, span output units.
The gather D[h + j] for all j is a row gather from the sliding-window view D.unfold(0, span, 1) (row h
is D[h : h+span], no copy); its gradient is a row scatter-add into the same view of dD.
"""

from __future__ import annotations

import torch

from bptt import checks

Tensor = torch.Tensor

EOS_ID = 0  # bptt.data.Vocab gives <eos> id 0: the history before a corpus or a sentence starts
_PRIME = 2_147_483_647  # the polynomial hash is taken modulo 2^31 − 1: no int64 product overflows
_MULT = 1_000_003
_SEED = 1_234_567


def check_direct(size: int, order: int, span: int) -> None:
    """A clear ValueError for a hash that cannot hold the span or a bad order."""
    checks.positive_int("direct_order", order)
    if isinstance(size, bool) or not isinstance(size, int) or size < span:
        raise ValueError(f"direct connections need a hash of at least {span} weights (the output span), got {size!r}")


def ngram_offsets(inputs: Tensor, context: Tensor | None, order: int, size: int, span: int) -> Tensor:
    """inputs (T,B) int64, context (K−1,B)|None -> offsets (T·B, K) int64 in [0, size − span].

    offsets[t·B + b, k] = hash of (k, x_b^{t−k+1} .. x_b^t). The hash is the same on every device.
    """
    T, B = inputs.shape
    if context is None:
        context = torch.full((order - 1, B), EOS_ID, dtype=torch.long, device=inputs.device)
    history = torch.cat((context.to(inputs.device, torch.long), inputs))  # (K−1+T, B)
    h = torch.full((T, B), _SEED, dtype=torch.long, device=inputs.device)
    columns = [h.clone()]
    for k in range(1, order):  # add x^{t−k+1}: the k-th most recent word
        word = history[order - k : order - k + T]
        h = torch.remainder(h * _MULT + (word + 1) * (2 * k + 1), _PRIME)
        columns.append(h.clone())
    return torch.remainder(torch.stack(columns, dim=2).view(T * B, order), size - span + 1)


def next_context(inputs: Tensor, context: Tensor | None, order: int) -> Tensor | None:
    """The last K−1 words of (context, inputs) (K−1,B): the context of the block that follows."""
    if order <= 1:
        return None
    T, B = inputs.shape
    if context is None:
        context = torch.full((order - 1, B), EOS_ID, dtype=torch.long, device=inputs.device)
    return torch.cat((context.to(inputs.device, torch.long), inputs))[-(order - 1):].clone()


def direct_forward_(D: Tensor, offsets: Tensor, first: int, g: Tensor) -> Tensor:
    """D (H,), offsets (N,K), g (N,n) -> g += Σ_k D[offsets[:, k] + first + j] for j < n, in place.

    `first` selects the block of the span these scores address (0 for words, V for classes).
    """
    window = D.unfold(0, g.shape[1], 1)  # (H−n+1, n): row r is D[r : r+n]
    for k in range(offsets.shape[1]):
        g.add_(window.index_select(0, offsets[:, k] + first))
    return g


def direct_backward(offsets: Tensor, first: int, dg: Tensor, grads: dict[str, Tensor]) -> None:
    """dg (N,n) -> dD[offsets[n,k] + first + j] += dg[n, j] for every n, k, j.

    forward was g[n, j] += Σ_k D[offsets[n, k] + first + j], so ∂L/∂D[i] = Σ_{n,k,j: h+first+j = i} ∂L/∂g[n, j]:
    a scatter-add of every row of dg into the window of dD it was gathered from (windows overlap and
    repeat; index_add_ adds each row in turn).
    """
    window = grads["D"].unfold(0, dg.shape[1], 1)
    for k in range(offsets.shape[1]):
        window.index_add_(0, offsets[:, k] + first, dg)


def direct_gather(D: Tensor, offsets: Tensor, units: Tensor) -> Tensor:
    """offsets (n,K), units (n,J) int64 -> (n,J) = Σ_k D[offsets[:, k, None] + units]: scores of chosen units."""
    return D[offsets.unsqueeze(2) + units.unsqueeze(1)].sum(dim=1)


def direct_gather_backward(offsets: Tensor, units: Tensor, dg: Tensor, grads: dict[str, Tensor]) -> None:
    """dg (n,J) -> dD[offsets[n,k] + units[n,j]] += dg[n,j]  (forward: direct_gather), duplicates summed."""
    index = (offsets.unsqueeze(2) + units.unsqueeze(1)).reshape(-1)
    grads["D"].index_add_(0, index, dg.unsqueeze(1).expand(-1, offsets.shape[1], -1).reshape(-1))
