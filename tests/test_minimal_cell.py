"""A cell added from outside the package (tests/minimal_cell.py, registered with register_cell for the
duration of each test), with nothing under src/ changed for it:

(a) its gradients through the whole model (LanguageModel, engine.sweep.loss_and_grads) against finite
    differences and an autograd model written here, with full BPTT and truncated, one and two layers,
    with and without a mask;
(b) a mutant of its backward (one term dropped) is rejected by those same checks;
(c) it trains one epoch from the command line, and eval, score and generate run on the saved model;
(d) BPTT(k1, k2) gives, block by block, the autograd gradients over the same window.

The autograd model (reference_step, reference_loss) shares no code with the cell: it is the cell's
equations written one step at a time, on one-hot inputs, with a full softmax and cross-entropy.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as nnf

import minimal_cell
from bptt.cli import main
from bptt.engine.cells import CELLS, join_caches, tail_cache
from bptt.engine.inputs import embed_backward, embed_forward
from bptt.engine.network import State
from bptt.engine.sweep import loss_and_grads, sequence_loss
from bptt.engine.tbptt import TruncatedBPTT
from bptt.model import RNNLM, LanguageModel, ModelConfig
from bptt.storage.checkpoint import CheckpointError, load_checkpoint
from bptt.storage.saved_model import load_model
from bptt.training.resources import estimate_training_memory
from bptt.training.trainer import STATE_DIR, Trainer, TrainConfig
from bptt import verify
from bptt.verify import relative_error
from conftest import max_rel_error, write_corpus
from minimal_cell import MinimalGatedCell, registered

NAME = MinimalGatedCell.name
FD_TOLERANCE, AUTOGRAD_TOLERANCE, REJECTED = 1e-6, 1e-10, 1e-3


@pytest.fixture
def cell():
    """The cell's registry name, registered for the test and removed after it."""
    with registered(MinimalGatedCell) as name:
        yield name


# -- the autograd model ------------------------------------------------------------------------------------


def reference_step(p: dict, x: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B,n), c^{t-1} (B,m) -> (h^t, c^t), the equations as they read."""
    m = p["v"].shape[0]
    a = x @ p["U"].T
    if "b" in p:
        a = a + p["b"]
    f = torch.sigmoid(a[:, :m] + p["v"] * c_prev)
    x_tilde = torch.tanh(a[:, m:])
    c = f * c_prev + (1 - f) * x_tilde
    return torch.tanh(c), c


def reference_loss(params: dict, layers: int, inputs, targets, c0: list, truncation=None, weights=None):
    """−Σ_t w^t ln softmax(V h^t + c)_{y^t} of a stack of the cell -> (loss, [(h^T, c^T) per layer]).

    truncation=k, per layer: the output of step t is recomputed over its last k+1 steps from the true
    memory before them, taken as a constant, so that every error reaching a layer goes back through at
    most k of that layer's recurrent connections (the engine runs each layer's backward with k).
    """
    T, B = inputs.shape
    prefixes = [""] if layers == 1 else [f"layer{k}." for k in range(layers)]
    xs = [nnf.one_hot(inputs[t], params["V"].shape[0]).to(params["V"].dtype) for t in range(T)]
    final = []
    for k, prefix in enumerate(prefixes):
        p = {n: params[prefix + n] for n in ("U", "v", "b") if prefix + n in params}
        with torch.no_grad():  # the true memories c^0 .. c^T
            cs = [c0[k]]
            for t in range(T):
                cs.append(reference_step(p, xs[t], cs[-1])[1])
        outs = []
        if truncation is None:
            c = c0[k]
            for t in range(T):
                h, c = reference_step(p, xs[t], c)
                outs.append(h)
        else:
            for t in range(T):
                start = max(0, t - truncation)
                c = cs[start]
                for tau in range(start, t + 1):
                    h, c = reference_step(p, xs[tau], c)
                outs.append(h)
        final.append((torch.tanh(cs[-1]), cs[-1]))
        xs = outs
    total = torch.zeros((), dtype=params["V"].dtype)
    for t in range(T):
        g = xs[t] @ params["V"].T + (params["c"] if "c" in params else 0)
        per = -torch.log_softmax(g, dim=-1).gather(1, targets[t].unsqueeze(1)).squeeze(1)
        total = total + (per if weights is None else per * weights[t]).sum()
    return total, final


def autograd_grads(params, layers, inputs, targets, c0, truncation=None, weights=None):
    """(loss, {name: ∂loss/∂name}) of reference_loss, by autograd."""
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        total, _ = reference_loss(leaves, layers, inputs, targets, c0, truncation, weights)
        grads = torch.autograd.grad(total, list(leaves.values()))
    return total.detach(), dict(zip(leaves, grads))


def finite_differences(model, inputs, targets, state, weights=None, eps=1e-6) -> dict:
    """Central differences of the engine's forward loss (sweep.sequence_loss), one element at a time."""
    return verify.finite_differences(
        model.params, lambda: sequence_loss(model.net, model.params, inputs, targets, state, weights=weights), eps)


# -- cases -------------------------------------------------------------------------------------------------


def random_model(name: str, layers: int, *, V=7, m=3, bias=True, seed=0, scale=0.8) -> LanguageModel:
    """A float64 LanguageModel of the cell with every parameter (biases and v included) uniform in ±scale."""
    config = ModelConfig(vocab_size=V, hidden_size=m, cell=name, layers=layers, bias=bias, dtype="float64")
    model = LanguageModel(config, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    for p in model.params.values():
        p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * scale)
    return model


def random_case(model, T=6, B=3, seed=0, masked=False):
    """inputs, targets (T,B), a carried State (random c^0, h^0 = tanh c^0 per layer), its memories, weights."""
    g = torch.Generator().manual_seed(1000 + seed)
    V, m, layers = model.vocab_size, model.hidden_size, len(model.net.cells)
    x, y = torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)
    c0 = [torch.rand(B, m, generator=g, dtype=torch.float64) - 0.5 for _ in range(layers)]
    state = State(tuple((torch.tanh(c), c) for c in c0))
    weights = (torch.rand(T, B, generator=g, dtype=torch.float64) < 0.7).double() if masked else None
    return x, y, state, c0, weights


def engine_errors(model, x, y, state, c0, weights=None, truncation=None, fd=True):
    """(relative error against finite differences or None, against autograd) of the engine's gradients."""
    loss, grads, _ = loss_and_grads(model.net, model.params, x, y, state, truncation=truncation, weights=weights)
    layers = len(model.net.cells)
    ref_loss, ref = autograd_grads(model.params, layers, x, y, c0, truncation, weights)
    assert abs(float(loss - ref_loss)) <= 1e-12 * abs(float(ref_loss))
    fd_error = max_rel_error(grads, finite_differences(model, x, y, state, weights)) if fd else None
    return fd_error, max_rel_error(grads, ref)


# -- the cell on its own -----------------------------------------------------------------------------------


@pytest.mark.parametrize("truncation", [None, 0, 1, 3])
def test_the_pair_against_autograd_accumulating_into_grads(truncation):
    T, B, m, V = 5, 3, 4, 6
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1
    cell = MinimalGatedCell()
    params = {"U": rand(2 * m, V), "v": rand(m), "b": rand(2 * m)}
    inputs, c0, dH = torch.randint(0, V, (T, B), generator=g), rand(B, m) / 2, rand(T, B, m)
    state0 = (torch.tanh(c0), c0)
    H, (h_last, c_last), cache = cell.forward(params, embed_forward(params["U"], inputs), state0)
    assert torch.equal(h_last, H[-1]) and torch.equal(cell.state_at(cache, 2)[0], H[2])
    assert torch.equal(c_last, cell.state_at(cache, T - 1)[1])
    prior = {k: rand(*p.shape) for k, p in params.items() if k != "U"}
    grads = {"U": torch.zeros_like(params["U"]), **{k: t.clone() for k, t in prior.items()}}
    dA = cell.backward(params, cache, dH, grads, truncation)
    assert dA.shape == (T, B, 2 * m)
    assert torch.equal(grads["U"], torch.zeros_like(grads["U"]))  # the input weights are the input term's
    embed_backward(inputs, dA, grads["U"])
    for k in prior:
        grads[k] = grads[k] - prior[k]  # what backward added (+=) to what was there
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    xs = [nnf.one_hot(inputs[t], V).double() for t in range(T)]
    with torch.no_grad():  # the true memories, where a truncated path starts
        cs = [c0]
        for t in range(T):
            cs.append(reference_step(params, xs[t], cs[-1])[1])
    with torch.enable_grad():
        total = torch.zeros(())
        for t in range(T):
            start = 0 if truncation is None else max(0, t - truncation)
            c = cs[start]
            for tau in range(start, t + 1):
                h, c = reference_step(leaves, xs[tau], c)
            total = total + (h * dH[t]).sum()
        ref = torch.autograd.grad(total, list(leaves.values()))
    for k, want in zip(leaves, ref):
        assert relative_error(grads[k], want) <= 1e-12, k


def test_caches_join_and_cut_along_time():
    """Two consecutive forwards' caches joined are one forward's; a cut starts from state_at."""
    T, B, m, V = 7, 2, 3, 5
    g = torch.Generator().manual_seed(4)
    cell = MinimalGatedCell()
    params = {"U": torch.randn(2 * m, V, generator=g), "v": torch.randn(m, generator=g),
              "b": torch.randn(2 * m, generator=g)}
    inputs = torch.randint(0, V, (T, B), generator=g)
    zero = cell.initial_state(params, B)
    assert len(zero) == 2 and zero[0].data_ptr() != zero[1].data_ptr() and not zero[1].any()
    _, _, whole = cell.forward(params, embed_forward(params["U"], inputs), zero)
    _, middle, first = cell.forward(params, embed_forward(params["U"], inputs[:3]), zero)
    _, _, second = cell.forward(params, embed_forward(params["U"], inputs[3:]), middle)
    joined = join_caches(first, second)
    assert joined.steps.keys() == whole.steps.keys() == {"H", "C", "G"}
    for k in whole.steps:
        torch.testing.assert_close(joined.steps[k], whole.steps[k], rtol=0, atol=1e-15)
    tail = tail_cache(cell, whole, 4)
    assert tail.length == 4 and all(torch.equal(a, b) for a, b in zip(tail.state0, cell.state_at(whole, 2)))


# -- (a) the whole model against finite differences and autograd -------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_model_gradients_match_finite_differences_and_autograd(cell, layers, masked):
    model = random_model(cell, layers)
    x, y, state, c0, weights = random_case(model, masked=masked)
    fd_error, autograd_error = engine_errors(model, x, y, state, c0, weights)
    assert fd_error <= FD_TOLERANCE and autograd_error <= AUTOGRAD_TOLERANCE, (fd_error, autograd_error)


def test_model_without_biases(cell):
    model = random_model(cell, 2, bias=False, seed=1)
    assert not any(name.endswith("b") or name == "c" for name in model.params)
    x, y, state, c0, weights = random_case(model, seed=1, masked=True)
    fd_error, autograd_error = engine_errors(model, x, y, state, c0, weights)
    assert fd_error <= FD_TOLERANCE and autograd_error <= AUTOGRAD_TOLERANCE, (fd_error, autograd_error)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("truncation", [0, 1, 2, 5])  # T = 6: 5 is full BPTT
def test_truncated_gradients_match_autograd(cell, layers, truncation):
    model = random_model(cell, layers, seed=2)
    x, y, state, c0, weights = random_case(model, seed=2, masked=True)
    _, autograd_error = engine_errors(model, x, y, state, c0, weights, truncation, fd=False)
    assert autograd_error <= AUTOGRAD_TOLERANCE
    if truncation < 5:  # the truncation changes the gradient: the comparison sees it
        _, untruncated = autograd_grads(model.params, layers, x, y, c0, None, weights)
        _, grads, _ = loss_and_grads(model.net, model.params, x, y, state, truncation=truncation, weights=weights)
        assert max_rel_error(grads, untruncated) > REJECTED


# -- (b) a mutant of the backward is rejected -------------------------------------------------------------


def drop_peephole_path(monkeypatch):
    """J^t = ∂c^t/∂c^{t-1} without (c^{t-1} − x̃^t) f^t (1 − f^t) v: only the leak f^t is left."""
    monkeypatch.setattr(minimal_cell, "recurrent_jacobian", lambda Fg, gate, v: Fg.clone())


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("truncation", [None, 2])
def test_dropped_peephole_path_is_rejected(cell, monkeypatch, layers, truncation):
    model = random_model(cell, layers, seed=5)
    x, y, state, c0, weights = random_case(model, seed=5)
    intact = engine_errors(model, x, y, state, c0, truncation=truncation, fd=truncation is None)
    drop_peephole_path(monkeypatch)
    fd_error, autograd_error = engine_errors(model, x, y, state, c0, truncation=truncation, fd=truncation is None)
    assert autograd_error > REJECTED and intact[1] <= AUTOGRAD_TOLERANCE, (autograd_error, intact)
    if truncation is None:
        assert fd_error > REJECTED and intact[0] <= FD_TOLERANCE, (fd_error, intact)


def test_dropped_peephole_path_is_invisible_with_one_step(cell, monkeypatch):
    """With T = 1 no error crosses a recurrent connection: the mutant passes, so the checks are specific."""
    drop_peephole_path(monkeypatch)
    model = random_model(cell, 2, seed=5)
    x, y, state, c0, _ = random_case(model, T=1, seed=5)
    fd_error, autograd_error = engine_errors(model, x, y, state, c0)
    assert fd_error <= FD_TOLERANCE and autograd_error <= AUTOGRAD_TOLERANCE


# -- (d) BPTT(k1, k2) on a stream --------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k1, k2, truncation", [(5, 5, None), (3, 8, None), (4, 9, 2), (5, 5, 0), (1, 4, None)])
def test_blocks_match_autograd_over_their_windows(cell, layers, k1, k2, truncation):
    N, B, V, m = 23, 2, 9, 4  # 23 is not a multiple of k1: the last block is short
    model = random_model(cell, layers, V=V, m=m, seed=6, scale=0.9)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randint(0, V, (N, B), generator=g), torch.randint(0, V, (N, B), generator=g)
    engine = TruncatedBPTT(model, k1, k2, truncation)
    zero = [torch.zeros(B, m, dtype=torch.float64) for _ in range(layers)]
    for start in range(0, N, k1):
        end = min(start + k1, N)
        loss, grads = engine.step(x[start:end], y[start:end])
        window_start = max(0, start - (k2 - k1))  # the block plus k2 − k1 steps of history
        if window_start:  # the memories the window starts from (the weights do not change here)
            c_start = [c for _, c in reference_loss(model.params, layers, x[:window_start], y[:window_start], zero)[1]]
        else:
            c_start = zero
        mask = torch.zeros(end - window_start, B, dtype=torch.float64)
        mask[start - window_start:] = 1  # errors come from the block's positions only
        ref_loss, ref = autograd_grads(model.params, layers, x[window_start:end], y[window_start:end], c_start,
                                       truncation, mask)
        assert abs(float(loss - ref_loss)) <= 1e-12 * float(ref_loss) and max_rel_error(grads, ref) <= 1e-10
        _, final = reference_loss(model.params, layers, x[window_start:end], y[window_start:end], c_start)
        for (h, c), (want_h, want_c) in zip(engine.state.layers, final):  # the carried state, (h, c) per layer
            torch.testing.assert_close(h, want_h, rtol=0, atol=1e-12)
            torch.testing.assert_close(c, want_c, rtol=0, atol=1e-12)


def test_carried_state_and_history_survive_state_dict(cell):
    """A two-tensor state and a three-tensor cache in the engine's state_dict, and back."""
    model = random_model(cell, 2, V=9, m=4, seed=7)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 9, (12, 2), generator=g), torch.randint(0, 9, (12, 2), generator=g)
    first = TruncatedBPTT(model, 3, 7)
    for start in range(0, 9, 3):
        first.step(x[start:start + 3], y[start:start + 3])
    saved = first.state_dict()
    assert {"state.1.0", "state.1.1", "hist.1.state0.1", "hist.1.H", "hist.1.C", "hist.1.G"} <= saved.keys()
    second = TruncatedBPTT(model, 3, 7)
    second.load_state_dict(saved)
    loss_a, grads_a = first.step(x[9:], y[9:])
    loss_b, grads_b = second.step(x[9:], y[9:])
    assert float(loss_a) == float(loss_b) and torch.equal(grads_a.data, grads_b.data)


# -- (c) the command line and the trainer ------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["1", "2"])
def test_trains_from_the_command_line_then_eval_score_generate(tmp_path, capsys, layers):
    assert NAME not in CELLS  # nothing registered it outside the tests that ask for it
    train_txt = write_corpus(tmp_path / "train.txt", 150, 0)
    valid_txt = write_corpus(tmp_path / "valid.txt", 20, 1)
    model_dir = str(tmp_path / "m")
    argv = ["train", "--train", train_txt, "--valid", valid_txt, "--model", model_dir, "--cell", NAME,
            "--layers", layers, "--hidden", "8", "--batch", "4", "--bptt", "5", "--epochs", "1", "--quiet"]
    with registered(MinimalGatedCell):
        assert main(argv) == 0
        assert "finished" in capsys.readouterr().out
        model, vocab, saved = load_model(model_dir)
        assert type(model) is RNNLM and model.config.cell == NAME and model.config.layers == int(layers)
        assert all(isinstance(c, MinimalGatedCell) for c in model.net.cells)
        prefixes = [""] if layers == "1" else ["layer0.", "layer1."]
        assert set(model.params) == {p + n for p in prefixes for n in ("U", "v", "b")} | {"V", "c"}
        assert all(model.params[p + "U"].shape[0] == 16 for p in prefixes)  # G·m rows: two gates, m = 8
        assert main(["eval", "--model", model_dir, "--test", valid_txt, "--json"]) == 0
        evaluation = json.loads(capsys.readouterr().out)
        assert evaluation["perplexity"] == pytest.approx(saved["valid"]["perplexity"], rel=1e-9)
        assert evaluation["perplexity"] < len(vocab)  # better than uniform over the vocabulary
        assert main(["score", "--model", model_dir, "--text", valid_txt]) == 0
        scores = [float(s) for s in capsys.readouterr().out.split()]
        assert len(scores) == 20 and all(s < 0 for s in scores)
        assert main(["generate", "--model", model_dir, "--words", "30", "--seed", "3"]) == 0
        words = capsys.readouterr().out.split()
        assert words and set(words) <= set(vocab.words)
    # outside the block the registry is as it was: the command line and the loader no longer know the cell
    assert NAME not in CELLS
    with pytest.raises(CheckpointError, match="cell"):
        load_model(model_dir)
    assert main([*argv[:6], str(tmp_path / "other"), *argv[7:]]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_resume_is_exact(cell, tmp_path):
    """Train 2N steps == train N, stop, resume, train N, with the cell's two-tensor state and cached steps
    (k2 > k1: a history is carried) in the checkpoint."""
    corpus = write_corpus(tmp_path / "train.txt", 60, 0), write_corpus(tmp_path / "valid.txt", 15, 1)

    def config(directory):
        return TrainConfig.from_options(train=corpus[0], valid=corpus[1], model=str(directory), cell=cell, layers=2,
                                        hidden_size=6, batch=4, bptt=3, bptt_block=2, optimizer="sgd", epochs=3,
                                        lr=0.5, progress=False)

    straight = Trainer(config(tmp_path / "a"))
    N = sum(1 for _ in straight._batches()) + 3  # the stop falls in the second epoch
    straight.run(max_steps=2 * N)
    first = Trainer(config(tmp_path / "b"))
    assert not first.run(max_steps=N).finished
    resumed = Trainer.resume(tmp_path / "b", progress=False)
    assert resumed.global_step == N
    resumed.run(max_steps=2 * N)
    a, _ = load_checkpoint(tmp_path / "a" / STATE_DIR)
    b, _ = load_checkpoint(tmp_path / "b" / STATE_DIR)
    assert {"engine.state.1.1", "engine.hist.1.C", "engine.hist.1.G", "param.layer1.v"} <= a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tying_and_the_memory_guard_see_two_gates(cell):
    """U is (2m, V), not Vᵀ: tying is refused; the memory estimate reads the cell's cache_floats."""
    with pytest.raises(ValueError, match="tied"):
        LanguageModel(ModelConfig(vocab_size=7, hidden_size=3, cell=cell, tied=True))
    config = ModelConfig(vocab_size=100, hidden_size=10, cell=cell, layers=2)
    estimate = estimate_training_memory(config, batch=4, k1=5)
    assert estimate.parts["activations"] == MinimalGatedCell.cache_floats * 2 * 5 * 4 * 10 * 4


def test_a_cell_may_set_its_own_starting_values_and_may_not_reuse_a_name(tmp_path, capsys):
    """Cell.initialize runs after the default draw (here: the gate bias at 1, like a forget-gate bias);
    a cell parameter named like the output layer's is refused, not silently replaced; --activation is
    refused for a cell that has no hidden activation."""

    class Initialized(MinimalGatedCell):
        name = "minimal_gated_init"

        def initialize(self, params, init_range, generator):
            params["b"][: params["v"].shape[0]] = 1.0  # the gate half of b

    class Clashing(MinimalGatedCell):
        name = "minimal_gated_clash"

        @staticmethod
        def param_shapes(input_size, hidden_size, bias):
            shapes = MinimalGatedCell.param_shapes(input_size, hidden_size, bias)
            shapes["c"] = shapes.pop("v")  # the output layer's bias is "c" too
            return shapes

    with registered(Initialized) as name:
        model = LanguageModel(ModelConfig(vocab_size=7, hidden_size=3, cell=name), seed=1)
        assert torch.equal(model.params["b"][:3], torch.ones(3)) and torch.equal(model.params["b"][3:], torch.zeros(3))
    with registered(Initialized), registered(MinimalGatedCell):
        a = LanguageModel(ModelConfig(vocab_size=7, hidden_size=3, cell="minimal_gated_init"), seed=1)
        b = LanguageModel(ModelConfig(vocab_size=7, hidden_size=3, cell=NAME), seed=1)
        for key in ("U", "v", "V"):  # the same default draw before the cell's own values
            assert torch.equal(a.params[key], b.params[key]), key
    with registered(Clashing) as name:
        with pytest.raises(ValueError, match="'c'.*rename"):
            LanguageModel(ModelConfig(vocab_size=7, hidden_size=3, cell=name))
    train_txt = write_corpus(tmp_path / "t.txt", 20, 0)
    with registered(MinimalGatedCell):
        argv = ["train", "--train", train_txt, "--valid", train_txt, "--model", str(tmp_path / "m"), "--cell", NAME,
                "--activation", "relu", "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--activation" in err and NAME in err
