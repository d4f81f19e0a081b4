"""The Rayleigh-Ritz solver behind curvature_by_layer and SharpnessTracker, against numpy's
eigh on explicit matrices."""

from __future__ import annotations

import numpy as np
import pytest

import hessop
from conftest import backend_params, to_native, to_numpy
from hessop.algorithms._subspace import RitzProblem, lockstep, random_block


def spectrum_matrix(n: int, top: list[float], seed: int = 0) -> np.ndarray:
    """A symmetric matrix with the given top eigenvalues, the rest uniform in [-3, 2]."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([top, rng.uniform(-3.0, 2.0, n - len(top))])
    return (Q * lam) @ Q.T


def solve(A: np.ndarray, X0: np.ndarray, k: int, backend: str = "numpy", **kw):
    op = hessop.aslinearoperator(to_native(backend, A))
    kw = {"tol": 1e-10, "ncv": 20, "max_matvecs": 2000, **kw}
    p = RitzProblem(op, op.asarray(X0), k, **kw)
    rounds = lockstep([p], lambda blocks, _: [op.matmat(blocks[0])])
    return p, rounds


@pytest.mark.parametrize("backend", ["numpy", *backend_params()])
@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenpairs_match_eigh(backend, k):
    A = spectrum_matrix(200, [10.0, 9.5, 9.0, 8.0])
    p, _ = solve(A, random_block(np.random.default_rng(1), 200, k), k, backend)
    exact, vecs = np.linalg.eigh(A)
    np.testing.assert_allclose(p.values[:k], exact[::-1][:k], rtol=1e-12)
    assert p.converged.all() and (p.residual_norms <= 1e-10 * 10.0).all()
    Y = to_numpy(p.vectors)[:, :k]
    # The residuals it reports are the true ones, and the vectors are orthonormal.
    true_res = np.linalg.norm(A @ Y - Y * p.values[:k], axis=0)
    np.testing.assert_allclose(p.residual_norms, true_res, rtol=1e-3, atol=1e-13)
    np.testing.assert_allclose(Y.T @ Y, np.eye(k), atol=1e-12)


def test_one_vector_start_is_lanczos():
    # From one vector the subspace is the Krylov space: as many products as eigsh needs.
    A = spectrum_matrix(300, [10.0, 9.5])
    x0 = np.random.default_rng(2).standard_normal((300, 1))
    p, rounds = solve(A, x0, 1, ncv=400)
    lz = hessop.lanczos(A, p.num_matvecs, v0=x0[:, 0])
    theta = np.linalg.eigvalsh(np.asarray(lz.tridiagonal()))
    assert rounds == p.num_matvecs
    np.testing.assert_allclose(p.values[0], theta[-1], rtol=1e-12)


def test_thick_restarts_converge():
    A = spectrum_matrix(400, [10.0, 9.9, 9.8])
    p, _ = solve(A, random_block(np.random.default_rng(3), 400, 2), 2, ncv=8)
    np.testing.assert_allclose(p.values[:2], [10.0, 9.9], rtol=1e-11)
    assert p.num_matvecs > 8  # it did restart


def test_warm_start_is_cheaper_than_cold():
    A = spectrum_matrix(300, [10.0, 9.0])
    E = np.random.default_rng(4).standard_normal((300, 300)) * 1e-3
    B = A + E + E.T  # a nearby matrix
    cold, _ = solve(A, random_block(np.random.default_rng(5), 300, 1), 1, tol=1e-10, keep=2)
    warm, _ = solve(B, cold.vectors, 1, tol=1e-6)
    again, _ = solve(B, random_block(np.random.default_rng(5), 300, 1), 1, tol=1e-6)
    top = np.linalg.eigvalsh(B)[-1]
    assert abs(warm.values[0] - top) < 1e-9 and abs(again.values[0] - top) < 1e-9
    assert warm.num_matvecs < again.num_matvecs / 2


def test_budget_exhausted_is_flagged():
    A = spectrum_matrix(300, [10.0, 9.99])
    p, _ = solve(A, random_block(np.random.default_rng(6), 300, 1), 1, max_matvecs=5)
    assert p.num_matvecs == 5 and not p.converged.any()
    assert p.residual_norms[0] > 1e-10 * 10


def test_small_blocks_are_exact():
    # k at least the size: the subspace is the whole space after one round.
    A = spectrum_matrix(3, [2.0])
    p, rounds = solve(A, random_block(np.random.default_rng(7), 3, 3), 5)
    assert p.k == 3 and rounds == 1 and p.converged.all()
    np.testing.assert_allclose(p.values[:3], np.linalg.eigvalsh(A)[::-1], rtol=1e-12)


def test_zero_matrix_and_zero_start_column():
    p, _ = solve(np.zeros((10, 10)), np.zeros((10, 1)), 1)  # a zero start: random directions
    assert p.values[0] == 0.0 and p.converged.all()


def test_lockstep_applies_all_problems_together():
    mats = [spectrum_matrix(n, [5.0 + n / 100]) for n in (50, 80, 120)]
    ops = [hessop.aslinearoperator(M) for M in mats]
    rng = np.random.default_rng(8)
    probs = [
        RitzProblem(op, random_block(rng, op.shape[0], 1), 1, tol=1e-10, ncv=20, max_matvecs=500)
        for op in ops
    ]
    calls = []

    def apply(blocks, which):
        calls.append(list(which))
        return [mats[i] @ B for B, i in zip(blocks, which)]

    rounds = lockstep(probs, apply)
    assert rounds == len(calls) == max(p.num_matvecs for p in probs)
    assert calls[0] == [0, 1, 2]
    for p, M in zip(probs, mats):
        np.testing.assert_allclose(p.values[0], np.linalg.eigvalsh(M)[-1], rtol=1e-12)
