"""hessop.jacobian_operator: the Jacobian as a matrix-free (m, d) operator, in torch and JAX.

References: the dense Jacobian of torch.func.jacrev / jax.jacrev raveled by hand, numpy's
SVD and products of that matrix, the other framework, and the snapshot contract's checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla

import hessop
from conftest import backend_params, to_native, to_numpy


def _xp(x):
    import array_api_compat

    return array_api_compat.array_namespace(x)


def net(p, X):
    """A small MLP's outputs (n, 2) on inputs X (n, 3): the residuals of a least squares."""
    xp = _xp(X)
    return xp.tanh(X @ p["W1"].T + p["b1"]) @ p["W2"].T


def problem(backend, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    p = {  # keys deliberately not sorted: the layout keeps insertion order
        "W2": 0.5 * rng.standard_normal((2, 4)),
        "W1": 0.5 * rng.standard_normal((4, 3)),
        "b1": 0.1 * rng.standard_normal(4),
    }
    return to_native(backend, p, dtype), to_native(backend, rng.standard_normal((5, 3)), dtype)


def dense_reference(backend, p, X):
    """(m, d): the framework's reverse-mode Jacobian, raveled in insertion order."""
    if backend == "torch":
        import torch

        J = torch.func.jacrev(net)(p, X)
    else:
        import jax

        J = jax.jacrev(net)(p, X)
    return np.concatenate([to_numpy(J[k]).reshape(10, -1) for k in p], axis=1)


def test_products_match_dense_jacobian(backend):
    p, X = problem(backend)
    J = hessop.jacobian_operator(net, p, X)
    assert isinstance(J, hessop.JacobianOperator) and isinstance(J, hessop.LinearOperator)
    assert J.shape == (10, 8 + 12 + 4) and J.output_shape == (5, 2)
    ref = dense_reference(backend, p, X)
    rng = np.random.default_rng(1)
    v, u = rng.standard_normal(24), rng.standard_normal(10)
    V, U = rng.standard_normal((24, 3)), rng.standard_normal((10, 4))
    a = lambda z: to_native(backend, z)  # noqa: E731
    np.testing.assert_allclose(to_numpy(J @ a(v)), ref @ v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(J.matmat(a(V))), ref @ V, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(a(u) @ J), u @ ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(J.T @ a(U)), ref.T @ U, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(a(U.T) @ J), U.T @ ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(J.to_dense()), ref, rtol=1e-12, atol=1e-14)
    # the second products use the kept maps: still the same numbers
    np.testing.assert_allclose(to_numpy(J @ a(v)), ref @ v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(J.T @ a(u)), ref.T @ u, rtol=1e-12, atol=1e-14)


# JAX slow (8 s of compiles): the torch run covers the algebra, the JAX products are above
@pytest.mark.parametrize("backend", backend_params(slow=("jax",)))
def test_gauss_newton_ntk_and_svds(backend):
    p, X = problem(backend, seed=2)
    J = hessop.jacobian_operator(net, p, X)
    ref = dense_reference(backend, p, X)
    np.testing.assert_allclose(to_numpy((J.T @ J).to_dense()), ref.T @ ref, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(to_numpy((J @ J.T).to_dense()), ref @ ref.T, rtol=1e-11, atol=1e-13)
    # the GGN of 0.5 |net(X) - Y|^2 is J^T J: the model-level GGN agrees
    Y = to_native(backend, np.zeros((5, 2)))
    G = hessop.model_ggn(net, lambda out, y: 0.5 * _xp(out).sum((out - y) ** 2), (X, Y), params=p,
                         reduction="sum")  # fmt: skip
    np.testing.assert_allclose(to_numpy(G.to_dense()), ref.T @ ref, rtol=1e-11, atol=1e-13)
    s = spla.svds(J.to_scipy(), k=3, return_singular_vectors=False, random_state=0)
    np.testing.assert_allclose(
        np.sort(s), np.linalg.svd(ref, compute_uv=False)[:3][::-1], rtol=1e-9
    )
    top = hessop.eigsh(J.T @ J, k=1, seed=0).eigenvalues
    np.testing.assert_allclose(
        to_numpy(top), np.linalg.svd(ref, compute_uv=False)[:1] ** 2, rtol=1e-8
    )


def test_torch_equals_jax_and_layout():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    dense = {}
    for bk in ("torch", "jax"):
        p, X = problem(bk, seed=3)
        J = hessop.jacobian_operator(net, p, X)
        dense[bk] = to_numpy(J.to_dense())
        ramp = {k: np.arange(np.prod(v.shape), dtype=float).reshape(v.shape) for k, v in p.items()}
        tree = J.unravel(J.ravel(to_native(bk, ramp)))
        assert list(tree) == ["W2", "W1", "b1"]
        assert to_numpy(tree["b1"]).tolist() == [0.0, 1.0, 2.0, 3.0]
        assert to_numpy(J.params["W1"]).shape == (4, 3)
    np.testing.assert_allclose(dense["torch"], dense["jax"], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("cache", [True, False])
def test_cache_and_chunks(backend, cache):
    p, X = problem(backend, seed=4)
    ref = dense_reference(backend, p, X)
    J = hessop.jacobian_operator(net, p, X, cache=cache, chunk_size=5)
    V = np.random.default_rng(5).standard_normal((24, 7))
    for _ in range(2):
        np.testing.assert_allclose(to_numpy(J @ to_native(backend, V)), ref @ V, rtol=1e-12,
                                   atol=1e-14)  # fmt: skip
        W = to_native(backend, V[:10])
        np.testing.assert_allclose(to_numpy(J.T @ W), ref.T @ V[:10], rtol=1e-12, atol=1e-14)
    assert bool(J._maps) == cache


def test_numpy_params_float32_and_array_point(backend):
    rng = np.random.default_rng(6)
    w, A = rng.standard_normal(3), rng.standard_normal((4, 3))

    def f(w, A):
        return _xp(A).sin(A @ w)

    J = hessop.jacobian_operator(f, w, A, backend=backend, dtype="float32")
    assert J.shape == (4, 3) and "float32" in str(J.dtype)
    ref = np.cos(A @ w)[:, None] * A  # closed form
    np.testing.assert_allclose(to_numpy(J.to_dense()), ref, rtol=1e-5, atol=1e-6)
    w[0] += 1.0  # numpy parameters are copied: the operator keeps its point
    np.testing.assert_allclose(to_numpy(J.to_dense()), ref, rtol=1e-5, atol=1e-6)


def test_snapshot_contract_torch():
    torch = pytest.importorskip("torch")
    p, X = problem("torch", seed=7)
    scale = torch.tensor(2.0, dtype=torch.float64)

    def f(p, X):
        return net(p, X) * scale

    J = hessop.jacobian_operator(f, p, X)
    v = torch.ones(24, dtype=torch.float64)
    first = J @ v
    p["W1"].mul_(2.0)  # an in-place update of the point (an optimizer step)
    with pytest.raises(hessop.StaleOperatorError, match="parameter leaf"):
        J @ v
    p["W1"].div_(2.0)  # exactly back
    assert torch.equal(J @ v, first)
    X.mul_(2.0)
    with pytest.raises(hessop.StaleOperatorError, match="argument"):
        v @ J.T
    X.div_(2.0)
    scale.fill_(3.0)
    with pytest.raises(hessop.StaleOperatorError, match="scale"):
        J.T @ torch.ones(10, dtype=torch.float64)


def test_user_state_untouched_torch():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double().train()
    params = dict(model.named_parameters())  # requires_grad=True tensors, not detached
    X = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    before = {k: v.clone() for k, v in params.items()}
    rng_before = torch.get_rng_state()

    def f(p, X):
        return torch.func.functional_call(model, p, (X,))

    J = hessop.jacobian_operator(f, params, X)
    y = J @ torch.ones(J.shape[1], dtype=torch.float64)
    z = J.T @ torch.ones(J.shape[0], dtype=torch.float64)
    assert not y.requires_grad and not z.requires_grad  # products keep no graph
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in params.items())
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)
    ref = torch.func.jacrev(f)({k: v.detach() for k, v in params.items()}, X)
    dense = torch.cat([ref[k].reshape(10, -1) for k in params], dim=1)
    np.testing.assert_allclose(J.to_dense().numpy(), dense.detach().numpy(), rtol=1e-12)


def test_random_f_refused_torch():
    torch = pytest.importorskip("torch")
    p, X = problem("torch", seed=9)
    rng_before = torch.get_rng_state()

    def f(p, X):
        return torch.nn.functional.dropout(net(p, X), p=0.5, training=True)

    with pytest.raises(hessop.RandomnessError, match="model.eval"):
        hessop.jacobian_operator(f, p, X)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_errors(backend):
    p, X = problem(backend)
    J = hessop.jacobian_operator(net, p, X)
    with pytest.raises(hessop.ShapeError, match=r"\(24,\)"):
        J @ to_native(backend, np.ones(10))
    with pytest.raises(hessop.ShapeError, match=r"\(10,\)"):
        J.T @ to_native(backend, np.ones(24))
    with pytest.raises(hessop.ShapeError, match="keys missing"):
        J.ravel({"W1": np.ones((4, 3))})
    with pytest.raises(TypeError, match="one array"):
        hessop.jacobian_operator(lambda p, X: (net(p, X), X), p, X)
    with pytest.raises(hessop.DTypeError, match="float32 at float64"):
        hessop.jacobian_operator(lambda p, X: _xp(X).astype(net(p, X), _xp(X).float32), p, X)
    with pytest.raises(hessop.DTypeError):
        hessop.jacobian_operator(net, {"W": to_native(backend, np.ones(3, int))}, X)
    with pytest.raises(TypeError, match="must be a function"):
        hessop.jacobian_operator(3.0, p, X)
    with pytest.raises(ValueError, match="chunk_size"):
        hessop.jacobian_operator(net, p, X, chunk_size=0)
    with pytest.raises(TypeError, match="cache"):
        hessop.jacobian_operator(net, p, X, cache="yes")


def test_torch_op_without_forward_mode():
    """grid_sample has no forward-mode rule: the kept pullback's graph gives J @ v anyway."""
    torch = pytest.importorskip("torch")
    grid = torch.tensor([[[[-0.3, 0.0], [0.45, 0.0], [0.9, 0.0]]]], dtype=torch.float64)

    def f(w, s):
        img = (w**2 * s).reshape(1, 1, 1, 4)
        return torch.nn.functional.grid_sample(img, grid, align_corners=False).reshape(-1)

    w, s = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64), torch.tensor(1.5)
    ref = torch.autograd.functional.jacobian(lambda z: f(z, s), w).numpy()
    J = hessop.jacobian_operator(f, w, s)
    V = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    np.testing.assert_allclose((J @ V[:, 0]).numpy(), ref @ V[:, 0].numpy(), rtol=1e-12)
    np.testing.assert_allclose((J @ V).numpy(), ref @ V.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(J.to_dense().numpy(), ref, rtol=1e-12, atol=1e-14)
    uncached = hessop.jacobian_operator(f, w, s, cache=False)
    np.testing.assert_allclose(uncached.T.to_dense().numpy(), ref.T, rtol=1e-12, atol=1e-14)
    with pytest.raises(hessop.ForwardModeUnsupportedError, match="cache=True"):
        uncached @ V[:, 0]
