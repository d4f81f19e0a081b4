"""Differentiable HVPs: hessian(..., differentiable=True), hessop.hvp, Hutchinson in a loss.

References: central finite differences of the loss, and the same loss built from dense
Hessians (torch.func.hessian / jax.hessian) differentiated by the framework itself.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

import hessop
from conftest import backend_params, to_native, to_numpy

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example():
    spec = importlib.util.spec_from_file_location(
        "sliced_score_matching", EXAMPLES / "sliced_score_matching.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SSM = load_example()


def _xp(x):
    import array_api_compat

    return array_api_compat.array_namespace(x)


def ssm_problem(backend, seed=0, batch=6, hidden=4):
    rng = np.random.default_rng(seed)
    theta = to_native(backend, SSM.init_params(rng, hidden))
    X = to_native(backend, SSM.sample_data(rng, batch))
    V = to_native(backend, rng.choice([-1.0, 1.0], size=(batch, 2)))
    return theta, X, V


def dense_ssm_loss(backend, theta, X, V):
    """The SSM loss from per-sample dense Hessians and gradients, without hessop."""
    if backend == "torch":
        import torch

        def one(x):
            return SSM.energy(x[None], theta)[0]

        H = torch.stack([torch.func.hessian(one)(x) for x in X])
        G = torch.stack([torch.func.grad(one)(x) for x in X])
        vHv = torch.einsum("bi,bij,bj->b", V, H, V)
        return (-vHv + 0.5 * (V * G).sum(1) ** 2).mean()
    import jax
    import jax.numpy as jnp

    def one(x, th):
        return SSM.energy(x[None], th)[0]

    H = jax.vmap(jax.hessian(one), in_axes=(0, None))(X, theta)
    G = jax.vmap(jax.grad(one), in_axes=(0, None))(X, theta)
    vHv = jnp.einsum("bi,bij,bj->b", V, H, V)
    return jnp.mean(-vHv + 0.5 * jnp.sum(V * G, 1) ** 2)


def loss_and_grad(backend, loss_fn, theta):
    """(loss, gradient pytree) of loss_fn(theta) by the framework's reverse mode."""
    if backend == "torch":
        import torch

        th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        loss = loss_fn(th)
        grads = torch.autograd.grad(loss, list(th.values()))
        return float(loss.detach()), {k: to_numpy(g) for k, g in zip(th, grads)}
    import jax

    loss, g = jax.jit(jax.value_and_grad(loss_fn))(theta)
    return float(loss), {k: np.asarray(v) for k, v in g.items()}


# --- sliced score matching: the example's loss ------------------------------------------
def test_ssm_gradient_matches_dense_reference_and_fd(backend):
    theta, X, V = ssm_problem(backend)
    loss, grad = loss_and_grad(backend, lambda th: SSM.ssm_loss(th, X, V, backend), theta)
    ref_loss, ref_grad = loss_and_grad(backend, lambda th: dense_ssm_loss(backend, th, X, V), theta)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for k in grad:
        np.testing.assert_allclose(grad[k], ref_grad[k], rtol=1e-10, atol=1e-12)
    # central differences along random directions: an independent check of the gradient
    if backend == "jax":
        import jax

        evaluate = jax.jit(lambda th: SSM.ssm_loss(th, X, V, "jax"))
    else:
        evaluate = lambda th: SSM.ssm_loss(th, X, V, "torch")  # noqa: E731
    rng = np.random.default_rng(1)
    h = 1e-5
    for _ in range(3):
        d = {k: rng.standard_normal(np.shape(to_numpy(v))) for k, v in theta.items()}
        plus = {k: theta[k] + to_native(backend, h * d[k]) for k in theta}
        minus = {k: theta[k] - to_native(backend, h * d[k]) for k in theta}
        fd = (float(to_numpy(evaluate(plus))) - float(to_numpy(evaluate(minus)))) / (2 * h)
        exact = sum(float(np.sum(grad[k] * d[k])) for k in grad)
        assert fd == pytest.approx(exact, rel=1e-6, abs=1e-8)
    assert max(np.abs(g).max() for g in grad.values()) > 1e-3  # a non-trivial gradient


def test_ssm_torch_equals_jax():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    out = {}
    for bk in ("torch", "jax"):
        theta, X, V = ssm_problem(bk, seed=2)
        out[bk] = loss_and_grad(bk, lambda th, X=X, V=V, bk=bk: SSM.ssm_loss(th, X, V, bk), theta)
    assert out["torch"][0] == pytest.approx(out["jax"][0], rel=1e-12)
    for k in out["torch"][1]:
        np.testing.assert_allclose(out["torch"][1][k], out["jax"][1][k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", backend_params())
def test_example_trains(backend):
    pytest.importorskip(backend)
    out = SSM.main(backend, steps=60, batch=64, lr=1e-2, verbose=False)
    losses, errors = out["losses"], out["score_errors"]
    assert np.mean(losses[-15:]) < np.mean(losses[:15]) - 0.3
    assert errors[-1] < 0.7 * errors[0]


# --- hessian(..., differentiable=True) -------------------------------------------------
def energy(x, W, a):
    """A point x (2, 2) and parameters W (2, 3), a (scalar) that the Hessian in x depends on."""
    xp = _xp(x)
    return xp.sum(xp.tanh(x @ W) ** 2) + xp.sum(x**4) * a


def energy_problem(backend):
    rng = np.random.default_rng(3)
    x = to_native(backend, rng.standard_normal((2, 2)))
    W = to_native(backend, rng.standard_normal((2, 3)))
    a = to_native(backend, 0.3)
    V = to_native(backend, rng.standard_normal((4, 3)))
    return x, W, a, V


def dense_quadratic_form(backend, x, W, a, V):
    """sum_j v_j^T H(W, a) v_j from the dense Hessian, differentiable in W and a."""
    if backend == "torch":
        import torch

        H = torch.func.hessian(lambda z: energy(z.reshape(2, 2), W, a))(x.reshape(-1))
        return (V * (H @ V)).sum()
    import jax

    H = jax.hessian(lambda z: energy(z.reshape(2, 2), W, a))(x.reshape(-1))
    return (V * (H @ V)).sum()


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev", "rev-fwd", "dense", "fd"])
def test_torch_products_differentiable(mode):
    torch = pytest.importorskip("torch")
    x, W, a, V = energy_problem("torch")
    W, a = W.clone().requires_grad_(True), a.clone().requires_grad_(True)
    ref = torch.autograd.grad(dense_quadratic_form("torch", x, W, a, V), [W, a])
    tol = {"rtol": 1e-5, "atol": 1e-7} if mode == "fd" else {"rtol": 1e-10, "atol": 1e-12}
    H = hessop.hessian(energy, x, W, a, mode=mode, differentiable=True)
    assert not H.cache or mode != "rev-rev"
    for _ in range(2):  # every product owns its graph: backward through each one
        qv = sum(V[:, j] @ (H @ V[:, j]) for j in range(3))  # matvecs
        qm = (V * (H @ V)).sum()  # one matmat
        for q in (qv, qm):
            g = torch.autograd.grad(q, [W, a])
            for gi, ri in zip(g, ref):
                np.testing.assert_allclose(gi.numpy(), ri.numpy(), **tol)
    # the gradient is differentiable too: d/da of sum(grad_x E) = sum(4 x^3)
    loss, grad = H.loss_and_gradient()
    (da,) = torch.autograd.grad(grad.sum(), a)
    assert float(da) == pytest.approx(float((4 * x**3).sum()), rel=1e-10)
    assert W.grad is None and a.grad is None


def test_torch_kept_graph_matmat_is_differentiable():
    # cache=True with differentiable=True: every column goes through the one kept graph
    # (retained, with create_graph), and the block keeps the graph of every column.
    torch = pytest.importorskip("torch")
    x, W, a, V = energy_problem("torch")
    W, a = W.clone().requires_grad_(True), a.clone().requires_grad_(True)
    ref = torch.autograd.grad(dense_quadratic_form("torch", x, W, a, V), [W, a])
    H = hessop.hessian(energy, x, W, a, differentiable=True, cache=True)
    assert H.cache and H.mode == "reverse-over-reverse"
    g = torch.autograd.grad((V * (H @ V)).sum(), [W, a])
    for gi, ri in zip(g, ref):
        np.testing.assert_allclose(gi.numpy(), ri.numpy(), rtol=1e-10, atol=1e-12)


def test_torch_default_keeps_no_graph():
    pytest.importorskip("torch")
    x, W, a, V = energy_problem("torch")
    W.requires_grad_(True)
    H = hessop.hessian(energy, x, W, a)
    assert H.cache and not (H @ V[:, 0]).requires_grad
    assert not H.loss_and_gradient()[1].requires_grad
    H = hessop.hessian(energy, x, W, a, mode="dense")
    assert not (H @ V[:, 0]).requires_grad


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-fwd", "rev-rev", "dense"])
def test_jax_grad_through_operator(mode):
    jax = pytest.importorskip("jax")
    x, W, a, V = energy_problem("jax")

    def quad(W, a, x):
        H = hessop.hessian(energy, x, W, a, backend="jax", mode=mode)
        return (V * (H @ V)).sum()

    ref = jax.grad(lambda W, a: dense_quadratic_form("jax", x, W, a, V), argnums=(0, 1))(W, a)
    eager = jax.grad(quad, argnums=(0, 1))(W, a, x)
    jitted = jax.jit(jax.grad(quad, argnums=(0, 1)))(W, a, x)  # x traced too
    for g in (eager, jitted):
        for gi, ri in zip(g, ref):
            np.testing.assert_allclose(np.asarray(gi), np.asarray(ri), rtol=1e-10, atol=1e-12)


# --- Hutchinson trace estimates in a loss --------------------------------------------------
def trace_problem(backend):
    rng = np.random.default_rng(4)
    x = to_native(backend, rng.standard_normal(3))
    theta = {
        "W": to_native(backend, rng.standard_normal((3, 4))),
        "c": to_native(backend, rng.standard_normal(3)),
    }
    return x, theta


def coupled_energy(x, th):
    xp = _xp(x)
    return xp.sum(xp.tanh(x @ th["W"]) ** 2) + xp.sum(th["c"] * x**3) + x[0] * x[1] * x[2]


def exact_trace(backend, x, th):
    if backend == "torch":
        import torch

        return torch.func.hessian(lambda z: coupled_energy(z, th))(x).trace()
    import jax
    import jax.numpy as jnp

    return jnp.trace(jax.hessian(lambda z: coupled_energy(z, th))(x))


def hutchinson(backend, x, th, probes):
    H = hessop.hessian(coupled_energy, x, th, backend=backend, differentiable=True)
    xp = H.xp
    return xp.mean(xp.sum(probes * (H @ probes), axis=0))


def test_hutchinson_gradient_equals_exact_trace_gradient(backend):
    """Over all 2^n Rademacher probes, mean v^T H v is tr(H) exactly: E[v v^T] = I is then
    an identity, not an expectation. So the gradients must agree to rounding."""
    x, theta = trace_problem(backend)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=3))).T  # (3, 8)
    probes = to_native(backend, signs)
    est, g_est = loss_and_grad(backend, lambda th: hutchinson(backend, x, th, probes), theta)
    tr, g_tr = loss_and_grad(backend, lambda th: exact_trace(backend, x, th), theta)
    assert est == pytest.approx(tr, rel=1e-12)
    for k in g_tr:
        np.testing.assert_allclose(g_est[k], g_tr[k], rtol=1e-10, atol=1e-12)
    # a single probe is not exact (the coupling term is off-diagonal): the test has teeth
    one, _ = loss_and_grad(backend, lambda th: hutchinson(backend, x, th, probes[:, :1]), theta)
    assert abs(one - tr) > 1e-3


def test_hutchinson_fixed_probes_gradient(backend):
    """For any fixed probe set the estimate's gradient is that of (1/k) sum v^T H v."""
    x, theta = trace_problem(backend)
    probes = to_native(backend, np.random.default_rng(5).standard_normal((3, 5)))

    def dense(th):
        if backend == "torch":
            import torch

            H = torch.func.hessian(lambda z: coupled_energy(z, th))(x)
        else:
            import jax

            H = jax.hessian(lambda z: coupled_energy(z, th))(x)
        return (probes * (H @ probes)).sum() / 5

    est, g_est = loss_and_grad(backend, lambda th: hutchinson(backend, x, th, probes), theta)
    ref, g_ref = loss_and_grad(backend, dense, theta)
    assert est == pytest.approx(ref, rel=1e-12)
    for k in g_ref:
        np.testing.assert_allclose(g_est[k], g_ref[k], rtol=1e-10, atol=1e-12)


def test_hessop_trace_is_differentiable_torch():
    """hessop.trace on a differentiable operator: with a diagonal Hessian every Rademacher
    probe gives the exact trace, so the estimate's gradient is the exact one."""
    torch = pytest.importorskip("torch")
    x = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)

    def separable(z, c):
        return (c * z**3).sum() + (torch.sin(c) * z**2).sum()

    H = hessop.hessian(separable, x, c, differentiable=True)
    est = hessop.trace(H, 4, seed=0).estimate
    (g,) = torch.autograd.grad(est, c)
    # tr H = sum(6 c x + 2 sin c): d/dc = 6 x + 2 cos c
    np.testing.assert_allclose(g.numpy(), (6 * x + 2 * torch.cos(c.detach())).numpy(), rtol=1e-12)


# --- hessop.hvp -----------------------------------------------------------------------------
def hvp_problem(backend):
    rng = np.random.default_rng(6)
    params = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}  # unsorted keys
    v = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    s = rng.standard_normal(2)

    def f(p, s):
        xp = _xp(s)
        z = s @ p["w"] + p["b"]
        return xp.sum(xp.sin(z) * z) + xp.sum(p["b"] ** 4)

    return f, to_native(backend, params), to_native(backend, v), to_native(backend, s)


@pytest.mark.parametrize("mode", ["auto", "fwd-rev", "rev-fwd", "rev-rev"])
def test_hvp_matches_dense(backend, mode):
    f, p, v, s = hvp_problem(backend)
    H = hessop.hessian(f, p, s, mode="dense")
    ref = to_numpy(H @ H.ravel(v))
    out = hessop.hvp(f, p, v, s, mode=mode)
    assert list(out) == ["w", "b"] and tuple(out["w"].shape) == (2, 3)
    np.testing.assert_allclose(to_numpy(H.ravel(out)), ref, rtol=1e-12, atol=1e-13)
    flat = hessop.hvp(f, p, H.ravel(v), s, mode=mode)  # flat in, flat out
    np.testing.assert_allclose(to_numpy(flat), ref, rtol=1e-12, atol=1e-13)
    from_numpy = hessop.hvp(f, p, {k: to_numpy(x) for k, x in v.items()}, s, mode=mode)
    np.testing.assert_allclose(to_numpy(H.ravel(from_numpy)), ref, rtol=1e-12, atol=1e-13)


def test_hvp_gradients_to_params_and_args(backend):
    """d/d(params, s) of u . H(params, s) v: third derivatives, against the dense Hessian."""
    f, p, v, s = hvp_problem(backend)
    u = to_native(backend, np.random.default_rng(7).standard_normal(9))
    H0 = hessop.hessian(f, p, s)
    vf = H0.ravel(v)

    def flat_f(wf, s):
        return f({"w": wf[:6].reshape(2, 3), "b": wf[6:]}, s)

    if backend == "torch":
        import torch

        wf = H0.ravel(p).clone().requires_grad_(True)
        s_ = s.clone().requires_grad_(True)
        pt = {"w": wf[:6].reshape(2, 3), "b": wf[6:]}
        out = u @ hessop.hvp(f, pt, vf, s_)
        g = torch.autograd.grad(out, [wf, s_])
        wr = wf.detach().clone().requires_grad_(True)
        sr = s.clone().requires_grad_(True)
        ref = u @ (torch.func.hessian(flat_f)(wr, sr) @ vf)
        g_ref = torch.autograd.grad(ref, [wr, sr])
    else:
        import jax

        def ours(wf, s):
            return u @ hessop.hvp(f, {"w": wf[:6].reshape(2, 3), "b": wf[6:]}, vf, s)

        def theirs(wf, s):
            return u @ (jax.hessian(flat_f)(wf, s) @ vf)

        wf = H0.ravel(p)
        g = jax.jit(jax.grad(ours, argnums=(0, 1)))(wf, s)
        g_ref = jax.jit(jax.grad(theirs, argnums=(0, 1)))(wf, s)
    for gi, ri in zip(g, g_ref):
        np.testing.assert_allclose(to_numpy(gi), to_numpy(ri), rtol=1e-10, atol=1e-12)


def test_hvp_jax_jit_and_vmap():
    jax = pytest.importorskip("jax")
    f, p, v, s = hvp_problem("jax")
    H = hessop.hessian(f, p, s)
    V = jax.numpy.stack([H.ravel(v), 2 * H.ravel(v)])
    out = jax.jit(jax.vmap(lambda vf: hessop.hvp(f, p, vf, s)))(V)
    np.testing.assert_allclose(np.asarray(out), np.asarray(H @ V.T).T, rtol=1e-12)


def test_hvp_torch_grad_mode_and_state():
    torch = pytest.importorskip("torch")
    f, p, v, s = hvp_problem("torch")
    p = {k: x.clone().requires_grad_(True) for k, x in p.items()}
    with torch.no_grad():
        out = hessop.hvp(f, p, v, s)
    assert not out["w"].requires_grad
    assert hessop.hvp(f, p, v, s)["w"].requires_grad
    assert all(x.grad is None for x in p.values())


def test_hvp_errors(backend):
    f, p, v, s = hvp_problem(backend)
    with pytest.raises(hessop.ShapeError, match="flat vector of length 9"):
        hessop.hvp(f, p, to_native(backend, np.ones(8)), s)
    with pytest.raises(hessop.ShapeError):
        hessop.hvp(f, p, {"w": v["w"]}, s)
    with pytest.raises(hessop.UnknownOptionError, match="reverse-over-reverse"):
        hessop.hvp(f, p, v, s, mode="dense")
    with pytest.raises(hessop.LossError, match="scalar"):
        hessop.hvp(lambda q, s: q["b"] * 2, p, v, s)
    with pytest.raises(TypeError, match="backend="):
        hessop.hvp(lambda w: (w**3).sum(), np.ones(2), np.ones(2))
    with pytest.raises(hessop.DTypeError):
        hessop.hvp(lambda w: (w**3).sum(), to_native(backend, np.ones(2, int)), np.ones(2))
