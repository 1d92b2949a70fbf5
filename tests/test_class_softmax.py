"""The class-based softmax output layer: exact gradients, exact normalization, classes, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bptt import ElmanLM
from bptt.verify import finite_difference_grads
from bptt.engine.outputs.class_softmax import ClassSoftmaxOutput, frequency_classes
from conftest import (
    assert_normalized_and_matches_loss,
    check_layer_against_autograd,
    layer_model,
    max_rel_error,
    random_data,
    write_ten_word_corpus,
)

COUNTS = [50, 30, 20, 9, 8, 5, 4, 3, 2, 1, 1]  # 11 words, Zipf-like


def class_model(bias=True, classes=4, seed=0, V=11, m=5):
    return layer_model("class", COUNTS[:V], bias=bias, seed=seed, m=m, classes=classes)


def data(T=5, B=3, V=11, seed=0):
    return random_data(T, B, V, 5, seed)


def test_frequency_binning():
    classes = frequency_classes(COUNTS, 4)
    assert classes.tolist() == sorted(classes.tolist())  # counts are sorted: classes are contiguous
    assert classes[0] == 0 and classes[-1] == classes.max()
    sizes = np.bincount(classes)
    assert (sizes > 0).all() and sizes[0] <= sizes[-1]  # frequent words: small classes
    assert frequency_classes([100, 1, 1, 1], 4).max() + 1 < 4  # a word above 1/C leaves bins empty: dropped
    with pytest.raises(ValueError, match="--classes"):
        frequency_classes(COUNTS, 0)


def _bins_by_thresholds(counts, n_classes, weigh):
    """A reference for the binning, written as threshold counting: words sorted by count (stable), a word's bin
    the number of cuts k·total/C (k = 1..C−1) at or below the weight of the words before it; bins renumbered."""
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    total = sum(weigh(counts[i]) for i in order)
    bins, before = {}, 0.0
    for i in order:
        bins[i] = sum(1 for k in range(1, n_classes) if k * total / n_classes <= before)
        before += weigh(counts[i])
    used = sorted(set(bins.values()))
    return [used.index(bins[i]) for i in range(len(counts))]


@pytest.mark.parametrize("binning, weigh", [("frequency", float), ("sqrt", np.sqrt)])
def test_binning_against_threshold_counting(binning, weigh):
    rng = np.random.default_rng(1)
    for counts, C in [(COUNTS, 4), ([5, 5, 5, 5], 2), ([100, 1, 1, 1], 4), (list(rng.integers(0, 500, 60)), 7),
                      (sorted((1000 // r for r in range(1, 300)), reverse=True), 20)]:
        assert frequency_classes(counts, C, binning).tolist() == _bins_by_thresholds(counts, C, weigh)


def test_sqrt_binning_makes_fewer_empty_bins_and_less_arithmetic_on_a_zipf_vocabulary():
    """Square roots spread a Zipf vocabulary's mass: the frequent words no longer take bins alone (none dropped
    here), and the layer's cost per position, C' + E[K_class(y)] under the unigram, falls."""
    counts = [100_000 // r for r in range(1, 2001)]
    p = np.asarray(counts) / sum(counts)

    def cost(classes):
        sizes = np.bincount(classes)
        return len(sizes) + float((sizes[classes] * p).sum())

    freq, root = frequency_classes(counts, 40), frequency_classes(counts, 40, "sqrt")
    assert freq.max() + 1 < 40 == root.max() + 1
    assert cost(root) < 0.8 * cost(freq)
    with pytest.raises(ValueError, match="--class-binning"):
        frequency_classes(counts, 40, "log")


@pytest.mark.parametrize("binning", ["frequency", "sqrt"])
def test_the_binning_reaches_the_layer_the_saved_model_and_the_memory_guard(tmp_path, binning):
    from bptt import RNNLM
    from bptt.model import ModelConfig
    from bptt.training.resources import parameter_count

    counts = [10_000, 400, 0] + [1] * 37  # frequency binning drops bins here; sqrt binning does not
    expected = frequency_classes(counts, 6, binning)
    elman = ElmanLM(40, 7, output="class", classes=6, class_binning=binning, word_counts=counts)
    lstm = RNNLM(40, 7, cell="lstm", output="class", classes=6, class_binning=binning, word_counts=counts)
    for model in (elman, lstm):
        assert model.output.word_class.tolist() == expected.tolist()
    config = ModelConfig(vocab_size=40, hidden_size=7, output="class", classes=6, class_binning=binning)
    assert parameter_count(config, counts) == sum(p.numel() for p in elman.params.values())
    assert (frequency_classes(counts, 6, "sqrt").max() > frequency_classes(counts, 6).max())  # the case differs
    # the memory guard's workspace: two floats per position and score, C' + E[K_class(y)] scores a position
    from bptt.training.resources import estimate_training_memory

    sizes = np.bincount(expected)
    scores = len(sizes) + float((sizes[expected] * np.asarray(counts)).sum() / sum(counts))
    est = estimate_training_memory(config, batch=4, k1=10, word_counts=counts, optimizer="sgd")
    assert est.parts["output workspace"] == 2 * int(40 * scores) * 4


def test_a_config_without_the_binning_is_frequency_binning_and_a_bad_one_is_refused():
    from bptt.model import ModelConfig

    old = ModelConfig(vocab_size=40, hidden_size=7, output="class").to_json()
    del old["class_binning"]  # a model saved before the option
    assert ModelConfig.from_json(old).class_binning == "frequency"
    with pytest.raises(ValueError, match="class_binning"):
        ModelConfig(vocab_size=40, hidden_size=7, output="class", class_binning="log").validate()


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_against_finite_differences_masked_and_unmasked(bias):
    """BPTT through the class layer against finite differences of the loss, with and without a mask:
    the masked case checks the position weights in both softmaxes' gradients (class and within class)."""
    model = class_model(bias)
    x, y, h0 = data()
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[4, 1] = mask[0, 2] = mask[2, 0] = False
    _, grads, _ = model.loss_and_grads(x, y, h0, mask=mask)
    assert set(grads) == ({"U", "W", "V", "Vc", "b", "c", "cc"} if bias else {"U", "W", "V", "Vc"})
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0, mask=mask)) <= 1e-6
    # RTRL runs this very layer's forward/backward: agreement checks RTRL's path, not the layer
    _, grads_rtrl, _ = model.loss_and_grads(x, y, h0, mask=mask, method="rtrl")
    assert max_rel_error(grads, grads_rtrl) <= 1e-10
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) <= 1e-6


@pytest.mark.parametrize("scattered", [False, True], ids=["consecutive-classes", "scattered-classes"])
@pytest.mark.parametrize("weighted", [False, True])
def test_layer_gradient_against_autograd_of_the_factorized_probability(weighted, scattered):
    """Frequency binning makes every class a run of consecutive word ids, read and written as slices of
    V and c; a class map whose classes are scattered over the ids takes the gather/scatter path."""
    model = class_model()
    layer: ClassSoftmaxOutput = model.output
    assert all(span is not None for span in layer.spans)
    if scattered:
        layer = ClassSoftmaxOutput(torch.arange(11) % 4)  # words 0, 4, 8 in class 0, ...: no slices
        assert all(span is None for span in layer.spans)
    S = torch.rand(7, 5, dtype=torch.float64) - 0.5
    y = torch.tensor([0, 3, 10, 10, 5, 1, 7])
    # position weights (a mask is weights of 0 and 1): 0 and fractions, in classes met more than once
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25, 3.0], dtype=torch.float64) if weighted else None

    def reference(leaves, S_leaf):
        log_cls = torch.log_softmax(S_leaf @ leaves["Vc"].T + leaves["cc"], -1)
        total = 0
        for n in range(7):
            c = int(layer.word_class[y[n]])
            members = layer.members[c]
            inner = torch.log_softmax(S_leaf[n] @ leaves["V"][members].T + leaves["c"][members], -1)
            nll = -log_cls[n, c] - inner[int((members == y[n]).nonzero())]
            total = total + (1.0 if w is None else w[n]) * nll
        return total

    loss, total = check_layer_against_autograd(layer, model.params, ("V", "c", "Vc", "cc"), S, y, w, reference)
    assert abs(loss - total) < 1e-12


def test_probabilities_sum_to_one_and_match_the_loss():
    model = class_model()
    assert_normalized_and_matches_loss(model, *data(T=6, B=4))


def test_removing_the_class_term_is_rejected(monkeypatch):
    """(In the eager backward: the compiled pass off. The compiled forward_backward is checked against
    autograd in test_layer_gradient_against_autograd_of_the_factorized_probability.)"""
    from bptt.engine import native

    monkeypatch.setattr(native, "_enabled", False)
    model = class_model()
    x, y, h0 = data()
    original = ClassSoftmaxOutput.backward

    def without_class_gradient(self, params, S, cache, targets, weights, grads):
        dS = original(self, params, S, cache, targets, weights, grads)
        grads["Vc"].zero_()  # drop ∂L/∂Vc
        return dS

    monkeypatch.setattr(ClassSoftmaxOutput, "backward", without_class_gradient)
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) > 1e-3


def test_class_output_requires_cross_entropy():
    with pytest.raises(ValueError, match="cross_entropy"):
        ElmanLM(11, 4, output="class", loss="quadratic", word_counts=COUNTS)
    with pytest.raises(ValueError, match="unknown output"):
        ElmanLM(11, 4, output="no-such-layer")


def test_train_eval_score_with_class_output(tmp_path, capsys):
    from bptt.cli import main

    write_ten_word_corpus(tmp_path / "t.txt")
    model_dir = str(tmp_path / "m")
    assert main(["train", "--train", str(tmp_path / "t.txt"), "--valid", str(tmp_path / "t.txt"), "--model",
                 model_dir, "--output", "class", "--classes", "4", "--class-binning", "sqrt", "--hidden", "8",
                 "--batch", "4", "--epochs", "2", "--quiet"]) == 0
    capsys.readouterr()
    from bptt.storage.saved_model import load_model

    model, vocab, _ = load_model(model_dir)  # the saved model keeps its binning
    assert model.output.word_class.tolist() == frequency_classes(vocab.counts, 4, "sqrt").tolist()
    assert model.output.word_class.tolist() != frequency_classes(vocab.counts, 4).tolist()
    assert main(["eval", "--model", model_dir, "--test", str(tmp_path / "t.txt"), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["perplexity"] < 12  # 10 words + <eos> + <unk>
    assert main(["score", "--model", model_dir, "--text", str(tmp_path / "t.txt")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 120
