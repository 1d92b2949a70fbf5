"""Data-parallel training on torch.distributed: N processes (ranks) train one model.

    torchrun --standalone --nproc-per-node N -m bptt train ...        one machine
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m bptt train ...

The trainer reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
starts the process group itself (`setup`): gloo on the CPU, NCCL on CUDA (`--backend` overrides), each
rank on cuda:LOCAL_RANK. Without that environment (or with WORLD_SIZE 1) nothing is started and every
helper here is the identity: one process is the case N = 1 of the same code. Under torchrun with one
process and an explicit --backend, the group of one is started and every collective runs through it (the
same weights, bit for bit): NCCL's path run on a single GPU.

How N ranks compute exactly the one-process run's step:

    shares      --batch B stays the number of streams of the whole run; rank r runs the contiguous
                columns share(B) (uneven when N does not divide B). In sentence mode each batch's
                columns are split the same way; a rank whose share of a short last batch is empty runs
                one masked column (loss 0, gradients 0, 0 tokens) so that it still draws what the others
                draw and takes part in every collective.
    gradients   the streams are independent and the loss is a sum over positions divided by the counted
                tokens of the whole batch: one all-reduce (SUM) of the flat gradient buffer per step and
                one small one of (loss, tokens, stop signals) — `GradientSum`, the Reduction of
                training/step.py; with row-sparse updates (training/sparse_rows.py) the dense slices are
                all-reduced and each word-indexed matrix's gathered rows all-gathered (ids and values,
                padded to the longest), then summed over the union of the ids — then the mean, the clipping and the update, the same on every rank,
                so the weights stay identical everywhere.
    randomness  dropout masks are drawn for the whole batch from the generator every rank seeds alike,
                and each rank keeps its columns (TruncatedBPTT.columns); the noise of nce/sampled is one
                draw of k words per step whatever B, the same on every rank.
    decisions   the divergence checks read the all-reduced loss and the norm of the all-reduced gradient
                (identical everywhere); rank 0 alone validates and broadcasts the result, so the schedule,
                the rate and stopping agree; a SIGINT/SIGTERM to any rank travels in the small all-reduce
                and every rank stops after the same step; "all finite?" before a checkpoint is agreed.
    checkpoints rank 0 alone writes them; the carried BPTT state (engine state_dict) is gathered along
                the streams (tbptt.stream_dim) and saved as one process would save it, and a resumed run
                takes its columns back: a checkpoint does not depend on N.
    failures    a collective that fails (a rank killed: its sockets close; or silent for --dist-timeout
                seconds) raises RankLost, which `bptt train` reports in one line (exit 1); torchrun's agent
                stops the remaining workers. The last checkpoint stands for --resume.

Model averaging (`--average-every K`, for slow links; Kaldi's nnet3 "parallel training with model
averaging"): instead of the gradient all-reduce, each rank takes K steps on its own share alone (its
gradient divided by its own tokens, clipped and applied to its own copy), then the weights and the
optimizer's buffers are replaced by their mean over the ranks (LocalSteps, Group.average; also before
every validation and checkpoint, so those see one model and a checkpoint still does not depend on N).
Per step only (loss, tokens, signals) and one "any step fault?" flag travel; a fault on any rank rolls
every rank back. With K = 1, plain SGD, no clipping and equal shares this is the gradient all-reduce's
run exactly (the mean of the ranks' updates is the update with the mean gradient); otherwise it is
another run, as in Kaldi. Ranks are weighted equally, whatever their shares' tokens.

Waits for rank 0's own work (validation, writing a checkpoint) go through a second, gloo group with a
long timeout, so that --dist-timeout bounds the wait for a peer inside a step, not the validation.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from bptt.engine.flat import Flat
from bptt.engine.tbptt import stream_dim

Tensor = torch.Tensor

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for the others inside a step before giving up
PATIENT_TIMEOUT = timedelta(hours=24)  # waits for rank 0's validation and checkpoint writes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the first any rank got wins, in this order


class RankLost(Exception):
    """A collective failed: another rank died or did not answer within the timeout (one line)."""


def environment() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment; (0, 1, 0, 1) without."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return default if value in (None, "") else int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    world = read("WORLD_SIZE", 1)
    rank, local_rank = read("RANK", 0), read("LOCAL_RANK", 0)
    local_world = read("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank}")
    return rank, world, local_rank, local_world


def env_rank() -> int:
    """This process's rank (0 outside torchrun), without starting anything."""
    return environment()[0]


def share(total: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous columns [start, stop) of `total` that rank `rank` of `world` runs; sizes differ
    by at most one (the later ranks take the extra ones), and are 0 when total < world."""
    return rank * total // world, (rank + 1) * total // world


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../pair.cc:553] "
        first = first.split(". ")[0]  # the first sentence
        raise RankLost(f"{what}: {first[:200]}") from None


class Group:
    """This process's place in the run (rank, world size, device) and the collectives the trainer uses.
    One process that started no process group: every method is then the identity and nothing touches
    torch.distributed. started: a process group runs (always with world > 1; with world 1 when asked)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1,
                 backend: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.backend, self.timeout = backend, timeout
        self.patient: Any = None  # the gloo group for waits on rank 0 (validation, checkpoints)
        self.started = False

    @property
    def active(self) -> bool:
        return self.world > 1 or self.started

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str | torch.device) -> torch.device:
        """The device this rank runs on: cuda:LOCAL_RANK for a CUDA run of several ranks."""
        device = torch.device(device)
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, total: int) -> tuple[int, int]:
        """This rank's columns [start, stop) of a batch of `total` streams."""
        return share(total, self.rank, self.world)

    # -- collectives -----------------------------------------------------------------------------------

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (any picklable object; rank 0 may take long to reach it)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        with _collective("waiting for rank 0"):
            dist.broadcast_object_list(box, src=0, group=self.patient)
        return box[0]

    def all_agree(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (e.g. "my state is finite")."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([0 if flag else 1], dtype=torch.int64)
        with _collective("agreeing with the other ranks"):
            dist.all_reduce(t, group=self.patient)
        return int(t) == 0

    def agree_signal(self, signum: int | None) -> int | None:
        """The stop signal of any rank (the same on every rank), or None when no rank got one."""
        if not self.active:
            return signum
        t = torch.tensor(signal_flags(signum), dtype=torch.int64)
        with _collective("agreeing on a stop signal"):
            dist.all_reduce(t, group=self.patient)
        return agreed_signal(t.tolist())

    def gather_streams(self, tensors: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The engine state_dict of every rank joined along the streams (tbptt.stream_dim), in rank order,
        on rank 0 (what one process running all B streams holds); None on the other ranks."""
        if not self.active:
            return tensors
        local = {k: t.detach().to("cpu") for k, t in tensors.items()}
        parts: list[Any] | None = [None] * self.world if self.is_main else None
        with _collective("gathering the training state"):
            dist.gather_object(local, parts, dst=0, group=self.patient)
        if parts is None:
            return None
        if any(set(p) != set(local) for p in parts):
            raise RuntimeError("the ranks hold different training states: " + str([sorted(p) for p in parts]))
        out = {}
        for k, t in local.items():
            d = stream_dim(k)
            out[k] = t if d is None else torch.cat([p[k] for p in parts], dim=d)
        return out

    def take_streams(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inverse of gather_streams: this rank's columns of an engine state_dict saved for all B streams."""
        if not self.active:
            return tensors
        out = {}
        for k, t in tensors.items():
            d = stream_dim(k)
            if d is None:
                out[k] = t
            else:
                start, stop = self.share(t.shape[d])
                out[k] = t.narrow(d, start, stop - start).clone()
        return out

    def barrier(self) -> None:
        if self.active:
            with _collective("waiting for the other ranks"):
                dist.barrier(group=self.patient)

    def reduction(self, stop: Callable[[], int | None], average_every: int = 0) -> GradientSum | LocalSteps | None:
        """The Reduction for TrainStep (None in one process: step.no_reduction): the gradients summed over
        the ranks every step, or with average_every > 0 left local (model averaging, LocalSteps)."""
        if not self.active:
            return None
        return LocalSteps(stop) if average_every > 0 else GradientSum(stop)

    def agree_fault(self, reason: str | None) -> str | None:
        """Model averaging: every rank judged its own step (its own gradient norm); a fault on any rank
        rolls every rank back. -> this rank's reason, a reason naming the others, or None (a collective)."""
        if not self.active:
            return reason
        t = torch.tensor([0 if reason is None else 1], dtype=torch.int64)
        with _collective("agreeing on the step"):
            dist.all_reduce(t)
        faults = int(t)
        if faults == 0:
            return None
        return reason if reason is not None else f"a step fault on {faults} other rank(s) of {self.world}"

    def average(self, tensors: list[Tensor]) -> None:
        """Each tensor replaced in place by its mean over the ranks (model averaging): one all-reduce each,
        issued together; a non-contiguous view goes through a contiguous copy."""
        if not self.active:
            return
        pending = []
        with _collective("averaging the models"):
            for t in tensors:
                buffer = t if t.is_contiguous() else t.contiguous()
                pending.append((t, buffer, dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)))
            for t, buffer, work in pending:
                work.wait()
                buffer.div_(self.world)
                if buffer is not t:
                    t.copy_(buffer)


def signal_flags(signum: int | None) -> list[int]:
    return [int(signum == s) for s in STOP_SIGNALS]


def agreed_signal(counts: list) -> int | None:
    return next((int(s) for s, n in zip(STOP_SIGNALS, counts) if n > 0), None)


class LocalSteps:
    """The Reduction of model averaging (`--average-every K`, Kaldi's "parallel training with model
    averaging"): the gradients stay on their rank, each rank divides by its own tokens, clips and updates
    its own copy of the model, and every K steps the trainer replaces weights and optimizer buffers by
    their mean over the ranks (Group.average). Per step only (loss, tokens, stop signals) travel, in one
    small all-reduce, so the loss reported and the stop decisions are the whole run's, as with GradientSum.
    `stop` gives this rank's pending stop signal; `signal` holds the one agreed on by the last step."""

    sums_gradients = False  # TrainStep divides by this rank's own tokens

    def __init__(self, stop: Callable[[], int | None]):
        self.stop = stop
        self.signal: int | None = None

    def _sums(self, loss: Tensor, tokens: int, device: torch.device) -> Tensor:
        """(loss, tokens, this rank's stop-signal flags), float64, to be summed over the ranks."""
        small = torch.tensor([0.0, float(tokens), *signal_flags(self.stop())], dtype=torch.float64, device=device)
        small[0] = loss.detach().reshape(())
        return small

    def _agreed(self, small: Tensor) -> tuple[Tensor, int]:
        """The summed (loss, tokens, flags) -> (loss, tokens); the agreed stop signal kept in self.signal."""
        values = small.tolist()
        self.signal = agreed_signal(values[2:])
        return small[0], int(values[1])

    def __call__(self, grads: Flat, loss: Tensor, tokens: int) -> tuple[Tensor, int]:
        small = self._sums(loss, tokens, grads.data.device)
        with _collective("summing the loss"):
            dist.all_reduce(small, op=dist.ReduceOp.SUM)
            return self._agreed(small)


class GradientSum(LocalSteps):
    """The Reduction of data-parallel training (training/step.py): the flat gradient buffer summed over
    the ranks in place (one all-reduce), beside LocalSteps' small all-reduce of (loss, tokens, stop
    signals)."""

    sums_gradients = True  # TrainStep divides by the tokens of the whole batch

    def __call__(self, grads: Flat, loss: Tensor, tokens: int) -> tuple[Tensor, int]:
        data = grads.data
        small = self._sums(loss, tokens, data.device)
        with _collective("summing the gradients"):
            works = [dist.all_reduce(data[s], op=dist.ReduceOp.SUM, async_op=True) for s in grads.dense]
            dist.all_reduce(small, op=dist.ReduceOp.SUM)
            for work in works:
                work.wait()
            for name in grads.sparse:  # row-sparse gradients (training/sparse_rows.py)
                grads.ids[name], grads.row_values[name] = sum_rows(*grads.gathered(name))
            return self._agreed(small)


def sum_rows(ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Each rank's gathered rows of a matrix (ids (n_r,), values (n_r, width)) summed over the ranks ->
    (the union of the ids, increasing, and their summed rows): the counts all-gathered, then the ids and
    the rows padded to the largest count and all-gathered."""
    world = dist.get_world_size()
    count = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    padded_ids = ids.new_zeros(most)
    padded_ids[: ids.numel()] = ids
    padded = values.new_zeros(most, values.shape[1])
    padded[: ids.numel()] = values
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    all_values = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_values, padded)
    joined = torch.cat([t[:n] for t, n in zip(all_ids, sizes)])
    union, where = torch.unique(joined, return_inverse=True)
    summed = values.new_zeros(union.numel(), values.shape[1])
    summed.index_add_(0, where, torch.cat([t[:n] for t, n in zip(all_values, sizes)]))
    return union, summed


_CURRENT: Group | None = None


def setup(device: str | torch.device = "cpu", backend: str | None = None,
          timeout: float | None = None) -> Group:
    """This process's Group: with torchrun's environment and WORLD_SIZE > 1, the process group is
    started (once per process; later calls return the same Group) and every rank waits for all; with
    WORLD_SIZE 1 only when `backend` is given (a group of one: its collectives run, e.g. NCCL on one GPU).
    backend: gloo (default on the CPU) or nccl (default on CUDA); timeout: seconds a collective waits."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    rank, world, local_rank, local_world = environment()
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if not timeout > 0:
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if world == 1 and (backend is None or "MASTER_ADDR" not in os.environ):  # one process, no torchrun
        return Group(backend=backend, timeout=timeout)  # not kept: a later setup may see another device
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("--backend nccl needs --device cuda (gloo runs on the CPU)")
    group = Group(rank, world, local_rank, local_world, backend, timeout)
    if device.type == "cuda":
        torch.cuda.set_device(group.device(device))
    if not dist.is_initialized():
        with _collective(f"starting the process group ({backend}, rank {rank} of {world})"):
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
    with _collective("starting the process group"):
        group.patient = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    group.started = True
    group.barrier()
    _CURRENT = group
    return group


def shutdown() -> bool:
    """End the process group started by setup (after a clean end; not after RankLost). -> whether one ran."""
    global _CURRENT
    started = _CURRENT is not None
    if started and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _CURRENT = None
    return started


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker now, after shutdown(), without the interpreter's teardown. With the process
    group destroyed and every file written, the teardown of torch's C++ objects aborted one rank in 25–100
    ("terminate called without an active exception", exit −6, after both ranks had left
    destroy_process_group: measured over repeated 2-rank runs, before and after this change's code), which
    turned a finished run into a failed torchrun job. The output streams are flushed first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
