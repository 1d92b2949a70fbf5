"""ElmanLM: the seed's language model, its parameters and its explicit gradients.

    a^t = W s^{t-1} + U x^t (+ b)    s^t = F(a^t)
    g^t = V s^t (+ c) (+ Σ_k D[h_k^t + ·])   o^t = f(g^t)     (D: optional maxent direct connections)
    L   = ½ Σ_t Σ_k (d_k^t − o_k^t)²   or   −Σ_t log o_{y^t}^t

Autograd is disabled in everything here: gradients come from the written-out backward functions.
"""

from __future__ import annotations

from typing import Any

import torch

from bptt.cells.elman import ElmanCell
from bptt.cells.elman_tied import TiedElmanCell
from bptt.engine import bptt_loss_and_grads, sequence_loss, zeros_like_params
from bptt.outputs import make_output
from bptt.outputs.direct import check_direct, ngram_offsets, next_context
from bptt.regularizers import check_strengths
from bptt.rtrl import elman_rtrl

Tensor = torch.Tensor

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = ("bptt", "rtrl")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}") from None


def check_device(device: str | torch.device) -> torch.device:
    """torch.device(device), or a ValueError naming --device when CUDA is asked for but absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available in this torch build or on this machine")
    return device


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class ElmanLM:
    """Elman recurrent language model with explicit BPTT and RTRL gradients.

    params: "U" (m,V), "W" (m,m), "V" (V,m), and with bias=True "b" (m,), "c" (V,).
    tied=True ties the input weights to the output layer's (U ≡ Vᵀ, cells/elman_tied.py): no "U".
    output="class" (with `classes` C and the training `word_counts` for frequency binning) factorizes
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
    ):
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.dtype = resolve_dtype(dtype)
        self.device = check_device(device)
        self.bias = bool(bias)
        self.hidden_activation = hidden_activation
        self.output_activation = output_activation
        self.loss_name = loss
        if not isinstance(tied, bool):
            raise ValueError(f"tied must be true or false, got {tied!r}")
        self.tied = tied
        self.cell = TiedElmanCell(hidden_activation) if tied else ElmanCell(hidden_activation)
        self.output_name = output
        self.classes = (classes or 100) if output == "class" else classes  # as asked; layers may use fewer
        self.output = make_output(
            output, self.vocab_size, loss=loss, output_activation=output_activation,
            classes=self.classes or 100, word_counts=word_counts, seed=seed,
        )
        self.direct, self.direct_order = int(direct), int(direct_order)
        if self.direct:
            if not hasattr(self.output, "direct_span"):
                raise ValueError(f"direct connections need output 'softmax' or 'class', not {output!r}")
            check_direct(self.direct, self.direct_order, self.output.direct_span(self.vocab_size))
        if tied and self.output.param_shapes(self.vocab_size, self.hidden_size, self.bias).get("V") != (
            self.vocab_size, self.hidden_size
        ):
            raise ValueError(f"tied input and output weights need output 'softmax' or 'class', not {output!r}")
        self.params = self._init_params(seed, init_range)

    def _init_params(self, seed: int, init_range: float) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(int(seed))
        shapes = {
            **self.cell.param_shapes(self.vocab_size, self.hidden_size, self.bias),
            **self.output.param_shapes(self.vocab_size, self.hidden_size, self.bias),
        }
        if self.direct:
            shapes["D"] = (self.direct,)  # 1-D: starts at zero, never L2-decayed (like a bias)
        params: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            if len(shape) == 1:
                value = torch.zeros(shape, dtype=torch.float64)
            else:
                value = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * init_range
            params[name] = value.to(dtype=self.dtype, device=self.device)
        # U (m,V) is held as the transpose of a contiguous (V,m) tensor: column U[:, w] is contiguous,
        # so U x^t is a row gather and its gradient a row scatter-add.
        if "U" in params:  # a tied cell has none: it reads Vᵀ, which has this layout already
            params["U"] = params["U"].t().contiguous().t()
        return params

    # -- inputs --------------------------------------------------------------------------------------

    def _tokens(self, name: str, value: Any) -> Tensor:
        # checked where the ids are (the trainer's blocks are on the CPU), then moved: the range check
        # of a CPU block costs the GPU no synchronisation
        tokens = torch.as_tensor(value)
        if tokens.dim() != 2 or tokens.dtype in (torch.bool,) or tokens.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of shape (T, B), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(tokens.shape)}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"{name} holds word id {low if low < 0 else high}, outside [0, {self.vocab_size})")
        return tokens.to(device=self.device, dtype=torch.long)

    def direct_features(self, inputs: Tensor, context: Tensor | None = None) -> Tensor | None:
        """inputs (T,B) int64, context (K−1,B)|None -> direct-connection offsets (T·B,K), or None without them."""
        if not self.direct:
            return None
        if context is not None:
            context = torch.as_tensor(context, device=self.device).long()
            if tuple(context.shape) != (self.direct_order - 1, inputs.shape[1]):
                raise ValueError(
                    f"context must have shape (direct_order-1, B) = ({self.direct_order - 1}, {inputs.shape[1]}), "
                    f"got {tuple(context.shape)}"
                )
        span = self.output.direct_span(self.vocab_size)
        return ngram_offsets(inputs, context, self.direct_order, self.direct, span)

    def output_features(self, inputs: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        """The output layer's extra keyword for the positions of `inputs` (T,B): {"features": (T·B,K)}
        with direct connections, {} without. Pass it to output.forward / output.log_probs."""
        features = self.direct_features(inputs, context)
        return {} if features is None else {"features": features}

    def next_context(self, inputs: Tensor, context: Tensor | None = None) -> Tensor | None:
        """The context (K−1,B) of the block after `inputs` (T,B); None without direct connections."""
        if not self.direct:
            return None
        return next_context(torch.as_tensor(inputs, device=self.device).long(), context, self.direct_order)

    def initial_state(self, batch_size: int) -> Tensor:
        """s^0 = 0, (B,m)."""
        return torch.zeros(batch_size, self.hidden_size, dtype=self.dtype, device=self.device)

    def _h0(self, h0: Tensor | None, batch_size: int) -> Tensor:
        if h0 is None:
            return self.initial_state(batch_size)
        h0 = torch.as_tensor(h0, dtype=self.dtype, device=self.device)
        if tuple(h0.shape) != (batch_size, self.hidden_size):
            raise ValueError(f"h0 must have shape (B, m) = ({batch_size}, {self.hidden_size}), got {tuple(h0.shape)}")
        return h0

    def _weights(self, mask: Tensor | None, shape: torch.Size) -> Tensor | None:
        if mask is None:
            return None
        weights = torch.as_tensor(mask, device=self.device).to(self.dtype)
        if weights.shape != shape:
            raise ValueError(f"mask must have the shape of targets {tuple(shape)}, got {tuple(weights.shape)}")
        return weights

    # -- the model -----------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, inputs: Tensor, h0: Tensor | None = None) -> Tensor:
        """inputs (T,B) -> hidden states S (T,B,m), S[t] = s^{t+1}."""
        inputs = self._tokens("inputs", inputs)
        return self.cell.forward(self.params, inputs, self._h0(h0, inputs.shape[1]))

    @torch.no_grad()
    def loss(self, inputs: Tensor, targets: Tensor, h0: Tensor | None = None, mask: Tensor | None = None,
             context: Tensor | None = None) -> Tensor:
        """The training loss alone (forward only), summed over positions: a 0-d tensor.

        For output="nce" or "sampled" this is the sampled training objective, not −Σ ln P: use
        log_probs (exactly normalized) or bptt.evaluate for perplexity.
        """
        inputs, targets, weights = self.prepare(inputs, targets, mask)
        return sequence_loss(self.cell, self.output, self.params, inputs, targets, self._h0(h0, inputs.shape[1]), weights,
                             self.direct_features(inputs, context))

    @torch.no_grad()
    def log_probs(self, inputs: Tensor, h0: Tensor | None = None, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """inputs (T,B) -> (log P(w | history) (T,B,V) in nats, s^T (B,m))."""
        S = self.forward(inputs, h0)
        T, B, m = S.shape
        direct = self.output_features(self._tokens("inputs", inputs), context)
        log_p = self.output.log_probs(self.params, S.view(T * B, m), **direct)
        return log_p.view(T, B, -1), S[-1].clone()

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
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        if truncation is not None:
            if method != "bptt":
                raise ValueError("truncation applies to method='bptt' only; RTRL is always exact")
            if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 0:
                raise ValueError(f"truncation must be a non-negative integer or None, got {truncation!r}")
        ar, tar = check_strengths(ar, tar)
        inputs, targets, weights = self.prepare(inputs, targets, mask)
        h0 = self._h0(h0, inputs.shape[1])
        features = self.direct_features(inputs, context)
        if method == "rtrl":
            if self.tied:
                raise ValueError("method='rtrl' is for untied models; a tied model's gradients come from 'bptt'")
            if ar or tar:
                raise ValueError("ar and tar apply to method='bptt' only")
            return elman_rtrl(self.params, self.cell, self.output, inputs, targets, h0, weights, features)
        loss, grads, S = bptt_loss_and_grads(
            self.cell, self.output, self.params, inputs, targets, h0, truncation, weights, features=features,
            ar=ar, tar=tar,
        )
        return loss, grads, S[-1].clone()

    def zero_grads(self) -> dict[str, Tensor]:
        return zeros_like_params(self.params)

    def prepare(
        self, inputs: Any, targets: Any, mask: Any = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate a block -> (inputs (T,B) int64, targets (T,B) int64, weights (T,B) or None) on the device.

        Raises a ValueError naming the argument for a wrong shape, dtype or word id.
        """
        inputs, targets = self._tokens("inputs", inputs), self._tokens("targets", targets)
        if inputs.shape != targets.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the same (T, B) shape")
        return inputs, targets, self._weights(mask, targets.shape)

    def __repr__(self) -> str:
        return (
            f"ElmanLM(vocab_size={self.vocab_size}, hidden_size={self.hidden_size}, "
            f"hidden_activation={self.hidden_activation!r}, output_activation={self.output_activation!r}, "
            f"loss={self.loss_name!r}, bias={self.bias}, dtype={self.dtype}, device={str(self.device)!r}, "
            f"output={self.output_name!r}, classes={self.classes}, direct={self.direct}, "
            f"direct_order={self.direct_order}, tied={self.tied})"
        )
