"""hessop.diagonal: exact by unit vectors, Hutchinson and XDiag estimators, Hessians."""

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
    rng_untouched,
    with_spectrum,
)

import hessop
from conftest import backend_params, to_numpy

D = 30
A_MAT = with_spectrum(np.concatenate([np.linspace(-2.0, 5.0, D - 2), [15.0, 25.0]]), seed=41)
TRUE = np.diag(A_MAT)


@pytest.mark.parametrize("fw", framework_params())
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_exact_uses_d_batched_products(fw, chunk_size):
    A = Counting(native(fw, A_MAT))
    with rng_untouched():
        res = hessop.diagonal(A, method="exact", chunk_size=chunk_size)
    assert_native(fw, res.estimate)
    np.testing.assert_allclose(to_numpy(res.estimate), TRUE, rtol=1e-14, atol=1e-14)
    assert np.all(to_numpy(res.std_error) == 0)
    assert A.count == res.num_matvecs == D
    assert A.calls == (1 if chunk_size is None else -(-D // chunk_size))


@pytest.mark.parametrize("method,num", [("hutchinson", 10), ("xdiag", 12)])
def test_uses_exactly_num_matvecs(method, num):
    A = Counting(A_MAT)
    res = hessop.diagonal(A, num, method=method)
    assert A.count == res.num_matvecs == num


@pytest.mark.parametrize("method,num", [("hutchinson", 10), ("xdiag", 12)])
def test_unbiased_over_seeds(method, num):
    n_seeds = 300
    runs = [hessop.diagonal(A_MAT, num, method=method, seed=s) for s in range(n_seeds)]
    est = np.stack([r.estimate for r in runs])
    err = np.stack([r.std_error for r in runs])
    sigma = np.maximum(np.sqrt(np.mean(err**2, axis=0)), est.std(axis=0, ddof=1))
    z = (est.mean(axis=0) - TRUE) / (sigma / np.sqrt(n_seeds))
    # 30 entries: all within 5 standard errors of the mean, and no systematic offset.
    assert np.all(np.abs(z) < 5), z
    assert abs(z.mean()) < 5 / np.sqrt(D)
    if method == "hutchinson":
        ratio = np.sqrt(np.mean(err**2, axis=0)) / est.std(axis=0, ddof=1)
        assert np.all((ratio > 0.7) & (ratio < 1.4))


def test_hutchinson_rademacher_variance_formula():
    # With Rademacher probes entry j has variance sum_{l != j} A_jl^2 per probe.
    est = np.stack([hessop.diagonal(A_MAT, 1, seed=s).estimate for s in range(400)])
    var = (A_MAT**2).sum(axis=1) - TRUE**2
    ratio = est.var(axis=0, ddof=1) / var
    assert 0.75 < np.median(ratio) < 1.25


def test_xdiag_beats_hutchinson_on_decaying_spectrum():
    M = with_spectrum(0.6 ** np.arange(D), seed=4)

    def rmse(method):
        est = np.stack([hessop.diagonal(M, 20, method=method, seed=s).estimate for s in range(30)])
        return np.sqrt(np.mean((est - np.diag(M)) ** 2))

    assert rmse("xdiag") < rmse("hutchinson") / 10


@pytest.mark.parametrize("fw", framework_params())
@pytest.mark.parametrize("method,num", [("hutchinson", 10), ("xdiag", 12)])
def test_same_seed_same_numbers_in_every_framework(fw, method, num):
    ref = hessop.diagonal(A_MAT, num, method=method, seed=3)
    with rng_untouched():
        res = hessop.diagonal(native(fw, A_MAT), num, method=method, seed=3)
    assert_native(fw, res.estimate)
    assert_native(fw, res.std_error)
    np.testing.assert_allclose(to_numpy(res.estimate), ref.estimate, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(res.std_error), ref.std_error, rtol=1e-8, atol=1e-12)
    assert not np.allclose(
        hessop.diagonal(A_MAT, num, method=method, seed=4).estimate, ref.estimate
    )


def test_xdiag_non_symmetric_uses_transpose():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((D, 5)) @ rng.standard_normal((5, D))  # rank 5, not symmetric
    op = spla.aslinearoperator(M)  # a scipy operator: not declared symmetric
    res = hessop.diagonal(op, 16, method="xdiag", seed=0)
    # The leave-one-out sketches of 7 probes capture the rank-5 range: exact.
    np.testing.assert_allclose(res.estimate, np.diag(M), atol=1e-9)


def test_errors():
    with pytest.raises(ValueError, match="exactly d=30"):
        hessop.diagonal(A_MAT, 5, method="exact")
    with pytest.raises(ValueError, match="needs num_matvecs"):
        hessop.diagonal(A_MAT)
    with pytest.raises(ValueError, match="even"):
        hessop.diagonal(A_MAT, 7, method="xdiag")
    with pytest.raises(hessop.UnknownOptionError, match="xdiag"):
        hessop.diagonal(A_MAT, 8, method="bekas")


@pytest.mark.parametrize("backend", backend_params())
def test_hessian_operator(backend):
    H, dense = hessian_operator("mlp", backend)
    with rng_untouched():
        exact = hessop.diagonal(H, method="exact")
        est = hessop.diagonal(H, 6, seed=1)
    assert_native(backend, exact.estimate, H.device)
    np.testing.assert_allclose(to_numpy(exact.estimate), np.diag(dense), rtol=1e-10, atol=1e-12)
    ref = hessop.diagonal(dense, 6, seed=1)
    np.testing.assert_allclose(to_numpy(est.estimate), ref.estimate, rtol=1e-9, atol=1e-12)


def test_xdiag_rank_deficient_symmetric_is_exact():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((D, 3))
    low = G @ np.diag([2.0, -1.0, 0.5]) @ G.T
    res = hessop.diagonal(low, 12, method="xdiag", seed=2)
    np.testing.assert_allclose(res.estimate, np.diag(low), atol=1e-9)


# --- user probes, sparse Rademacher probes, misuse --------------------------------------------
@pytest.mark.parametrize("fw", framework_params())
def test_hutchinson_with_user_probes_is_exact_numpy(fw):
    Z = np.random.default_rng(5).standard_normal((D, 9))
    samples = Z * (A_MAT @ Z)
    with rng_untouched():
        res = hessop.diagonal(native(fw, A_MAT), probes=native(fw, Z))
    assert_native(fw, res.estimate)
    assert res.num_matvecs == 9
    np.testing.assert_allclose(to_numpy(res.estimate), samples.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(
        to_numpy(res.std_error), samples.std(axis=1, ddof=1) / 3.0, rtol=1e-10
    )
    # The 2^3 sign patterns of a 3-block Hadamard-like design cancel every off-diagonal term.
    signs = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1]], dtype=float)
    M = with_spectrum([1.0, 2.0, 5.0], seed=1)
    np.testing.assert_allclose(hessop.diagonal(M, probes=signs).estimate, np.diag(M), rtol=1e-12)


def test_xdiag_user_probes_equal_the_drawn_ones():
    class Recording(Counting):
        seen = []

        def _matmat(self, V):
            self.seen.append(np.array(V))
            return super()._matmat(V)

    op = Recording(A_MAT)
    ref = hessop.diagonal(op, 12, method="xdiag", seed=7)
    res = hessop.diagonal(A_MAT, method="xdiag", probes=op.seen[0])
    assert res.num_matvecs == 12
    np.testing.assert_allclose(res.estimate, ref.estimate, rtol=1e-12)


def test_sparse_rademacher_diagonal_is_unbiased():
    n = 300
    est = np.stack(
        [
            hessop.diagonal(
                A_MAT, 10, distribution="sparse-rademacher", density=0.3, seed=s
            ).estimate
            for s in range(n)
        ]
    )
    # per-probe variance of entry j: (1/density - 1) A_jj^2 + sum_{l != j} A_jl^2
    var = (1 / 0.3 - 1) * TRUE**2 + (A_MAT**2).sum(axis=1) - TRUE**2
    z = (est.mean(axis=0) - TRUE) / np.sqrt(var / (10 * n))
    assert np.all(np.abs(z) < 5), z
    ratio = est.var(axis=0, ddof=1) / (var / 10)
    assert 0.75 < np.median(ratio) < 1.33


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("method,num", [("hutchinson", 10), ("xdiag", 12), ("exact", None)])
def test_non_finite_products_raise(method, num, value):
    with pytest.raises(hessop.NonFiniteError, match="diagonal: the operator's product"):
        hessop.diagonal(nan_matrix(A_MAT, value), num, method=method)
    if method != "exact":
        Z = np.ones((D, 4))
        Z[3, 1] = value
        with pytest.raises(hessop.NonFiniteError, match="probes"):
            hessop.diagonal(A_MAT, method=method, probes=Z)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_matvecs": -1}, ValueError, "num_matvecs must be an integer >= 1"),
        ({"method": "bekas"}, hessop.UnknownOptionError, "xdiag"),
        ({"distribution": "binary"}, hessop.UnknownOptionError, "distribution"),
        ({"distribution": "sparse-rademacher", "density": 2.0}, ValueError, r"\(0, 1\]"),
        ({"chunk_size": -2}, ValueError, "chunk_size"),
        ({"probes": np.ones((D, 3)), "num_matvecs": 4}, ValueError, "3 probes cost 3"),
        ({"probes": np.ones((D, 1)), "method": "xdiag", "num_matvecs": None}, ValueError, "even"),
        ({"method": "exact", "probes": np.ones((D, 3)), "num_matvecs": None}, ValueError, "unit"),
        ({"method": "exact", "num_matvecs": None, "density": 0.5}, ValueError, "unit vectors"),
        ({"probes": [[1.0, 2.0]], "num_matvecs": None}, hessop.ShapeError, "probes"),
    ],
)
def test_meaningless_options(kwargs, exc, match):
    kwargs = {"num_matvecs": 6, **kwargs}
    with pytest.raises(exc, match=match):
        hessop.diagonal(A_MAT, **kwargs)
