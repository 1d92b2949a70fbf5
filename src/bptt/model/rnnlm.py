"""RNNLM: any model a ModelConfig describes (LSTM, GRU or Elman cells, stacked, an embedding, dropout,
tying), with the methods users call on their own tensors: loss_and_grads, log_probs, zero_state.

    x_0^t = E[w^t] (dropped)      a_k^t = cell_k(U_k x_k^t, state_k^{t-1})   x_k^t = h_{k-1}^t (dropped)
    log P(· | w^{≤t}) = log_softmax(V h^t + c)       L = −Σ_t log P(y^t | w^{≤t})     (nats)

The PyTorch counterpart is examples/word_language_model's RNNModel (export_torch gives its state
dict). Shapes: T time, B streams, m hidden, V vocabulary. The state is explicit (engine.network.State:
per layer the cell's state tuple, (h,) or (h, c)): passed in, returned, never kept in the model.
Dropout applies in training only: loss_and_grads(train=True) draws fresh masks from the model's own
generator (`generator`, seeded with `seed`), or uses the frozen masks it is given; log_probs never drops.
Autograd is never called: the gradients come from the engine's written-out backward functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from bptt import checks
from bptt.engine.dropout import Masks, dropout_generator
from bptt.engine.network import State
from bptt.engine.regularizers import check_strengths
from bptt.engine.stream import Stream
from bptt.engine.sweep import loss_and_grads
from bptt.model.config import ModelConfig
from bptt.model.elman import dtype_name
from bptt.model.language_model import LanguageModel

Tensor = torch.Tensor


class RNNLM(LanguageModel):
    """A recurrent language model of any cell, depth and size, with explicit BPTT gradients.

    cell "lstm" (default), "gru" or "elman"; embedding_size e (None: m for lstm and gru, none for
    elman, whose first layer gathers U x^t); dropout on the embedding, between layers and before the
    output layer (dropout_embedding, variational: see ModelConfig); tied: the embedding is the output
    layer's V. Every other ModelConfig field (forget_bias, hidden_activation, bias, classes,
    init_range, direct, ...) is a keyword. Parameters (model.params): "E" (V,e) (absent when tied),
    "U", "W", "b" (one layer; "layer{k}.U", ... in a stack; the GRU also "b_hn"), "V" (V,m), "c" (V,).
    Weights start uniform in ±init_range from a CPU generator seeded with `seed`.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        cell: str = "lstm",
        layers: int = 1,
        embedding_size: int | None = None,
        dropout: float = 0.0,
        tied: bool = False,
        output: str = "softmax",
        dtype: torch.dtype | str = torch.float32,
        seed: int = 0,
        device: str | torch.device = "cpu",
        *,
        word_counts: Any = None,
        **options: Any,
    ):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"RNNLM() got an unexpected keyword argument {unknown[0]!r}")
        checks.positive_int("vocab_size", vocab_size)
        checks.positive_int("hidden_size", hidden_size)
        checks.integer("seed", seed, 0, (1 << 64) - 1)
        config = ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, cell=cell, layers=layers,
                             embedding_size=embedding_size, dropout=dropout, tied=tied, output=output,
                             dtype=dtype_name(dtype), **options)
        super().__init__(config, word_counts=word_counts, seed=seed, device=device)
        self.seed = int(seed)
        # dropout's masks: the model's own generator, on its device (as the trainer's)
        self.generator = dropout_generator(self.seed, self.device)

    @classmethod
    def from_config(cls, config: ModelConfig, *, word_counts: Any = None, seed: int = 0,
                    device: str | torch.device = "cpu") -> RNNLM:
        """The RNNLM of a ModelConfig (e.g. a saved model's config)."""
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        return cls(**config.to_json(), word_counts=word_counts, seed=seed, device=device)

    # -- state and masks -----------------------------------------------------------------------------

    def zero_state(self, batch_size: int) -> State:
        """The state of B fresh streams: every layer at zero ((h,) or (h, c), each (B,m)), history <eos>."""
        return super().zero_state(checks.positive_int("batch_size", batch_size))

    def draw_masks(self, T: int, B: int) -> Masks | None:
        """Fresh dropout masks {site: (T,B,n)} for a block of T steps and B streams, from the model's
        generator (None without dropout): pass them to loss_and_grads(masks=...) to freeze them."""
        T, B = checks.positive_int("T", T), checks.positive_int("B", B)
        return self.net.draw_masks(T, B, self.generator, dtype=self.dtype, device=self.device)

    def _state(self, state: Any, batch_size: int) -> State:
        if state is None:
            return self.zero_state(batch_size)
        if not isinstance(state, State):
            raise ValueError(f"state must be a bptt State (model.zero_state(B) or one returned by this model), "
                             f"got {type(state).__name__}")
        zero = self.zero_state(batch_size)
        if len(state.layers) != len(zero.layers):
            raise ValueError(f"state has {len(state.layers)} layers, the model {len(zero.layers)}")
        layers = []
        for k, (given, want) in enumerate(zip(state.layers, zero.layers)):
            if len(given) != len(want):
                raise ValueError(f"state layer {k} has {len(given)} tensors, the {self.config.cell} cell {len(want)}")
            for t, w in zip(given, want):
                if tuple(t.shape) != tuple(w.shape):
                    raise ValueError(f"state layer {k} holds a tensor of shape {tuple(t.shape)}, expected (B, m) = "
                                     f"{tuple(w.shape)}")
            layers.append(tuple(torch.as_tensor(t).to(device=self.device, dtype=self.dtype) for t in given))
        context = state.context
        if self.net.direct and context is not None:
            context = self._context_ids(context, batch_size)
        return State(tuple(layers), context if self.net.direct else None)

    def _masks(self, masks: Any, T: int, B: int) -> Masks | None:
        sites = self.net.dropout_sites()
        if not isinstance(masks, dict):
            raise ValueError(f"masks must be a dict {{site: (T,B,n) tensor}} as draw_masks gives, got "
                             f"{type(masks).__name__}")
        if set(masks) != set(sites):
            raise ValueError(f"masks has the sites {sorted(masks)}, the model's dropout {sorted(sites)}")
        out = {}
        for site, (_, n) in sites.items():
            mask = torch.as_tensor(masks[site]).to(device=self.device, dtype=self.dtype)
            if tuple(mask.shape) != (T, B, n):
                raise ValueError(f"masks[{site!r}] must have shape (T, B, n) = {(T, B, n)}, got {tuple(mask.shape)}")
            out[site] = mask
        return out

    # -- the model -----------------------------------------------------------------------------------

    @torch.no_grad()
    def loss_and_grads(
        self,
        inputs: Tensor,
        targets: Tensor,
        state: State | None = None,
        *,
        mask: Tensor | None = None,
        truncation: int | None = None,
        train: bool = True,
        masks: Masks | None = None,
        ar: float = 0.0,
        tar: float = 0.0,
    ) -> tuple[Tensor, dict[str, Tensor], State]:
        """inputs, targets (T,B) int; state|None (zero) -> (loss 0-d, grads {name: like params}, state after).

        loss is −Σ ln P(target) over the T·B positions in nats (the output layer's training loss:
        the sampled objective for output "nce"/"sampled"); grads its gradients, by BPTT through the
        whole block or, with truncation=k, through at most k recurrent connections. mask (T,B):
        positions with 0/False count no loss and send no gradient. The state given is a constant (no
        gradient flows into it); the one returned is the state after the block, to carry into the
        next. train=True drops units as the model's dropout says (fresh masks from `generator`, or the
        frozen `masks` of draw_masks); train=False drops nothing. ar, tar: AR and TAR penalties on
        the top layer's output (in the gradients, not in the loss).
        """
        checks.flag("train", train)
        truncation = checks.optional_int("truncation", truncation)
        ar, tar = check_strengths(ar, tar)
        inputs, targets, weights = self.prepare(inputs, targets, mask)
        T, B = inputs.shape
        start = self._state(state, B)
        if not train:
            if masks is not None:
                raise ValueError("masks apply in training (train=True); train=False drops nothing")
            drawn = None
        elif masks is not None:
            drawn = self._masks(masks, T, B)
        else:
            drawn = self.net.draw_masks(T, B, self.generator, dtype=self.dtype, device=self.device)
        loss, grads, new_state = loss_and_grads(self.net, self.params, inputs, targets, start, truncation=truncation,
                                                weights=weights, grads=self.zero_grads(), ar=ar, tar=tar, masks=drawn)
        return loss, grads, new_state.map(torch.clone)

    @torch.no_grad()
    def log_probs(self, inputs: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """inputs (T,B) int; state|None (zero) -> (log P(w | history) (T,B,V) in nats, exactly normalized,
        with nothing dropped; the state after the block)."""
        inputs = self._tokens("inputs", inputs)
        B = inputs.shape[1]
        stream = Stream(self, B, self._state(state, B))
        log_p = stream.log_probs(inputs)
        return log_p, stream.state.map(torch.clone)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.to_json().items())
        return f"RNNLM({fields}, seed={self.seed}, device={str(self.device)!r})"
