"""hessop.spectral_density (stochastic Lanczos quadrature) and plot_spectral_density."""

from __future__ import annotations

import sys

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

D = 100
# Two clusters: 30% of the eigenvalues near -1, 70% near 4.
SPEC = np.concatenate([np.linspace(-1.2, -0.8, 30), np.linspace(3.5, 4.5, 70)])
A_MAT = with_spectrum(SPEC, seed=51)


def integral(res) -> float:
    return float(np.trapezoid(to_numpy(res.density), to_numpy(res.grid)))


@pytest.mark.parametrize("fw", framework_params())
def test_integrates_to_one_and_finds_the_mass(fw):
    A = Counting(native(fw, A_MAT))
    with rng_untouched():
        res = hessop.spectral_density(A, num_probes=6, num_iter=30, seed=0)
    for x in (res.grid, res.density, res.nodes, res.weights):
        assert_native(fw, x)
    assert res.nodes.shape == res.weights.shape == (6, 30)
    assert A.count == res.num_matvecs == 6 * 30 and A.calls == 30  # one matmat per step
    assert integral(res) == pytest.approx(1.0, abs=1e-6)
    g, p = to_numpy(res.grid), to_numpy(res.density)
    left = float(np.trapezoid(np.where(g < 1.5, p, 0.0), g))
    assert left == pytest.approx(0.3, abs=0.05)
    # each probe's quadrature weights sum to one; nodes lie in the spectrum's hull
    np.testing.assert_allclose(to_numpy(res.weights).sum(axis=1), 1.0, atol=1e-12)
    assert to_numpy(res.nodes).min() >= -1.2 - 1e-9 and to_numpy(res.nodes).max() <= 4.5 + 1e-9


@pytest.mark.parametrize("sigma", [0.01, 0.3, None])
def test_integrates_to_one_for_any_broadening(sigma):
    res = hessop.spectral_density(A_MAT, num_probes=3, num_iter=20, sigma=sigma)
    assert integral(res) == pytest.approx(1.0, abs=1e-6)
    assert res.sigma == (sigma if sigma is not None else pytest.approx(0.01 * 5.7, rel=0.05))


def test_matches_broadened_true_density():
    # With many probes and full Lanczos runs SLQ converges to the smoothed eigenvalue density.
    sigma = 0.25
    res = hessop.spectral_density(A_MAT, num_probes=40, num_iter=40, sigma=sigma, seed=1)
    g, p = to_numpy(res.grid), to_numpy(res.density)
    diff = (g[:, None] - SPEC[None, :]) / sigma
    truth = np.exp(-0.5 * diff**2).sum(axis=1) / (D * sigma * np.sqrt(2 * np.pi))
    l1 = np.trapezoid(np.abs(p - truth), g)
    assert l1 < 0.05, l1


def test_breakdown_gives_exact_nodes():
    # Three distinct eigenvalues: every probe's Krylov space is exhausted after 3 steps.
    spec = np.repeat([-2.0, 1.0, 5.0], [20, 30, 50])
    res = hessop.spectral_density(with_spectrum(spec, seed=2), num_probes=4, num_iter=15)
    nodes, weights = to_numpy(res.nodes), to_numpy(res.weights)
    np.testing.assert_allclose(nodes[:, :3], np.tile([-2.0, 1.0, 5.0], (4, 1)), atol=1e-10)
    assert np.all(weights[:, 3:] == 0)
    np.testing.assert_allclose(weights.mean(axis=0)[:3], [0.2, 0.3, 0.5], atol=0.08)
    assert integral(res) == pytest.approx(1.0, abs=1e-6)


def test_custom_grid_seed_and_errors():
    grid = np.linspace(-3.0, 6.0, 500)
    a = hessop.spectral_density(A_MAT, num_probes=2, num_iter=10, grid=grid, seed=3)
    b = hessop.spectral_density(A_MAT, num_probes=2, num_iter=10, grid=grid, seed=3)
    c = hessop.spectral_density(A_MAT, num_probes=2, num_iter=10, grid=grid, seed=4)
    np.testing.assert_array_equal(a.grid, grid)
    np.testing.assert_array_equal(a.density, b.density)
    assert not np.allclose(a.density, c.density)
    assert hessop.spectral_density(A_MAT, num_iter=5, num_points=77).grid.shape == (77,)
    with pytest.raises(ValueError, match="sigma"):
        hessop.spectral_density(A_MAT, num_iter=5, sigma=-1.0)
    with pytest.raises(ValueError, match="num_probes"):
        hessop.spectral_density(A_MAT, num_probes=0)


@pytest.mark.parametrize("backend", backend_params())
def test_hessian_operator_matches_dense(backend):
    H, dense = hessian_operator("mlp", backend)
    with rng_untouched():
        res = hessop.spectral_density(H, num_probes=6, num_iter=20, seed=0)
    assert_native(backend, res.density, H.device)
    ref = hessop.spectral_density(dense, num_probes=6, num_iter=20, seed=0)
    np.testing.assert_allclose(to_numpy(res.nodes), ref.nodes, atol=1e-9)
    np.testing.assert_allclose(to_numpy(res.density), ref.density, rtol=1e-6, atol=1e-9)
    assert integral(res) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("log", [False, True])
def test_plot_writes_png(tmp_path, log):
    pytest.importorskip("matplotlib")
    res = hessop.spectral_density(A_MAT, num_probes=2, num_iter=10)
    path = hessop.plot_spectral_density(res, tmp_path / "density.png", log=log)
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    res = hessop.spectral_density(A_MAT, num_probes=2, num_iter=10)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"hessop\[plot\]"):
        hessop.plot_spectral_density(res, tmp_path / "x.png")


# --- misuse: non-finite values and meaningless options ----------------------------------------
@pytest.mark.parametrize("fw", framework_params())
def test_non_finite_products_raise(fw):
    with pytest.raises(hessop.NonFiniteError, match="slq.*step 0"):
        hessop.spectral_density(native(fw, nan_matrix(A_MAT)), num_probes=2, num_iter=5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"sigma": float("nan")}, ValueError, "sigma must be a finite number > 0"),
        ({"sigma": float("inf")}, ValueError, "sigma"),
        ({"sigma": 0.0}, ValueError, "sigma"),
        ({"num_probes": 0}, ValueError, "num_probes must be an integer >= 1"),
        ({"num_iter": -1}, ValueError, "num_iter"),
        ({"num_points": 1}, ValueError, "num_points must be an integer >= 2"),
        ({"num_points": 10.0}, TypeError, "num_points"),
        ({"grid": ["a", "b"]}, TypeError, "grid must be a 1-D array of real numbers"),
        ({"grid": "abc"}, TypeError, "grid"),
        ({"grid": np.zeros((3, 3))}, ValueError, "1-D"),
        ({"grid": np.array([])}, ValueError, "non-empty"),
        ({"grid": np.array([0.0, np.nan])}, hessop.NonFiniteError, "grid"),
        ({"grid": [0.0, np.inf]}, hessop.NonFiniteError, "grid"),
        ({"reorthogonalize": None}, TypeError, "reorthogonalize"),
    ],
)
def test_meaningless_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hessop.spectral_density(A_MAT, **{"num_probes": 2, "num_iter": 5, **kwargs})


def test_grid_of_another_framework_is_read():
    torch = pytest.importorskip("torch")
    res = hessop.spectral_density(A_MAT, num_probes=2, num_iter=5, grid=torch.linspace(-2, 5, 9))
    np.testing.assert_allclose(res.grid, np.linspace(-2, 5, 9), rtol=1e-6)
