"""bptt: recurrent neural network language models trained with explicit back-propagation through time."""

from bptt.model import ElmanLM
from bptt.tbptt import TruncatedBPTT

__all__ = ["ElmanLM", "TruncatedBPTT"]
__version__ = "0.1.0"
