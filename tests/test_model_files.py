"""Model files are data, never code: load_model reads safetensors and JSON only, and refuses, with one
line naming the file, every directory it cannot trust: truncated weights, tensors that disagree with
config.json, a vocabulary that is not the one saved with the model, a pickle file, a newer format, and
random edits of config.json."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import random
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from bptt.storage.checkpoint import CheckpointError, load_checkpoint
from bptt.cli import main
from bptt.data import CorpusError, Vocab
from bptt.model import ElmanLM, RNNLM
from bptt.storage.saved_model import FORMAT_VERSION, VOCAB_SHA_KEY, load_model, save_model
from conftest import train_tiny_model

WORDS = "the a cat dog sat ran on under mat rug".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("model-files"), WORDS, seed=1)


@pytest.fixture
def model_dir(trained, tmp_path):
    """A private copy of the trained model directory, free to damage."""
    directory = tmp_path / "m"
    shutil.copytree(trained, directory)
    return directory


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def _write_weights(directory: Path, tensors: dict, config: dict | None = None) -> None:
    """Replace the weights (and config.json's sha256 of them) bypassing save_checkpoint's own checks."""
    config = dict(_config(directory) if config is None else config)
    data = st_save({k: v.contiguous() for k, v in tensors.items()})
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (directory / "model.safetensors").write_bytes(data)
    _write_config(directory, config)


def _refused(directory: Path, *needles: str, error=(CheckpointError, CorpusError)) -> str:
    with pytest.raises(error) as info:
        load_model(directory)
    message = str(info.value)
    assert "\n" not in message and str(directory) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _cli_refuses(directory: Path, capsys, *needles: str) -> None:
    """eval, score and generate: exit 2 and one line on stderr, holding the needles."""
    text = directory.parent / "text.txt"
    text.write_text("the cat sat\n")
    for argv in (["eval", "--model", str(directory), "--test", str(text)],
                 ["score", "--model", str(directory), "--text", str(text)],
                 ["generate", "--model", str(directory), "--words", "3"]):
        assert main(argv) == 2
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.err and out.out == ""
        for needle in needles:
            assert needle in lines[0]


# -- never pickle --------------------------------------------------------------------------------------


def test_loading_and_evaluating_never_unpickle(trained, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, vocab, config = load_model(trained)
    assert config["format_version"] == FORMAT_VERSION and len(vocab) == model.vocab_size
    text = trained.parent / "t.txt"
    assert main(["eval", "--model", str(trained), "--test", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert main(["score", "--model", str(trained), "--text", str(text)]) == 0
    assert main(["generate", "--model", str(trained), "--words", "5"]) == 0


@pytest.mark.parametrize("name, make", [
    ("model.pt", lambda: pickle.dumps({"weights": [1, 2, 3]})),
    ("model.pkl", lambda: b"not even a pickle, but named like one"),
    ("weights.pth", lambda: b""),
    ("pytorch_model.bin", lambda: pickle.dumps([1, 2], protocol=4)),
    ("blob.dat", lambda: pickle.dumps("x", protocol=2)),
    ("archive", lambda: _torch_zip()),
])
def test_a_pickle_file_in_the_directory_is_refused(model_dir, capsys, name, make):
    (model_dir / name).write_bytes(make())
    _refused(model_dir, name, "never loads pickle")
    _cli_refuses(model_dir, capsys, name, "pickle")
    (model_dir / name).unlink()
    load_model(model_dir)  # once it is gone, the model loads


@pytest.mark.parametrize("protocol_byte", [2, 3, 4, 5])
def test_a_safetensors_file_whose_header_length_begins_like_a_pickle_loads(tmp_path, protocol_byte):
    """A safetensors file starts with its header's length (8 bytes, little-endian): a header of
    0x80 + 256·p bytes (p = 2..5; 640 to 1408) begins like a pickle's protocol-p mark. Such model files
    load; a real pickle of each protocol is still refused."""
    model, vocab = RNNLM(5, 4, cell="lstm", seed=0), Vocab(["<eos>", "<unk>", "a", "b", "c"], [3, 0, 2, 1, 1])
    save_model(tmp_path / "plain", model, extra={"note": ""}, vocab=vocab)
    base = int.from_bytes((tmp_path / "plain" / "model.safetensors").read_bytes()[:8], "little")
    target = 0x80 + 256 * protocol_byte
    target += 65536 * (target < base)  # the header holds the config: at least `base` bytes
    for pad in range(target - base - 8, target - base + 8):  # the header is padded to a multiple of 8
        directory = tmp_path / f"m{pad}"
        save_model(directory, model, extra={"note": "x" * pad}, vocab=vocab)
        head = (directory / "model.safetensors").read_bytes()[:2]
        if head == bytes([0x80, protocol_byte]):
            break
        shutil.rmtree(directory)
    else:
        pytest.fail(f"no padding gave a header of {target} bytes")
    loaded, _, extra = load_model(directory)
    assert extra["note"] == "x" * pad and torch.equal(loaded.params["V"], model.params["V"])
    (directory / "other.bin").write_bytes(pickle.dumps({"x": 1}, protocol=protocol_byte))
    _refused(directory, "other.bin", "never loads pickle")


def _torch_zip() -> bytes:
    """The layout of torch.save's zip archive (a data.pkl inside), built without torch.save."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": 1}))
        z.writestr("archive/version", "3\n")
    return buffer.getvalue()


def test_other_files_in_the_directory_are_fine(model_dir):
    (model_dir / "notes.txt").write_text("trained on tuesday\n")
    (model_dir / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (model_dir / "data.zip").write_bytes(_zip_without_pickle())
    (model_dir / "sub").mkdir()
    (model_dir / "sub" / "old.pkl").write_bytes(pickle.dumps(1))  # subdirectories are not the model's
    load_model(model_dir)


def _zip_without_pickle() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("readme.txt", "hello")
    return buffer.getvalue()


# -- damaged or inconsistent files ---------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_weights(model_dir, capsys, keep):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    _refused(model_dir, "model.safetensors")
    _cli_refuses(model_dir, capsys, "model.safetensors")


def test_weights_of_the_wrong_shape(model_dir, capsys):
    tensors, config = load_checkpoint(model_dir)
    tensors["W"] = torch.zeros(9, 9)
    _write_weights(model_dir, tensors)
    _refused(model_dir, "model.safetensors", "'W'", "(9, 9)")
    _cli_refuses(model_dir, capsys, "'W'")


def test_config_that_disagrees_with_the_weights(model_dir, capsys):
    config = _config(model_dir)
    config["model"]["hidden_size"] = 9
    _write_config(model_dir, config)  # the weights' sha256 still matches: config.json is believed
    _refused(model_dir, "model.safetensors", "'U'", "(8, 12)", "(9, 12)")
    _cli_refuses(model_dir, capsys, "(9, 12)")


def test_output_layer_tensor_of_the_wrong_shape(model_dir):
    tensors, _ = load_checkpoint(model_dir)
    tensors["c"] = torch.zeros(5)
    _write_weights(model_dir, tensors)
    _refused(model_dir, "tensor 'c' has shape (5)")


def test_weights_of_the_wrong_dtype(model_dir, capsys):
    tensors, _ = load_checkpoint(model_dir)
    _write_weights(model_dir, {k: v.double() for k, v in tensors.items()})
    _refused(model_dir, "float64", "float32")
    _cli_refuses(model_dir, capsys, "float64")
    config = _config(model_dir)
    config["model"]["dtype"] = "float64"  # now they agree again
    _write_config(model_dir, config)
    model, _, _ = load_model(model_dir)
    assert model.dtype == torch.float64
    config["model"]["dtype"] = "int8"
    _write_config(model_dir, config)
    _refused(model_dir, "config.json", "int8")


def test_missing_and_unexpected_tensors(model_dir):
    tensors, _ = load_checkpoint(model_dir)
    _write_weights(model_dir, {**tensors, "Vc": torch.zeros(3, 8)})
    _refused(model_dir, "unexpected tensor 'Vc'")
    _write_weights(model_dir, {k: v for k, v in tensors.items() if k != "c"})
    _refused(model_dir, "no tensor 'c'")


def test_non_finite_weights(model_dir):
    tensors, _ = load_checkpoint(model_dir)
    tensors["V"][1, 2] = float("nan")
    _write_weights(model_dir, tensors)
    _refused(model_dir, "'V'", "non-finite")


@pytest.mark.parametrize("text", ['{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", '{"a": ' + "9" * 5000 + "}"])
def test_pathological_json_in_config(model_dir, text):
    (model_dir / "config.json").write_text(text)
    _refused(model_dir, "config.json")


def test_random_bytes_as_weights(model_dir):
    for seed in range(5):
        (model_dir / "model.safetensors").write_bytes(random.Random(seed).randbytes(200 * seed))
        _refused(model_dir, "model.safetensors")


# -- the vocabulary must be the model's ----------------------------------------------------------------


def test_vocabulary_hash_is_checked(model_dir, capsys):
    config = _config(model_dir)
    assert config[VOCAB_SHA_KEY] == hashlib.sha256((model_dir / "vocab.json").read_bytes()).hexdigest()
    vocab = Vocab.load(model_dir / "vocab.json")
    vocab.words[2], vocab.words[3] = vocab.words[3], vocab.words[2]  # same size, other ids
    (model_dir / "vocab.json").write_text(json.dumps(vocab.to_json()))
    _refused(model_dir, "vocab.json", "does not match", "not the vocabulary this model was trained with")
    _cli_refuses(model_dir, capsys, "vocab.json", "does not match")


def test_vocabulary_of_another_size_without_a_hash(model_dir):
    config = _config(model_dir)
    del config[VOCAB_SHA_KEY]
    _write_config(model_dir, config)
    vocab = Vocab.load(model_dir / "vocab.json")
    (model_dir / "vocab.json").write_text(json.dumps(Vocab(vocab.words + ["zebra"], vocab.counts + [1]).to_json()))
    _refused(model_dir, "vocab.json", "13 words", "vocab_size 12")


@pytest.mark.parametrize("name", ["../vocab.json", "/etc/passwd", "sub/vocab.json", "", 3, None])
def test_vocab_file_must_be_inside_the_directory(model_dir, name):
    config = _config(model_dir)
    config["vocab_file"] = name
    _write_config(model_dir, config)
    _refused(model_dir, "vocab_file")


# -- format versions -----------------------------------------------------------------------------------


def test_a_newer_format_is_refused(model_dir, capsys):
    config = _config(model_dir)
    config["format_version"] = FORMAT_VERSION + 1
    _write_config(model_dir, config)
    _refused(model_dir, f"made by a newer bptt (format {FORMAT_VERSION + 1}, this bptt reads <= {FORMAT_VERSION})")
    _cli_refuses(model_dir, capsys, "newer bptt")
    for bad in ("1", -1, 1.5, True, None):
        config["format_version"] = bad
        _write_config(model_dir, config)
        _refused(model_dir, "format_version")


def test_format_0_files_still_load(model_dir, capsys):
    """The layout written before format_version existed: no format_version, no vocab_sha256, and a
    weights file without an embedded config."""
    tensors, config = load_checkpoint(model_dir)
    legacy = {k: v for k, v in config.items() if k not in ("format_version", VOCAB_SHA_KEY)}
    _write_weights(model_dir, tensors, legacy)
    model, vocab, loaded = load_model(model_dir)
    assert "format_version" not in loaded
    for name, p in model.params.items():
        assert torch.equal(p, tensors[name])
    text = model_dir.parent / "text.txt"
    text.write_text("the cat sat\n")
    assert main(["eval", "--model", str(model_dir), "--test", str(text)]) == 0


def test_save_model_writes_the_vocabulary_and_its_hash(tmp_path):
    vocab = Vocab(["<eos>", "<unk>", "a", "b"], [2, 0, 1, 1])
    model = ElmanLM(4, 3, seed=1)
    save_model(tmp_path / "m", model, {"note": "x"}, vocab=vocab)
    loaded, loaded_vocab, config = load_model(tmp_path / "m")
    assert loaded_vocab.words == vocab.words and config["note"] == "x"
    assert config["format_version"] == FORMAT_VERSION and len(config[VOCAB_SHA_KEY]) == 64
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path / "n", model, {"format_version": 7})
    with pytest.raises(ValueError, match="the vocabulary has 4 words"):
        save_model(tmp_path / "n", ElmanLM(5, 3), vocab=vocab)


# -- random edits of config.json -----------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10)
    | st.sampled_from(["softmax", "class", "hsm", "nce", "sampled", "tanh", "relu", "float16", "bfloat16",
                       "float64", "cross_entropy", "quadratic", "sigmoid", "identity", "char", "word"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_SIZES = st.sampled_from([0, 1, 2, -1, 7, 8, 9, 12, 13, 10**6, 10**12, 2**62, 2**64, 10**400 // 10**390])


def _paths(config: dict) -> list[tuple]:
    out = []
    for key, value in config.items():
        out.append((key,))
        if isinstance(value, dict):
            out += [(key, *rest) for rest in _paths(value)]
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "size", "delete", "rename"]),
                                _JSON, _SIZES), min_size=1, max_size=4))
def test_random_config_edits_load_or_fail_cleanly(trained, tmp_path, edits):
    directory = tmp_path / "edited"
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(trained, directory)
    original = _config(directory)
    config = copy.deepcopy(original)
    for pick, action, value, size in edits:
        paths = _paths(config)
        if not paths:
            break
        path = paths[pick % len(paths)]
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if action == "set":
            parent[path[-1]] = value
        elif action == "size":
            parent[path[-1]] = size
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1] + "_"] = parent.pop(path[-1])
    _write_config(directory, config)
    started = time.perf_counter()
    try:
        model, vocab, loaded = load_model(directory)
    except (CheckpointError, CorpusError) as e:  # both ValueError: one line naming a file of the directory
        assert "\n" not in str(e) and str(directory) in str(e), str(e)
    else:
        assert len(vocab) == model.vocab_size  # whatever was believed, it is consistent with the files
        for name, p in model.params.items():
            assert torch.isfinite(p).all()
    assert time.perf_counter() - started < 5  # nothing of an absurd size was allocated


# -- bptt train --resume reads a checkpoint directory: the same rules ------------------------------------


@pytest.fixture
def stopped_run(tmp_path):
    """A run stopped after 2 steps: DIR with a model, DIR/checkpoint with the training state."""
    from bptt.cli import main

    lines = ["a b c d", "b c d a", "c a b", "d d a b c"] * 10
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--train", str(tmp_path / "t.txt"), "--valid", str(tmp_path / "t.txt"), "--model", str(out),
            "--hidden", "4", "--batch", "2", "--bptt", "3", "--max-steps", "2", "--quiet"]
    assert main(argv) == 0
    return out


def _resume_fails(out, capsys, *needles):
    from bptt.cli import main

    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]


def test_resume_refuses_a_pickle_file_in_the_checkpoint(stopped_run, capsys):
    import pickle

    (stopped_run / "checkpoint" / "optimizer.pt").write_bytes(pickle.dumps({"a": 1}))
    _resume_fails(stopped_run, capsys, "optimizer.pt")


def test_resume_refuses_another_vocabulary(stopped_run, capsys):
    vocab = json.loads((stopped_run / "vocab.json").read_text())
    (stopped_run / "vocab.json").write_text(json.dumps(vocab, indent=1))  # same words, other bytes
    _resume_fails(stopped_run, capsys, "vocab.json", "does not match")


def test_resume_refuses_pathological_json(stopped_run, capsys):
    config = stopped_run / "checkpoint" / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"global_step": 2', '"global_step": ' + "9" * 5000))
    (stopped_run / "checkpoint" / "model.safetensors").unlink()  # no embedded config to fall back on
    _resume_fails(stopped_run, capsys, "config.json")


def test_resume_refuses_a_state_with_a_tensor_missing(stopped_run, capsys):
    import hashlib

    from safetensors.torch import load_file, save_file

    weights = stopped_run / "checkpoint" / "model.safetensors"
    tensors = load_file(weights)
    stored = [k for k in tensors if k == "param.W" or k.startswith("param.W@")]  # W@W6: padded rows (flat.py)
    assert len(stored) == 1
    del tensors[stored[0]]
    save_file(tensors, weights)
    config = stopped_run / "checkpoint" / "config.json"
    data = json.loads(config.read_text())
    data["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(data))
    _resume_fails(stopped_run, capsys, "checkpoint", "param.W")
