"""Output layers: map hidden states s^t to a loss against the next word, and back to ∂L/∂s^t.

An output layer is a class with
    param_shapes(vocab_size, hidden_size, bias) -> {name: shape}
    forward(params, S (N,m), targets (N,), weights (N,)|None) -> (loss 0-d, cache)
    backward(params, S (N,m), cache, targets, weights, grads) -> dS (N,m), accumulating into grads
    log_probs(params, S (N,m)) -> (N,V) natural-log probabilities, for evaluation and scoring
"""

from bptt.outputs.full import FullOutput

__all__ = ["FullOutput"]
