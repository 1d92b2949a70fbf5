"""Where a training step's time goes on a GPU: wall time per step against the GPU's busy time and the
number of kernels launched (issue 5: the small shapes are held back by launches, not arithmetic).

    PYTHONPATH=src python3 benchmarks/gpu_profile.py [--device cuda] [--config V,m,B,T ...]

One step = the explicit-BPTT forward/backward over a block, gradient clipping and one Adam update,
the same as `bptt train` (full softmax, tanh). Prints, per configuration: ms per step (wall, after
synchronising), GPU kernel time per step, kernels per step, and the ten costliest kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bptt import ElmanLM
from bptt.training.optim import make_optimizer
from bptt.training.step import TrainStep


def one_config(V: int, m: int, B: int, T: int, device: str, steps: int = 20) -> None:
    model = ElmanLM(V, m, seed=1, device=device)
    train_step = TrainStep(model, make_optimizer("adam", model.params), k1=T, k2=T, clip=0.25, check_inputs=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (T, B), generator=g).to(device)
    y = torch.randint(0, V, (T, B), generator=g).to(device)

    def step() -> None:  # the trainer's step: gradients, mean, clipping, its one sync, the update
        train_step.compute(x, y)
        train_step.apply(1e-3)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - t0) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 5 / 1e3  # ms per step
    tokens = T * B
    print(f"V={V},m={m},B={B},T={T}: {wall * 1e3:.2f} ms/step wall ({tokens / wall:,.0f} tokens/s), "
          f"GPU kernels {busy:.2f} ms/step ({100 * busy / (wall * 1e3):.0f} % busy), {len(kernels) / 5:.0f} kernels/step")
    for key in (("device_time_total", "cuda_time_total") if device == "cuda" else ("cpu_time_total",)):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=10))
            break
        except (KeyError, AttributeError, ValueError):
            continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", action="append", help="V,m,B,T (repeatable)")
    args = parser.parse_args()
    configs = args.config or ["10000,200,32,35", "10000,650,64,35", "10000,1024,256,35"]
    for text in configs:
        one_config(*(int(v) for v in text.split(",")), device=args.device)


if __name__ == "__main__":
    main()
