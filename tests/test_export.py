"""export_torch and `bptt export`: a model as the state dict of PyTorch's examples/word_language_model
RNNModel. torch.nn.Embedding + torch.nn.LSTM/GRU/RNN + torch.nn.Linear loaded from the export give the
model's log-probabilities, and the export of its gradients is what autograd gives that torch model
(float64, 1e-12); what RNNModel cannot express is refused in one line; the command writes both files
atomically or nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import bptt
from bptt.cli import main
from bptt.commands.export import METADATA_KEY
from bptt.data import Vocab
from bptt.model import ElmanLM
from bptt.storage.saved_model import load_model, save_model
from conftest import one_error_line, write_corpus

TOL = dict(rtol=1e-12, atol=1e-12)
V, M, T, B = 11, 5, 6, 3


class TorchRNNModel(torch.nn.Module):
    """The layout of word_language_model's RNNModel (encoder, drop, rnn, decoder), from the metadata."""

    def __init__(self, meta: dict, dtype=torch.float64):
        super().__init__()
        kind, e, m, layers, bias = meta["rnn_type"], meta["ninp"], meta["nhid"], meta["nlayers"], meta["bias"]
        self.drop = torch.nn.Dropout(meta["dropout"])
        self.encoder = torch.nn.Embedding(meta["ntoken"], e, dtype=dtype)
        common = dict(num_layers=layers, bias=bias, dropout=meta["dropout"] if layers > 1 else 0.0, dtype=dtype)
        if kind in ("LSTM", "GRU"):
            self.rnn = getattr(torch.nn, kind)(e, m, **common)
        else:
            self.rnn = torch.nn.RNN(e, m, nonlinearity={"RNN_TANH": "tanh", "RNN_RELU": "relu"}[kind], **common)
        self.decoder = torch.nn.Linear(m, meta["ntoken"], bias=bias, dtype=dtype)
        if meta["tie_weights"]:
            self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T,B) -> log P (T,B,V), from the zero state."""
        h, _ = self.rnn(self.drop(self.encoder(x)))
        return torch.log_softmax(self.decoder(self.drop(h)), dim=-1)


def torch_twin(model, dtype=torch.float64) -> TorchRNNModel:
    meta = model.torch_metadata()
    twin = TorchRNNModel(meta, dtype)
    twin.load_state_dict({k: v.to(dtype) for k, v in model.export_torch().items()}, strict=True)
    for name in meta["frozen"]:
        twin.get_parameter(name).requires_grad_(False)
    return twin.eval()


def rough(model, seed: int = 0):
    """Large weights and non-zero biases, so that every term of the mapping shows in the numbers."""
    g = torch.Generator().manual_seed(100 + seed)
    for p in model.params.values():
        p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5) * (1.6 if p.dim() == 1 else 1.2))
    return model


def data(seed: int = 0, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (T, B), generator=g), torch.randint(0, vocab, (T, B), generator=g)


CASES = {
    "lstm": dict(cell="lstm"),
    "lstm-2": dict(cell="lstm", layers=2),
    "gru": dict(cell="gru"),
    "gru-2": dict(cell="gru", layers=2),
    "elman-tanh": dict(cell="elman"),
    "elman-relu-2": dict(cell="elman", layers=2, hidden_activation="relu"),
    "elman-tanh-embedding": dict(cell="elman", embedding_size=4),
    "elman-relu-embedding-2": dict(cell="elman", layers=2, embedding_size=3, hidden_activation="relu"),
    "lstm-no-embedding": dict(cell="lstm", embedding_size=0),
    "gru-no-embedding-2": dict(cell="gru", layers=2, embedding_size=0),
    "lstm-embedding-3": dict(cell="lstm", embedding_size=3),
    "lstm-tied-2": dict(cell="lstm", layers=2, tied=True),
    "gru-tied": dict(cell="gru", tied=True),
    "elman-tied": dict(cell="elman", tied=True),
    "elman-tied-embedding-2": dict(cell="elman", layers=2, tied=True, embedding_size=M),
    "lstm-dropout-2": dict(cell="lstm", layers=2, dropout=0.4),
    "gru-dropout-variational": dict(cell="gru", layers=2, dropout=0.3, dropout_embedding=0.1, variational=True),
    "elman-dropout": dict(cell="elman", dropout=0.5),
    "gru-no-bias": dict(cell="gru", bias=False),
    "lstm-no-bias-2": dict(cell="lstm", layers=2, bias=False),
    "elman-no-bias-tied": dict(cell="elman", bias=False, tied=True),
    "lstm-nce": dict(cell="lstm", output="nce"),
    "gru-sampled": dict(cell="gru", output="sampled"),
}


def make(kw, seed=0):
    return rough(bptt.RNNLM(V, M, dtype=torch.float64, seed=seed, **kw), seed)


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_torch_modules_give_the_models_log_probs_and_its_gradients(kw):
    model = make(kw)
    twin = torch_twin(model)
    x, y = data()
    log_p, _ = model.log_probs(x)
    with torch.enable_grad():
        ref = twin(x)
        weights = torch.ones(T, B, dtype=torch.float64)
        weights[-2:, 1] = 0  # the mask: dropped positions
        loss = -(ref.gather(2, y.unsqueeze(2)).squeeze(2) * weights).sum()
        loss.backward()
    torch.testing.assert_close(log_p, ref.detach(), **TOL)
    bptt_loss, grads, _ = model.loss_and_grads(x, y, mask=weights, train=False)
    if kw.get("output", "softmax") == "softmax":  # nce / sampled train a sampled objective: no autograd twin
        torch.testing.assert_close(bptt_loss, loss.detach(), **TOL)
        exported = model.export_torch(grads)
        trainable = {name for name, p in twin.named_parameters() if p.requires_grad}
        tied_twins = {"decoder.weight"} if kw.get("tied") else set()  # one torch parameter, two names
        assert set(exported) == trainable | tied_twins
        for name, g in exported.items():
            torch.testing.assert_close(g, twin.get_parameter(name).grad, **TOL, msg=name)


def test_a_carried_state_is_the_torch_models_hidden_state():
    """Two blocks with the state carried = torch over the whole sequence; the LSTM's (h, c) per layer is
    torch's (h_n[k], c_n[k])."""
    model = make(dict(cell="lstm", layers=2))
    twin = torch_twin(model)
    x, _ = data(1)
    first, state = model.log_probs(x[:2])
    second, state = model.log_probs(x[2:], state)
    torch.testing.assert_close(torch.cat((first, second)), twin(x).detach(), **TOL)
    _, (h_n, c_n) = twin.rnn(twin.encoder(x))
    for k, (h, c) in enumerate(state.layers):
        torch.testing.assert_close(h, h_n[k].detach(), **TOL)
        torch.testing.assert_close(c, c_n[k].detach(), **TOL)


def test_the_layout_of_the_biases_and_of_the_tied_and_gathered_weights():
    """bias_ih = b and bias_hh = 0 (GRU: [0, 0, b_hn]); a gradient export puts ∂L/∂b under both; tied
    weights are equal values in distinct tensors; a model without an embedding exports U_0ᵀ and the
    identity."""
    lstm = make(dict(cell="lstm", layers=2))
    sd = lstm.export_torch()
    for k in (0, 1):
        assert torch.equal(sd[f"rnn.bias_ih_l{k}"], lstm.params[f"layer{k}.b"])
        assert not sd[f"rnn.bias_hh_l{k}"].any()
    gru = make(dict(cell="gru"))
    sd = gru.export_torch()
    assert torch.equal(sd["rnn.bias_ih_l0"], gru.params["b"])
    assert not sd["rnn.bias_hh_l0"][: 2 * M].any()
    assert torch.equal(sd["rnn.bias_hh_l0"][2 * M :], gru.params["b_hn"])
    _, grads, _ = gru.loss_and_grads(*data(), train=False)
    g = gru.export_torch(grads)
    assert torch.equal(g["rnn.bias_ih_l0"], grads["b"])
    assert torch.equal(g["rnn.bias_hh_l0"], torch.cat((grads["b"][: 2 * M], grads["b_hn"])))
    as_params = gru.export_torch(grads, gradients=False)  # mapped like parameters
    assert not as_params["rnn.bias_hh_l0"][: 2 * M].any()

    tied = make(dict(cell="lstm", tied=True))
    sd = tied.export_torch()
    assert torch.equal(sd["encoder.weight"], sd["decoder.weight"])
    assert sd["encoder.weight"].data_ptr() != sd["decoder.weight"].data_ptr()
    assert sd["decoder.weight"].data_ptr() != tied.params["V"].data_ptr()  # copies, not views

    seed = rough(ElmanLM(V, M, dtype=torch.float64))  # the seed's model: U x^t gathered
    sd, meta = seed.export_torch(), seed.torch_metadata()
    assert torch.equal(sd["encoder.weight"], seed.params["U"].t())
    assert torch.equal(sd["rnn.weight_ih_l0"], torch.eye(M, dtype=torch.float64))
    assert meta == {"format": "pytorch-word_language_model", "rnn_type": "RNN_TANH", "ntoken": V, "ninp": M,
                    "nhid": M, "nlayers": 1, "dropout": 0.0, "tie_weights": False, "bias": True,
                    "nonlinearity": "tanh", "dtype": "float64", "frozen": ["rnn.weight_ih_l0"]}
    _, grads, _ = seed.loss_and_grads(*data())
    assert "rnn.weight_ih_l0" not in seed.export_torch(grads)
    x, _ = data(2)
    torch.testing.assert_close(seed.log_probs(x)[0], torch_twin(seed)(x).detach(), **TOL)
    assert make(dict(cell="lstm", embedding_size=0)).torch_metadata()["ninp"] == 4 * M


def test_gradients_false_on_the_parameters_is_the_plain_export():
    model = make(dict(cell="gru", layers=2))
    plain = model.export_torch()
    again = model.export_torch(dict(model.params), gradients=False)
    assert plain.keys() == again.keys() and all(torch.equal(plain[k], again[k]) for k in plain)


def test_a_float32_model_exports_float32():
    model = bptt.RNNLM(V, M, cell="lstm")
    assert {t.dtype for t in model.export_torch().values()} == {torch.float32}
    assert model.torch_metadata()["dtype"] == "float32"


REFUSED = {
    "class": (dict(cell="lstm", output="class", classes=3), "output='class'"),
    "hsm": (dict(cell="gru", output="hsm"), "output='hsm'"),
    "direct": (dict(cell="lstm", direct=1000), "direct connections"),
    "sigmoid": (dict(cell="elman", hidden_activation="sigmoid"), "hidden_activation='sigmoid'"),
    "identity": (dict(cell="elman", hidden_activation="identity"), "hidden_activation='identity'"),
    "quadratic": (dict(cell="elman", output_activation="sigmoid", loss="quadratic"), "loss='quadratic'"),
}


@pytest.mark.parametrize("kw, needle", REFUSED.values(), ids=REFUSED.keys())
def test_what_rnnmodel_cannot_express_is_refused_in_one_line(kw, needle):
    model = bptt.RNNLM(V, M, dtype=torch.float64, **kw)
    for call in (model.export_torch, model.torch_metadata):
        with pytest.raises(ValueError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_tensors_are_refused():
    model = make(dict(cell="lstm"))
    with pytest.raises(ValueError, match="gradients=True needs tensors"):
        model.export_torch(gradients=True)
    with pytest.raises(ValueError, match="tensors has no 'E'"):
        model.export_torch({k: v for k, v in model.params.items() if k != "E"})
    with pytest.raises(ValueError, match="tensors has 'X'"):
        model.export_torch({**model.params, "X": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"tensors\['W'\] has shape \(1,\)"):
        model.export_torch({**model.params, "W": torch.zeros(1)})


# -- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lstm_dir(tmp_path_factory):
    """A tiny 2-layer tied LSTM with dropout, trained by `bptt train` on a toy corpus."""
    root = tmp_path_factory.mktemp("export")
    train, valid = write_corpus(root / "train.txt", 40, 0), write_corpus(root / "valid.txt", 10, 1)
    argv = ["train", "--train", train, "--valid", valid, "--model", str(root / "m"), "--cell", "lstm", "--layers",
            "2", "--tie", "--dropout", "0.2", "--hidden", "8", "--batch", "4", "--bptt", "5", "--epochs", "1",
            "--quiet"]
    assert main(argv) == 0
    return root / "m"


def test_export_command_round_trip(lstm_dir, tmp_path, capsys):
    out, meta_path = tmp_path / "lm.safetensors", tmp_path / "lm.json"
    assert main(["export", "--model", str(lstm_dir), "--out", str(out), "--json", str(meta_path)]) == 0
    assert str(out) in capsys.readouterr().out
    model, vocab, _ = load_model(lstm_dir)
    meta = json.loads(meta_path.read_text())
    assert meta.pop("vocab") == vocab.words
    with safe_open(str(out), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "pt" and json.loads(header[METADATA_KEY]) == meta == model.torch_metadata()
    assert meta["rnn_type"] == "LSTM" and meta["nlayers"] == 2 and meta["tie_weights"] and meta["ntoken"] == len(vocab)
    state = load_file(str(out))
    expected = model.export_torch()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    # the float32 weights, run in float64 by both sides: the same log-probabilities to 1e-12
    twin = TorchRNNModel(meta, torch.float64)
    twin.load_state_dict({k: v.double() for k, v in state.items()})
    wide = bptt.RNNLM.from_config(model.config.__class__(**{**model.config.to_json(), "dtype": "float64"}),
                                  word_counts=vocab.counts)
    for name, p in wide.params.items():
        p.copy_(model.params[name])
    x = torch.randint(0, len(vocab), (7, 2))
    torch.testing.assert_close(wide.log_probs(x)[0], twin.eval()(x).detach(), **TOL)


def test_export_command_refuses_bad_input_and_writes_nothing(lstm_dir, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    cases = [
        (["--model", str(tmp_path / "absent"), "--out", str(out)], ["absent"]),
        (["--model", str(lstm_dir), "--out", str(tmp_path / "no" / "x.safetensors")], ["--out", "no directory"]),
        (["--model", str(lstm_dir), "--out", str(tmp_path)], ["--out", "is a directory"]),
        (["--model", str(lstm_dir), "--out", str(tmp_path / "x.pt")], ["--out", ".pt"]),
        (["--model", str(lstm_dir), "--out", str(lstm_dir / "model.safetensors")], ["--out", "model directory"]),
        (["--model", str(lstm_dir), "--out", str(lstm_dir / "checkpoint" / "model.safetensors")],
         ["--out", "model directory"]),  # its training state: --resume would find it torn
        (["--model", str(lstm_dir), "--out", str(lstm_dir / "metrics.jsonl")], ["--out", "model directory"]),
        (["--model", str(lstm_dir), "--out", str(lstm_dir / "checkpoint" / "torch.safetensors")],
         ["--out", "model directory"]),  # nothing goes into the run's own subdirectories
        (["--model", str(lstm_dir), "--out", str(out), "--json", str(lstm_dir / "checkpoint" / "config.json")],
         ["--json", "model directory"]),
        (["--model", str(lstm_dir), "--out", str(out), "--json", str(tmp_path / "no" / "x.json")], ["--json"]),
        (["--model", str(lstm_dir), "--out", str(out), "--json", str(out)], ["--json", "same file"]),
    ]
    for argv, needles in cases:
        assert main(["export", *argv]) == 2, argv
        one_error_line(capsys.readouterr().err, *needles)
        assert not out.exists() and not (tmp_path / "x.pt").exists()
    assert load_model(lstm_dir)  # the model directory is intact
    assert main(["train", "--resume", str(lstm_dir), "--epochs", "1", "--quiet"]) == 0  # and its state
    capsys.readouterr()
    run = tmp_path / "run"  # a kept epoch exported over its own run's model
    assert main(["train", "--train", write_corpus(tmp_path / "t.txt", 30, 0), "--valid", str(tmp_path / "t.txt"),
                 "--model", str(run), "--cell", "gru", "--hidden", "4", "--batch", "2", "--bptt", "4", "--epochs", "1",
                 "--keep-epochs", "--quiet"]) == 0
    capsys.readouterr()
    before = (run / "model.safetensors").read_bytes()
    assert main(["export", "--model", str(run / "epochs" / "epoch-1"), "--out", str(run / "model.safetensors")]) == 2
    one_error_line(capsys.readouterr().err, "--out", "run or model")
    assert (run / "model.safetensors").read_bytes() == before
    beside = lstm_dir / "torch.safetensors"  # a new file beside the model is fine
    assert main(["export", "--model", str(lstm_dir), "--out", str(beside)]) == 0 and load_model(lstm_dir)
    beside.unlink()


def test_export_command_refuses_a_class_model(tmp_path, capsys):
    words = ["<eos>", "<unk>", "a", "b", "c", "d"]
    model = bptt.RNNLM(len(words), 4, cell="gru", output="class", classes=2)
    save_model(tmp_path / "m", model, vocab=Vocab(words, [3, 1, 5, 4, 2, 1]))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(out), "--json", str(tmp_path / "m.json")]) == 2
    one_error_line(capsys.readouterr().err, str(tmp_path / "m"), "output='class'")
    assert out.read_bytes() == b"old" and not (tmp_path / "m.json").exists()


def test_export_command_writes_both_files_or_neither(lstm_dir, tmp_path, capsys, monkeypatch):
    """--out and --json are written all or nothing: a failure writing either (here the second temp file:
    a full disk) leaves an existing --out as it was, writes no --json and leaves no temp file; a --json
    name too long for its temp file is refused up front, naming --json."""
    import bptt.files as files

    out, meta = tmp_path / "lm.safetensors", tmp_path / "lm.json"
    out.write_bytes(b"OLD")
    real, calls = files.tempfile.mkstemp, []

    def failing(*args, **kwargs):
        calls.append(kwargs.get("prefix"))
        if len(calls) == 2:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", failing)
    assert main(["export", "--model", str(lstm_dir), "--out", str(out), "--json", str(meta)]) == 2
    one_error_line(capsys.readouterr().err, "No space left")
    assert len(calls) == 2 and out.read_bytes() == b"OLD" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    monkeypatch.setattr(files.tempfile, "mkstemp", real)
    long_name = tmp_path / ("j" * 245 + ".json")
    assert main(["export", "--model", str(lstm_dir), "--out", str(out), "--json", str(long_name)]) == 2
    one_error_line(capsys.readouterr().err, "--json", "too long")
    assert out.read_bytes() == b"OLD"
    assert main(["export", "--model", str(lstm_dir), "--out", str(out), "--json", str(meta)]) == 0
    assert out.read_bytes() != b"OLD" and json.loads(meta.read_text())["rnn_type"] == "LSTM"
