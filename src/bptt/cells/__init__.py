"""Recurrent cells: map the input words and the previous state to the next state, and back.

A cell is a class with
    param_shapes(vocab_size, hidden_size, bias) -> {name: shape}
    forward(params, inputs (T,B), h0 (B,m)) -> S (T,B,m), the states s^1..s^T
    backward(params, inputs, h0, S, dS (T,B,m), grads, truncation) -> None, accumulating
        into grads; dS holds the direct errors ∂L/∂s^t from the output layer at each step.
"""

from bptt.cells.elman import ElmanCell
from bptt.cells.elman_tied import TiedElmanCell

__all__ = ["ElmanCell", "TiedElmanCell"]
