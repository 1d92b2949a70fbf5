"""A training step captured once as a CUDA graph and replayed (issue 5, item 2).

On a GPU a small step is launch-bound: at V = 10k, m = 200, B = 32, T = 35 bptt's step is ≈ 300
separate kernels (two per time step forward, two backward, then the output layer, clipping and the
update), the GPU busy a quarter of the time (docs/performance.md). A CUDA graph records those kernels
once and replays them with a single launch.

GraphedStep(step, example_inputs, state) wraps a function step(*inputs) -> outputs that
  - reads its inputs only from the tensors it is given (copied into static buffers before each replay),
  - keeps everything else it changes in tensors updated in place (weights, the carried hidden state:
    `state`), never by rebinding a Python name, and
  - does not synchronise with the host (no .item(), no printing of values, no data-dependent shapes).
It runs `warmup` eager steps on a side stream (cuBLAS and the caching allocator settle there), restores
`state` to what it was before them, then captures one step. Each call copies the inputs in and replays;
the outputs are the graph's own tensors, overwritten by the next call (clone them to keep them).

On the CPU (or with capture=False) the same object runs the same static-buffer step eagerly, warm-up
and restore included: that is the path the CPU tests compare with the plain step, so what differs on
a GPU is the capture alone (tests/test_cuda.py compares replay with eager on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor


class GraphedStep:
    def __init__(
        self,
        step: Callable[..., object],
        example_inputs: Sequence[Tensor],
        state: Sequence[Tensor],
        warmup: int = 2,
        capture: bool | None = None,
    ):
        self.step = step
        self.inputs = [x.clone() for x in example_inputs]  # static input buffers
        device = self.inputs[0].device
        self.captured = device.type == "cuda" if capture is None else bool(capture)
        if self.captured and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors, got {device}")
        saved = [t.clone() for t in state]
        if self.captured:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            for _ in range(warmup):
                step(*self.inputs)
        for t, s in zip(state, saved):  # the warm-up steps leave no trace
            t.copy_(s)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: object = None
        if self.captured:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = step(*self.inputs)

    def __call__(self, *inputs: Tensor) -> object:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the step was captured with {len(self.inputs)} inputs, got {len(inputs)}")
        for buffer, x in zip(self.inputs, inputs):
            if x.shape != buffer.shape or x.dtype != buffer.dtype:
                raise ValueError(f"the step was captured for {tuple(buffer.shape)} {buffer.dtype} inputs, "
                                 f"got {tuple(x.shape)} {x.dtype}")
            buffer.copy_(x)
        if self.graph is None:
            return self.step(*self.inputs)
        self.graph.replay()
        return self.outputs
