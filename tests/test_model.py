"""The public contract of ElmanLM: parameters, shapes, validation, loss definitions, no autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf

from bptt import ElmanLM
from conftest import make_case


def test_params_names_and_shapes():
    model = ElmanLM(11, 4)
    assert {k: tuple(v.shape) for k, v in model.params.items()} == {
        "U": (4, 11), "W": (4, 4), "V": (11, 4), "b": (4,), "c": (11,)
    }
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.params.values())
    no_bias = ElmanLM(11, 4, bias=False, dtype=torch.float64)
    assert set(no_bias.params) == {"U", "W", "V"} and no_bias.params["W"].dtype == torch.float64


def test_grads_have_the_shapes_of_params():
    model = ElmanLM(9, 3)
    loss, grads, h_last = model.loss_and_grads(torch.randint(0, 9, (4, 2)), torch.randint(0, 9, (4, 2)))
    assert grads.keys() == model.params.keys()
    assert all(grads[k].shape == model.params[k].shape for k in grads)
    assert h_last.shape == (2, 3) and loss.dim() == 0


def test_seed_makes_the_model_reproducible():
    a, b, c = ElmanLM(20, 6, seed=3), ElmanLM(20, 6, seed=3), ElmanLM(20, 6, seed=4)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["W"], c.params["W"])


def test_cross_entropy_is_the_sum_of_negative_log_probabilities():
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=5, B=3)
    loss, _, _ = model.loss_and_grads(x, y, h0)
    log_probs, _ = model.log_probs(x, h0)
    assert torch.allclose(loss, nnf.nll_loss(log_probs.reshape(-1, 7), y.reshape(-1), reduction="sum"))
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(5, 3))


def test_quadratic_loss_is_half_the_squared_distance_to_the_one_hot_target():
    model, x, y, h0 = make_case("sigmoid", "sigmoid", "quadratic", T=3, B=2)
    S = model.forward(x, h0)
    o = torch.sigmoid(S @ model.params["V"].T + model.params["c"])
    expected = 0.5 * ((nnf.one_hot(y, 7) - o) ** 2).sum()
    assert torch.allclose(model.loss(x, y, h0), expected)


def test_h_last_is_the_final_state_and_carrying_it_continues_the_sequence():
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", T=6, B=2)
    _, _, h_last = model.loss_and_grads(x, y, h0)
    S = model.forward(x, h0)
    assert torch.equal(h_last, S[-1])
    _, _, h_mid = model.loss_and_grads(x[:3], y[:3], h0)
    S_rest = model.forward(x[3:], h_mid)
    torch.testing.assert_close(S_rest, S[3:])


def test_h0_none_is_zeros():
    model, x, y, _ = make_case("tanh", "softmax", "cross_entropy", T=3, B=2)
    a = model.loss_and_grads(x, y, None)[0]
    b = model.loss_and_grads(x, y, torch.zeros(2, 5))[0]
    assert float(a) == float(b)


def test_engine_never_calls_autograd(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was called")

    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    model, x, y, h0 = make_case("tanh", "softmax", "cross_entropy")
    for p in model.params.values():
        p.requires_grad_(True)  # even if a user marks the parameters, nothing is recorded
    for method in ("bptt", "rtrl"):
        loss, grads, _ = model.loss_and_grads(x, y, h0, method=method)
        assert not loss.requires_grad and not any(g.requires_grad for g in grads.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_activation="softplus"), "hidden_activation"),
        (dict(output_activation="tanh"), "output_activation"),
        (dict(loss="hinge"), "loss"),
        (dict(output_activation="sigmoid", loss="cross_entropy"), "requires output_activation='softmax'"),
        (dict(output_activation="identity", loss="cross_entropy"), "requires output_activation='softmax'"),
        (dict(dtype="float8"), "dtype"),
    ],
)
def test_invalid_configuration_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElmanLM(5, 3, **kwargs)


@pytest.mark.parametrize("vocab, hidden", [(0, 3), (5, 0), (5, -1), (5.0, 3), (True, 3)])
def test_sizes_must_be_positive_integers(vocab, hidden):
    with pytest.raises(ValueError, match="positive integer"):
        ElmanLM(vocab, hidden)


@pytest.mark.parametrize(
    "inputs, targets, kwargs, message",
    [
        (torch.tensor([[1, 2]]), torch.tensor([[1, 9]]), {}, "outside"),
        (torch.tensor([[-1, 2]]), torch.tensor([[1, 2]]), {}, "outside"),
        (torch.tensor([1, 2]), torch.tensor([1, 2]), {}, r"shape \(T, B\)"),
        (torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]]), {}, "integer"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2], [3, 4]]), {}, "same"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), dict(method="adjoint"), "method"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), dict(truncation=-1), "truncation"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), dict(truncation=2, method="rtrl"), "bptt"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), dict(h0=torch.zeros(3, 4)), "h0"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), dict(mask=torch.ones(2, 2)), "mask"),
    ],
)
def test_invalid_inputs_are_clear_value_errors(inputs, targets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElmanLM(9, 4).loss_and_grads(inputs, targets, **kwargs)


def test_float32_gradients_agree_with_float64():
    model64, x, y, h0 = make_case("tanh", "softmax", "cross_entropy", V=30, m=8, T=10, B=4)
    model32 = ElmanLM(30, 8, dtype=torch.float32)
    for k, p in model64.params.items():
        model32.params[k].copy_(p)
    _, g64, _ = model64.loss_and_grads(x, y, h0)
    _, g32, _ = model32.loss_and_grads(x, y, h0.float())
    for k in g64:
        assert float((g32[k].double() - g64[k]).abs().max()) <= 1e-5 * max(1.0, float(g64[k].abs().max()))


def test_long_sequence_loss_is_finite_and_near_uniform_at_init():
    model = ElmanLM(1000, 32, seed=0)
    x = torch.randint(0, 1000, (50, 4))
    loss, grads, _ = model.loss_and_grads(x, x)
    assert math.isfinite(float(loss))
    assert abs(float(loss) / x.numel() - math.log(1000)) < 0.05  # small weights: close to uniform


@pytest.mark.parametrize("chunk", [1 << 24, 5, 1])
def test_initial_weights_do_not_depend_on_how_they_are_drawn(chunk, monkeypatch):
    """Every matrix (rand·2 − 1)·init_range in float64 from one seeded generator, matrix after matrix in
    row-major order (a column-major U too), whether drawn whole or a few rows at a time."""
    from bptt import RNNLM
    from bptt.model.language_model import LanguageModel

    monkeypatch.setattr(LanguageModel, "INIT_CHUNK", chunk)
    for seed, model in ((2, ElmanLM(40, 7, output="class", classes=4, seed=2)),
                        (4, RNNLM(30, 6, cell="lstm", layers=2, embedding_size=5, seed=4))):
        generator = torch.Generator().manual_seed(seed)
        r = model.config.init_range
        for name, p in model.params.items():
            if p.dim() == 1:
                continue
            want = (torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * r
            assert torch.equal(p, want.to(p.dtype)), name


@pytest.mark.parametrize("dtype, width, stride", [(torch.float32, 6, 8), (torch.float32, 8, 8), (torch.float32, 650, 656),
                                                  (torch.float64, 6, 8), (torch.float64, 4, 4)])
def test_matrix_rows_are_aligned_in_the_flat_buffer(dtype, width, stride):
    """A matrix's rows start at multiples of 32 bytes (engine/flat.py): a (5, width) view of a (5, stride)
    storage whose padding is zero, a plain contiguous view when the width is aligned already; a
    column-major matrix the same on its storage's rows; every view starts on a 64-byte boundary."""
    from bptt.engine.flat import Flat

    flat = Flat({"A": (5, width), "B": (width, 3), "b": (7,)}, dtype=dtype, device="cpu", column_major=["B"])
    A, B = flat["A"], flat["B"]
    assert A.stride() == (stride, 1) and A.is_contiguous() == (width == stride)
    assert B.stride() == (1, stride) and flat.rows("B").shape == (3, width)
    assert flat.storage("A").shape == (5, stride) and flat.storage("A").is_contiguous()
    assert all(v.data_ptr() % 64 == 0 for v in flat.values())
    A.fill_(1.0)
    B.fill_(2.0)
    flat["b"].fill_(3.0)
    assert flat.data.sum() == 5 * width + 2 * 3 * width + 3 * 7  # nothing written into the padding
    assert not flat.storage("A")[:, width:].any() and not flat.storage("B")[:, width:].any()
    grads = flat.like()
    assert grads["A"].stride() == A.stride() and grads["B"].stride() == B.stride()


def test_a_one_layer_elman_config_with_dropout_keeps_it(tmp_path):
    """build_model gives an ElmanLM only for what ElmanLM represents: a one-layer Elman config with dropout is
    an RNNLM with its dropout (before: an ElmanLM without it, silently, `bptt train --dropout` too)."""
    import bptt
    from bptt.cli import main
    from bptt.model import ModelConfig, build_model
    from bptt.storage.saved_model import load_model
    from conftest import write_corpus

    plain = build_model(ModelConfig(vocab_size=10, hidden_size=4), seed=0)
    assert isinstance(plain, ElmanLM) and not plain.net.dropout_sites()
    for options in (dict(dropout=0.5), dict(dropout=0.3, variational=True), dict(dropout_embedding=0.2)):
        config = ModelConfig(vocab_size=10, hidden_size=4, **options)
        model = build_model(config, seed=0)
        assert isinstance(model, bptt.RNNLM) and model.config == config and model.net.dropout_sites(), options
        with pytest.raises(ValueError, match="RNNLM"):
            ElmanLM.from_config(config)
    corpus = write_corpus(tmp_path / "t.txt", 40, 0)
    assert main(["train", "--train", corpus, "--valid", corpus, "--model", str(tmp_path / "m"), "--hidden", "6",
                 "--batch", "2", "--bptt", "4", "--epochs", "1", "--dropout", "0.5", "--quiet"]) == 0
    model, _, extra = load_model(tmp_path / "m")
    assert model.config.dropout == 0.5 and extra["training"]["model_config"]["dropout"] == 0.5


@pytest.mark.parametrize("kwargs, needle", [(dict(output="class", classes=0), "classes"), (dict(seed=1.7), "seed"),
                                            (dict(seed=-1), "seed")])
def test_elman_lm_refuses_what_it_would_rewrite(kwargs, needle):
    """classes=0 is refused (not read as 100); the seed is checked as RNNLM checks it."""
    with pytest.raises(ValueError, match=needle):
        ElmanLM(10, 4, **kwargs)


def test_register_cell_refuses_what_is_not_a_cell_class():
    from bptt import register_cell

    class Named:
        name = "named-only"

    with pytest.raises(ValueError, match="cell class"):
        register_cell(Named())
    with pytest.raises(ValueError, match="lacks .*param_shapes"):
        register_cell(Named)


def test_a_stream_checks_its_blocks_before_its_state_moves():
    """bptt.engine.Stream: a block of the wrong width, ids outside the vocabulary, 1-D or float ids, targets of
    another shape, a batch of 0 streams: a ValueError naming the argument, the carried state unchanged."""
    import bptt
    from bptt.engine import Stream

    stream = Stream(bptt.RNNLM(10, 4, cell="gru", seed=0), batch_size=2)
    stream.log_probs(torch.ones(3, 2, dtype=torch.long))
    before = [t.clone() for t in stream.state.tensors().values()]
    ids = torch.zeros(5, 2, dtype=torch.long)
    for call, needle in [(lambda: stream.log_probs(torch.zeros(5, 3, dtype=torch.long)), "inputs has 3 streams"),
                         (lambda: stream.log_probs(torch.full((5, 2), 10)), "word id 10"),
                         (lambda: stream.log_probs(torch.full((5, 2), -1)), "word id -1"),
                         (lambda: stream.log_probs(torch.zeros(5, dtype=torch.long)), "inputs must be"),
                         (lambda: stream.log_probs(torch.zeros(5, 2)), "inputs must be"),
                         (lambda: stream.nll(ids, ids[:4]), "same shape"),
                         (lambda: stream.loss_and_grads(ids, torch.full((5, 2), 12)), "targets holds word id 12")]:
        with pytest.raises(ValueError, match=needle):
            call()
        assert all(torch.equal(a, b) for a, b in zip(before, stream.state.tensors().values()))
    with pytest.raises(ValueError, match="batch_size"):
        Stream(bptt.RNNLM(10, 4, seed=0), batch_size=0)


@pytest.mark.parametrize("make", ["elman", "rnnlm"])
def test_direct_context_ids_are_checked_like_inputs(make):
    """The direct connections' history (direct_order−1, B): ids outside [0, V) or floats are refused with a
    ValueError naming the context (before: 99 or -1 read hashed weights, 3.7 was read as 3)."""
    import bptt
    from bptt.engine.network import State

    x = torch.zeros(4, 3, dtype=torch.long)
    if make == "elman":
        model = ElmanLM(10, 4, direct=100, seed=0)
        call = lambda context: model.log_probs(x, context=context)  # noqa: E731
    else:
        model = bptt.RNNLM(10, 4, cell="gru", direct=100, seed=0)
        call = lambda context: model.log_probs(x, State(model.zero_state(3).layers, context))  # noqa: E731
    call(torch.zeros(2, 3, dtype=torch.long))
    for context, needle in [(torch.full((2, 3), 99), "word id 99"), (torch.full((2, 3), -1), "word id -1"),
                            (torch.full((2, 3), 3.7), "integer"), (torch.zeros(1, 3, dtype=torch.long), "shape")]:
        with pytest.raises(ValueError, match=needle):
            call(context)
