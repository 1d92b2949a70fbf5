"""LanguageModel: a recurrent language model built from a ModelConfig — its parameters, in one flat
buffer, and its network (engine.network.Network: input term, cells, output layer).

    a_k^t = cell_k(U_k x_k^t, state_k^{t-1})   x_0^t the word read at t, x_k^t = h_{k-1}^t above it
    g^t   = V h^t (+ c) (+ Σ_k D[h_k^t + ·])    o^t = f(g^t)     (D: optional maxent direct connections)
    L     = ½ Σ_t Σ_k (d_k^t − o_k^t)²   or   −Σ_t log o_{y^t}^t

Weights start uniform in [-init_range, init_range] from a CPU generator seeded with `seed`, drawn in
the order of the network's parameters (so a seed gives the same model on every device); biases and
D start at zero. The first layer's U is stored column-major (its columns, one per word, are gathered).

Everything the commands, the trainer and the engine need lives here; the methods users call on a
model with their own tensors (forward, loss, log_probs, loss_and_grads) are those of ElmanLM
(model/elman.py), the seed's model and the public face of the paper. Internally every caller runs
the network through the engine (sweep, tbptt, stream) with an explicit State.
"""

from __future__ import annotations

from typing import Any

import torch

from bptt import checks
from bptt.engine.cells import CELLS
from bptt.engine.dropout import Dropout
from bptt.engine.flat import Flat
from bptt.engine.inputs import check_word_ids, integer_ids
from bptt.engine.network import Network, State
from bptt.engine.outputs import make_output
from bptt.model.config import ModelConfig
from bptt.model.export import export_state_dict, torch_metadata

Tensor = torch.Tensor


def build_network(config: ModelConfig, *, word_counts: Any = None, seed: int = 0) -> Network:
    """The network of a configuration (its cells and output layer; no parameters are allocated):
    what LanguageModel runs, and what storage and the memory guard read the parameter shapes from."""
    cells = [CELLS[config.cell](**config.cell_options()) for _ in range(config.layers)]
    output = make_output(config.output, config.vocab_size, loss=config.loss, output_activation=config.output_activation,
                         classes=config.classes, class_binning=config.class_binning, word_counts=word_counts,
                         seed=seed)
    dropout = Dropout(config.input_dropout, config.dropout, config.variational)
    return Network(cells, output, vocab_size=config.vocab_size, hidden_size=config.hidden_size, bias=config.bias,
                   tied=config.tied, direct=config.direct, direct_order=config.direct_order,
                   embedding_size=config.embedding, dropout=dropout)


class LanguageModel:
    """config (ModelConfig, with its vocab_size) -> model; word_counts (V,) for the layers that use
    frequencies (class binning, the Huffman tree, the noise distribution); seed; device."""

    def __init__(self, config: ModelConfig, *, word_counts: Any = None, seed: int = 0,
                 device: str | torch.device = "cpu"):
        config.validate()
        if config.vocab_size == 0:
            raise ValueError("vocab_size must be an integer, at least 2, got 0")
        self.config = config
        self.vocab_size, self.hidden_size = config.vocab_size, config.hidden_size
        self.dtype = config.torch_dtype
        self.device = checks.device(device)
        self.net = build_network(config, word_counts=word_counts, seed=seed)
        self.output = self.net.output
        self.flat = Flat(self.net.param_shapes(), dtype=self.dtype, device=self.device,
                         column_major=self.net.column_major(), unpadded=self.net.row_sparse())
        self.params: dict[str, Tensor] = self.flat  # {name: view into self.flat.data}
        self._init_params(seed, config.init_range)

    INIT_CHUNK = 1 << 24  # values drawn at once by _init_params (a 128 MiB float64 buffer, reused)

    def _init_params(self, seed: int, init_range: float) -> None:
        """Every weight matrix uniform in [-init_range, init_range]: (rand·2 − 1)·init_range drawn in float64
        from one seeded CPU generator, matrix after matrix in row-major order, then cast to the model's
        dtype. Drawn a block of rows at a time into one reused buffer (the generator's stream does not
        depend on how it is cut), so that a 658k-word model does not hold 2.7 GB float64 copies."""
        generator = torch.Generator().manual_seed(int(seed))
        buffer = torch.empty(0, dtype=torch.float64)
        for name, p in self.params.items():
            if p.dim() == 1:
                continue  # biases and D start at zero (the buffer's)
            rows, per_row = p.shape[0], p[0].numel()
            step = max(1, self.INIT_CHUNK // max(per_row, 1))
            for start in range(0, rows, step):
                block = p[start : start + step]
                if buffer.numel() < block.numel():
                    buffer = torch.empty(block.numel(), dtype=torch.float64)
                value = buffer[: block.numel()].view(block.shape)
                torch.rand(block.shape, generator=generator, dtype=torch.float64, out=value)
                block.copy_(value.mul_(2).sub_(1).mul_(init_range))
        for k, cell in enumerate(self.net.cells):  # a cell's own starting values, if it has any
            initialize = getattr(cell, "initialize", None)
            if initialize is not None:
                initialize(self.net.layer_view(self.params, k), init_range, generator)

    # -- buffers and state ---------------------------------------------------------------------------

    def zero_grads(self) -> Flat:
        """Gradient buffers: a Flat with the parameters' names, shapes and layout, all zero."""
        return self.flat.like()

    def zero_state(self, batch_size: int) -> State:
        """The state of B fresh streams: every layer at zero, the history <eos>."""
        return self.net.initial_state(self.params, batch_size)

    # -- inputs --------------------------------------------------------------------------------------

    def _tokens(self, name: str, value: Any, check: bool = True) -> Tensor:
        # checked where the ids are (the trainer's blocks are on the CPU), then moved: the range check
        # of a CPU block costs the GPU no synchronisation
        tokens = torch.as_tensor(value)
        if not check:
            return tokens.to(device=self.device, dtype=torch.long)
        if tokens.dim() != 2 or not integer_ids(tokens):
            raise ValueError(f"{name} must be an integer tensor of shape (T, B), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(tokens.shape)}")
        check_word_ids(name, tokens, self.vocab_size)
        return tokens.to(device=self.device, dtype=torch.long)

    def _context_ids(self, value: Any, batch_size: int) -> Tensor:
        """The direct connections' history (direct_order−1, B) of word ids, checked like inputs."""
        order = self.net.direct_order
        context = torch.as_tensor(value)
        if not integer_ids(context):
            raise ValueError(f"context must hold integer word ids, got {context.dtype}")
        if tuple(context.shape) != (order - 1, batch_size):
            raise ValueError(f"context must have shape (direct_order-1, B) = ({order - 1}, {batch_size}), "
                             f"got {tuple(context.shape)}")
        check_word_ids("context", context, self.vocab_size)
        return context.to(device=self.device, dtype=torch.long)

    def _weights(self, mask: Tensor | None, shape: torch.Size) -> Tensor | None:
        if mask is None:
            return None
        weights = torch.as_tensor(mask, device=self.device).to(self.dtype)
        if weights.shape != shape:
            raise ValueError(f"mask must have the shape of targets {tuple(shape)}, got {tuple(weights.shape)}")
        return weights

    def prepare(
        self, inputs: Any, targets: Any, mask: Any = None, check: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate a block -> (inputs (T,B) int64, targets (T,B) int64, weights (T,B) or None) on the device.

        Raises a ValueError naming the argument for a wrong shape, dtype or word id. check=False skips
        the word-id range check (ids known to be valid, e.g. already on a GPU: the check would read
        them back to the host).
        """
        inputs, targets = self._tokens("inputs", inputs, check), self._tokens("targets", targets, check)
        if inputs.shape != targets.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the same (T, B) shape")
        return inputs, targets, self._weights(mask, targets.shape)

    # -- PyTorch ---------------------------------------------------------------------------------------

    def export_torch(self, tensors: dict[str, Tensor] | None = None, *,
                     gradients: bool | None = None) -> dict[str, Tensor]:
        """The parameters (or `tensors` shaped like them) as a state dict of PyTorch's
        examples/word_language_model RNNModel (encoder.weight, rnn.weight_ih_l{k}, ..., decoder.bias):
        new tensors, on the model's device. gradients (default: True when tensors are given) maps
        gradients to the PyTorch model's autograd gradients (a shared bias under bias_ih and bias_hh).
        ValueError for a model PyTorch's RNNModel cannot express (model/export.py)."""
        return export_state_dict(self, tensors, gradients=gradients)

    def torch_metadata(self) -> dict[str, Any]:
        """What rebuilds the PyTorch model of export_torch: rnn_type ("LSTM", "GRU", "RNN_TANH",
        "RNN_RELU"), ntoken, ninp, nhid, nlayers, dropout, tie_weights, bias, nonlinearity, dtype and
        "frozen" (names that are constants of the mapping). ValueError as for export_torch."""
        return torch_metadata(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.to_json().items())
        return f"{type(self).__name__}({fields}, device={str(self.device)!r})"
