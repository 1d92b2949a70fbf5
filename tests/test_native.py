"""The compiled CPU sweeps (engine/native.py, cells/lstm_cpu.cpp) against the eager code they replace and
against the independent autograd model of tests/reference_rnn.py.

The other cell tests run with hidden size 3, below a vector's width, so they reach only the kernels'
scalar tail: the sizes here (m = 13, 16, 19) run the vectorised loop, its tail, or both. The forward's
σ and tanh are ATen's vectorised functions (torch.sigmoid/torch.tanh may differ in the last bit), so it
is compared within a few units of the last place; the backward multiplies the same operands in the same
order as the eager code. Where a C++ compiler and ninja exist the kernels must build: a failed build
there is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bptt.engine.cells.lstm as lstm
from bptt.engine import native
from bptt.engine.cells import CellCache
from bptt.engine.network import State
from bptt.engine.sweep import loss_and_grads
from bptt.model import LanguageModel, ModelConfig
from reference_rnn import Spec, reference_grads

COMPILER = bool((shutil.which("c++") or shutil.which("g++")) and shutil.which("ninja"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kernels():
    if not native.enabled("cpu"):
        pytest.skip("the CPU kernels are turned off (BPTT_NATIVE=0 or BPTT_NATIVE_CPU=0)")
    built = native.kernels("lstm")
    if built is None:
        if COMPILER:
            pytest.fail("a C++ compiler and ninja are here, but the LSTM's CPU kernels did not build")
        pytest.skip("no C++ compiler or ninja: the cells run their eager code")
    return built


def random_case(dtype, T, B, m, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1) * scale

    params = {"W": r(4 * m, m, scale=0.6), "b": r(4 * m, scale=0.6)}
    return params, r(T, B, 4 * m, scale=2.0), (r(B, m), r(B, m)), r(T, B, m)


SIZES = [(torch.float64, 6, 3, 13), (torch.float64, 5, 2, 16), (torch.float32, 7, 4, 19), (torch.float32, 1, 1, 8)]


@pytest.mark.parametrize("dtype, T, B, m", SIZES, ids=str)
def test_forward_equals_the_eager_sweep(kernels, dtype, T, B, m):
    params, A, state0, _ = random_case(dtype, T, B, m)
    H, (h, c), cache = lstm.LSTMCell.forward(params, A.clone(), state0)
    with native.eager():
        H0, (h0, c0), cache0 = lstm.LSTMCell.forward(params, A.clone(), state0)
    tol = {"rtol": 1e-13, "atol": 1e-15} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 5e-7}
    for name in ("H", "C", "K", "G"):
        torch.testing.assert_close(cache.steps[name], cache0.steps[name], **tol)
    torch.testing.assert_close(h, h0, **tol)
    torch.testing.assert_close(c, c0, **tol)


@pytest.mark.parametrize("dtype, T, B, m", SIZES, ids=str)
def test_backward_equals_the_eager_sweep(kernels, dtype, T, B, m):
    """Both backwards read the same cache (the eager forward's): only the sweeps differ."""
    params, A, state0, dH = random_case(dtype, T, B, m, seed=1)
    with native.eager():
        _, _, cache = lstm.LSTMCell.forward(params, A.clone(), state0)
    results = []
    for compiled in (True, False):
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        steps = {k: v.clone() for k, v in cache.steps.items()}
        if compiled:
            delta = lstm.LSTMCell.backward(params, CellCache(cache.state0, steps), dH, grads)
        else:
            with native.eager():
                delta = lstm.LSTMCell.backward(params, CellCache(cache.state0, steps), dH, grads)
        results.append((delta, grads["W"], grads["b"]))
    tol = {"rtol": 1e-14, "atol": 1e-16} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-7}
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


def test_the_streams_split_over_two_threads_give_the_same_sweeps(kernels):
    """With two threads the kernels split each step's B streams between them (at::parallel_for): the same
    numbers as with one, and as the eager sweeps."""
    params, A, state0, dH = random_case(torch.float32, 5, 24, 20, seed=3)
    results = []
    for threads, compiled in ((2, True), (1, True), (1, False)):
        torch.set_num_threads(threads)
        with contextlib.ExitStack() as stack:
            if not compiled:
                stack.enter_context(native.eager())
            H, _, cache = lstm.LSTMCell.forward(params, A.clone(), state0)
            grads = {k: torch.zeros_like(p) for k, p in params.items()}
            delta = lstm.LSTMCell.backward(params, cache, dH, grads)
        results.append((H, delta))
    torch.set_num_threads(1)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], results[2][0], rtol=1e-5, atol=5e-7)
    torch.testing.assert_close(results[0][1], results[2][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_compiled_gradients_match_the_autograd_reference(kernels, layers):
    """The whole network, with the vectorised loop in use (m = 12), against reference_rnn.py (≤ 1e-12)."""
    V, m, T, B = 11, 12, 6, 3
    model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=m, cell="lstm", layers=layers, dtype="float64"),
                          seed=3)
    g = torch.Generator().manual_seed(5)
    for p in model.params.values():
        p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.7)
    x, y = torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)
    state0 = [tuple(torch.rand(B, m, generator=g, dtype=torch.float64) - 0.5 for _ in range(2)) for _ in range(layers)]
    loss, grads, _ = loss_and_grads(model.net, model.params, x, y, State(tuple(tuple(s) for s in state0)))
    ref_loss, ref, _ = reference_grads(Spec.of(model.config), model.params, x, y, state0)
    assert abs(float(loss - ref_loss)) <= 1e-12 * abs(float(ref_loss))
    for name in grads:
        err = float((grads[name] - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-300))
        assert err <= 1e-12, (name, err)


def test_the_eager_code_runs_where_the_kernels_do_not_apply(kernels, monkeypatch):
    """Off (BPTT_NATIVE=0, `eager()`), or tensors the kernels do not take: the eager sweep, same values."""
    monkeypatch.setenv("BPTT_NATIVE", "0")
    assert native.kernels("lstm") is None
    monkeypatch.delenv("BPTT_NATIVE")
    with native.eager():
        assert native.kernels("lstm") is None
    assert native.kernels("lstm") is kernels
    params, A, state0, _ = random_case(torch.float64, 4, 2, 9)
    W = params["W"]
    assert native.usable(A, strided=(W.t(),))  # a weight in any layout
    assert not native.usable(A.transpose(0, 1), strided=(W,))
    assert not native.usable(A, strided=(W.clone().requires_grad_(),))
    assert not native.usable(A.half(), strided=(W,))
    H, _, cache = lstm.LSTMCell.forward(params, A.transpose(0, 1).contiguous().transpose(0, 1), state0)
    with native.eager():
        H0, _, _ = lstm.LSTMCell.forward(params, A.clone(), state0)
    torch.testing.assert_close(H, H0, rtol=0, atol=0)  # a strided A: the eager sweep ran


# -- the CUDA sweeps (cells/lstm_triton.py): on a GPU where there is one, else under Triton's interpreter ----


@pytest.fixture(scope="module")
def triton_sweeps():
    """cells/lstm_triton.py: on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 must be set
    before Triton is first imported: here, or else the tests run again in a fresh process, and this gives
    None). Skipped where Triton is not installed (PyTorch's CPU builds)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (it comes with PyTorch's CUDA builds)")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            return None
        os.environ["TRITON_INTERPRET"] = "1"
    from bptt.engine.cells import lstm_triton

    return lstm_triton


@functools.cache
def _interpreted_run() -> subprocess.CompletedProcess:
    """The Triton tests of this file in a fresh process under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                          env=env, capture_output=True, text=True, timeout=600)


TRITON_SIZES = [(torch.float64, 6, 3, 13), (torch.float32, 7, 4, 19), (torch.float32, 3, 2, 200)]


@pytest.mark.parametrize("dtype, T, B, m", TRITON_SIZES, ids=str)
def test_the_triton_sweeps_equal_the_eager_ones(triton_sweeps, dtype, T, B, m):
    """Forward from the same A; backward from the same cache (the eager forward's), full BPTT."""
    if triton_sweeps is None:  # Triton was imported without its interpreter: the same tests in a new process
        run = _interpreted_run()
        assert run.returncode == 0 and f"{len(TRITON_SIZES)} passed" in run.stdout, run.stdout[-3000:]
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params, A, (h0, c0), dH = random_case(dtype, T, B, m, seed=2)
    params, A, h0, c0, dH = ({k: v.to(device) for k, v in params.items()}, A.to(device), h0.to(device),
                             c0.to(device), dH.to(device))
    W, b = params["W"], params["b"]
    with native.eager():
        want = lstm.lstm_forward(W, b, A.clone(), h0, c0)  # H, C, K, G
    G = A + b
    H, C, K = (torch.empty(T, B, m, dtype=dtype, device=device) for _ in range(3))
    triton_sweeps.lstm_forward_sweep(W, G, h0, c0, H, C, K)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for got, expected in zip((H, C, K, G), want):
        torch.testing.assert_close(got, expected, **tol)
    H0, C0, K0, G0 = want
    with native.eager():
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        delta_want = lstm.LSTMCell.backward(params, CellCache((h0, c0), {"H": H0, "C": C0, "K": K0, "G": G0}), dH,
                                            grads)
    delta = torch.empty_like(G0)
    triton_sweeps.lstm_backward_sweep(W, G0, C0, K0, c0, dH, delta)
    torch.testing.assert_close(delta, delta_want, **tol)
