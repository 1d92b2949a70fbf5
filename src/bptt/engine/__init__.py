"""The engine: every equation of the model and its gradient, written out — no autograd.

    activations.py   F and f, forward/backward pairs
    losses.py        the quadratic loss and the fused softmax cross-entropy, forward/backward pairs
    cells/           recurrent cells behind one interface, and the registry CELLS ("elman": the seed's)
    inputs.py        the input term A = U x^t of a layer: a gather (words) or a product (the layer below)
    outputs/         output layers behind one interface, and the registry OUTPUT_LAYERS
    network.py       input term -> cells -> output layer; the explicit State; caches over windows
    sweep.py         one forward and one backward sweep over a block: loss and gradients
    tbptt.py         BPTT(k1, k2) on a stream (Williams & Peng; rnnlm's bptt/bptt-block)
    stream.py        a model run over a stream: the carried state, log-probabilities, −Σ ln P
    regularizers.py  AR and TAR on the hidden states, forward/backward pair
    rtrl.py          RTRL, the paper's forward recursion (corrected), for checking
    flat.py          parameters and gradients as views into one flat buffer

The engine imports nothing from the rest of bptt but bptt.checks (tests/test_architecture.py).
"""

from bptt.engine.cells import CELLS, Cell, CellCache, register_cell
from bptt.engine.flat import Flat
from bptt.engine.network import NetCache, Network, State
from bptt.engine.outputs import OUTPUT_LAYERS, OutputLayer, make_output
from bptt.engine.stream import Stream, token_blocks
from bptt.engine.sweep import loss_and_grads, output_errors, sequence_loss, zeros_like_params
from bptt.engine.tbptt import TruncatedBPTT

__all__ = [
    "CELLS", "OUTPUT_LAYERS", "Cell", "CellCache", "Flat", "NetCache", "Network", "OutputLayer", "State", "Stream",
    "TruncatedBPTT", "loss_and_grads", "make_output", "output_errors", "register_cell", "sequence_loss",
    "token_blocks", "zeros_like_params",
]
