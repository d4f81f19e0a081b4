"""The machinery of the misuse suite (tests/test_misuse*.py): one :class:`Case` per call.

A case is a call that builds and runs one use of a public function with one misuse (or one
unusual but legal input), and what must come of it: a named error whose message names the
cause, or numbers checked against an independent reference (closed forms, numpy, the
framework's own autodiff), never against hessop itself. :func:`run_case` also checks that
the call left the global random generators as they were, on the error path too.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pytest

import hessop
from conftest import has_framework, to_native, to_numpy

BOTH = ("torch", "jax")
#: the exceptions a misuse may raise: hessop's own, or a ValueError / TypeError naming the
#: argument (the contract); NotImplementedError for an operator without rmatvec
ALLOWED = (hessop.HessopError, ValueError, TypeError, NotImplementedError)


@dataclass(frozen=True)
class Case:
    """One call and its expected outcome.

    ``call(backend)`` runs the call for a backend name (``"numpy"`` for framework-free
    rows, ``"both"`` for rows that mix the two frameworks). Exactly one of ``raises``
    (with ``match``, a regex on the message) and ``check(result, backend)`` is given.
    """

    id: str
    call: Callable[[str], Any]
    raises: type[BaseException] | tuple[type[BaseException], ...] | None = None
    match: str = ""
    check: Callable[[Any, str], None] | None = None
    backends: tuple[str, ...] = BOTH

    def __post_init__(self) -> None:
        if (self.raises is None) == (self.check is None):
            raise AssertionError(f"{self.id}: give raises= or check=, not both")
        if self.raises is not None:
            classes = self.raises if isinstance(self.raises, tuple) else (self.raises,)
            if not all(issubclass(c, ALLOWED) for c in classes):
                raise AssertionError(f"{self.id}: {self.raises} is outside the contract")
            if len(self.match) < 6:
                raise AssertionError(f"{self.id}: the expected message must name the cause")


def err(id: str, call: Callable[[str], Any], raises: type, match: str, **kw: Any) -> Case:
    return Case(id, call, raises=raises, match=match, **kw)


def ok(id: str, call: Callable[[str], Any], check: Callable[[Any, str], None], **kw: Any) -> Case:
    return Case(id, call, check=check, **kw)


def only(backends: tuple[str, ...], *cases: Case, **changes: Any) -> list[Case]:
    """``cases`` restricted to ``backends`` (and with ``changes``)."""
    return [dataclasses.replace(c, backends=backends, **changes) for c in cases]


def _available(backend: str) -> bool:
    if backend == "numpy":
        return True
    if backend == "both":
        return has_framework("torch") and has_framework("jax")
    return has_framework(backend)


def params(cases: list[Case]) -> list[Any]:
    """``pytest.param((case, backend))`` for every case and each of its backends."""
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicate case ids: {dup}"
    out = []
    for case in cases:
        for b in case.backends:
            marks = [pytest.mark.skipif(not _available(b), reason=f"{b} not installed")]
            out.append(pytest.param(case, b, id=f"{case.id}-{b}", marks=marks))
    return out


def rng_states() -> tuple[Any, ...]:
    states: list[Any] = [np.random.get_state()[1].copy(), random.getstate()]
    if has_framework("torch"):
        import torch

        states.append(torch.get_rng_state())
    return tuple(states)


def same_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if not (np.array_equal(a[0], b[0]) and a[1] == b[1]):
        return False
    return len(a) < 3 or bool((a[2] == b[2]).all())


def run_case(case: Case, backend: str) -> None:
    before = rng_states()
    if case.raises is not None:
        with pytest.raises(case.raises, match=case.match):
            case.call(backend)
    else:
        case.check(case.call(backend), backend)
    assert same_states(before, rng_states()), "the call moved a global random generator"


# --- references ---------------------------------------------------------------------------
def close(ref: Any, rtol: float = 1e-10, atol: float = 1e-12) -> Callable[[Any, str], None]:
    """Check that the result equals ``ref`` (an array, or ``ref(backend)``)."""

    def check(out: Any, backend: str) -> None:
        want = ref(backend) if callable(ref) else ref
        got = to_numpy(out)
        assert got.shape == np.shape(want), (got.shape, np.shape(want))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)

    return check


def is_true(out: Any, backend: str) -> None:
    assert out is True or bool(out), out


def nan_propagates(H: np.ndarray, v: np.ndarray, rtol: float = 1e-10) -> Callable:
    """Check ``H @ v`` for a ``v`` (or a point) with non-finite entries: every entry coupled
    to one (``H[i, j] != 0``) is non-finite, the others are finite and right.

    Entries that are not coupled may also come out NaN (``0 * nan`` in a dense product is
    NaN): modes legitimately differ there. A non-finite input silently dropped, or a wrong
    finite entry, fails.
    """
    bad = ~np.isfinite(v)
    coupled = (np.abs(H[:, bad]) > 0).any(axis=1) | ~np.isfinite(H).all(axis=1)
    safe = np.where(bad, 0.0, v)
    ref = np.where(np.isfinite(H), H, 0.0) @ safe

    def check(out: Any, backend: str) -> None:
        got = to_numpy(out)
        assert not np.isfinite(got[coupled]).any(), got
        fin = np.isfinite(got) & ~coupled
        np.testing.assert_allclose(got[fin], ref[fin], rtol=rtol, atol=1e-12)

    return check


# --- the standard problems: closed-form Hessians, operators shared across cases -----------
def nat(backend: str, x: Any, dtype: str = "float64") -> Any:
    return to_native(backend, x, dtype)


def sym(n: int, seed: int = 0) -> np.ndarray:
    M = np.random.default_rng(seed).standard_normal((n, n))
    return M + M.T


A3 = sym(3)
W3 = np.array([0.5, -1.0, 2.0])
#: quad at (W3, A3): its Hessian, gradient and value, by hand
QUAD_H = A3 + np.diag(3 * W3**2)
QUAD_G = A3 @ W3 + W3**3
QUAD_F = 0.5 * W3 @ A3 @ W3 + (W3**4).sum() / 4
V3 = np.array([1.0, -2.0, 0.5])
M32 = np.array([[1.0, 0.0], [-2.0, 1.0], [0.5, 3.0]])


def quad(w: Any, A: Any) -> Any:
    """0.5 w^T A w + sum(w^4) / 4: Hessian A + diag(3 w^2)."""
    return 0.5 * w @ A @ w + (w**4).sum() / 4


@cache
def quad_op(backend: str, mode: str = "auto") -> Any:
    """The quad operator at (W3, A3), built once per session: never mutate its inputs."""
    return hessop.hessian(quad, nat(backend, W3), nat(backend, A3), mode=mode)


#: a nested pytree point {"W": (2, 3), "b": [(3,), ()]}; flat layout W, b[0], b[1]
C23 = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
TREE = {"W": np.array([[0.3, -0.2, 0.1], [1.0, 0.5, -0.7]]), "b": [np.array([0.2, -0.4, 1.5]), 0.8]}


def tree_loss(p: Any, C: Any) -> Any:
    """0.5 sum(C W^2) + s |b|^2 + s^3 / 3 with b, s = p["b"]."""
    b, s = p["b"]
    return 0.5 * (C * p["W"] ** 2).sum() + s * (b**2).sum() + s**3 / 3


def _tree_reference() -> tuple[np.ndarray, np.ndarray]:
    b, s = TREE["b"]
    H = np.zeros((10, 10))
    H[:6, :6] = np.diag(C23.ravel())
    H[6:9, 6:9] = 2 * s * np.eye(3)
    H[9, 9] = 2 * s
    H[6:9, 9] = H[9, 6:9] = 2 * b
    g = np.concatenate([(C23 * TREE["W"]).ravel(), 2 * s * b, [(b**2).sum() + s**2]])
    return H, g


TREE_H, TREE_G = _tree_reference()


def tree_point(backend: str) -> Any:
    return {
        "W": nat(backend, TREE["W"]),
        "b": [nat(backend, TREE["b"][0]), nat(backend, np.asarray(TREE["b"][1]))],
    }


@cache
def tree_op(backend: str) -> Any:
    return hessop.hessian(tree_loss, tree_point(backend), nat(backend, C23))


def xp_of(backend: str) -> Any:
    if backend == "torch":
        import torch

        return torch
    import jax.numpy as jnp

    return jnp


def other(backend: str) -> str:
    return "jax" if backend == "torch" else "torch"
