"""Shared helpers of the algorithm tests: frameworks, known-spectrum matrices, counting.

Imported by tests/test_{cg,lanczos,eig,trace,diagonal,density,inverse}.py.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import hessop
from conftest import has_framework, to_native, to_numpy

FRAMEWORKS = ("numpy", "torch", "jax")


def framework_params(names: tuple[str, ...] = FRAMEWORKS) -> list[Any]:
    return [
        pytest.param(
            name,
            id=name,
            marks=pytest.mark.skipif(
                name != "numpy" and not has_framework(name), reason=f"{name} not installed"
            ),
        )
        for name in names
    ]


def native(fw: str, x: Any) -> Any:
    """A numpy array as a float64 array of framework ``fw`` (numpy stays numpy)."""
    return np.asarray(x, dtype=np.float64) if fw == "numpy" else to_native(fw, x)


def assert_native(fw: str, x: Any, device: Any = None) -> None:
    """``x`` is an array of framework ``fw`` (on ``device`` when given)."""
    if fw == "numpy":
        assert isinstance(x, (np.ndarray, np.generic)), type(x)
    elif fw == "torch":
        import torch

        assert isinstance(x, torch.Tensor), type(x)
        assert x.device == (device if device is not None else torch.device("cpu"))
    else:
        import jax

        assert isinstance(x, jax.Array), type(x)
        assert x.device == (device if device is not None else jax.devices()[0])


def with_spectrum(spec: Any, seed: int = 0) -> np.ndarray:
    """The symmetric matrix ``U diag(spec) U^T`` for a random orthogonal ``U``."""
    spec = np.asarray(spec, dtype=np.float64)
    U, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(spec), len(spec))))
    M = (U * spec) @ U.T
    return (M + M.T) / 2


class Counting(hessop.LinearOperator):
    """A dense matrix that counts its products (a ``matmat`` column counts one)."""

    def __init__(self, M: Any) -> None:
        op = hessop.aslinearoperator(M)
        super().__init__(op.shape, op.dtype, op._bk, op.device, symmetric=True)
        self.op = op
        self.count = 0
        self.calls = 0

    def _matvec(self, v: Any) -> Any:
        self.count += 1
        self.calls += 1
        return self.op._matvec(v)

    def _matmat(self, V: Any) -> Any:
        self.count += int(V.shape[1])
        self.calls += 1
        return self.op._matmat(V)


def rng_states() -> tuple[Any, ...]:
    states: list[Any] = [random.getstate(), np.random.get_state()]
    if has_framework("torch"):
        import torch

        states.append(torch.get_rng_state())
    return tuple(states)


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Assert that python's, numpy's and torch's global RNG states are bit-identical after."""
    before = rng_states()
    yield
    after = rng_states()
    assert before[0] == after[0], "python random state changed"
    b, a = before[1], after[1]
    assert b[0] == a[0] and np.array_equal(b[1], a[1]) and b[2:] == a[2:], "numpy state changed"
    if len(before) > 2:
        assert bool((before[2] == after[2]).all()), "torch RNG state changed"


# --- real Hessian operators ----------------------------------------------------------------
def mlp_problem(seed: int = 3) -> tuple[Any, dict[str, np.ndarray], tuple[np.ndarray, ...]]:
    """A small tanh MLP (d = 41) whose Hessian is indefinite."""
    rng = np.random.default_rng(seed)
    params = {
        "W1": 0.8 * rng.standard_normal((5, 4)),
        "b1": 0.1 * rng.standard_normal(5),
        "W2": 0.8 * rng.standard_normal((2, 5)),
        "b2": 0.1 * rng.standard_normal(2),
    }
    X = rng.standard_normal((12, 4))
    Y = rng.standard_normal((12, 2))

    def f(p, X, Y):
        import array_api_compat

        xp = array_api_compat.array_namespace(X)
        h = xp.tanh(X @ p["W1"].T + p["b1"])
        out = h @ p["W2"].T + p["b2"]
        return xp.mean(xp.sum((out - Y) ** 2, axis=1))

    return f, params, (X, Y)


_HESSIANS: dict[tuple[str, str], Any] = {}


def hessian_operator(kind: str, backend: str) -> tuple[Any, np.ndarray]:
    """A HessianOperator of ``kind`` ("mlp") and its dense matrix, cached for the session
    (one JAX compilation serves every test module)."""
    pytest.importorskip(backend)
    key = (kind, backend)
    if key not in _HESSIANS:
        f, params, args = {"mlp": mlp_problem}[kind]()
        H = hessop.hessian(f, params, *args, backend=backend)
        dense = to_numpy(H.to_dense())
        _HESSIANS[key] = (H, (dense + dense.T) / 2)
    return _HESSIANS[key]


# --- misuse: non-finite values ----------------------------------------------------------------
def nan_matrix(M: np.ndarray, value: float = np.nan) -> np.ndarray:
    """``M`` with one entry made non-finite: every product with a generic vector is NaN/inf
    in one row (and a NaN spreads from there in the algorithms' recurrences)."""
    bad = np.array(M, dtype=np.float64)
    bad[1, 2] = bad[2, 1] = value
    return bad


def poisoned(M: np.ndarray, after: int) -> Counting:
    """A dense operator whose products turn NaN after ``after`` good columns."""

    class Poisoned(Counting):
        def _poison(self, y: Any, k: int) -> Any:
            if self.count > after:
                return y * np.nan
            return y

        def _matvec(self, v: Any) -> Any:
            return self._poison(super()._matvec(v), 1)

        def _matmat(self, V: Any) -> Any:
            return self._poison(super()._matmat(V), V.shape[1])

    return Poisoned(M)
