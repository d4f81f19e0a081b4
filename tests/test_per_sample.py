"""hessop.per_sample: per-sample Hessians, gradients and Jacobians, in torch and JAX.

References are independent: Python loops over the samples of torch.func.hessian /
jax.hessian, grad and jacrev (and, for random functions, of torch.autograd.functional
after a manual seed), closed forms, and the other framework.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hessop
from conftest import to_native, to_numpy

ROOT = Path(__file__).resolve().parents[1]
B, N = 5, 3


def _xp(x):
    import array_api_compat

    return array_api_compat.array_namespace(x)


def sample_loss(x, W, y):
    """One sample: x (N,), W (4, N) shared, y (N,) mapped. Not quadratic: H depends on x."""
    xp = _xp(x)
    return xp.sum(xp.tanh(W @ x) ** 2) + xp.sum(x**3 * y) + xp.sum(x) ** 2 * y[0]


def problem(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, N)), rng.standard_normal((4, N)), rng.standard_normal((B, N))


def loop_hessians(backend, f, X, *args, mapped):
    """Per-sample Hessians by a Python loop of the framework's own dense Hessian."""
    if backend == "torch":
        import torch

        hess = torch.func.hessian(f)
    else:
        import jax

        hess = jax.jit(jax.hessian(f))  # compiled once for all samples
    out = []
    for i in range(X.shape[0]):
        a = [arg[i] if m else arg for arg, m in zip(args, mapped)]
        out.append(hess(X[i], *a))
    return np.stack([to_numpy(h) for h in out])


# --- per_sample_hessians --------------------------------------------------------------
def test_hessians_match_loop(backend):
    X, W, Y = (to_native(backend, a) for a in problem())
    H = hessop.per_sample_hessians(sample_loss, X, W, Y)
    assert tuple(H.shape) == (B, N, N)
    ref = loop_hessians(backend, sample_loss, X, W, Y, mapped=(False, True))
    np.testing.assert_allclose(to_numpy(H), ref, rtol=1e-10, atol=1e-12)
    # not all equal: the test would catch a broadcast of one sample's Hessian
    assert np.abs(ref[0] - ref[1]).max() > 1e-3


def test_hessians_torch_equals_jax():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    X, W, Y = problem(1)
    Ht = hessop.per_sample_hessians(sample_loss, X, W, Y, backend="torch")
    Hj = hessop.per_sample_hessians(sample_loss, X, W, Y, backend="jax")
    np.testing.assert_allclose(to_numpy(Ht), to_numpy(Hj), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("chunk", [1, 2, B, 100])
def test_hessians_chunk_size(backend, chunk):
    X, W, Y = (to_native(backend, a) for a in problem(2))
    full = to_numpy(hessop.per_sample_hessians(sample_loss, X, W, Y))
    part = to_numpy(hessop.per_sample_hessians(sample_loss, X, W, Y, chunk_size=chunk))
    np.testing.assert_allclose(part, full, rtol=1e-13, atol=1e-14)


def test_hessians_multidim_samples_and_pytree_args(backend):
    rng = np.random.default_rng(3)
    X = to_native(backend, rng.standard_normal((4, 2, 3)))
    args = {"A": to_native(backend, rng.standard_normal((3, 3))), "s": to_native(backend, 0.7)}

    def f(x, a):
        xp = _xp(x)
        return xp.sum(xp.sin(x @ a["A"]) * x) * a["s"] + xp.sum(x**4)

    H = hessop.per_sample_hessians(f, X, args)
    assert tuple(H.shape) == (4, 2, 3, 2, 3)
    ref = loop_hessians(backend, f, X, args, mapped=(False,))
    np.testing.assert_allclose(to_numpy(H), ref, rtol=1e-10, atol=1e-12)


def test_hessians_explicit_in_axes(backend):
    """A shared argument whose leading size happens to be B needs in_axes=(None, 0)."""
    rng = np.random.default_rng(4)
    X = to_native(backend, rng.standard_normal((N, N)))  # B == N on purpose
    M = to_native(backend, rng.standard_normal((N, N)))  # shared matrix, leading dim N == B
    y = to_native(backend, rng.standard_normal((N,)))  # one scalar per sample

    def f(x, M, y):
        xp = _xp(x)
        return xp.sum(xp.tanh(M @ x) ** 2) * y

    H = hessop.per_sample_hessians(f, X, M, y, in_axes=(None, 0))
    ref = loop_hessians(backend, f, X, M, y, mapped=(False, True))
    np.testing.assert_allclose(to_numpy(H), ref, rtol=1e-10, atol=1e-12)
    # the default rule maps M too (leading dim == B), which is a different function
    H_auto = hessop.per_sample_hessians(f, X, M, y)
    assert np.abs(to_numpy(H_auto) - ref).max() > 1e-3


def test_hessians_scalar_samples(backend):
    X = to_native(backend, np.array([0.5, -1.0, 2.0]))
    H = hessop.per_sample_hessians(lambda x: x**4, X)
    np.testing.assert_allclose(to_numpy(H), 12 * to_numpy(X) ** 2, rtol=1e-12)


def test_hessians_numpy_needs_backend(backend):
    X, W, Y = problem(5)
    with pytest.raises(TypeError, match="backend="):
        hessop.per_sample_hessians(sample_loss, X, W, Y)
    H = hessop.per_sample_hessians(sample_loss, X, W, Y, backend=backend)
    assert type(H).__module__.split(".")[0] in ("torch", "jax", "jaxlib")
    ref = loop_hessians(backend, sample_loss, *(to_native(backend, a) for a in (X, W, Y)),
                        mapped=(False, True))  # fmt: skip
    np.testing.assert_allclose(to_numpy(H), ref, rtol=1e-10, atol=1e-12)


def test_hessians_float32(backend):
    X, W, Y = (to_native(backend, a, "float32") for a in problem(6))
    H = hessop.per_sample_hessians(sample_loss, X, W, Y)
    assert "float32" in str(H.dtype)
    ref = loop_hessians(backend, sample_loss, *(to_native(backend, a) for a in problem(6)),
                        mapped=(False, True))  # fmt: skip
    np.testing.assert_allclose(to_numpy(H), ref, rtol=1e-4, atol=1e-4)


def test_hessians_errors(backend):
    X, W, Y = (to_native(backend, a) for a in problem())
    with pytest.raises(hessop.LossError, match="one sample"):
        hessop.per_sample_hessians(lambda x: x**2, X)  # vector output
    with pytest.raises(hessop.DTypeError, match="int"):
        hessop.per_sample_hessians(sample_loss, to_native(backend, np.ones((B, N), int)), W, Y)
    with pytest.raises(hessop.ShapeError, match="0-d"):
        hessop.per_sample_hessians(lambda x: x**2, to_native(backend, 1.0))
    with pytest.raises(hessop.ShapeError, match="empty"):
        hessop.per_sample_hessians(sample_loss, X[:0], W, Y)
    with pytest.raises(hessop.ShapeError, match="one entry"):
        hessop.per_sample_hessians(sample_loss, X, W, Y, in_axes=(None,))
    with pytest.raises(hessop.ShapeError, match="leading dimension"):
        hessop.per_sample_hessians(sample_loss, X, W, Y, in_axes=(0, 0))
    with pytest.raises(ValueError, match="0 .map. or None"):
        hessop.per_sample_hessians(sample_loss, X, W, Y, in_axes=(1, 0))
    with pytest.raises(ValueError, match="chunk_size"):
        hessop.per_sample_hessians(sample_loss, X, W, Y, chunk_size=0)
    with pytest.raises(hessop.ShapeError, match="holds no array"):
        hessop.per_sample_hessians(lambda x, W, s: sample_loss(x, W, x) * s, X, W, 2.0,
                                   in_axes=(None, 0))  # fmt: skip
    other = "jax" if backend == "torch" else "torch"
    pytest.importorskip(other)
    with pytest.raises(TypeError, match="convert it first"):
        hessop.per_sample_hessians(sample_loss, X, W, Y, backend=other)
    with pytest.raises(hessop.UnknownOptionError):
        hessop.per_sample_hessians(sample_loss, X, W, Y, backend="tensorflow")


def test_hessians_torch_op_without_forward_mode():
    """grid_sample has no forward-mode derivative; torch's path needs only reverse mode."""
    torch = pytest.importorskip("torch")

    def g(x):
        img = (x**2).reshape(1, 1, 1, 4)
        grid = torch.tensor([[[[-0.3, 0.0], [0.45, 0.0]]]], dtype=x.dtype)
        return torch.nn.functional.grid_sample(img, grid, align_corners=False).sum() + (x**3).sum()

    X = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError):  # the premise: forward mode fails here
        torch.func.jvp(torch.func.grad(g), (X[0],), (X[0],))
    H = hessop.per_sample_hessians(g, X, chunk_size=2)
    ref = torch.stack([torch.func.jacrev(torch.func.jacrev(g))(x) for x in X])
    np.testing.assert_allclose(H.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_hessians_torch_grad_mode_and_gradients():
    """Like torch.func: a graph to closed-over tensors with grad on, none under no_grad."""
    torch = pytest.importorskip("torch")
    X, W, Y = (torch.as_tensor(a) for a in problem(7))
    W = W.clone().requires_grad_(True)
    with torch.no_grad():
        H0 = hessop.per_sample_hessians(sample_loss, X, W, Y)
    assert not H0.requires_grad
    H = hessop.per_sample_hessians(sample_loss, X, W, Y)
    (g,) = torch.autograd.grad((H**2).sum(), W)
    hess = torch.func.hessian(sample_loss)
    ref = torch.stack([hess(x, W, y) for x, y in zip(X, Y)])
    (g_ref,) = torch.autograd.grad((ref**2).sum(), W)
    np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-10)
    assert W.grad is None


def test_hessians_jax_jit_and_grad():
    jax = pytest.importorskip("jax")
    X, W, Y = (to_native("jax", a) for a in problem(8))
    fn = jax.jit(lambda X, W, Y: hessop.per_sample_hessians(sample_loss, X, W, Y, chunk_size=2))
    ref = loop_hessians("jax", sample_loss, X, W, Y, mapped=(False, True))
    np.testing.assert_allclose(np.asarray(fn(X, W, Y)), ref, rtol=1e-10, atol=1e-12)
    g = jax.grad(lambda W: (hessop.per_sample_hessians(sample_loss, X, W, Y) ** 2).sum())(W)
    per_sample = jax.vmap(jax.hessian(sample_loss), in_axes=(0, None, 0))  # the textbook way
    g_ref = jax.jit(jax.grad(lambda W: (per_sample(X, W, Y) ** 2).sum()))(W)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-10)


# --- per_sample_gradients ---------------------------------------------------------------
def grad_problem(backend, dtype="float64"):
    rng = np.random.default_rng(9)
    params = {  # keys deliberately not sorted: the flat layout keeps insertion order
        "w2": rng.standard_normal((2, 4)),
        "b1": rng.standard_normal(4),
        "w1": rng.standard_normal((4, 3)),
    }
    X, Y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))

    def f(p, x, y):
        xp = _xp(x)
        out = p["w2"] @ xp.tanh(p["w1"] @ x + p["b1"])
        return xp.sum((out - y) ** 2)

    return (
        f,
        to_native(backend, params, dtype),
        to_native(backend, X, dtype),
        to_native(backend, Y, dtype),
    )


def loop_gradients(backend, f, params, X, Y):
    rows = []
    for i in range(X.shape[0]):
        if backend == "torch":
            import torch

            g = torch.func.grad(f)(params, X[i], Y[i])
        else:
            import jax

            g = jax.grad(f)(params, X[i], Y[i])
        rows.append(np.concatenate([to_numpy(g[k]).ravel() for k in params]))  # insertion order
    return np.stack(rows)


def test_gradients_match_loop_and_layout(backend):
    f, p, X, Y = grad_problem(backend)
    G = hessop.per_sample_gradients(f, p, X, Y)
    assert tuple(G.shape) == (6, 8 + 4 + 12)
    np.testing.assert_allclose(to_numpy(G), loop_gradients(backend, f, p, X, Y), rtol=1e-12)
    # the layout is HessianOperator.ravel's: row i ravels to sample i's gradient pytree
    H = hessop.hessian(lambda q, x, y: f(q, x, y), p, X[0], Y[0])
    tree = hessop.per_sample_gradients(f, p, X, Y, flat=False)
    assert list(tree) == ["w2", "b1", "w1"]
    assert tuple(tree["w1"].shape) == (6, 4, 3)
    row = H.ravel({k: v[2] for k, v in tree.items()})
    np.testing.assert_allclose(to_numpy(row), to_numpy(G[2]), rtol=0, atol=0)
    # and the sum of per-sample gradients is the batch gradient
    Hb = hessop.hessian(lambda q: sum(f(q, X[i], Y[i]) for i in range(6)), p)
    np.testing.assert_allclose(to_numpy(G).sum(0), to_numpy(Hb.gradient()), rtol=1e-12)


def test_gradients_chunk_and_torch_vs_jax():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    out = {}
    for bk in ("torch", "jax"):
        f, p, X, Y = grad_problem(bk)
        full = to_numpy(hessop.per_sample_gradients(f, p, X, Y))
        part = to_numpy(hessop.per_sample_gradients(f, p, X, Y, chunk_size=4))
        np.testing.assert_allclose(part, full, rtol=1e-13, atol=1e-14)
        out[bk] = full
    np.testing.assert_allclose(out["torch"], out["jax"], rtol=1e-12, atol=1e-13)


def test_gradients_integer_inputs(backend):
    """Token ids: x is integer and not differentiated; the parameters are."""
    rng = np.random.default_rng(10)
    emb = to_native(backend, rng.standard_normal((7, 2)))
    ids = to_native(backend, np.array([[1, 3], [0, 6], [5, 5]]))

    def f(E, tok):
        return _xp(E).sum(E[tok] ** 3)

    G = hessop.per_sample_gradients(f, emb, ids)
    ref = np.zeros((3, 7, 2))
    e = to_numpy(emb)
    for i, row in enumerate(to_numpy(ids)):
        for t in row:
            ref[i, t] += 3 * e[t] ** 2
    np.testing.assert_allclose(to_numpy(G), ref.reshape(3, -1), rtol=1e-12)


def test_gradients_numpy_data_takes_param_dtype(backend):
    f, p, X, Y = grad_problem(backend, "float32")
    G = hessop.per_sample_gradients(f, p, to_numpy(X).astype(np.float64), to_numpy(Y))
    assert "float32" in str(G.dtype)
    ref = loop_gradients(backend, f, *grad_problem(backend)[1:])
    np.testing.assert_allclose(to_numpy(G), ref, rtol=1e-4, atol=1e-5)


def test_gradients_errors(backend):
    f, p, X, Y = grad_problem(backend)
    with pytest.raises(hessop.LossError, match="scalar"):
        hessop.per_sample_gradients(lambda q, x, y: q["b1"] * x.sum(), p, X, Y)
    with pytest.raises(hessop.DTypeError):
        hessop.per_sample_gradients(f, {"w": to_native(backend, np.ones(3, int))}, X, Y)
    with pytest.raises(TypeError, match="backend="):
        hessop.per_sample_gradients(f, {"w": np.ones(3)}, np.ones((2, 3)))


# --- per_sample_jacobians ---------------------------------------------------------------
def sample_map(x, W, y):
    """One sample: x (N,) -> (M,) with W (M, N) shared and y (N,) mapped; not linear in x."""
    xp = _xp(x)
    return xp.tanh(W @ (x * y)) * xp.sum(x**2) + W @ x**3


@functools.cache
def _jitted_jacrev(f):
    """One compiled reference per function, shared by the tests of that function."""
    import jax

    return jax.jit(jax.jacrev(f))


def loop_jacobians(backend, f, X, *args, mapped):
    """Per-sample Jacobians by a Python loop of the framework's reverse-mode Jacobian."""
    if backend == "torch":
        import torch

        jac = torch.func.jacrev(f)
    else:
        jac = _jitted_jacrev(f)
    out = []
    for i in range(X.shape[0]):
        a = [arg[i] if m else arg for arg, m in zip(args, mapped)]
        out.append(to_numpy(jac(X[i], *a)))
    return np.stack(out)


@pytest.mark.parametrize("M", [1, 7], ids=["wide", "tall"])
@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_jacobians_match_loop(backend, mode, M):
    rng = np.random.default_rng(30 + M)
    X, W, Y = (to_native(backend, a) for a in (rng.standard_normal((B, N)),
               rng.standard_normal((M, N)), rng.standard_normal((B, N))))  # fmt: skip
    J = hessop.per_sample_jacobians(sample_map, X, W, Y, mode=mode)
    assert tuple(J.shape) == (B, M, N)
    ref = loop_jacobians(backend, sample_map, X, W, Y, mapped=(False, True))
    np.testing.assert_allclose(to_numpy(J), ref, rtol=1e-11, atol=1e-13)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3


def matrix_map(x, A):
    """One sample: x (2, 3) -> (2, 4) with A (3, 4) shared."""
    return _xp(x).sin(x @ A) * _xp(x).sum(x**2)


@pytest.mark.parametrize("how", ["forward", "reverse"])
@pytest.mark.parametrize("strategy", ["summed-output", "vmap-jacobian"])
def test_jacobians_every_strategy(backend, monkeypatch, how, strategy):
    """Each framework runs one strategy per mode: the others must give the same numbers,
    with chunks and a multi-dimensional sample and output."""
    attribute = "per_sample_jacfwd" if how == "forward" else "per_sample_jacrev"
    monkeypatch.setattr(type(hessop.get_backend(backend).transforms), attribute, strategy)
    rng = np.random.default_rng(33)
    X = to_native(backend, rng.standard_normal((5, 2, 3)))
    A = to_native(backend, rng.standard_normal((3, 4)))
    J = hessop.per_sample_jacobians(matrix_map, X, A, mode=how, chunk_size=2)
    assert tuple(J.shape) == (5, 2, 4, 2, 3)
    ref = loop_jacobians(backend, matrix_map, X, A, mapped=(False,))
    np.testing.assert_allclose(to_numpy(J), ref, rtol=1e-11, atol=1e-13)


def test_jacobians_torch_equals_jax_and_chunks():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    rng = np.random.default_rng(34)
    X, W, Y = rng.standard_normal((B, N)), rng.standard_normal((4, N)), rng.standard_normal((B, N))
    out = {}
    for bk in ("torch", "jax"):
        full = to_numpy(hessop.per_sample_jacobians(sample_map, X, W, Y, backend=bk))
        for chunk in (1, 2):
            part = hessop.per_sample_jacobians(sample_map, X, W, Y, backend=bk, chunk_size=chunk)
            np.testing.assert_allclose(to_numpy(part), full, rtol=1e-13, atol=1e-14)
        out[bk] = full
    np.testing.assert_allclose(out["torch"], out["jax"], rtol=1e-12, atol=1e-13)


def test_jacobians_in_axes_float32_and_scalar_output(backend):
    rng = np.random.default_rng(35)
    X = to_native(backend, rng.standard_normal((N, N)), "float32")  # B == N on purpose
    M = to_native(backend, rng.standard_normal((N, N)), "float32")  # shared, leading dim B
    J = hessop.per_sample_jacobians(lambda x, M: _xp(x).tanh(M @ x), X, M, in_axes=(None,))
    assert "float32" in str(J.dtype)
    Xd, Md = to_numpy(X).astype(float), to_numpy(M).astype(float)
    ref = (1 - np.tanh(Xd @ Md.T) ** 2)[:, :, None] * Md[None]  # closed form
    np.testing.assert_allclose(to_numpy(J), ref, rtol=1e-4, atol=1e-5)
    # a scalar output per sample: the per-sample gradients
    G = hessop.per_sample_jacobians(lambda x: _xp(x).sum(x**3), to_native(backend, Xd))
    np.testing.assert_allclose(to_numpy(G), 3 * Xd**2, rtol=1e-13)


def test_jacobians_torch_forward_mode_fallback():
    torch = pytest.importorskip("torch")
    grid = torch.zeros(1, 1, 6, 2, dtype=torch.float64)

    def f(x):  # tall (6 outputs, 4 inputs): auto wants forward mode, which grid_sample lacks
        img = (x**2).reshape(1, 1, 1, 4)
        return torch.nn.functional.grid_sample(img, grid, align_corners=False).reshape(-1)

    X = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = hessop.per_sample_jacobians(f, X)
    ref = torch.stack([torch.autograd.functional.jacobian(f, x) for x in X])
    np.testing.assert_allclose(J.numpy(), ref.numpy(), rtol=1e-13)
    with pytest.raises(hessop.ForwardModeUnsupportedError, match="mode='reverse'"):
        hessop.per_sample_jacobians(f, X, mode="forward")


def test_jacobians_jax_jit():
    jax = pytest.importorskip("jax")
    X, W, Y = (to_native("jax", a) for a in problem(36))
    fn = jax.jit(lambda X: hessop.per_sample_jacobians(sample_map, X, W, Y, chunk_size=2))
    ref = loop_jacobians("jax", sample_map, X, W, Y, mapped=(False, True))
    np.testing.assert_allclose(np.asarray(fn(X)), ref, rtol=1e-11, atol=1e-13)


def test_jacobians_errors(backend):
    X, W, Y = (to_native(backend, a) for a in problem())
    with pytest.raises(hessop.UnknownOptionError, match="'reverse'"):
        hessop.per_sample_jacobians(sample_map, X, W, Y, mode="rev")
    with pytest.raises(TypeError, match="one array"):
        hessop.per_sample_jacobians(lambda x: (x, x), X)
    with pytest.raises(hessop.DTypeError):
        hessop.per_sample_jacobians(sample_map, to_native(backend, np.ones((B, N), int)), W, Y)
    with pytest.raises(hessop.ShapeError, match="0-d"):
        hessop.per_sample_jacobians(lambda x: x, to_native(backend, 1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        hessop.per_sample_jacobians(sample_map, X, W, Y, chunk_size=0)
    with pytest.raises(hessop.UnknownOptionError, match="allow_randomness"):
        hessop.per_sample_jacobians(sample_map, X, W, Y, allow_randomness="same")
    with pytest.raises(hessop.LossError, match="per_sample_jacobians"):
        hessop.per_sample_hessians(lambda x: x**2, X)


# --- randomness: refused, or the same draws for every sample from a fixed seed -------------
def _dropout_problem(torch):
    g = torch.Generator().manual_seed(40)
    W = torch.randn(6, N, dtype=torch.float64, generator=g)
    X = torch.randn(B, N, dtype=torch.float64, generator=g)

    def f(x):  # dropout in training mode: a random mask on the hidden layer
        h = torch.nn.functional.dropout(torch.tanh(W @ x), p=0.5, training=True)
        return (h**2).sum() + (x**3).sum()

    def f_vec(x):
        return torch.nn.functional.dropout(torch.tanh(W @ x), p=0.5, training=True) * x.sum()

    def f_params(p, x):
        return f(x * p)

    return f, f_vec, f_params, X


def _seeded_loop(torch, fn, X, seed):
    """Each sample evaluated alone right after torch.manual_seed(seed), with a derivative
    that evaluates f once (no vmap): the contract of allow_randomness='fixed-seed'."""
    out = []
    for x in X:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out.append(fn(x))
    return torch.stack(out).numpy()


def test_randomness_fixed_seed_matches_seeded_loop():
    torch = pytest.importorskip("torch")
    f, f_vec, f_params, X = _dropout_problem(torch)
    p = torch.full((N,), 1.5, dtype=torch.float64)
    before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    H = hessop.per_sample_hessians(f, X, allow_randomness="fixed-seed", seed=3)
    J = hessop.per_sample_jacobians(f_vec, X, allow_randomness="fixed-seed", seed=3, chunk_size=2)
    G = hessop.per_sample_gradients(f_params, p, X, allow_randomness="fixed-seed", seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global generators are untouched
    assert (np.random.get_state()[1] == np_before).all()
    hess = torch.autograd.functional.hessian
    H_ref = _seeded_loop(torch, lambda x: hess(f, x), X, 3)
    np.testing.assert_allclose(H.numpy(), H_ref, rtol=1e-12, atol=1e-13)
    J_ref = _seeded_loop(torch, lambda x: torch.autograd.functional.jacobian(f_vec, x), X, 3)
    np.testing.assert_allclose(J.numpy(), J_ref, rtol=1e-12, atol=1e-13)
    G_ref = _seeded_loop(torch, lambda x: torch.func.grad(f_params)(p, x), X, 3)
    np.testing.assert_allclose(G.numpy(), G_ref, rtol=1e-12, atol=1e-13)
    # the draws matter: another seed, or no dropout, gives other numbers
    H4 = hessop.per_sample_hessians(f, X, allow_randomness="fixed-seed", seed=4, chunk_size=2)
    assert np.abs(H4.numpy() - H_ref).max() > 1e-3
    np.testing.assert_allclose(H4.numpy(), _seeded_loop(torch, lambda x: hess(f, x), X, 4),
                               rtol=1e-12, atol=1e-13)  # fmt: skip


def test_randomness_refused_by_default():
    torch = pytest.importorskip("torch")
    f, f_vec, f_params, X = _dropout_problem(torch)
    before = torch.get_rng_state()
    with pytest.raises(hessop.RandomnessError, match="allow_randomness='fixed-seed'"):
        hessop.per_sample_hessians(f, X)
    with pytest.raises(hessop.RandomnessError, match="allow_randomness='fixed-seed'"):
        hessop.per_sample_jacobians(f_vec, X)
    with pytest.raises(hessop.RandomnessError, match="allow_randomness='fixed-seed'"):
        hessop.per_sample_gradients(f_params, torch.ones(N, dtype=torch.float64), X)
    assert torch.equal(torch.get_rng_state(), before)


def test_randomness_numpy_draws_refused_and_restored(backend):
    """A draw vmap cannot see (numpy's global generator) is refused too, and undone."""
    X, W, Y = (to_native(backend, a) for a in problem())
    before = np.random.get_state()[1].copy()

    def f(x, W, y):
        return sample_loss(x, W, y) * float(np.random.uniform(1.0, 2.0))

    with pytest.raises(hessop.RandomnessError, match="numpy's"):
        hessop.per_sample_hessians(f, X, W, Y)
    assert (np.random.get_state()[1] == before).all()
    # with a fixed seed every sample gets the same factor, and the state is restored
    H = hessop.per_sample_hessians(f, X, W, Y, allow_randomness="fixed-seed", seed=5)
    state = np.random.get_state()
    np.random.seed(5)
    factor = np.random.uniform(1.0, 2.0)
    np.random.set_state(state)
    ref = loop_hessians(backend, sample_loss, X, W, Y, mapped=(False, True)) * factor
    np.testing.assert_allclose(to_numpy(H), ref, rtol=1e-10, atol=1e-12)


# --- benchmark smoke test -----------------------------------------------------------------
def test_benchmark_quick_runs():
    """One run of every table (one interpreter start: importing torch is half of it)."""
    pytest.importorskip("torch")
    resource = pytest.importorskip("resource")  # CPU time of the child (Unix)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "per_sample.py"), "--quick", "--no-jax",
         "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for row in ("summed-grad trick", "hessop auto", "forward/summed-output",
                "reverse/vmap-jacobian", "reverse-over-reverse"):  # fmt: skip
        assert row in out.stdout
    errors = [float(e) for e in re.findall(r"x  (\d\.\de[-+]\d+)", out.stdout)]
    assert len(errors) > 10 and max(errors) < 1e-5  # every method agrees with the reference
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 25  # CPU seconds (10-11 s measured), not wall time: the machine is shared
