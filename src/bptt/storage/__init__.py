"""Files that hold tensors: checkpoints (safetensors + JSON, atomic, never pickle) and saved models."""
