"""How fast can a full-softmax training step be? The output layer's three matrix products, timed alone.

    python benchmarks/gemm_floor.py [--config V=10000,m=200,B=32,T=35] [--steps 20] [--threads N]

A full softmax over N = T·B positions needs, whatever the implementation, three products of the same
size (2·N·m·V floating-point operations each):

    forward    g  = S Vᵀ          (N,m)·(m,V)
    backward   dV = dgᵀ S         (V,N)·(N,m)
               dS = dg V          (N,V)·(V,m)

This script times those three products alone (torch.mm into preallocated buffers, the same layouts
as outputs/full.py), a large square product (the machine's sgemm ceiling), a bptt training step and
the torch.nn.RNN + autograd peer's step (both from bptt.bench), all in one process. The products'
time is a floor for any exact full-softmax step on this machine, so peer step / floor bounds the
speed-up over the peer that any engine could show here. Prints one line per measurement and the bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bptt.benchmark import SIDES, block, parse_config, token_stream


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="V=10000,m=200,B=32,T=35")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    c = parse_config(args.config)
    N = c.T * c.B
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(N, c.m, generator=gen)
    V = 0.1 * torch.randn(c.V, c.m, generator=gen)
    g = torch.randn(N, c.V, generator=gen)
    dV, dS = torch.empty(c.V, c.m), torch.empty(N, c.m)
    flop = 2.0 * N * c.m * c.V
    parts = {
        "g = S Vᵀ": lambda: torch.mm(S, V.t(), out=g),
        "dV = dgᵀ S": lambda: torch.mm(g.t(), S, out=dV),
        "dS = dg V": lambda: torch.mm(g, V, out=dS),
    }
    print(f"config {c}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    floor = 0.0
    for name, fn in parts.items():
        ms = median_ms(fn, args.steps)
        floor += ms
        print(f"  {name:12s} {ms:7.2f} ms  {flop / ms / 1e6:6.1f} GFLOP/s")
    n = 2048
    A, B, C = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    ms = median_ms(lambda: torch.mm(A, B, out=C), args.steps)
    print(f"  {'2048³ sgemm':12s} {ms:7.2f} ms  {2 * n**3 / ms / 1e6:6.1f} GFLOP/s (ceiling)")
    data = token_stream(c, args.steps + 3, 0, torch.device("cpu"))
    steps = {}
    for side in ("bptt", "peer"):
        trainer = SIDES[side](c, 0, torch.device("cpu"))
        i = iter(range(10**9))
        steps[side] = median_ms(lambda: trainer.step(*block(data, next(i) % (args.steps + 3), c.T)), args.steps)
        print(f"  {side + ' step':12s} {steps[side]:7.2f} ms  ({N / steps[side] * 1e3:,.0f} tokens/s)")
    print(f"output-layer products: {floor:.1f} ms = {100 * floor / steps['bptt']:.0f} % of the bptt step; "
          f"bptt/peer {steps['peer'] / steps['bptt']:.2f}x; "
          f"a step of the products alone would be {steps['peer'] / floor:.2f}x the peer")


if __name__ == "__main__":
    main()
