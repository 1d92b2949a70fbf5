"""Parameters (and gradients, and optimizer buffers) as named views into one flat buffer.

A `Flat` is a dict {name: tensor} — what every forward and backward of the engine reads and writes —
whose tensors are views into one contiguous 1-D tensor `data` of one dtype on one device. Whatever
touches all of them at once does it once on `data`: zeroing the gradients, scaling them for
clipping, an all-reduce across processes, a fused optimizer update.

Layout: the tensors of two or more dimensions (weight matrices) first, then the 1-D ones (biases, the
direct connections' D), each group in the order the shapes were given; `matrices` is the slice of
`data` that holds the first group (weight decay applies to it alone). Every view starts at a multiple
of ALIGN_BYTES, as a tensor of its own would: matrix products read aligned rows, and their results do
not depend on where a matrix happens to sit in the buffer (BLAS kernels take other paths for
unaligned data, which can change the last bit of a sum). A matrix's rows are aligned too: its row
stride is its width rounded up to ROW_ALIGN_BYTES (`strides`), so a (V, 650) matrix is the first 650
columns of a (V, 656) storage — MKL's products run up to 1.4× slower on unaligned rows — except the
matrices listed in `unpadded`: the row-sparse ones (the embedding, a factorized output layer's rows),
read by gathers and sparse products, which gained nothing from padded rows (the hierarchical softmax
at hidden 100 measured slower). The padding
between views and at the end of rows is zero and stays zero (its gradients are zero; no update rule
moves a zero weight with a zero gradient: SGD, Adam and its relatives, decay). A name listed in
`column_major` is stored as the transpose of a (row-padded) tensor (its columns are contiguous: the
first layer's U, whose columns the input term gathers). Views keep their layout from buffer to
buffer: gradients and optimizer buffers made by `like()` have the parameters' strides. A matrix whose
width is a multiple of the row alignment (8 float32, 4 float64 values) is a plain contiguous view.

Row-sparse gradients. The gradient of a matrix with a row per word (the embedding, the first layer's
gathered U, the rows of a factorized output layer) is zero outside the rows a block used. A backward
that writes such rows says which with `note_rows(grads, name, ids)`; a gradient buffer that keeps a
`row_log` (training/sparse_rows.py) collects them, so that the step can zero, reduce, clip and update
those rows only. `rows(name)` is a parameter's storage as (rows, width) with a row per word.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

Tensor = torch.Tensor

ALIGN_BYTES = 64  # where PyTorch's CPU allocator puts a new tensor, and a cache line
# a matrix's rows start at multiples of this many bytes: its row stride is padded up to it. MKL's products
# are up to 1.4× slower when the rows of their output are not 32-byte aligned (e.g. ∂L/∂V (V, 650) of
# the PTB medium LSTM: 134 ms against 92 with a stride of 656; docs/performance.md)
ROW_ALIGN_BYTES = 32


def layout(shapes: dict[str, tuple[int, ...]], element_size: int, column_major: Iterable[str] = (),
           unpadded: Iterable[str] = ()) -> tuple[dict[str, tuple[int, int]], dict[str, int], int, int]:
    """Where each tensor of a Flat lies, without allocating it (the memory guard counts the padding too):
    (offsets {name: (start, stop)}, row strides {matrix: stride}, elements in all, end of the matrices)."""
    column_major, unpadded = set(column_major), set(unpadded)
    order = [n for n, s in shapes.items() if len(s) >= 2] + [n for n, s in shapes.items() if len(s) < 2]
    align, row_align = max(1, ALIGN_BYTES // element_size), max(1, ROW_ALIGN_BYTES // element_size)
    offsets, strides, start, matrices_end = {}, {}, 0, 0
    for name in order:
        start = -(-start // align) * align  # the next aligned element
        shape = shapes[name]
        if len(shape) == 2 and name not in unpadded:
            width = shape[0] if name in column_major else shape[1]  # the storage's row length
            strides[name] = -(-width // row_align) * row_align
            size = math.prod(shape) // max(width, 1) * strides[name]
        else:
            size = math.prod(shape)
        offsets[name] = (start, start + size)
        start += size
        if len(shape) >= 2:
            matrices_end = start
    return offsets, strides, start, matrices_end


class Flat(dict):
    """{name: view into self.data}; see the module docstring."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, device: torch.device | str,
                 column_major: Iterable[str] = (), unpadded: Iterable[str] = (), data: Tensor | None = None):
        super().__init__()
        self.shapes = {name: tuple(int(n) for n in shape) for name, shape in shapes.items()}
        self.column_major = tuple(name for name in column_major if name in self.shapes)
        self.unpadded = tuple(name for name in unpadded if name in self.shapes)
        element = torch.empty((), dtype=dtype).element_size()
        offsets, self.strides, start, matrices_end = layout(self.shapes, element, self.column_major, self.unpadded)
        self.offsets = offsets
        self.numel = start
        self.matrices = slice(0, matrices_end)
        if data is None:
            data = torch.zeros(self.numel, dtype=dtype, device=device)
        elif data.dim() != 1 or data.numel() != self.numel or not data.is_contiguous():
            raise ValueError(f"a flat buffer for these shapes is a contiguous 1-D tensor of {self.numel} elements")
        if data.data_ptr() % ALIGN_BYTES:  # e.g. a slice of another buffer: copy to an aligned one
            raise ValueError(f"a flat buffer must start at a multiple of {ALIGN_BYTES} bytes")
        self.data = data
        # a gradient's layout for what treats it as a whole (training/step.py, the all-reduce, clipping): one
        # dense buffer here; training/sparse_rows.py's RowSparseGrads has row-sparse matrices beside it
        self.dense: list[slice] = [slice(0, self.numel)]
        self.sparse: tuple[str, ...] = ()
        for name in self.shapes:  # the dict keeps the order of `shapes`
            a, b = offsets[name]
            self[name] = self.view_of(name, data[a:b])

    def view_of(self, name: str, piece: Tensor) -> Tensor:
        """`name`'s view, in its shape and layout, of `piece` = offsets[name]'s slice of a buffer laid out
        like data (an optimizer's buffer too)."""
        shape = self.shapes[name]
        storage = tuple(reversed(shape)) if name in self.column_major else shape  # (rows, width) for a matrix
        if name not in self.strides:
            view = piece.view(storage)
        else:
            view = piece.view(storage[0], self.strides[name])[:, : storage[1]]  # the first `width` of each row
        return view.t() if name in self.column_major else view

    def like(self, data: Tensor | None = None) -> Flat:
        """A Flat with the same names, shapes and layout over `data` (default: a new zero buffer)."""
        return Flat(self.shapes, dtype=self.data.dtype, device=self.data.device, column_major=self.column_major,
                    unpadded=self.unpadded, data=data)

    def rows(self, name: str) -> Tensor:
        """The storage of a matrix as (rows, width), one row per word: the tensor itself, or the transpose
        of a column-major one (the first layer's U (G·m, V) is stored as a contiguous (V, G·m))."""
        t = self[name]
        return t.t() if name in self.column_major else t

    def storage(self, name: str) -> Tensor:
        """A matrix's storage as a contiguous (rows, stride) tensor, row padding included (zeros): the
        rows of Flat.rows with their padding, for kernels that need contiguous memory (fused updates)."""
        a, b = self.offsets[name]
        rows = self.rows(name)
        return self.data[a:b].view(rows.shape[0], self.strides.get(name, rows.shape[1]))

    def gather_(self) -> None:
        """After a backward, before the reduction: nothing to gather in a dense buffer (RowSparseGrads
        gathers its matrices' rows)."""

    def store_(self) -> None:
        """After the mean and the clipping: nothing to store back in a dense buffer."""

    def parts(self) -> list[Tensor]:
        """The tensors a global norm runs over: every view — a padded matrix as its contiguous storage, whose
        zero padding leaves the norm unchanged (a norm over a strided view runs 4× slower)."""
        return [self.storage(name) if name in self.strides else view for name, view in self.items()]

    def div_(self, x: float | Tensor) -> None:
        self.data.div_(x)

    def mul_(self, x: float | Tensor) -> None:
        self.data.mul_(x)

    def zero_(self) -> Flat:
        self.data.zero_()
        return self

    def copy_(self, tensors: dict[str, Tensor]) -> Flat:
        """Copy tensors of the same names and shapes into the views."""
        for name, view in self.items():
            view.copy_(tensors[name])
        return self


def note_rows(grads: dict[str, Tensor], name: str, ids: Tensor) -> None:
    """A backward wrote rows `ids` (any shape, repeats allowed) of grads[name] (Flat.rows): recorded when
    grads keeps a row log for that name (row-sparse training), ignored otherwise."""
    log = getattr(grads, "row_log", None)
    if log is not None and name in log:
        log[name].append(ids.reshape(-1))
