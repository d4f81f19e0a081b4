"""Shared test configuration: JAX float64, backend parametrization, loss factories.

JAX is imported lazily (try/except) so the suite runs with torch alone, JAX alone, or
neither (numpy-only tests).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per worker: the workers already fill the cores, and the tests'
    # tiny problems gain nothing from threads. XLA reads its flags when JAX is imported.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)

try:  # float64 references need 64-bit JAX; enabled once for the whole session
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - depends on the install
    jax = None

BACKENDS = ("torch", "jax")


def has_framework(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def backend_params(names: tuple[str, ...] = BACKENDS, slow: tuple[str, ...] = ()) -> list[Any]:
    """``pytest.param`` per backend, skipped when the framework is not installed; those in
    ``slow`` marked slow (for a test whose code a fast test covers in that framework)."""
    return [
        pytest.param(
            name,
            id=name,
            marks=[
                pytest.mark.skipif(not has_framework(name), reason=f"{name} not installed"),
                *([pytest.mark.slow] if name in slow else []),
            ],
        )
        for name in names
    ]


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    """Every installed autodiff backend, by name."""
    return request.param


def to_native(backend: str, x: Any, dtype: str = "float64") -> Any:
    """A numpy array (or pytree of them) as native arrays of ``backend``."""
    if isinstance(x, dict):
        return {k: to_native(backend, v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_native(backend, v, dtype) for v in x)
    x = np.asarray(x)
    if x.dtype.kind == "f":
        x = x.astype(dtype)
    if backend == "torch":
        import torch

        return torch.as_tensor(x)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    return x


def to_numpy(x: Any) -> np.ndarray:
    """Any framework's array as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


# --- loss factories ----------------------------------------------------------------------
@dataclass
class LossCase:
    """A loss written once with the array API, a point, its arguments, and (optionally) a
    closed-form dense float64 Hessian in hessop's ravel layout."""

    name: str
    f: Callable[..., Any]
    params: Any  # numpy pytree
    args: tuple[Any, ...]  # numpy arrays
    dense: Callable[[], np.ndarray] | None = None


LOSSES: dict[str, Callable[[], LossCase]] = {}


def register_loss(fn: Callable[[], LossCase]) -> Callable[[], LossCase]:
    LOSSES[fn.__name__.removeprefix("loss_")] = fn
    return fn


def _xp(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(x)


@register_loss
def loss_quadcubic() -> LossCase:
    """0.5 w^T A w + b^T w + sum(c * w^3): H = A + diag(6 c w), by hand."""
    rng = np.random.default_rng(1)
    n = 5
    M = rng.standard_normal((n, n))
    A = M @ M.T + n * np.eye(n)
    b = rng.standard_normal(n)
    c = rng.standard_normal(n)
    w = rng.standard_normal(n)

    def f(w, A, b, c):
        xp = _xp(w)
        return 0.5 * xp.sum(w * (A @ w)) + xp.sum(b * w) + xp.sum(c * w**3)

    return LossCase("quadcubic", f, w, (A, b, c), lambda: A + np.diag(6 * c * w))


@register_loss
def loss_pytree() -> LossCase:
    """A nested dict/list/dict pytree of mixed shapes with a 0-d leaf, keys not sorted."""
    rng = np.random.default_rng(2)
    params = {
        "b": [rng.standard_normal((2, 3)), np.asarray(0.7)],
        "a": {"z": rng.standard_normal(4)},
    }
    x = rng.standard_normal(3)
    y = rng.standard_normal(2)

    def f(p, x, y):
        xp = _xp(x)
        W, s = p["b"]
        z = p["a"]["z"]
        r = xp.tanh(W @ x) * s - y
        return xp.sum(r**2) + s**2 * xp.sum(z**3) + xp.sum(xp.sin(z)) * xp.sum(W**2)

    return LossCase("pytree", f, params, (x, y))


@register_loss
def loss_mlp() -> LossCase:
    """A two-layer tanh MLP with a squared error."""
    rng = np.random.default_rng(3)
    params = {
        "W1": 0.5 * rng.standard_normal((4, 3)),
        "b1": 0.1 * rng.standard_normal(4),
        "W2": 0.5 * rng.standard_normal((2, 4)),
        "b2": 0.1 * rng.standard_normal(2),
    }
    X = rng.standard_normal((6, 3))
    Y = rng.standard_normal((6, 2))

    def f(p, X, Y):
        xp = _xp(X)
        h = xp.tanh(X @ p["W1"].T + p["b1"])
        out = h @ p["W2"].T + p["b2"]
        return xp.mean(xp.sum((out - Y) ** 2, axis=1))

    return LossCase("mlp", f, params, (X, Y))


def logistic_f(w, X, y):
    """The issue's logistic regression: mean(log(1 + exp(-z)) + (1 - y) z) + 0.05 |w|^2."""
    xp = _xp(X)
    z = X @ w
    return xp.mean(xp.log(1 + xp.exp(-z)) + (1 - y) * z) + 0.05 * xp.sum(w**2)


def logistic_dense(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Closed form: X^T diag(s (1 - s)) X / n + 0.1 I with s = sigmoid(X w)."""
    s = 1 / (1 + np.exp(-(X @ w)))
    return (X.T * (s * (1 - s))) @ X / X.shape[0] + 0.1 * np.eye(X.shape[1])


def logistic_data(n: int = 10, d: int = 4, seed: int = 4):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (rng.random(n) < 0.5).astype(np.float64)
    w = 0.3 * rng.standard_normal(d)
    return w, X, y


@register_loss
def loss_logistic() -> LossCase:
    w, X, y = logistic_data()
    return LossCase("logistic", logistic_f, w, (X, y), lambda: logistic_dense(w, X))


@pytest.fixture(params=list(LOSSES))
def loss_case(request) -> LossCase:
    return LOSSES[request.param]()


_OPERATORS: dict[tuple, Any] = {}


def build_operator(name: str, backend: str, mode: str = "auto", dtype: str = "float64", **kw):
    """A fresh HessianOperator of the registered loss ``name``."""
    import hessop

    case = LOSSES[name]()
    params = to_native(backend, case.params, dtype)
    args = to_native(backend, case.args, dtype)
    return hessop.hessian(case.f, params, *args, mode=mode, **kw)


def shared_operator(name: str, backend: str, mode: str = "auto", dtype: str = "float64", **kw):
    """An operator reused across tests and modules of one session.

    JAX compiles once per operator and product shape, which dominates the run time of the
    suite; an operator's answers never depend on earlier products, so sharing is safe.
    """
    key = (name, backend, mode, dtype, tuple(sorted(kw.items())))
    if key not in _OPERATORS:
        _OPERATORS[key] = build_operator(name, backend, mode, dtype, **kw)
    return _OPERATORS[key]


# JAX runs of backend-parametrized tests that compile for seconds and whose code the default
# run covers with the torch run of the same test and a faster JAX test in the same file (the
# comment above each group names it). They run with -m slow (tox -e all). When the whole
# suite is collected, an id that matches no test is an error, so the list cannot rot.
SLOW_JAX_DUPLICATES = {
    # covered by test_hessians_match_loop[jax], test_hessians_chunk_size[jax-2]
    "tests/test_per_sample.py::test_hessians_float32[jax]",
    "tests/test_per_sample.py::test_hessians_chunk_size[jax-1]",
    "tests/test_per_sample.py::test_hessians_explicit_in_axes[jax]",
    "tests/test_per_sample.py::test_hessians_multidim_samples_and_pytree_args[jax]",
    # covered by test_gradients_match_loop_and_layout[jax]
    "tests/test_per_sample.py::test_gradients_numpy_data_takes_param_dtype[jax]",
    # covered by test_jacobian_pytree_and_argnums[jax-auto]
    "tests/test_jacobians.py::test_jacobian_pytree_and_argnums[jax-forward]",
    # covered by test_output_hessians_both_strategies[jax-reverse-over-reverse]
    "tests/test_jacobians.py::test_output_hessians_both_strategies[jax-forward-over-reverse]",
    # covered by test_jax_grad_through_operator[fwd-rev] (JAX's default mode)
    "tests/test_differentiable.py::test_jax_grad_through_operator[rev-rev]",
    # covered by test_hvp_gradients_to_params_and_args[jax]
    "tests/test_differentiable.py::test_ssm_gradient_matches_dense_reference_and_fd[jax]",
    # covered by test_top_eigenpairs_match_eigh[3-jax]
    "tests/test_subspace.py::test_top_eigenpairs_match_eigh[1-jax]",
    # covered by test_hessian_operator_matches_dense[hutchinson-jax]
    "tests/test_trace.py::test_hessian_operator_matches_dense[xtrace-jax]",
    "tests/test_trace.py::test_hessian_operator_matches_dense[hutch++-jax]",
    # covered by test_parity_float64[mlp-jax-fd]
    "tests/test_hessian.py::test_parity_float32[jax-fd]",
    "tests/test_hessian.py::test_parity_float64[pytree-jax-fd]",
    # covered by test_forward_matches[mlp], test_forward_matches[transformer]
    "tests/test_reference_models.py::test_forward_matches[mlp-gelu]",
    "tests/test_reference_models.py::test_loss_matches[transformer]",
    # covered by test_jacobians_match_loop[jax-auto-wide] and test_jacobians_every_strategy
    "tests/test_per_sample.py::test_jacobians_match_loop[jax-forward-wide]",
    "tests/test_per_sample.py::test_jacobians_match_loop[jax-forward-tall]",
    "tests/test_per_sample.py::test_jacobians_match_loop[jax-auto-tall]",
    # covered by test_jacobian_pytree_and_argnums[jax-auto], test_jacobian_references[jax-auto-wide]
    "tests/test_jacobians.py::test_jacobian_pytree_and_argnums[jax-reverse]",
    "tests/test_jacobians.py::test_jacobian_references[jax-auto-tall]",
    # covered by test_parity_float64[mlp-jax-fd], test_parity_float32[jax-rev-rev]
    "tests/test_hessian.py::test_parity_float64[logistic-jax-fd]",
    "tests/test_hessian.py::test_parity_float64[quadcubic-jax-fd]",
    "tests/test_hessian.py::test_parity_float32[jax-fwd-rev]",
    # covered by test_hessian_operator_matches_dense[jax], test_eigsh_on_hessian[LA-jax]
    "tests/test_density.py::test_integrates_to_one_and_finds_the_mass[jax]",
    "tests/test_eig.py::test_eigsh_matches_eigh[LA-jax]",
    # covered by test_torch_equals_jax[mlp-type-2] and the torch runs
    "tests/test_kfac.py::test_inverse_trace_logdet_diagonal_are_exact[jax-ekfac-False]",
    "tests/test_kfac.py::test_deep_linear_network_blocks_are_exact[reduce-jax]",
    "tests/test_kfac.py::test_functions_of_a_convolutional_kfac[jax]",
}


def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        if item.nodeid in SLOW_JAX_DUPLICATES:
            item.add_marker(pytest.mark.slow)
            found.add(item.nodeid)
    whole_suite = not config.option.keyword and config.args == config.getini("testpaths")
    missing = SLOW_JAX_DUPLICATES - found
    if whole_suite and has_framework("jax") and missing:
        raise pytest.UsageError(f"SLOW_JAX_DUPLICATES names no test: {sorted(missing)}")
