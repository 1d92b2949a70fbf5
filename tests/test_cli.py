"""The `bptt` command line: gradcheck's table and exit status, one-line errors, the README contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bptt.engine.activations as activations
from bptt.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--vocab", "5", "--hidden", "3", "--steps", "3", "--batch", "2"]


def test_gradcheck_prints_the_table_and_passes(capsys):
    assert main(["gradcheck", *SMALL, "--bias", "on"]) == 0
    out = capsys.readouterr().out
    assert "finite diff" in out and "autograd" in out and "RTRL" in out and "trunc k=2" in out
    rows = [line for line in out.splitlines() if line.startswith("F=")]
    # every (F, f, loss) × U, W, V, b, c; class, hsm, nce, sampled; softmax and class with direct
    # connections; the tied model (W, b, V, c: fd, autograd, trunc, no RTRL)
    assert len(rows) == 16 * 5 + 7 + 3 * 5 + 6 + 8 + 4
    assert "all 404 checks passed" in out
    assert [line.split()[5] for line in rows if " tied " in line] == ["W", "b", "V", "c"]
    names = ("class", "hsm", "nce", "sampled", "softmax+direct", "class+direct")
    assert {f"output={name}" for name in names} <= set(out.split())


def test_gradcheck_float32_without_bias(capsys):
    assert main(["gradcheck", *SMALL, "--dtype", "float32", "--bias", "off", "--truncation", "-1"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("F=")]) == 16 * 3 + 4 + 3 * 3 + 4 + 5 + 2
    assert "trunc" not in out.splitlines()[2]


def test_gradcheck_exits_non_zero_when_a_gradient_is_wrong(monkeypatch, capsys):
    broken = activations.HiddenActivation("sigmoid", torch.sigmoid_, lambda s: torch.ones_like(s))
    monkeypatch.setitem(activations.HIDDEN_ACTIVATIONS, "sigmoid", broken)
    assert main(["gradcheck", *SMALL, "--bias", "on"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAILED: \d+ of 404 checks", out)
    flagged = [line for line in out.splitlines() if line.endswith("!") or "! " in line]
    assert flagged and all("F=sigmoid" in line for line in flagged)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["gradcheck", "--hidden", "x"], "--hidden"),
        (["gradcheck", "--hidden", "0"], "--hidden"),
        (["gradcheck", "--dtype", "float16"], "--dtype"),
        (["gradcheck", "--truncation", "-3"], "--truncation"),
        (["gradcheck", "--hidden", "100"], "--hidden"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(argv, option, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err and "Traceback" not in err


def test_console_script_runs_as_a_process():
    proc = subprocess.run(
        [sys.executable, "-m", "bptt.cli", "gradcheck", "--hidden", "0"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--hidden" in proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "bptt.cli", "--help"], capture_output=True, text=True).stdout
    assert "gradcheck" in help_text and "bench" in help_text


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup-commands -->\s*```(?:sh|bash)?\n(.*?)```", text, re.S)
    assert block, "README.md must hold the two set-up commands in a fenced block after <!-- setup-commands -->"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, test_job = commands
    assert "bptt" in main_job and "pytest" in test_job
    assert all("constraints.txt" in c and "venv" in c for c in commands)
    assert test_job in (ROOT / ".ci" / "run").read_text()


def test_python_dash_m_runs_the_command():
    """`python -m bptt` is the `bptt` command (for machines where the console script is not installed)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bptt", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--init-range" in done.stdout
    done = subprocess.run([sys.executable, "-m", "bptt", "train", "--hidden", "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
