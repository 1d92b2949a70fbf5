"""An independent autograd model of the seed's equations: the oracle the checks compare against (and,
at the end, of stacks of Elman, LSTM and GRU layers: stack_autograd_loss_and_grads).

Nothing in the engine uses this module; only `bptt gradcheck` and the tests do. It is written
literally, in the paper's notation: a one-hot x^t, matrix-vector products U x^t, the loss of eq. 1
against a one-hot d^t, one step at a time, and autograd differentiates it. It shares no code with the
engine (not even the activation functions), so a slip in one does not hide in the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

Tensor = torch.Tensor

_F = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda a: a}
_f = {"softmax": lambda g: torch.softmax(g, dim=-1), "sigmoid": torch.sigmoid, "identity": lambda g: g}


def _step(params: dict[str, Tensor], F, s_prev: Tensor, x_onehot: Tensor) -> Tensor:
    U = params["U"] if "U" in params else params["V"].T  # a tied model has no U: U = Vᵀ
    a = s_prev @ params["W"].T + x_onehot @ U.T  # a^t = W s^{t-1} + U x^t
    if "b" in params:
        a = a + params["b"]
    return F(a)


def _step_loss(params, f_name: str, loss: str, s: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    g = s @ params["V"].T  # g^t = V s^t
    if "c" in params:
        g = g + params["c"]
    d = nnf.one_hot(target, g.shape[-1]).to(g.dtype)
    if loss == "cross_entropy":
        per = -(d * torch.log_softmax(g, dim=-1)).sum(-1)
    else:
        o = _f[f_name](g)
        per = 0.5 * ((d - o) ** 2).sum(-1)  # eq. 1
    return per.sum() if weight is None else (per * weight).sum()


def autograd_loss_and_grads(
    params: dict[str, Tensor],
    hidden_activation: str,
    output_activation: str,
    loss: str,
    inputs: Tensor,
    targets: Tensor,
    h0: Tensor | None = None,
    truncation: int | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference loss and gradients by autograd. inputs, targets (T,B); h0 (B,m).

    truncation=k: L^t is differentiated through the last k+1 steps only, starting from s^{t-k-1}
    taken as a constant (recomputed per t: O(T·k), fine for checks).
    """
    F = _F[hidden_activation]
    T, B = inputs.shape
    V = params["V"].shape[0]
    m = params["W"].shape[0]
    with torch.enable_grad():
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        s0 = torch.zeros(B, m, dtype=params["W"].dtype) if h0 is None else h0.detach()
        x = [nnf.one_hot(inputs[t], V).to(s0.dtype) for t in range(T)]
        weight = (lambda t: None) if mask is None else (lambda t: mask[t].to(s0.dtype))
        total = torch.zeros((), dtype=s0.dtype)
        if truncation is None:
            s = s0
            for t in range(T):
                s = _step(leaves, F, s, x[t])
                total = total + _step_loss(leaves, output_activation, loss, s, targets[t], weight(t))
        else:
            with torch.no_grad():  # the untruncated states, used as constant starting points
                states, s = [s0], s0
                for t in range(T):
                    s = _step(leaves, F, s, x[t])
                    states.append(s)
            for t in range(T):
                start = max(0, t - truncation)
                s = states[start]  # s^{start}, a constant
                for tau in range(start, t + 1):
                    s = _step(leaves, F, s, x[tau])
                total = total + _step_loss(leaves, output_activation, loss, s, targets[t], weight(t))
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return total.detach(), {
        k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)
    }


# -- stacks of Elman, LSTM and GRU layers -------------------------------------------------------------
#
# The same idea for the models of a ModelConfig: every equation written out again (PyTorch's LSTM and
# GRU formulations), the words as one-hot vectors, one step at a time, autograd for the gradients. Names
# follow the model's: "E" (the embedding, absent when tied: E ≡ V), per layer "U", "W", "b" (and "b_hn"
# for a GRU) with the prefix "layer{k}." in a stack, the output layer's "V" and "c". Dropout masks
# (site -> (T,B,n): "input", "layer{k}", "output") are given, as the engine's network applies them.


def _elman_step(p: dict[str, Tensor], F, a_in: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    a = a_in + state[0] @ p["W"].T  # a^t = U x^t + W s^{t-1} (+ b)
    if "b" in p:
        a = a + p["b"]
    return (F(a),)


def _lstm_step(p: dict[str, Tensor], F, a_in: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    h, c = state
    a = a_in + h @ p["W"].T  # the four gates' pre-activations, in PyTorch's order i, f, g, o
    if "b" in p:
        a = a + p["b"]
    a_i, a_f, a_g, a_o = a.chunk(4, dim=-1)
    c = torch.sigmoid(a_f) * c + torch.sigmoid(a_i) * torch.tanh(a_g)
    return (torch.sigmoid(a_o) * torch.tanh(c), c)


def _gru_step(p: dict[str, Tensor], F, a_in: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    (h,) = state
    x_r, x_z, x_n = a_in.chunk(3, dim=-1)  # PyTorch's order r, z, n
    W_r, W_z, W_n = p["W"].chunk(3, dim=0)
    b_r, b_z, b_n = p["b"].chunk(3) if "b" in p else (0.0, 0.0, 0.0)
    b_hn = p["b_hn"] if "b_hn" in p else 0.0
    r = torch.sigmoid(x_r + b_r + h @ W_r.T)
    z = torch.sigmoid(x_z + b_z + h @ W_z.T)
    n = torch.tanh(x_n + b_n + r * (h @ W_n.T + b_hn))  # the reset gate scales W_hn h + b_hn
    return ((1 - z) * n + z * h,)


_STEPS = {"elman": _elman_step, "lstm": _lstm_step, "gru": _gru_step}


def _layer(step, p: dict[str, Tensor], F, a_in: list[Tensor], state0: tuple[Tensor, ...],
           truncation: int | None) -> list[tuple[Tensor, ...]]:
    """One layer over its input terms a_in[t] (B, G·m) -> the state after every step.

    truncation=k: the state after step t is recomputed through steps t−k .. t only, from the state
    before them taken as a constant (its value from an untruncated run), so that every path back from
    step t crosses at most k recurrent connections in this layer; a_in stays differentiable (the layer
    below is truncated the same way, counted from where the error enters it)."""
    T = len(a_in)
    if truncation is None:
        states, s = [], state0
        for t in range(T):
            s = step(p, F, a_in[t], s)
            states.append(s)
        return states
    with torch.no_grad():
        constant, s = [state0], state0
        for t in range(T):
            s = step(p, F, a_in[t], s)
            constant.append(s)
    states = []
    for t in range(T):
        start = max(0, t - truncation)
        s = tuple(x.detach() for x in constant[start])
        for tau in range(start, t + 1):
            s = step(p, F, a_in[tau], s)
        states.append(s)
    return states


def stack_autograd_loss_and_grads(
    params: dict[str, Tensor],
    cell: str,
    inputs: Tensor,
    targets: Tensor,
    state0: list[tuple[Tensor, ...]],
    *,
    embedding: bool,
    hidden_activation: str = "tanh",
    masks: dict[str, Tensor] | None = None,
    truncation: int | None = None,
    loss_from: int = 0,
) -> tuple[Tensor, dict[str, Tensor], list[tuple[Tensor, ...]]]:
    """Reference loss, gradients and final state of a stack of `cell` layers with a full softmax and the
    cross-entropy loss, by autograd. inputs, targets (T,B); state0 per layer ((h,) or (h, c), (B,m) each,
    constants). embedding: the words are looked up in E (or V when tied) and the first layer reads them
    through U; otherwise the first layer's input term is U x^t itself (U ≡ Vᵀ when tied). The loss sums
    −log P(target) over the steps t >= loss_from (BPTT(k1, k2): the errors of the block, the history
    before it only carries them back). truncation=k: per layer, as in _layer."""
    step = _STEPS[cell]
    F = _F[hidden_activation]
    T, B = inputs.shape
    V = params["V"].shape[0]
    layers = 1 + max((int(name.split(".")[0][len("layer"):]) for name in params if name.startswith("layer")),
                     default=0)

    def mask(site: str, t: int) -> Tensor | float:
        return 1.0 if masks is None or site not in masks else masks[site][t]

    with torch.enable_grad():
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        x = [nnf.one_hot(inputs[t], V).to(leaves["V"].dtype) for t in range(T)]
        final, below = [], None
        for k in range(layers):
            # layer k's parameters under the cell's names (a one-layer model: no prefix)
            p = leaves if layers == 1 else {name.partition(".")[2]: v for name, v in leaves.items()
                                            if name.startswith(f"layer{k}.")}
            if k == 0:
                if embedding:
                    E = leaves["E"] if "E" in leaves else leaves["V"]  # tied: a word's input vector is its output row
                    a_in = [((x[t] @ E) * mask("input", t)) @ p["U"].T for t in range(T)]
                else:
                    U = p["U"] if "U" in p else leaves["V"].T  # tied: U ≡ Vᵀ
                    a_in = [(x[t] @ U.T) * mask("input", t) for t in range(T)]
            else:
                a_in = [(below[t] * mask(f"layer{k}", t)) @ p["U"].T for t in range(T)]
            states = _layer(step, p, F, a_in, tuple(s.detach() for s in state0[k]), truncation)
            below = [s[0] for s in states]
            final.append(tuple(s.detach() for s in states[-1]))
        total = torch.zeros((), dtype=leaves["V"].dtype)
        for t in range(loss_from, T):
            g = (below[t] * mask("output", t)) @ leaves["V"].T
            if "c" in leaves:
                g = g + leaves["c"]
            total = total - (nnf.one_hot(targets[t], V).to(g.dtype) * torch.log_softmax(g, dim=-1)).sum()
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return total.detach(), {
        k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)
    }, final
