"""A model as a PyTorch state dict: the layout of PyTorch's examples/word_language_model (RNNModel).

    RNNModel:  encoder = nn.Embedding(ntoken, ninp)
               rnn     = nn.LSTM / nn.GRU / nn.RNN(nonlinearity=tanh|relu)(ninp, nhid, nlayers, bias=bias)
               decoder = nn.Linear(nhid, ntoken, bias=bias)        log P = log_softmax(decoder(rnn(encoder(x))))

bptt name                       -> PyTorch name (k = layer; one-layer models drop the "layer0." prefix)
  E (V,e)                          encoder.weight (V,e)
  layer{k}.U (G·m,n)               rnn.weight_ih_l{k}
  layer{k}.W (G·m,m)               rnn.weight_hh_l{k}
  layer{k}.b (G·m,)                rnn.bias_ih_l{k}             (and rnn.bias_hh_l{k} = 0, see below)
  layer{k}.b_hn (m,)  (GRU)        rnn.bias_hh_l{k}[2m:3m]
  V (V,m), c (V,)                  decoder.weight, decoder.bias

The gate orders are PyTorch's already (LSTM i,f,g,o; GRU r,z,n). PyTorch keeps two biases per layer,
b_ih and b_hh; bptt keeps their sum b (and, for the GRU, b_hn apart, because the reset gate multiplies
it), so the parameters map to bias_ih = b, bias_hh = 0 (GRU: bias_hh = [0, 0, b_hn]). The network
computes the same function.

Without an embedding (the seed's Elman model: the first layer gathers the columns of U, A = U x^t)
the words are looked up in encoder.weight = U_0ᵀ (V,G·m) and rnn.weight_ih_l0 is the identity
(G·m,G·m), ninp = G·m (m for Elman): U_0ᵀ[x] passes through I unchanged, so the log-probabilities
are the same to the last bit of the products. The identity is a constant of the mapping, not a
parameter of bptt's model: the metadata lists it under "frozen". Tied models (tie_weights):
encoder.weight and decoder.weight are both the output layer's V (two tensors holding the same values,
as safetensors needs). bias=False exports no bias_* and no decoder.bias: build the torch modules with
bias=False (PyTorch's RNNModel itself always has biases; the metadata says "bias").

Gradients. Given `tensors` shaped like the parameters, export_state_dict maps them the same way. With
gradients=True (the default when tensors are given) they are read as ∂L/∂θ and mapped to the
gradients the PyTorch model's autograd gives for the same loss:
  * a bias shared by bias_ih and bias_hh: its gradient under both names (∂L/∂b_ih = ∂L/∂b_hh = ∂L/∂b;
    GRU: bias_hh gets [∂L/∂b_r, ∂L/∂b_z, ∂L/∂b_hn]);
  * tied weights: ∂L/∂V (output and input parts summed, the gradient of torch's one shared parameter)
    under both encoder.weight and decoder.weight;
  * the frozen identity rnn.weight_ih_l0 of a model without an embedding has no gradient: it is left
    out (freeze it in torch, rnn.weight_ih_l0.requires_grad_(False), to get the same gradients).
With gradients=False they are mapped like parameters (e.g. averaged or perturbed weights).

Only what PyTorch's RNNModel computes can be exported: a full softmax with cross-entropy over V and c
(output "softmax", and "nce" and "sampled", which train that same softmax), no direct connections, an
LSTM, a GRU, or an Elman cell with tanh or relu. Anything else is refused with a one-line ValueError.
"""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor

RNN_TYPES = {"lstm": "LSTM", "gru": "GRU"}  # elman: RNN_TANH / RNN_RELU by its activation
ELMAN_TYPES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
SOFTMAX_OUTPUTS = ("softmax", "nce", "sampled")  # a full softmax over V and c at evaluation
GATES = {"lstm": 4, "gru": 3, "elman": 1}


def rnn_type(model) -> str:
    """The RNNModel's rnn_type of a model ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"), or a one-line
    ValueError saying why the model has no PyTorch equivalent."""
    c = model.config
    if c.output not in SOFTMAX_OUTPUTS:
        raise ValueError(f"cannot export output={c.output!r} to PyTorch's RNNModel: its decoder is a full softmax "
                         f"(export needs output 'softmax', 'nce' or 'sampled')")
    if c.output_activation != "softmax" or c.loss != "cross_entropy":
        raise ValueError(f"cannot export output_activation={c.output_activation!r} with loss={c.loss!r} to PyTorch's "
                         f"RNNModel: it is a softmax with cross-entropy")
    if c.direct:
        raise ValueError("cannot export direct connections (direct > 0) to PyTorch's RNNModel: it has no maxent part")
    if c.cell in RNN_TYPES:
        return RNN_TYPES[c.cell]
    if c.cell == "elman":
        if c.hidden_activation not in ELMAN_TYPES:
            raise ValueError(f"cannot export an Elman cell with hidden_activation={c.hidden_activation!r}: "
                             f"torch.nn.RNN's nonlinearity is 'tanh' or 'relu'")
        return ELMAN_TYPES[c.hidden_activation]
    raise ValueError(f"cannot export cell {c.cell!r}: PyTorch's RNNModel has LSTM, GRU and RNN (elman) layers")


def torch_metadata(model) -> dict[str, Any]:
    """What rebuilds the PyTorch model: RNNModel's arguments (rnn_type, ntoken, ninp, nhid, nlayers,
    dropout, tie_weights), the modules' bias flag, the dtype, and "frozen", the exported names that
    are constants of the mapping (the identity weight_ih_l0 of a model without an embedding)."""
    c = model.config
    kind = rnn_type(model)
    e = c.embedding
    return {
        "format": "pytorch-word_language_model",
        "rnn_type": kind,
        "ntoken": c.vocab_size,
        "ninp": e or GATES[c.cell] * c.hidden_size,
        "nhid": c.hidden_size,
        "nlayers": c.layers,
        "dropout": c.dropout,
        "tie_weights": c.tied,
        "bias": c.bias,
        "nonlinearity": {"RNN_TANH": "tanh", "RNN_RELU": "relu"}.get(kind),
        "dtype": c.dtype,
        "frozen": [] if e else ["rnn.weight_ih_l0"],
    }


def _check_tensors(model, tensors: dict[str, Tensor]) -> None:
    shapes = model.net.param_shapes()
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise ValueError(f"tensors has no {missing[0]!r} (it must have the parameters' names)")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ValueError(f"tensors has {extra[0]!r}, which is not a parameter of this model")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"tensors[{name!r}] has shape {tuple(tensors[name].shape)}, the parameter {tuple(shape)}")


def export_state_dict(model, tensors: dict[str, Tensor] | None = None, *,
                      gradients: bool | None = None) -> dict[str, Tensor]:
    """The model's parameters (or `tensors` shaped like them) as an RNNModel state dict (module
    docstring): new contiguous tensors, on the model's device, in its dtype. gradients (default: True
    when tensors are given) maps them as gradients; ValueError for a model that cannot be exported."""
    rnn_type(model)
    if gradients is None:
        gradients = tensors is not None
    if gradients and tensors is None:
        raise ValueError("gradients=True needs tensors (the gradients, shaped like the parameters)")
    if tensors is None:
        tensors = model.params
    else:
        _check_tensors(model, tensors)
    net, c = model.net, model.config
    m, e = c.hidden_size, c.embedding
    copy = lambda t: t.detach().clone(memory_format=torch.contiguous_format)  # noqa: E731
    out: dict[str, Tensor] = {}
    U0 = net.layer_view(tensors, 0)["U"]  # (G·m, V) without an embedding (U_0ᵀ's rows are the words)
    out["encoder.weight"] = copy(net.embedding(tensors) if e else U0.t())
    G = GATES[c.cell]
    for k in range(c.layers):
        p = net.layer_view(tensors, k)
        if k == 0 and not e:
            if not gradients:  # the frozen identity; no gradient (module docstring)
                out["rnn.weight_ih_l0"] = torch.eye(G * m, dtype=U0.dtype, device=U0.device)
        else:
            out[f"rnn.weight_ih_l{k}"] = copy(p["U"])
        out[f"rnn.weight_hh_l{k}"] = copy(p["W"])
        if c.bias:
            out[f"rnn.bias_ih_l{k}"] = copy(p["b"])
            if gradients:  # b = b_ih + b_hh: ∂L/∂b_hh = ∂L/∂b_ih = ∂L/∂b
                hh = copy(p["b"])
            else:
                hh = torch.zeros_like(p["b"], memory_format=torch.contiguous_format)
            if c.cell == "gru":  # bias_hh = [b_hr, b_hz, b_hn]: b_hn is the GRU's own
                hh[2 * m :] = p["b_hn"]
            out[f"rnn.bias_hh_l{k}"] = hh
    out["decoder.weight"] = copy(tensors["V"])
    if c.bias:
        out["decoder.bias"] = copy(tensors["c"])
    return out
