"""The GRU's two sweeps through time on CUDA with each step's element-wise work fused into one Triton kernel
(cells/gru.py is the reference: the same equations and order of operations, eager PyTorch; cells/gru_cpu.cpp
is the CPU's compiled form; cells/lstm_triton.py explains why and how these kernels are used and tested).

forward, per step:   [a_r ; a_z] += W_rz h^{t-1};  q^t = W_hn h^{t-1} + b_hn  (torch's addmm, cuBLAS), then
                     r, z = σ(a_r), σ(a_z);  n = tanh(a_n + r ⊙ q)  written over G;  h^t = lerp(n, h^{t-1}, z)
backward, per step:  ∂L/∂h^t = (dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1}) + W_hᵀ γ^{t+1}  (the bracket written by the
                     step before, then torch's addmm_), then one kernel:
                     P_n = (1 − z)(1 − n²), P_z = (h^{t-1} − n) σ'(z), P_r = P_n q σ'(r);
                     δ = ∂L/∂h^t ⊙ [P_r ; P_z ; P_n], γ = ∂L/∂h^t ⊙ [P_r ; P_z ; P_n r], and the next bracket
Shapes: T = time, B = streams, m = hidden; G, δ, γ (T,B,3m), Q, H, dH (T,B,m), all contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bptt.engine.cells.lstm_triton import BLOCK, tanh

Tensor = torch.Tensor


@triton.jit
def _forward_step(a_ptr, q_ptr, h_prev_ptr, h_ptr, n_units, m, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (stream, unit) pairs of the step, B·m
    mask = e < n_units
    s = e // m
    gr = s * 2 * m + e  # = s·3m + j: the unit's r in the step's (B,3m) gates; z, n follow by m
    r = tl.sigmoid(tl.load(a_ptr + gr, mask=mask, other=0.0))
    z = tl.sigmoid(tl.load(a_ptr + gr + m, mask=mask, other=0.0))
    n = tanh(tl.load(a_ptr + gr + 2 * m, mask=mask, other=0.0) + r * tl.load(q_ptr + e, mask=mask, other=0.0),
              LIBDEVICE)  # n = tanh(a_n + r ⊙ q)
    tl.store(a_ptr + gr, r, mask=mask)
    tl.store(a_ptr + gr + m, z, mask=mask)
    tl.store(a_ptr + gr + 2 * m, n, mask=mask)
    hp = tl.load(h_prev_ptr + e, mask=mask, other=0.0)
    diff = hp - n  # torch.lerp(n, h^{t-1}, z)
    h = tl.where(tl.abs(z) < 0.5, n + z * diff, hp - diff * (1 - z))
    tl.store(h_ptr + e, h, mask=mask)


@triton.jit
def _backward_step(x_ptr, g_ptr, q_ptr, h_prev_ptr, d_ptr, y_ptr, dH_prev_ptr, carry_ptr, n_units, m,
                   HAS_CARRY: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_units
    s = e // m
    gr = s * 2 * m + e
    x = tl.load(x_ptr + e, mask=mask, other=0.0)  # ∂L/∂h^t
    r = tl.load(g_ptr + gr, mask=mask, other=0.0)
    z = tl.load(g_ptr + gr + m, mask=mask, other=0.0)
    n = tl.load(g_ptr + gr + 2 * m, mask=mask, other=0.0)
    pn = (1 - z) * (1 - n * n)
    pz = (tl.load(h_prev_ptr + e, mask=mask, other=0.0) - n) * (z * (1 - z))
    pr = (pn * tl.load(q_ptr + e, mask=mask, other=0.0)) * (r * (1 - r))
    tl.store(d_ptr + gr, x * pr, mask=mask)
    tl.store(d_ptr + gr + m, x * pz, mask=mask)
    tl.store(d_ptr + gr + 2 * m, x * pn, mask=mask)
    tl.store(y_ptr + gr, x * pr, mask=mask)
    tl.store(y_ptr + gr + m, x * pz, mask=mask)
    tl.store(y_ptr + gr + 2 * m, x * (pn * r), mask=mask)
    if HAS_CARRY:  # dH^{t-1} + z^t ⊙ ∂L/∂h^t (carry may be x's buffer: each value is read before written)
        tl.store(carry_ptr + e, tl.load(dH_prev_ptr + e, mask=mask, other=0.0) + x * z, mask=mask)


def gru_forward_sweep(W: Tensor, b_hn: Tensor | None, G: Tensor, h0: Tensor, Q: Tensor, H: Tensor) -> None:
    """W (3m,m); b_hn (m,)|None; G (T,B,3m) = A + b on entry, [r;z;n] on return; h0 (B,m); fills Q, H."""
    T, B, three_m = G.shape
    m = three_m // 3
    n_units = B * m
    grid = (triton.cdiv(n_units, BLOCK),)
    Wt_rz, Wt_n = W[: 2 * m].t(), W[2 * m :].t()
    h = h0.contiguous()
    for a, q, h_out in zip(G.unbind(0), Q.unbind(0), H.unbind(0)):
        a[:, : 2 * m].addmm_(h, Wt_rz)  # [a_r ; a_z] += W_rz h^{t-1}
        if b_hn is None:
            torch.mm(h, Wt_n, out=q)
        else:
            torch.addmm(b_hn, h, Wt_n, out=q)  # q^t = W_hn h^{t-1} + b_hn
        _forward_step[grid](a, q, h, h_out, n_units, m, BLOCK=BLOCK, LIBDEVICE=G.is_cuda)
        h = h_out


def gru_backward_sweep(W: Tensor, G: Tensor, Q: Tensor, H: Tensor, h0: Tensor, dH: Tensor, delta: Tensor,
                       gamma: Tensor) -> None:
    """W (3m,m); G (T,B,3m) = [r;z;n]; Q, H (T,B,m); h0 (B,m); dH (T,B,m) -> delta, gamma (T,B,3m), full BPTT."""
    T, B, three_m = G.shape
    m = three_m // 3
    n_units = B * m
    grid = (triton.cdiv(n_units, BLOCK),)
    dh = dH.new_empty(B, m)
    Gs, Qs, Hs, dHs, deltas, gammas = G.unbind(0), Q.unbind(0), H.unbind(0), dH.unbind(0), delta.unbind(0), gamma.unbind(0)
    h_first = h0.contiguous()
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            dh.addmm_(gammas[t + 1], W)  # ∂L/∂h^t = (dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1}) + W_hᵀ γ^{t+1}
        x = dh if t < T - 1 else dHs[t]
        h_prev = Hs[t - 1] if t > 0 else h_first
        dH_prev = dHs[t - 1] if t > 0 else dHs[t]  # not read at t = 0
        _backward_step[grid](x, Gs[t], Qs[t], h_prev, deltas[t], gammas[t], dH_prev, dh, n_units, m,
                             HAS_CARRY=t > 0, BLOCK=BLOCK)
