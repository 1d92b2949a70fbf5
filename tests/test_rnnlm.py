"""bptt.RNNLM: construction, loss_and_grads and log_probs on the users' tensors — dropout in training
only, masks from the model's own seeded generator or frozen, the explicit state carried from block to
block, one-line errors naming the argument."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bptt
from bptt.engine.network import State

TOL = dict(rtol=1e-12, atol=1e-12)
V, M, T, B = 9, 4, 6, 3


def make(seed: int = 0, **kw) -> bptt.RNNLM:
    kw = {"cell": "lstm", "layers": 2, "dtype": torch.float64, "init_range": 0.6, **kw}
    model = bptt.RNNLM(V, M, seed=seed, **kw)
    g = torch.Generator().manual_seed(50 + seed)
    for p in model.params.values():
        if p.dim() == 1:
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5)
    return model


def data(seed: int = 0, steps: int = T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (steps, B), generator=g), torch.randint(0, V, (steps, B), generator=g)


def nll(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -log_p.gather(2, y.unsqueeze(2)).sum()


def test_construction_defaults_and_from_config():
    model = bptt.RNNLM(V, M)
    assert isinstance(model, bptt.LanguageModel)
    c = model.config
    assert (c.cell, c.layers, c.embedding, c.dropout, c.tied, c.output, c.dtype) == ("lstm", 1, M, 0.0, False,
                                                                                      "softmax", "float32")
    assert set(model.params) == {"E", "U", "W", "b", "V", "c"} and model.dtype == torch.float32
    gru = bptt.RNNLM(V, M, "gru", 2, 3, 0.25, dtype="float64", forget_bias=1.0, variational=True, init_range=0.2)
    assert gru.config.embedding == 3 and gru.config.variational and gru.dtype == torch.float64
    assert {"layer0.b_hn", "layer1.b_hn", "E"} <= set(gru.params)
    again = bptt.RNNLM.from_config(gru.config)
    assert again.config == gru.config and all(torch.equal(again.params[k], p) for k, p in gru.params.items())
    elman = bptt.RNNLM(V, M, cell="elman", tied=True)
    assert "U" not in elman.params and "E" not in elman.params
    assert bptt.RNNLM(V, M, cell="lstm", forget_bias=1.0).params["b"][M : 2 * M].eq(1).all()
    with pytest.raises(TypeError, match="unexpected keyword argument 'hidden'"):
        bptt.RNNLM(V, M, hidden=3)
    for kw, needle in [(dict(cell="rnn"), "cell"), (dict(dropout=1.0), "dropout"), (dict(layers=0), "layers"),
                       (dict(dtype="int8"), "dtype"), (dict(seed=-1), "seed"), (dict(tied=True, embedding_size=3),
                                                                                "tied")]:
        with pytest.raises(ValueError, match=needle):
            bptt.RNNLM(V, M, **kw)
    with pytest.raises(ValueError, match="hidden_size"):
        bptt.RNNLM(V, 0)


def test_zero_state_is_every_layers_state():
    model = make()
    state = model.zero_state(B)
    assert len(state.layers) == 2 and all(len(layer) == 2 for layer in state.layers)  # (h, c) per layer
    assert all(t.shape == (B, M) and not t.any() for layer in state.layers for t in layer)
    assert [len(layer) for layer in make(cell="gru").zero_state(1).layers] == [1, 1]
    with pytest.raises(ValueError, match="batch_size"):
        model.zero_state(0)


def test_without_dropout_the_loss_is_minus_the_log_probs():
    model = make()
    x, y = data()
    log_p, state = model.log_probs(x)
    assert log_p.shape == (T, B, V)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(T, B, dtype=torch.float64), **TOL)
    for train in (True, False):  # no dropout: training drops nothing either
        loss, grads, after = model.loss_and_grads(x, y, train=train)
        assert loss.dim() == 0 and set(grads) == set(model.params)
        torch.testing.assert_close(loss, nll(log_p, y), **TOL)
        for a, b in zip(after.layers, state.layers):
            for s, t in zip(a, b):
                torch.testing.assert_close(s, t, **TOL)
    mask = torch.ones(T, B)
    mask[3:, 0] = 0
    loss, _, _ = model.loss_and_grads(x, y, mask=mask)
    torch.testing.assert_close(loss, -(log_p.gather(2, y.unsqueeze(2)).squeeze(2) * mask).sum(), **TOL)


def test_dropout_applies_in_training_only():
    model = make(dropout=0.5)
    x, y = data()
    log_p, _ = model.log_probs(x)
    before = model.generator.get_state()
    again, _ = model.log_probs(x)
    assert torch.equal(log_p, again) and torch.equal(model.generator.get_state(), before)  # no masks drawn
    evaluated, _, _ = model.loss_and_grads(x, y, train=False)
    torch.testing.assert_close(evaluated, nll(log_p, y), **TOL)
    assert torch.equal(model.generator.get_state(), before)
    first, g1, _ = model.loss_and_grads(x, y)
    second, g2, _ = model.loss_and_grads(x, y)
    assert not torch.equal(first, evaluated)  # units dropped
    assert not torch.equal(first, second) and not torch.equal(g1["V"], g2["V"])  # fresh masks every call


def test_the_same_seed_gives_the_same_masks():
    x, y = data()

    def training_losses(seed: int) -> torch.Tensor:
        model = make(seed=seed, dropout=0.3)
        return torch.stack([model.loss_and_grads(x, y)[0] for _ in range(3)])

    assert torch.equal(training_losses(3), training_losses(3))
    a, b = make(seed=3, dropout=0.3), make(seed=4, dropout=0.3)
    assert not torch.equal(a.draw_masks(T, B)["input"], b.draw_masks(T, B)["input"])  # the seed reaches the generator
    assert make(seed=3).draw_masks(T, B) is None  # no dropout, no masks


def test_frozen_masks_are_the_torch_models_dropout():
    """loss_and_grads(masks=draw_masks(T, B)) is RNNModel's forward with those masks on the embedding,
    between the layers and before the decoder: the same loss and (through export_torch) the same
    gradients as autograd; the same masks give the same result twice and draw nothing."""
    model = make(dropout=0.4, dropout_embedding=0.2)
    x, y = data(1)
    masks = model.draw_masks(T, B)
    assert set(masks) == {"input", "layer1", "output"}
    before = model.generator.get_state()
    loss, grads, _ = model.loss_and_grads(x, y, masks=masks)
    again, grads2, _ = model.loss_and_grads(x, y, masks=masks)
    assert torch.equal(loss, again) and torch.equal(grads.data, grads2.data)
    assert torch.equal(model.generator.get_state(), before)

    sd = model.export_torch()
    leaves = {name: sd[name].clone().requires_grad_(True)
              for name in ("encoder.weight", "decoder.weight", "decoder.bias")}
    layers = [torch.nn.LSTM(M, M, dtype=torch.float64) for _ in range(2)]
    for k, lstm in enumerate(layers):
        lstm.load_state_dict({f"{name}_l0": sd[f"rnn.{name}_l{k}"] for name in ("weight_ih", "weight_hh", "bias_ih",
                                                                                 "bias_hh")})
        leaves.update({f"rnn.{name.removesuffix('_l0')}_l{k}": p for name, p in lstm.named_parameters()})
    with torch.enable_grad():
        h, _ = layers[0](leaves["encoder.weight"][x] * masks["input"])
        h, _ = layers[1](h * masks["layer1"])
        logits = (h * masks["output"]) @ leaves["decoder.weight"].t() + leaves["decoder.bias"]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum")
        ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    exported = model.export_torch(grads)
    assert exported.keys() == leaves.keys()
    for name, g in exported.items():
        torch.testing.assert_close(g, leaves[name].grad, **TOL, msg=name)


def test_two_half_blocks_with_the_state_carried_are_one_block():
    for kw in (dict(), dict(cell="gru", tied=True), dict(cell="elman", layers=1, embedding_size=0)):
        model = make(**kw)
        x, y = data(2)
        whole, state = model.log_probs(x)
        first, mid = model.log_probs(x[:2])
        second, end = model.log_probs(x[2:], mid)
        torch.testing.assert_close(torch.cat((first, second)), whole, **TOL)
        loss_a, _, carried = model.loss_and_grads(x[:2], y[:2], train=False)
        loss_b, _, after = model.loss_and_grads(x[2:], y[2:], carried, train=False)
        torch.testing.assert_close(loss_a + loss_b, nll(whole, y), **TOL)
        for a, b, c in zip(after.layers, end.layers, state.layers):
            for s, t, u in zip(a, b, c):
                torch.testing.assert_close(s, u, **TOL)
                torch.testing.assert_close(t, u, **TOL)
        fresh, _ = model.log_probs(x[2:])
        assert not torch.allclose(fresh, second)  # the state mattered


def test_the_returned_state_is_a_copy_of_its_own():
    """The state returned holds (B,m) tensors of its own, not views into the block's (T,B,·) buffers
    (which it would keep alive), and passing it in again leaves it as it was."""
    model = make()
    x, y = data()
    _, _, state = model.loss_and_grads(x, y)
    _, state2 = model.log_probs(x)
    tensors = [t for layer in state.layers + state2.layers for t in layer]
    assert all(t.untyped_storage().nbytes() == B * M * t.element_size() for t in tensors)
    kept = [t.clone() for t in tensors]
    model.loss_and_grads(x, y, state)
    model.log_probs(x, state2)
    assert all(torch.equal(a, b) for a, b in zip(kept, tensors))


def test_truncation_changes_the_gradients_not_the_loss():
    model = make()
    x, y = data()
    full, g_full, _ = model.loss_and_grads(x, y)
    cut, g_cut, _ = model.loss_and_grads(x, y, truncation=0)
    assert torch.equal(full, cut) and not torch.allclose(g_full["layer0.W"], g_cut["layer0.W"])
    _, g_long, _ = model.loss_and_grads(x, y, truncation=T)
    torch.testing.assert_close(g_long["layer0.W"], g_full["layer0.W"], **TOL)


BAD = {
    "inputs-float": (lambda x, y, m: m.loss_and_grads(x.double(), y), "inputs"),
    "inputs-1d": (lambda x, y, m: m.loss_and_grads(x[0], y[0]), "inputs"),
    "inputs-id": (lambda x, y, m: m.loss_and_grads(x + V, y), "inputs holds word id"),
    "targets-negative": (lambda x, y, m: m.loss_and_grads(x, y - V), "targets holds word id"),
    "targets-shape": (lambda x, y, m: m.loss_and_grads(x, y[:2]), "targets"),
    "mask-shape": (lambda x, y, m: m.loss_and_grads(x, y, mask=torch.ones(2, 2)), "mask"),
    "state-type": (lambda x, y, m: m.loss_and_grads(x, y, torch.zeros(B, M)), "state"),
    "state-batch": (lambda x, y, m: m.loss_and_grads(x, y, m.zero_state(B + 1)), "state"),
    "state-layers": (lambda x, y, m: m.log_probs(x, State(m.zero_state(B).layers[:1])), "state has 1 layers"),
    "state-cell": (lambda x, y, m: m.log_probs(x, State(((torch.zeros(B, M),),) * 2)), "state layer 0"),
    "truncation": (lambda x, y, m: m.loss_and_grads(x, y, truncation=-1), "truncation"),
    "train": (lambda x, y, m: m.loss_and_grads(x, y, train=1), "train"),
    "masks-eval": (lambda x, y, m: m.loss_and_grads(x, y, train=False, masks=m.draw_masks(T, B)), "masks"),
    "masks-sites": (lambda x, y, m: m.loss_and_grads(x, y, masks={"input": torch.ones(T, B, M)}), "masks"),
    "masks-shape": (lambda x, y, m: m.loss_and_grads(x, y, masks=m.draw_masks(T + 1, B)), "masks['input']"),
    "masks-type": (lambda x, y, m: m.loss_and_grads(x, y, masks=[1]), "masks"),
    "log-probs-inputs": (lambda x, y, m: m.log_probs(x.double()), "inputs"),
    "log-probs-empty": (lambda x, y, m: m.log_probs(x[:0]), "inputs"),
}


@pytest.mark.parametrize("call, needle", BAD.values(), ids=BAD.keys())
def test_bad_inputs_are_one_line_value_errors_naming_the_argument(call, needle):
    model = make(dropout=0.2)
    x, y = data()
    with pytest.raises(ValueError) as e:
        call(x, y, model)
    message = str(e.value)
    assert message.startswith(needle) or f" {needle}" in message, message
    assert "\n" not in message


def test_rnnlm_is_exported_from_the_package():
    assert bptt.RNNLM is bptt.model.RNNLM and "RNNLM" in bptt.__all__
    assert dataclasses.is_dataclass(bptt.RNNLM(V, M).config)
