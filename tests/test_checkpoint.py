"""Checkpoints: safetensors + JSON round trips, atomic writes, clear errors, and no pickle anywhere."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import bptt.storage.checkpoint as ckpt
from bptt.files import atomic_write_bytes, atomic_write_json
from bptt.storage.checkpoint import (
    CheckpointError,
    load_checkpoint,
    pack_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_state,
)
from bptt.model import ElmanLM
from bptt.training.optim import make_optimizer


def _model(seed=0):
    return ElmanLM(11, 6, dtype=torch.float32, seed=seed)


def _save(tmp_path, seed=0, name="ck"):
    model = _model(seed)
    directory = tmp_path / name
    save_checkpoint(directory, model.params, {"vocab_size": 11, "hidden_size": 6, "lr": 0.1, "seed": seed})
    return directory, model


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_bit_exact(tmp_path):
    directory, model = _save(tmp_path)
    assert not model.params["U"].is_contiguous()
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    tensors, config = load_checkpoint(directory)
    assert config == {"vocab_size": 11, "hidden_size": 6, "lr": 0.1, "seed": 0}
    assert tensors.keys() == model.params.keys()
    for k, p in model.params.items():
        assert tensors[k].dtype == p.dtype and tensors[k].shape == p.shape
        assert torch.equal(tensors[k], p)
    on_disk = json.loads((directory / "config.json").read_text())
    assert len(on_disk["weights_sha256"]) == 64


@pytest.mark.parametrize("hidden", [8, 6])
def test_matrices_are_written_as_stored_without_a_copy_and_read_back(tmp_path, monkeypatch, hidden):
    """save_checkpoint(transposed=True) (the training state): a column-major matrix is written as its
    contiguous transpose (U@T: the gathered U is row-sparse, never padded), a matrix with padded rows
    (hidden 6 in float32: a row stride of 8) as its storage, padding included (NAME@W6), and each comes
    back in its own shape; .contiguous() copies nothing. Model files (the default) keep every tensor in its
    own shape (copies)."""
    model = ElmanLM(11, hidden, dtype=torch.float32, seed=0)
    U = model.params["U"]
    assert not U.is_contiguous() and U.t().is_contiguous()
    padded = [] if hidden == 8 else ["W", "V"]
    assert all(not model.params[k].is_contiguous() for k in padded)
    copies = []
    real = torch.Tensor.contiguous

    def contiguous(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        if out.data_ptr() != t.data_ptr():
            copies.append(tuple(t.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    save_checkpoint(tmp_path / "state", dict(model.params), {"x": 1}, transposed=True)
    assert copies == []
    save_checkpoint(tmp_path / "model", dict(model.params), {"x": 1})
    assert sorted(copies) == sorted({tuple(model.params[k].shape) for k in ["U", *padded]})
    from safetensors import safe_open
    with safe_open(tmp_path / "state" / "model.safetensors", framework="pt") as f:
        assert "U" not in f.keys() and tuple(f.get_tensor("U@T").shape) == (11, hidden)
        if hidden == 6:
            assert {"W@W6", "V@W6"} <= set(f.keys()) and not {"W", "V"} & set(f.keys())
            assert tuple(f.get_tensor("W@W6").shape) == (6, 8) and tuple(f.get_tensor("V@W6").shape) == (11, 8)
            assert not f.get_tensor("V@W6")[:, 6:].any()  # the padding: zeros
    with safe_open(tmp_path / "model" / "model.safetensors", framework="pt") as f:
        assert not any("@" in k for k in f.keys()) and tuple(f.get_tensor("U").shape) == tuple(U.shape)
    for directory in ("state", "model"):
        tensors, _ = load_checkpoint(tmp_path / directory)
        assert tensors.keys() == model.params.keys()
        assert all(torch.equal(tensors[k], p) and tensors[k].shape == p.shape for k, p in model.params.items())


def test_a_padded_name_that_does_not_fit_is_one_line(tmp_path):
    save_checkpoint(tmp_path / "c", {"V@W9": torch.zeros(3, 8)}, {"x": 1})  # claims width 9 of 8 columns
    with pytest.raises(CheckpointError, match="V@W9"):
        load_checkpoint(tmp_path / "c")


def test_round_trip_with_optimizer_and_rng_state(tmp_path):
    model = _model()
    opt = make_optimizer("adam", model.params)
    grads = model.params.like()
    grads.data.fill_(1.0)
    opt.step(grads, 0.01)
    opt_tensors, opt_scalars = pack_state("optim", opt.state_dict())
    assert "optim.m.U" in opt_tensors and opt_scalars == {"t": 1}
    torch.manual_seed(123)
    rng = rng_state()
    save_checkpoint(tmp_path, {**model.params, **opt_tensors, **rng}, {"optim": opt_scalars}, prefix="last")
    expected = torch.rand(5)
    tensors, config = load_checkpoint(tmp_path, prefix="last")
    set_rng_state(tensors)
    assert torch.equal(torch.rand(5), expected)
    restored = make_optimizer("adam", model.params.like(model.params.data.clone()))
    restored.load_state_dict(unpack_state("optim", tensors, config["optim"]))
    assert restored.t == 1
    assert torch.equal(restored.state_dict()["v.W"], opt.state_dict()["v.W"])


def test_save_overwrites_and_reserved_key(tmp_path):
    _save(tmp_path, seed=0, name="x")
    directory, model = _save(tmp_path, seed=1, name="x")
    tensors, config = load_checkpoint(directory)
    assert config["seed"] == 1 and torch.equal(tensors["W"], model.params["W"])
    with pytest.raises(ValueError, match="weights_sha256"):
        save_checkpoint(tmp_path / "y", model.params, {"weights_sha256": "x"})


# -- atomic writes -------------------------------------------------------------------------------------


def test_atomic_write_replace_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_fsync_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed")))
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_unserialisable_writes_nothing(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    directory, model = _save(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(ckpt, "_st_save_file", boom)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        save_checkpoint(directory, _model(seed=5).params, {"seed": 5})
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    tensors, config = load_checkpoint(directory)
    assert config["seed"] == 0


# -- errors --------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=f"directory {missing} does not exist"):
        load_checkpoint(missing)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file(tmp_path, name):
    directory, _ = _save_legacy(tmp_path) if name == "config.json" else _save(tmp_path)
    (directory / name).unlink()
    with pytest.raises(CheckpointError, match=f"{directory / name} is missing"):
        load_checkpoint(directory)


def test_missing_config_json_is_recovered_from_the_weights(tmp_path):
    """A first save killed between its two renames leaves only the weights: they carry the config."""
    directory, model = _save(tmp_path)
    (directory / "config.json").unlink()
    tensors, config = load_checkpoint(directory)
    assert config == {"vocab_size": 11, "hidden_size": 6, "lr": 0.1, "seed": 0}
    assert all(torch.equal(tensors[k], p) for k, p in model.params.items())
    assert not (directory / "config.json").exists()  # loading never writes


def test_missing_prefix_file(tmp_path):
    directory, _ = _save(tmp_path)
    with pytest.raises(CheckpointError, match="best.safetensors is missing"):
        load_checkpoint(directory, prefix="best")


def test_malformed_json_names_file_and_line(tmp_path):
    directory, _ = _save(tmp_path)
    (directory / "config.json").write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    msg = str(info.value)
    assert str(directory / "config.json") in msg and "line 4" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text,match", [("[1, 2]", "expected a JSON object"), ('{"a": 1}', "no 'weights_sha256'")]
)
def test_config_not_object_or_without_sha(tmp_path, text, match):
    directory, _ = _save(tmp_path)
    (directory / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(directory)
    assert str(directory / "config.json") in str(info.value)


@pytest.mark.parametrize("data", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_corrupt_safetensors(tmp_path, data):
    directory, _ = _save(tmp_path)
    (directory / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as info:
        load_checkpoint(directory)
    assert str(directory / "model.safetensors") in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_safetensors(tmp_path):
    directory, _ = _save(tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(directory)


def _save_legacy(tmp_path, seed=0, name="legacy"):
    """A checkpoint as older versions wrote it: no config embedded in the weights file."""
    import hashlib

    from safetensors.torch import save

    model = _model(seed)
    directory = tmp_path / name
    directory.mkdir()
    data = save({k: p.contiguous() for k, p in model.params.items()})
    (directory / "model.safetensors").write_bytes(data)
    config = {"seed": seed, "weights_sha256": hashlib.sha256(data).hexdigest()}
    (directory / "config.json").write_text(json.dumps(config))
    return directory, model


def test_legacy_checkpoint_without_embedded_config_loads(tmp_path):
    directory, model = _save_legacy(tmp_path)
    tensors, config = load_checkpoint(directory)
    assert config == {"seed": 0} and torch.equal(tensors["W"], model.params["W"])


def test_torn_pair_uses_the_config_embedded_in_the_weights(tmp_path):
    """New weights next to the previous save's config.json: the weights' own config wins."""
    a, _ = _save(tmp_path, seed=0, name="a")
    b, model_b = _save(tmp_path, seed=1, name="b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    stale = (a / "config.json").read_bytes()
    tensors, config = load_checkpoint(a)
    assert config["seed"] == 1
    assert all(torch.equal(tensors[k], p) for k, p in model_b.params.items())
    assert (a / "config.json").read_bytes() == stale  # ignored, not rewritten


def test_mixed_pair_without_embedded_config_is_refused(tmp_path):
    a, _ = _save_legacy(tmp_path, seed=0, name="a")
    b, _ = _save_legacy(tmp_path, seed=1, name="b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())  # valid, but not a's
    with pytest.raises(CheckpointError, match="does not match weights_sha256") as info:
        load_checkpoint(a)
    assert str(a / "model.safetensors") in str(info.value) and str(a / "config.json") in str(info.value)


def test_embedded_config_is_plain_safetensors_metadata(tmp_path):
    """Any safetensors reader sees the config as header metadata (str -> str), no pickle involved."""
    from safetensors import safe_open

    directory, _ = _save(tmp_path)
    with safe_open(directory / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["bptt.config"]) == {"vocab_size": 11, "hidden_size": 6, "lr": 0.1, "seed": 0}


@pytest.mark.parametrize("when", ["before", "after"])
def test_save_killed_at_a_rename_leaves_a_loadable_directory(tmp_path, monkeypatch, when):
    """A save that dies just before or just after either rename: the directory loads, old or new."""
    for n in (1, 2):  # the weights' rename, then config.json's
        directory, old = _save(tmp_path, seed=0, name=f"{when}{n}")
        new = _model(seed=1)
        real, calls = os.replace, []

        def dying(src, dst, n=n):
            calls.append(dst)
            if len(calls) == n:
                if when == "after":
                    real(src, dst)
                raise SystemExit("killed")  # stands in for SIGKILL: nothing after it runs
            real(src, dst)

        monkeypatch.setattr(os, "replace", dying)
        with pytest.raises(SystemExit):
            save_checkpoint(directory, new.params, {"seed": 1})
        monkeypatch.setattr(os, "replace", real)
        tensors, config = load_checkpoint(directory)
        expected = 0 if (when, n) == ("before", 1) else 1
        assert config["seed"] == expected
        source = old if expected == 0 else new
        assert all(torch.equal(tensors[k], p) for k, p in source.params.items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_save_refuses_non_finite_tensors(tmp_path, bad):
    directory, model = _save(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    params = {k: p.clone() for k, p in model.params.items()}
    params["W"][1, 2] = bad
    with pytest.raises(ValueError, match="tensor 'W' holds NaN or Inf"):
        save_checkpoint(directory, params, {"seed": 7})
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    rng = rng_state()  # integer tensors (uint8 RNG state) are not checked
    save_checkpoint(directory, {**model.params, **rng}, {"seed": 7})


def test_save_removes_temp_files_of_a_killed_save(tmp_path):
    directory, model = _save(tmp_path)
    leftovers = [directory / ".model.safetensors.abc123.tmp", directory / ".config.json.xyz.tmp"]
    other = directory / ".notes.txt.abc.tmp"  # not one of this checkpoint's files: kept
    for p in [*leftovers, other]:
        p.write_bytes(b"partial")
    save_checkpoint(directory, model.params, {"seed": 0})
    assert _leftovers(directory) == [other.name]


def test_save_and_load_never_pickle(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("loads", "load", "dumps", "dump", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    directory, model = _save(tmp_path)
    tensors, _ = load_checkpoint(directory)
    assert torch.equal(tensors["V"], model.params["V"])
    (directory / "config.json").unlink()  # the embedded config is read without pickle too
    tensors, config = load_checkpoint(directory)
    assert config["seed"] == 0 and torch.equal(tensors["V"], model.params["V"])


def test_the_training_state_stores_column_major_matrices_as_they_are(tmp_path):
    """A trainer's checkpoint writes the first layer's U (weights, best weights, Adam's m and v) as its
    contiguous transpose, and a resumed trainer reads them back in their own shape."""
    from safetensors import safe_open

    from bptt.training.trainer import STATE_DIR, TrainConfig, Trainer
    from conftest import write_corpus

    config = TrainConfig.from_options(train=write_corpus(tmp_path / "t.txt", 20, 0),
                                      valid=write_corpus(tmp_path / "v.txt", 5, 1), model=str(tmp_path / "m"),
                                      hidden_size=8, batch=2, bptt=3, epochs=1, progress=False)
    trainer = Trainer(config)
    trainer.run(max_steps=3)
    with safe_open(tmp_path / "m" / STATE_DIR / "model.safetensors", framework="pt") as f:
        assert sorted(k for k in f.keys() if k.endswith("@T")) == ["best.U@T", "opt.m.U@T", "opt.v.U@T", "param.U@T"]
        assert not any("@W" in k for k in f.keys())  # hidden 8: no padded rows
    resumed = Trainer.resume(tmp_path / "m", progress=False)
    assert torch.equal(resumed.model.params["U"], trainer.model.params["U"])
    assert torch.equal(resumed.optimizer.state_dict()["v.U"], trainer.optimizer.state_dict()["v.U"])
