"""A trained model on disk: DIR/model.safetensors (weights), DIR/config.json, DIR/vocab.json.

No pickle anywhere: tensors go through safetensors, everything else through JSON. Loading is
defensive, because a model directory is input like any other: every problem found is a one-line
CheckpointError (or CorpusError for the vocabulary) naming the file, raised before anything big is
allocated.

config.json carries "format_version" and "vocab_sha256", the sha256 of vocab.json when the model was
saved, checked on load so that a model never runs with a vocabulary it was not trained with. Formats:
    2  (written now) "model" is a ModelConfig (model/config.py): cell, layers, sizes, output layer ...
    1  "model" holds ElmanLM's arguments; + format_version, vocab_sha256
    0  the layout before format_version existed (no format_version, no vocab_sha256)
Formats 0 and 1 load as a one-layer Elman ModelConfig (ModelConfig.from_legacy), with the same
parameter names and the same numbers (tests/test_fixtures.py). A pickle file in the directory
(model.pt, *.pkl, a *.bin with a pickle or torch.save header, ...) makes load_model refuse the
directory: bptt never unpickles anything, and a file that looks like a model in a format that runs
code when loaded is refused loudly rather than ignored silently.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from bptt import checks
from bptt.data import UNITS, Vocab
from bptt.model import LanguageModel, ModelConfig, build_model
from bptt.model.language_model import build_network
from bptt.storage.checkpoint import CONFIG_NAME, CheckpointError, load_checkpoint, save_checkpoint

VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # 0: no "format_version" key; 1: + format_version, vocab_sha256; 2: "model" is a ModelConfig
FORMAT_KEY = "format_version"
VOCAB_SHA_KEY = "vocab_sha256"
_RESERVED = ("model", "vocab_file", FORMAT_KEY, VOCAB_SHA_KEY)

# files refused by name, whatever they hold; any other file is refused by content (see pickle_reason)
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib"})
_ZIP_MAGIC = b"PK\x03\x04"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_model(directory: str | Path, model: LanguageModel, extra: dict | None = None, vocab: Vocab | None = None) -> None:
    """Write the weights and config.json (with `extra`, e.g. training state and metrics) atomically.

    With `vocab`, DIR/vocab.json is written first; either way the sha256 of DIR/vocab.json (when it
    exists) goes into config.json, and load_model refuses a vocabulary that does not match it.
    """
    directory = Path(directory)
    extra = dict(extra or {})
    clash = [key for key in _RESERVED if key in extra]
    if clash:
        raise ValueError(f"extra must not contain the reserved keys {clash}")
    if vocab is not None:
        if len(vocab) != model.vocab_size:
            raise ValueError(f"the vocabulary has {len(vocab)} words, the model {model.vocab_size}")
        directory.mkdir(parents=True, exist_ok=True)
        vocab.save(directory / VOCAB_FILE)
    config = {"model": model.config.to_json(), "vocab_file": VOCAB_FILE, FORMAT_KEY: FORMAT_VERSION, **extra}
    if (directory / VOCAB_FILE).is_file():
        config[VOCAB_SHA_KEY] = file_sha256(directory / VOCAB_FILE)
    save_checkpoint(directory, dict(model.params), config)


# -- loading -------------------------------------------------------------------------------------------


def pickle_reason(path: Path) -> str | None:
    """Why `path` is (or may be) a pickle file, or None. Reads at most a zip's table of contents."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"a {path.suffix} file (the pickle / torch.save format)"
    try:
        with path.open("rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and not _safetensors_head(head, size):
        return f"a pickle file (protocol {head[1]} header)"
    if head[:4] == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as z:
                if any(name.endswith(".pkl") for name in z.namelist()):
                    return "a torch.save archive (it holds a .pkl)"
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError):
            return None
    return None


def _safetensors_head(head: bytes, size: int) -> bool:
    """The first 9 bytes of a file of `size` bytes begin a safetensors file: a little-endian header length
    that fits the file, then the header's '{'. Its length can begin with a pickle's 0x80 0x02..0x05 (a header
    of 640, 896, 1152 or 1408 bytes, mod 65536). (The pickle check only names such files for a clear error:
    nothing is ever unpickled, whatever a file holds.)"""
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def refuse_pickle_files(directory: str | Path) -> None:
    """CheckpointError naming the first file of `directory` (not its subdirectories) that is a pickle."""
    directory = Path(directory)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return  # load_checkpoint reports the directory itself
    for entry in entries:
        try:
            if not entry.is_file():
                continue
        except OSError:
            continue
        reason = pickle_reason(Path(entry.path))
        if reason:
            raise CheckpointError(
                f"{entry.path}: {reason}; bptt never loads pickle files (a model is model.safetensors + JSON), "
                f"so it refuses this directory: remove or move that file"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model_config(section: Any, version: int, where: Path) -> ModelConfig:
    """The "model" section of a config.json of the given format -> a checked ModelConfig."""
    try:
        config = ModelConfig.from_json(section) if version >= 2 else ModelConfig.from_legacy(section)
        config.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: bad model section: {' '.join(str(e).split())}") from None
    if config.vocab_size == 0:
        raise CheckpointError(f"{where}: bad model section: 'vocab_size' must be an integer >= 2, got 0")
    return config


def _format_version(config: dict, where: Path) -> int:
    version = config.get(FORMAT_KEY, 0)
    if not _is_int(version) or version < 0:
        raise CheckpointError(f"{where}: {FORMAT_KEY!r} must be a non-negative integer, got {version!r:.60}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: made by a newer bptt (format {version}, this bptt reads <= {FORMAT_VERSION}); upgrade bptt"
        )
    return version


def _vocab_path(directory: Path, config: dict, where: Path) -> Path:
    name = config.get("vocab_file", VOCAB_FILE)
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(f"{where}: 'vocab_file' must be a file name inside the model directory, got {name!r:.60}")
    return directory / name


def _check_unit(config: dict, vocab: Vocab, where: Path) -> None:
    training = config.get("training", {})
    if not isinstance(training, dict):
        raise CheckpointError(f"{where}: 'training' must be a JSON object, got {type(training).__name__}")
    unit = training.get("unit", vocab.unit)
    if unit not in UNITS:
        raise CheckpointError(f"{where}: training 'unit' must be one of {', '.join(UNITS)}, got {unit!r:.60}")


def saved_unit(config: dict, vocab: Vocab) -> str:
    """The token unit ("word" or "char") a loaded model was trained with."""
    training = config.get("training", {})
    return training.get("unit", vocab.unit) if isinstance(training, dict) else vocab.unit


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in t.shape) + ")"


def load_model(directory: str | Path, device: str = "cpu") -> tuple[LanguageModel, Vocab, dict]:
    """-> (model with the saved weights, its vocabulary, the whole config).

    The model is an ElmanLM for a one-layer Elman model (every model of formats 0 and 1), else a
    LanguageModel (bptt.model.build_model). CheckpointError (or CorpusError for vocab.json), one line
    naming the file, if the directory is unusable: missing or malformed files, torn or mixed weights,
    a newer format, a vocabulary whose sha256 differs from the one recorded at save time, tensors whose
    names, shapes or dtypes do not match config.json, non-finite weights, or a pickle file in the
    directory. Every tensor's name and shape is checked against the configuration before the model
    (and anything of its size) is allocated.
    """
    directory = Path(directory)
    device = checks.device(device)  # a clear error before any tensor is moved
    where = directory / CONFIG_NAME
    weights = directory / WEIGHTS_FILE
    refuse_pickle_files(directory)
    try:
        tensors, config = load_checkpoint(directory, device="cpu")
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{where}: malformed JSON: nested too deeply") from None
    except ValueError as e:  # e.g. json's limit on the digits of an integer
        raise CheckpointError(f"{where}: malformed JSON: {' '.join(str(e).split())}") from None
    version = _format_version(config, where)
    model_config = _model_config(config.get("model"), version, where)
    vocab_path = _vocab_path(directory, config, where)
    vocab = Vocab.load(vocab_path)
    expected = config.get(VOCAB_SHA_KEY)
    if expected is not None:
        if not isinstance(expected, str):
            raise CheckpointError(f"{where}: {VOCAB_SHA_KEY!r} must be a string")
        actual = file_sha256(vocab_path)
        if actual != expected:
            raise CheckpointError(
                f"{vocab_path}: sha256 {actual[:12]}… does not match {VOCAB_SHA_KEY} {expected[:12]}… in {where}: "
                f"not the vocabulary this model was trained with"
            )
    _check_unit(config, vocab, where)
    V = model_config.vocab_size
    if len(vocab) != V:
        raise CheckpointError(f"{vocab_path}: {len(vocab)} words, the model in {where} has vocab_size {V}")
    if model_config.layers > len(tensors):  # every layer has weights: before a network of that depth is built
        raise CheckpointError(f"{where}: bad model section: {model_config.layers} layers, but {weights} holds "
                              f"{len(tensors)} tensors")
    try:  # the parameters' names and shapes, computed without allocating them
        shapes = build_network(model_config, word_counts=vocab.counts).param_shapes()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"{where}: bad model section: {' '.join(str(e).split())}") from None
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected tensor {unexpected[0]!r} for the model in {where}")
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{weights}: no tensor {name!r}, which the model in {where} needs")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{weights}: tensor {name!r} has shape {_shape(t)}, {where} says ({', '.join(str(n) for n in shape)})"
            )
    dtype = model_config.torch_dtype
    for name, t in tensors.items():
        if t.dtype != dtype:
            raise CheckpointError(
                f"{weights}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, "
                f"{where} says {model_config.dtype}"
            )
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: tensor {name!r} holds non-finite values (NaN or infinity)")
    try:
        model = build_model(model_config, device=device, word_counts=vocab.counts)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"{where}: bad model section: {' '.join(str(e).split())}") from None
    model.flat.copy_(tensors)
    return model, vocab, config


def copy_params(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
    for name, p in dst.items():
        p.copy_(src[name])
