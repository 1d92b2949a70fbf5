"""The LSTM and GRU cells, the embedding and dropout (issue 17): the whole network's gradients against
three independent references, and mutants of the engine rejected by them.

(a) torch.nn.LSTM / GRU / RNN with an embedding lookup and a linear output layer, through autograd
    (float64, ≤ 1e-12): the gradients, the loss and the final state (h_n, c_n);
(b) the autograd model of tests/reference_rnn.py, written from the docstrings (≤ 1e-12);
(c) central finite differences of the engine's own forward (≤ 1e-6);
(d) truncation 0, 1, 2 against the reference truncated the same way (per layer, Network.backward);
(e) BPTT(k1, k2) (TruncatedBPTT) block by block against the reference over the same window, with
    dropout masks drawn from a fixed generator.
Every case has a carried state, random weights and biases, and frozen dropout masks (standard or
variational) where it has dropout. Sizes are tiny (V = 7, m = 3, T ≤ 6, B ≤ 3): the file runs in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import bptt.engine.cells.gru as gru
import bptt.engine.cells.lstm as lstm
import bptt.engine.network as network
from bptt.engine import native
from bptt.engine.cells import CellCache
from bptt.engine.network import Network, State
from bptt.engine.stream import Stream
from bptt.engine.sweep import loss_and_grads, output_loss
from bptt.engine.tbptt import TruncatedBPTT
from bptt.data import EOS, UNK, Vocab
from bptt.evaluation import dynamic_stream_nats, stream_nats
from bptt.model import LanguageModel, ModelConfig
from bptt.sampling import sample
from bptt.verify import finite_differences, relative_error
from reference_rnn import Spec, reference_grads, reference_loss, torch_nn_grads

V, M = 7, 3
EXACT, FD_TOLERANCE, REJECTED = 1e-12, 1e-6, 1e-3
DROPOUT = {"none": {}, "standard": {"dropout": 0.4, "dropout_embedding": 0.3},
           "variational": {"dropout": 0.4, "dropout_embedding": 0.3, "variational": True}}
# how the first layer reads the words: an embedding of size m (PyTorch's), tied to the output layer's V,
# of another size e = 4 (and no biases in the model), or no embedding (A_0 = U x^t, a gather)
INPUTS = {"embedding": {}, "tied": {"tied": True}, "e4-nobias": {"embedding_size": 4, "bias": False},
          "onehot": {"embedding_size": 0}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread. On a busy machine OpenMP's hand-offs cost milliseconds per
    operation (a (10,7) softmax took 15 ms with two threads, 0.1 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- cases ---------------------------------------------------------------------------------------------------


def build(cell: str, layers: int = 1, seed: int = 0, scale: float = 0.8, **options) -> LanguageModel:
    """A float64 model with every parameter (biases too) uniform in ±scale."""
    model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=M, cell=cell, layers=layers, dtype="float64",
                                      **options), seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    for p in model.params.values():
        p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * scale)
    return model


@dataclass
class Case:
    x: torch.Tensor
    y: torch.Tensor
    state0: list  # per layer the cell's state tuple
    masks: dict | None
    weights: torch.Tensor | None

    @property
    def state(self) -> State:
        return State(tuple(tuple(s) for s in self.state0))


def make_case(model: LanguageModel, T: int = 5, B: int = 2, seed: int = 0, weighted: bool = False) -> Case:
    """Random words, a random carried state and, if the model has dropout, masks drawn for the block."""
    g = torch.Generator().manual_seed(1000 + seed)
    x, y = torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)
    parts = 2 if model.config.cell == "lstm" else 1
    state0 = [tuple(torch.rand(B, M, generator=g, dtype=torch.float64) - 0.5 for _ in range(parts))
              for _ in range(model.config.layers)]
    masks = model.net.draw_masks(T, B, g, dtype=torch.float64, device="cpu")
    weights = (torch.rand(T, B, generator=g, dtype=torch.float64) < 0.7).double() if weighted else None
    return Case(x, y, state0, masks, weights)


def engine(model: LanguageModel, c: Case, truncation: int | None = None):
    """(loss, grads, state after the block) of one sweep of the engine."""
    return loss_and_grads(model.net, model.params, c.x, c.y, c.state, truncation=truncation, weights=c.weights,
                          masks=c.masks)


def reference(model: LanguageModel, c: Case, truncation: int | None = None):
    return reference_grads(Spec.of(model.config), model.params, c.x, c.y, c.state0, masks=c.masks,
                           weights=c.weights, truncation=truncation)


def engine_fd(model: LanguageModel, c: Case, names=None) -> dict:
    """Central differences of the engine's forward loss with the case's masks, for every parameter or
    for those named (a mutant's check needs only the gradients it changes: fewer forwards)."""
    def loss():
        H, _, _ = model.net.forward(model.params, c.x, c.state, c.masks)
        return output_loss(model.net.output, model.params, H, c.y, weights=c.weights)

    params = model.params if names is None else {k: model.params[k] for k in names}
    return finite_differences(params, loss)


def max_error(grads: dict, ref: dict) -> float:
    assert set(grads) == set(ref), (set(grads), set(ref))
    return max(relative_error(grads[k], ref[k]) for k in grads)


def state_error(got: State | list, want: list) -> float:
    layers = got.layers if isinstance(got, State) else got
    assert len(layers) == len(want)
    return max(relative_error(a, b) for la, lb in zip(layers, want) for a, b in zip(la, lb, strict=True))


def torch_applies(model: LanguageModel, c: Case) -> bool:
    """torch.nn has no module for a mask on U x^t (input dropout without an embedding)."""
    return not (c.masks and "input" in c.masks and not model.config.embedding)


GRID = [(cell, layers, inputs, drop) for cell in ("lstm", "gru") for layers in (1, 2) for inputs in INPUTS
        for drop in DROPOUT]
ELMAN = [("elman", 1, "onehot", "standard"), ("elman", 2, "tied-onehot", "variational"),
         ("elman", 2, "e4-nobias", "standard")]


def grid_model(cell, layers, inputs, drop, seed=0) -> LanguageModel:
    options = {"tied": True, "embedding_size": 0} if inputs == "tied-onehot" else INPUTS[inputs]
    return build(cell, layers, seed=seed, **options, **DROPOUT[drop])


# -- (a), (b), (c): one sweep --------------------------------------------------------------------------------


@pytest.mark.parametrize("cell, layers, inputs, drop", GRID + ELMAN, ids=lambda v: str(v))
def test_gradients_match_torch_nn_the_reference_and_finite_differences(cell, layers, inputs, drop):
    model = grid_model(cell, layers, inputs, drop)
    c = make_case(model, weighted=layers == 2)
    assert (c.masks is None) == (drop == "none")
    loss, grads, new_state = engine(model, c)
    ref_loss, ref, ref_final = reference(model, c)
    assert abs(float(loss - ref_loss)) <= EXACT * abs(float(ref_loss))
    assert max_error(grads, ref) <= EXACT
    assert state_error(new_state, ref_final) <= EXACT
    if torch_applies(model, c):
        nn_loss, nn_grads, nn_final, _ = torch_nn_grads(Spec.of(model.config), model.params, c.x, c.y, c.state0,
                                                        masks=c.masks, weights=c.weights)
        assert abs(float(loss - nn_loss)) <= EXACT * abs(float(nn_loss))
        assert max_error(grads, nn_grads) <= EXACT
        assert state_error(new_state, nn_final) <= EXACT  # h_n (and c_n) of torch.nn
    assert max_error(grads, engine_fd(model, c)) <= FD_TOLERANCE


def test_the_grid_covers_what_it_claims():
    """Names and shapes of the parameters the grid's inputs give (E, tying, e ≠ m, no biases, no U_0)."""
    assert set(grid_model("lstm", 1, "embedding", "none").params) == {"E", "U", "W", "b", "V", "c"}
    tied = grid_model("gru", 2, "tied", "none").params
    assert "E" not in tied and tied["layer0.U"].shape == (3 * M, M) and "layer0.b_hn" in tied
    e4 = grid_model("lstm", 2, "e4-nobias", "none").params
    assert e4["E"].shape == (V, 4) and e4["layer0.U"].shape == (4 * M, 4) and not any("b" in k for k in e4)
    assert grid_model("gru", 1, "onehot", "none").params["U"].shape == (3 * M, V)
    assert set(grid_model("elman", 2, "tied-onehot", "none").params) == {
        "layer0.W", "layer0.b", "layer1.U", "layer1.W", "layer1.b", "V", "c"}
    masks = make_case(grid_model("lstm", 2, "onehot", "standard")).masks
    assert {k: tuple(v.shape) for k, v in masks.items()} == {"input": (5, 2, 4 * M), "layer1": (5, 2, M),
                                                             "output": (5, 2, M)}
    assert (masks["input"] == 0).any() and (masks["output"] == 0).any()  # something is dropped


# -- (d) truncation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_truncated_gradients_match_the_truncated_reference(cell, layers):
    model = build(cell, layers, seed=2, **DROPOUT["standard"])
    c = make_case(model, T=6, seed=2, weighted=True)
    _, full, _ = reference(model, c)
    for truncation in (0, 1, 2):
        _, grads, _ = engine(model, c, truncation)
        _, ref, _ = reference(model, c, truncation)
        assert max_error(grads, ref) <= EXACT, truncation
        assert max_error(grads, full) > REJECTED, truncation  # the truncation matters: the check can see it
    for truncation in (5, 9):  # k >= T − 1: full BPTT
        assert max_error(engine(model, c, truncation)[1], full) <= EXACT


# -- (e) BPTT(k1, k2) on a stream ----------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k1, k2, truncation, drop", [(3, 5, None, "standard"), (2, 5, 1, "variational"),
                                                      (3, 3, None, "variational"), (2, 4, None, "none")])
def test_blocks_match_the_reference_over_their_windows(cell, layers, k1, k2, truncation, drop):
    N, B = 8, 2  # not a multiple of k1 = 3: the last block is short
    model = build(cell, layers, seed=6, **DROPOUT[drop])
    spec = Spec.of(model.config)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randint(0, V, (N, B), generator=g), torch.randint(0, V, (N, B), generator=g)
    bptt = TruncatedBPTT(model, k1, k2, truncation, generator=torch.Generator().manual_seed(60))
    replay = torch.Generator().manual_seed(60)  # the same draws, block by block, for the reference
    zero = [tuple(torch.zeros(B, M, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1))] * layers
    drawn: list[dict] = []
    for start in range(0, N, k1):
        end = min(start + k1, N)
        loss, grads = bptt.step(x[start:end], y[start:end])
        block_masks = model.net.draw_masks(end - start, B, replay, dtype=torch.float64, device="cpu")
        drawn.append(block_masks or {})
        masks = {site: torch.cat([d[site] for d in drawn]) for site in drawn[0]} or None
        window = max(0, start - (k2 - k1))  # the block and k2 − k1 steps of history before it
        with torch.no_grad():
            state = reference_loss(spec, model.params, x[:window], y[:window], zero,
                                   masks=_cut(masks, 0, window))[1] if window else zero
        weights = torch.zeros(end - window, B, dtype=torch.float64)
        weights[start - window:] = 1  # errors come from the block's positions only
        ref_loss, ref, final = reference_grads(spec, model.params, x[window:end], y[window:end], state,
                                               masks=_cut(masks, window, end), weights=weights, truncation=truncation)
        assert abs(float(loss - ref_loss)) <= EXACT * float(ref_loss)
        assert max_error(grads, ref) <= 1e-11
        assert state_error(bptt.state, final) <= EXACT  # the carried state, (h, c) per layer for the LSTM


def _cut(masks: dict | None, start: int, end: int) -> dict | None:
    return None if masks is None else {site: m[start:end] for site, m in masks.items()}


# -- the forward, the starting values, the masks -------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_forward_is_torch_nn_with_a_stack_in_one_module(cell):
    """No masks: torch.nn's module of num_layers = 2 gives the engine's top outputs and h_n (c_n)."""
    model = build(cell, 2, seed=3)
    c = make_case(model, T=6, B=3, seed=3)
    H, state, _ = model.net.forward(model.params, c.x, c.state)
    _, _, final, top = torch_nn_grads(Spec.of(model.config), model.params, c.x, c.y, c.state0)
    assert relative_error(H, top) <= EXACT and state_error(state, final) <= EXACT


def test_forget_bias_starts_the_forget_gate_bias_of_every_layer():
    """b = [b_i ; b_f ; b_g ; b_o]: forget_bias fills b_f (PyTorch's second block) in every layer, nothing else."""
    for forget_bias in (1.0, -0.5):
        model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=M, cell="lstm", layers=2, forget_bias=forget_bias,
                                          dtype="float64"), seed=0)
        for k in range(2):
            b = model.params[f"layer{k}.b"]
            assert torch.equal(b[M:2 * M], torch.full((M,), forget_bias, dtype=torch.float64)), (k, b)
            assert not b[:M].any() and not b[2 * M:].any()
    default = LanguageModel(ModelConfig(vocab_size=V, hidden_size=M, cell="lstm", dtype="float64"), seed=0)
    assert not default.params["b"].any()  # PyTorch's: 0
    without = LanguageModel(ModelConfig(vocab_size=V, hidden_size=M, cell="lstm", forget_bias=1.0, bias=False), seed=0)
    assert "b" not in without.params


@pytest.mark.parametrize("variational", [False, True])
def test_masks_are_inverted_dropout_locked_in_time_when_variational(variational):
    """Entries 0 or 1/(1 − p); variational: one mask per stream for the whole block (equal at every
    step, different across streams and from block to block); standard: different at every step."""
    m = 16  # wide sites: two independent masks are equal with probability ≤ 0.6^16
    model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=m, cell="lstm", layers=2, dropout=0.4,
                                      dropout_embedding=0.3, variational=variational), seed=0)
    g = torch.Generator().manual_seed(5)
    T, B = 4, 3
    first = model.net.draw_masks(T, B, g, dtype=torch.float32, device="cpu")
    second = model.net.draw_masks(T, B, g, dtype=torch.float32, device="cpu")
    assert set(first) == {"input", "layer1", "output"}
    for site, p in (("input", 0.3), ("layer1", 0.4), ("output", 0.4)):
        mask = first[site]
        assert mask.shape == (T, B, m)
        values = mask.unique().tolist()
        assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / (1 - p))
        same_in_time = all(torch.equal(mask[t], mask[0]) for t in range(T))
        assert same_in_time == variational, site
        assert all(not torch.equal(mask[:, a], mask[:, b]) for a in range(B) for b in range(a)), site
        assert not torch.equal(mask, second[site])  # a new block, new masks
    rates = torch.cat([model.net.draw_masks(50, B, g, dtype=torch.float64, device="cpu")["layer1"].flatten()
                       for _ in range(4)])
    assert abs(float((rates == 0).double().mean()) - 0.4) < 0.05  # the rate asked for


def test_no_masks_in_evaluation_sampling_and_dynamic_evaluation(monkeypatch):
    """Stream (evaluation, scoring, sampling, dynamic evaluation) and TruncatedBPTT without a generator
    never drop anything: every forward gets masks=None, and the numbers are those of the same weights
    without dropout."""
    seen = []
    forward = Network.forward

    def spy(self, params, inputs, state, masks=None):
        seen.append(masks)
        return forward(self, params, inputs, state, masks)

    monkeypatch.setattr(Network, "forward", spy)
    dropped = build("lstm", 2, seed=4, dropout=0.5, variational=True)
    plain = build("lstm", 2, seed=4)
    ids = np.random.default_rng(0).integers(0, V, 12).astype(np.int32)
    assert stream_nats(dropped, ids, 0, block=5) == stream_nats(plain, ids, 0, block=5)
    x = torch.tensor(ids[:10].astype(np.int64)).view(5, 2)
    assert torch.equal(Stream(dropped, 2).log_probs(x), Stream(plain, 2).log_probs(x))
    assert torch.equal(Stream(dropped, 2).nll(x, x), Stream(plain, 2).nll(x, x))
    a, b = TruncatedBPTT(dropped, 5), TruncatedBPTT(plain, 5)
    assert torch.equal(a.step(x, x)[1].data, b.step(x, x)[1].data)
    vocab = Vocab([EOS, UNK, "a", "b", "c", "d", "e"])
    assert sample(dropped, vocab, words=6, seed=1) == sample(plain, vocab, words=6, seed=1)
    assert dynamic_stream_nats(dropped, ids, 0, 0.1, 5) == dynamic_stream_nats(plain, ids, 0, 0.1, 5)
    assert len(seen) > 10 and all(m is None for m in seen)
    seen.clear()
    TruncatedBPTT(dropped, 5, generator=torch.Generator().manual_seed(0)).step(x, x)
    assert len(seen) == 1 and set(seen[0]) == {"input", "layer1", "output"}  # training draws them


# -- mutants: the checks reject them ---------------------------------------------------------------------------


def _errors(model: LanguageModel, c: Case, truncation: int | None = None) -> dict:
    """The engine's gradients against each reference: {"reference": ..., "torch": ..., "fd": ...}; torch.nn
    and finite differences for full BPTT only, finite differences for the recurrent matrices W only (every
    mutant here changes them)."""
    _, grads, _ = engine(model, c, truncation)
    out = {"reference": max_error(grads, reference(model, c, truncation)[1])}
    if truncation is None and torch_applies(model, c):
        out["torch"] = max_error(grads, torch_nn_grads(Spec.of(model.config), model.params, c.x, c.y, c.state0,
                                                       masks=c.masks, weights=c.weights)[1])
    if truncation is None:
        names = [k for k in grads if k.endswith("W")]
        out["fd"] = max_error({k: grads[k] for k in names}, engine_fd(model, c, names))
    return out


def _assert_rejected_and_intact_passes(monkeypatch, mutate, model, c, truncation=None):
    intact = _errors(model, c, truncation=truncation)
    assert intact["reference"] <= EXACT and intact.get("torch", 0) <= EXACT and intact.get("fd", 0) <= FD_TOLERANCE
    mutate(monkeypatch)
    broken = _errors(model, c, truncation=truncation)
    monkeypatch.undo()
    assert broken.keys() == intact.keys() and min(broken.values()) > REJECTED, broken


def eager_cells(monkeypatch):
    """The LSTM and GRU mutants below break the eager code (cells/lstm.py, cells/gru.py): the compiled sweeps
    (engine/native.py, which test_native.py holds equal to the eager code) are turned off so that the mutant
    runs."""
    monkeypatch.setattr(native, "_enabled", False)


def no_forget_gate_path(monkeypatch):
    """The f gate's error δ_f = E ⊙ c^{t-1} ⊙ σ'(a_f) zeroed: f learns nothing."""
    eager_cells(monkeypatch)
    real = lstm.gate_derivatives

    def mutant(*args, **kwargs):
        P, Q = real(*args, **kwargs)
        m = P.shape[-1] // 4
        P = P.clone()
        P[..., m:2 * m] = 0
        return P, Q

    monkeypatch.setattr(lstm, "gate_derivatives", mutant)


def no_memory_carry(monkeypatch):
    """∂L/∂c^{t-1} without f^t ⊙ E^t: the memory's error stops at every step."""
    eager_cells(monkeypatch)
    monkeypatch.setattr(lstm, "memory_carry", lambda E, f: torch.zeros_like(E))


def sigmoid_derivative_of_y(monkeypatch):
    """σ'(a) taken as y instead of y (1 − y)."""
    eager_cells(monkeypatch)
    monkeypatch.setattr(lstm, "sigmoid_derivative", lambda y: y.clone())


def gru_reset_forgotten_in_backward(monkeypatch):
    """The error of W_hn h^{t-1} + b_hn taken as δ_n instead of δ_n ⊙ r: the reset gate's scaling lost."""
    eager_cells(monkeypatch)
    real = gru.gate_derivatives

    def mutant(*args, **kwargs):
        P, R, z = real(*args, **kwargs)
        return P, P.clone(), z

    monkeypatch.setattr(gru, "gate_derivatives", mutant)


def drop_mask_in_backward(monkeypatch):
    """∂L/∂x = ∂L/∂x̃ with the mask forgotten (the forward still drops)."""
    monkeypatch.setattr(network, "dropout_backward", lambda dX, mask: dX)


@pytest.mark.parametrize("mutate, cell, truncation", [
    (no_forget_gate_path, "lstm", None), (no_forget_gate_path, "lstm", 2),
    (no_memory_carry, "lstm", None), (no_memory_carry, "lstm", 2),
    (sigmoid_derivative_of_y, "lstm", None), (sigmoid_derivative_of_y, "lstm", 1),
    (gru_reset_forgotten_in_backward, "gru", None), (gru_reset_forgotten_in_backward, "gru", 1),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_broken_cell_backward_is_rejected(monkeypatch, mutate, cell, truncation):
    model = build(cell, 2, seed=7, **DROPOUT["standard"])
    c = make_case(model, seed=7)
    _assert_rejected_and_intact_passes(monkeypatch, mutate, model, c, truncation)


@pytest.mark.parametrize("drop", ["standard", "variational"])
def test_a_mask_dropped_in_the_backward_is_rejected_by_finite_differences(monkeypatch, drop):
    model = build("gru", 2, seed=8, **DROPOUT[drop])
    c = make_case(model, seed=8)
    _assert_rejected_and_intact_passes(monkeypatch, drop_mask_in_backward, model, c)


def test_no_memory_carry_is_invisible_with_one_step(monkeypatch):
    """With T = 1 no error crosses a recurrent connection: the mutant passes, so the checks are specific."""
    no_memory_carry(monkeypatch)
    model = build("lstm", 2, seed=7)
    c = make_case(model, T=1, seed=7)
    errors = _errors(model, c)
    assert errors["reference"] <= EXACT and errors["torch"] <= EXACT and errors["fd"] <= FD_TOLERANCE


def reset_before_the_product(params, A, state0):
    """A GRU forward with the reset gate on h^{t-1} before W_hn (Cho et al.'s first form), not on q."""
    W, b, b_hn = params["W"], params.get("b"), params.get("b_hn")
    m = W.shape[1]
    h, outputs = state0[0], []
    for t in range(A.shape[0]):
        a = A[t] + (0 if b is None else b)
        r = torch.sigmoid(a[:, :m] + h @ W[:m].T)
        z = torch.sigmoid(a[:, m:2 * m] + h @ W[m:2 * m].T)
        n = torch.tanh(a[:, 2 * m:] + (r * h) @ W[2 * m:].T + (0 if b_hn is None else b_hn))
        h = (1 - z) * n + z * h
        outputs.append(h)
    H = torch.stack(outputs)
    return H, (H[-1],), CellCache(state0, {"H": H})


def reset_on_the_input(monkeypatch):
    """n = tanh(r ⊙ (A_n + b_n) + q): the reset gate on the input side instead of on q = W_hn h + b_hn."""
    eager_cells(monkeypatch)
    monkeypatch.setattr(gru, "reset_candidate_", lambda pre, r, q: pre.mul_(r).add_(q).tanh_())


@pytest.mark.parametrize("mutate", [
    reset_on_the_input,
    lambda mp: mp.setattr(gru.GRUCell, "forward", staticmethod(reset_before_the_product)),
], ids=["reset-on-input", "reset-before-W_hn"])
def test_a_gru_with_the_reset_gate_elsewhere_is_rejected_by_torch_nn(monkeypatch, mutate):
    model = build("gru", 2, seed=9)
    c = make_case(model, T=4, B=3, seed=9)
    spec = Spec.of(model.config)
    _, _, final, top = torch_nn_grads(spec, model.params, c.x, c.y, c.state0)

    def forward_error():
        H, state, _ = model.net.forward(model.params, c.x, c.state)
        return max(relative_error(H, top), state_error(state, final))

    assert forward_error() <= EXACT
    mutate(monkeypatch)
    broken = forward_error()
    monkeypatch.undo()
    assert broken > REJECTED


# -- the embedding's product over a block's distinct words (engine/inputs.py, the CPU path) -----------------


@pytest.mark.parametrize("cell, options", [("lstm", {}), ("gru", {"tied": True}), ("lstm", {"embedding_size": 4})],
                         ids=["lstm", "gru-tied", "lstm-e4"])
def test_the_per_word_product_equals_the_per_position_one(monkeypatch, cell, options):
    """Without embedding dropout, on the CPU, A_0 = E[x] U_0ᵀ and its backward run over the distinct
    words (repeated words in the block); the per-position path, which CUDA and dropout take, gives the
    same loss, state and gradients."""
    model = build(cell, 2, seed=4, **options)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 4, (6, 3), generator=g), torch.randint(0, V, (6, 3), generator=g)  # words repeat
    state = model.zero_state(3)
    calls = []
    real = network.lookup_project_forward
    monkeypatch.setattr(network, "lookup_project_forward", lambda *a: calls.append(1) or real(*a))
    per_word = loss_and_grads(model.net, model.params, x, y, state)
    assert calls, "the per-word path was not taken"
    monkeypatch.setattr(network.Network, "_per_word", staticmethod(lambda inputs, masks: False))
    per_position = loss_and_grads(model.net, model.params, x, y, state)
    assert len(calls) == 1
    assert relative_error(per_word[0], per_position[0]) <= EXACT
    for name in per_position[1]:
        assert relative_error(per_word[1][name], per_position[1][name]) <= EXACT, name
    assert state_error(per_word[2], list(per_position[2].layers)) <= EXACT
