"""Training throughput of bptt next to plain PyTorch (torch.nn.RNN/LSTM/GRU + autograd), same shapes,
same run.

For each configuration (V vocabulary, m hidden units, B parallel streams, T steps per block; the cell
and the number of layers L) both sides train for the same number of steps on the same random token
stream, in this process:

  bptt   build_model's model of ModelConfig(cell, layers=L, softmax, cross-entropy, biases, float32) —
         ElmanLM (tanh) for one Elman layer, an RNNLM otherwise (an LSTM or GRU reads its words through
         an embedding of size m, like the peer) — trained by the trainer's own step
         (training/step.py): BPTT over the block (explicit forward and backward, no autograd) into the
         reused flat gradient buffer, the mean over the block's tokens, global-norm clipping at 0.25,
         SGD with lr = 1.0; the state is carried across blocks (in place). Optional keys: out= another
         output layer, C= its classes, direct= maxent direct connections (hash size in weights, order 3;
         the n-gram context is carried with the state).
  peer   word_language_model style: nn.Embedding -> nn.RNN(tanh) / nn.LSTM / nn.GRU (num_layers=L) ->
         nn.Linear, mean cross_entropy, loss.backward(), clip_grad_norm_(0.25), SGD with lr = 1.0, grads
         set to None; the hidden state is carried and detached across blocks. Both sides start from
         weights uniform in ±0.1 and zero biases (each drawn from its own seeded generator).

A step is one block of T·B training tokens: forward, backward, clipping, update. Both sides first run
the same number of untimed warm-up steps; then the timed steps are measured with time.perf_counter
(after torch.cuda.synchronize() on CUDA). By default bptt's timed steps run first, then the peer's;
with --rounds R they run in R alternating rounds (both models alive), which a machine whose speed
drifts (other work, frequency changes) distorts far less. Reported: training tokens/s of each side
and the ratio bptt/peer (> 1: bptt is faster), the per-round ratios, the ratio of the CPU time each
side took (time.process_time, all threads: with --threads 1 the work done, which other programs on a
shared machine disturb far less than the wall clock), and the peak memory of each side: on CUDA the peak of
torch.cuda.max_memory_allocated (reset between the sides, each side's model freed before the next);
on CPU the process's peak resident set size (ru_maxrss), a high-water mark of the whole process, so
the second side's (peer's) value includes the first side's.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from bptt.engine.outputs import OUTPUT_LAYERS
from bptt.model import ModelConfig, build_model
from bptt.training.cuda_graph import GraphedStep
from bptt.training.optim import SGD
from bptt.training.step import TrainStep

Tensor = torch.Tensor

DEFAULT_CONFIG = "V=10000,m=200,B=32,T=35"
PRESETS = {  # --preset NAME: a named set of configurations
    "gpu": [  # issue 5's table (one H100, fp32): full softmax, the peer is nn.RNN (cuDNN) + autograd
        "V=10000,m=200,B=32,T=35", "V=10000,m=200,B=128,T=35", "V=10000,m=650,B=64,T=35",
        "V=10000,m=1500,B=64,T=35", "V=100000,m=512,B=128,T=32", "V=10000,m=1024,B=256,T=35",
    ],
    "layers": ["out=softmax", "out=class,C=100", "out=hsm", "out=nce", "out=sampled"],  # issue 4's CPU table
}
CONFIG_KEYS = ("V", "m", "B", "T")  # positive integers
# bptt's output layer (the peer's is always a full softmax) and its maxent direct connections (hash size in
# weights, order 3; 0: none)
OPTIONAL_KEYS = {"out": "softmax", "C": "100", "direct": "0"}
LR = 1.0
CLIP = 0.25
INIT_RANGE = 0.1  # ElmanLM's default; the peer's weights are drawn the same way
CELLS = ("elman", "lstm", "gru")  # the cells with a PyTorch peer (PEER_RNNS)


# -- configurations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    V: int  # vocabulary
    m: int  # hidden units
    B: int  # parallel streams
    T: int  # block length = BPTT steps
    out: str = "softmax"  # bptt's output layer: softmax, class, hsm, nce, sampled
    C: int = 100  # classes, for out=class
    direct: int = 0  # maxent direct connections: hash size in weights (order 3), for out=softmax or class
    cell: str = "elman"  # the recurrent cell of both sides (`bptt bench --cell`)
    layers: int = 1  # stacked layers of both sides (`bptt bench --layers`)

    def __str__(self) -> str:
        text = ",".join(f"{key}={getattr(self, key)}" for key in CONFIG_KEYS)
        if self.out != "softmax":
            text += f",out={self.out}" + (f",C={self.C}" if self.out == "class" else "")
        if self.direct:
            text += f",direct={self.direct}"
        if self.cell != "elman" or self.layers != 1:
            text += f",{self.cell}x{self.layers}"
        return text

    @property
    def tokens_per_step(self) -> int:
        return self.T * self.B


def parse_config(text: str) -> BenchConfig:
    """'V=10000,m=200,B=32,T=35' -> BenchConfig; keys left out take the default's value.

    Raises ValueError('--config TEXT: ...') for a malformed string.
    """
    values = {**dict(_parse_pairs(DEFAULT_CONFIG)), **OPTIONAL_KEYS}
    seen: set[str] = set()
    keys = (*CONFIG_KEYS, *OPTIONAL_KEYS)
    for key, value in _parse_pairs(text):
        if key not in keys:
            raise ValueError(f"--config {text!r}: unknown key {key!r}; keys are {', '.join(keys)}")
        if key in seen:
            raise ValueError(f"--config {text!r}: key {key!r} given twice")
        seen.add(key)
        values[key] = value
    parsed: dict[str, int | str] = {}
    for key in (*CONFIG_KEYS, "C", "direct"):
        value = values[key]
        if not (value.isascii() and value.isdigit()) or len(value) > 10 or (int(value) < 1 and key != "direct"):
            raise ValueError(f"--config {text!r}: {key} must be a positive integer (at most 10 digits), got {value!r}")
        parsed[key] = int(value)
    if values["out"] not in OUTPUT_LAYERS:
        raise ValueError(f"--config {text!r}: out must be one of {', '.join(OUTPUT_LAYERS)}, got {values['out']!r}")
    if parsed["direct"] and values["out"] not in ("softmax", "class"):
        raise ValueError(f"--config {text!r}: direct connections need out=softmax or out=class")
    return BenchConfig(**parsed, out=values["out"])


def _parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config {text!r}: expected KEY=VALUE items separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


# -- the two training loops -------------------------------------------------------------------------


class Trainer(Protocol):
    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One training step on a (T,B) block; returns the block's summed loss (0-d, not synced)."""
        ...


def model_config(config: BenchConfig) -> ModelConfig:
    """bptt's model of a configuration: tanh Elman or an LSTM/GRU (embedding of size m), float32, biases."""
    return ModelConfig(vocab_size=config.V, hidden_size=config.m, cell=config.cell, layers=config.layers,
                       output=config.out, classes=config.C, direct=config.direct, dtype="float32",
                       init_range=INIT_RANGE)


class BpttTrainer:
    """bptt's model (build_model: ElmanLM for one Elman layer, else RNNLM) trained by the trainer's step
    (training/step.py): BPTT over each block, the mean over its tokens, clipping, SGD; the state carried
    in place across blocks."""

    def __init__(self, config: BenchConfig, seed: int, device: torch.device):
        self.model = build_model(model_config(config), word_counts=zipf_counts(config.V).tolist(), seed=seed,
                                 device=device)
        # the token stream is generated valid on the device: no word-id check (it would sync a GPU)
        self.train_step = TrainStep(self.model, SGD(self.model.flat, lr=LR), k1=config.T, k2=config.T, clip=CLIP,
                                    check_inputs=False)

    @property
    def state(self):
        """The carried state (engine.network.State)."""
        return self.train_step.engine.state

    @property
    def h0(self) -> Tensor:
        """The carried hidden state (B,m)."""
        return self.state.hidden

    @property
    def context(self) -> Tensor | None:
        """The carried n-gram context of the direct connections (K−1,B)."""
        return self.state.context

    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        loss, _, _ = self.train_step.forward_backward(inputs, targets)
        self.train_step.apply(LR)  # p -= lr * g
        return loss


class GraphedBpttTrainer(BpttTrainer):
    """BpttTrainer's step captured once as a CUDA graph and replayed (`--graph`; training/cuda_graph.py).

    BpttTrainer's step itself (it carries the state in place, so every replay reads it from the same
    buffer). Full softmax without direct connections only: the class layer's per-class shapes depend
    on the data and the sampled layers draw their noise on the host.
    """

    def __init__(self, config: BenchConfig, seed: int, device: torch.device, capture: bool | None = None):
        if config.out != "softmax" or config.direct:
            raise ValueError(f"--graph needs out=softmax without direct connections, got {config}")
        super().__init__(config, seed, device)
        self.capture = capture
        self._graphed: GraphedStep | None = None

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        if self._graphed is None:
            if self.train_step.engine.restarting:  # allocate the carried state before the capture
                self.train_step.engine.start(inputs.shape[1])
            state = [self.model.flat.data, *self.state.tensors().values()]
            self._graphed = GraphedStep(super().step, (inputs, targets), state, capture=self.capture)
        return self._graphed(inputs, targets)


PEER_RNNS: dict[str, Callable[[int, int], torch.nn.Module]] = {
    "elman": lambda m, layers: torch.nn.RNN(m, m, num_layers=layers, nonlinearity="tanh"),
    "lstm": lambda m, layers: torch.nn.LSTM(m, m, num_layers=layers),
    "gru": lambda m, layers: torch.nn.GRU(m, m, num_layers=layers),
}


class PeerRNNLM(torch.nn.Module):
    """PyTorch's word_language_model (RNN_TANH, LSTM or GRU), no dropout: Embedding -> RNN -> Linear."""

    def __init__(self, V: int, m: int, cell: str = "elman", layers: int = 1):
        super().__init__()
        self.encoder = torch.nn.Embedding(V, m)
        self.rnn = PEER_RNNS[cell](m, layers)  # seq-first: (T,B,m)
        self.decoder = torch.nn.Linear(m, V)

    def forward(self, inputs: Tensor, hidden):
        """inputs (T,B), hidden (L,B,m) (a pair for an LSTM) -> logits (T,B,V), hidden."""
        output, hidden = self.rnn(self.encoder(inputs), hidden)
        return self.decoder(output), hidden


class PeerTrainer:
    """The plain-PyTorch peer: autograd, clip_grad_norm_, SGD on p.data, state carried and detached."""

    def __init__(self, config: BenchConfig, seed: int, device: torch.device):
        self.V = config.V
        self.model = PeerRNNLM(config.V, config.m, config.cell, config.layers)
        _init_like_elman(self.model, seed)  # on the CPU, like ElmanLM, then moved
        self.model.to(device).train()
        self.params = list(self.model.parameters())
        zeros = torch.zeros(config.layers, config.B, config.m, device=device)
        self.hidden = (zeros, zeros.clone()) if config.cell == "lstm" else zeros

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        hidden = self.hidden
        hidden = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()
        logits, self.hidden = self.model(inputs, hidden)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, self.V), targets.view(-1))  # the mean
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        for p in self.params:
            p.data.add_(p.grad, alpha=-LR)
        self.model.zero_grad(set_to_none=True)
        return loss.detach() * targets.numel()  # summed over the block, like bptt's


@torch.no_grad()
def _init_like_elman(module: torch.nn.Module, seed: int) -> None:
    """Weights uniform in [-INIT_RANGE, INIT_RANGE] from a seeded CPU generator, biases zero."""
    generator = torch.Generator().manual_seed(int(seed))
    for p in module.parameters():
        if p.dim() == 1:
            p.zero_()
        else:
            p.uniform_(-INIT_RANGE, INIT_RANGE, generator=generator)


SIDES: dict[str, Callable[[BenchConfig, int, torch.device], Trainer]] = {
    "bptt": BpttTrainer,
    "peer": PeerTrainer,
}


# -- measuring ----------------------------------------------------------------------------------------


def zipf_counts(V: int) -> Tensor:
    """Word counts ∝ 1/rank (Zipf's law, like a real corpus), word id = rank − 1: (V,) float64."""
    return 1e6 / torch.arange(1, V + 1, dtype=torch.float64)


def token_stream(config: BenchConfig, n_blocks: int, seed: int, device: torch.device) -> Tensor:
    """A random stream of n_blocks·T + 1 steps for B streams, (n_blocks·T + 1, B) int64, words drawn
    from the Zipf distribution of zipf_counts (so class and tree layers see realistic frequencies)."""
    generator = torch.Generator().manual_seed(int(seed))
    n = (n_blocks * config.T + 1) * config.B
    data = torch.multinomial(zipf_counts(config.V), n, replacement=True, generator=generator)
    return data.view(n_blocks * config.T + 1, config.B).to(device)


def block(data: Tensor, i: int, T: int) -> tuple[Tensor, Tensor]:
    """Block i of the stream: inputs data[iT : (i+1)T], targets shifted by one step."""
    return data[i * T : (i + 1) * T], data[i * T + 1 : (i + 1) * T + 1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    trainer: Trainer, data: Tensor, T: int, first: int, count: int, device: torch.device
) -> tuple[float, float, Tensor | None]:
    """Train on blocks first .. first+count-1 -> (wall-clock seconds with device work, CPU seconds of the
    process, last loss)."""
    loss = None
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(first, first + count):
        loss = trainer.step(*block(data, i, T))
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, loss


@dataclass
class SideResult:
    seconds: float
    cpu_seconds: float  # CPU time of the process (all its threads) over the timed steps
    tokens_per_s: float
    peak_mb: float
    last_loss_per_token: float


def sides_for(graph: bool) -> dict[str, Callable[[BenchConfig, int, torch.device], Trainer]]:
    """The two sides; with graph=True bptt's step is a replayed CUDA graph (--graph)."""
    return {**SIDES, "bptt": GraphedBpttTrainer} if graph else SIDES


def run_side(
    side: str, config: BenchConfig, data: Tensor, steps: int, warmup: int, seed: int, device: torch.device,
    graph: bool = False,
) -> SideResult:
    """Build one side's model, warm it up, time `steps` steps, free it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = sides_for(graph)[side](config, seed, device)
    time_steps(trainer, data, config.T, 0, warmup, device)
    seconds, cpu_seconds, loss = time_steps(trainer, data, config.T, warmup, steps, device)
    peak_mb = peak_memory_mb(device)
    del trainer
    gc.collect()
    last_loss = float(loss) / config.tokens_per_step
    return SideResult(seconds, cpu_seconds, config.tokens_per_step * steps / seconds, peak_mb, last_loss)


def memory_field(device: torch.device) -> str:
    """The record's peak-memory key stem: bptt_<stem>_mb, peer_<stem>_mb."""
    return "cuda_max_allocated" if device.type == "cuda" else "peak_rss"


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS (a high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes on macOS, KiB on Linux


def split_steps(steps: int, rounds: int) -> list[int]:
    """steps timed steps in `rounds` rounds, as even as possible (no empty round)."""
    rounds = min(rounds, steps)
    return [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]


def bench_config(
    config: BenchConfig, steps: int, warmup: int, seed: int, device: torch.device, rounds: int = 1,
    graph: bool = False,
) -> dict:
    """Both sides on one configuration -> one result record (the JSON line).

    rounds = 1: bptt's timed steps, then the peer's, each side's model freed before the next.
    rounds > 1: both models live at once, warmed up, then the timed steps run in alternating rounds
    (bptt, peer, bptt, peer, ...), so that a slow phase of a shared machine falls on both sides; the
    tokens/s are over all rounds, ratio_min/ratio_max/ratio_median the extremes and the median of the
    per-round ratios. cpu_ratio is the peer's CPU seconds over bptt's (process time, all threads): with
    one thread the work each side did, which other programs on the machine disturb far less than the
    wall clock.
    """
    data = token_stream(config, warmup + steps, seed, device)
    if rounds <= 1:
        sides = {side: run_side(side, config, data, steps, warmup, seed, device, graph) for side in SIDES}
        round_ratios = [sides["bptt"].tokens_per_s / sides["peer"].tokens_per_s]
    else:
        sides, round_ratios = _alternating_rounds(config, data, steps, warmup, seed, device, rounds, graph)
    bptt, peer = sides["bptt"], sides["peer"]
    memory = memory_field(device)
    return {
        "config": str(config),
        **{key: getattr(config, key) for key in CONFIG_KEYS},
        "out": config.out, "C": min(config.C, config.V) if config.out == "class" else None, "direct": config.direct,
        "tokens_per_step": config.tokens_per_step,
        "bptt_tokens_per_s": bptt.tokens_per_s,
        "peer_tokens_per_s": peer.tokens_per_s,
        "ratio": bptt.tokens_per_s / peer.tokens_per_s,
        "rounds": len(round_ratios),
        "ratio_min": min(round_ratios),
        "ratio_max": max(round_ratios),
        "ratio_median": statistics.median(round_ratios),
        "round_ratios": round_ratios,
        "cpu_ratio": peer.cpu_seconds / bptt.cpu_seconds if bptt.cpu_seconds > 0 else float("nan"),
        "bptt_seconds": bptt.seconds,
        "peer_seconds": peer.seconds,
        "bptt_cpu_seconds": bptt.cpu_seconds,
        "peer_cpu_seconds": peer.cpu_seconds,
        "cell": config.cell,
        "layers": config.layers,
        f"bptt_{memory}_mb": bptt.peak_mb,
        f"peer_{memory}_mb": peer.peak_mb,
        "bptt_last_loss_per_token": bptt.last_loss_per_token,
        "peer_last_loss_per_token": peer.last_loss_per_token,
        "graph": graph,
    }


def _alternating_rounds(
    config: BenchConfig, data: Tensor, steps: int, warmup: int, seed: int, device: torch.device, rounds: int,
    graph: bool = False,
) -> tuple[dict[str, SideResult], list[float]]:
    trainers = {side: factory(config, seed, device) for side, factory in sides_for(graph).items()}
    for trainer in trainers.values():
        time_steps(trainer, data, config.T, 0, warmup, device)
    seconds = dict.fromkeys(trainers, 0.0)
    cpu = dict.fromkeys(trainers, 0.0)
    peak = dict.fromkeys(trainers, 0.0)
    loss: dict[str, Tensor | None] = dict.fromkeys(trainers)
    ratios, first = [], warmup
    for n in split_steps(steps, rounds):
        took = {}
        for side, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            took[side], cpu_took, loss[side] = time_steps(trainer, data, config.T, first, n, device)
            seconds[side] += took[side]
            cpu[side] += cpu_took
            peak[side] = max(peak[side], peak_memory_mb(device))
        ratios.append(took["peer"] / took["bptt"])
        first += n
    tokens = config.tokens_per_step * steps
    results = {
        side: SideResult(seconds[side], cpu[side], tokens / seconds[side], peak[side],
                         float(loss[side]) / config.tokens_per_step)
        for side in trainers
    }
    del trainers
    gc.collect()
    return results, ratios


# -- the machine --------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor(), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict, device: torch.device, threads: int, steps: int, warmup: int) -> str:
    where = f"{info['processor']}, {info['cpu_count']} cores"
    if "gpu" in info:
        where += f", {info['gpu']}"
    return (
        f"machine: {where}, {info['platform']}; torch {torch.__version__}, {threads} threads, "
        f"device {device}{' (fp32, TF32 off)' if device.type == 'cuda' else ''}; {steps} timed steps after "
        f"{warmup} warm-up steps"
    )


# -- output -------------------------------------------------------------------------------------------


def table_header(config_width: int, device: torch.device) -> str:
    memory = "peak MB" if device.type == "cuda" else "peak RSS MB"
    return (
        f"{'config':<{config_width}}  {'bptt tok/s':>12}  {'peer tok/s':>12}  {'bptt/peer':>9}  "
        f"{'bptt ' + memory:>16}  {'peer ' + memory:>16}"
    )


def table_row(record: dict, config_width: int, device: torch.device) -> str:
    memory = memory_field(device)
    bptt_mb, peer_mb = record[f"bptt_{memory}_mb"], record[f"peer_{memory}_mb"]
    spread = (f"  (rounds {record['ratio_min']:.2f}–{record['ratio_max']:.2f}x, median {record['ratio_median']:.2f}x)"
              if record.get("rounds", 1) > 1 else "")
    return (
        f"{record['config']:<{config_width}}  {record['bptt_tokens_per_s']:>12,.0f}  "
        f"{record['peer_tokens_per_s']:>12,.0f}  {record['ratio']:>8.2f}x  {bptt_mb:>16,.1f}  {peer_mb:>16,.1f}"
        + spread
    )


# -- the subcommand -----------------------------------------------------------------------------------
