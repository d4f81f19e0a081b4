"""hessop.inverse_hvp (CG and Neumann) and the bilevel hypergradient example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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

D = 50  # as in test_cg: JAX reuses the compiled CG kernels
SPD = with_spectrum(np.linspace(0.5, 4.0, D), seed=61)
INDEFINITE = with_spectrum(np.linspace(-1.0, 4.0, D), seed=62)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("fw", framework_params())
@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_solves_damped_system(fw, method):
    v = np.random.default_rng(0).standard_normal(D)
    kw = {"num_terms": 400, "scale": 0.2} if method == "neumann" else {}
    with rng_untouched():
        res = hessop.inverse_hvp(
            native(fw, INDEFINITE), native(fw, v), method=method, damping=1.5, tol=1e-10, **kw
        )
    assert_native(fw, res.x)
    assert res.converged
    expected = np.linalg.solve(INDEFINITE + 1.5 * np.eye(D), v)
    np.testing.assert_allclose(to_numpy(res.x), expected, rtol=1e-8, atol=1e-10)


def test_neumann_truncation_and_rate():
    v = np.random.default_rng(1).standard_normal(D)
    A = Counting(SPD)
    res = hessop.inverse_hvp(A, v, method="neumann", scale=0.2, num_terms=10)
    assert not res.converged and res.iterations == 10
    assert A.count == res.num_matvecs == 9  # J terms need J - 1 products
    # The truncated series is scale * sum_{j<10} (I - scale A)^j v, in closed form:
    lam, U = np.linalg.eigh(SPD)
    partial = U @ (((1 - (1 - 0.2 * lam) ** 10) / lam) * (U.T @ v))
    np.testing.assert_allclose(res.x, partial, rtol=1e-10)


def test_neumann_default_scale_from_lanczos():
    v = np.random.default_rng(2).standard_normal(D)
    res = hessop.inverse_hvp(SPD, v, method="neumann", num_terms=2000, tol=1e-9)
    # 1 / scale estimates lambda_max = 4 (20 Lanczos steps find the top eigenvalue)
    assert 1.0 / res.scale == pytest.approx(4.0, rel=1e-3)
    assert res.converged and res.num_matvecs == 20 + res.iterations - 1
    np.testing.assert_allclose(res.x, np.linalg.solve(SPD, v), rtol=1e-7)


def test_block_right_hand_sides():
    V = np.random.default_rng(3).standard_normal((D, 3))
    for method, kw in (("cg", {}), ("neumann", {"scale": 0.2, "num_terms": 500})):
        res = hessop.inverse_hvp(SPD, V, method=method, tol=1e-10, **kw)
        assert res.x.shape == (D, 3) and np.all(res.converged)
        np.testing.assert_allclose(res.x, np.linalg.solve(SPD, V), rtol=1e-7)


def test_errors():
    v = np.ones(D)
    with pytest.raises(hessop.UnknownOptionError, match="neumann"):
        hessop.inverse_hvp(SPD, v, method="lissa")
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        hessop.inverse_hvp(-SPD, v, method="neumann")
    with pytest.raises(ValueError, match="scale"):
        hessop.inverse_hvp(SPD, v, method="neumann", scale=-1.0)


@pytest.mark.parametrize("backend", backend_params())
def test_hessian_operator(backend):
    H, dense = hessian_operator("mlp", backend)
    v = np.random.default_rng(4).standard_normal(H.shape[0])
    damping = 1.0 - np.linalg.eigvalsh(dense)[0]  # the Hessian is indefinite
    expected = np.linalg.solve(dense + damping * np.eye(len(v)), v)
    for method in ("cg", "neumann"):
        res = hessop.inverse_hvp(
            H, native(backend, v), method=method, damping=damping, tol=1e-10, num_terms=3000
        )
        assert_native(backend, res.x, H.device)
        assert res.converged
        np.testing.assert_allclose(to_numpy(res.x), expected, rtol=1e-7, atol=1e-9)


def test_bilevel_example_matches_finite_differences():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("bilevel", EXAMPLES / "bilevel_hypergradient.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main("torch") < module.TOLERANCE


@pytest.mark.parametrize("fw", framework_params())
@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_non_finite_raise(fw, method):
    kw = {"scale": 0.2} if method == "neumann" else {}
    v = np.ones(D)
    with pytest.raises(hessop.NonFiniteError, match="product"):
        hessop.inverse_hvp(native(fw, nan_matrix(SPD)), native(fw, v), method=method, **kw)
    v[0] = np.nan
    with pytest.raises(hessop.NonFiniteError, match="v|b"):
        hessop.inverse_hvp(native(fw, SPD), native(fw, v), method=method, **kw)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"damping": float("nan")}, ValueError, "damping must be a finite number"),
        ({"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
        ({"scale": float("inf")}, ValueError, "scale must be a finite number > 0"),
        ({"scale": 0.0}, ValueError, "scale"),
        ({"num_terms": 0}, ValueError, "num_terms must be an integer >= 1"),
        ({"maxiter": 0}, ValueError, "maxiter must be an integer >= 1"),
        ({"method": 3}, hessop.UnknownOptionError, "neumann"),
    ],
)
def test_meaningless_options(kwargs, exc, match):
    for method in ("cg", "neumann"):
        with pytest.raises(exc, match=match):
            hessop.inverse_hvp(SPD, np.ones(D), **{"method": method, **kwargs})
