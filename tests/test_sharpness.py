"""SharpnessTracker: the top Hessian eigenvalues along training, against dense eigvalsh at
each step, across frameworks, warm vs cold, and without touching the model."""

from __future__ import annotations

import numpy as np
import pytest

import hessop

torch = pytest.importorskip("torch")

from model_utils import (  # noqa: E402
    assert_same_state,
    jax_hessian,
    model_state,
    rng_states,
    same_rng_states,
    small_spec,
    torch_ggn,
    torch_hessian,
)


def setup():
    spec = small_spec("mlp", sizes=(4, 8, 6, 3))
    model = spec.torch_model(seed=0, dtype=torch.float64)
    x, y = spec.make_batch(32, seed=1, framework="torch", dtype="float64")
    return spec, model, x, y


def sgd_step(model, loss_fn, x, y, lr):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def test_follows_the_dense_top_eigenvalues_along_training():
    spec, model, x, y = setup()
    warm = hessop.SharpnessTracker(k=2, tol=1e-6)
    cold = hessop.SharpnessTracker(k=2, tol=1e-6, warm_start=False)
    for step in range(5):
        exact = np.linalg.eigvalsh(torch_hessian(model, spec.torch_loss, x, y).numpy())[::-1]
        for tracker in (warm, cold):
            rec = tracker(model, spec.torch_loss, (x, y))
            assert rec.step == step and rec.converged.all()
            np.testing.assert_allclose(rec.eigenvalues, exact[:2], rtol=1e-9)
            assert (rec.residual_norms <= 1e-6 * exact[0]).all()
        sgd_step(model, spec.torch_loss, x, y, lr=0.5)
    assert [r.warm for r in warm.history] == [False] + [True] * 4
    assert not any(r.warm for r in cold.history)
    assert warm.history[0].num_matvecs == cold.history[0].num_matvecs
    for w, c in zip(warm.history[1:], cold.history[1:]):
        assert w.num_matvecs < c.num_matvecs
    np.testing.assert_array_equal(warm.steps, np.arange(5))
    np.testing.assert_allclose(warm.sharpness, cold.sharpness, rtol=1e-9)


def test_warm_calls_cost_a_few_products():
    spec, model, x, y = setup()
    warm = hessop.SharpnessTracker()  # k=1, tol=1e-3
    cold = hessop.SharpnessTracker(warm_start=False)
    for step in range(10):
        recs = [tracker(model, spec.torch_loss, (x, y)) for tracker in (warm, cold)]
        if step % 4 == 0:  # the dense reference at steps 0, 4 and 8
            H = torch_hessian(model, spec.torch_loss, x, y).numpy()
            top = np.linalg.eigvalsh(H)[-1]
            for rec in recs:
                assert abs(rec.sharpness - top) <= 1e-5 * top  # about tol^2 accurate
        sgd_step(model, spec.torch_loss, x, y, lr=0.1)
    warm_cost = [r.num_matvecs for r in warm.history[1:]]
    cold_cost = [r.num_matvecs for r in cold.history[1:]]
    assert max(warm_cost) <= 5 and sum(warm_cost) <= 0.6 * sum(cold_cost)


def test_every_and_step_labels():
    spec, model, x, y = setup()
    tracker = hessop.SharpnessTracker(every=3)
    out = [tracker(model, spec.torch_loss, (x, y)) for _ in range(7)]
    assert [r is None for r in out] == [False, True, True, False, True, True, False]
    assert list(tracker.steps) == [0, 3, 6]
    assert tracker(model, spec.torch_loss, (x, y), step=100) is None  # the user's steps
    assert tracker(model, spec.torch_loss, (x, y), step=99).step == 99
    assert list(tracker.steps) == [0, 3, 6, 99]
    tracker.reset()
    assert tracker.history == [] and tracker(model, spec.torch_loss, (x, y)).warm is False


def test_never_changes_the_model():
    spec, model, x, y = setup()
    model.train()
    tracker = hessop.SharpnessTracker(k=2)
    sgd_step(model, spec.torch_loss, x, y, lr=0.1)  # .grad populated, as mid-training
    before, rng = model_state(model), rng_states()
    tracker(model, spec.torch_loss, (x, y))
    tracker(model, spec.torch_loss, (x, y))  # warm
    ggn = hessop.SharpnessTracker(curvature="ggn")
    ggn(model, spec.torch_loss, (x, y))
    assert_same_state(before, model_state(model))
    assert same_rng_states(rng, rng_states())


def test_ggn_and_streamed_data():
    spec, model, x, y = setup()
    rec = hessop.SharpnessTracker(curvature="ggn", tol=1e-8)(model, spec.torch_loss, (x, y))
    G = torch_ggn(model, spec.torch_loss, x, y).numpy()
    np.testing.assert_allclose(rec.sharpness, np.linalg.eigvalsh(G)[-1], rtol=1e-12)
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]  # the same loss over a dataset
    rec = hessop.SharpnessTracker(tol=1e-8)(model, spec.torch_loss, batches)
    top = np.linalg.eigvalsh(torch_hessian(model, spec.torch_loss, x, y).numpy())[-1]
    np.testing.assert_allclose(rec.sharpness, top, rtol=1e-12)


def test_jax_matches_torch_cold_and_warm():
    pytest.importorskip("jax")
    spec, model, x, y = setup()
    xj, yj = spec.make_batch(32, seed=1, framework="jax", dtype="float64")
    tj, tt = hessop.SharpnessTracker(tol=1e-8), hessop.SharpnessTracker(tol=1e-8)
    for _ in range(2):  # cold, then warm from the previous vectors
        params = spec.jax_params_from_torch(model)
        rec = tj(spec.jax_apply, spec.jax_loss, (xj, yj), params=params)
        top = np.linalg.eigvalsh(torch_hessian(model, spec.torch_loss, x, y).numpy())[-1]
        assert tt(model, spec.torch_loss, (x, y)).sharpness == pytest.approx(top, rel=1e-10)
        assert rec.sharpness == pytest.approx(top, rel=1e-10)
        sgd_step(model, spec.torch_loss, x, y, lr=0.5)
    assert [r.warm for r in tj.history] == [False, True]
    assert [r.num_matvecs for r in tj.history] == [r.num_matvecs for r in tt.history]


@pytest.mark.slow  # JAX compiles; test_jax_matches_torch_cold_and_warm covers the same path
def test_jax_training_matches_torch():
    jax = pytest.importorskip("jax")
    spec, model, x, y = setup()
    params = spec.jax_params_from_torch(model)
    xj, yj = spec.make_batch(32, seed=1, framework="jax", dtype="float64")
    grad = jax.jit(jax.grad(spec.jax_objective))
    tj, tt = hessop.SharpnessTracker(k=2, tol=1e-8), hessop.SharpnessTracker(k=2, tol=1e-8)
    for _ in range(3):
        rec = tj(spec.jax_apply, spec.jax_loss, (xj, yj), params=params)
        tt(model, spec.torch_loss, (x, y))
        D = np.asarray(jax_hessian(spec.jax_apply, spec.jax_loss, params, xj, yj))
        np.testing.assert_allclose(rec.eigenvalues, np.linalg.eigvalsh(D)[::-1][:2], rtol=1e-10)
        g = grad(params, xj, yj)
        params = {n: p - 0.5 * g[n] for n, p in params.items()}
        sgd_step(model, spec.torch_loss, x, y, lr=0.5)
    np.testing.assert_allclose(tj.sharpness, tt.sharpness, rtol=1e-10)
    assert [r.num_matvecs for r in tj.history] == [r.num_matvecs for r in tt.history]


def test_follows_the_top_through_a_crossing():
    # Two eigenvalues cross: 5 - t and 3 + t, on fixed eigenvectors. Started from the old
    # top eigenvector alone, the solver would sit on it (an exact eigenvector, residual
    # zero) and report 3 + t after the crossing; the extra Ritz vector it carries
    # (oversample=1) holds the new top.
    n = 30
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    rest = rng.uniform(-2.0, 1.0, n - 2)

    def apply(p, A):
        return 0.5 * p @ (A @ p)

    def loss_fn(out, y):
        return out

    for oversample, expected_ok in ((1, True), (0, False)):
        tracker = hessop.SharpnessTracker(oversample=oversample, tol=1e-8)
        ok = []
        for t in np.linspace(0.0, 2.0, 9):
            A = torch.as_tensor((Q * np.concatenate([[5.0 - t, 3.0 + t], rest])) @ Q.T)
            rec = tracker(apply, loss_fn, [(A, 0)], params=torch.zeros(n, dtype=torch.float64))
            ok.append(abs(rec.sharpness - max(5.0 - t, 3.0 + t)) < 1e-8)
        assert all(ok) == expected_ok


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    spec, model, x, y = setup()
    a = hessop.SharpnessTracker(k=2, lr=0.5, label="lr=0.5")
    b = hessop.SharpnessTracker(lr=2.0)
    for _ in range(2):
        a(model, spec.torch_loss, (x, y))
        b(model, spec.torch_loss, (x, y))
        sgd_step(model, spec.torch_loss, x, y, lr=0.5)
    path = hessop.plot_sharpness([a, b], tmp_path / "both.png", log=True)
    assert (tmp_path / "both.png").stat().st_size > 0 and path.endswith("both.png")
    assert a.plot(tmp_path / "one.png").endswith("one.png")


def test_argument_errors():
    for kw, match in [
        ({"k": 0}, "k must be"),
        ({"every": 0}, "every must be"),
        ({"tol": -1.0}, "tol must be"),
        ({"max_matvecs": 0}, "max_matvecs"),
        ({"oversample": -1}, "oversample"),
        ({"lr": 0.0}, "lr must be"),
        ({"seed": -2}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            hessop.SharpnessTracker(**kw)
    with pytest.raises(hessop.UnknownOptionError, match="'hessian', 'ggn'"):
        hessop.SharpnessTracker(curvature="fisher")
    with pytest.raises(TypeError, match="warm_start"):
        hessop.SharpnessTracker(warm_start=1)
    with pytest.raises(TypeError, match="label"):
        hessop.SharpnessTracker(label=3)
    spec, model, x, y = setup()
    with pytest.raises(TypeError, match="step"):
        hessop.SharpnessTracker()(model, spec.torch_loss, (x, y), step=1.5)
