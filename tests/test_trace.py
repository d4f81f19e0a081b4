"""hessop.trace: exact product counts, unbiasedness over seeds, reproducibility, Hessians."""

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
    rng_untouched,
    with_spectrum,
)

import hessop
from conftest import backend_params, to_numpy

D = 30
SPEC = np.concatenate([np.linspace(-2.0, 5.0, D - 3), [9.0, 12.0, 20.0]])
A_MAT = with_spectrum(SPEC, seed=31)
TRUE = float(SPEC.sum())
METHODS = {"hutchinson": 10, "hutch++": 12, "xtrace": 12}  # method -> num_matvecs


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("num", [6, 10, 20])
def test_uses_exactly_num_matvecs(method, num, chunk_size):
    A = Counting(A_MAT)
    res = hessop.trace(A, num, method=method, chunk_size=chunk_size)
    assert A.count == res.num_matvecs == num
    if chunk_size is None:  # every phase is one batched product
        assert A.calls == {"hutchinson": 1, "hutch++": 3, "xtrace": 2}[method]


@pytest.mark.parametrize("method", list(METHODS))
def test_unbiased_over_seeds(method):
    num, n_seeds = METHODS[method], 300
    runs = [hessop.trace(A_MAT, num, method=method, seed=s) for s in range(n_seeds)]
    est = np.array([float(r.estimate) for r in runs])
    err = np.array([float(r.std_error) for r in runs])
    # Tolerance from the reported standard errors (and the observed spread, for the
    # estimators whose reported error is only approximate): 5 standard errors of the mean.
    sigma = max(np.sqrt(np.mean(err**2)), est.std(ddof=1))
    assert abs(est.mean() - TRUE) <= 5 * sigma / np.sqrt(n_seeds), (est.mean(), TRUE)
    if method == "hutchinson":  # its reported error is the sample std / sqrt(m): calibrated
        assert 0.75 < np.sqrt(np.mean(err**2)) / est.std(ddof=1) < 1.33


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "sphere"])
def test_distributions_unbiased(distribution):
    est = [
        float(hessop.trace(A_MAT, 8, seed=s, distribution=distribution).estimate)
        for s in range(300)
    ]
    assert abs(np.mean(est) - TRUE) <= 5 * np.std(est) / np.sqrt(300)


def test_hutchpp_exact_on_low_rank():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((D, 3))
    low = G @ G.T  # rank 3: the sketch of 3 columns captures it all
    res = hessop.trace(low, 9, method="hutch++", seed=1)
    assert float(res.estimate) == pytest.approx(np.trace(low), rel=1e-10)
    assert float(res.std_error) < 1e-10 * np.trace(low)


def test_variance_reduction_on_decaying_spectrum():
    M = with_spectrum(0.5 ** np.arange(D), seed=3)
    truth = np.trace(M)

    def rmse(method):
        est = [float(hessop.trace(M, 20, method=method, seed=s).estimate) for s in range(40)]
        return np.sqrt(np.mean((np.array(est) - truth) ** 2))

    plain = rmse("hutchinson")
    assert rmse("hutch++") < plain / 10
    assert rmse("xtrace") < plain / 100


@pytest.mark.parametrize("fw", framework_params())
@pytest.mark.parametrize("method", list(METHODS))
def test_same_seed_same_number_in_every_framework(fw, method):
    ref = hessop.trace(A_MAT, METHODS[method], method=method, seed=5)
    with rng_untouched():
        res = hessop.trace(native(fw, A_MAT), METHODS[method], method=method, seed=5)
    assert_native(fw, res.estimate)
    assert_native(fw, res.std_error)
    assert res.estimate.shape == ()
    np.testing.assert_allclose(float(res.estimate), float(ref.estimate), rtol=1e-12)
    np.testing.assert_allclose(float(res.std_error), float(ref.std_error), rtol=1e-9)
    again = hessop.trace(native(fw, A_MAT), METHODS[method], method=method, seed=5)
    assert float(again.estimate) == float(res.estimate)
    other = hessop.trace(native(fw, A_MAT), METHODS[method], method=method, seed=6)
    assert float(other.estimate) != float(res.estimate)


def test_differentiable_in_torch():
    torch = pytest.importorskip("torch")
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    res = hessop.trace(t * torch.as_tensor(A_MAT), 10, seed=0)
    res.estimate.backward()
    # The estimate is linear in A = t M, so d estimate / dt = estimate / t.
    assert float(t.grad) == pytest.approx(float(res.estimate.detach()) / 2.0, rel=1e-12)


def test_single_sample_and_errors():
    res = hessop.trace(A_MAT, 1)
    assert np.isnan(float(res.std_error))
    with pytest.raises(hessop.UnknownOptionError, match="hutch\\+\\+"):
        hessop.trace(A_MAT, 10, method="hutchpp")
    with pytest.raises(hessop.UnknownOptionError, match="rademacher"):
        hessop.trace(A_MAT, 10, distribution="normal")
    with pytest.raises(ValueError, match="even"):
        hessop.trace(A_MAT, 11, method="xtrace")
    with pytest.raises(ValueError, match=">= 3"):
        hessop.trace(A_MAT, 2, method="hutch++")
    with pytest.raises(ValueError, match="num_matvecs"):
        hessop.trace(A_MAT, 0)


# Products batched 6 at a time by every method: JAX compiles the vmapped HVP once.
HESSIAN_NUM = {"hutchinson": 6, "hutch++": 18, "xtrace": 12}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("method", list(METHODS))
def test_hessian_operator_matches_dense(backend, method):
    H, dense = hessian_operator("mlp", backend)
    with rng_untouched():
        res = hessop.trace(H, HESSIAN_NUM[method], method=method, seed=2)
    assert_native(backend, res.estimate, H.device)
    ref = hessop.trace(dense, HESSIAN_NUM[method], method=method, seed=2)
    np.testing.assert_allclose(to_numpy(res.estimate), ref.estimate, rtol=1e-9, atol=1e-12)
    # and it estimates the trace: within 5 reported standard errors
    assert abs(float(res.estimate) - np.trace(dense)) <= 5 * float(res.std_error) + 1e-9


@pytest.mark.parametrize("distribution", ["sphere", "gaussian"])
def test_xtrace_rank_deficient_sketch_is_exact(distribution):
    # rank 4 < 7 probes: R is singular, the leave-one-out spans still capture the range.
    rng = np.random.default_rng(1)
    G = rng.standard_normal((D, 4))
    low = G @ np.diag([3.0, -1.0, 2.0, 0.5]) @ G.T
    res = hessop.trace(low, 14, method="xtrace", seed=0, distribution=distribution)
    assert float(res.estimate) == pytest.approx(np.trace(low), rel=1e-9)
    assert abs(float(res.std_error)) < 1e-9 * np.abs(low).max()


def test_xtrace_numerically_rank_deficient():
    # rank 5 plus a full-rank part of size 1e-10: the sketch of 6 probes is numerically
    # rank deficient, which must neither break nor bias the estimate.
    rng = np.random.default_rng(2)
    G = rng.standard_normal((D, 5))
    tiny = with_spectrum(1e-10 * np.linspace(1.0, 2.0, D), seed=3)
    M = G @ G.T + tiny
    est = [float(hessop.trace(M, 12, method="xtrace", seed=s).estimate) for s in range(20)]
    np.testing.assert_allclose(est, np.trace(M), rtol=1e-8)


# --- user probes and sparse Rademacher probes (issue #13) -------------------------------------
class Recording(Counting):
    """Records the probe blocks it is multiplied with."""

    def __init__(self, M):
        super().__init__(M)
        self.seen = []

    def _matmat(self, V):
        self.seen.append(to_numpy(V))
        return super()._matmat(V)


@pytest.mark.parametrize("fw", framework_params())
def test_hutchinson_with_user_probes_is_exact_numpy(fw):
    Z = np.random.default_rng(3).standard_normal((D, 7))
    samples = np.einsum("ij,ik,kj->j", Z, A_MAT, Z)
    with rng_untouched():
        res = hessop.trace(native(fw, A_MAT), probes=native(fw, Z))  # numpy probes work too
    assert_native(fw, res.estimate)
    assert res.num_matvecs == 7
    assert float(to_numpy(res.estimate)) == pytest.approx(samples.mean(), rel=1e-12)
    assert float(to_numpy(res.std_error)) == pytest.approx(
        samples.std(ddof=1) / np.sqrt(7), rel=1e-10
    )
    # sqrt(d) e_i have E z z^T = I: the mean of d d A_ii / d is the trace, exactly
    exact = hessop.trace(A_MAT, probes=np.sqrt(D) * np.eye(D))
    assert float(exact.estimate) == pytest.approx(TRUE, rel=1e-12)


@pytest.mark.parametrize("method, num", [("hutch++", 12), ("xtrace", 12)])
def test_user_probes_split_as_documented(method, num):
    # The drawn probes, passed back as user probes, give the same estimate: hutch++ sketches
    # with the first n // 2 columns, xtrace uses all of them exchangeably.
    seeded = Recording(A_MAT)
    ref = hessop.trace(seeded, num, method=method, seed=4)
    if method == "hutch++":
        probes = np.concatenate([seeded.seen[0], seeded.seen[2]], axis=1)  # S, then G
        res = hessop.trace(Counting(A_MAT), method=method, probes=probes)
    else:
        probes = seeded.seen[0]
        res = hessop.trace(A_MAT, method=method, probes=probes, distribution="sphere")
        plain = hessop.trace(A_MAT, method=method, probes=probes)  # no sphere normalization
        assert float(plain.estimate) != pytest.approx(float(ref.estimate), rel=1e-12)
        assert abs(float(plain.estimate) - TRUE) < 10 * float(plain.std_error) + 1e-6
    assert probes.shape[1] == {"hutch++": 8, "xtrace": 6}[method]
    assert res.num_matvecs == num
    assert float(res.estimate) == pytest.approx(float(ref.estimate), rel=1e-12)


def test_sparse_rademacher_probes_have_identity_covariance():
    op = Recording(A_MAT)
    density = 0.2
    hessop.trace(op, 4000, distribution="sparse-rademacher", density=density, seed=0)
    Z = op.seen[0]
    values = np.unique(Z)
    np.testing.assert_allclose(values, [-1 / np.sqrt(density), 0.0, 1 / np.sqrt(density)])
    assert np.mean(Z != 0) == pytest.approx(density, abs=0.01)
    assert np.mean(Z > 0) == pytest.approx(density / 2, abs=0.01)
    # E z z^T = I: 4000 samples give each entry a standard error of about
    # sqrt(E z_i^2 z_j^2 / n) (off-diagonal 1/sqrt(n), diagonal sqrt((1/density - 1)/n)).
    cov = Z @ Z.T / Z.shape[1]
    off = cov[~np.eye(D, dtype=bool)]
    assert np.abs(np.diag(cov) - 1).max() < 5 * np.sqrt((1 / density - 1) / 4000)
    assert np.abs(off).max() < 5.5 / np.sqrt(4000)
    assert np.abs(off.mean()) < 5 / np.sqrt(4000 * off.size)


def test_sparse_rademacher_trace_is_unbiased_not_a_tenth():
    # torch-secorder's sparse Hutchinson forgot the rescaling and returned ~0.1x the trace.
    est = [
        float(hessop.trace(A_MAT, 10, distribution="sparse-rademacher", seed=s).estimate)
        for s in range(300)
    ]
    assert abs(np.mean(est) - TRUE) <= 5 * np.std(est) / np.sqrt(300)
    assert np.mean(est) == pytest.approx(TRUE, rel=0.15)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("method", list(METHODS))
def test_non_finite_products_and_probes_raise(method, value):
    with pytest.raises(hessop.NonFiniteError, match="trace: the operator's product"):
        hessop.trace(nan_matrix(A_MAT, value), METHODS[method], method=method)
    Z = np.ones((D, 4))
    Z[0, 0] = value
    with pytest.raises(hessop.NonFiniteError, match="probes"):
        hessop.trace(A_MAT, method=method, probes=Z)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_matvecs": 0}, ValueError, "num_matvecs must be an integer >= 1"),
        ({"num_matvecs": 2.5}, TypeError, "num_matvecs"),
        ({"num_matvecs": None}, TypeError, "num_matvecs"),
        ({"method": "hutch"}, hessop.UnknownOptionError, "xtrace"),
        ({"distribution": "uniform"}, hessop.UnknownOptionError, "sparse-rademacher"),
        ({"density": 0.0, "distribution": "sparse-rademacher"}, ValueError, r"\(0, 1\]"),
        ({"density": 1.5, "distribution": "sparse-rademacher"}, ValueError, r"\(0, 1\]"),
        ({"density": np.nan, "distribution": "sparse-rademacher"}, ValueError, "density"),
        ({"density": 0.5}, ValueError, "sparse-rademacher' only"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1"),
        ({"method": "hutch++", "num_matvecs": 2}, ValueError, "hutch\\+\\+ needs"),
        ({"method": "xtrace", "num_matvecs": 7}, ValueError, "even"),
        ({"method": "xtrace", "num_matvecs": 60}, ValueError, "fewer probes than d"),
        ({"probes": np.ones((D + 1, 3)), "num_matvecs": None}, hessop.ShapeError, "probes"),
        ({"probes": np.ones((D, 3)), "num_matvecs": 4}, ValueError, "3 probes cost 3"),
        ({"probes": np.ones((D, 3)), "density": 0.5}, ValueError, "no meaning with probes"),
        ({"probes": np.ones((D, 3)), "distribution": "gaussian"}, ValueError, "no meaning"),
        ({"probes": np.ones((D, 3)) * 1j}, hessop.DTypeError, "real"),
    ],
)
def test_meaningless_options(kwargs, exc, match):
    kwargs = {"num_matvecs": 6, **kwargs}
    with pytest.raises(exc, match=match):
        hessop.trace(A_MAT, **kwargs)
