"""hessop.cg against numpy solves on matrices with known spectra, and on Hessian operators."""

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

D = 50
SPD = with_spectrum(np.geomspace(1.0, 100.0, D), seed=1)
INDEFINITE = with_spectrum(np.concatenate([[-3.0, -1.0], np.linspace(0.5, 10.0, D - 2)]), seed=2)


@pytest.fixture(params=framework_params())
def fw(request) -> str:
    return request.param


def test_spd_solve_matches_numpy(fw):
    b = np.random.default_rng(0).standard_normal(D)
    with rng_untouched():
        res = hessop.cg(native(fw, SPD), native(fw, b), tol=1e-12)
    assert_native(fw, res.x)
    assert res.converged is True and res.negative_curvature is False
    assert 0 < res.iterations <= 2 * D
    np.testing.assert_allclose(to_numpy(res.x), np.linalg.solve(SPD, b), rtol=1e-9, atol=1e-12)
    true_resid = np.linalg.norm(b - SPD @ to_numpy(res.x))
    assert res.residual_norm <= 1e-12 * np.linalg.norm(b)
    assert true_resid <= 1e-10 * np.linalg.norm(b)
    assert res.curvature_direction is None


def test_block_rhs_per_column_convergence(fw):
    # Column 0 is an eigenvector (one step), column 1 is zero (no step), column 2 is generic.
    w, U = np.linalg.eigh(SPD)
    B = np.stack([U[:, 3], np.zeros(D), np.random.default_rng(1).standard_normal(D)], axis=1)
    A = Counting(native(fw, SPD))
    res = hessop.cg(A, native(fw, B), tol=1e-10)
    assert_native(fw, res.x)
    assert res.x.shape == (D, 3)
    assert res.converged.tolist() == [True, True, True]
    assert res.iterations[0] == 1 and res.iterations[1] == 0 and res.iterations[2] > 5
    # Only the still-active columns are multiplied: one product per column and iteration.
    assert A.count == res.num_matvecs == int(res.iterations.sum())
    assert A.calls == res.iterations.max()  # batched: one call per iteration
    np.testing.assert_allclose(to_numpy(res.x), np.linalg.solve(SPD, B), rtol=1e-8, atol=1e-12)


def test_block_equals_columnwise(fw):
    # Well conditioned, so rounding (matmat vs matvec) cannot shift the stopping step much.
    M = with_spectrum(np.linspace(1.0, 3.0, D), seed=3)
    B = np.random.default_rng(2).standard_normal((D, 3))
    block = hessop.cg(native(fw, M), native(fw, B), tol=1e-8)
    for j in range(3):
        col = hessop.cg(native(fw, M), native(fw, B[:, j]), tol=1e-8)
        assert abs(col.iterations - block.iterations[j]) <= 1
        np.testing.assert_allclose(to_numpy(block.x)[:, j], to_numpy(col.x), rtol=1e-6)


def test_damping_solves_shifted_system(fw):
    b = np.random.default_rng(3).standard_normal(D)
    res = hessop.cg(native(fw, INDEFINITE), native(fw, b), damping=3.5, tol=1e-12)
    assert res.converged and not res.negative_curvature
    expected = np.linalg.solve(INDEFINITE + 3.5 * np.eye(D), b)
    np.testing.assert_allclose(to_numpy(res.x), expected, rtol=1e-9)


def test_negative_curvature_first_step_returns_b(fw):
    w, U = np.linalg.eigh(INDEFINITE)
    b = U[:, 0]  # eigenvalue -3: p0 = b has p^T A p < 0 at once
    res = hessop.cg(native(fw, INDEFINITE), native(fw, b))
    assert res.negative_curvature is True and res.converged is False
    assert res.iterations == 0
    # Newton-CG convention: no step taken, so x is the first direction (b itself).
    np.testing.assert_allclose(to_numpy(res.x), b)
    d = to_numpy(res.curvature_direction)
    assert d @ INDEFINITE @ d < 0


def test_negative_curvature_later_returns_last_iterate(fw):
    w, U = np.linalg.eigh(INDEFINITE)
    # Mostly positive-curvature content with a small negative component: CG makes some
    # progress before a direction of negative curvature appears.
    b = U[:, 10:].sum(axis=1) + 0.05 * U[:, 0]
    iterates = []
    res = hessop.cg(native(fw, INDEFINITE), native(fw, b), tol=1e-14, callback=iterates.append)
    assert res.negative_curvature is True and res.converged is False
    assert res.iterations >= 1 and len(iterates) == res.iterations
    np.testing.assert_allclose(to_numpy(res.x), to_numpy(iterates[-1]))
    d = to_numpy(res.curvature_direction)
    assert d @ INDEFINITE @ d <= 0
    # The last iterate still decreased the quadratic model 0.5 x'Ax - b'x.
    x = to_numpy(res.x)
    assert 0.5 * x @ INDEFINITE @ x - b @ x < 0


def test_block_negative_curvature_only_stops_its_column(fw):
    w, U = np.linalg.eigh(INDEFINITE)
    B = np.stack([U[:, 0], U[:, 5:].sum(axis=1)], axis=1)
    # (a tighter tol would let rounding-level negative components surface in column 1)
    res = hessop.cg(native(fw, INDEFINITE), native(fw, B), tol=1e-8)
    assert res.negative_curvature.tolist() == [True, False]
    assert res.converged.tolist() == [False, True]
    D_ = to_numpy(res.curvature_direction)
    assert np.all(D_[:, 1] == 0) and D_[:, 0] @ INDEFINITE @ D_[:, 0] < 0
    np.testing.assert_allclose(INDEFINITE @ to_numpy(res.x)[:, 1], B[:, 1], atol=1e-6)


def test_preconditioner_operator_and_callable(fw):
    # A badly scaled SPD matrix: Jacobi preconditioning removes the scaling.
    s = np.geomspace(1.0, 1e4, D)
    A = with_spectrum(np.linspace(1.0, 3.0, D), seed=4) * np.sqrt(s)[:, None] * np.sqrt(s)[None]
    b = np.random.default_rng(5).standard_normal(D)
    Minv = np.diag(1.0 / np.diag(A))
    plain = hessop.cg(native(fw, A), native(fw, b), tol=1e-10)
    as_op = hessop.cg(native(fw, A), native(fw, b), tol=1e-10, M=native(fw, Minv))
    dinv = native(fw, 1.0 / np.diag(A))
    as_fn = hessop.cg(native(fw, A), native(fw, b), tol=1e-10, M=lambda r: dinv * r)
    expected = np.linalg.solve(A, b)
    for res in (as_op, as_fn):
        assert res.converged
        np.testing.assert_allclose(to_numpy(res.x), expected, rtol=1e-7)
    assert as_op.iterations == as_fn.iterations
    assert as_op.iterations < plain.iterations / 2


def test_x0_and_tolerances():
    b = np.random.default_rng(6).standard_normal(D)
    x = np.linalg.solve(SPD, b)
    A = Counting(SPD)
    res = hessop.cg(A, b, x0=x)
    assert res.converged and res.iterations == 0 and A.count == res.num_matvecs == 1
    loose = hessop.cg(SPD, b, tol=1e-2)
    tight = hessop.cg(SPD, b, tol=1e-10)
    assert loose.iterations < tight.iterations
    assert loose.residual_norm <= 1e-2 * np.linalg.norm(b)
    by_atol = hessop.cg(SPD, b, tol=0.0, atol=1e-3)
    assert by_atol.converged and by_atol.residual_norm <= 1e-3
    capped = hessop.cg(SPD, b, tol=1e-14, maxiter=3)
    assert capped.iterations == 3 and not capped.converged


def test_matches_scipy_cg_iterate():
    # Same recurrence as scipy's CG: the iterates agree step for step.
    b = np.random.default_rng(7).standard_normal(D)
    ours = hessop.cg(SPD, b, tol=0.0, maxiter=7)
    theirs, _ = spla.cg(SPD, b, rtol=0.0, atol=0.0, maxiter=7)
    np.testing.assert_allclose(ours.x, theirs, rtol=1e-10)


def test_scipy_operator_and_plain_callable():
    b = np.random.default_rng(8).standard_normal(D)
    expected = np.linalg.solve(SPD, b)
    res = hessop.cg(spla.aslinearoperator(SPD), b, tol=1e-12)
    np.testing.assert_allclose(res.x, expected, rtol=1e-9)
    res = hessop.cg(lambda v: SPD @ v, b, tol=1e-12)
    np.testing.assert_allclose(res.x, expected, rtol=1e-9)


def test_numpy_rhs_for_torch_operator():
    torch = pytest.importorskip("torch")
    b = np.random.default_rng(9).standard_normal(D)
    res = hessop.cg(torch.as_tensor(SPD), b, tol=1e-12)
    assert isinstance(res.x, torch.Tensor)
    np.testing.assert_allclose(res.x.numpy(), np.linalg.solve(SPD, b), rtol=1e-9)


def test_errors():
    with pytest.raises(hessop.ShapeError, match=r"\(50,\)"):
        hessop.cg(SPD, np.ones(D + 1))
    with pytest.raises(hessop.ShapeError, match="square"):
        hessop.cg(np.ones((3, 4)), np.ones(3))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch array but the operator is a numpy"):
        hessop.cg(SPD, torch.ones(D, dtype=torch.float64))


def test_progress_bar_runs(capsys):
    res = hessop.cg(SPD, np.ones(D), progress=True)
    assert res.converged


@pytest.mark.parametrize("backend", backend_params())
def test_hessian_operator(backend):
    H, dense = hessian_operator("mlp", backend)
    b = np.random.default_rng(10).standard_normal(H.shape[0])
    bn = native(backend, b)
    lam_min = np.linalg.eigvalsh(dense)[0]
    assert lam_min < 0  # indefinite: damping makes it positive definite
    damping = 1.0 - lam_min
    with rng_untouched():
        res = hessop.cg(H, bn, damping=damping, tol=1e-11)
    assert_native(backend, res.x, H.device)
    assert res.converged and not res.negative_curvature
    expected = np.linalg.solve(dense + damping * np.eye(len(b)), b)
    np.testing.assert_allclose(to_numpy(res.x), expected, rtol=1e-8, atol=1e-10)
    # undamped, CG meets the negative curvature
    res = hessop.cg(H, bn, tol=1e-11)
    d = to_numpy(res.curvature_direction)
    assert res.negative_curvature and d @ dense @ d <= 1e-12 * np.abs(dense).max()


# --- misuse: non-finite values and meaningless options ----------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_right_hand_side_and_x0(fw, value):
    b = np.ones(D)
    b[3] = value
    with pytest.raises(hessop.NonFiniteError, match="right-hand side b"):
        hessop.cg(native(fw, SPD), native(fw, b))
    with pytest.raises(hessop.NonFiniteError, match="x0"):
        hessop.cg(native(fw, SPD), native(fw, np.ones(D)), x0=native(fw, b))
    B = np.ones((D, 3))
    B[5, 2] = value  # one bad column of a block
    with pytest.raises(hessop.NonFiniteError, match="right-hand side b"):
        hessop.cg(native(fw, SPD), native(fw, B))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_products_are_an_error_not_a_step(fw, value):
    # Issue #10: a NaN product used to report negative curvature and return a finite
    # steepest-descent step. Any non-finite product must raise, at any iteration.
    with pytest.raises(hessop.NonFiniteError, match="step 0"):
        hessop.cg(native(fw, nan_matrix(SPD, value)), native(fw, np.ones(D)))
    late = poisoned(native(fw, SPD), after=4)
    with pytest.raises(hessop.NonFiniteError, match="step 4"):
        hessop.cg(late, native(fw, np.ones(D)), tol=1e-14)
    with pytest.raises(hessop.NonFiniteError, match="preconditioner"):
        hessop.cg(native(fw, SPD), native(fw, np.ones(D)), M=lambda r: r * np.nan)


def test_nan_hessian_is_an_error():
    torch = pytest.importorskip("torch")
    w = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    H = hessop.hessian(lambda w: (w**4).sum(), w, backend="torch")
    with pytest.raises(hessop.NonFiniteError, match="product"):
        hessop.cg(H, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"tol": "small"}, TypeError, "tol"),
        ({"atol": -1e-3}, ValueError, "atol must be a finite number >= 0"),
        ({"maxiter": -5}, ValueError, "maxiter must be an integer >= 1"),
        ({"maxiter": 0}, ValueError, "maxiter must be an integer >= 1"),
        ({"maxiter": 2.5}, TypeError, "maxiter"),
        ({"damping": float("inf")}, ValueError, "damping must be a finite number"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"callback": 3}, TypeError, "callback must be callable"),
        ({"progress": "yes"}, TypeError, "progress must be True or False"),
        ({"x0": np.ones(D + 1)}, hessop.ShapeError, "x0"),
    ],
)
def test_meaningless_options_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hessop.cg(SPD, np.ones(D), **kwargs)


def test_complex_and_other_device_inputs_are_refused():
    with pytest.raises(hessop.DTypeError, match="real"):
        hessop.cg(SPD, np.ones(D) + 1j)
    torch = pytest.importorskip("torch")
    with pytest.raises(hessop.DTypeError, match="int64"):
        hessop.cg(torch.as_tensor(SPD), torch.ones(D, dtype=torch.int64))
    with pytest.raises(hessop.DeviceError, match="meta"):
        hessop.cg(torch.as_tensor(SPD), torch.ones(D, dtype=torch.float64, device="meta"))
