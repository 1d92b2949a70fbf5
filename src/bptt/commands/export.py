"""`bptt export`: a model directory as a PyTorch state dict (safetensors) in the layout of PyTorch's
examples/word_language_model RNNModel (encoder.weight, rnn.weight_ih_l0, ..., decoder.weight, decoder.bias).

The file's safetensors metadata holds "format": "pt" and "bptt.torch_metadata", the JSON of what
rebuilds the PyTorch model (rnn_type LSTM/GRU/RNN_TANH/RNN_RELU, ntoken, ninp, nhid, nlayers, dropout,
tie_weights, bias, nonlinearity, dtype, frozen); --json also writes it as a JSON file, with the
vocabulary (id -> word). Both files are written atomically, after every check: a model that PyTorch's
RNNModel cannot express (class or hsm output, direct connections, an Elman cell other than tanh or
relu) is refused and nothing is written. The mapping (bias_hh = 0, the identity weight_ih_l0 of a
model without an embedding, tying) is described in bptt/model/export.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

from bptt.files import atomic_write_all, temp_name_fits
from bptt.storage.saved_model import PICKLE_SUFFIXES, WEIGHTS_FILE, load_model
from bptt.training.run_dir import EPOCHS_DIR, RUN_FILES, STATE_DIR

METADATA_KEY = "bptt.torch_metadata"  # safetensors header metadata: the JSON of model.torch_metadata()

EXAMPLES = """examples:
  bptt train --train ptb.train.txt --valid ptb.valid.txt --model m --cell lstm --layers 2 --tie
  bptt export --model m --out m-torch.safetensors --json m-torch.json

  # in Python, with PyTorch's examples/word_language_model (model.py):
  #   meta = json.load(open("m-torch.json"))
  #   net = RNNModel(meta["rnn_type"], meta["ntoken"], meta["ninp"], meta["nhid"], meta["nlayers"],
  #                  tie_weights=meta["tie_weights"])
  #   net.load_state_dict(safetensors.torch.load_file("m-torch.safetensors"))
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by bptt train")
    parser.add_argument("--out", required=True, metavar="F", help="the state dict to write (safetensors)")
    parser.add_argument("--json", metavar="META", help="also write the metadata and the vocabulary as JSON")


def _check_destination(option: str, path: Path, model_dir: Path) -> None:
    """A one-line ValueError naming the option unless `path` can be written without harm."""
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{option} {path}: a {path.suffix} name says pickle (torch.save); this file is safetensors: "
                         f"name it .safetensors")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: directory {parent} is not writable")
    if not temp_name_fits(path):
        raise ValueError(f"{option} {path}: the name is too long to be written atomically here")
    inside = model_dir.resolve() in path.resolve().parents
    relative = path.resolve().relative_to(model_dir.resolve()) if inside else None
    if relative is not None and (len(relative.parts) > 1 or path.name in RUN_FILES):
        raise ValueError(f"{option} {path}: a file of the model directory {model_dir} itself (its model, "
                         "training state or kept epochs); choose another path")
    run = _run_holding(path)
    if run is not None:
        raise ValueError(f"{option} {path}: a file of the run or model in {run} (its model, training state or kept "
                         "epochs); choose another path")


def _holds_a_model(directory: Path) -> bool:
    return any((directory / name).exists() for name in (WEIGHTS_FILE, "config.json", STATE_DIR))


def _run_holding(path: Path) -> Path | None:
    """The model or run directory whose own file `path` would be: one of RUN_FILES beside a model, or anything
    in a run's checkpoint/ or epochs/ (e.g. --model RUN/epochs/epoch-1 --out RUN/model.safetensors)."""
    resolved = path.resolve()
    if resolved.name in RUN_FILES and _holds_a_model(resolved.parent):
        return resolved.parent
    for ancestor in resolved.parents:
        if ancestor.name in (STATE_DIR, EPOCHS_DIR) and _holds_a_model(ancestor.parent):
            return ancestor.parent
    return None


def run(args) -> int:
    model_dir, out = Path(args.model), Path(args.out)
    meta_path = Path(args.json) if args.json else None
    _check_destination("--out", out, model_dir)
    if meta_path is not None:
        _check_destination("--json", meta_path, model_dir)
        if meta_path.resolve() == out.resolve():
            raise ValueError(f"--json {meta_path}: the same file as --out")
    model, vocab, _ = load_model(model_dir)
    try:
        metadata = model.torch_metadata()
        state = model.export_torch()
    except ValueError as e:
        raise ValueError(f"{model_dir}: {e}") from None
    data = safetensors_bytes(state, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    sidecar = None
    if meta_path is not None:  # serialised before anything is written
        sidecar = (json.dumps({**metadata, "vocab": vocab.words}, indent=2, sort_keys=True) + "\n").encode("utf-8")
    atomic_write_all([(out, data)] + ([(meta_path, sidecar)] if sidecar is not None else []))  # both or neither
    layers = f"{metadata['nlayers']} layer{'s' if metadata['nlayers'] > 1 else ''}"
    print(f"wrote {out}: {metadata['rnn_type']}, {layers}, ntoken {metadata['ntoken']}, ninp {metadata['ninp']}, "
          f"nhid {metadata['nhid']}, tie_weights {metadata['tie_weights']}, {len(state)} tensors"
          + (f"; {meta_path}" if meta_path is not None else ""))
    return 0
