"""The Elman cell with its input weights tied to the output layer's: U ≡ Vᵀ (Press & Wolf 2017; Inan et al. 2017).

Shapes: T = time, B = streams, m = hidden, V = vocabulary.
  V (V,m) is the output layer's matrix (g^t = V s^t + c); the cell reads U = Vᵀ (m,V), so the word
  w enters as row w of V — the same vector that scores w at the output. W (m,m), b (m,) as in elman.py.

The forward is elman.py's with U = Vᵀ:
    a^t = W s^{t-1} + Vᵀ x^t + b,   s^t = F(a^t),   g^t = V s^t + c
V now reaches the loss along two paths, so its gradient is the sum of the two (the product rule):
    ∂L/∂V = (∂L/∂V)_output + (∂L/∂U)ᵀ,   (∂L/∂U)_{:,w} = Σ_{t: x^t = w} δ^t
The output layer writes the first term (it runs before the cell's backward); this cell adds the
second — a scatter-add of δ^t into the rows x^t of ∂L/∂V, since Vᵀ has the layout the untied U has.
"""

from __future__ import annotations

import torch

from bptt.cells.elman import ElmanCell, elman_backward, elman_forward

Tensor = torch.Tensor


class TiedElmanCell(ElmanCell):
    """Elman recurrence whose input weights are the output layer's V, transposed; parameters W, b."""

    @staticmethod
    def param_shapes(vocab_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        shapes = ElmanCell.param_shapes(vocab_size, hidden_size, bias)
        del shapes["U"]  # U is Vᵀ: the output layer owns the matrix
        return shapes

    def forward(self, params: dict[str, Tensor], inputs: Tensor, h0: Tensor) -> Tensor:
        # a^t = W s^{t-1} + Vᵀ x^t + b: elman_forward with U = Vᵀ (a gather of rows of V)
        return elman_forward(params["V"].t(), params["W"], params.get("b"), self.F, inputs, h0)

    def backward(
        self,
        params: dict[str, Tensor],
        inputs: Tensor,
        h0: Tensor,
        S: Tensor,
        dS: Tensor,
        grads: dict[str, Tensor],
        truncation: int | None = None,
    ) -> None:
        # elman_backward accumulates ∂L/∂U into grads["U"]; here that is a view of grads["V"] transposed,
        # so (∂L/∂U)ᵀ is added to the output layer's ∂L/∂V already there: ∂L/∂V = (∂L/∂V)_out + (∂L/∂U)ᵀ
        view = {**grads, "U": grads["V"].t()}
        elman_backward(params["V"].t(), params["W"], self.F, inputs, h0, S, dS, view, truncation)
