"""ElmanLM: the seed's language model, its parameters and its explicit gradients.

    a^t = W s^{t-1} + U x^t (+ b)    s^t = F(a^t)
    g^t = V s^t (+ c) (+ Σ_k D[h_k^t + ·])   o^t = f(g^t)     (D: optional maxent direct connections)
    L   = ½ Σ_t Σ_k (d_k^t − o_k^t)²   or   −Σ_t log o_{y^t}^t

A LanguageModel with one Elman layer, built from the seed's arguments, with the methods of the paper:
forward, loss, log_probs, loss_and_grads (BPTT, truncated BPTT, or RTRL) on (T,B) token tensors and
a hidden state h0 (B,m). Autograd is disabled in everything here: gradients come from the
written-out backward functions of the engine.
"""

from __future__ import annotations

import dataclasses

from typing import Any

import torch

from bptt import checks
from bptt.engine.network import State
from bptt.engine.regularizers import check_strengths
from bptt.engine.rtrl import elman_rtrl
from bptt.engine.stream import Stream
from bptt.engine.sweep import loss_and_grads, sequence_loss
from bptt.model.config import DTYPES, ModelConfig
from bptt.model.language_model import LanguageModel

Tensor = torch.Tensor
METHODS = ("bptt", "rtrl")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float32", "torch.float64", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


class ElmanLM(LanguageModel):
    """Elman recurrent language model with explicit BPTT and RTRL gradients.

    params: "U" (m,V), "W" (m,m), "V" (V,m), and with bias=True "b" (m,), "c" (V,).
    tied=True ties the input weights to the output layer's (U ≡ Vᵀ, engine/network.py): no "U".
    output="class" (with `classes` C, the training `word_counts` and `class_binning`, "frequency" or "sqrt") factorizes
    the softmax: P(w|h) = P(class(w)|h) P(w|class(w),h), adding "Vc" (C,m) and "cc" (C,).
    Weights start uniform in [-init_range, init_range] from a generator seeded with `seed` (drawn on
    the CPU, so a seed gives the same model on every device); biases start at zero.
    direct=H > 0 adds maxent direct connections (rnnlm -direct): "D" (H,), hashed n-gram features of
    orders 0 .. direct_order−1 of the input history added to the output scores (outputs/direct.py);
    D starts at zero. Methods that take `context` accept the last direct_order−1 input words before
    the block (K−1,B), as next_context returns them; None means the history is <eos>.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        hidden_activation: str = "tanh",
        output_activation: str = "softmax",
        loss: str = "cross_entropy",
        bias: bool = True,
        dtype: torch.dtype | str = torch.float32,
        seed: int = 0,
        device: str | torch.device = "cpu",
        init_range: float = 0.1,
        output: str = "softmax",
        classes: int | None = None,
        word_counts: Any = None,
        direct: int = 0,
        direct_order: int = 3,
        tied: bool = False,
        class_binning: str = "frequency",
    ):
        checks.positive_int("vocab_size", vocab_size)
        checks.positive_int("hidden_size", hidden_size)
        checks.integer("seed", seed, 0, (1 << 64) - 1)
        config = ModelConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, cell="elman", layers=1, hidden_activation=hidden_activation,
            output=output, output_activation=output_activation, loss=loss, classes=100 if classes is None else classes,
            class_binning=class_binning, bias=bias,
            direct=int(direct), direct_order=int(direct_order), tied=tied, dtype=dtype_name(dtype),
            init_range=init_range,
        )
        super().__init__(config, word_counts=word_counts, seed=seed, device=device)
        self.classes = (100 if classes is None else classes) if output == "class" else classes  # as asked

    # what a ModelConfig may hold that ElmanLM has no argument for: these must keep their defaults
    NOT_REPRESENTED = ("forget_bias", "dropout", "dropout_embedding", "variational")

    @staticmethod
    def represents(config: ModelConfig) -> bool:
        """Whether `config` is a model ElmanLM builds as it is: one Elman layer reading U x^t (no embedding),
        no dropout (bptt.RNNLM builds the others, Elman ones included)."""
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        return (config.cell == "elman" and config.layers == 1 and config.embedding == 0
                and all(getattr(config, name) == defaults[name] for name in ElmanLM.NOT_REPRESENTED))

    @classmethod
    def from_config(cls, config: ModelConfig, *, word_counts: Any = None, seed: int = 0,
                    device: str | torch.device = "cpu") -> ElmanLM:
        """The ElmanLM of a one-layer Elman ModelConfig (e.g. a saved model's); ValueError for a config it
        cannot represent (an embedding, dropout: bptt.build_model gives an RNNLM for those)."""
        if not cls.represents(config):
            raise ValueError(f"ElmanLM is one Elman layer reading words directly, without dropout; this config "
                             f"(cell={config.cell!r} layers={config.layers} embedding={config.embedding} "
                             f"dropout={config.dropout}) is an RNNLM's: use bptt.build_model or bptt.RNNLM")
        c = config
        model = cls(c.vocab_size, c.hidden_size, c.hidden_activation, c.output_activation, c.loss, c.bias, c.dtype,
                    seed, device, c.init_range, c.output, c.classes, word_counts, c.direct, c.direct_order, c.tied,
                    c.class_binning)
        return model

    # -- the seed's names ----------------------------------------------------------------------------

    hidden_activation = property(lambda self: self.config.hidden_activation)
    output_activation = property(lambda self: self.config.output_activation)
    loss_name = property(lambda self: self.config.loss)
    bias = property(lambda self: self.config.bias)
    tied = property(lambda self: self.config.tied)
    output_name = property(lambda self: self.config.output)
    direct = property(lambda self: self.config.direct)
    direct_order = property(lambda self: self.config.direct_order)
    cell = property(lambda self: self.net.cells[0])

    # -- inputs --------------------------------------------------------------------------------------

    def _context(self, context: Any, batch_size: int) -> Tensor | None:
        if context is None or not self.direct:
            return None
        return self._context_ids(context, batch_size)

    def _state(self, h0: Tensor | None, batch_size: int, context: Any = None) -> State:
        return State(((self._h0(h0, batch_size),),), self._context(context, batch_size))

    def _h0(self, h0: Tensor | None, batch_size: int) -> Tensor:
        if h0 is None:
            return self.initial_state(batch_size)
        h0 = torch.as_tensor(h0, dtype=self.dtype, device=self.device)
        if tuple(h0.shape) != (batch_size, self.hidden_size):
            raise ValueError(f"h0 must have shape (B, m) = ({batch_size}, {self.hidden_size}), got {tuple(h0.shape)}")
        return h0

    def initial_state(self, batch_size: int) -> Tensor:
        """s^0 = 0, (B,m)."""
        return torch.zeros(batch_size, self.hidden_size, dtype=self.dtype, device=self.device)

    def direct_features(self, inputs: Tensor, context: Tensor | None = None) -> Tensor | None:
        """inputs (T,B) int64, context (K−1,B)|None -> direct-connection offsets (T·B,K), or None without them."""
        return self.net.features(inputs, self._context(context, inputs.shape[1]))

    def output_features(self, inputs: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        """The output layer's extra keyword for the positions of `inputs` (T,B): {"features": (T·B,K)}
        with direct connections, {} without. Pass it to output.forward / output.log_probs."""
        features = self.direct_features(inputs, context)
        return {} if features is None else {"features": features}

    def next_context(self, inputs: Tensor, context: Tensor | None = None) -> Tensor | None:
        """The context (K−1,B) of the block after `inputs` (T,B); None without direct connections."""
        return self.net.next_context(torch.as_tensor(inputs, device=self.device).long(), context)

    # -- the model -----------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, inputs: Tensor, h0: Tensor | None = None) -> Tensor:
        """inputs (T,B) -> hidden states S (T,B,m), S[t] = s^{t+1}."""
        inputs = self._tokens("inputs", inputs)
        return self.net.forward(self.params, inputs, self._state(h0, inputs.shape[1]))[0]

    @torch.no_grad()
    def loss(self, inputs: Tensor, targets: Tensor, h0: Tensor | None = None, mask: Tensor | None = None,
             context: Tensor | None = None) -> Tensor:
        """The training loss alone (forward only), summed over positions: a 0-d tensor.

        For output="nce" or "sampled" this is the sampled training objective, not −Σ ln P: use
        log_probs (exactly normalized) or bptt.evaluation for perplexity.
        """
        inputs, targets, weights = self.prepare(inputs, targets, mask)
        state = self._state(h0, inputs.shape[1], context)
        return sequence_loss(self.net, self.params, inputs, targets, state, weights=weights)

    @torch.no_grad()
    def log_probs(self, inputs: Tensor, h0: Tensor | None = None, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """inputs (T,B) -> (log P(w | history) (T,B,V) in nats, s^T (B,m))."""
        inputs = self._tokens("inputs", inputs)
        B = inputs.shape[1]
        stream = Stream(self, B, self._state(h0, B, context))
        return stream.log_probs(inputs), stream.state.hidden.clone()

    @torch.no_grad()
    def loss_and_grads(
        self,
        inputs: Tensor,
        targets: Tensor,
        h0: Tensor | None = None,
        method: str = "bptt",
        truncation: int | None = None,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        ar: float = 0.0,
        tar: float = 0.0,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """inputs, targets (T,B) int; h0 (B,m)|None -> (loss 0-d, grads {name: like params}, s^T (B,m)).

        loss is the sum over all T·B positions (quadratic: ½ Σ over positions and vocabulary;
        cross-entropy: −Σ ln o_target). method="bptt" (reverse mode, optional truncation=k) or
        "rtrl" (forward mode, exact, small models only). mask (T,B): positions with 0/False count
        no loss and send no gradient. h0 is a constant: no gradient flows into it. ar, tar: AR and
        TAR penalties on the states (regularizers.py; in the gradients, not in the loss; bptt only).
        """
        checks.choice("method", method, METHODS)
        if truncation is not None:
            if method != "bptt":
                raise ValueError("truncation applies to method='bptt' only; RTRL is always exact")
            checks.optional_int("truncation", truncation)
        ar, tar = check_strengths(ar, tar)
        inputs, targets, weights = self.prepare(inputs, targets, mask)
        state = self._state(h0, inputs.shape[1], context)
        if method == "rtrl":
            if self.tied:
                raise ValueError("method='rtrl' is for untied models; a tied model's gradients come from 'bptt'")
            if ar or tar:
                raise ValueError("ar and tar apply to method='bptt' only")
            features = self.net.features(inputs, state.context)
            return elman_rtrl(self.params, self.cell, self.output, inputs, targets, state.hidden, weights, features)
        loss, grads, state = loss_and_grads(self.net, self.params, inputs, targets, state, truncation=truncation,
                                            weights=weights, grads=self.zero_grads(), ar=ar, tar=tar)
        return loss, grads, state.hidden.clone()

    def __repr__(self) -> str:
        return (
            f"ElmanLM(vocab_size={self.vocab_size}, hidden_size={self.hidden_size}, "
            f"hidden_activation={self.hidden_activation!r}, output_activation={self.output_activation!r}, "
            f"loss={self.loss_name!r}, bias={self.bias}, dtype={self.dtype}, device={str(self.device)!r}, "
            f"output={self.output_name!r}, classes={self.classes}, class_binning={self.config.class_binning!r}, "
            f"direct={self.direct}, "
            f"direct_order={self.direct_order}, tied={self.tied})"
        )
