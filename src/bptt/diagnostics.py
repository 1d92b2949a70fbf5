"""Gradient flow through time in a trained model (`bptt diagnose`): how far errors really travel back.

For `positions` windows of the text (B parallel streams, each warmed up over `warmup` tokens from the
zero state, then a window of K + 1 = lags + 1 steps), with the loss of the window's last position only,
L^t = −ln P(w_t | …):

* error_norm   ‖∂L^t/∂h_k^{t−j}‖ for every lag j = 0..K and layer k: mean and 10/50/90 % quantiles over
               the windows. L^t is the output layer's training loss at t (−ln P for softmax, class and
               hsm; the nce and sampled objectives for those). From the engine's own backward (Network.backward with a trace of every
               layer's dA and incoming errors), turned into ∂L/∂h at every step by the cells'
               `hidden_errors` — exact, the derivation's recursion, no autograd.
* jacobian     ‖∂h_k^t/∂h_k^{t−j}‖₂ (spectral norm) of the products of one-step Jacobians the recursion
               multiplies (for the Elman cell: ∏ diag(F'(a)) W), per layer, median and quantiles over
               `jacobian_windows` windows: each window's cell backward run with the identity injected at
               its last step (m copies of the window, copy i with the error e_i).
* spectral     the spectral radius of each m×m block of W (Elman: W itself; LSTM: W_hi, W_hf, W_hg, W_ho;
               GRU: W_hr, W_hz, W_hn), the quantity the seed's recursion makes decisive: with |F'| <= 1, errors
               through Elman's W shrink at least as fast as ρ(W)^j when ρ(W) < 1.
* truncation   what truncation k throws away: ‖g_k − g‖ / ‖g‖ for the gradient of the windows' whole loss
               (every position) with BPTT truncated to k steps against full BPTT over the window (all
               parameters, and each layer's W alone).

Shapes: T = K + 1 steps, B = windows, m hidden, G gates.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bptt.engine.stream import Stream
from bptt.engine.sweep import loss_and_grads, output_errors

Tensor = torch.Tensor
GATE_NAMES = {"elman": ("W",), "lstm": ("W_hi", "W_hf", "W_hg", "W_ho"), "gru": ("W_hr", "W_hz", "W_hn")}
TRUNCATIONS = (0, 1, 2, 3, 5, 10, 20)


def _quantiles(x: np.ndarray) -> dict[str, list[float]]:
    """x (lags, samples) -> mean and quantiles per lag."""
    return {"mean": x.mean(axis=1).tolist(), "q10": np.quantile(x, 0.1, axis=1).tolist(),
            "q50": np.quantile(x, 0.5, axis=1).tolist(), "q90": np.quantile(x, 0.9, axis=1).tolist()}


def windows(ids: np.ndarray, lags: int, positions: int, warmup: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets) (warmup + lags + 1, B): B windows spread evenly over the token array (the text read
    as one stream); ValueError when the text is too short."""
    span = warmup + lags + 1
    if len(ids) < span + 1:
        raise ValueError(f"the text has {len(ids)} tokens; --lags {lags} with a warm-up of {warmup} needs at "
                         f"least {span + 1}")
    starts = np.linspace(0, len(ids) - span - 1, num=positions).astype(np.int64)
    idx = starts[None, :] + np.arange(span + 1)[:, None]  # (span + 1, B)
    block = torch.from_numpy(np.asarray(ids)[idx].astype(np.int64))
    return block[:-1], block[1:]


@torch.no_grad()
def gradient_flow(model, ids: np.ndarray, *, lags: int = 35, positions: int = 64, warmup: int = 50,
                  jacobian_windows: int = 8) -> dict:
    """The diagnostics of the module docstring for a model (bptt.model) over a token array -> a JSON-able dict."""
    net, params = model.net, model.params
    missing = sorted({cell.name for cell in net.cells if not hasattr(cell, "hidden_errors")})
    if missing:
        raise ValueError(f"bptt diagnose needs the cells' hidden_errors (∂L/∂h at every step); {', '.join(missing)} "
                         "has none (docs/architecture.md, how to add a cell)")
    inputs, targets = windows(ids, lags, positions, warmup)
    inputs, targets = inputs.to(model.device), targets.to(model.device)
    B, T = inputs.shape[1], lags + 1
    stream = Stream(model, B)
    if warmup:
        stream.forward(inputs[:warmup])
    start = stream.state
    x, y = inputs[warmup:], targets[warmup:]
    out: dict = {"cell": net.cells[0].name, "layers": len(net.cells), "hidden": net.hidden_size, "lags": lags,
                 "positions": B, "warmup": warmup}

    # ∂L^t/∂h^{t−j}: the loss of the last position only
    H, _, cache = net.forward(params, x, start)
    weights = torch.zeros(T, B, dtype=H.dtype, device=H.device)
    weights[-1] = 1.0
    grads = model.zero_grads()
    _, dH = output_errors(net.output, params, H, y, grads, weights=weights, features=cache.features)
    trace: dict[int, tuple[Tensor, Tensor]] = {}
    net.backward(params, cache, dH, grads, None, trace)
    out["error_norm"] = {}
    for k, cell in enumerate(net.cells):
        arrived, dA = trace[k]
        E = cell.hidden_errors(net.layer_view(params, k), cache.layers[k], dA, arrived)  # (T,B,m)
        norms = torch.linalg.vector_norm(E, dim=2).flip(0)  # (lags + 1, B), index = lag
        out["error_norm"][f"layer{k}"] = _quantiles(norms.double().cpu().numpy())

    # ‖∂h^t/∂h^{t−j}‖₂ per layer: m copies of a window, the identity injected at its last step
    m = net.hidden_size
    chosen = np.linspace(0, B - 1, num=min(jacobian_windows, B)).astype(np.int64).tolist()
    jac = {k: [] for k in range(len(net.cells))}
    for b in chosen:
        _, _, cache_b = net.forward(params, x[:, b : b + 1].expand(T, m).contiguous(), start.stream(b, m))
        for k, cell in enumerate(net.cells):
            inject = torch.zeros(T, m, m, dtype=H.dtype, device=H.device)
            inject[-1] = torch.eye(m, dtype=H.dtype, device=H.device)
            scratch = {name: torch.zeros_like(t) for name, t in net.layer_view(params, k).items()}
            p = net.layer_view(params, k)
            dA = cell.backward(p, cache_b.layers[k], inject.clone(), scratch, None)
            E = cell.hidden_errors(p, cache_b.layers[k], dA, inject)  # E[t, i] = e_iᵀ ∂h^T/∂h^t
            jac[k].append(torch.linalg.matrix_norm(E.flip(0), ord=2).double().cpu().numpy())  # (lags + 1,)
    out["jacobian_norm"] = {f"layer{k}": _quantiles(np.stack(v, axis=1)) for k, v in jac.items()}

    # the spectral radius of each m×m block of W
    names = GATE_NAMES.get(net.cells[0].name)
    out["spectral_radius"] = {}
    for k in range(len(net.cells)):
        W = net.layer_view(params, k)["W"].double()
        blocks = W.split(m, dim=0)
        labels = names if names is not None and len(names) == len(blocks) else [f"W{i}" for i in range(len(blocks))]
        out["spectral_radius"][f"layer{k}"] = {
            label: float(torch.linalg.eigvals(block).abs().max()) for label, block in zip(labels, blocks)}

    # what truncation k throws away, on the windows' whole loss
    full = model.zero_grads()
    loss_and_grads(net, params, x, y, start, grads=full)
    reference = full.data.clone()
    w_names = [net.prefixes[k] + "W" for k in range(len(net.cells))]
    w_full = {n: full[n].clone() for n in w_names}
    rows = []
    for k in [t for t in TRUNCATIONS if t < lags] + [lags]:
        g = model.zero_grads()
        loss_and_grads(net, params, x, y, start, truncation=k, grads=g)
        rel = float(torch.linalg.vector_norm(g.data - reference) / torch.linalg.vector_norm(reference))
        rel_w = {f"layer{i}": float(torch.linalg.vector_norm(g[n] - w_full[n]) / torch.linalg.vector_norm(w_full[n]))
                 for i, n in enumerate(w_names)}
        rows.append({"k": k, "relative_error": rel, "relative_error_W": rel_w})
    out["truncation"] = rows
    return out


def plot(result: dict, path: str, title: str = "") -> None:
    """Three panels: the error norm against the lag, the Jacobian products' norms, what truncation loses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lags = np.arange(result["lags"] + 1)
    for name, stats in result["error_norm"].items():
        axes[0].plot(lags, stats["mean"], label=f"{name} mean")
        axes[0].fill_between(lags, stats["q10"], stats["q90"], alpha=0.2)
    axes[0].set(yscale="log", xlabel="lag j", ylabel="‖∂L^t/∂h^(t−j)‖", title="errors arriving j steps back")
    for name, stats in result["jacobian_norm"].items():
        axes[1].plot(lags, stats["q50"], label=f"{name} median")
        axes[1].fill_between(lags, stats["q10"], stats["q90"], alpha=0.2)
    axes[1].set(yscale="log", xlabel="lag j", ylabel="‖∂h^t/∂h^(t−j)‖₂", title="Jacobian products")
    rows = [r for r in result["truncation"] if r["k"] < result["lags"]]  # k = K is full BPTT: 0
    axes[2].plot([r["k"] for r in rows], [r["relative_error"] for r in rows], marker="o", label="all parameters")
    for layer in (rows[0]["relative_error_W"] if rows else {}):
        axes[2].plot([r["k"] for r in rows], [r["relative_error_W"][layer] for r in rows], marker=".", linestyle="--",
                     label=f"W of {layer}")
    axes[2].set(xlabel="truncation k", ylabel="‖g_k − g‖ / ‖g‖", title=f"what truncation k throws away (window {result['lags'] + 1})")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    radius = "; ".join(f"{layer}: " + ", ".join(f"ρ({g})={v:.2f}" for g, v in blocks.items())
                       for layer, blocks in result["spectral_radius"].items())
    fig.suptitle((title + " — " if title else "") + f"{result['cell']}, {result['layers']} layer(s), "
                 f"m={result['hidden']}; {radius}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    """One line per layer: the mean error norm at lags 0, 5, 10, 20 and K, relative to lag 0."""
    lines = []
    for name, stats in result["error_norm"].items():
        base = stats["mean"][0] or math.nan
        shown = sorted({j for j in (1, 5, 10, 20, result["lags"]) if j <= result["lags"]})
        ratios = ", ".join(f"lag {j}: {stats['mean'][j] / base:.3g}" for j in shown)
        lines.append(f"{name}: mean ‖∂L^t/∂h^(t−j)‖ relative to lag 0 — {ratios}")
    t = {r["k"]: r["relative_error"] for r in result["truncation"]}
    lines.append("truncation k throws away (‖g_k − g‖/‖g‖): " + ", ".join(f"k={k}: {v:.3g}" for k, v in t.items()))
    return "\n".join(lines)
