"""hessop.jacobians: jacobian (argnums, pytrees, AD modes) and output_hessians, in torch and
JAX.

References are independent: torch.func.jacrev / torch.autograd.functional, jax.jacfwd /
jax.jacrev / jax.hessian, loops over outputs, closed forms, and the other framework.
"""

from __future__ import annotations

import numpy as np
import pytest

import hessop
from conftest import backend_params, to_native, to_numpy


def _xp(x):
    import array_api_compat

    return array_api_compat.array_namespace(x)


# --- jacobian -----------------------------------------------------------------------------
def vec_fn(x, A):
    """R^n -> R^m, m = A.shape[0]."""
    xp = _xp(x)
    return xp.tanh(A @ x) * xp.sum(x**2)


@pytest.mark.parametrize("shape", [(2, 5), (5, 2)], ids=["wide", "tall"])
@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_jacobian_references(backend, shape, mode):
    rng = np.random.default_rng(11)
    A = to_native(backend, rng.standard_normal(shape))
    x = to_native(backend, rng.standard_normal(shape[1]))
    J = hessop.jacobian(vec_fn, x, A, mode=mode)
    assert tuple(J.shape) == shape
    if backend == "torch":
        import torch

        ref = torch.autograd.functional.jacobian(lambda z: vec_fn(z, A), x).numpy()
    else:
        import jax

        ref = np.asarray(jax.jacfwd(lambda z: vec_fn(z, A))(x))
        np.testing.assert_allclose(
            np.asarray(jax.jacrev(lambda z: vec_fn(z, A))(x)), ref, rtol=1e-13
        )
    np.testing.assert_allclose(to_numpy(J), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("shape", "expected"), [((2, 5), "jacrev"), ((5, 2), "jacfwd"),
                                                  ((3, 3), "jacfwd")])  # fmt: skip
def test_jacobian_auto_picks_mode(backend, monkeypatch, shape, expected):
    cls = type(hessop.get_backend(backend).transforms)
    used = []
    for name in ("jacfwd", "jacrev"):
        orig = getattr(cls, name)

        def spy(self, fn, _orig=orig, _name=name):
            used.append(_name)
            return _orig(self, fn)

        monkeypatch.setattr(cls, name, spy)
    rng = np.random.default_rng(12)
    A = to_native(backend, rng.standard_normal(shape))
    hessop.jacobian(vec_fn, to_native(backend, rng.standard_normal(shape[1])), A)
    assert used == [expected]


def test_jacobian_multidim_and_torch_vs_jax():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3))

    def f(x):
        xp = _xp(x)
        return xp.stack([xp.sum(xp.sin(x), axis=0), xp.sum(x**2, axis=0)])  # (2, 3)

    Jt = hessop.jacobian(f, x, backend="torch")
    Jj = hessop.jacobian(f, x, backend="jax")
    assert tuple(Jt.shape) == tuple(Jj.shape) == (2, 3, 2, 3)
    np.testing.assert_allclose(to_numpy(Jt), to_numpy(Jj), rtol=1e-13)
    # d f[0, j] / d x[i, j] = cos(x[i, j])
    np.testing.assert_allclose(to_numpy(Jt)[0, 1, :, 1], np.cos(x[:, 1]), rtol=1e-13)


def test_jacobian_torch_forward_mode_fallback():
    torch = pytest.importorskip("torch")
    grid = torch.zeros(1, 1, 6, 2, dtype=torch.float64)

    def f(x):  # tall (6 outputs, 4 inputs): auto wants forward mode, which grid_sample lacks
        img = (x**2).reshape(1, 1, 1, 4)
        return torch.nn.functional.grid_sample(img, grid, align_corners=False).reshape(-1)

    x = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    J = hessop.jacobian(f, x)
    np.testing.assert_allclose(J.numpy(), torch.autograd.functional.jacobian(f, x).numpy())
    with pytest.raises(hessop.ForwardModeUnsupportedError, match="mode='reverse'"):
        hessop.jacobian(f, x, mode="forward")


def test_jacobian_errors(backend):
    x = to_native(backend, np.ones(3))
    with pytest.raises(hessop.UnknownOptionError, match="'reverse'"):
        hessop.jacobian(lambda z: z, x, mode="fwd")
    with pytest.raises(TypeError, match="one array"):
        hessop.jacobian(lambda z: (z, z), x, mode="reverse")
    with pytest.raises(hessop.DTypeError):
        hessop.jacobian(lambda z: z, to_native(backend, np.ones(3, int)))
    with pytest.raises(TypeError, match="backend="):
        hessop.jacobian(lambda z: z, np.ones(3))


# --- argnums and pytrees ------------------------------------------------------------------
def pytree_fn(p, c, A):
    """(3,) output of a dict point p = {"W": (3, 2), "b": (3,)}, a scalar c and a matrix A."""
    xp = _xp(A)
    return xp.tanh(p["W"] @ xp.sum(A, axis=0) + p["b"]) * c + xp.sum(A**2) * p["b"] ** 2


def pytree_problem(backend):
    rng = np.random.default_rng(21)
    p = {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(3)}
    return (
        to_native(backend, p),
        to_native(backend, 0.7),
        to_native(backend, rng.standard_normal((4, 2))),
    )


def reference_jacobians(backend, argnums, *args):
    if backend == "torch":
        import torch

        return torch.func.jacrev(pytree_fn, argnums=argnums)(*args)
    import jax

    return jax.jacrev(pytree_fn, argnums=argnums)(*args)


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_jacobian_pytree_and_argnums(backend, mode):
    p, c, A = pytree_problem(backend)
    J = hessop.jacobian(pytree_fn, p, c, A, mode=mode)
    assert list(J) == ["W", "b"] and tuple(J["W"].shape) == (3, 3, 2)
    ref = reference_jacobians(backend, 0, p, c, A)
    for k in ("W", "b"):
        np.testing.assert_allclose(to_numpy(J[k]), to_numpy(ref[k]), rtol=1e-12, atol=1e-14)
    Jc, JA, Jp = hessop.jacobian(pytree_fn, p, c, A, argnums=(1, 2, 0), mode=mode)
    ref_c, ref_A, ref_p = reference_jacobians(backend, (1, 2, 0), p, c, A)
    assert tuple(Jc.shape) == (3,) and tuple(JA.shape) == (3, 4, 2)
    np.testing.assert_allclose(to_numpy(Jc), to_numpy(ref_c), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(JA), to_numpy(ref_A), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(Jp["b"]), to_numpy(ref_p["b"]), rtol=1e-12, atol=1e-14)
    # a single int in a tuple still gives a tuple
    (Ja,) = hessop.jacobian(pytree_fn, p, c, A, argnums=(2,), mode=mode)
    np.testing.assert_allclose(to_numpy(Ja), to_numpy(JA), rtol=0, atol=0)


def test_jacobian_pytree_torch_equals_jax_and_list_points():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    rng = np.random.default_rng(22)
    point = [rng.standard_normal(3), (rng.standard_normal((2, 2)),)]

    def f(q):
        xp = _xp(q[0])
        return xp.stack([xp.sum(q[0] ** 3), xp.sum(q[1][0] * q[0][:2]), xp.prod(q[0])])

    Jt = hessop.jacobian(f, point, backend="torch")
    Jj = hessop.jacobian(f, point, backend="jax")
    assert isinstance(Jt, list) and isinstance(Jt[1], tuple)
    assert tuple(Jt[1][0].shape) == tuple(Jj[1][0].shape) == (3, 2, 2)
    np.testing.assert_allclose(to_numpy(Jt[0]), to_numpy(Jj[0]), rtol=1e-13)
    np.testing.assert_allclose(to_numpy(Jt[1][0]), to_numpy(Jj[1][0]), rtol=1e-13)
    np.testing.assert_allclose(to_numpy(Jt[0])[0], 3 * point[0] ** 2, rtol=1e-13)  # closed form


def test_jacobian_argnums_errors(backend):
    p, c, A = pytree_problem(backend)
    with pytest.raises(ValueError, match=r"argnums=3 is out of range.*0\.\.2"):
        hessop.jacobian(pytree_fn, p, c, A, argnums=3)
    with pytest.raises(ValueError, match="out of range"):
        hessop.jacobian(pytree_fn, p, c, A, argnums=-1)
    with pytest.raises(ValueError, match="repeats"):
        hessop.jacobian(pytree_fn, p, c, A, argnums=(0, 0))
    with pytest.raises(ValueError, match="selects no argument"):
        hessop.jacobian(pytree_fn, p, c, A, argnums=())
    with pytest.raises(TypeError, match="argnums must be an int"):
        hessop.jacobian(pytree_fn, p, c, A, argnums=[0, 1])
    with pytest.raises(TypeError, match="argnums must be an int"):
        hessop.jacobian(pytree_fn, p, c, A, argnums=True)
    ints = to_native(backend, np.arange(4))
    with pytest.raises(hessop.DTypeError, match=r"args\[0\]"):
        hessop.jacobian(lambda x, k: x * k, to_native(backend, np.ones(4)), ints, argnums=1)
    with pytest.raises(TypeError, match=r"x\['b'\]"):
        hessop.jacobian(pytree_fn, {"W": p["W"], "b": [1.0, 2.0, 3.0]}, c, A)


# --- output_hessians ----------------------------------------------------------------------
def out_fn(x, A):
    """(2, 2) outputs of x (3,): not quadratic, so the Hessians depend on x."""
    xp = _xp(x)
    u = xp.tanh(A @ x)  # (4,)
    return xp.reshape(u * xp.sum(x**3) + u**2, (2, 2))


def loop_output_hessians(backend, f, x, *args):
    """One framework Hessian per output, by a Python loop over the raveled outputs."""
    m = int(np.prod(to_numpy(f(x, *args)).shape))
    rows = []
    for k in range(m):
        if backend == "torch":
            import torch

            h = torch.func.hessian(lambda z, k=k: f(z, *args).reshape(-1)[k])(x)
        else:
            import jax

            h = jax.hessian(lambda z, k=k: f(z, *args).reshape(-1)[k])(x)
        rows.append(to_numpy(h))
    return np.stack(rows)


def test_output_hessians_match_loop(backend):
    rng = np.random.default_rng(23)
    x, A = (to_native(backend, a) for a in (rng.standard_normal(3), rng.standard_normal((4, 3))))
    H = hessop.output_hessians(out_fn, x, A)
    assert tuple(H.shape) == (2, 2, 3, 3)
    ref = loop_output_hessians(backend, out_fn, x, A)
    np.testing.assert_allclose(to_numpy(H).reshape(4, 3, 3), ref, rtol=1e-11, atol=1e-13)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # distinct per output
    np.testing.assert_allclose(to_numpy(H), np.swapaxes(to_numpy(H), -1, -2), atol=1e-13)


def test_output_hessians_torch_equals_jax_and_closed_form():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    rng = np.random.default_rng(24)
    x, A = rng.standard_normal(3), rng.standard_normal((4, 3))
    Ht = hessop.output_hessians(out_fn, x, A, backend="torch")
    Hj = hessop.output_hessians(out_fn, x, A, backend="jax")
    np.testing.assert_allclose(to_numpy(Ht), to_numpy(Hj), rtol=1e-12, atol=1e-13)

    def quad(x, Q):  # output k = x^T Q_k x: Hessian Q_k + Q_k^T
        return _xp(x).sum(x * (Q @ x), axis=-1)

    Q = rng.standard_normal((5, 3, 3))
    for bk in ("torch", "jax"):
        H = to_numpy(hessop.output_hessians(quad, x, Q, backend=bk))
        np.testing.assert_allclose(H, Q + np.swapaxes(Q, 1, 2), rtol=1e-12, atol=1e-13)


# JAX slow (7 s of compiles): the torch run covers the scalar and dtype handling, which is
# framework-neutral; the JAX output Hessians are checked by the tests around it
@pytest.mark.parametrize("backend", backend_params(slow=("jax",)))
def test_output_hessians_scalar_multidim_and_float32(backend):
    rng = np.random.default_rng(25)
    X = rng.standard_normal((2, 2))

    def f(x):
        return _xp(x).sum(_xp(x).sin(x) * x[0, 0])

    H = hessop.output_hessians(f, to_native(backend, X))  # scalar: the plain Hessian
    assert tuple(H.shape) == (2, 2, 2, 2)
    ref = hessop.hessian(f, to_native(backend, X), mode="dense").to_dense()
    np.testing.assert_allclose(to_numpy(H).reshape(4, 4), to_numpy(ref), rtol=1e-12, atol=1e-13)
    H32 = hessop.output_hessians(f, to_native(backend, X, "float32"))
    assert "float32" in str(H32.dtype)
    np.testing.assert_allclose(to_numpy(H32).reshape(4, 4), to_numpy(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["forward-over-reverse", "reverse-over-reverse"])
def test_output_hessians_both_strategies(backend, monkeypatch, strategy):
    """Each framework runs one strategy by default: the other must give the same numbers."""
    monkeypatch.setattr(type(hessop.get_backend(backend).transforms), "output_hessian", strategy)
    rng = np.random.default_rng(26)
    x, A = (to_native(backend, a) for a in (rng.standard_normal(3), rng.standard_normal((4, 3))))
    H = hessop.output_hessians(out_fn, x, A)
    ref = loop_output_hessians(backend, out_fn, x, A)
    np.testing.assert_allclose(to_numpy(H).reshape(4, 3, 3), ref, rtol=1e-11, atol=1e-13)


def test_output_hessians_torch_op_without_forward_mode():
    torch = pytest.importorskip("torch")
    grid = torch.tensor([[[[-0.3, 0.0], [0.45, 0.0]]]], dtype=torch.float64)

    def g(x):  # grid_sample has no forward-mode derivative
        img = (x**2).reshape(1, 1, 1, 4)
        return torch.nn.functional.grid_sample(img, grid, align_corners=False).reshape(-1) * x[0]

    x = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    H = hessop.output_hessians(g, x)
    ref = torch.stack(
        [torch.autograd.functional.hessian(lambda z, k=k: g(z)[k], x) for k in range(2)]
    )
    np.testing.assert_allclose(H.numpy(), ref.numpy(), rtol=1e-12, atol=1e-13)


def test_output_hessians_errors_and_hessian_points_to_it(backend):
    x = to_native(backend, np.ones(3))
    with pytest.raises(TypeError, match="ravel a pytree"):
        hessop.output_hessians(lambda p: p["a"], {"a": x})
    with pytest.raises(TypeError, match="one array"):
        hessop.output_hessians(lambda z: (z, z), x)
    with pytest.raises(hessop.DTypeError):
        hessop.output_hessians(lambda z: z, to_native(backend, np.ones(3, int)))
    with pytest.raises(hessop.LossError, match=r"shape \(3,\).*hessop\.output_hessians"):
        hessop.hessian(lambda z: z**2, x).to_dense()


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_random_functions_refused_and_generators_untouched(mode):
    """Reverse mode evaluates f outside any vmap, where a draw raises nothing in torch:
    hessop notices the moved generator, puts it back and refuses."""
    torch = pytest.importorskip("torch")
    x = torch.ones(4, dtype=torch.float64)

    def f(z):
        return torch.nn.functional.dropout(z, p=0.5, training=True) * z.sum()

    before = torch.get_rng_state()
    with pytest.raises(hessop.RandomnessError, match="model.eval"):
        hessop.jacobian(f, x, mode=mode)
    with pytest.raises(hessop.RandomnessError, match="model.eval"):
        hessop.output_hessians(f, x)
    assert torch.equal(torch.get_rng_state(), before)
