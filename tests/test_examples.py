"""The examples run and check their own numbers (each asserts against a reference)."""

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_scipy_operator(backend):
    pytest.importorskip(backend)
    out = load("scipy_operator").main(backend)
    assert out["largest"][-1] > out["smallest"][0] > 0


def test_switch_backend():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    assert load("switch_backend").main() < 1e-12


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_custom_solver(backend):
    pytest.importorskip(backend)
    assert load("custom_solver").main(backend) < 1e-8


def run_as_script(name, monkeypatch, *argv):
    """Run an example as ``python examples/<name>.py *argv`` would; return its exit code."""
    path = str(EXAMPLES / f"{name}.py")
    monkeypatch.setattr(sys, "argv", [path, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    return exit_info.value.code


@pytest.mark.parametrize(
    "name, hidden, argv",
    [
        ("scipy_operator", "torch", ()),
        ("scipy_operator", "jax", ("--backend", "jax")),
        ("custom_solver", "jax", ("--backend", "jax")),
        ("bilevel_hypergradient", "torch", ()),
        ("sliced_score_matching", "jax", ("--backend", "jax")),
        ("switch_backend", "jax", ()),
        ("distributed_eigsh", "torch", ()),
    ],
)
def test_missing_framework_names_the_install_command(monkeypatch, name, hidden, argv):
    # A None entry in sys.modules makes find_spec and import report the framework missing.
    monkeypatch.setitem(sys.modules, hidden, None)
    code = run_as_script(name, monkeypatch, *argv)
    assert isinstance(code, str), code  # sys.exit(message): exit status 1, message on stderr
    assert f'pip install -c constraints.txt -e ".[{hidden}]"' in code


def test_distributed_example_without_torchrun_says_how_to_launch(monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_as_script("distributed_eigsh", monkeypatch) == 2
    assert "torchrun --nproc_per_node=2 examples/distributed_eigsh.py" in capsys.readouterr().err
