"""The compiled sweeps of the LSTM and the GRU (engine/native.py: cells/{lstm,gru}_cpu.cpp on the CPU,
cells/{lstm,gru}_triton.py on CUDA) against the eager code they replace, and against the independent
autograd model of tests/reference_rnn.py.

The other cell tests run with hidden size 3, below a vector's width, so they reach only the C++ kernels'
scalar tail: the sizes here (m = 13, 16, 19, 20) run the vectorised loop, its tail, or both, and one test
splits a step's streams over two threads. The forward's σ and tanh are ATen's vectorised functions
(torch.sigmoid/torch.tanh may differ in the last bit), so it is compared within a few units of the last
place; the C++ backward makes the eager code's operations on the same operands in the same order, so it
is compared to a unit or two of the last place (where a compiler fuses a multiply and an add). Where a C++ compiler and ninja exist the
kernels must build: a failed build there is a failure, not a skip. The Triton kernels run on a GPU where
there is one, else under Triton's interpreter where Triton is installed (it comes with PyTorch's CUDA
builds, not with the CPU build CI uses: there they are skipped, and benchmarks/gpu_check.sh runs them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import bptt.engine.cells.gru as gru
import bptt.engine.cells.lstm as lstm
from bptt.engine import native
from bptt.engine.cells import CellCache
from bptt.engine.network import State
from bptt.engine.sweep import loss_and_grads
from bptt.model import LanguageModel, ModelConfig
from conftest import compiled_or_skip
from reference_rnn import Spec, reference_grads

CELLS = {"lstm": lstm.LSTMCell, "gru": gru.GRUCell}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(CELLS))
def cell(request):
    """(name, the cell class, its C++ kernels): skipped where the CPU kernels are off or cannot be built."""
    name = request.param
    return name, CELLS[name], compiled_or_skip(name, f"the {name} cell's")


def random_case(name, dtype, T, B, m, seed=0, bias=True):
    """The cell's parameters (biases uniform too), A = U x^t (T,B,G·m), its state (B,m) and dH (T,B,m)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1) * scale

    gates = CELLS[name].gates
    params = {"W": r(gates * m, m, scale=0.6)}
    if bias:
        params["b"] = r(gates * m, scale=0.6)
        if name == "gru":
            params["b_hn"] = r(m, scale=0.6)
    state = (r(B, m), r(B, m)) if name == "lstm" else (r(B, m),)
    return params, r(T, B, gates * m, scale=2.0), state, r(T, B, m)


def sweep(Cell, params, A, state0, dH, compiled=True):
    """(H, cache's steps, δ, grads) of one forward and one full backward, compiled or eager."""
    with contextlib.nullcontext() if compiled else native.eager():
        H, final, cache = Cell.forward(params, A.clone(), state0)
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        delta = Cell.backward(params, cache, dH, grads)
    return H, cache.steps, delta, grads


SIZES = [(torch.float64, 6, 3, 13, True), (torch.float64, 5, 2, 16, False), (torch.float32, 7, 4, 19, True),
         (torch.float32, 1, 1, 8, True)]


def tolerance(dtype):
    return {"rtol": 1e-13, "atol": 1e-15} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 5e-7}


@pytest.mark.parametrize("dtype, T, B, m, bias", SIZES, ids=str)
def test_forward_equals_the_eager_sweep(cell, dtype, T, B, m, bias):
    name, Cell, _ = cell
    params, A, state0, dH = random_case(name, dtype, T, B, m, bias=bias)
    _, steps, _, _ = sweep(Cell, params, A, state0, dH)
    _, eager_steps, _, _ = sweep(Cell, params, A, state0, dH, compiled=False)
    assert steps.keys() == eager_steps.keys()
    for key in steps:
        torch.testing.assert_close(steps[key], eager_steps[key], **tolerance(dtype))


@pytest.mark.parametrize("dtype, T, B, m, bias", SIZES, ids=str)
def test_backward_equals_the_eager_sweep(cell, dtype, T, B, m, bias):
    """Both backwards read the same cache (the eager forward's): the same operations on the same operands,
    within a unit or two of the last place (a compiler may fuse a multiply and an add in one and not in the
    other)."""
    name, Cell, _ = cell
    params, A, state0, dH = random_case(name, dtype, T, B, m, seed=1, bias=bias)
    with native.eager():
        _, _, cache = Cell.forward(params, A.clone(), state0)
    results = []
    for compiled in (True, False):
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        steps = {k: v.clone() for k, v in cache.steps.items()}
        with contextlib.nullcontext() if compiled else native.eager():
            delta = Cell.backward(params, CellCache(cache.state0, steps), dH, grads)
        results.append((delta, *grads.values()))
    tol = {"rtol": 1e-13, "atol": 1e-15} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


def test_the_streams_split_over_two_threads_give_the_same_sweeps(cell):
    """With two threads the kernels split each step's B streams between them (at::parallel_for): the same
    numbers as with one, and as the eager sweeps."""
    name, Cell, _ = cell
    params, A, state0, dH = random_case(name, torch.float32, 5, 24, 20, seed=3)
    torch.set_num_threads(2)
    try:
        two = sweep(Cell, params, A, state0, dH)
    finally:
        torch.set_num_threads(1)
    one = sweep(Cell, params, A, state0, dH)
    eager = sweep(Cell, params, A, state0, dH, compiled=False)
    for a, b, c in ((two[0], one[0], eager[0]), (two[2], one[2], eager[2])):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_compiled_gradients_match_the_autograd_reference(cell, layers):
    """The whole network, with the vectorised loop in use (m = 12), against reference_rnn.py (≤ 1e-12)."""
    name = cell[0]
    V, m, T, B = 11, 12, 6, 3
    model = LanguageModel(ModelConfig(vocab_size=V, hidden_size=m, cell=name, layers=layers, dtype="float64"), seed=3)
    g = torch.Generator().manual_seed(5)
    for p in model.params.values():
        p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.7)
    x, y = torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)
    parts = 2 if name == "lstm" else 1
    state0 = [tuple(torch.rand(B, m, generator=g, dtype=torch.float64) - 0.5 for _ in range(parts))
              for _ in range(layers)]
    loss, grads, _ = loss_and_grads(model.net, model.params, x, y, State(tuple(tuple(s) for s in state0)))
    ref_loss, ref, _ = reference_grads(Spec.of(model.config), model.params, x, y, state0)
    assert abs(float(loss - ref_loss)) <= 1e-12 * abs(float(ref_loss))
    for key in grads:
        err = float((grads[key] - ref[key]).abs().max() / ref[key].abs().max().clamp_min(1e-300))
        assert err <= 1e-12, (key, err)


def test_the_eager_code_runs_where_the_kernels_do_not_apply(cell, monkeypatch):
    """Off (BPTT_NATIVE=0, BPTT_NATIVE_CPU=0, `eager()`), or tensors the kernels do not take: the eager sweep."""
    name, Cell, built = cell
    for variable in ("BPTT_NATIVE", "BPTT_NATIVE_CPU"):
        monkeypatch.setenv(variable, "0")
        assert native.kernels(name) is None
        monkeypatch.delenv(variable)
    with native.eager():
        assert native.kernels(name) is None
    assert native.kernels(name) is built
    params, A, state0, dH = random_case(name, torch.float64, 4, 2, 9)
    W = params["W"]
    assert native.sweeps(name, A, strided=(W.t(),)) is built  # a weight in any layout
    assert native.sweeps(name, A.transpose(0, 1), strided=(W,)) is None
    assert native.sweeps(name, A, strided=(W.clone().requires_grad_(),)) is None
    assert native.sweeps(name, A.half(), strided=(W,)) is None
    strided = A.transpose(0, 1).contiguous().transpose(0, 1)
    H, _, _ = Cell.forward(params, strided, state0)
    with native.eager():
        H0, _, _ = Cell.forward(params, A.clone(), state0)
    torch.testing.assert_close(H, H0, rtol=0, atol=0)  # a strided A: the eager sweep ran


# -- the CUDA sweeps (cells/*_triton.py): on a GPU where there is one, else under Triton's interpreter --------


@pytest.fixture(scope="module")
def triton_ready():
    """True to run here (on CUDA, or on the CPU under TRITON_INTERPRET=1, which must be set before Triton is
    first imported: here), False when Triton was imported already without it (the tests then run again in a
    fresh process). Skipped where Triton is not installed (PyTorch's CPU builds)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (it comes with PyTorch's CUDA builds)")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            return False
        os.environ["TRITON_INTERPRET"] = "1"
    return True


@functools.cache
def _interpreted_run() -> subprocess.CompletedProcess:
    """The Triton tests of this file in a fresh process under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                          env=env, capture_output=True, text=True, timeout=600)


TRITON_SIZES = [("lstm", torch.float64, 6, 3, 13, True), ("lstm", torch.float32, 7, 4, 19, True),
                ("lstm", torch.float32, 3, 2, 200, True), ("gru", torch.float64, 6, 3, 13, True),
                ("gru", torch.float64, 4, 2, 9, False), ("gru", torch.float32, 3, 2, 200, True)]


@pytest.mark.parametrize("name, dtype, T, B, m, bias", TRITON_SIZES, ids=str)
def test_the_triton_sweeps_equal_the_eager_ones(triton_ready, name, dtype, T, B, m, bias):
    """Forward from the same A; backward from the same cache (the eager forward's), full BPTT."""
    if not triton_ready:  # Triton was imported without its interpreter: the same tests in a new process
        run = _interpreted_run()
        assert run.returncode == 0 and f"{len(TRITON_SIZES)} passed" in run.stdout, run.stdout[-3000:]
        return
    module = importlib.import_module(f"bptt.engine.cells.{name}_triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params, A, state0, dH = random_case(name, dtype, T, B, m, seed=2, bias=bias)
    params, A, dH = {k: v.to(device) for k, v in params.items()}, A.to(device), dH.to(device)
    state0 = tuple(s.to(device) for s in state0)
    W, b = params["W"], params.get("b")
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    G = A + b if b is not None else A.clone()
    T_B_m = (T, B, m)
    with native.eager():
        _, _, cache = CELLS[name].forward(params, A.clone(), state0)
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        delta_want = CELLS[name].backward(params, cache, dH, grads)
    steps = cache.steps
    if name == "lstm":
        H, C, K = (torch.empty(T_B_m, dtype=dtype, device=device) for _ in range(3))
        module.lstm_forward_sweep(W, G, state0[0], state0[1], H, C, K)
        got = {"H": H, "C": C, "K": K, "G": G}
        delta = torch.empty_like(G)
        module.lstm_backward_sweep(W, steps["G"], steps["C"], steps["K"], state0[1], dH, delta)
    else:
        Q, H = (torch.empty(T_B_m, dtype=dtype, device=device) for _ in range(2))
        module.gru_forward_sweep(W, params.get("b_hn"), G, state0[0], Q, H)
        got = {"H": H, "Q": Q, "G": G}
        delta, gamma = torch.empty_like(G), torch.empty_like(G)
        module.gru_backward_sweep(W, steps["G"], steps["Q"], steps["H"], state0[0], dH, delta, gamma)
    for key, value in got.items():
        torch.testing.assert_close(value, steps[key], **tol)
    torch.testing.assert_close(delta, delta_want, **tol)


def _cache_copy(tmp_path, name: str):
    """A copy of the built cache of `name`'s kernels in tmp_path (BPTT_NATIVE_DIR) -> (root, its module dir)."""
    import shutil

    compiled_or_skip(name, f"the {name} cell's")
    built = [d for d in native._build_dir().glob(f"bptt_{name}_cpu_*") if any(d.glob("*.so"))]
    module_dir = max(built, key=lambda d: max(p.stat().st_mtime for p in d.glob("*.so")))
    copy = tmp_path / "cache" / f"torch-{torch.__version__}" / module_dir.name
    shutil.copytree(module_dir, copy)
    return tmp_path / "cache", copy


_LOAD = "from bptt.engine import native; import sys; sys.exit(0 if native.kernels(sys.argv[1]) is not None else 3)"


def _load_in_a_process(root, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BPTT_NATIVE_DIR": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _LOAD, name], env=env, capture_output=True, text=True, timeout=240)


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_run(tmp_path):
    """torch's build lock (DIR/lock) left behind by a builder killed mid-build: the next process finds no
    bptt builder holding the build lock, removes it and loads the kernels (before: waited on it forever)."""
    root, module_dir = _cache_copy(tmp_path, "lstm")
    (module_dir / "lock").touch()
    done = _load_in_a_process(root, "lstm")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (module_dir / "lock").exists()


def test_a_truncated_library_is_built_again_not_loaded(tmp_path):
    """A cached .so cut short (a copy or a link interrupted): loaded, it would crash the process with SIGBUS
    (ninja sees it up to date); it is relinked, and the kernels load."""
    root, module_dir = _cache_copy(tmp_path, "lstm")
    (library,) = module_dir.glob("*.so")
    size = library.stat().st_size
    with library.open("r+b") as f:
        f.truncate(size // 2)
    assert not native._complete_library(library)
    done = _load_in_a_process(root, "lstm")
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "incomplete" in done.stderr and native._complete_library(library) and library.stat().st_size == size


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), (" OFF ", False), ("no", False), ("1", True),
                                       ("yes", True)])
def test_the_usual_spellings_of_off_turn_the_kernels_off(monkeypatch, value, on):
    monkeypatch.setenv("BPTT_NATIVE", value)
    assert native.enabled("cpu") is on and native.enabled("cuda") is on
    monkeypatch.delenv("BPTT_NATIVE")
    monkeypatch.setenv("BPTT_NATIVE_CPU", value)
    assert native.enabled("cpu") is on and native.enabled("cuda")
