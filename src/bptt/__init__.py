"""bptt: recurrent neural network language models trained with explicit back-propagation through time."""

from bptt.engine import CELLS, OUTPUT_LAYERS, Stream, TruncatedBPTT, register_cell
from bptt.model import RNNLM, ElmanLM, LanguageModel, ModelConfig, build_model

__all__ = ["CELLS", "OUTPUT_LAYERS", "RNNLM", "ElmanLM", "LanguageModel", "ModelConfig", "Stream", "TruncatedBPTT",
           "build_model", "register_cell"]
__version__ = "0.1.0"
