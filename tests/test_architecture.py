"""The layout's rules, read from the source: which part may import which, and no private name crosses a
module boundary (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bptt

PACKAGE = Path(bptt.__file__).parent

# part -> the parts it may import (every import of bptt inside a function counts too)
ALLOWED = {
    "checks": set(),
    "files": set(),
    "engine": {"engine", "checks"},
    "model": {"model", "engine", "checks"},
    "data": {"checks", "files"},
    "prepared": {"data", "checks", "files"},
    "storage": {"storage", "files", "data", "model", "engine", "checks"},
    "interpolation": {"data"},
    "evaluation": {"engine", "model", "data", "checks"},
    "scoring": {"engine", "model", "data", "checks", "evaluation"},
    "rescoring": {"engine", "model", "data", "interpolation", "scoring", "checks"},
    "diagnostics": {"engine", "model", "checks"},
    "sampling": {"engine", "model", "data", "checks"},
    "grammar": {"engine", "data"},
    "training": {"training", "engine", "model", "data", "prepared", "storage", "evaluation", "checks", "files"},
    "oracle": set(),
    "verify": {"engine", "model", "oracle", "checks"},
    "benchmark": {"engine", "model", "training", "checks"},
    "commands": {"commands", "training", "engine", "model", "data", "prepared", "storage", "evaluation", "scoring", "sampling",
                 "grammar", "verify", "benchmark", "checks", "files", "interpolation", "rescoring", "diagnostics"},
    "cli": {"commands", "package"},
    "package": {"engine", "model"},  # bptt/__init__.py
    "main": {"cli"},  # bptt/__main__.py
}


def _part(module: str) -> str:
    """'bptt.engine.cells.elman' -> 'engine'; 'bptt' -> 'package'."""
    parts = module.split(".")
    return "package" if len(parts) == 1 else parts[1]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        out.append((name, path))
    return out


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import of bptt in a file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "bptt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "bptt":
                found.append((target, [alias.name for alias in node.names], node.lineno))
    return found


MODULES = _modules()


def _parts_imported(path: Path, module: str) -> list[tuple[str, int]]:
    """(part, line) of every import of bptt in a file; `from bptt import x` counts as part x when x is
    a module or a subpackage, else as the package itself."""
    out = []
    for target, names, line in _imports(path, module):
        if _part(target) == "package" and names:
            for name in names:
                is_module = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists()
                out.append((name if is_module else "package", line))
        else:
            out.append((_part(target), line))
    return out


def test_every_module_belongs_to_a_part():
    unknown = sorted({_part(name) for name, _ in MODULES} - set(ALLOWED) - {"__main__"})
    assert not unknown, f"parts without a rule in ALLOWED: {unknown}"


@pytest.mark.parametrize("module, path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_the_allowed_way(module, path):
    part = "main" if module == "bptt.__main__" else _part(module)
    for target_part, line in _parts_imported(path, module):
        assert target_part in ALLOWED[part] or target_part == part, f"{path}:{line}: {part} imports {target_part}"


def test_the_engine_imports_nothing_from_data_training_storage_or_commands():
    """The issue's rule, on its own: the engine stands alone (bptt.checks is a leaf utility)."""
    for module, path in MODULES:
        if _part(module) != "engine":
            continue
        for target_part, line in _parts_imported(path, module):
            assert target_part in ("engine", "checks"), f"{path}:{line}: the engine imports {target_part}"


@pytest.mark.parametrize("module, path", MODULES, ids=[m for m, _ in MODULES])
def test_no_private_name_is_imported_from_another_module(module, path):
    for target, names, line in _imports(path, module):
        if target == module:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path}:{line}: imports the private {private} from {target}"


def test_the_rules_can_fail(tmp_path):
    """The checks above find a forbidden import and a private one in a file that has them."""
    bad = tmp_path / "bad.py"
    bad.write_text("from bptt.training.trainer import Trainer\nfrom bptt.data import _CHUNK\nimport bptt.commands.train\n"
                   "from bptt import storage, ElmanLM\n")
    found = _imports(bad, "bptt.engine.bad")
    assert [p for p, _ in _parts_imported(bad, "bptt.engine.bad")] == ["training", "data", "commands", "storage",
                                                                       "package"]
    assert not {"training", "data", "commands"} & ALLOWED["engine"]
    assert [n for _, names, _ in found for n in names if n.startswith("_")] == ["_CHUNK"]
