"""`bptt train`: train a language model on a text corpus with the explicit-BPTT engine.

Continuous mode (default): B parallel streams over the corpus, the state carried from block to block,
BPTT(k1, k2) with k1 = --bptt-block (default --bptt) and k2 = --bptt + --bptt-block when a block is
given (rnnlm's -bptt/-bptt-block), else k2 = --bptt (PyTorch's word_language_model). Sentence mode
(--independent, rnnlm's -independent): the state is reset at every sentence; sentences are batched
with padding masked out of the loss and the gradient.

Gradients (with the AR/TAR penalties of --ar/--tar, if given) are averaged over the block's counted
tokens, clipped to --clip (global norm) and applied by --optimizer (Adam by default). After every
epoch the valid entropy drives Mikolov's schedule: once its relative improvement drops under
--min-improvement the rate is multiplied by --halving-factor every epoch, and training stops when it
drops under it again (or --schedule plateau). The best model on valid is kept in DIR
(model.safetensors, config.json, vocab.json); metrics.jsonl logs every epoch.

The model's options (--hidden, --cell, --layers, --activation, --output, --classes, --direct,
--direct-order, --tie, --init-range) are the fields of bptt.ModelConfig; the loop is
bptt.training.Trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from bptt import checks
from bptt.data import check_input_file
from bptt.files import remove_file, remove_files_and_dir
from bptt.engine.cells import CELLS
from bptt.model.config import ModelConfig
from bptt.prepared import load_prepared
from bptt.training.config import DEFAULT_LR, MIN_IMPROVEMENT, SCHEDULES, TrainConfig
from bptt.training import distributed
from bptt.training.divergence import TrainingDiverged
from bptt.training.run_dir import EPOCHS_DIR, ROLLBACK_DIR, RUN_FILES, STATE_DIR
from bptt.training.trainer import Trainer

EXAMPLES = """examples:
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m
  bptt train --train a.txt --valid b.txt --model m --hidden 300 --bptt 4 --bptt-block 10 --lr 5
  bptt train --train a.txt --valid b.txt --model m --independent --optimizer sgd --lr 5
  bptt prepare --train a.txt --valid b.txt --out data && bptt train --data data --model m   # memory-mapped corpora
  bptt train --resume m      # after a kill, Ctrl-C (exit 130) or SIGTERM (exit 143): same weights in the end
  # PTB in under a minute on 2 cores (test perplexity 148.6): class softmax, the last epoch at half the rate
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m --output class --classes 100 \\
             --hidden 150 --batch 160 --lr 0.0055 --epochs 3 --min-improvement 1.5
  # the best full-softmax model so far (test perplexity 120.9 after 10 epochs, 120.8 after 13): four at the full
  # rate, clipped (the 4th is rejected and the halving starts), then the annealing unclipped, with AR/TAR
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m --hidden 400 --batch 20 \\
             --weight-decay 0.1 --min-improvement 1.001 --halving-factor 0.3 --seed 1 --epochs 4
  bptt train --resume m --clip 0 --ar 2 --tar 2 --epochs 40
  bptt train --resume m --min-improvement 1.0 --epochs 13      # a few more epochs of the annealing

reliability: a kill at any instant leaves m/ and m/checkpoint/ loadable; Ctrl-C or SIGTERM saves the
state at the next step and exits; a step with a non-finite loss or gradient, or a gradient norm above
--max-grad-norm, is undone (back to the last checkpoint, learning rate halved; logged on stderr and in
metrics.jsonl as "event": "rollback"), and 5 rollbacks in a row stop the run with exit code 1.
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ModelConfig field with "cli" metadata (model/config.py)."""
    for f in dataclasses.fields(ModelConfig):
        meta = f.metadata
        if "cli" not in meta:
            continue
        kwargs = {"dest": f.name, "default": None, "help": meta["help"]}
        if meta.get("action"):
            kwargs["action"] = meta["action"]
        else:
            kwargs["type"] = meta.get("type", type(f.default))
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]()
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(meta["cli"], **kwargs)


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of the options given (the dataclass's defaults for the others); an option that the
    chosen cell does not take (--activation for a cell without a hidden activation) is refused."""
    given = {}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(args, f.name, None) if "cli" in f.metadata else None
        if value is None or (f.metadata.get("action") == "store_true" and value is False):
            continue
        convert = f.metadata.get("convert")
        given[f.name] = convert(value) if convert else value
    config = ModelConfig(**given)
    cell = CELLS.get(config.cell)
    for option, what in (("hidden_activation", "hidden activation to choose"), ("forget_bias", "forget gate")):
        if cell is not None and option in given and option not in getattr(cell, "options", ()):
            flag = next(f.metadata["cli"] for f in dataclasses.fields(ModelConfig) if f.name == option)
            raise ValueError(f"{flag}: the {config.cell} cell has no {what}")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", help="training text, one sentence per line (.txt or .gz)")
    parser.add_argument("--valid", help="validation text for the schedule and model selection")
    parser.add_argument("--data", metavar="DATA",
                        help="instead of --train and --valid: a directory written by bptt prepare (its vocabulary, "
                        "its corpora memory-mapped; the same model as from the texts)")
    parser.add_argument("--model", help="output directory")
    parser.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR exactly where it stopped")
    parser.add_argument("--unit", choices=("word", "char"), default=None,
                        help="tokens: words or characters (default word; with --data: as prepared)")
    parser.add_argument("--min-count", type=int, default=None, help="rarer words map to <unk> (default 1)")
    parser.add_argument("--max-vocab", type=int, default=None, help="keep at most N entries (incl. <eos>, <unk>)")
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=32, help="parallel streams B (default 32)")
    parser.add_argument("--bptt", type=int, default=35, help="BPTT steps (default 35)")
    parser.add_argument("--bptt-block", type=int, default=None, help="update every K1 steps, rnnlm style")
    parser.add_argument("--truncation", type=int, default=None, metavar="K",
                        help="send every error back through at most K recurrent connections (0: no BPTT at all)")
    parser.add_argument("--independent", action="store_true", help="reset the state at every sentence")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"at most N epochs (default {TrainConfig.epochs}; with --resume: a new limit)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: adam 0.002, sgd 5, "
                        "adagrad 0.1, rmsprop 0.001)")
    parser.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="adam",
                        help="update rule (default adam; sgd is rnnlm's and PyTorch's classic)")
    parser.add_argument("--clip", type=float, default=None, metavar="X",
                        help=f"gradient-norm clipping, 0 = off (default {TrainConfig.clip}); with --resume: a new "
                             "threshold from here on (e.g. --clip 0 once the rate is being halved)")
    parser.add_argument("--max-grad-norm", type=float, default=1e3, metavar="X",
                        help="a step whose gradient norm (per-token mean, before clipping) exceeds X, or "
                        "whose loss or gradients are not finite, is undone: back to the last checkpoint, "
                        "rate halved; 0 = no norm bound (default 1000)")
    parser.add_argument("--l2", type=float, default=0.0, help="L2 weight decay on weight matrices")
    parser.add_argument("--keep-epochs", action="store_true", default=None,
                        help="also keep every accepted epoch's weights as a model in DIR/epochs/epoch-N, for "
                        "bptt average (checkpoint averaging) or to evaluate any epoch; with --resume: from the "
                        "next epoch on")
    parser.add_argument("--weight-decay", type=float, default=0.0, metavar="LAMBDA",
                        help="decoupled weight decay on weight matrices (AdamW with adam): w *= 1 - lr*LAMBDA "
                        "every step; unlike --l2 it is not divided by Adam's sqrt(v), so rare words' rows "
                        "shrink no faster than frequent ones (default 0)")
    parser.add_argument("--ar", type=float, default=None, metavar="ALPHA",
                        help="activation regularization (AWD-LSTM's AR): adds ALPHA * mean(s^2) over the hidden "
                        "states to the objective's gradient (default 0; with --resume: a new value from here on)")
    parser.add_argument("--tar", type=float, default=None, metavar="BETA",
                        help="temporal activation regularization (TAR): adds BETA * mean((s^t - s^(t-1))^2) "
                        "within each block (default 0; with --resume: a new value from here on)")
    parser.add_argument("--min-improvement", type=float, default=None,
                        help="Mikolov's schedule: halve the rate when the ratio old/new valid entropy falls under "
                        f"this, a ratio >= 1 (default {MIN_IMPROVEMENT['mikolov']}: 0.3 %%); the plateau schedule: an "
                        f"epoch improving by less counts as flat (default {MIN_IMPROVEMENT['plateau']}: any improvement, "
                        "as PyTorch's word_language_model); with --resume: a new threshold, and a run the schedule had "
                        "stopped goes on (1.0: until valid gets worse)")
    parser.add_argument("--halving-factor", type=float, default=0.5, metavar="F",
                        help="Mikolov's schedule: once it anneals, multiply the rate by F every epoch (default "
                        "0.5, rnnlm's halving; on PTB 0.3-0.4 end as well in fewer epochs and 0.7 overfits: "
                        "docs/results.md)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="mikolov",
                        help="mikolov: halve every epoch once valid stalls, stop when it stalls again; "
                        "plateau: multiply by --lr-decay after --patience stalled epochs, stop after --max-decays; "
                        "step: Zaremba et al.'s, multiply by --halving-factor after every epoch from --decay-start on")
    parser.add_argument("--decay-start", type=int, default=4, metavar="N",
                        help="step schedule: the rate is multiplied by --halving-factor after epoch N and every epoch "
                        "after it (default 4, Zaremba's small model)")
    parser.add_argument("--lr-decay", type=float, default=0.25, help="plateau schedule factor (default 0.25)")
    parser.add_argument("--patience", type=int, default=0, help="plateau schedule patience in epochs (default 0)")
    parser.add_argument("--max-decays", type=int, default=3, help="plateau schedule: early stop after N decays")
    parser.add_argument("--seed", type=int, default=0, help="seed: a CPU run is reproducible bit for bit")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sparse-updates", choices=("auto", "on", "off"), default="auto",
                        help="update the rows of the embedding and of a factorized output layer (class, hsm, nce, "
                        "sampled) that a step used, not the whole matrices. sgd and adagrad without decay: the "
                        "dense result; adam and rmsprop: lazy (an unused row's moments wait, like "
                        "torch.optim.SparseAdam), weight decay only on used rows. auto (default): on where exact, "
                        "and for any rule from a 100k-word vocabulary on")
    parser.add_argument("--graph", action="store_true",
                        help="replay each block's whole training step (forward, backward, clipping, update) as one "
                        "CUDA graph: one launch instead of hundreds (--device cuda; continuous streams without "
                        "--bptt-block, --output softmax; dropout's masks drawn before each replay); on the CPU the same static "
                        "step runs eagerly")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="save the training state every N steps (it is always saved at each epoch's end; "
                        "default 0: only there); with --resume: a new value from here on (else the run's own)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N steps in all (resumable with --resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--backend", choices=distributed.BACKENDS, default=None,
                        help="under torchrun (data-parallel training, N processes one model): the process group's "
                        "backend (default gloo on the CPU, nccl with --device cuda); with one process, naming it "
                        "starts a group of one whose collectives run (e.g. NCCL on a single GPU)")
    parser.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT, metavar="S",
                        help="under torchrun: seconds a rank waits for the others inside a step before the run "
                        f"stops with an error (default {distributed.DEFAULT_TIMEOUT:g})")
    parser.add_argument("--average-every", type=int, default=None, metavar="K",
                        help="under torchrun, for slow links: model averaging instead of the gradient all-reduce — "
                        "each rank steps on its own share alone and the ranks' weights and optimizer buffers are "
                        "averaged every K steps (and before validation and checkpoints); default 0: the gradients "
                        "all-reduced every step. With --resume: a new value from here on")
    parser.add_argument("--force", action="store_true", help="train into a --model DIR that holds a model or training state: its model, vocabulary, metrics and state are deleted first")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a new run's options (validated). With --data, the vocabulary's options are
    refused: they are DATA's (set by bptt prepare)."""
    data = getattr(args, "data", None)
    if data is not None:
        given = [f"--{name.replace('_', '-')}" for name in ("unit", "min_count", "max_vocab")
                 if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]}: with --data the vocabulary is the one bptt prepare made ({data}/meta.json)")
    return TrainConfig(
        train=args.train, valid=args.valid, model=args.model, model_config=model_config_from_args(args),
        unit=args.unit or "word", min_count=1 if args.min_count is None else args.min_count, max_vocab=args.max_vocab,
        data=data, batch=args.batch, bptt=args.bptt,
        bptt_block=args.bptt_block, truncation=args.truncation, independent=args.independent,
        epochs=TrainConfig.epochs if args.epochs is None else args.epochs, lr=args.lr, optimizer=args.optimizer,
        clip=TrainConfig.clip if args.clip is None else args.clip, ar=args.ar or 0.0, tar=args.tar or 0.0,
        l2=args.l2, weight_decay=args.weight_decay, keep_epochs=bool(args.keep_epochs),
        checkpoint_every=args.checkpoint_every or 0,
        max_grad_norm=args.max_grad_norm,
        min_improvement=args.min_improvement,  # None: the schedule's own default
        halving_factor=args.halving_factor, schedule=args.schedule, decay_start=args.decay_start, lr_decay=args.lr_decay,
        patience=args.patience, max_decays=args.max_decays, seed=args.seed, device=args.device, graph=args.graph,
        sparse_updates=args.sparse_updates, average_every=args.average_every or 0,
        progress=not args.quiet,
    ).validate()


# what `bptt train --model DIR` leaves in DIR: a DIR holding any of RUN_MARKERS holds a model, a state or
# kept epochs (which a new run would mix with its own)
RUN_MARKERS = ("model.safetensors", "config.json", STATE_DIR, EPOCHS_DIR)


def check_train_directory(args: argparse.Namespace) -> None:
    """Refuse `bptt train --model DIR` over an earlier run's DIR unless --force (which deletes that run,
    after the cheap checks of the new one: its input files exist, its options are valid)."""
    if getattr(args, "resume", None) or not getattr(args, "model", None):
        return
    directory = Path(args.model)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--model {directory}: exists and is not a directory")
    found = [name for name in RUN_MARKERS if (directory / name).exists()]
    if not found:
        return
    if not getattr(args, "force", False):
        raise ValueError(
            f"--model {directory}: already holds a model or training state ({found[0]}); continue it with "
            f"`bptt train --resume {directory}`, choose a new directory, or add --force to overwrite it"
        )
    _check_corpus_options(args)
    if args.data is not None:
        load_prepared(args.data, verify=False)
    else:
        for option in ("train", "valid"):
            check_input_file(getattr(args, option))
    config_from_args(args)
    for name in RUN_FILES:
        remove_file(directory / name)
    remove_files_and_dir(directory / STATE_DIR / ROLLBACK_DIR)  # a stopped run's rollback target
    remove_files_and_dir(directory / STATE_DIR)
    epochs = directory / EPOCHS_DIR  # DIR/epochs/epoch-N of train --keep-epochs: each a model directory
    if epochs.is_dir():
        for sub in sorted(epochs.iterdir()):
            if sub.name.startswith("epoch-"):
                remove_files_and_dir(sub)
        remove_files_and_dir(epochs)


def _check_corpus_options(args: argparse.Namespace) -> None:
    """--train and --valid, or --data: one line for a missing one or for both kinds given."""
    if getattr(args, "data", None) is not None:
        both = [f"--{name}" for name in ("train", "valid") if getattr(args, name)]
        if both:
            raise ValueError(f"--data: give either --data DATA or --train and --valid, not {both[0]} too")
        return
    missing = [f"--{name}" for name in ("train", "valid", "model") if not getattr(args, name)]
    if missing:
        raise ValueError(f"bptt train needs {', '.join(missing)} (or --data DATA, or --resume DIR)")




def run(args: argparse.Namespace) -> int:
    """Under torchrun every rank runs this; rank 0 alone checks (and with --force clears) DIR and prints
    the outcome, the others wait for it when the trainer starts the process group (training/distributed.py)."""
    rank, world, _, _ = distributed.environment()
    if rank == 0:
        check_train_directory(args)
    if args.checkpoint_every is not None:
        checks.non_negative_int("--checkpoint-every", args.checkpoint_every)
    if args.max_steps is not None:
        checks.non_negative_int("--max-steps", args.max_steps)
    try:
        code = _train(args)
    except distributed.RankLost as e:  # a rank died or hung: torchrun's agent stops the others
        directory = args.resume or args.model
        print(f"error: rank {rank} of {world}: another process of this run stopped or does not answer ({e}); "
              f"the last checkpoint in {directory}/{STATE_DIR} stands: continue with bptt train --resume {directory} "
              "(under torchrun, any number of processes)", file=sys.stderr)
        return 1
    if distributed.shutdown() or world > 1:  # a torchrun worker: ends here, without the teardown that sometimes aborted it
        distributed.exit_worker(code)
    return code


# what --resume DIR takes besides DIR: the options that change a run from where it stands (Trainer.ADJUSTABLE,
# --epochs, --min-improvement), and those of this process (a stop, the output, torchrun's group)
RESUME_OPTIONS = {"resume", "epochs", "min_improvement", "max_steps", "quiet", "backend", "dist_timeout",
                  *Trainer.ADJUSTABLE}


def _refuse_fixed_options(args: argparse.Namespace) -> None:
    """With --resume, an option the run keeps as it was started (the model, the data, the optimizer, ...)
    is refused in one line instead of being silently ignored."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    for action in parser._actions:
        name = action.dest
        if name in RESUME_OPTIONS or name == "help" or not hasattr(args, name):
            continue
        if getattr(args, name) != action.default:
            option = max(action.option_strings, key=len)
            if name == "force":
                raise ValueError("--force: not with --resume (it deletes a run to start a new one)")
            raise ValueError(f"{option}: a resumed run keeps the value it was started with; with --resume only "
                             + ", ".join(sorted(f"--{o.replace('_', '-')}" for o in RESUME_OPTIONS - {"resume"}))
                             + " can be given")


def _train(args: argparse.Namespace) -> int:
    dist_options = {"backend": args.backend, "dist_timeout": args.dist_timeout}
    if args.resume:
        _refuse_fixed_options(args)
        trainer = Trainer.resume(args.resume, progress=not args.quiet, **dist_options)
        changes = {name: getattr(args, name) for name in Trainer.ADJUSTABLE if getattr(args, name) is not None}
        if changes:
            trainer.adjust(**changes)
        if args.epochs is not None or args.min_improvement is not None:
            trainer.extend(args.epochs, args.min_improvement)
    else:
        _check_corpus_options(args)
        if not args.model:
            raise ValueError("bptt train needs --model (or --resume DIR)")
        config = config_from_args(args)
        trainer = Trainer(config, **dist_options)
        if trainer.dist.is_main:
            trainer.run_dir.start_metrics()
    main = trainer.dist.is_main
    try:
        result = trainer.run(args.max_steps)
    except TrainingDiverged as e:
        if main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: nothing saved since the last checkpoint
        print(f"interrupted at once; the last checkpoint in {trainer.run_dir.state_dir} stands: "
              f"bptt train --resume {trainer.out}", file=sys.stderr)
        return 130
    if result.interrupted is not None:
        if main:
            print(f"interrupted: training state saved in {trainer.run_dir.state_dir}; "
                  f"continue with bptt train --resume {trainer.out}", file=sys.stderr)
        return 128 + int(result.interrupted)
    if not main:
        return 0
    best = result.best_valid
    status = "finished" if result.finished else f"stopped at step {trainer.global_step} (--resume {trainer.out})"
    where = (f"model in {trainer.out}" if trainer.history else
             "no model yet: the first epoch has not ended (the training state is in the checkpoint)")
    print(
        f"{status}: best valid perplexity {best.perplexity:.2f} ({best.entropy_bits:.4f} bits/token), "
        f"{result.seconds:.1f} s; {where}"
    )
    return 0
