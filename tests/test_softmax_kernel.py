"""The full softmax's compiled loss and gradient (outputs/softmax_cpu.cpp, built by engine/native.py):
against torch's own cross-entropy with autograd (no code shared with the engine), against the eager
output layer it replaces, through whole models, and where it must not run.

The kernel adds the bias, computes −Σ_n w_n log softmax(g_n)_{y_n}, overwrites the scores with
∂L/∂g = w (softmax(g) − d) and accumulates dc = Σ_n ∂L/∂g_n, in blocks of 32 rows with the vector loop
and its tail; the sizes below reach both (V = 3, 101: tails only or both; 10,000: the vector loop), and
one block or many (N = 5, 37, 700). Where a C++ compiler and ninja exist the kernel must build.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bptt.engine import native
from bptt.engine.outputs.full import FullOutput
from bptt.engine.sweep import loss_and_grads
from bptt.model import LanguageModel, ModelConfig
from conftest import compiled_or_skip


@pytest.fixture(scope="module")
def kernel():
    return compiled_or_skip("softmax", "the full softmax's")


def case(N, V, dtype, seed=0, weighted=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(N, V, generator=g, dtype=dtype) * 3
    c = torch.randn(V, generator=g, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    w = (torch.rand(N, generator=g) > 0.3).to(dtype) * 1.5 if weighted else None
    return scores, c, y, w


def autograd_reference(scores, c, y, w):
    """(L, ∂L/∂g, ∂L/∂c) of L = Σ_n w_n CE(g_n + c, y_n) by torch's cross_entropy and autograd, in float64."""
    g = scores.double().clone().requires_grad_()
    b = c.double().clone().requires_grad_()
    per = F.cross_entropy(g + b, y, reduction="none")
    loss = (per if w is None else per * w.double()).sum()
    loss.backward()
    return loss.detach(), g.grad, b.grad


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # float32: the rounding of g + c itself, at |g| ≈ 15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("N, V", [(5, 3), (37, 101), (700, 10000), (64, 32)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_loss_gradient_and_bias_gradient_equal_autograd(kernel, dtype, N, V, bias, weighted):
    scores, c, y, w = case(N, V, dtype, weighted=weighted)
    if not bias:
        c = torch.zeros_like(c)
    before = torch.randn(V, dtype=dtype)  # dc accumulates into what is there
    dc = before.clone()
    g = scores.clone()
    loss = kernel.softmax_xent_(g, c if bias else None, y, w, dc if bias else None)
    ref_loss, ref_dg, ref_dc = autograd_reference(scores, c, y, w)
    tol = TOL[dtype]
    assert loss.dtype == dtype and loss.dim() == 0
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    assert float((g.double() - ref_dg).abs().max()) <= tol
    if bias:
        assert float((dc.double() - before.double() - ref_dc).abs().max()) <= tol * N ** 0.5 * 4
    else:
        assert torch.equal(dc, before)


def test_the_result_does_not_depend_on_the_number_of_threads(kernel):
    """Fixed blocks of rows, their column sums added in block order: one thread and two give the same bits."""
    scores, c, y, w = case(700, 1000, torch.float32, seed=3, weighted=True)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            g, dc = scores.clone(), torch.zeros(1000, dtype=torch.float32)
            out.append((kernel.softmax_xent_(g, c, y, w, dc), g, dc))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk_scores", [None, 3 * 101], ids=["whole", "chunks-of-3-rows"])
def test_the_layer_compiled_equals_the_layer_eager(kernel, chunk_scores):
    """FullOutput.forward_backward with the kernel against its own eager forward and backward (float64)."""
    N, V, m = 37, 101, 6
    g = torch.Generator().manual_seed(1)
    params = {"V": torch.randn(V, m, generator=g), "c": torch.randn(V, generator=g)}
    S, y = torch.randn(N, m, generator=g), torch.randint(0, V, (N,), generator=g)
    w = (torch.rand(N, generator=g) > 0.2).double()
    results = []
    for compiled in (True, False):
        layer = FullOutput()
        if chunk_scores:
            layer.chunk_scores = chunk_scores
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        with (native.eager() if not compiled else torch.no_grad()):
            assert (layer._kernel(params, S, y, w, grads) is not None) == compiled
            loss, dS = layer.forward_backward(params, S, y, w, grads)
        results.append((loss, dS, grads["V"], grads["c"]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("direct", [0, 4096], ids=["plain", "direct-connections"])
def test_a_model_trains_on_the_same_gradients_compiled_and_eager(kernel, direct):
    """Whole models (an LSTM with an embedding; an Elman with maxent direct connections), weighted positions."""
    V, m, T, B = 23, 8, 5, 3
    cell = "elman" if direct else "lstm"
    model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=m, cell=cell, direct=direct, dtype="float64"), seed=2)
    g = torch.Generator().manual_seed(9)
    x, y = torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)
    w = (torch.rand(T, B, generator=g) > 0.25).double()
    state = model.zero_state(B)
    loss, grads, _ = loss_and_grads(model.net, model.params, x, y, state, weights=w)
    with native.eager():
        ref_loss, ref, _ = loss_and_grads(model.net, model.params, x, y, state, weights=w)
    assert abs(float(loss - ref_loss)) <= 1e-12 * abs(float(ref_loss))
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-11, atol=1e-13, msg=key)


def test_the_eager_code_runs_where_the_kernel_does_not_apply(kernel, monkeypatch):
    N, V, m = 6, 11, 4
    params = {"V": torch.randn(V, m), "c": torch.randn(V)}
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    S, y = torch.randn(N, m), torch.randint(0, V, (N,))
    layer = FullOutput()
    assert layer._kernel(params, S, y, None, grads) is kernel
    assert layer._kernel(params, S, y, torch.ones(N, dtype=torch.float32), grads) is None  # weights' dtype
    assert layer._kernel(params, S, y.int(), None, grads) is None  # targets not int64
    assert layer._kernel(params, S.requires_grad_(), y, None, grads) is None  # autograd wanted
    assert FullOutput("softmax", "quadratic")._kernel(params, S, y, None, grads) is None
    with native.eager():
        assert layer._kernel(params, S.detach(), y, None, grads) is None
    monkeypatch.setenv("BPTT_NATIVE", "0")
    assert layer._kernel(params, S.detach(), y, None, grads) is None


def test_a_target_outside_the_vocabulary_is_refused_before_anything_is_written(kernel):
    scores, c, y, _ = case(5, 7, torch.float64)
    for bad in (7, -1):
        y[3] = bad
        g = scores.clone()
        with pytest.raises(RuntimeError, match="outside"):
            kernel.softmax_xent_(g, c, y, None, None)
        assert torch.equal(g, scores)


# -- the class layer: the same pass for the classes' softmax and for each class's words' --------------------

COUNTS = [90, 60, 50, 30, 20, 20, 9, 8, 5, 4, 3, 2, 2, 1, 1, 1, 1]  # 17 words, Zipf-like


@pytest.mark.parametrize("direct", [0, 2048], ids=["plain", "direct-connections"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_class_layer_compiled_equals_the_class_layer_eager(kernel, direct, bias):
    """ClassSoftmaxOutput.forward_backward with the kernel (every class a span of ids) against its eager
    forward and backward: weighted positions, direct connections, with and without biases (float64)."""
    V, m, T, B = len(COUNTS), 6, 7, 4
    model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=m, output="class", classes=5, direct=direct,
                                      bias=bias, dtype="float64"), word_counts=COUNTS, seed=4)
    g = torch.Generator().manual_seed(2)
    for p in model.params.values():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    layer = model.net.output
    x, y = torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)
    w = (torch.rand(T, B, generator=g) > 0.25).double() * 1.5
    grads = model.zero_grads()
    assert layer._kernel(model.params, torch.zeros(2, m), y.reshape(-1), w.reshape(-1), grads) is kernel
    state = model.zero_state(B)
    loss, grads, _ = loss_and_grads(model.net, model.params, x, y, state, weights=w)
    with native.eager():
        assert layer._kernel(model.params, torch.zeros(2, m), y.reshape(-1), None, grads) is None
        ref_loss, ref, _ = loss_and_grads(model.net, model.params, x, y, state, weights=w)
    assert abs(float(loss - ref_loss)) <= 1e-12 * abs(float(ref_loss))
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-11, atol=1e-12, msg=key)


def test_a_class_layer_with_scattered_classes_runs_its_eager_code(kernel):
    from bptt.engine.outputs.class_softmax import ClassSoftmaxOutput

    layer = ClassSoftmaxOutput(torch.arange(11) % 4)  # words 0, 4, 8 in class 0, …: no spans
    params = {"V": torch.randn(11, 3), "c": torch.randn(11), "Vc": torch.randn(4, 3), "cc": torch.randn(4)}
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    assert layer._kernel(params, torch.zeros(2, 3), torch.tensor([1, 2]), None, grads) is None


def _class_case(seed=0):
    from bptt.engine.outputs.class_softmax import ClassSoftmaxOutput, frequency_classes

    layer = ClassSoftmaxOutput(frequency_classes(COUNTS, 6))
    g = torch.Generator().manual_seed(seed)
    V, C, m, N = len(COUNTS), layer.n_classes, 5, 300
    params = {"V": torch.randn(V, m, generator=g, dtype=torch.float32), "c": torch.randn(V, generator=g, dtype=torch.float32),
              "Vc": torch.randn(C, m, generator=g, dtype=torch.float32), "cc": torch.randn(C, generator=g, dtype=torch.float32)}
    S, y = torch.randn(N, m, generator=g, dtype=torch.float32), torch.randint(0, V, (N,), generator=g)
    w = (torch.rand(N, generator=g) > 0.2).float()
    return layer, params, S, y, w


def test_the_class_layer_gives_the_same_bits_with_one_thread_and_two(kernel):
    """Its classes are dealt to the threads whole (each class's sums in one order): the thread count does
    not change a bit of the loss or of any gradient."""
    layer, params, S, y, w = _class_case()
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads = {k: torch.zeros_like(v) for k, v in params.items()}
            loss, dS = layer.forward_backward(params, S, y, w, grads)
            out.append([loss, dS, *grads.values()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_the_class_words_kernel_refuses_a_target_outside_its_class(kernel):
    layer, params, S, y, w = _class_case()
    order = torch.arange(4)
    starts = [0, 4] + [4] * (layer.n_classes - 1)
    inner = torch.tensor([0, 1, 0, layer._count[0]])  # the last is one past class 0's words
    dV, dS = torch.zeros_like(params["V"]), torch.empty(4, 5)
    with pytest.raises(RuntimeError, match="outside class 0"):
        kernel.class_words_(S[:4], order, starts, layer._first, layer._count, params["V"], None, inner, None, dV,
                            None, dS)
    assert not dV.any()
