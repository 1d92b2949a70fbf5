"""Resource guard: estimate the memory a training run needs and refuse it, before allocating, when the
machine does not have it.

The estimate adds up what a run holds at its peak (sizes for float32, s = 4 bytes; N = k1·B positions
per block; P = the elements of the flat parameter buffer: the parameters and their alignment padding,
engine/flat.py's `layout`):

    parameters        P·s            counted from the shapes the model would allocate (the network of
                                     its ModelConfig: every layer's cell, the output layer, the direct
                                     connections' D), nothing allocated
    gradients         P·s            one buffer per parameter (the engine reuses it every block); 2·P·s for
                                     Adam with both --weight-decay (AdamW) and --l2, whose step adds the L2
                                     term into a second buffer (optim.Optimizer.step)
    optimizer         k·P·s          adam k = 2 (m, v), adagrad and rmsprop k = 1, sgd k = 0
    best model        P·s            the copy of the best weights on valid
    rollback copy     (2 + k)·P·s    the last training state saved (weights, best, optimizer), kept in
                                     memory so that a diverging step can be rolled back
    checkpoint        p_max + 16 MiB writing that state: the tensors are written as they are, the optimizer's
                                     buffers as views (Optimizer.state_dict(copy=False)) and a column-major
                                     U as its contiguous transpose (save_checkpoint(transposed=True)), each
                                     from its own memory by safetensors' save_file; what remains is the
                                     finiteness check's mask of one tensor (p_max bytes, the largest
                                     parameter's elements) and the file hashed 16 MiB at a time
    activations       a·L·k2·B·m·s   per layer, the cell's cache of the backward window and its errors
                                     (a = the cell's `cache_floats`, 4 for Elman, 18 for the LSTM;
                                     --independent: the longest sentence instead of k2)
                      + 2·k2·B·e·s   an embedding's output X_0 (recomputed in the backward) and its error
                      + (D+1)·k2·B·w·s  with dropout: the D masks (one per dropped connection of width w)
                                     and the dropped copy of the top layer's output
    output workspace  2·n·V·s        softmax: a chunk's (n,V) scores/probabilities and a temporary,
                                     n = min(N, 32M / V) positions (outputs/full.py forward_backward);
                                     class: N·(C + mean class size of a target); hsm: N·depth·m;
                                     nce/sampled: N·64 + 64·m
    row-sparse rows   1.25·(2 + k)·n·w·s  with row-sparse updates (training/sparse_rows.py), per word-indexed
                                     matrix of width w: its gradient's and its optimizer's gathered rows, at
                                     most n = the rows a block can gather (the embedding: k2·B words; class:
                                     whole classes are runs of rows, updated as views, and a block's rows
                                     are gathered only when its runs average fewer than RUN_ROWS = 8 rows,
                                     so n < 8·(min(N, C) + k2·B if V is tied); hsm: N·depth; nce/sampled:
                                     N + 64), in buffers a quarter larger than the most met
    evaluation        2·b·V·s        the valid set goes through in blocks of b = eval_block(V) positions
    data              16·(T+1)·B     each block's int64 copy (the batchers and the evaluation read the ids
                                     lazily); --independent: + 24 bytes per training sentence (the starts,
                                     lengths and order of data.SentenceBatches). The corpora themselves are
                                     not counted: an encoded corpus is already resident when the guard runs
                                     (the memory available excludes it) and a prepared one (`bptt prepare`,
                                     train --data) is a memory map, in the reclaimable page cache

and compares it with the memory available: /proc/meminfo's MemAvailable (bounded by a cgroup v2 limit
when there is one; os.sysconf elsewhere), or torch.cuda.mem_get_info for --device cuda. A run that does
not fit is refused with one line naming the option, the estimate, its largest parts, and what the
machine has; nothing of the model's size has been allocated by then.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bptt.engine.outputs.full import OUTPUT_CHUNK_SCORES, rows_within
from bptt.data import stream_length
from bptt.evaluation import eval_block
from bptt.engine.cells import CELLS
from bptt.engine.flat import layout
from bptt.model.config import ModelConfig
from bptt.model.language_model import build_network
from bptt.files import HASH_CHUNK
from bptt.training import sparse_rows

GIB = 1 << 30
MIB = 1 << 20
NOISE_SAMPLES = 64  # nce / sampled softmax noise words per block
OPTIMIZER_BUFFERS = {"sgd": 0, "adam": 2, "adagrad": 1, "rmsprop": 1}


class ResourceError(ValueError):
    """A run that needs more memory than the machine has; the message is one line."""


@dataclass
class MemoryEstimate:
    """Bytes per part of a training run (insertion order: the table in the module docstring)."""

    parts: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0
    hidden: int = 0
    direct: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self, limit: int = 4) -> str:
        """'parameters 15.0 GiB, optimizer 30.0 GiB, ...': the largest parts, largest first."""
        ranked = sorted(self.parts.items(), key=lambda kv: -kv[1])
        shown = [f"{name} {format_bytes(n)}" for name, n in ranked[:limit] if n > 0]
        return ", ".join(shown + (["..."] if len([n for _, n in ranked if n > 0]) > limit else []))


def format_bytes(n: int | float) -> str:
    if n >= GIB:
        return f"{n / GIB:,.1f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def parameter_count(config: ModelConfig, word_counts: Any = None) -> int:
    """Elements of all parameters of the model of `config` (with its vocab_size), from the shapes its
    network declares (nothing allocated). With the word counts, the class layer's classes are counted as
    the binning makes them (empty bins dropped)."""
    shapes = build_network(config, word_counts=word_counts).param_shapes()
    return sum(math.prod(shape) for shape in shapes.values())


def _class_positions_factor(net: Any, word_counts: Any, classes: int, V: int) -> float:
    """C' + the expected size of a target's class under the unigram distribution (class layer cost/position),
    for the classes of the network's class layer as it was built (its binning, empty bins dropped)."""
    if word_counts is None:
        return min(classes, V) + V / max(1, min(classes, V))
    word_class = net.output.word_class.cpu().numpy()
    sizes = np.bincount(word_class)
    mass = np.bincount(word_class, weights=np.asarray(word_counts, dtype=np.float64))
    total = mass.sum()
    expected = float((mass / total * sizes).sum()) if total > 0 else float(sizes.mean())
    return len(sizes) + expected


def estimate_training_memory(
    config: ModelConfig,
    *,
    batch: int,
    k1: int,
    k2: int | None = None,
    optimizer: str = "adam",
    train_tokens: int = 0,
    valid_tokens: int = 0,
    independent: bool = False,
    longest_sentence: int = 0,
    word_counts: Any = None,
    train_sentences: int = 0,
    row_sparse: tuple[str, ...] = (),
    net: Any = None,
    adamw_l2: bool = False,
) -> MemoryEstimate:
    """The memory a training run of the model `config` (with its vocab_size) needs at its peak, by part
    (see the module docstring). Arithmetic on Python integers and the shapes the network declares:
    nothing of the model's size is allocated, and absurd sizes give absurd (not overflowing) numbers.
    train_tokens and valid_tokens are not counted (the corpora are read lazily: see "data");
    train_sentences is, with independent. row_sparse: the matrices updated row by row (sparse_rows.choose).
    net: the network of `config` if the caller has built it (its shapes, dropout sites and row-sparse
    matrices are read; building one costs seconds at large V: the hierarchical softmax's Huffman tree).
    adamw_l2: Adam with both decoupled decay and an L2 term (a second gradient buffer)."""
    V, m, B = int(config.vocab_size), int(config.hidden_size), int(batch)
    s = torch.empty((), dtype=config.torch_dtype).element_size()
    k2 = int(k2 if k2 is not None else k1)
    T = max(1, int(longest_sentence)) if independent else k2  # steps in the backward window
    N = (max(1, int(longest_sentence)) if independent else int(k1)) * B  # positions per block
    if net is None:
        net = build_network(config, word_counts=word_counts)
    shapes = net.param_shapes()
    P = layout(shapes, s, net.column_major(), net.row_sparse())[2]  # the flat buffer, its rows' padding too
    largest = max(math.prod(shape) for shape in shapes.values())
    k = OPTIMIZER_BUFFERS.get(optimizer, 2)
    output, classes = config.output, config.classes
    class_factor = _class_positions_factor(net, word_counts, classes, V) if output == "class" else 0.0
    if output == "softmax":  # forward_backward's chunks: at most OUTPUT_CHUNK_SCORES scores at once
        workspace = 2 * min(N, rows_within(OUTPUT_CHUNK_SCORES, V)) * V * s
    elif output == "class":
        workspace = 2 * int(N * class_factor) * s
    elif output == "hsm":
        depth = math.ceil(math.log2(max(V, 2))) + 8  # Huffman paths: about log2 V, longer for rare words
        workspace = 2 * N * depth * m * s
    else:  # nce, sampled
        workspace = 2 * (N * (NOISE_SAMPLES + 1) + NOISE_SAMPLES * m) * s
    if config.direct:  # the (N, order) int64 n-gram offsets and their gather
        workspace += N * int(config.direct_order) * 8 * 3
    rows = 0  # row-sparse updates: the most rows of each matrix a step gathers, times its width
    if row_sparse:
        lookup = net.lookup_name()
        if output == "class":  # whole classes, spans of a vocabulary sorted by frequency, are updated as views of
            # runs; a step's rows are gathered only when their runs average fewer than RUN_ROWS rows (e.g. the
            # frequent words' one-word classes): then fewer than RUN_ROWS rows a run, and a run per class a
            # target used (at most min(N, C)) and, for a tied V, per word looked up
            used = sparse_rows.RUN_ROWS * min(N, classes, V)
        elif output == "hsm":
            used = N * (math.ceil(math.log2(max(V, 2))) + 8)
        else:
            used = N + NOISE_SAMPLES
        for name in row_sparse:
            height, width = shapes[name] if name not in net.column_major() else reversed(shapes[name])
            looked_up = T * B if name == lookup else 0
            if output == "class" and name == "V":
                n = used + sparse_rows.RUN_ROWS * looked_up
            else:
                n = looked_up + (used if name == "V" else 0)
            rows += int(min(height, n)) * width
    cache_floats = getattr(CELLS[config.cell], "cache_floats", 4) * config.layers
    activations = cache_floats * T * B * m + 2 * T * B * config.embedding
    if config.dropout or config.input_dropout:
        widths = net.dropout_sites().values()
        activations += T * B * (sum(n for _, n in widths) + m)
    est = MemoryEstimate(vocab_size=V, hidden=m, direct=int(config.direct))
    est.parts = {
        "parameters": P * s,
        "gradients": (2 if adamw_l2 and optimizer == "adam" else 1) * P * s,
        "optimizer": k * P * s,
        "best model": P * s,
        "rollback copy": (2 + k) * P * s,
        "checkpoint": largest + HASH_CHUNK,
        "activations": activations * s,
        "output workspace": workspace,
        "row-sparse rows": int(1.25 * (2 + k) * rows * s),
        "evaluation": 2 * eval_block(V) * (V + m) * s,
        "data": 16 * (T + 1) * B + (24 * int(train_sentences) if independent else 0),
    }
    return est


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """memory.max − memory.current of this process's cgroup (v2), or None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
        rel = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            current = int(f.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError, IndexError):
        return None


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes that can still be allocated on `device` (None when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except (RuntimeError, AssertionError, ValueError):
            return None
    found = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    if not found:
        try:
            found = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _culprit(est: MemoryEstimate, batch: int, k1: int, output: str) -> str:
    """The option(s) behind the largest part of the estimate."""
    p = est.parts
    weights = sum(p[k] for k in ("parameters", "gradients", "optimizer", "best model", "rollback copy", "checkpoint"))
    per_block = p["activations"] + p["output workspace"]
    if weights >= per_block and weights >= p["data"]:
        if est.direct and est.direct >= est.hidden * (est.hidden + 2 * est.vocab_size):
            return f"--direct {est.direct / 1e6:g} (million weights)"
        return f"--hidden {est.hidden} (vocabulary {est.vocab_size:,} words)"
    if per_block >= p["data"]:
        return f"--batch {batch} --bptt {k1} (--output {output}, vocabulary {est.vocab_size:,} words)"
    return "the corpora"


def check_memory(est: MemoryEstimate, device: str | torch.device, culprit: str,
                 available: int | None = None) -> None:
    """ResourceError (one line) when est.total exceeds the memory available on device."""
    device = torch.device(device)
    if available is None:
        available = available_memory(device)
    if available is None or est.total <= available:
        return
    where = "this machine has" if device.type == "cpu" else f"{device} has"
    raise ResourceError(
        f"{culprit}: needs about {format_bytes(est.total)} ({est.describe()}), {where} "
        f"{format_bytes(available)} available"
    )


def estimate_for_config(config: Any, model_config: ModelConfig, train_tokens: int = 0, valid_tokens: int = 0,
                        longest_sentence: int = 0, word_counts: Any = None, train_sentences: int = 0) -> MemoryEstimate:
    """estimate_training_memory for a bptt.training.TrainConfig and the model it trains (with its vocab_size)."""
    net = build_network(model_config, word_counts=word_counts)  # once: seconds at large V with hsm
    names = sparse_rows.choose(
        getattr(config, "sparse_updates", "off"), rule=config.optimizer, weight_decay=config.l2,
        decoupled_weight_decay=config.weight_decay, vocab_size=model_config.vocab_size, graph=config.graph,
        row_sparse=net.row_sparse())
    return estimate_training_memory(
        model_config, batch=config.batch, k1=config.k1, k2=config.k2, optimizer=config.optimizer,
        train_tokens=train_tokens, valid_tokens=valid_tokens, independent=config.independent,
        longest_sentence=longest_sentence, word_counts=word_counts, train_sentences=train_sentences,
        row_sparse=names, net=net, adamw_l2=bool(config.l2) and bool(config.weight_decay),
    )


def guard_training(config: Any, model_config: ModelConfig, vocab: Any, train_corpus: Any, valid_corpus: Any,
                   available: int | None = None, *, streams: int | None = None, processes: int = 1) -> MemoryEstimate:
    """Called by the trainer once the corpora are encoded and before the model exists: a ValueError
    naming --batch if the training corpus cannot fill B streams, a ResourceError if the run does not
    fit in memory. Returns the estimate.

    Data-parallel training (training/distributed.py): `streams` is the largest share of --batch that one
    rank runs (the estimate is then one rank's), `processes` the ranks that share this machine's memory
    (each may use 1/processes of what is available)."""
    if not config.independent:
        stream_length(train_corpus.tokens, config.batch, train_corpus.path)
    whole = config.batch
    if streams is not None:  # one rank's share of the streams: estimated as a run of that --batch
        config = dataclasses.replace(config, batch=int(streams))
    if processes > 1:
        available = available_memory(config.device) if available is None else available
        available = None if available is None else available // int(processes)
    longest = int(train_corpus.sentence_lengths.max()) if config.independent and train_corpus.tokens else 0
    est = estimate_for_config(config, model_config, train_corpus.tokens, valid_corpus.tokens, longest, vocab.counts,
                              len(train_corpus.sentence_starts))
    check_memory(est, config.device, _culprit(est, whole, config.k1, model_config.output), available)
    return est
