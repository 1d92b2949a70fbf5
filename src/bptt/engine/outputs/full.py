"""Full output layer: g^t = V s^t + c, o^t = f(g^t), loss against the next word (eq. 1–3).

Shapes: N = T·B positions, m = hidden, V = vocabulary. The layer is one matrix product over all N
positions (not one per step). With softmax + cross-entropy the loss gradient is fused (losses.py).

On the CPU, forward_backward with softmax + cross-entropy runs the loss, its gradient and the bias (its
value and its gradient) as one compiled pass over each row of scores (outputs/softmax_cpu.cpp, built on
first use by engine/native.py); forward and backward, and every other case, are the eager reference it
is tested against.

Memory: forward keeps the (N,V) scores for backward. forward_backward (what the engine calls) runs
the pair over chunks of at most `chunk_scores` scores (chunk rows × V), so that for a large
vocabulary the memory does not grow with T·B·V: ∂L/∂g of a position depends on that position alone,
so each chunk's backward can follow its forward at once and the chunk's scores are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bptt.engine import native
from bptt.engine.activations import output_activation
from bptt.engine.outputs.direct import direct_backward, direct_forward_
from bptt.engine.losses import (
    LOSSES,
    quadratic_backward,
    quadratic_forward,
    softmax_cross_entropy_backward_,
    softmax_cross_entropy_forward_,
)

Tensor = torch.Tensor

OUTPUT_CHUNK_SCORES = 1 << 25  # forward_backward runs over chunks of at most 32M scores (positions × V)


def rows_within(scores: int, vocab_size: int) -> int:
    """How many positions' (·, V) score rows fit in `scores` values: scores // V, at least 1."""
    return max(1, int(scores) // max(int(vocab_size), 1))


def linear_forward(V: Tensor, c: Tensor | None, S: Tensor, out: Tensor | None = None) -> Tensor:
    """V (V,m), c (V,)|None, S (N,m) -> g (N,V) = S Vᵀ + c: g^t = V s^t + c for every position at once.

    out: an (N,V) buffer to write g into (reusing it avoids faulting in fresh pages every block).
    """
    if c is None:
        return torch.mm(S, V.t(), out=out) if out is not None else S @ V.t()
    return torch.addmm(c, S, V.t(), out=out) if out is not None else torch.addmm(c, S, V.t())


def softmax_pass(targets: Tensor, vectors: tuple[Tensor | None, ...], matrices: tuple[Tensor, ...]):
    """The compiled softmax pass (outputs/softmax_cpu.cpp, engine/native.py) if it takes these tensors, else
    None: int64 targets; `vectors` (biases, their gradients, weights; None skipped) contiguous and of the
    first matrix's dtype; everything on the CPU, float32/float64, no autograd (native.usable); compiled
    kernels not turned off. The full and the class layers ask it before their compiled path."""
    given = [t for t in vectors if t is not None]
    if targets.dtype != torch.int64 or any(t.dtype != matrices[0].dtype for t in given):
        return None
    return native.kernels("softmax") if native.usable(*given, strided=matrices) else None


def linear_backward(V: Tensor, S: Tensor, dg: Tensor, grads: dict[str, Tensor], bias: bool) -> Tensor:
    """dg (N,V) -> dS (N,m); accumulates dV (V,m) and, with bias, dc (V,).

    forward was g = S Vᵀ + c, i.e. g_i^t = Σ_j V_ij s_j^t + c_i; so
      ∂L/∂V_ij = Σ_t ∂L/∂g_i^t s_j^t  -> dV += dgᵀ S      (eq. 2–3: (o−d)·f'(g) times s^t)
      ∂L/∂c_i  = Σ_t ∂L/∂g_i^t        -> dc += Σ_n dg
      ∂L/∂s_j^t = Σ_i ∂L/∂g_i^t V_ij  -> dS  = dg V       (carried into the recurrence, eq. 5)
    """
    grads["V"].addmm_(dg.t(), S)
    if bias:
        grads["c"].add_(dg.sum(dim=0))
    return dg @ V


@dataclass
class FullOutputCache:
    g: Tensor  # (N,V): o = f(g) (for cross-entropy computed in place over g)
    features: Tensor | None = None  # (N,K) direct-connection offsets, if any


class FullOutput:
    """The seed's output layer over the whole vocabulary, with nonlinearity f and a loss."""

    def __init__(self, output_activation_name: str = "softmax", loss: str = "cross_entropy"):
        self.f = output_activation(output_activation_name)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
        if loss == "cross_entropy" and self.f.name != "softmax":
            raise ValueError(
                f"loss='cross_entropy' requires output_activation='softmax', got {self.f.name!r}; "
                "use loss='quadratic' with sigmoid or identity outputs"
            )
        self.loss = loss
        self.forward_is_nll = loss == "cross_entropy"  # forward's loss is exactly −Σ ln P(target)
        self._workspace: Tensor | None = None  # the (N,V) buffer for g, reused from call to call
        self.chunk_scores = OUTPUT_CHUNK_SCORES  # forward_backward: at most this many scores at once

    def _g_buffer(self, N: int, like: Tensor) -> Tensor:
        V = like.shape[0]
        w = self._workspace
        if w is None or w.shape != (N, V) or w.dtype != like.dtype or w.device != like.device:
            w = self._workspace = torch.empty(N, V, dtype=like.dtype, device=like.device)
        return w

    @staticmethod
    def direct_span(vocab_size: int) -> int:
        """Output units addressed by maxent direct connections: the V words."""
        return vocab_size

    @staticmethod
    def param_shapes(vocab_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"V": (vocab_size, hidden_size)}
        if bias:
            shapes["c"] = (vocab_size,)
        return shapes

    def scores(self, params: dict[str, Tensor], S: Tensor, features: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
        """S (N,m), features (N,K)|None -> g (N,V) = V s^t + c (+ Σ_k D[h_k^t + w], direct connections)."""
        g = linear_forward(params["V"], params.get("c"), S, out=out)
        if features is not None:
            direct_forward_(params["D"], features, 0, g)
        return g

    def forward(
        self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None = None,
        features: Tensor | None = None,
    ) -> tuple[Tensor, FullOutputCache]:
        """S (N,m), targets (N,) int64, features (N,K)|None -> (L summed over the N positions, cache).

        The cache lives in a workspace reused by the next forward: call backward before that.
        """
        return self._forward(params, S, targets, weights, features, self._g_buffer(S.shape[0], params["V"]))

    def _forward(self, params, S, targets, weights, features, out: Tensor) -> tuple[Tensor, FullOutputCache]:
        g = self.scores(params, S, features, out=out)
        if self.loss == "cross_entropy":
            loss, o = softmax_cross_entropy_forward_(g, targets, weights)
            return loss, FullOutputCache(o, features)
        o = self.f.forward(g)
        return quadratic_forward(o, targets, weights), FullOutputCache(o, features)

    def chunk_rows(self, vocab_size: int) -> int:
        """Positions per chunk of forward_backward: chunk_scores // V, at least 1."""
        return rows_within(self.chunk_scores, vocab_size)

    def forward_backward(
        self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None,
        grads: dict[str, Tensor], features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """forward then backward over chunks of chunk_rows(V) positions -> (L, dS (N,m)); accumulates dV, dc.

        The same sums as forward + backward over all N positions at once (only the order of the
        additions into dV and dc differs), with one (chunk, V) workspace instead of (N, V).
        """
        N, rows = S.shape[0], self.chunk_rows(params["V"].shape[0])
        kernel = self._kernel(params, S, targets, weights, grads)
        if rows >= N:
            if kernel is not None:
                return self._fused(kernel, params, S, targets, weights, features, grads, self._g_buffer(N, params["V"]))
            loss, cache = self.forward(params, S, targets, weights, features)
            return loss, self.backward(params, S, cache, targets, weights, grads)
        workspace = self._g_buffer(rows, params["V"])  # (rows, V), the last chunk uses its first rows
        dS = torch.empty_like(S)
        loss = S.new_zeros(())
        for start in range(0, N, rows):
            chunk = slice(start, min(start + rows, N))
            S_c, y_c = S[chunk], targets[chunk]
            w_c = None if weights is None else weights[chunk]
            f_c = None if features is None else features[chunk]
            if kernel is not None:
                loss_c, dS[chunk] = self._fused(kernel, params, S_c, y_c, w_c, f_c, grads, workspace[: S_c.shape[0]])
            else:
                loss_c, cache = self._forward(params, S_c, y_c, w_c, f_c, workspace[: S_c.shape[0]])
                dS[chunk] = self.backward(params, S_c, cache, y_c, w_c, grads)
            loss = loss + loss_c
        return loss, dS

    def _kernel(self, params, S, targets, weights, grads):
        """The compiled loss and gradient (outputs/softmax_cpu.cpp) where they apply: softmax + cross-entropy,
        contiguous targets (the kernel reads them by pointer), softmax_pass's conditions; else None (the eager
        forward and backward run)."""
        if self.loss != "cross_entropy" or not targets.is_contiguous():
            return None
        return softmax_pass(targets, (params.get("c"), grads.get("c"), weights), (params["V"], S))

    def _fused(self, kernel, params, S, targets, weights, features, grads, out: Tensor) -> tuple[Tensor, Tensor]:
        """forward then backward in one: g = S Vᵀ (+ direct offsets) into `out`, then the kernel adds c,
        computes L = −Σ w log softmax(g)_y, overwrites g with ∂L/∂g = w (softmax(g) − d) and accumulates
        dc = Σ_n ∂L/∂g_n, all in one pass over each row -> (L, dS); accumulates dV (and dD)."""
        g = linear_forward(params["V"], None, S, out=out)
        if features is not None:
            direct_forward_(params["D"], features, 0, g)
        c = params.get("c")
        loss = kernel.softmax_xent_(g, c, targets, weights, None if c is None else grads["c"])
        if features is not None:
            direct_backward(features, 0, g, grads)
        return loss, linear_backward(params["V"], S, g, grads, bias=False)  # dc is already in grads["c"]

    def backward(
        self,
        params: dict[str, Tensor],
        S: Tensor,
        cache: FullOutputCache,
        targets: Tensor,
        weights: Tensor | None,
        grads: dict[str, Tensor],
    ) -> Tensor:
        """-> dS (N,m) = ∂L/∂s^t (direct part, through g^t only); accumulates dV, dc. Consumes cache."""
        if self.loss == "cross_entropy":
            dg = softmax_cross_entropy_backward_(cache.g, targets, weights)
        else:
            # forward was L = ½ Σ (d − o)², o = f(g): dL/dg = f'(g)ᵀ (o − d)   (eq. 3's ∂o_k/∂g_i)
            dg = self.f.backward(cache.g, quadratic_backward(cache.g, targets, weights))
        if cache.features is not None:  # forward was g += Σ_k D[h_k + w]: dD gathers dg back (direct.py)
            direct_backward(cache.features, 0, dg, grads)
        return linear_backward(params["V"], S, dg, grads, "c" in params)

    def log_probs(self, params: dict[str, Tensor], S: Tensor, features: Tensor | None = None) -> Tensor:
        """S (N,m), features (N,K)|None -> log P(w | history) (N,V) in nats. Needs a normalized f (softmax)."""
        if self.f.name != "softmax":
            raise ValueError(f"output_activation={self.f.name!r} does not define probabilities")
        return torch.log_softmax(self.scores(params, S, features), dim=1)
