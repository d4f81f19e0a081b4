"""The examples run and check their own numbers (each asserts against a reference)."""

import importlib.util
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
