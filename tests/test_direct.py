"""Maxent direct connections (outputs/direct.py): hashing, the gather/scatter pair, gradients, context."""

from __future__ import annotations

import pytest
import torch

import bptt.engine.outputs.class_softmax as class_softmax
import bptt.engine.outputs.full as full
from bptt.verify import check_output_layer, direct_size, finite_difference_grads
from bptt.model import ElmanLM
from bptt.engine.outputs.direct import (
    direct_backward,
    direct_forward_,
    direct_gather,
    direct_gather_backward,
    next_context,
    ngram_offsets,
)
from conftest import max_rel_error

V, M = 7, 5


def model_with_direct(output="softmax", order=3, size=None, seed=3, dtype=torch.float64):
    counts = [1000 // (rank + 1) for rank in range(V)]
    model = ElmanLM(V, M, dtype=dtype, seed=seed, init_range=0.5, output=output, classes=3, word_counts=counts,
                    direct=size or direct_size(V), direct_order=order)
    g = torch.Generator().manual_seed(seed)
    model.params["D"].copy_(torch.randn(model.params["D"].shape, generator=g, dtype=torch.float64))
    return model


def tokens(T, B, seed=0):
    return torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(seed))


# -- hashing -------------------------------------------------------------------------------------------


def test_offsets_depend_on_exactly_the_last_k_words():
    size, span, order = 10_000, V, 4
    x = torch.tensor([[1], [2], [3], [4], [5], [3], [4], [5]])  # the trigram 3 4 5 occurs twice
    off = ngram_offsets(x, None, order, size, span).view(8, 1, order)[:, 0]
    assert off.min() >= 0 and off.max() <= size - span
    assert len(set(off[:, 0].tolist())) == 1  # order 0: the empty context, the same everywhere
    assert off[4, 1] == off[7, 1] and off[4, 2] == off[7, 2] and off[4, 3] == off[7, 3]  # ...4 5 twice
    assert off[3, 1] != off[4, 1]  # unigram contexts 4 and 5 differ
    assert len(set(off[:, 3].tolist())) == 7  # 8 three-word histories, "3 4 5" twice


def test_offsets_with_context_equal_offsets_of_the_whole_sequence():
    order, size, span = 3, 500, V
    x = tokens(9, 4)
    whole = ngram_offsets(x, None, order, size, span).view(9, 4, order)
    ctx = next_context(x[:5], None, order)
    assert torch.equal(ctx, x[3:5])
    tail = ngram_offsets(x[5:], ctx, order, size, span).view(4, 4, order)
    assert torch.equal(tail, whole[5:])
    short = next_context(x[5:6], ctx, order)  # a block shorter than the context keeps older words
    assert torch.equal(short, x[4:6])


# -- the layer pair -----------------------------------------------------------------------------------


def naive_scores(D, offsets, first, n):
    out = torch.zeros(offsets.shape[0], n, dtype=D.dtype)
    for row in range(offsets.shape[0]):
        for k in range(offsets.shape[1]):
            for j in range(n):
                out[row, j] += D[int(offsets[row, k]) + first + j]
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_window_gather_and_scatter_match_loops_and_autograd(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        H, n, first = 40, 6, 3
        D = torch.randn(H, generator=g, dtype=torch.float64)
        offsets = torch.randint(0, H - n - first + 1, (50, 3), generator=g)
        offsets[1] = offsets[0]  # repeated windows must add up
        got = direct_forward_(D, offsets, first, torch.zeros(50, n, dtype=torch.float64))
        assert torch.allclose(got, naive_scores(D, offsets, first, n))
        dg = torch.randn(50, n, generator=g, dtype=torch.float64)
        grads = {"D": torch.zeros(H, dtype=torch.float64)}
        direct_backward(offsets, first, dg, grads)
        leaf = D.clone().requires_grad_(True)
        with torch.enable_grad():
            (naive_scores(leaf, offsets, first, n) * dg).sum().backward()
        assert torch.allclose(grads["D"], leaf.grad, atol=1e-12)
    finally:
        torch.set_num_threads(previous)


def test_gather_of_chosen_units_and_its_backward():
    g = torch.Generator().manual_seed(2)
    D = torch.randn(30, generator=g, dtype=torch.float64)
    offsets = torch.randint(0, 20, (8, 2), generator=g)
    units = torch.tensor([[0, 3, 9]])
    expected = torch.stack([naive_scores(D, offsets, int(u), 1)[:, 0] for u in units[0]], dim=1)
    assert torch.allclose(direct_gather(D, offsets, units), expected)
    dg = torch.randn(8, 3, generator=g, dtype=torch.float64)
    grads = {"D": torch.zeros(30, dtype=torch.float64)}
    direct_gather_backward(offsets, units, dg, grads)
    leaf = D.clone().requires_grad_(True)
    with torch.enable_grad():
        (direct_gather(leaf, offsets, units) * dg).sum().backward()
    assert torch.allclose(grads["D"], leaf.grad, atol=1e-12)


# -- the model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["softmax", "class"])
def test_gradients_match_finite_differences_and_rtrl(output):
    rows = check_output_layer(output, vocab=V, hidden=4, steps=4, batch=2, bias=True, dtype=torch.float64, seed=5,
                              direct=direct_size(V))
    assert any(row.parameter == "D" for row in rows)
    for row in rows:
        assert row.errors["fd"] <= 1e-6 and row.errors["rtrl"] <= 1e-10, row


@pytest.mark.parametrize("output", ["softmax", "class"])
def test_masked_gradients_match_finite_differences(output):
    """A mask (position weights 0/1) with direct connections, a carried state and a carried n-gram
    context: every gradient, D's included, against finite differences of the masked loss."""
    model = model_with_direct(output)
    x, y = tokens(5, 3, 10), tokens(5, 3, 11)
    context = tokens(2, 3, 12)  # DIRECT_ORDER 3: the two words before the block
    h0 = torch.rand(3, M, generator=torch.Generator().manual_seed(13), dtype=torch.float64) - 0.5
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[0, 1] = mask[3, 0] = mask[4, 2] = False
    _, grads, _ = model.loss_and_grads(x, y, h0, mask=mask, context=context)
    assert grads["D"].abs().sum() > 0
    fd = finite_difference_grads(model, x, y, h0, context=context, mask=mask)
    assert max_rel_error(grads, fd) <= 1e-6


@pytest.mark.parametrize("output,module,name", [
    ("softmax", full, "direct_backward"),
    ("class", class_softmax, "direct_backward"),
    ("class", class_softmax, "direct_gather_backward"),
])
def test_a_missing_direct_gradient_is_rejected(monkeypatch, output, module, name):
    model = model_with_direct(output)
    x, y = tokens(4, 2, 1), tokens(4, 2, 2)
    monkeypatch.setattr(module, name, lambda *args, **kw: None)
    _, grads, _ = model.loss_and_grads(x, y)
    fd = finite_difference_grads(model, x, y, model.initial_state(2))
    assert max_rel_error({"D": grads["D"]}, {"D": fd["D"]}) > 1e-3


@pytest.mark.parametrize("output", ["softmax", "class"])
def test_probabilities_are_normalized_and_depend_on_the_history(output):
    model = model_with_direct(output)
    x = tokens(6, 3, 4)
    log_p, _ = model.log_probs(x)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(6, 3, dtype=torch.float64))
    plain = ElmanLM(V, M, dtype=torch.float64, seed=3, init_range=0.5, output=output, classes=3,
                    word_counts=[1000 // (r + 1) for r in range(V)])
    for name, p in plain.params.items():
        p.copy_(model.params[name])
    assert not torch.allclose(plain.log_probs(x)[0], log_p)  # D changes the distribution


@pytest.mark.parametrize("output", ["softmax", "class"])
def test_blocks_with_carried_state_and_context_equal_one_block(output):
    model = model_with_direct(output)
    x, y = tokens(10, 3, 6), tokens(10, 3, 7)
    whole_loss, whole_grads, _ = model.loss_and_grads(x, y)
    whole_log_p, _ = model.log_probs(x)
    h, ctx = None, None
    parts = []
    for lo, hi in ((0, 4), (4, 5), (5, 10)):
        log_p, h_next = model.log_probs(x[lo:hi], h, ctx)
        parts.append(log_p)
        h, ctx = h_next, model.next_context(x[lo:hi], ctx)
    assert torch.allclose(torch.cat(parts), whole_log_p)
    total = model.loss(x[:4], y[:4]) + model.loss(x[4:], y[4:], model.forward(x[:4])[-1], context=x[2:4])
    assert torch.allclose(total, whole_loss)
    assert whole_grads["D"].abs().sum() > 0


def test_direct_connections_are_refused_where_unsupported():
    with pytest.raises(ValueError, match="softmax' or 'class"):
        ElmanLM(V, M, output="hsm", word_counts=[1] * V, direct=100)
    with pytest.raises(ValueError, match="at least 7"):
        ElmanLM(V, M, direct=5)
    with pytest.raises(ValueError, match="direct_order"):
        ElmanLM(V, M, direct=100, direct_order=0)
    with pytest.raises(ValueError, match="context must have shape"):
        model_with_direct().loss_and_grads(tokens(3, 2), tokens(3, 2), context=torch.zeros(1, 2, dtype=torch.long))


def test_truncated_bptt_carries_the_ngram_context_across_blocks():
    from bptt.engine.tbptt import TruncatedBPTT

    model = model_with_direct("softmax")
    x, y = tokens(8, 2, 8), tokens(8, 2, 9)
    engine = TruncatedBPTT(model, k1=4)
    engine.step(x[:4], y[:4])
    state = engine.state_dict()
    assert torch.equal(state["context"], x[2:4])
    loss, grads = engine.step(x[4:], y[4:])
    ref_loss, ref_grads, _ = model.loss_and_grads(x[4:], y[4:], model.forward(x[:4])[-1], context=x[2:4])
    assert torch.allclose(loss, ref_loss)
    assert torch.allclose(grads["D"], ref_grads["D"])
    fresh = TruncatedBPTT(model, k1=4)
    fresh.load_state_dict(state)  # a resumed run continues with the same context
    assert torch.allclose(fresh.step(x[4:], y[4:])[0], ref_loss)


def test_train_eval_score_generate_with_direct_connections(tmp_path, capsys):
    """--direct end to end: trained jointly, and eval, score and generate all use the n-gram features."""
    import json

    import numpy as np

    from bptt.cli import main
    from bptt.data import encode
    from bptt.evaluation import evaluate_corpus
    from bptt.sampling import sample
    from bptt.storage.saved_model import load_model
    from bptt.scoring import sentence_ln_probs

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(["a", "b", "c", "d", "e"], size=rng.integers(3, 9))) for _ in range(120)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(lines[:20]) + "\n")
    (tmp_path / "one.txt").write_text("a b c d e a\n")
    out = tmp_path / "m"
    assert main(["train", "--train", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "valid.txt"),
                 "--model", str(out), "--hidden", "6", "--batch", "3", "--bptt", "5", "--epochs", "2",
                 "--direct", "0.001", "--direct-order", "3", "--quiet"]) == 0
    model, vocab, config = load_model(out)
    assert model.direct == 1000 and model.direct_order == 3 and bool(model.params["D"].abs().sum() > 0)
    assert config["training"]["model_config"]["direct"] == 1000 and config["model"]["direct"] == 1000
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--test", str(tmp_path / "one.txt"), "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    corpus = encode(tmp_path / "one.txt", vocab)
    assert evaluation["perplexity"] == pytest.approx(evaluate_corpus(model, corpus, vocab).perplexity, rel=1e-6)
    # make the direct connections weigh a lot, then: eval and score agree on a one-sentence text (both
    # start from a zero state and the history <eos>), and without D the perplexity changes
    model.params["D"].copy_(torch.randn(model.direct, generator=torch.Generator().manual_seed(0)))
    ln_p = float(sentence_ln_probs(model, corpus).sum())
    nats = evaluate_corpus(model, corpus, vocab).nats
    assert -ln_p == pytest.approx(nats, rel=1e-5)
    saved_D = model.params["D"].clone()
    model.params["D"].zero_()
    assert evaluate_corpus(model, corpus, vocab).nats != pytest.approx(nats, rel=1e-3)
    model.params["D"].copy_(saved_D)
    # generate with top-k 1 picks the argmax of the model's distribution after the whole history
    words = sample(model, vocab, words=8, top_k=1, prompt=["a", "b"])
    history = [vocab.id("<eos>"), vocab.id("a"), vocab.id("b")]
    for word in words:
        log_p, _ = model.log_probs(torch.tensor(history).unsqueeze(1))
        assert vocab.words[int(log_p[-1, 0].argmax())] == word
        history.append(vocab.id(word))
