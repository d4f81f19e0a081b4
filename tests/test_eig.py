"""hessop.eigsh and hessop.power_iteration against numpy/scipy on known spectra and Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
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

D = 120
# Indefinite, with a cluster at the top and a double eigenvalue at the bottom.
SPEC = np.concatenate([[-6.0, -6.0, -5.0], np.linspace(-1.0, 1.0, D - 6), [4.0, 4.01, 4.02]])
A_MAT = with_spectrum(SPEC, seed=21)


def expected(spec: np.ndarray, k: int, which: str) -> np.ndarray:
    key = {"LA": -spec, "SA": spec, "LM": -np.abs(spec)}[which]
    return np.sort(spec[np.argsort(key, kind="stable")[:k]])


def check_pairs(res, M: np.ndarray, tol: float) -> None:
    lam, X = to_numpy(res.eigenvalues), to_numpy(res.eigenvectors)
    assert np.all(np.diff(lam) >= 0), "eigenvalues must be ascending (scipy's convention)"
    np.testing.assert_allclose(X.T @ X, np.eye(len(lam)), atol=1e-10)
    resid = np.linalg.norm(M @ X - X * lam, axis=0)
    assert np.all(resid <= tol * np.maximum(np.abs(lam), 1e-3 * np.abs(M).max()) * 10)
    np.testing.assert_allclose(res.residual_norms, resid, atol=1e-10 * np.abs(M).max())


@pytest.mark.parametrize("fw", framework_params())
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_matches_eigh(fw, which):
    k = 4
    with rng_untouched():
        res = hessop.eigsh(native(fw, A_MAT), k, which, seed=0)
    assert_native(fw, res.eigenvalues)
    assert_native(fw, res.eigenvectors)
    assert res.eigenvectors.shape == (D, k)
    assert res.converged.dtype == bool and res.converged.all()
    np.testing.assert_allclose(to_numpy(res.eigenvalues), expected(SPEC, k, which), atol=1e-10)
    check_pairs(res, A_MAT, 1e-8)


# (spectrum, k, which): the ARPACK comparison cases, d = 500.
ARPACK_CASES = {
    "linear-LA-6": (np.linspace(1.0, 100.0, 500), 6, "LA"),
    "linear-SA-1": (np.linspace(1.0, 100.0, 500), 1, "SA"),
    "indefinite-LM-6": (
        np.concatenate([np.linspace(-50.0, -1.0, 250), np.linspace(1.0, 100.0, 250)]),
        6,
        "LM",
    ),
    "indefinite-SA-6": (
        np.concatenate([np.linspace(-50.0, -1.0, 250), np.linspace(1.0, 100.0, 250)]),
        6,
        "SA",
    ),
    "cluster-LA-6": (
        np.concatenate([[10.0, 9.99, 9.98, 9.0, 8.0], np.linspace(0.0, 5.0, 495)]),
        6,
        "LA",
    ),
    "degenerate-LA-6": (
        np.concatenate([[10.0, 10.0, 10.0, 7.0, 7.0], np.linspace(0.0, 5.0, 495)]),
        6,
        "LA",
    ),
    "decay-LA-10": (np.logspace(0.0, -8.0, 500), 10, "LA"),
}


@pytest.fixture(scope="module")
def basis_500() -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(7).standard_normal((500, 500)))[0]


@pytest.mark.parametrize("case", list(ARPACK_CASES))
def test_matvecs_within_1_5x_of_arpack(case, basis_500):
    spec, k, which = ARPACK_CASES[case]
    M = (basis_500 * spec) @ basis_500.T
    M = (M + M.T) / 2
    count = [0]

    def mv(v):
        count[0] += 1
        return M @ v

    arpack_vals = spla.eigsh(spla.LinearOperator(M.shape, matvec=mv), k, which=which, tol=1e-8)[0]
    ours_op = Counting(M)
    res = hessop.eigsh(ours_op, k, which, tol=1e-8)
    assert res.converged.all()
    assert ours_op.count == res.num_matvecs
    assert res.num_matvecs <= 1.5 * count[0], (res.num_matvecs, count[0])
    scale = np.abs(spec).max()
    np.testing.assert_allclose(to_numpy(res.eigenvalues), np.sort(arpack_vals), atol=1e-8 * scale)
    np.testing.assert_allclose(res.eigenvalues, expected(spec, k, which), atol=1e-8 * scale)
    check_pairs(res, M, 1e-8)


def test_degenerate_eigenvalues_found_with_multiplicity():
    spec = np.concatenate([[5.0, 5.0, 5.0], np.linspace(0.0, 1.0, 57)])
    res = hessop.eigsh(with_spectrum(spec, seed=2), 3, "LA")
    np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0, 5.0], atol=1e-10)
    check_pairs(res, with_spectrum(spec, seed=2), 1e-8)


def test_breakdown_restarts_in_fresh_directions():
    # Three distinct eigenvalues: a Krylov space from one vector is invariant after 3 steps,
    # so eigsh must continue in new directions to find all copies.
    spec = np.repeat([-1.0, 2.0, 3.0], [55, 2, 3])
    M = with_spectrum(spec, seed=5)
    res = hessop.eigsh(M, 5, "LA")
    assert res.converged.all()
    np.testing.assert_allclose(res.eigenvalues, [2.0, 2.0, 3.0, 3.0, 3.0], atol=1e-10)
    check_pairs(res, M, 1e-8)


def test_small_problem_ncv_equals_d():
    spec = np.array([-2.0, 0.5, 1.0, 3.0, 4.0, 7.0])
    M = with_spectrum(spec, seed=1)
    res = hessop.eigsh(M, 2, "LM")
    np.testing.assert_allclose(res.eigenvalues, [4.0, 7.0], atol=1e-12)


def test_not_converged_is_flagged_not_raised():
    spec = np.linspace(1.0, 1.0001, 200)  # no separation at all
    res = hessop.eigsh(with_spectrum(spec, seed=3), 3, "LA", tol=1e-14, maxiter=2, ncv=8)
    assert res.num_restarts == 1
    assert not res.converged.all()
    assert res.eigenvalues.shape == (3,)


def test_seed_determinism_and_v0():
    a = hessop.eigsh(A_MAT, 3, seed=4)
    b = hessop.eigsh(A_MAT, 3, seed=4)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    assert a.num_matvecs == b.num_matvecs
    v0 = np.random.default_rng(0).standard_normal(D)
    c = hessop.eigsh(A_MAT, 3, v0=v0)
    np.testing.assert_allclose(c.eigenvalues, a.eigenvalues, atol=1e-10)


def test_errors():
    M = with_spectrum(np.arange(1.0, 11.0))
    with pytest.raises(ValueError, match="k < d"):
        hessop.eigsh(M, 10)
    with pytest.raises(ValueError, match="k < d"):
        hessop.eigsh(M, 12)
    with pytest.raises(hessop.UnknownOptionError, match="'LA'"):
        hessop.eigsh(M, 2, "BE")
    with pytest.raises(ValueError, match="ncv"):
        hessop.eigsh(M, 2, ncv=2)
    with pytest.raises(ValueError, match="k < d"):
        hessop.power_iteration(M, 10)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_on_hessian(backend, which):
    H, dense = hessian_operator("mlp", backend)
    with rng_untouched():
        res = hessop.eigsh(H, 3, which)
    assert_native(backend, res.eigenvalues, H.device)
    assert_native(backend, res.eigenvectors, H.device)
    spec = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(to_numpy(res.eigenvalues), expected(spec, 3, which), atol=1e-9)
    check_pairs(res, dense, 1e-8)


# --- power iteration --------------------------------------------------------------------------
@pytest.mark.parametrize("fw", framework_params())
def test_power_iteration_with_deflation(fw):
    spec = np.concatenate([[10.0, -7.0, 4.0], np.linspace(-1.0, 1.0, 47)])
    M = with_spectrum(spec, seed=8)
    with rng_untouched():
        res = hessop.power_iteration(native(fw, M), 3, tol=1e-12, maxiter=2000)
    assert_native(fw, res.eigenvalues)
    assert_native(fw, res.eigenvectors)
    assert res.converged.all()
    # Found in decreasing magnitude, deflating the previous ones.
    np.testing.assert_allclose(to_numpy(res.eigenvalues), [10.0, -7.0, 4.0], rtol=1e-8)
    X = to_numpy(res.eigenvectors)
    np.testing.assert_allclose(np.abs(X.T @ X), np.eye(3), atol=1e-4)
    assert res.num_matvecs == int(res.iterations.sum())


@pytest.mark.parametrize("backend", backend_params())
def test_power_iteration_on_hessian(backend):
    H, dense = hessian_operator("mlp", backend)
    res = hessop.power_iteration(H, 2, tol=1e-12, maxiter=3000)
    spec = np.linalg.eigvalsh(dense)
    top = spec[np.argsort(-np.abs(spec))[:2]]
    np.testing.assert_allclose(to_numpy(res.eigenvalues), top, rtol=1e-6)


# --- misuse: non-finite values and meaningless options ----------------------------------------
@pytest.mark.parametrize("fw", framework_params())
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_products_raise_named_error(fw, value):
    # Issue #10: NaN products used to die in numpy's LinAlgError.
    bad = native(fw, nan_matrix(A_MAT, value))
    with pytest.raises(hessop.NonFiniteError, match="eigsh.*step 1"):
        hessop.eigsh(bad, 3)
    with pytest.raises(hessop.NonFiniteError, match="eigsh.*step 30"):
        hessop.eigsh(poisoned(native(fw, A_MAT), after=29), 3)
    with pytest.raises(hessop.NonFiniteError, match="power_iteration.*step 1"):
        hessop.power_iteration(bad, 1)
    v0 = np.ones(D)
    v0[0] = value
    with pytest.raises(hessop.NonFiniteError, match="v0"):
        hessop.eigsh(native(fw, A_MAT), 3, v0=native(fw, v0))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"k": 0}, ValueError, "k must be an integer >= 1"),
        ({"k": 2.0}, TypeError, "k must be an integer"),
        ({"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"maxiter": 0}, ValueError, "maxiter must be an integer >= 1"),
        ({"ncv": 0}, ValueError, "ncv must be an integer >= 1"),
        ({"ncv": 3}, ValueError, "k < ncv <= d"),
        ({"ncv": D + 1}, ValueError, "k < ncv <= d"),
        ({"which": "XX"}, hessop.UnknownOptionError, "'LA', 'SA', 'LM'"),
        ({"which": None}, hessop.UnknownOptionError, "which"),
        ({"progress": 1}, TypeError, "progress"),
        ({"v0": np.ones(D + 2)}, hessop.ShapeError, "v0"),
    ],
)
def test_eigsh_meaningless_options(kwargs, exc, match):
    kwargs = {"k": 3, **kwargs}
    with pytest.raises(exc, match=match):
        hessop.eigsh(A_MAT, **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"k": 0}, ValueError, "k must be an integer >= 1"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"maxiter": -5}, ValueError, "maxiter must be an integer >= 1"),
        ({"maxiter": None}, TypeError, "maxiter"),
    ],
)
def test_power_iteration_meaningless_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hessop.power_iteration(A_MAT, **kwargs)


def test_tol_zero_means_machine_precision():
    res = hessop.eigsh(A_MAT, 2, tol=0.0)
    assert res.converged.all()
    np.testing.assert_allclose(res.eigenvalues, expected(SPEC, 2, "LA"), atol=1e-12)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_immutable_basis_gives_the_same_pairs(monkeypatch, which):
    # The JAX layout (blocks of rows written functionally) on numpy arrays: the same
    # arithmetic, so the same eigenpairs and product counts as the in-place layout.
    ref = hessop.eigsh(A_MAT, 4, which, seed=1)
    monkeypatch.setattr(_basis.array_api_compat, "is_writeable_array", lambda x: False)
    res = hessop.eigsh(A_MAT, 4, which, seed=1)
    assert res.num_matvecs == ref.num_matvecs
    np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, atol=1e-12)
    # The same invariant subspace: SA's double eigenvalue -6 fixes a plane, not its basis
    # (a rounding difference may rotate or swap the two vectors), so compare projectors.
    P_res = res.eigenvectors @ res.eigenvectors.T
    np.testing.assert_allclose(P_res, ref.eigenvectors @ ref.eigenvectors.T, atol=1e-8)
    check_pairs(res, A_MAT, 1e-8)
    p = hessop.power_iteration(A_MAT, 2, tol=1e-10, maxiter=2000)
    np.testing.assert_allclose(np.abs(p.eigenvalues), [6.0, 6.0], rtol=1e-6)


@pytest.mark.parametrize("writable", [True, False])
def test_basis_against_numpy(writable):
    # Basis on its own: rows written one by one, projections and combinations equal numpy's.
    rng = np.random.default_rng(0)
    d, m, p = 40, 11, 2
    A = hessop.aslinearoperator(np.eye(d))
    Q = np.stack([np.linalg.qr(rng.standard_normal((d, m)))[0].T for _ in range(p)])  # (p, m, d)
    basis = _basis.Basis(A, p, m, writable=writable)
    for i in range(7):
        basis.append(2.0 * Q[:, i, :], np.array([2.0, 2.0]))
    W = rng.standard_normal((p, d))
    proj, norm, H = basis.project(W)
    Qf = Q[:, :7, :]
    ref = W - np.einsum("pmd,pm->pd", Qf, np.einsum("pmd,pd->pm", Qf, W))
    np.testing.assert_allclose(proj, ref, atol=1e-12)
    np.testing.assert_allclose(norm, np.linalg.norm(ref, axis=1), rtol=1e-12)
    np.testing.assert_allclose(H, np.einsum("pmd,pd->mp", Qf, W), rtol=1e-12)
    S = rng.standard_normal((p, 7, 3))
    np.testing.assert_allclose(basis.combine(S), np.einsum("pmk,pmd->pkd", S, Qf), atol=1e-12)
    basis.reset(Q[:, 7:9, :])
    assert basis.n == 2
    np.testing.assert_allclose(basis.row(1), Q[:, 8, :])
    _, _, H = basis.project(W)
    np.testing.assert_allclose(H, np.einsum("pmd,pd->mp", Q[:, 7:9, :], W), rtol=1e-12)


def test_to_scipy_holds_host_blas_to_one_thread_during_framework_products():
    # Issue #15: numpy's/scipy's idle BLAS workers spinning beside a torch product tripled
    # its cost; to_scipy limits them to one thread for the product, and only for it.
    torch = pytest.importorskip("torch")
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def host_blas_threads():
        return [
            info["num_threads"]
            for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"
            and ("numpy" in info["filepath"] or "scipy" in info["filepath"])
        ]

    before = host_blas_threads()
    if not before:
        pytest.skip("threadpoolctl sees no BLAS library of numpy or scipy here")
    seen = []
    M = torch.as_tensor(A_MAT)

    def matvec(v):
        seen.append(host_blas_threads())
        return M @ v

    op = hessop.aslinearoperator(matvec, shape=(D, D), backend="torch", symmetric=True)
    vals = spla.eigsh(op.to_scipy(), 3, which="LA", tol=1e-10)[0]
    np.testing.assert_allclose(np.sort(vals), expected(SPEC, 3, "LA"), atol=1e-9)
    assert seen and all(threads == [1] * len(before) for threads in seen)
    assert host_blas_threads() == before
