"""The network: the input term, a stack of cells, the output layer — forward and backward over a block.

Shapes: T = time, B = streams, m = hidden, V = vocabulary, N = T·B positions, L = layers.

    inputs (T,B) ──embed──> A_0 ──cell 0──> H_0 ──project──> A_1 ──cell 1──> H_1 ... H_{L−1} ──> output layer
                 (gather of U_0)            (A_k = H_{k−1} U_kᵀ)

With an embedding of size e (the LSTM's and GRU's default; PyTorch's word_language_model), the words
are first looked up in E (V,e) and the first layer reads them like a layer above: X_0 = E[x] (a row
gather), A_0 = X_0 U_0ᵀ. Without one (the seed's Elman model) A_0 = U_0 x^t is the gather itself.

Dropout (engine/dropout.py) multiplies the first layer's input (X_0, or A_0 without an embedding),
each layer's output read by the layer above, and the top layer's output read by the output layer by
masks given to forward (None: nothing dropped, as in evaluation); the masks ride in the cache.

Everything here is a pure function of the parameters, passed in as a dict {name: tensor}: the network
holds the cells' and the output layer's *code*, never weights. Parameter names: a one-layer model
uses the cells' own names (the seed's U, W, b; the output layer's V, c; D for direct connections);
layer k of a stack prefixes its cell's names with "layer{k}." (layer0.U, layer1.W, ...); the embedding
is "E". A tied model (Press & Wolf 2017) has no E (E ≡ V), or without an embedding no U_0 (U_0 ≡ Vᵀ):
the words are gathered from the output layer's V, and the gradient lands in ∂L/∂V, added to the output
layer's own (the product rule), because the gradient view handed to the lookup is ∂L/∂V itself.

State (explicit, never "the last row of S"): a `State` holds, per layer, the cell's state tuple ((h,)
for Elman) and the direct connections' n-gram context (the last K−1 input words, (K−1,B)); forward
takes one and returns the next. The cache of a forward (`NetCache`) holds the block's inputs, every
layer's CellCache and the direct connections' features; caches of consecutive blocks join along time
and cut at any step (join, tail), which is what BPTT(k1, k2) needs (tbptt.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bptt.engine.cells import INPUT_WEIGHT, Cell, CellCache, CellState, join_caches, tail_cache
from bptt.engine.dropout import Dropout, Masks, draw_mask, dropout_backward, dropout_forward
from bptt.engine.flat import note_rows
from bptt.engine.inputs import (
    embed_backward,
    embed_forward,
    lookup_project_backward,
    lookup_project_forward,
    project_backward,
    project_forward,
)
from bptt.engine.outputs.direct import check_direct, next_context, ngram_offsets

Tensor = torch.Tensor


@dataclass(frozen=True)
class State:
    """The carried state of a network: per layer the cell's state tuple, and the direct-connection
    context (K−1,B) int64 or None (no direct connections, or the history is <eos>)."""

    layers: tuple[CellState, ...]
    context: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.layers[0][0].shape[0])

    @property
    def hidden(self) -> Tensor:
        """The top layer's output state h^T (B,m)."""
        return self.layers[-1][0]

    def map(self, fn: Callable[[Tensor], Tensor]) -> State:
        """The same state with fn applied to every tensor (e.g. torch.clone, a move to a device)."""
        layers = tuple(tuple(fn(t) for t in layer) for layer in self.layers)
        return State(layers, None if self.context is None else fn(self.context))

    def stream(self, b: int, copies: int = 1) -> State:
        """Stream b of this state, repeated `copies` times (new tensors): a state of B = copies streams that
        all start where stream b is."""
        layers = tuple(tuple(t[b : b + 1].expand(copies, *t.shape[1:]).clone() for t in layer) for layer in self.layers)
        context = None if self.context is None else self.context[:, b : b + 1].expand(-1, copies).clone()
        return State(layers, context)

    def tensors(self) -> dict[str, Tensor]:
        """{"state.{layer}.{i}": tensor, "context": tensor}: the state as named tensors (checkpoints)."""
        out = {f"state.{k}.{i}": t for k, layer in enumerate(self.layers) for i, t in enumerate(layer)}
        if self.context is not None:
            out["context"] = self.context
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, Tensor]) -> State | None:
        """The inverse of tensors(); None when there is no "state.0.0" (no state saved)."""
        if "state.0.0" not in tensors:
            return None
        layers = []
        while f"state.{len(layers)}.0" in tensors:
            k, layer = len(layers), []
            while f"state.{k}.{len(layer)}" in tensors:
                layer.append(tensors[f"state.{k}.{len(layer)}"])
            layers.append(tuple(layer))
        return State(tuple(layers), tensors.get("context"))


@dataclass
class NetCache:
    """What a network's backward needs from its forward over a block (or a window of blocks)."""

    inputs: Tensor  # (T,B) int64 token ids
    layers: list[CellCache]  # one per layer, time-major
    features: Tensor | None = None  # (T·B,K) direct-connection offsets of the positions, if any
    masks: Masks | None = None  # dropout masks (T,B,n) by site ("input", "layer{k}", "output"), if any

    @property
    def length(self) -> int:
        return int(self.inputs.shape[0])


class Network:
    """Input term, cells (one per layer) and output layer, with the names of their parameters."""

    def __init__(self, cells: Sequence[Cell], output, *, vocab_size: int, hidden_size: int, bias: bool = True,
                 tied: bool = False, direct: int = 0, direct_order: int = 3, embedding_size: int = 0,
                 dropout: Dropout = Dropout()):
        if not cells:
            raise ValueError("a network needs at least one layer")
        self.cells = list(cells)
        self.output = output
        self.vocab_size, self.hidden_size, self.bias, self.tied = vocab_size, hidden_size, bias, tied
        self.embedding_size = int(embedding_size)  # e; 0: no embedding, the first layer gathers U_0 x^t
        self.dropout = dropout
        self.prefixes = [""] if len(self.cells) == 1 else [f"layer{k}." for k in range(len(self.cells))]
        self.direct, self.direct_order = int(direct), int(direct_order)
        self.direct_span = 0
        if self.direct:
            if not hasattr(output, "direct_span"):
                raise ValueError(f"direct connections need output 'softmax' or 'class', not {type(output).__name__}")
            self.direct_span = output.direct_span(vocab_size)
            check_direct(self.direct, self.direct_order, self.direct_span)
        if tied and self.embedding_size:
            out = output.param_shapes(vocab_size, hidden_size, bias).get("V")
            if out is None or tuple(out) != (vocab_size, self.embedding_size):
                raise ValueError("tied embedding and output weights need output 'softmax' or 'class' (a matrix V with "
                                 f"a row per word) and an embedding size equal to the top layer's {hidden_size}, got "
                                 f"{self.embedding_size}")
        elif tied:
            first = self.cells[0].param_shapes(vocab_size, hidden_size, bias)[INPUT_WEIGHT]
            out = output.param_shapes(vocab_size, hidden_size, bias).get("V")
            if out is None or tuple(reversed(out)) != tuple(first):
                raise ValueError("tied input and output weights need output 'softmax' or 'class' (a matrix V with a "
                                 f"row per word) and a first layer whose input weights are Vᵀ {first}")

    # -- parameters -----------------------------------------------------------------------------------

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's global name and shape, in the order the model draws them."""
        shapes: dict[str, tuple[int, ...]] = {}

        def add(name: str, shape, owner: str) -> None:
            if name in shapes:  # e.g. a one-layer model whose cell calls a parameter "c" or "V"
                raise ValueError(f"parameter {name!r} of {owner} is also another part's: rename it")
            shapes[name] = tuple(shape)

        if self.embedding_size and not self.tied:
            add("E", (self.vocab_size, self.embedding_size), "the embedding")
        for k, cell in enumerate(self.cells):
            input_size = self.input_size(k)
            for name, shape in cell.param_shapes(input_size, self.hidden_size, self.bias).items():
                if not (k == 0 and self.tied and not self.embedding_size and name == INPUT_WEIGHT):
                    add(self.prefixes[k] + name, shape, f"the {cell.name} cell of layer {k}")
        for name, shape in self.output.param_shapes(self.vocab_size, self.hidden_size, self.bias).items():
            add(name, shape, "the output layer")
        if self.direct:
            add("D", (self.direct,), "the direct connections")  # 1-D: starts at zero, never L2-decayed (a bias)
        return shapes

    def input_size(self, k: int) -> int:
        """The width of layer k's input: V (words, gathered), e (the embedding) or m (the layer below)."""
        if k:
            return self.hidden_size
        return self.embedding_size or self.vocab_size

    def column_major(self) -> tuple[str, ...]:
        """Parameters stored as the transpose of a contiguous tensor: the first layer's U when it is
        gathered (no embedding), whose columns (one per word) the input term gathers."""
        return () if self.tied or self.embedding_size else (self.prefixes[0] + INPUT_WEIGHT,)

    def lookup_name(self) -> str:
        """The parameter whose rows the input words select: E, the tied output layer's V, or the first
        layer's U (its columns, stored as rows: Flat.rows)."""
        if self.tied:
            return "V"
        return "E" if self.embedding_size else self.prefixes[0] + INPUT_WEIGHT

    def row_sparse(self) -> tuple[str, ...]:
        """The parameters whose gradient a block writes in a few rows only (one per word): the one the
        input words select (lookup_name), and the output layer's `row_params` (a factorized layer touches
        the rows of the targets' classes, paths or samples; the full softmax every row, so none). A tied V
        is row-sparse only when the output layer's rows are. Every backward that writes their rows notes
        them (flat.note_rows)."""
        out = tuple(getattr(self.output, "row_params", ()))
        lookup = self.lookup_name()
        if self.tied:
            return out
        return (lookup, *out)

    def embedding(self, tensors: dict[str, Tensor]) -> Tensor:
        """The embedding E (V,e) of a model with one (the output layer's V when tied), from the
        parameters or the gradients."""
        return tensors["V"] if self.tied else tensors["E"]

    def layer_view(self, tensors: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        """Layer k's parameters (or gradients) under the cell's own names; for a tied model, layer 0's
        U is the output layer's V transposed (a view: gradients written to it land in ∂L/∂V)."""
        prefix = self.prefixes[k]
        if prefix:
            view = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        else:
            view = tensors
        if k == 0 and self.tied and not self.embedding_size:
            view = {**view, INPUT_WEIGHT: tensors["V"].t()}
        return view

    # -- state ----------------------------------------------------------------------------------------

    def initial_state(self, params: dict[str, Tensor], batch_size: int) -> State:
        """Every layer's zero state and no context (the history is <eos>)."""
        return State(tuple(cell.initial_state(self.layer_view(params, k), batch_size)
                           for k, cell in enumerate(self.cells)))

    def features(self, inputs: Tensor, context: Tensor | None) -> Tensor | None:
        """inputs (T,B), context (K−1,B)|None -> direct-connection offsets (T·B,K), or None without them."""
        if not self.direct:
            return None
        return ngram_offsets(inputs, context, self.direct_order, self.direct, self.direct_span)

    def next_context(self, inputs: Tensor, context: Tensor | None) -> Tensor | None:
        """The context (K−1,B) of the block after `inputs`; None without direct connections."""
        if not self.direct:
            return None
        return next_context(inputs, context, self.direct_order)

    # -- dropout --------------------------------------------------------------------------------------

    def dropout_sites(self) -> dict[str, tuple[float, int]]:
        """The connections dropout applies to: site -> (rate, width), rates of zero left out.
        "input": the first layer's input (X_0 (e), or A_0 (G·m) without an embedding); "layer{k}": layer
        k−1's output read by layer k; "output": the top layer's output read by the output layer."""
        d, m = self.dropout, self.hidden_size
        sites: dict[str, tuple[float, int]] = {}
        if d.input:
            first = self.embedding_size or self.cells[0].param_shapes(self.vocab_size, m, self.bias)[INPUT_WEIGHT][0]
            sites["input"] = (d.input, first)
        if d.hidden:
            sites.update({f"layer{k}": (d.hidden, m) for k in range(1, len(self.cells))})
            sites["output"] = (d.hidden, m)
        return sites

    def draw_masks(self, T: int, B: int, generator: torch.Generator, *, dtype: torch.dtype,
                   device: torch.device | str) -> Masks | None:
        """Fresh dropout masks (T,B,n) for a training block of T steps and B streams (None without dropout)."""
        sites = self.dropout_sites()
        if not sites:
            return None
        return {site: draw_mask(p, T, B, n, generator, variational=self.dropout.variational, dtype=dtype,
                                device=torch.device(device)) for site, (p, n) in sites.items()}

    # -- forward and backward -------------------------------------------------------------------------

    @staticmethod
    def _per_word(inputs: Tensor, masks: Masks | None) -> bool:
        """Whether the embedding's product runs over the block's distinct words (inputs.py): without
        dropout on the embedding (its masks are per position), and on the CPU (torch.unique would
        make a GPU wait for the count of distinct words, and a captured step cannot)."""
        return inputs.device.type == "cpu" and _mask(masks, "input") is None

    def _first_input(self, params: dict[str, Tensor], inputs: Tensor, masks: Masks | None) -> Tensor:
        """X_0 (T,B,e): the embedded words, dropped (a model with an embedding)."""
        return dropout_forward(embed_forward(self.embedding(params).t(), inputs), _mask(masks, "input"))

    def forward(self, params: dict[str, Tensor], inputs: Tensor, state: State,
                masks: Masks | None = None) -> tuple[Tensor, State, NetCache]:
        """inputs (T,B) int64, state, dropout masks|None -> (H (T,B,m) the top layer's output as the output
        layer reads it (dropped), the state after the block, cache)."""
        X: Tensor | None = None
        states, caches = [], []
        for k, cell in enumerate(self.cells):
            p = self.layer_view(params, k)
            if k == 0 and not self.embedding_size:
                A = embed_forward(p[INPUT_WEIGHT], inputs)
                if masks is not None and "input" in masks:
                    A.mul_(masks["input"])
            elif k == 0 and self._per_word(inputs, masks):
                A = lookup_project_forward(self.embedding(params), p[INPUT_WEIGHT], inputs)
            elif k == 0:
                A = project_forward(p[INPUT_WEIGHT], self._first_input(params, inputs, masks))
            else:
                A = project_forward(p[INPUT_WEIGHT], dropout_forward(X, _mask(masks, f"layer{k}")))
            X, s, cache = cell.forward(p, A, state.layers[k])
            states.append(s)
            caches.append(cache)
        features = self.features(inputs, state.context)
        new_state = State(tuple(states), self.next_context(inputs, state.context))
        return dropout_forward(X, _mask(masks, "output")), new_state, NetCache(inputs, caches, features, masks)

    def backward(self, params: dict[str, Tensor], cache: NetCache, dH: Tensor, grads: dict[str, Tensor],
                 truncation: int | None = None, trace: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        """dH (T,B,m) = ∂L/∂h̃^t of the top layer's output as the output layer read it -> accumulates every
        layer's gradients into grads (dH is overwritten).

        forward was X_0 = E[x] ⊙ mask (or A_0 = embed(U_0, x) ⊙ mask), H_k = cell_k(A_k),
        A_k = (H_{k−1} ⊙ mask_k) U_kᵀ, h̃ = H_top ⊙ mask_out; so from the top down: the mask, then
        dA_k = cell_k.backward(dH_k), then dU_k and dH_{k−1} from the input term's backward, masked.
        truncation=k applies in each layer, counted from where an error enters that layer (from the
        output layer at the top, from the layer above below it): 0 is no BPTT in any layer; in a stack
        an error can reach further back than k steps in the lower layers (tests/test_stack.py).
        trace: a dict that receives, per layer k, (the errors dH_k that arrived at its output (a copy),
        its dA_k): what `bptt diagnose` turns into ∂L/∂h at every step (the cells' hidden_errors)."""
        masks = cache.masks
        note_rows(grads, self.lookup_name(), cache.inputs)  # the rows of the words read, written below
        dH = dropout_backward(dH, _mask(masks, "output"))
        for k in range(len(self.cells) - 1, -1, -1):
            p, g = self.layer_view(params, k), self.layer_view(grads, k)
            arrived = dH.clone() if trace is not None else None  # the cell's backward may overwrite dH
            dA = self.cells[k].backward(p, cache.layers[k], dH, g, truncation)
            if trace is not None:
                trace[k] = (arrived, dA)
            if k == 0 and not self.embedding_size:
                embed_backward(cache.inputs, dropout_backward(dA, _mask(masks, "input")), g[INPUT_WEIGHT])
            elif k == 0 and self._per_word(cache.inputs, masks):
                lookup_project_backward(self.embedding(params), p[INPUT_WEIGHT], cache.inputs, dA,
                                        self.embedding(grads), g[INPUT_WEIGHT])
            elif k == 0:
                X0 = self._first_input(params, cache.inputs, masks)  # recomputed: a gather and a product
                dX = project_backward(p[INPUT_WEIGHT], X0, dA, g[INPUT_WEIGHT])
                embed_backward(cache.inputs, dropout_backward(dX, _mask(masks, "input")), self.embedding(grads).t())
            else:
                mask = _mask(masks, f"layer{k}")
                X = dropout_forward(cache.layers[k - 1].steps["H"], mask)
                dH = dropout_backward(project_backward(p[INPUT_WEIGHT], X, dA, g[INPUT_WEIGHT]), mask)

    def log_probs(self, params: dict[str, Tensor], H: Tensor, features: Tensor | None = None) -> Tensor:
        """H (N,m), features (N,K)|None -> log P(w | history) (N,V) in nats, exactly normalized."""
        direct = {} if features is None else {"features": features}
        return self.output.log_probs(params, H, **direct)

    # -- windows over time (BPTT(k1, k2)) -------------------------------------------------------------

    def join(self, first: NetCache, second: NetCache) -> NetCache:
        """The cache of two consecutive blocks as one window (features are per block: dropped)."""
        masks = None
        if first.masks is not None or second.masks is not None:
            sites = {**(first.masks or {}), **(second.masks or {})}  # site -> a mask of either block, for its shape
            masks = {site: torch.cat((_mask_or_ones(first, site, like), _mask_or_ones(second, site, like)))
                     for site, like in sites.items()}
        return NetCache(torch.cat((first.inputs, second.inputs)),
                        [join_caches(a, b) for a, b in zip(first.layers, second.layers)], masks=masks)

    def tail(self, cache: NetCache, keep: int) -> NetCache:
        """The last `keep` steps of a cache (each layer starting from its state before them)."""
        cut = max(cache.length - keep, 0)
        masks = None if cache.masks is None else {site: m[cut:] for site, m in cache.masks.items()}
        return NetCache(cache.inputs[cut:], [tail_cache(cell, c, keep) for cell, c in zip(self.cells, cache.layers)],
                        masks=masks)


def _mask(masks: Masks | None, site: str) -> Tensor | None:
    return None if masks is None else masks.get(site)


def _mask_or_ones(cache: NetCache, site: str, like: Tensor) -> Tensor:
    """The cache's mask of a site, or ones for its steps (a block run without dropout)."""
    mask = _mask(cache.masks, site)
    if mask is not None:
        return mask
    return like.new_ones(cache.length, *like.shape[1:])
