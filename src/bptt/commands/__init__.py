"""The commands of `bptt`, one module each, with `add_arguments(parser)`, `run(args) -> int`, a module
docstring (the command's --help description) and EXAMPLES (its --help epilog).

COMMANDS maps a command's name to (its module, a one-line help). cli.py imports a command's module only
when that command runs, so `bptt eval` never imports the benchmark or the plotting code.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("bptt.commands.prepare", "encode texts once into memory-mapped token files for train --data, eval --data"),
    "train": ("bptt.commands.train", "train a language model on a text corpus"),
    "eval": ("bptt.commands.eval", "perplexity, entropy (bits/token), tokens and OOV rate of a text under a model"),
    "gradcheck": ("bptt.commands.gradcheck", "check the explicit gradients against finite differences, autograd and RTRL"),
    "bench": ("bptt.commands.bench", "training tokens/s of bptt next to torch.nn.RNN + autograd, same shapes, same run"),
    "demo": ("bptt.commands.demo", "learn a grammar with a known entropy rate; full BPTT vs truncation 0 on its long-range part"),
    "score": ("bptt.commands.score", "log10 probability of every sentence of a text (rnnlm -nbest style)"),
    "rescore": ("bptt.commands.rescore", "rescore n-best lists (rnnlm, Kaldi, SRILM format 3), optionally interpolated"),
    "diagnose": ("bptt.commands.diagnose", "gradient flow through time: error norms against the lag, Jacobian products, truncation"),
    "generate": ("bptt.commands.generate", "sample text from a model: temperature, top-k, prompt"),
    "plot": ("bptt.commands.plot", "learning curves (perplexity, learning rate per epoch) of a training run as PNG"),
    "average": ("bptt.commands.average", "average the weights of epochs kept by train --keep-epochs into a new model"),
    "export": ("bptt.commands.export", "a model as a PyTorch state dict (word_language_model's RNNModel), safetensors"),
}
