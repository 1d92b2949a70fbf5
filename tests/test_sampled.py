"""NCE and sampled softmax (outputs/sampled.py): exact gradients of the sampled objectives with frozen
noise, the noise distribution, accidental hits, exact evaluation probabilities, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bptt import ElmanLM
from bptt.verify import finite_difference_grads
from bptt.engine.outputs import OUTPUT_LAYERS
from bptt.engine.outputs.full import FullOutput
from bptt.engine.outputs.sampled import NCEOutput, SampledSoftmaxOutput, UnigramNoise
from conftest import check_layer_against_autograd, layer_model, max_rel_error, random_data

COUNTS = [50, 30, 20, 9, 8, 5, 4, 3, 2, 1, 1]  # 11 words, Zipf-like
V, M = 11, 5
NOISE = torch.tensor([0, 3, 3, 7, 10, 1, 5, 0])  # frozen noise: repeats, and (with random targets) hits
OUTPUTS = ["nce", "sampled"]
LAYERS = {"nce": NCEOutput, "sampled": SampledSoftmaxOutput}


def sampled_model(output, bias=True, seed=0, freeze=True):
    model = layer_model(output, COUNTS, bias=bias, seed=seed, m=M)
    if freeze:
        model.output.freeze_noise(NOISE)
    return model


def data(T=5, B=3, seed=0):
    return random_data(T, B, V, M, seed)


def test_registered_with_the_full_softmax_parameters():
    assert {"nce", "sampled"} <= set(OUTPUT_LAYERS)
    for output in OUTPUTS:
        model = sampled_model(output)
        assert isinstance(model.output, LAYERS[output])
        assert model.output.samples == 64 and model.output.noise.alpha == 0.75
        assert set(model.params) == {"U", "W", "b", "V", "c"}
        assert model.params["V"].shape == (V, M) and model.params["c"].shape == (V,)
        assert set(sampled_model(output, bias=False).params) == {"U", "W", "V"}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_gradients_against_finite_differences_masked_and_unmasked(output, bias):
    """BPTT through the sampled objectives (frozen noise) against finite differences, with and without a mask."""
    model = sampled_model(output, bias)
    x, y, h0 = data()
    assert (y.reshape(-1, 1) == NOISE).any()  # some accidental hits among the targets
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) <= 1e-6
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[4, 1] = mask[0, 2] = False
    _, grads, _ = model.loss_and_grads(x, y, h0, mask=mask)  # masked: against finite differences too
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0, mask=mask)) <= 1e-6
    # RTRL runs this very layer's forward/backward: agreement checks RTRL's path, not the layer
    _, grads_rtrl, _ = model.loss_and_grads(x, y, h0, mask=mask, method="rtrl")
    assert max_rel_error(grads, grads_rtrl) <= 1e-10


def autograd_objective(output, V_, c_, S, y, samples, log_q, weights):
    """The objectives written independently, for autograd: per position, no shared helpers."""
    k = samples.numel()
    total = 0
    for n in range(S.shape[0]):
        s_y = V_[y[n]] @ S[n] + (c_[y[n]] if c_ is not None else 0)
        s_x = V_[samples] @ S[n] + (c_[samples] if c_ is not None else 0)
        if output == "nce":
            d_y = s_y - np.log(k) - log_q[y[n]]
            d_x = s_x - np.log(k) - log_q[samples]
            term = torch.nn.functional.logsigmoid(d_y) + torch.nn.functional.logsigmoid(-d_x).sum()
        else:
            z_x = (s_x - log_q[samples])[samples != y[n]]  # accidental hits left out
            term = torch.log_softmax(torch.cat([(s_y - log_q[y[n]]).reshape(1), z_x]), 0)[0]
        total = total - weights[n] * term
    return total


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_layer_gradient_against_autograd(output, bias):
    model = sampled_model(output, bias)
    layer = model.output
    g = torch.Generator().manual_seed(5)
    S = torch.rand(9, M, generator=g, dtype=torch.float64) - 0.5
    y = torch.tensor([0, 3, 10, 10, 5, 1, 7, 2, 3])
    weights = torch.rand(9, generator=g, dtype=torch.float64)
    weights[4] = 0.0
    names = ["V", "c"] if bias else ["V"]

    def reference(leaves, S_leaf):
        return autograd_objective(output, leaves["V"], leaves.get("c"), S_leaf, y, NOISE, layer.noise.log_probs,
                                  weights)

    loss, total = check_layer_against_autograd(layer, model.params, names, S, y, weights, reference)
    assert abs(loss - total) <= 1e-12 * max(1.0, abs(total))


def test_noise_is_unigram_to_the_alpha_normalised():
    noise = UnigramNoise(COUNTS)
    want = torch.tensor(COUNTS, dtype=torch.float64) ** 0.75
    torch.testing.assert_close(noise.probs, want / want.sum(), rtol=1e-15, atol=0)
    torch.testing.assert_close(noise.log_probs, noise.probs.log())
    assert abs(float(noise.probs.sum()) - 1) < 1e-15
    torch.testing.assert_close(UnigramNoise(COUNTS, alpha=1.0).probs, torch.tensor(COUNTS) / sum(COUNTS))
    torch.testing.assert_close(UnigramNoise([0, 0, 0, 0]).probs, torch.full((4,), 0.25))  # no counts: uniform
    assert float(UnigramNoise([16, 0]).probs[1]) == 1 / 9  # a zero count counts as 1 (still drawable)
    draws = noise.sample(200_000)
    assert draws.dtype == torch.int64 and draws.shape == (200_000,)
    empirical = torch.bincount(draws, minlength=V).double() / draws.numel()
    assert float((empirical - noise.probs).abs().max()) < 0.005
    with pytest.raises(ValueError, match="non-negative"):
        UnigramNoise([3, -1])


def test_same_seed_same_samples_and_a_fresh_draw_per_call():
    a, b = NCEOutput(COUNTS, samples=16, seed=7), NCEOutput(COUNTS, samples=16, seed=7)
    first = [a.draw() for _ in range(3)]
    assert all(torch.equal(s, b.draw()) for s in first)  # same seed: the same sequence of draws
    assert not torch.equal(first[0], first[1])  # a fresh draw each call
    assert not torch.equal(first[0], NCEOutput(COUNTS, samples=16, seed=8).draw())
    assert first[0].shape == (16,)
    # through the model: the same seed gives the same (unfrozen) objective, call after call
    m1, m2 = sampled_model("sampled", freeze=False), sampled_model("sampled", freeze=False)
    x, y, h0 = data()
    losses = [float(m1.loss(x, y, h0)) for _ in range(2)]
    assert losses == [float(m2.loss(x, y, h0)) for _ in range(2)] and losses[0] != losses[1]
    # frozen: every call the same samples; unfrozen: the generator goes on drawing
    a.freeze_noise([1, 2, 2])
    assert a.draw().tolist() == [1, 2, 2] == a.draw().tolist()
    a.unfreeze_noise()
    assert a.draw().shape == (16,)
    with pytest.raises(ValueError, match="outside"):
        a.freeze_noise([0, V])


def test_forward_and_backward_use_the_same_samples():
    """Unfrozen: backward reads the samples of its forward (the cache), not a new draw."""
    model = sampled_model("nce", freeze=False)
    layer = model.output
    S = torch.rand(6, M, dtype=torch.float64) - 0.5
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    layer.noise.generator.manual_seed(3)
    grads = {k: torch.zeros_like(model.params[k]) for k in ("V", "c")}
    _, cache = layer.forward(model.params, S, y)
    dS = layer.backward(model.params, S, cache, y, None, grads)
    layer.noise.generator.manual_seed(3)
    samples = layer.draw()
    layer.freeze_noise(samples)
    frozen = {k: torch.zeros_like(model.params[k]) for k in ("V", "c")}
    _, cache = layer.forward(model.params, S, y)
    assert torch.equal(cache.samples, samples)
    torch.testing.assert_close(layer.backward(model.params, S, cache, y, None, frozen), dS)
    torch.testing.assert_close(frozen, grads)


def test_accidental_hits_are_removed():
    layer = SampledSoftmaxOutput(COUNTS)
    kept = SampledSoftmaxOutput(COUNTS, remove_accidental_hits=False)
    g = torch.Generator().manual_seed(0)
    params = {"V": torch.rand(V, M, generator=g) - 0.5, "c": torch.rand(V, generator=g) - 0.5}
    S = torch.rand(2, M, generator=g) - 0.5
    y = torch.tensor([2, 6])
    for lay in (layer, kept):
        lay.freeze_noise([2, 5, 2, 8])  # position 0's target drawn twice as noise
    log_q = layer.noise.log_probs

    def logit(n, w):
        return params["V"][w] @ S[n] + params["c"][w] - log_q[w]

    want = -(torch.log_softmax(torch.stack([logit(0, 2), logit(0, 5), logit(0, 8)]), 0)[0]
             + torch.log_softmax(torch.stack([logit(1, w) for w in (6, 2, 5, 2, 8)]), 0)[0])
    loss, cache = layer.forward(params, S, y)
    torch.testing.assert_close(loss, want)
    p = cache.dx  # softmax over [target, samples]
    assert p[0, 1] == 0 and p[0, 3] == 0 and p[1, 1:].min() > 0  # a removed hit has probability 0
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    layer.backward(params, S, cache, y, None, grads)
    assert torch.isfinite(grads["V"]).all() and torch.isfinite(grads["c"]).all()
    loss_kept, _ = kept.forward(params, S, y)
    assert float(loss_kept) > float(loss)  # the hits, counted as noise, take probability from the target


@pytest.mark.parametrize("output", OUTPUTS)
def test_log_probs_are_the_exact_full_softmax(output):
    model = sampled_model(output)
    x, _, h0 = data(T=6, B=4)
    log_probs, _ = model.log_probs(x, h0)  # (T,B,V) for random histories
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(6, 4, dtype=torch.float64))
    S = model.forward(x, h0).reshape(-1, M)
    torch.testing.assert_close(log_probs.reshape(-1, V), FullOutput().log_probs(model.params, S), rtol=0, atol=1e-14)


@pytest.mark.parametrize("output", OUTPUTS)
def test_dropping_the_noise_term_is_rejected(output, monkeypatch):
    model = sampled_model(output)
    x, y, h0 = data()
    cls = LAYERS[output]
    original = cls._score_errors

    def without_noise_term(self, cache, targets, weights):
        dy, dx = original(self, cache, targets, weights)
        return dy, torch.zeros_like(dx)  # drop ∂L/∂s(x_j): the noise samples' term

    monkeypatch.setattr(cls, "_score_errors", without_noise_term)
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) > 1e-3


@pytest.mark.parametrize("output", OUTPUTS)
def test_requires_softmax_cross_entropy(output):
    with pytest.raises(ValueError, match="cross_entropy"):
        ElmanLM(V, 4, output=output, loss="quadratic", output_activation="sigmoid", word_counts=COUNTS)
    with pytest.raises(ValueError, match="softmax"):
        LAYERS[output](COUNTS, "cross_entropy", "identity")
    with pytest.raises(ValueError, match="samples"):
        LAYERS[output](COUNTS, samples=0)


@pytest.mark.parametrize("output", OUTPUTS)
def test_train_and_eval_through_the_cli(output, tmp_path, capsys):
    from bptt.cli import main

    rng = np.random.default_rng(0)
    lines = [f"{rng.choice(['the', 'a'])} {rng.choice(['cat', 'dog', 'bird'])} {rng.choice(['sat', 'ran'])} on the "
             f"{rng.choice(['mat', 'hill'])}" for _ in range(200)]  # 10 words + <eos> + <unk>: V = 12
    text = tmp_path / "t.txt"
    text.write_text("\n".join(lines) + "\n")
    model_dir = str(tmp_path / "m")
    assert main(["train", "--train", str(text), "--valid", str(text), "--model", model_dir, "--output", output,
                 "--hidden", "16", "--batch", "4", "--epochs", "5", "--lr", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: " in printed and "train ppl" in printed  # per-epoch line (train ppl: of the sampled objective)
    assert main(["eval", "--model", model_dir, "--test", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] < 5  # uniform: 12; the grammar allows ~1.6
