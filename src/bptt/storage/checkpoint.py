"""Checkpoints as safetensors + JSON: nothing is ever pickled or unpickled.

A checkpoint directory holds `{prefix}.safetensors` (every tensor: parameters, optimizer buffers,
the RNG state) and `config.json` (everything else, JSON-able). Both files are written atomically
(temp file, fsync, rename), the weights first, then the JSON, which records the sha256 of the
weights file ("weights_sha256").

The weights file is self-contained: its safetensors header metadata carries the same config
(key "bptt.config", the JSON text). So a process killed at any instant leaves a loadable directory
(once a first save has completed its weights rename): a config.json whose sha256 matches is used as
it is; a config.json that is missing or belongs to other weights (a kill between the two renames, a
torn pair) is ignored and the config embedded in the weights is used instead. Loading never writes;
the next save rewrites both files. Weights without an embedded config (files of older versions)
still need a matching config.json: a mixed pair is refused.

No checkpoint ever holds a non-finite value: save_checkpoint refuses NaN and Inf.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

from bptt.files import atomic_write_bytes, atomic_write_file, file_sha256

Tensor = torch.Tensor

CONFIG_NAME = "config.json"
SHA_KEY = "weights_sha256"
EMBEDDED_KEY = "bptt.config"  # safetensors header metadata: the config as JSON text
# the name suffix of a tensor written as its transpose (save_checkpoint's transposed=True), which
# load_checkpoint transposes back (a name, not a header entry: safetensors writes header entries in no fixed
# order, and a checkpoint's bytes must not change when nothing has)
TRANSPOSED_SUFFIX = "@T"
# the name suffix of a matrix written with its rows' padding (engine/flat.py pads a matrix's row stride):
# NAME@W<width> holds the (rows, stride) storage, of which load_checkpoint keeps the first <width> columns
WIDTH_SUFFIX = re.compile(r"@W([0-9]+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the one-line message names the file."""


# -- save / load ---------------------------------------------------------------------------------------


def as_stored(name: str, t: Tensor) -> tuple[str, Tensor]:
    """A matrix as its memory holds it, without a copy: (name, t) when contiguous; (name@T, tᵀ) when tᵀ is;
    (name[@T]@W<width>, the (rows, stride) storage) when its rows (or tᵀ's) are padded. Anything else as
    it is (save_checkpoint then copies it)."""
    if t.dim() != 2 or t.is_contiguous():
        return name, t
    flip = t.t().is_contiguous() or (t.stride(0) == 1 and t.stride(1) > t.shape[0])
    rows = t.t() if flip else t
    stored = name + TRANSPOSED_SUFFIX if flip else name
    if rows.is_contiguous():
        return stored, rows
    n, width = rows.shape
    stride = rows.stride(0)
    if rows.stride(1) == 1 and stride > width and n > 0:
        end = rows.storage_offset() + n * stride
        if end * rows.element_size() <= rows.untyped_storage().nbytes():
            return f"{stored}@W{width}", rows.as_strided((n, stride), (stride, 1))
    return name, t


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, Tensor], config: dict,
                    prefix: str = "model", transposed: bool = False) -> None:
    """Write DIR/{prefix}.safetensors and DIR/config.json (config + weights_sha256); create DIR if needed.

    Tensors are made contiguous and moved to the CPU (the caller's tensors are not changed).
    Distinct keys must not share memory (safetensors refuses shared tensors). ValueError, before
    anything is written, if a floating-point tensor holds NaN or Inf (naming it) or if config is
    not JSON-able. The weights file also carries config in its header metadata, so the directory
    stays loadable if the process dies between the two renames (see the module docstring).
    Temp files left in DIR by an earlier killed save of these two files are removed.
    transposed=True: matrices are written as they are stored (as_stored): one that is the transpose of a
    contiguous tensor (the first layer's column-major U) as that tensor, its name suffixed with
    TRANSPOSED_SUFFIX; one whose rows are padded (a Flat's views) as its storage with the padding, its name
    suffixed with @W<width>; load_checkpoint gives them back in their own shape, under their own names.
    No contiguous copy is made (at V = 800k, hundreds of MB per such tensor); for the training state, read
    only by load_checkpoint. Model files keep every tensor in its own shape.
    """
    directory = Path(directory)
    if SHA_KEY in config:
        raise ValueError(f"config must not contain the reserved key {SHA_KEY!r}")
    cpu, names = {}, {}
    for name, t in tensors.items():
        stored, t = as_stored(name, t.detach()) if transposed else (name, t.detach())
        cpu[stored], names[stored] = t.to("cpu").contiguous(), name
    for stored, t in cpu.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {names[stored]!r} holds NaN or Inf values: a checkpoint never stores them")
    embedded = json.dumps(config, sort_keys=True)  # fail before writing
    digest: list[str] = []

    def write(tmp: Path) -> None:  # each tensor written from its own memory: no serialised copy of the file
        _st_save_file(cpu, tmp, metadata={EMBEDDED_KEY: embedded})
        digest.append(file_sha256(tmp))

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_file(directory / f"{prefix}.safetensors", write)
    full = {**config, SHA_KEY: digest[0]}
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(full, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {e.strerror or e}") from None


def _embedded_config(path: Path) -> dict | None:
    """The config in the header metadata of a valid safetensors file, None if it has none.

    The header is read as the format defines it (8-byte little-endian length, then JSON), no pickle.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > os.path.getsize(path) - 8:
                raise ValueError(f"a header of {n} bytes in a file of {os.path.getsize(path)}")
            header = json.loads(f.read(n).decode("utf-8"))
        text = (header.get("__metadata__") or {}).get(EMBEDDED_KEY)
        if text is None:
            return None
        config = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: malformed embedded config: {str(e)[:200]}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: embedded config is not a JSON object")
    return config


def load_checkpoint(directory: str | os.PathLike, prefix: str = "model",
                    device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict]:
    """-> (tensors on device, config without weights_sha256). Raises CheckpointError naming the file.

    config.json is used when its weights_sha256 matches the weights file; when it is missing or does
    not match (a save killed between its two renames) the config embedded in the weights file is
    used, and config.json is ignored (not rewritten: loading never writes). Without an embedded
    config the directory is refused, as is a malformed config.json.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config_path = directory / CONFIG_NAME
    weights_path = directory / f"{prefix}.safetensors"
    config: dict | None = None
    expected: str | None = None
    if config_path.is_file() or not weights_path.is_file():
        text = _read(config_path)
        try:
            config = json.loads(text.decode("utf-8"))
        except UnicodeDecodeError:
            raise CheckpointError(f"{config_path}: malformed JSON: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{config_path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from None
        except (ValueError, RecursionError) as e:  # nesting too deep, an integer of thousands of digits
            raise CheckpointError(f"{config_path}: malformed JSON: {str(e)[:200]}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
        expected = config.pop(SHA_KEY, None)
        if not isinstance(expected, str):
            raise CheckpointError(f"{config_path}: no {SHA_KEY!r} entry")
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint file {weights_path} is missing")
    try:  # hashed in chunks, then each tensor copied out of a memory map: no copy of the whole file in memory,
        # and no tensor that a later write of the file could change under the caller
        actual = file_sha256(weights_path)
        tensors = {name: t.clone() for name, t in _st_load_file(weights_path).items()}
    except OSError as e:
        raise CheckpointError(f"checkpoint file {weights_path} cannot be read: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises SafetensorError (and others) on a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{weights_path}: not a valid safetensors file: {msg}") from None
    if config is None or actual != expected:
        embedded = _embedded_config(weights_path)
        if embedded is None and config is None:
            raise CheckpointError(f"checkpoint file {config_path} is missing")
        if embedded is None:
            raise CheckpointError(
                f"{weights_path}: sha256 {actual[:12]}… does not match {SHA_KEY} {expected[:12]}… "
                f"in {config_path} (torn or mixed checkpoint)"
            )
        config = embedded
    for stored in [name for name in tensors if WIDTH_SUFFIX.search(name) or name.endswith(TRANSPOSED_SUFFIX)]:
        t, name = tensors.pop(stored), stored  # written as stored (as_stored): back in its own shape
        padded = WIDTH_SUFFIX.search(name)
        if padded:
            width, name = int(padded.group(1)), name[: padded.start()]
            if t.dim() != 2 or width > t.shape[1]:
                raise CheckpointError(f"{weights_path}: tensor {stored!r} is not a padded matrix of width {width}")
            t = t[:, :width]
        if name.endswith(TRANSPOSED_SUFFIX):
            name = name[: -len(TRANSPOSED_SUFFIX)]
            if t.dim() != 2:
                raise CheckpointError(f"{weights_path}: tensor {stored!r} is not the transpose of a matrix")
            t = t.t()
        if name in tensors:
            raise CheckpointError(f"{weights_path}: tensor {stored!r} is a second copy of {name!r}")
        tensors[name] = t
    device = torch.device(device)
    if device.type != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors, config


# -- packing helpers -----------------------------------------------------------------------------------


def pack_state(prefix: str, state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A flat state_dict (e.g. an optimizer's) -> (tensors keyed "{prefix}.{key}", JSON scalars).

    Put the tensors into save_checkpoint's tensors and the scalars into its config.
    """
    tensors = {f"{prefix}.{k}": v for k, v in state.items() if isinstance(v, Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    return tensors, scalars


def unpack_state(prefix: str, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    """The inverse of pack_state: the tensors under "{prefix}." plus the scalars, as one flat dict."""
    lead = f"{prefix}."
    out: dict[str, Any] = {k[len(lead):]: v for k, v in tensors.items() if k.startswith(lead)}
    out.update(scalars)
    return out


def rng_state() -> dict[str, Tensor]:
    """{"rng.torch": torch CPU generator state (uint8 tensor)}: store it with the tensors.

    Python's `random` and numpy's generators are not captured: the training code draws from neither.
    CUDA generators are not captured either (ElmanLM draws its initial weights on the CPU).
    """
    return {"rng.torch": torch.get_rng_state()}


def set_rng_state(tensors: dict[str, Tensor]) -> None:
    """Restore the torch CPU generator from the "rng.torch" entry of a loaded checkpoint."""
    if "rng.torch" not in tensors:
        raise CheckpointError("checkpoint holds no 'rng.torch' tensor")
    torch.set_rng_state(tensors["rng.torch"].to("cpu", torch.uint8).contiguous())
