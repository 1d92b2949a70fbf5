"""The LSTM's two sweeps through time on CUDA with each step's element-wise work fused into one Triton
kernel (cells/lstm.py is the reference: the same equations and order of operations, eager PyTorch;
cells/lstm_cpu.cpp is the CPU's compiled form).

Per step the eager forward launches the gate product and seven element-wise kernels, the backward the
product Wᵀ δ^{t+1} and four, after building P and Q over all steps (gate_derivatives); on a GPU each of
them costs a launch and a few microseconds even inside a CUDA graph, which at m 650, B 64 is most of
what separates bptt's step from cuDNN's fused one. Here:

forward, per step:   a^t = A^t + b + W h^{t-1}  (torch's addmm_, cuBLAS), then one kernel:
                     i, f, o = σ(a), g = tanh(a) written over a; c^t = f ⊙ c^{t-1} + i ⊙ g;
                     k^t = tanh(c^t); h^t = o ⊙ k^t
backward, per step:  ∂L/∂h^t = dH^t + Wᵀ δ^{t+1}  (torch's addmm, cuBLAS), then one kernel:
                     Q = o ⊙ (1 − k²); E^t = f^{t+1} ⊙ E^{t+1} + ∂L/∂h^t ⊙ Q;
                     δ_i = E ⊙ σ'(a_i) g, δ_f = E ⊙ σ'(a_f) c^{t-1}, δ_g = E ⊙ i (1 − g²), δ_o = ∂L/∂h^t ⊙ σ'(a_o) k
with σ' = y (1 − y) from the cached activations. Shapes: T = time, B = streams, m = hidden; G, δ
(T,B,4m), C, K, H, dH (T,B,m), all contiguous.

Triton ships with PyTorch's CUDA builds; engine/native.py imports this module for CUDA tensors only
(native.sweeps), and the eager code runs where the import fails or BPTT_NATIVE=0. tanh is libdevice's on a GPU; Triton's interpreter (TRITON_INTERPRET=1, how the tests run these kernels
on a CPU) has no libdevice, so there tanh(x) = 2σ(2x) − 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

Tensor = torch.Tensor
BLOCK = 512


# tanh: libdevice's on a GPU, 2σ(2x) − 1 under Triton's interpreter (which has no libdevice); also the GRU's
@triton.jit
def tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(x)
    else:
        return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _forward_step(a_ptr, c_prev_ptr, c_ptr, k_ptr, h_ptr, n, m, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (stream, unit) pairs of the step, n = B·m
    mask = e < n
    s = e // m
    gi = s * 3 * m + e  # = s·4m + j: the unit's i in the step's (B,4m) gates; f, g, o follow by m
    i = tl.sigmoid(tl.load(a_ptr + gi, mask=mask, other=0.0))
    f = tl.sigmoid(tl.load(a_ptr + gi + m, mask=mask, other=0.0))
    g = tanh(tl.load(a_ptr + gi + 2 * m, mask=mask, other=0.0), LIBDEVICE)
    o = tl.sigmoid(tl.load(a_ptr + gi + 3 * m, mask=mask, other=0.0))
    tl.store(a_ptr + gi, i, mask=mask)
    tl.store(a_ptr + gi + m, f, mask=mask)
    tl.store(a_ptr + gi + 2 * m, g, mask=mask)
    tl.store(a_ptr + gi + 3 * m, o, mask=mask)
    c = f * tl.load(c_prev_ptr + e, mask=mask, other=0.0) + i * g  # c^t = f ⊙ c^{t-1} + i ⊙ g
    k = tanh(c, LIBDEVICE)
    tl.store(c_ptr + e, c, mask=mask)
    tl.store(k_ptr + e, k, mask=mask)
    tl.store(h_ptr + e, k * o, mask=mask)  # h^t = o ⊙ tanh(c^t)


@triton.jit
def _backward_step(dh_ptr, E_ptr, g_next_ptr, g_ptr, c_prev_ptr, k_ptr, d_ptr, n, m,
                   HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    s = e // m
    gi = s * 3 * m + e
    x = tl.load(dh_ptr + e, mask=mask, other=0.0)  # ∂L/∂h^t
    i = tl.load(g_ptr + gi, mask=mask, other=0.0)
    f = tl.load(g_ptr + gi + m, mask=mask, other=0.0)
    g = tl.load(g_ptr + gi + 2 * m, mask=mask, other=0.0)
    o = tl.load(g_ptr + gi + 3 * m, mask=mask, other=0.0)
    k = tl.load(k_ptr + e, mask=mask, other=0.0)
    q = o * (1 - k * k)  # Q = ∂h^t/∂c^t
    if HAS_NEXT:  # E^t = f^{t+1} ⊙ E^{t+1} + ∂L/∂h^t ⊙ Q
        E = tl.load(E_ptr + e, mask=mask, other=0.0) * tl.load(g_next_ptr + gi + m, mask=mask, other=0.0) + x * q
    else:
        E = x * q
    tl.store(E_ptr + e, E, mask=mask)
    tl.store(d_ptr + gi, E * ((i * (1 - i)) * g), mask=mask)
    tl.store(d_ptr + gi + m, E * ((f * (1 - f)) * tl.load(c_prev_ptr + e, mask=mask, other=0.0)), mask=mask)
    tl.store(d_ptr + gi + 2 * m, E * (i * (1 - g * g)), mask=mask)
    tl.store(d_ptr + gi + 3 * m, x * ((o * (1 - o)) * k), mask=mask)


def lstm_forward_sweep(W: Tensor, G: Tensor, h0: Tensor, c0: Tensor, H: Tensor, C: Tensor, K: Tensor) -> None:
    """W (4m,m); G (T,B,4m) = A + b on entry, the gates [i;f;g;o] on return; h0, c0 (B,m); fills H, C, K."""
    T, B, four_m = G.shape
    m = four_m // 4
    n = B * m
    grid = (triton.cdiv(n, BLOCK),)
    Wt = W.t()
    h, c = h0, c0.contiguous()
    for a, c_out, k_out, h_out in zip(G.unbind(0), C.unbind(0), K.unbind(0), H.unbind(0)):
        a.addmm_(h, Wt)  # a^t = A^t + b + W h^{t-1}
        _forward_step[grid](a, c, c_out, k_out, h_out, n, m, BLOCK=BLOCK, LIBDEVICE=G.is_cuda)
        h, c = h_out, c_out


def lstm_backward_sweep(W: Tensor, G: Tensor, C: Tensor, K: Tensor, c0: Tensor, dH: Tensor, delta: Tensor) -> None:
    """W (4m,m); G (T,B,4m) the gates; C, K (T,B,m); c0 (B,m); dH (T,B,m) -> delta (T,B,4m) = ∂L/∂a^t (full BPTT)."""
    T, B, four_m = G.shape
    m = four_m // 4
    n = B * m
    grid = (triton.cdiv(n, BLOCK),)
    E, dh = dH.new_empty(B, m), dH.new_empty(B, m)
    Gs, Cs, Ks, dHs, deltas = G.unbind(0), C.unbind(0), K.unbind(0), dH.unbind(0), delta.unbind(0)
    c_first = c0.contiguous()
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            torch.addmm(dHs[t], deltas[t + 1], W, out=dh)  # ∂L/∂h^t = dH^t + Wᵀ δ^{t+1}
        x = dh if t < T - 1 else dHs[t]
        g_next = Gs[t + 1] if t < T - 1 else Gs[t]  # not read at the last step
        c_prev = Cs[t - 1] if t > 0 else c_first
        _backward_step[grid](x, E, g_next, Gs[t], c_prev, Ks[t], deltas[t], n, m, HAS_NEXT=t < T - 1, BLOCK=BLOCK)
