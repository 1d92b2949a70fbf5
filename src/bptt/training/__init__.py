"""Training: the configuration, the loop, one step, the update rules and schedules, the run directory,
divergence handling, the memory guard and the CUDA-graph replay of a step.

    config.py      TrainConfig (with the model's ModelConfig nested)
    trainer.py     Trainer: epochs, validation, schedule, checkpoints, signals; train()
    step.py        TrainStep: gradients -> reduction -> mean -> clipping -> update, one block
    optim.py       update rules over the flat parameter buffer, gradient-norm clipping
    schedules.py   Mikolov's schedule and the plateau schedule
    run_dir.py     the run directory's files: best model, checkpoint, metrics, kept epochs
    divergence.py  when a step is undone, when a run has diverged
    resources.py   the memory estimate of a run, refused before allocating if it does not fit
    cuda_graph.py  a step captured once as a CUDA graph and replayed
"""

from bptt.training.config import TrainConfig
from bptt.training.trainer import TrainResult, Trainer, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]
