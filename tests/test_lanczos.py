"""hessop.lanczos: the tridiagonalization on matrices with known spectra and on Hessians."""

from __future__ import annotations

import numpy as np
import pytest
from algo_helpers import (
    Counting,
    assert_native,
    framework_params,
    hessian_operator,
    nan_matrix,
    native,
    poisoned,
    rng_untouched,
    with_spectrum,
)

import hessop
from conftest import backend_params, to_numpy
from hessop.algorithms import _basis

D = 50
SPEC = np.concatenate([[-4.0, -2.5], np.linspace(0.1, 3.0, D - 4), [8.0, 9.0]])
A_MAT = with_spectrum(SPEC, seed=11)


@pytest.fixture(params=framework_params())
def fw(request) -> str:
    return request.param


def test_three_term_relation_and_orthonormal_basis(fw):
    m = 25
    with rng_untouched():
        res = hessop.lanczos(native(fw, A_MAT), m, seed=3, return_basis=True)
    for x in (res.alpha, res.beta, res.basis, res.tridiagonal()):
        assert_native(fw, x)
    assert res.num_iter == m and not res.breakdown and res.num_matvecs == m
    assert res.alpha.shape == (m,) and res.beta.shape == (m - 1,)
    Q, T = to_numpy(res.basis), to_numpy(res.tridiagonal())
    np.testing.assert_allclose(Q.T @ Q, np.eye(m), atol=1e-13)
    np.testing.assert_allclose(Q.T @ A_MAT @ Q, T, atol=1e-12)
    # A Q = Q T + r e_m^T with ||r|| the reported residual norm.
    R = A_MAT @ Q - Q @ T
    np.testing.assert_allclose(R[:, :-1], 0.0, atol=1e-12)
    assert np.linalg.norm(R[:, -1]) == pytest.approx(res.residual_norm, rel=1e-10)


def test_extreme_ritz_values_converge(fw):
    res = hessop.lanczos(native(fw, A_MAT), 25, seed=0)
    theta = np.linalg.eigvalsh(to_numpy(res.tridiagonal()))
    np.testing.assert_allclose(theta[[0, 1, -2, -1]], [-4.0, -2.5, 8.0, 9.0], rtol=1e-10)


def test_same_across_frameworks_and_seeds():
    ref = hessop.lanczos(A_MAT, 20, seed=7)
    for fw in ("torch", "jax"):
        pytest.importorskip(fw)
        other = hessop.lanczos(native(fw, A_MAT), 20, seed=7)
        np.testing.assert_allclose(to_numpy(other.alpha), ref.alpha, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(other.beta), ref.beta, rtol=1e-12)
    again = hessop.lanczos(A_MAT, 20, seed=7)
    np.testing.assert_array_equal(again.alpha, ref.alpha)
    assert not np.allclose(hessop.lanczos(A_MAT, 20, seed=8).alpha, ref.alpha)


def test_full_reorthogonalization_prevents_ghosts():
    # Two outliers over a dense bulk: without reorthogonalization, converged outliers come
    # back as spurious copies ("ghosts") and the basis loses orthogonality.
    spec = np.concatenate([[100.0, 50.0], np.linspace(0.0, 1.0, 198)])
    A = with_spectrum(spec, seed=3)
    counts = {}
    for reorth in (True, False):
        res = hessop.lanczos(A, 80, reorthogonalize=reorth, return_basis=True)
        theta = np.linalg.eigvalsh(res.tridiagonal())
        counts[reorth] = int(np.sum(np.abs(theta - 100.0) < 1e-6))
        loss = np.abs(res.basis.T @ res.basis - np.eye(80)).max()
        assert (loss < 1e-12) if reorth else (loss > 0.1)
    assert counts[True] == 1
    assert counts[False] >= 3


def test_breakdown_on_invariant_subspace(fw):
    # Five distinct eigenvalues (degenerate): the Krylov space is exhausted after 5 steps.
    spec = np.repeat([-1.0, 0.5, 2.0, 3.0, 7.0], 10)
    A = Counting(native(fw, with_spectrum(spec, seed=4)))
    res = hessop.lanczos(A, 20, seed=1)
    assert res.breakdown and res.num_iter == 5 and res.residual_norm == 0.0
    assert A.count == res.num_matvecs == 5
    theta = np.linalg.eigvalsh(to_numpy(res.tridiagonal()))
    np.testing.assert_allclose(theta, [-1.0, 0.5, 2.0, 3.0, 7.0], atol=1e-12)


def test_v0_and_caps():
    v0 = np.zeros(D)
    v0[0] = 3.0
    res = hessop.lanczos(A_MAT, 5, v0=v0, return_basis=True)
    np.testing.assert_allclose(res.basis[:, 0], np.eye(D)[0])
    assert res.alpha[0] == pytest.approx(A_MAT[0, 0])
    full = hessop.lanczos(A_MAT, 10 * D)  # capped at d, where the space is exhausted
    assert full.num_iter == D and full.breakdown
    np.testing.assert_allclose(np.linalg.eigvalsh(full.tridiagonal()), SPEC, atol=1e-11)
    with pytest.raises(ValueError, match="num_iter"):
        hessop.lanczos(A_MAT, 0)


def test_without_reorthogonalization_keeps_three_term_recurrence():
    res = hessop.lanczos(A_MAT, 8, reorthogonalize=False, seed=2, return_basis=True)
    ref = hessop.lanczos(A_MAT, 8, reorthogonalize=True, seed=2)
    # Early on, before orthogonality is lost, both agree.
    np.testing.assert_allclose(res.alpha, ref.alpha, rtol=1e-8)
    np.testing.assert_allclose(res.beta, ref.beta, rtol=1e-8)
    assert res.basis.shape == (D, 8)


@pytest.mark.parametrize("backend", backend_params())
def test_hessian_operator_full_run_recovers_spectrum(backend):
    H, dense = hessian_operator("mlp", backend)
    d = H.shape[0]
    with rng_untouched():
        res = hessop.lanczos(H, d, seed=0, return_basis=True)
    assert_native(backend, res.alpha, H.device)
    theta = np.linalg.eigvalsh(to_numpy(res.tridiagonal()))
    expected = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(theta, expected, atol=1e-10)
    Q = to_numpy(res.basis)
    np.testing.assert_allclose(Q.T @ dense @ Q, to_numpy(res.tridiagonal()), atol=1e-10)


def test_zero_start_vector_is_refused():
    with pytest.raises(ValueError, match="nonzero"):
        hessop.lanczos(A_MAT, 5, v0=np.zeros(D))
    with pytest.raises(ValueError, match="nonzero"):
        hessop.eigsh(A_MAT, 2, v0=np.zeros(D))


# --- misuse, and the immutable basis layout ---------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_products_and_start_raise(fw, value):
    with pytest.raises(hessop.NonFiniteError, match="lanczos.*step 0"):
        hessop.lanczos(native(fw, nan_matrix(A_MAT, value)), 10)
    with pytest.raises(hessop.NonFiniteError, match="lanczos.*step 6"):
        hessop.lanczos(poisoned(native(fw, A_MAT), after=6), 10, reorthogonalize=False)
    v0 = np.ones(D)
    v0[4] = value
    with pytest.raises(hessop.NonFiniteError, match="v0"):
        hessop.lanczos(native(fw, A_MAT), 5, v0=native(fw, v0))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_iter": 0}, ValueError, "num_iter must be an integer >= 1"),
        ({"num_iter": 3.0}, TypeError, "num_iter"),
        ({"reorthogonalize": "no"}, TypeError, "reorthogonalize must be True or False"),
        ({"return_basis": 1}, TypeError, "return_basis"),
        ({"v0": np.ones((D, 2))}, hessop.ShapeError, "v0"),
    ],
)
def test_meaningless_options(kwargs, exc, match):
    kwargs = {"num_iter": 5, **kwargs}
    with pytest.raises(exc, match=match):
        hessop.lanczos(A_MAT, **kwargs)


def test_immutable_basis_gives_the_same_tridiagonal(monkeypatch):
    ref = hessop.lanczos(A_MAT, 30, seed=2, return_basis=True)
    monkeypatch.setattr(_basis.array_api_compat, "is_writeable_array", lambda x: False)
    res = hessop.lanczos(A_MAT, 30, seed=2, return_basis=True)
    np.testing.assert_allclose(res.alpha, ref.alpha, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(res.beta, ref.beta, rtol=1e-12)
    np.testing.assert_allclose(res.basis.T @ res.basis, np.eye(30), atol=1e-13)


def test_jax_basis_writes_each_row_into_the_blocks_memory():
    """JAX arrays are immutable: the basis hands its block to the write kernel (donated),
    which writes the new row in place instead of copying the block; the numbers are the
    same as a copy's."""
    jnp = pytest.importorskip("jax.numpy")
    A = hessop.aslinearoperator(jnp.asarray(A_MAT))
    basis = _basis.Basis(A, 1, 12)
    rows = np.random.default_rng(0).standard_normal((3, A_MAT.shape[0]))
    for i, r in enumerate(rows):
        old = basis.blocks[0]
        basis.append(A.asarray(r[None, :]), np.array([2.0]))
        assert old.is_deleted()  # its memory now holds the new block
        np.testing.assert_allclose(np.asarray(basis.row(i))[0], r / 2.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(basis.blocks[0])[0, 3:], 0.0)  # unfilled rows
