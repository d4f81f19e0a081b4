"""The JAX backend's cost choices: when the linear map is built, how matmat runs on a CPU,
and ``compile=True``. Every product is checked against a dense ``jax.hessian`` reference."""

from __future__ import annotations

import numpy as np
import pytest

import hessop

jax = pytest.importorskip("jax")
jnp = jax.numpy


def loss(p, X, y):
    h = jnp.tanh(X @ p["W"] + p["b"])
    return jnp.mean((h @ p["u"] - y) ** 2) + 0.1 * jnp.sum(p["W"] ** 4)


def problem(seed=0, n=16, d_in=5, width=4):
    rng = np.random.default_rng(seed)
    params = {
        "W": jnp.asarray(rng.standard_normal((d_in, width))),
        "b": jnp.asarray(rng.standard_normal(width)),
        "u": jnp.asarray(rng.standard_normal(width)),
    }
    X = jnp.asarray(rng.standard_normal((n, d_in)))
    y = jnp.asarray(rng.standard_normal(n))
    return params, X, y


def dense_reference(params, X, y) -> np.ndarray:
    """jax.hessian of the loss over a flat vector, raveled by hand in insertion order."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [int(np.prod(s)) for s in shapes]

    def flat_loss(w):
        parts = jnp.split(w, np.cumsum(sizes)[:-1])
        return loss({k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}, X, y)

    w = jnp.concatenate([params[k].reshape(-1) for k in names])
    return np.asarray(jax.jit(jax.hessian(flat_loss))(w))


def test_first_product_is_plain_second_builds_the_linear_map():
    params, X, y = problem()
    ref = dense_reference(params, X, y)
    H = hessop.hessian(loss, params, X, y)
    assert H.mode == "forward-over-reverse" and H.cache
    rng = np.random.default_rng(1)
    vs = [jnp.asarray(rng.standard_normal(H.shape[0])) for _ in range(3)]
    np.testing.assert_allclose(H @ vs[0], ref @ vs[0], rtol=1e-10, atol=1e-12)
    assert H._linearization is None  # a one-off product writes no linear map out
    np.testing.assert_allclose(H @ vs[1], ref @ vs[1], rtol=1e-10, atol=1e-12)
    assert H._linearization is not None
    np.testing.assert_allclose(H @ vs[2], ref @ vs[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-fwd", "rev-rev", "fd"])
@pytest.mark.parametrize("cache", [True, False])
def test_cpu_matmat_loops_columns_and_matches_dense(mode, cache):
    params, X, y = problem(seed=2)
    ref = dense_reference(params, X, y)
    H = hessop.hessian(loss, params, X, y, mode=mode, cache=cache)
    assert H._kernel.loop_columns  # the test machine's JAX runs on CPU
    V = np.random.default_rng(3).standard_normal((H.shape[0], 5))
    rtol = 1e-5 if mode == "fd" else 1e-10
    for _ in range(2):  # before and after the linear map exists
        out = H @ jnp.asarray(V)
        assert out.shape == (H.shape[0], 5)
        np.testing.assert_allclose(out, ref @ V, rtol=rtol, atol=1e-9)


def test_vmapped_matmat_still_matches_dense():
    """The accelerator path (one vmapped call), forced on this CPU."""
    params, X, y = problem(seed=4)
    ref = dense_reference(params, X, y)
    for mode in ("fwd-rev", "rev-rev"):
        H = hessop.hessian(loss, params, X, y, mode=mode, chunk_size=2)
        H._kernel.loop_columns = False
        V = np.random.default_rng(5).standard_normal((H.shape[0], 3))
        np.testing.assert_allclose(H @ jnp.asarray(V), ref @ V, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(H @ jnp.asarray(V), ref @ V, rtol=1e-10, atol=1e-12)


def test_compile_reports_its_one_time_cost_once():
    def fresh_loss(p, X, y):  # a new function: nothing compiled for it yet
        return loss(p, X, y)

    params, X, y = problem(seed=6)
    H = hessop.hessian(fresh_loss, params, X, y, compile=True)
    assert H.compile_time is not None and H.compile_time > 0
    assert H._linearization is not None  # the warm-up built the operator's own linear map
    # a new point: the compilations are shared, so nothing is compiled again
    params2, _, _ = problem(seed=7)
    H2 = hessop.hessian(fresh_loss, params2, X, y, compile=True)
    assert H2.compile_time == 0.0
    v = np.random.default_rng(8).standard_normal(H.shape[0])
    for op, p in ((H, params), (H2, params2)):
        ref = dense_reference(p, X, y)
        np.testing.assert_allclose(op @ jnp.asarray(v), ref @ v, rtol=1e-10, atol=1e-12)
    assert hessop.hessian(fresh_loss, params, X, y).compile_time is None


@pytest.mark.parametrize("mode", ["rev-fwd", "dense", "fd"])
def test_compile_in_other_modes(mode):
    params, X, y = problem(seed=9)
    ref = dense_reference(params, X, y)
    H = hessop.hessian(loss, params, X, y, mode=mode, compile=True)
    assert H.compile_time is not None and H.compile_time >= 0
    v = np.random.default_rng(10).standard_normal(H.shape[0])
    rtol = 1e-5 if mode == "fd" else 1e-10
    np.testing.assert_allclose(H @ jnp.asarray(v), ref @ v, rtol=rtol, atol=1e-9)


def test_compile_with_streamed_data():
    params, X, y = problem(seed=11, n=12)
    batches = [(X[:6], y[:6]), (X[6:], y[6:])]
    H = hessop.hessian(loss, params, data=batches, compile=True)
    v = np.random.default_rng(12).standard_normal(H.shape[0])
    ref = dense_reference(params, X, y)
    np.testing.assert_allclose(H @ jnp.asarray(v), ref @ v, rtol=1e-10, atol=1e-12)


def test_an_uneven_last_batch_compiles_once_more():
    """jit compiles once per batch shape: a smaller last batch adds one compilation per
    function, shared by later operators (padding it would not be exact for any loss)."""

    def fresh_loss(p, X, y):  # a new function: nothing compiled for it yet
        return loss(p, X, y)

    params, X, y = problem(seed=13, n=12)
    batches = [(X[:5], y[:5]), (X[5:10], y[5:10]), (X[10:], y[10:])]
    v = np.random.default_rng(14).standard_normal(X.shape[1] * 4 + 8)
    for p in (params, problem(seed=15)[0]):  # a second operator, at a new point
        H = hessop.hessian(fresh_loss, p, data=batches, compile=True)
        ref = dense_reference(p, X, y)
        np.testing.assert_allclose(H @ jnp.asarray(v), ref @ v, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(H @ jnp.asarray(v), ref @ v, rtol=1e-10, atol=1e-12)
    fns = H._kernel.fns
    sizes = {name: getattr(fns, name)._cache_size() for name in ("hvp", "first", "apply")}
    assert max(sizes.values()) <= 2 and sizes["hvp"] == 2, sizes


@pytest.mark.parametrize("dtype", [None, "float32", "float64"])
def test_column_major_numpy_blocks_convert_exactly_and_are_copies(dtype):
    """A column-major block (the estimators' probes) takes the transposed route: copied as
    is and converted and transposed back on the device. Same numbers and dtype as the
    row-major route, and no view of the caller's memory."""
    from hessop.backends import get_backend

    bk = get_backend("jax")
    rng = np.random.default_rng(0)
    for block in (rng.integers(-1, 2, (7, 3)).astype(np.int8), rng.standard_normal((7, 3))):
        fortran = np.asfortranarray(block)
        got = bk.asarray(fortran, dtype=dtype)
        want = bk.asarray(np.ascontiguousarray(block), dtype=dtype)
        assert got.dtype == want.dtype and got.shape == (7, 3)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        fortran[0, 0] = 5
        assert np.asarray(got)[0, 0] == np.asarray(want)[0, 0]
