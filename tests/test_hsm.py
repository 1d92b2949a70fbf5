"""The hierarchical softmax output layer: Huffman tree, exact gradients, exact normalization, training."""

from __future__ import annotations

import heapq
import json

import numpy as np
import pytest
import torch

from bptt import ElmanLM
from bptt.verify import finite_difference_grads
from bptt.engine.outputs.hsm import HierarchicalSoftmaxOutput, _group_by_node, huffman_tree
from conftest import (
    assert_normalized_and_matches_loss,
    check_layer_against_autograd,
    layer_model,
    max_rel_error,
    random_data,
    write_ten_word_corpus,
)

COUNTS = [50, 30, 20, 9, 8, 5, 4, 3, 2, 1, 1]  # 11 words, Zipf-like


def hsm_model(bias=True, seed=0, V=11, m=5):
    return layer_model("hsm", COUNTS[:V], bias=bias, seed=seed, m=m)


def data(T=5, B=3, V=11, seed=0):
    return random_data(T, B, V, 5, seed)


@pytest.mark.parametrize("counts", [COUNTS, [1] * 7, [3, 0, 7, 7, 1, 0, 2, 2, 9], [4, 4]])
def test_huffman_tree_properties(counts):
    paths, codes = huffman_tree(counts)
    V = len(counts)
    assert len(paths) == len(codes) == V
    assert all(len(p) == len(c) and 1 <= len(p) <= V - 1 for p, c in zip(paths, codes))
    assert {n for p in paths for n in p} == set(range(V - 1))  # V−1 inner nodes, all used
    assert all(p[0] == V - 2 for p in paths)  # every path starts at the root
    words = [tuple(c) for c in codes]
    assert len(set(words)) == V
    assert not any(a != b and b[: len(a)] == a for a in words for b in words)  # prefix-free
    assert sum(2.0 ** -len(c) for c in codes) == 1.0  # a full binary tree (Kraft equality)
    for i in range(V):  # more frequent -> no longer
        for j in range(V):
            if counts[i] > counts[j]:
                assert len(codes[i]) <= len(codes[j])
    # a node's path prefix and code prefix agree: the same prefix of codes leads to the same node
    seen: dict[tuple, int] = {}
    for p, c in zip(paths, codes):
        for d in range(len(p)):
            assert seen.setdefault(tuple(c[:d]), p[d]) == p[d]
    assert huffman_tree(list(counts)) == (paths, codes)  # deterministic


def heap_huffman(counts):
    """The tree built the textbook way, sharing no code with hsm.py: a heap of (count, id), the two
    lightest merged (the first popped takes bit 0), the paths read by walking up from each word."""
    V = len(counts)
    heap = [(float(c), w) for w, c in enumerate(counts)]
    heapq.heapify(heap)
    parent, bit = {}, {}
    for k in range(V - 1):
        c0, a = heapq.heappop(heap)
        c1, b = heapq.heappop(heap)
        parent[a], bit[a], parent[b], bit[b] = V + k, 0, V + k, 1
        heapq.heappush(heap, (c0 + c1, V + k))
    paths, codes = [], []
    for w in range(V):
        path, code, node = [], [], w
        while node in parent:
            path.append(parent[node] - V)
            code.append(bit[node])
            node = parent[node]
        paths.append(path[::-1])
        codes.append(code[::-1])
    return paths, codes


@pytest.mark.parametrize("seed", range(6))
def test_huffman_tree_is_the_heaps_tree(seed):
    """The two-queue construction builds exactly the tree of a heap of (count, id), ties included (so
    a model saved with an hsm layer finds its tree again): counts with many ties and zeros, Zipf counts,
    and sums that tie with words."""
    rng = np.random.default_rng(seed)
    V = int(rng.integers(2, 400))
    cases = [rng.integers(0, 4, V), rng.integers(1, 1000, V), np.floor(1000 / np.arange(1, V + 1)),
             rng.choice([1, 2, 3, 4, 6], V), rng.random(V) * 10]
    for counts in cases:
        assert huffman_tree(counts.tolist()) == heap_huffman(counts.tolist())


def test_huffman_tree_by_hand_and_degenerate():
    # merges: w1+w2 -> node 0 (w1 bit 0); w3 (2, inserted before node 0) + node 0 -> node 1; node 1 + w0 -> root 2
    assert huffman_tree([5, 1, 1, 2]) == ([[2], [2, 1, 0], [2, 1, 0], [2, 1]], [[1], [0, 1, 0], [0, 1, 1], [0, 0]])
    assert huffman_tree([1, 1]) == ([[0], [0]], [[0], [1]])
    with pytest.raises(ValueError, match="at least 2"):
        huffman_tree([5])
    with pytest.raises(ValueError, match="at least 2"):
        ElmanLM(1, 4, output="hsm")
    with pytest.raises(ValueError, match="non-negative"):
        huffman_tree([3, -1])


def test_params_shapes():
    model = hsm_model()
    assert model.params["V"].shape == (10, 5) and model.params["c"].shape == (10,)
    assert set(hsm_model(bias=False).params) == {"U", "W", "V"}
    assert ElmanLM(6, 3, output="hsm").params["V"].shape == (5, 3)  # word_counts default: all ones


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_against_finite_differences_masked_and_unmasked(bias):
    """BPTT through the tree against finite differences of the loss, with and without a mask."""
    model = hsm_model(bias)
    x, y, h0 = data()
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[4, 1] = False
    mask[0, 2] = False
    _, grads, _ = model.loss_and_grads(x, y, h0, mask=mask)
    assert set(grads) == ({"U", "W", "V", "b", "c"} if bias else {"U", "W", "V"})
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0, mask=mask)) <= 1e-6
    # RTRL runs this very layer's forward/backward: agreement checks RTRL's path, not the layer
    _, grads_rtrl, _ = model.loss_and_grads(x, y, h0, mask=mask, method="rtrl")
    assert max_rel_error(grads, grads_rtrl) <= 1e-10
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) <= 1e-6


@pytest.mark.parametrize("weighted", [False, True])
def test_layer_gradient_against_autograd_of_the_path_product(weighted):
    model = hsm_model()
    layer: HierarchicalSoftmaxOutput = model.output
    S = torch.rand(7, 5, dtype=torch.float64) - 0.5
    y = torch.tensor([0, 3, 10, 10, 5, 1, 7])
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 3.0], dtype=torch.float64) if weighted else None

    paths, codes = heap_huffman(COUNTS)

    def reference(leaves, S_leaf):  # straightforward: one position, one node at a time, P = Π σ(±z)
        total = 0
        for n in range(7):
            log_p = 0
            for node, bit in zip(paths[int(y[n])], codes[int(y[n])]):
                z = S_leaf[n] @ leaves["V"][node] + leaves["c"][node]
                log_p = log_p + torch.log(torch.sigmoid(z) if bit == 0 else 1 - torch.sigmoid(z))
            total = total - (1.0 if w is None else w[n]) * log_p
        return total

    loss, total = check_layer_against_autograd(layer, model.params, ("V", "c"), S, y, w, reference)
    assert abs(loss - total) < 1e-12


def test_probabilities_sum_to_one_and_match_the_loss():
    model = hsm_model()
    assert_normalized_and_matches_loss(model, *data(T=6, B=4))
    layer = model.output  # chunking over positions changes nothing
    S = torch.rand(9, 5, dtype=torch.float64) - 0.5
    full = layer.log_probs(model.params, S)
    layer.LOG_PROBS_CHUNK_ELEMENTS = 11 * layer.depth * 2  # 2 positions per chunk
    torch.testing.assert_close(layer.log_probs(model.params, S), full, rtol=0, atol=0)


def test_probabilities_sum_to_one_without_bias_and_uniform_counts():
    model = ElmanLM(13, 4, output="hsm", bias=False, dtype=torch.float64, seed=3, init_range=1.0)
    x = torch.randint(0, 13, (4, 3), generator=torch.Generator().manual_seed(5))
    log_probs, _ = model.log_probs(x)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4, 3, dtype=torch.float64))


def test_removing_the_bias_gradient_is_rejected(monkeypatch):
    model = hsm_model()
    x, y, h0 = data()
    original = HierarchicalSoftmaxOutput.backward

    def without_bias_gradient(self, params, S, cache, targets, weights, grads):
        saved = grads["c"].clone()
        dS = original(self, params, S, cache, targets, weights, grads)
        grads["c"].copy_(saved)  # drop ∂L/∂c
        return dS

    monkeypatch.setattr(HierarchicalSoftmaxOutput, "backward", without_bias_gradient)
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) > 1e-3


def test_sigma_instead_of_sigma_minus_one_is_rejected(monkeypatch):
    model = hsm_model()
    x, y, h0 = data()
    original = HierarchicalSoftmaxOutput.forward

    def shifted_cache(self, params, S, targets, weights=None):
        loss, cache = original(self, params, S, targets, weights)
        cache.sig = cache.sig + 1.0  # backward then uses σ(u) where σ(u) − 1 belongs
        return loss, cache

    monkeypatch.setattr(HierarchicalSoftmaxOutput, "forward", shifted_cache)
    _, grads, _ = model.loss_and_grads(x, y, h0)
    assert max_rel_error(grads, finite_difference_grads(model, x, y, h0)) > 1e-3


def test_hsm_output_requires_cross_entropy():
    with pytest.raises(ValueError, match="cross_entropy"):
        ElmanLM(11, 4, output="hsm", loss="quadratic", output_activation="sigmoid", word_counts=COUNTS)
    with pytest.raises(ValueError, match="covers 11 words"):
        HierarchicalSoftmaxOutput(COUNTS).param_shapes(12, 4, True)


def test_train_eval_score_with_hsm_output(tmp_path, capsys):
    from bptt.cli import main

    write_ten_word_corpus(tmp_path / "t.txt")
    model_dir = str(tmp_path / "m")
    assert main(["train", "--train", str(tmp_path / "t.txt"), "--valid", str(tmp_path / "t.txt"), "--model",
                 model_dir, "--output", "hsm", "--hidden", "8", "--batch", "4", "--epochs", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", model_dir, "--test", str(tmp_path / "t.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] < 12  # 10 words + <eos> + <unk>
    assert main(["score", "--model", model_dir, "--text", str(tmp_path / "t.txt")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 120


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_path_equals_the_padded_path(weighted, bias):
    """The CPU's sparse path (sampled_addmm, CSR products, dV over the distinct nodes) gives the padded
    batched path's loss, dS, dV and dc (the path the GPU runs) to rounding, on a Zipf-like vocabulary of
    300 words where paths have very different lengths and targets repeat."""
    counts = (1000.0 / np.arange(1, 301)).round() + 1
    layer = HierarchicalSoftmaxOutput(counts.tolist())
    gen = torch.Generator().manual_seed(4)
    N, m = 64, 6
    params = {"V": torch.randn(299, m, generator=gen, dtype=torch.float64)}
    if bias:
        params["c"] = torch.randn(299, generator=gen, dtype=torch.float64)
    S = torch.randn(N, m, generator=gen, dtype=torch.float64)
    y = torch.multinomial(torch.tensor(counts), N, replacement=True, generator=gen)
    w = torch.rand(N, generator=gen, dtype=torch.float64).round() * 2 if weighted else None
    results = {}
    for sparse in (True, False):
        layer.sparse = sparse
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        loss, cache = layer.forward(params, S, y, w)
        assert (cache.pairs is not None) == sparse
        dS = layer.backward(params, S, cache, y, w, grads)
        results[sparse] = (loss, dS, grads)
    (loss_s, dS_s, g_s), (loss_p, dS_p, g_p) = results[True], results[False]
    torch.testing.assert_close(loss_s, loss_p, rtol=1e-13, atol=0)
    torch.testing.assert_close(dS_s, dS_p, rtol=1e-12, atol=1e-14)
    for k in params:
        torch.testing.assert_close(g_s[k], g_p[k], rtol=1e-12, atol=1e-14)
    assert len(set(y.tolist())) < N and int(layer.mask.sum(1).max()) > 2 * int(layer.mask.sum(1).min())


@pytest.mark.parametrize("nodes", [9_999, 65_536, 70_000])
def test_pairs_are_grouped_by_node_stably_either_way(nodes):
    """The radix sort (numpy, 16-bit keys, up to 65,536 nodes) and torch's sort (more nodes) both give the
    stable order: within a node, the pairs in their original (position) order."""
    g = torch.Generator().manual_seed(nodes)
    pair_nodes = torch.cat((torch.randint(0, nodes, (3000,), generator=g), torch.zeros(500, dtype=torch.int64),
                            torch.full((300,), nodes - 1)))[torch.randperm(3800, generator=g)]
    order = _group_by_node(pair_nodes, nodes)
    assert order.dtype == torch.int64
    assert torch.equal(order, torch.argsort(pair_nodes, stable=True))
