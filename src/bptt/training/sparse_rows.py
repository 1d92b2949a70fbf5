"""Row-sparse gradients: a step zeroes, reduces, clips and updates only the rows of the word-indexed
matrices that its block used.

A block of T·B positions reads at most T·B distinct words and a factorized output layer touches the
rows of its targets' classes (class), paths (hsm) or targets and noise words (nce, sampled); every other
row of the embedding E (or the first layer's gathered U, or a tied V) and of the output matrix V has a
zero gradient. With V = 800k words those rows are almost all of the model: a dense step would zero,
norm, scale and update (Adam: read and write p, g, m, v) hundreds of millions of numbers to change a
few thousand rows. Network.row_sparse() names these matrices; every backward that writes their rows
notes them (engine/flat.py, note_rows).

`RowSparseGrads` is the gradient buffer of such a step: a Flat (the same layout, so every reader of
the gradients sees the whole, true gradient) that keeps the row log and, after the backward,

    gather_()   each named matrix's rows as (ids (n,), values (n, width)): the distinct ids noted and
                their rows; the rest of the buffer ("dense": every other parameter) stays where it is
    div_/mul_   the mean and the clipping scale, on the dense slices and the gathered rows
    parts()     what the global norm runs over (the untouched rows are zero: they add nothing)
    store_()    the gathered rows written back into the buffer (after a reduction summed them)
    zero_()     the dense slices and the rows of the last step only

Data-parallel training (training/distributed.py) all-reduces the dense slices and all-gathers the
(ids, values) of every rank, which are then summed over the union of the ids.

The update (training/optim.py) applies the rule to the dense slices as before and, for each named
matrix, to its gathered rows and their optimizer buffers (gather, torch.optim's functional rule,
scatter back). SGD and Adagrad without weight decay give the dense step's result (an untouched row has
g = 0: it does not move, and its accumulator does not change). Adam and RMSprop are *lazy*: the moving
averages of an untouched row are not decayed that step (torch.optim.SparseAdam's rule), and weight decay
reaches a row only on the steps that use it. `--sparse-updates` chooses (training/config.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from bptt.engine.flat import Flat

Tensor = torch.Tensor

# --sparse-updates auto: lazy rules (Adam, RMSprop, or any weight decay) from this vocabulary size on
AUTO_LAZY_VOCABULARY = 100_000


class RowBuffer:
    """Reusable storage for (n, width) gathered rows, grown to the largest n met (and a quarter more):
    a fresh tensor of tens of MB per gather would be new pages from the kernel every step (glibc maps
    large blocks and unmaps them when freed), which costs more than the gather itself."""

    def __init__(self, like: Tensor):
        self.buffer = like.new_empty(0, like.shape[1])
        self.most = like.shape[0]  # never more rows than the matrix has

    def take(self, n: int) -> Tensor:
        if n > self.buffer.shape[0]:
            self.buffer = self.buffer.new_empty(min(self.most, n + n // 4), self.buffer.shape[1])
        return self.buffer[:n]

    def gather(self, rows: Tensor, ids: Tensor) -> Tensor:
        """rows[ids] into this buffer (n, width)."""
        return torch.index_select(rows, 0, ids, out=self.take(ids.numel()))


def dense_slices(flat: Flat, names: Iterable[str]) -> list[slice]:
    """The slices of flat.data outside the named parameters, in order (split at the end of the matrices,
    so that each slice lies wholly in the decaying segment or wholly outside it)."""
    cuts = sorted(flat.offsets[n] for n in names)
    out, start = [], 0
    for a, b in [*cuts, (flat.numel, flat.numel)]:
        for lo, hi in ((start, min(a, flat.matrices.stop)), (max(start, flat.matrices.stop), a)):
            if hi > lo:
                out.append(slice(lo, hi))
        start = b
    return out


def exact_rule(rule: str, weight_decay: float, decoupled_weight_decay: float) -> bool:
    """Whether a row-sparse update gives the dense update's result: SGD and Adagrad without decay."""
    return rule in ("sgd", "adagrad") and not weight_decay and not decoupled_weight_decay


def choose(mode: str, *, rule: str, weight_decay: float, decoupled_weight_decay: float, vocab_size: int,
           row_sparse: tuple[str, ...], graph: bool = False) -> tuple[str, ...]:
    """--sparse-updates auto|on|off -> the parameters to update row by row (empty: a dense update).

    auto: the exact cases always; the lazy ones (Adam, RMSprop, weight decay) from a vocabulary of
    AUTO_LAZY_VOCABULARY words on, where the dense update dominates a step. A step captured as a CUDA
    graph (--graph) has fixed shapes: dense."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--sparse-updates must be auto, on or off, got {mode!r}")
    if mode == "off" or not row_sparse:
        return ()
    if graph:
        if mode == "on":
            raise ValueError("--sparse-updates on does not go with --graph (a captured step has fixed shapes)")
        return ()
    if mode == "on" or exact_rule(rule, weight_decay, decoupled_weight_decay) or vocab_size >= AUTO_LAZY_VOCABULARY:
        return tuple(row_sparse)
    return ()


RUN_ROWS = 8  # rows in runs of this mean length or more are updated as views of the runs, not gathered


def consecutive_runs(ids: Tensor) -> list[tuple[int, int]]:
    """Increasing ids (n,) -> their runs of consecutive values [(start, stop), ...]."""
    if ids.numel() == 0:
        return []
    breaks = torch.nonzero(ids[1:] != ids[:-1] + 1).reshape(-1) + 1
    starts = torch.cat((breaks.new_zeros(1), breaks))
    stops = torch.cat((breaks, breaks.new_full((1,), ids.numel())))
    first, last = ids.index_select(0, starts).tolist(), (ids.index_select(0, stops - 1) + 1).tolist()
    return list(zip(first, last))


def run_count(ids: Tensor) -> int:
    """Increasing ids (n,) -> how many runs of consecutive values they form (consecutive_runs' length)."""
    return int((ids[1:] != ids[:-1] + 1).sum()) + 1 if ids.numel() else 0


def distinct_rows(ids: Tensor, rows: int) -> Tensor:
    """The distinct values of ids (row numbers in [0, rows)), increasing: a sort (torch.unique) for a few
    ids; for many (one per eight rows or more: a block's 5,600 words of a 10k vocabulary, 4k hsm nodes of
    10k) a count per row and its nonzero entries, 2.7× faster than the sort there (6× at 50k ids)."""
    if ids.numel() * 8 >= rows:
        return torch.bincount(ids, minlength=rows).nonzero().squeeze(1)
    return torch.unique(ids)


class RowSparseGrads(Flat):
    """Gradient buffers of `params`' layout whose named matrices are row-sparse (module docstring)."""

    def __init__(self, params: Flat, names: Iterable[str]):
        super().__init__(params.shapes, dtype=params.data.dtype, device=params.data.device,
                         column_major=params.column_major, unpadded=params.unpadded)
        self.sparse = tuple(names)
        for name in self.sparse:
            if len(self.shapes[name]) != 2:
                raise ValueError(f"row-sparse gradients need matrices; {name!r} has shape {self.shapes[name]}")
        self.row_log: dict[str, list[Tensor]] = {name: [] for name in self.sparse}  # note_rows appends here
        empty = torch.zeros(0, dtype=torch.int64, device=self.data.device)
        self.ids: dict[str, Tensor] = {name: empty for name in self.sparse}  # the rows held nonzero
        self.row_values: dict[str, Tensor] = {name: self.rows(name)[:0] for name in self.sparse}
        self.space = {name: RowBuffer(self.rows(name)) for name in self.sparse}  # where values are gathered
        # the rows as runs of consecutive ids [(start, stop), ...] when they come in long runs (a class
        # layer's classes, the frequent words at the top of a vocabulary sorted by count): each run is then a
        # view (nothing gathered, nothing stored back); None: the rows are gathered into values
        self.runs: dict[str, list[tuple[int, int]] | None] = {name: None for name in self.sparse}
        self.dense = dense_slices(self, self.sparse)

    def zero_(self) -> RowSparseGrads:
        """Zero the dense slices and the rows written since the last zero_ (gathered or only noted)."""
        for s in self.dense:
            self.data[s].zero_()
        for name in self.sparse:
            rows = self.rows(name)
            for ids in (self.ids[name], *self.row_log[name]):
                if ids.numel():
                    rows.index_fill_(0, ids, 0)
            self.row_log[name] = []
            self.ids[name] = self.ids[name][:0]
            self.row_values[name] = rows[:0]
            self.runs[name] = None
        return self

    def gather_(self) -> None:
        """After the backward: each named matrix's distinct noted rows, as runs of views when they come in
        runs of at least RUN_ROWS rows on average, else gathered (copies, in reused buffers: valid until
        the next gather_)."""
        for name in self.sparse:
            log = self.row_log[name]
            ids = distinct_rows(torch.cat(log), self.rows(name).shape[0]) if log else self.ids[name][:0]
            self.row_log[name] = []
            self.ids[name] = ids
            count = run_count(ids)  # the runs themselves (a list) only when they will be used
            if count and ids.numel() >= RUN_ROWS * count:
                self.runs[name], self.row_values[name] = consecutive_runs(ids), self.rows(name)[:0]
            else:
                self.runs[name] = None
                self.row_values[name] = self.space[name].gather(self.rows(name), ids)

    def gathered(self, name: str) -> tuple[Tensor, Tensor]:
        """A matrix's rows as (ids, values) whatever their form (runs are gathered first)."""
        if self.runs[name] is not None:
            self.runs[name] = None
            self.row_values[name] = self.space[name].gather(self.rows(name), self.ids[name])
        return self.ids[name], self.row_values[name]

    def row_views(self, name: str) -> list[Tensor]:
        """A matrix's nonzero rows as tensors to update in place: the runs' views or the gathered values."""
        runs = self.runs[name]
        if runs is None:
            return [self.row_values[name]]
        rows = self.rows(name)
        return [rows[a:b] for a, b in runs]

    def parts(self) -> list[Tensor]:
        """Every nonzero part of the gradient: the dense slices and the rows."""
        return [self.data[s] for s in self.dense] + [v for name in self.sparse for v in self.row_views(name)]

    def div_(self, x: float | Tensor) -> None:
        for part in self.parts():
            part.div_(x)

    def mul_(self, x: float | Tensor) -> None:
        for part in self.parts():
            part.mul_(x)

    def store_(self) -> None:
        """Write the gathered rows back into the buffer (the buffer is then the whole gradient again)."""
        for name in self.sparse:
            if self.runs[name] is None:
                self.rows(name).index_copy_(0, self.ids[name], self.row_values[name])
