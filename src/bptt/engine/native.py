"""Compiled forms of the cells' sweeps through time (C++ on the CPU, built on first use; Triton on CUDA) and
of the full softmax's loss pass (C++ on the CPU), with the eager code as the reference and the fallback.

A cell's sweep runs one matrix product and a handful of element-wise operations per time step; at small
sizes (an LSTM of 200 units, 20 streams) the eager operations cost more than the product (each is a
dispatch and a pass over a (B,m) block, and torch.tanh on the CPU is not vectorised). A cell may ship a
C++ file next to it (cells/lstm_cpu.cpp, cells/gru_cpu.cpp; what they share in cells/cpu_common.h) that
runs the whole sweep with each step's element-wise work fused into one loop; an output layer may too
(outputs/softmax_cpu.cpp: the bias, the cross-entropy, its gradient and the bias's gradient in one pass
over each row of scores, where the eager code reads the (N,V) scores five times). `kernels(name)` builds
{name}_cpu.cpp with torch.utils.cpp_extension (a C++ compiler and ninja, about half a minute, once per
source and torch version, kept under $BPTT_NATIVE_DIR or ~/.cache/bptt/native) and returns the module, or
None: no compiler, a failed build, BPTT_NATIVE=0 or BPTT_NATIVE_CPU=0 (the eager code then runs, with
one line on stderr if a build fails).

On CUDA a cell may ship Triton kernels instead (cells/lstm_triton.py, cells/gru_triton.py: Triton comes
with PyTorch's CUDA builds and compiles each kernel on its first launch, in a second or two), which the
static step (`--graph`) captures like any other kernel. `sweeps(name, ...)` picks the form for the tensors
at hand. Tests compare every kernel with the eager code it replaces (`with eager():`); the Triton ones
also run on a CPU under Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

_HERE = Path(__file__).resolve().parent / "cells"  # the cells' sources, and cpu_common.h that every source includes
_SOURCES = (_HERE, _HERE.parent / "outputs")  # where {name}_cpu.cpp is looked for: cells, then output layers
_modules: dict[str, ModuleType | None] = {}
_lock = threading.Lock()
_enabled = True


def _flags() -> list[str]:
    """-O3, OpenMP (torch's threads, on Linux), and the vector instructions torch itself runs here
    (torch.backends.cpu.get_cpu_capability()): AVX-512 or AVX2 + FMA, so that ATen's vectorised types (and
    Sleef's σ and tanh) use them; elsewhere (another architecture, an old x86) their portable code.
    BPTT_NATIVE_AVX512=0 builds AVX2 on an AVX-512 machine (to test that build)."""
    flags = ["-O3"]
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        flags.append("-fopenmp")  # at::parallel_for splits a step's streams over torch's OpenMP threads
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and os.environ.get("BPTT_NATIVE_AVX512", "1") == "1":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
                  "-DCPU_CAPABILITY=AVX512"]
    elif capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def describe(name: str, device: str = "cpu") -> str:
    """How cell `name`'s sweeps run on `device` (for benchmarks' machine lines): "compiled (C++, AVX-512,
    OpenMP)", "Triton" or "eager" (building the CPU kernels if they are not built yet)."""
    if device == "cuda":
        return "Triton" if triton_sweeps(name) is not None else "eager"
    if kernels(name) is None:
        return "eager"
    flags = _flags()
    isa = "AVX-512" if "-mavx512f" in flags else "AVX2" if "-mavx2" in flags else "portable"
    return "compiled (C++, " + isa + (", OpenMP)" if "-fopenmp" in flags else ")")


BUILD_WAIT = 300.0  # seconds a process waits for another one building the same kernels before using the eager code
_OFF = ("0", "false", "off", "no")  # BPTT_NATIVE / BPTT_NATIVE_CPU values that turn the kernels off


def _off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in _OFF


def _build_dir() -> Path:
    root = os.environ.get("BPTT_NATIVE_DIR") or os.path.join(Path.home(), ".cache", "bptt", "native")
    return Path(os.path.expanduser(root)) / f"torch-{torch.__version__}"


@contextlib.contextmanager
def _building(directory: Path):
    """Hold DIR/.bptt-build.lock (flock: the kernel releases it when its holder dies) while building in DIR,
    so that at most one bptt process builds there and torch's own lock file (DIR/lock, which a builder killed
    mid-build leaves behind, and on which every later build would wait forever) can be removed as stale.
    Yields False when another process held it for BUILD_WAIT seconds (the caller then uses the eager code)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's lock alone
        yield True
        return
    with open(directory / ".bptt-build.lock", "a") as handle:
        deadline = time.monotonic() + BUILD_WAIT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.2)
        try:
            (directory / "lock").unlink(missing_ok=True)  # torch's: no bptt builder holds it now, so it is stale
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete_library(path: Path) -> bool:
    """Whether a built .so is whole: for a 64-bit little-endian ELF file, its section headers (at the end) lie
    within the file. A truncated one would be loaded (ninja sees it up to date) and crash the process with
    SIGBUS when its missing pages are touched. Other formats are taken as they are."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return head[:4] != b"\x7fELF"  # an ELF file too short for its header is broken; not ELF: unchecked
    shoff = int.from_bytes(head[0x28:0x30], "little")
    shentsize = int.from_bytes(head[0x3A:0x3C], "little")
    shnum = int.from_bytes(head[0x3C:0x3E], "little")
    return shoff + shentsize * shnum <= size


def _build(name: str) -> ModuleType | None:
    source = next(d / f"{name}_cpu.cpp" for d in _SOURCES if (d / f"{name}_cpu.cpp").exists())
    common = _HERE / "cpu_common.h"
    owner = f"the {name} cell's" if source.parent == _HERE else f"the {name} output layer's"
    flags = _flags()
    digest = hashlib.sha256(source.read_bytes() + common.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    module_name = f"bptt_{name}_cpu_{digest}"  # a changed source is another module (and another build)
    directory = _build_dir() / module_name
    if not any(directory.glob(f"{module_name}*.so")):
        print(f"bptt: building {owner} CPU kernels (once, about half a minute; BPTT_NATIVE=0 skips "
              f"them) in {directory}", file=sys.stderr, flush=True)
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        with _building(directory) as building:
            if not building:
                print(f"bptt: another process has been building {owner} CPU kernels in {directory} for "
                      f"{BUILD_WAIT:.0f} s; using the eager code", file=sys.stderr, flush=True)
                return None
            for library in directory.glob(f"{module_name}*.so"):
                if not _complete_library(library):  # ninja relinks it (or rebuilds)
                    print(f"bptt: {library} is incomplete (a build cut short); building it again", file=sys.stderr,
                          flush=True)
                    library.unlink()
            return load(name=module_name, sources=[str(source)], extra_cflags=flags,
                        extra_include_paths=[str(_HERE)], build_directory=str(directory), verbose=False)
    except Exception as e:  # noqa: BLE001 — no compiler, no ninja, a failed build: the eager code runs
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"bptt: {owner} CPU kernels could not be built ({reason[:200]}); using the eager code",
              file=sys.stderr, flush=True)
        return None


def enabled(device: str = "cpu") -> bool:
    """Whether compiled sweeps may run on this kind of device: not within `eager()`, not with BPTT_NATIVE=0
    (all of them off) and, for the CPU, not with BPTT_NATIVE_CPU=0 (the C++ build skipped, the GPU's
    Triton kernels kept: benchmarks/gpu_check.sh, where the build would cost device time)."""
    if not _enabled or _off("BPTT_NATIVE"):
        return False
    return device != "cpu" or not _off("BPTT_NATIVE_CPU")


def kernels(name: str) -> ModuleType | None:
    """The compiled kernels of cells/{name}_cpu.cpp or outputs/{name}_cpu.cpp (built on the first call), or
    None (see the module)."""
    if not enabled("cpu"):
        return None
    if name not in _modules:
        with _lock:
            if name not in _modules:
                _modules[name] = _build(name)
    return _modules[name]


def triton_sweeps(name: str) -> ModuleType | None:
    """cells/{name}_triton.py, the cell's sweeps with Triton kernels for CUDA tensors, or None: Triton is not
    installed (one line on stderr, once), or compiled sweeps are off."""
    if not enabled("cuda"):
        return None
    key = f"{name}_triton"
    if key not in _modules:
        with _lock:
            if key not in _modules:
                try:
                    _modules[key] = importlib.import_module(f"bptt.engine.cells.{key}")
                except ImportError as e:
                    print(f"bptt: the {name} cell's CUDA kernels need Triton ({e}); using the eager code",
                          file=sys.stderr, flush=True)
                    _modules[key] = None
    return _modules[key]


def sweeps(name: str, *tensors: torch.Tensor, strided: tuple[torch.Tensor, ...] = ()) -> ModuleType | None:
    """The compiled sweeps of cell `name` that take these tensors (see usable), or None: on the CPU its C++
    kernels (cells/{name}_cpu.cpp), on CUDA its Triton ones (cells/{name}_triton.py). Both modules have the
    same functions, {name}_forward_sweep and {name}_backward_sweep, with the eager sweeps' equations."""
    if usable(*tensors, strided=strided):
        return kernels(name)
    if usable(*tensors, strided=strided, device="cuda"):
        return triton_sweeps(name)
    return None


def usable(*tensors: torch.Tensor, strided: tuple[torch.Tensor, ...] = (), device: str = "cpu") -> bool:
    """The kernels take these: on `device` ("cpu" or "cuda"), float32/float64, no autograd history wanted;
    `tensors` contiguous (the kernels walk them by pointer), `strided` in any layout (the weights, views of
    the flat buffer whose rows may be padded: they only enter the library's matrix products)."""
    return (all(t.is_contiguous() for t in tensors)
            and all(t.device.type == device and t.dtype in (torch.float32, torch.float64) and not t.requires_grad
                    for t in (*tensors, *strided)))


@contextlib.contextmanager
def eager():
    """Within: every cell runs its eager code (the reference the kernels are tested against)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
