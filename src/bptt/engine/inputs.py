"""The input term of a layer, A = U x^t for every step, computed outside the cell, and its backward.

Shapes: T = time, B = streams, n = the layer's input size, G·m = the cell's gates times hidden units.
  U (G·m, n) the cell's input weights ("U", cells/__init__.py).

* The first layer reads words: x^t is one-hot over the vocabulary (n = V), so U x^t is column x^t of U:
  a gather of rows of Uᵀ, never a product with a one-hot matrix. U is stored so that its columns are
  contiguous (U is the transpose of a contiguous (V, G·m) tensor, model/language_model.py), which
  makes the gather and the scatter of its gradient row operations. A tied model gathers from the
  output layer's V (V,m) instead: Vᵀ has exactly this layout.
* A layer above reads the layer below's output X (T,B,n): A = X Uᵀ, one (T·B,n)×(n,G·m) product.
* The first layer of a model with an embedding E (V,e) reads X = E[x]: A = E[x] Uᵀ. Without dropout on
  X the rows of A are those of the block's distinct words, so the product runs over those only
  (lookup_project_forward/backward; on PTB a block of 700 positions holds ≈ 390 distinct words).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def integer_ids(ids: Tensor) -> bool:
    """Whether a tensor's dtype can hold word ids (an integer type: not floating, complex or bool)."""
    return not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)


def check_word_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """ValueError naming `name` for an id outside [0, vocab_size). Reads the ids (on a GPU, a device sync)."""
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds word id {low if low < 0 else high}, outside [0, {vocab_size})")


def embed_forward(U: Tensor, inputs: Tensor) -> Tensor:
    """U (G·m, V), inputs (T,B) int64 -> A (T,B,G·m), A[t,b] = U[:, inputs[t,b]]: a row gather of Uᵀ.

    The result is a fresh tensor: the cell may overwrite it."""
    T, B = inputs.shape
    return U.t().index_select(0, inputs.reshape(-1)).view(T, B, U.shape[0])


def embed_backward(inputs: Tensor, dA: Tensor, dU: Tensor) -> None:
    """dA (T,B,G·m) -> dU[:, w] += Σ_{t,b: x = w} dA[t,b]: a row scatter-add into dUᵀ.

    forward was A^t = U x^t with x^t one-hot at w = inputs[t]: ∂A^t/∂U_{:,w} is the identity, so column
    w of ∂L/∂U collects the errors of every position that read w (index_add_ sums repeats)."""
    T, B = inputs.shape
    dU.t().index_add_(0, inputs.reshape(-1), dA.view(T * B, dA.shape[2]))


def project_forward(U: Tensor, X: Tensor) -> Tensor:
    """U (G·m, n), X (T,B,n) -> A (T,B,G·m) = X Uᵀ: one product over all T·B positions."""
    T, B, n = X.shape
    return torch.mm(X.reshape(T * B, n), U.t()).view(T, B, U.shape[0])


def distinct_words(inputs: Tensor) -> tuple[Tensor, Tensor]:
    """inputs (T,B) -> (the distinct word ids (n,), where (T·B,): each position's index among them)."""
    return torch.unique(inputs.reshape(-1), return_inverse=True)


def lookup_project_forward(E: Tensor, U: Tensor, inputs: Tensor) -> Tensor:
    """E (V,e), U (G·m,e), inputs (T,B) -> A (T,B,G·m) = E[x] Uᵀ, one product over the distinct words.

    A^t = U E_{x^t} depends on the word only: A_w = U E_w for each distinct w, then a row gather."""
    T, B = inputs.shape
    words, where = distinct_words(inputs)
    return torch.mm(E.index_select(0, words), U.t()).index_select(0, where).view(T, B, U.shape[0])


def lookup_project_backward(E: Tensor, U: Tensor, inputs: Tensor, dA: Tensor, dE: Tensor, dU: Tensor) -> None:
    """dA (T,B,G·m) -> accumulates dU (G·m,e) and dE (V,e).

    forward was A^t = U E_w (w = x^t); so with dA_w = Σ_{t: x^t = w} dA^t (a scatter-add over positions):
      ∂L/∂U   = Σ_w dA_w E_wᵀ       -> dU += dA_wordsᵀ E_words
      ∂L/∂E_w = Uᵀ dA_w             -> dE[words] += dA_words U
    """
    T, B = inputs.shape
    words, where = distinct_words(inputs)
    per_word = dA.new_zeros(words.shape[0], dA.shape[2]).index_add_(0, where, dA.reshape(T * B, dA.shape[2]))
    dU.addmm_(per_word.t(), E.index_select(0, words))
    dE.index_add_(0, words, torch.mm(per_word, U))


def project_backward(U: Tensor, X: Tensor, dA: Tensor, dU: Tensor) -> Tensor:
    """dA (T,B,G·m) -> dX (T,B,n); accumulates dU (G·m, n).

    forward was A = X Uᵀ, i.e. A_i = Σ_j U_ij x_j at every position; so
      ∂L/∂U = Σ_positions dA xᵀ  -> dU += dAᵀ X
      ∂L/∂x = Uᵀ dA              -> dX  = dA U   (the error of the layer below)
    """
    T, B, n = X.shape
    flat_dA = dA.reshape(T * B, dA.shape[2])
    dU.addmm_(flat_dA.t(), X.reshape(T * B, n))
    return torch.mm(flat_dA, U).view(T, B, n)
