"""Two autograd references for a whole network of Elman, LSTM or GRU layers (issue 17, "Checks").

Nothing here comes from bptt.engine: the equations are written again from the docstrings of
engine/cells/lstm.py, engine/cells/gru.py, engine/dropout.py and engine/network.py, one step at a time,
and autograd differentiates them. Only the parameter dicts (names -> tensors) are read.

1. `reference_loss` / `reference_grads`: the equations as they read.
     X_0^t = E[x^t] ⊙ mask_in^t                    (with an embedding E (V,e); tied: E ≡ V)
     A_0^t = X_0^t U_0ᵀ,  or  A_0^t = (onehot(x^t) U_0ᵀ) ⊙ mask_in^t   (no embedding; tied: U_0 ≡ Vᵀ)
     A_k^t = (h_{k−1}^t ⊙ mask_k^t) U_kᵀ             (layer k > 0 reads the layer below)
     h_k^t = cell_k(A_k^t, state_k^{t−1})            (elman, lstm, gru: the functions *_step below)
     ℓ^t   = −ln softmax((h_top^t ⊙ mask_out^t) Vᵀ + c)_{y^t}     L = Σ_{t,b} w^t ℓ^t
   Truncation k follows the engine's (Network.backward): in each layer, an error that enters the
   layer at step t (from the output layer at the top, from the layer above below it) travels back
   through at most k of that layer's recurrent connections. Written here by recomputing each layer's
   output at t over its last k+1 steps from the true state before them, taken as a constant (O(T·k)
   per layer): the output at t then depends on the inputs of steps t−k..t only, each of which is the
   layer below's output, recomputed the same way from its own true state.

2. `torch_nn_grads`: PyTorch's own modules, torch.nn.LSTM / GRU / RNN (bptt's U, W as weight_ih,
   weight_hh; LSTM and RNN: bias_ih = b, bias_hh = 0; GRU: bias_ih = b, bias_hh = [0, 0, b_hn]) with an
   embedding lookup (torch.nn.functional.embedding of E, the same Parameter as the output layer's
   weight when tied), torch.nn.functional.linear and cross_entropy; the masks multiply the tensors
   between the modules. A stack without masks between its layers is one module of num_layers = L.

Shapes: T time, B streams, m hidden, V vocabulary, e embedding, G gates (elman 1, gru 3, lstm 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

Tensor = torch.Tensor
GATES = {"elman": 1, "gru": 3, "lstm": 4}
_F = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}


@dataclass(frozen=True)
class Spec:
    """What the references need to know of a model: its cell, depth, sizes and the tying."""

    cell: str
    layers: int
    vocab: int
    hidden: int
    embedding: int  # e; 0: the first layer reads one-hot words
    tied: bool
    activation: str = "tanh"  # the Elman cell's F

    @staticmethod
    def of(config) -> Spec:
        """From a bptt.model.ModelConfig (its `embedding` is the size in effect)."""
        return Spec(config.cell, config.layers, config.vocab_size, config.hidden_size, config.embedding, config.tied,
                    config.hidden_activation)

    def prefix(self, k: int) -> str:
        return "" if self.layers == 1 else f"layer{k}."

    def layer(self, params: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        """Layer k's U, W (and b, b_hn) under their short names; tied without an embedding: U_0 = Vᵀ."""
        p = {n: params[self.prefix(k) + n] for n in ("U", "W", "b", "b_hn") if self.prefix(k) + n in params}
        if k == 0 and self.tied and not self.embedding:
            p["U"] = params["V"].T
        return p

    def embedding_matrix(self, params: dict[str, Tensor]) -> Tensor:
        return params["V"] if self.tied else params["E"]


# -- the cells, one step, as the docstrings write them ------------------------------------------------------


def elman_step(p: dict, a_in: Tensor, state: tuple, activation: str = "tanh") -> tuple:
    """a = U x + W h + b;  h = F(a)."""
    (h,) = state
    a = a_in + h @ p["W"].T
    if "b" in p:
        a = a + p["b"]
    return (_F[activation](a),)


def lstm_step(p: dict, a_in: Tensor, state: tuple) -> tuple:
    """[a_i a_f a_g a_o] = U x + W h + b;  c = σ(a_f) c + σ(a_i) tanh(a_g);  h = σ(a_o) tanh(c)."""
    h, c = state
    a = a_in + h @ p["W"].T
    if "b" in p:
        a = a + p["b"]
    a_i, a_f, a_g, a_o = a.chunk(4, dim=-1)
    c = torch.sigmoid(a_f) * c + torch.sigmoid(a_i) * torch.tanh(a_g)
    return torch.sigmoid(a_o) * torch.tanh(c), c


def gru_step(p: dict, a_in: Tensor, state: tuple) -> tuple:
    """r = σ(A_r + b_r + W_hr h);  z = σ(A_z + b_z + W_hz h);  n = tanh(A_n + b_n + r (W_hn h + b_hn));
    h' = (1 − z) n + z h."""
    (h,) = state
    x_r, x_z, x_n = a_in.chunk(3, dim=-1)
    W_r, W_z, W_n = p["W"].chunk(3, dim=0)
    if "b" in p:
        b_r, b_z, b_n = p["b"].chunk(3)
        x_r, x_z, x_n = x_r + b_r, x_z + b_z, x_n + b_n
    r = torch.sigmoid(x_r + h @ W_r.T)
    z = torch.sigmoid(x_z + h @ W_z.T)
    q = h @ W_n.T
    if "b_hn" in p:
        q = q + p["b_hn"]
    n = torch.tanh(x_n + r * q)
    return ((1 - z) * n + z * h,)


def _step(spec: Spec):
    if spec.cell == "elman":
        return lambda p, a, s: elman_step(p, a, s, spec.activation)
    return {"lstm": lstm_step, "gru": gru_step}[spec.cell]


# -- the whole network ------------------------------------------------------------------------------------


def _mask(masks: dict | None, site: str, t: int):
    return None if masks is None or site not in masks else masks[site][t]


def _dropped(x: Tensor, mask) -> Tensor:
    return x if mask is None else x * mask


def _run_layer(spec: Spec, p: dict, inputs: list[Tensor], state0: tuple, truncation: int | None):
    """The layer over T steps from state0 -> (outputs h^1..h^T, the final state (detached)).
    inputs: the input terms A^t (graphs reaching the parameters below)."""
    step = _step(spec)
    T = len(inputs)
    if truncation is None:
        state, outs = tuple(state0), []
        for t in range(T):
            state = step(p, inputs[t], state)
            outs.append(state[0])
        return outs, tuple(s.detach() for s in state)
    with torch.no_grad():  # the true states, where truncated paths start
        states = [tuple(state0)]
        for t in range(T):
            states.append(step(p, inputs[t], states[-1]))
    outs = []
    for t in range(T):
        start = max(0, t - truncation)
        state = tuple(s.detach() for s in states[start])
        for tau in range(start, t + 1):
            state = step(p, inputs[tau], state)
        outs.append(state[0])
    return outs, states[-1]


def reference_loss(spec: Spec, params: dict[str, Tensor], inputs: Tensor, targets: Tensor,
                   state0: Sequence[Sequence[Tensor]], *, masks: dict | None = None, weights: Tensor | None = None,
                   truncation: int | None = None) -> tuple[Tensor, list[tuple]]:
    """inputs, targets (T,B); state0 per layer the cell's state ((h,) or (h, c)); masks {site: (T,B,n)}
    -> (L = Σ w^t ℓ^t, the final state per layer)."""
    T, B = inputs.shape
    dtype = next(iter(params.values())).dtype
    if spec.embedding:
        E = spec.embedding_matrix(params)
        xs = [_dropped(E[inputs[t]], _mask(masks, "input", t)) for t in range(T)]  # a row lookup: E[x]
    else:
        xs = [nnf.one_hot(inputs[t], spec.vocab).to(dtype) for t in range(T)]
    final = []
    for k in range(spec.layers):
        p = spec.layer(params, k)
        if k == 0 and not spec.embedding:
            A = [_dropped(xs[t] @ p["U"].T, _mask(masks, "input", t)) for t in range(T)]
        elif k == 0:
            A = [xs[t] @ p["U"].T for t in range(T)]
        else:
            A = [_dropped(xs[t], _mask(masks, f"layer{k}", t)) @ p["U"].T for t in range(T)]
        xs, last = _run_layer(spec, p, A, tuple(state0[k]), truncation)
        final.append(last)
    total = torch.zeros((), dtype=dtype)
    for t in range(T):
        logits = _dropped(xs[t], _mask(masks, "output", t)) @ params["V"].T
        if "c" in params:
            logits = logits + params["c"]
        per = -torch.log_softmax(logits, dim=-1).gather(1, targets[t].unsqueeze(1)).squeeze(1)
        total = total + (per if weights is None else per * weights[t]).sum()
    return total, final


def reference_grads(spec: Spec, params: dict[str, Tensor], inputs: Tensor, targets: Tensor, state0, **options):
    """(loss, {name: ∂L/∂name}, final state per layer) of reference_loss, by autograd."""
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        total, final = reference_loss(spec, leaves, inputs, targets, state0, **options)
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return total.detach(), {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(leaves, grads)}, final


# -- PyTorch's modules ------------------------------------------------------------------------------------


def _torch_module(spec: Spec, input_size: int, num_layers: int, bias: bool, dtype) -> torch.nn.RNNBase:
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}[spec.cell]
    extra = {"nonlinearity": spec.activation} if spec.cell == "elman" else {}
    return cls(input_size, spec.hidden, num_layers=num_layers, bias=bias, dtype=dtype, **extra)


def torch_nn_grads(spec: Spec, params: dict[str, Tensor], inputs: Tensor, targets: Tensor, state0, *,
                   masks: dict | None = None, weights: Tensor | None = None):
    """(loss, {name: ∂L/∂name}, final state per layer, top outputs (T,B,m)) of the network built from
    torch.nn modules. Refuses input dropout without an embedding (a mask on U x^t: no such module)."""
    masks = masks or {}
    if "input" in masks and not spec.embedding:
        raise ValueError("torch.nn has no dropout on the input term U x^t")
    dtype = params["V"].dtype
    T, B = inputs.shape
    m, G = spec.hidden, GATES[spec.cell]
    bias = "b" in spec.layer(params, 0)
    between = any(f"layer{k}" in masks for k in range(1, spec.layers))
    groups = [[k] for k in range(spec.layers)] if between else [list(range(spec.layers))]
    out_layer = torch.nn.Linear(m, spec.vocab, bias="c" in params, dtype=dtype)
    modules = []
    with torch.no_grad():
        out_layer.weight.copy_(params["V"])
        if "c" in params:
            out_layer.bias.copy_(params["c"])
        for group in groups:
            first = group[0]
            input_size = (spec.embedding or spec.vocab) if first == 0 else m
            module = _torch_module(spec, input_size, len(group), bias, dtype)
            for j, k in enumerate(group):
                p = spec.layer(params, k)
                getattr(module, f"weight_ih_l{j}").copy_(p["U"])
                getattr(module, f"weight_hh_l{j}").copy_(p["W"])
                if bias:
                    getattr(module, f"bias_ih_l{j}").copy_(p["b"])
                    hh = getattr(module, f"bias_hh_l{j}")
                    hh.zero_()
                    if spec.cell == "gru":
                        hh[2 * m:] = p["b_hn"]
            modules.append(module)
        if spec.embedding and not spec.tied:
            embedding_weight = torch.nn.Parameter(params["E"].detach().clone())
        elif spec.embedding:
            embedding_weight = out_layer.weight  # one Parameter: the product rule is autograd's
    with torch.enable_grad():
        if spec.embedding:
            x = nnf.embedding(inputs, embedding_weight)
            if "input" in masks:
                x = x * masks["input"]
        else:
            x = nnf.one_hot(inputs, spec.vocab).to(dtype)
        final = []
        for module, group in zip(modules, groups):
            if group[0]:
                x = x * masks[f"layer{group[0]}"]
            h0 = torch.stack([state0[k][0] for k in group])
            if spec.cell == "lstm":
                c0 = torch.stack([state0[k][1] for k in group])
                x, (h_n, c_n) = module(x, (h0, c0))
                final += [(h_n[j].detach(), c_n[j].detach()) for j in range(len(group))]
            else:
                x, h_n = module(x, h0)
                final += [(h_n[j].detach(),) for j in range(len(group))]
        top = x
        if "output" in masks:
            x = x * masks["output"]
        per = nnf.cross_entropy(out_layer(x).reshape(T * B, spec.vocab), targets.reshape(-1), reduction="none")
        total = (per if weights is None else per * weights.reshape(-1)).sum()
        total.backward()
    grads: dict[str, Tensor] = {"V": out_layer.weight.grad}
    if "c" in params:
        grads["c"] = out_layer.bias.grad
    if spec.embedding and not spec.tied:
        grads["E"] = embedding_weight.grad
    for module, group in zip(modules, groups):
        for j, k in enumerate(group):
            name = spec.prefix(k)
            dU = getattr(module, f"weight_ih_l{j}").grad
            if k == 0 and spec.tied and not spec.embedding:
                grads["V"] = grads["V"] + dU.T  # U_0 ≡ Vᵀ: a module cannot share a transposed Parameter
            else:
                grads[name + "U"] = dU
            grads[name + "W"] = getattr(module, f"weight_hh_l{j}").grad
            if bias:
                grads[name + "b"] = getattr(module, f"bias_ih_l{j}").grad
                if spec.cell == "gru":
                    grads[name + "b_hn"] = getattr(module, f"bias_hh_l{j}").grad[2 * m:]
    assert G * m == modules[0].weight_ih_l0.shape[0]
    return total.detach(), grads, final, top.detach()
