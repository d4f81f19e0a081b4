"""hessop.model_ggn: J^T H_loss J against a dense Jacobian and loss Hessian."""

from __future__ import annotations

import numpy as np
import pytest

import hessop

torch = pytest.importorskip("torch")
nn = torch.nn

from model_utils import (  # noqa: E402
    flat_params,
    functional_output,
    small_spec,
    torch_ggn,
    torch_hessian,
)


def setup(name: str, batch: int = 5):
    spec = small_spec(name)
    model = spec.torch_model(seed=0, dtype=torch.float64)
    x, y = spec.make_batch(batch, seed=1, framework="torch", dtype="float64")
    return spec, model, x, y


@pytest.mark.parametrize(
    "name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow), "transformer"]
)
def test_ggn_matches_dense_jacobian_product(name):
    spec, model, x, y = setup(name)
    ref = torch_ggn(model, spec.torch_loss, x, y)
    G = hessop.model_ggn(model, spec.torch_loss, (x, y))
    assert isinstance(G, hessop.GGNOperator) and G.shape == ref.shape
    torch.testing.assert_close(G.to_dense(), ref, rtol=1e-10, atol=1e-12)
    v = torch.linspace(-1, 1, G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(G @ v, ref @ v, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(ref).min() > -1e-12  # PSD
    # the GGN is not the Hessian of this nonlinear model
    H = hessop.model_hessian(model, spec.torch_loss, (x, y))
    assert not torch.allclose(H @ v, G @ v, rtol=1e-3)


def test_ggn_against_jacrev_for_mse_regression():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    names, w0 = flat_params(model)
    # torch.func.jacrev of the output; MSELoss averages over all 12 entries: H_loss = I / 6
    J = torch.func.jacrev(lambda w: functional_output(model, names, w, x))(w0).reshape(12, -1)
    ref = J.T @ J / 6
    G = hessop.model_ggn(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(G.to_dense(), ref, rtol=1e-10, atol=1e-12)
    Gs = hessop.model_ggn(model, nn.MSELoss(reduction="sum"), (x, y), reduction="sum")
    torch.testing.assert_close(Gs.to_dense(), 12 * ref, rtol=1e-10, atol=1e-12)


def test_ggn_of_a_linear_model_is_the_hessian():
    spec, _, x, y = setup("mlp")
    model = small_spec("mlp", sizes=(4, 3)).torch_model(seed=0, dtype=torch.float64)
    G = hessop.model_ggn(model, spec.torch_loss, (x, y))
    ref = torch_hessian(model, spec.torch_loss, x, y)
    torch.testing.assert_close(G.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_ggn_streams_uneven_batches_and_options():
    spec, model, _, _ = setup("mlp")
    x, y = spec.make_batch(10, seed=3, framework="torch", dtype="float64")
    ref = torch_ggn(model, spec.torch_loss, x, y)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    G = hessop.model_ggn(model, spec.torch_loss, batches)
    assert not G.cache
    torch.testing.assert_close(G.to_dense(), ref, rtol=1e-10, atol=1e-12)
    for kw in ({"cache": False}, {"chunk_size": 7}):
        Gk = hessop.model_ggn(model, spec.torch_loss, (x, y), **kw)
        torch.testing.assert_close(Gk.to_dense(), ref, rtol=1e-10, atol=1e-12)
    # the operator interface: ravel/unravel, scipy, the point, the gradient
    v = torch.ones(G.shape[0], dtype=torch.float64)
    assert list(G.unravel(v)) == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(G.ravel(G.unravel(v)), v)
    np.testing.assert_allclose(
        G.to_scipy() @ np.ones(G.shape[0]), (ref @ v).numpy(), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        G.gradient(), hessop.model_hessian(model, spec.torch_loss, (x, y)).gradient()
    )
    sub = hessop.model_ggn(model, spec.torch_loss, (x, y), params=["layers.1.weight"])
    torch.testing.assert_close(sub.to_dense(), ref[25:40, 25:40], rtol=1e-10, atol=1e-12)


def test_jax_ggn_matches_torch():
    jax = pytest.importorskip("jax")
    spec, model, x, y = setup("mlp")
    ref = torch_ggn(model, spec.torch_loss, x, y).numpy()
    with jax.enable_x64(True):
        params = spec.jax_params_from_torch(model)
        xj, yj = spec.make_batch(5, seed=1, framework="jax", dtype="float64")
        G = hessop.model_ggn(spec.jax_apply, spec.jax_loss, (xj, yj), params=params)
        assert G.backend == "jax" and isinstance(G, hessop.GGNOperator)
        dense = np.asarray(G.to_dense())
        np.testing.assert_allclose(dense, ref, rtol=1e-9, atol=1e-12)
        streamed = hessop.model_ggn(
            spec.jax_apply, spec.jax_loss, [(xj[:3], yj[:3]), (xj[3:], yj[3:])], params=params
        )
        np.testing.assert_allclose(np.asarray(streamed.to_dense()), dense, rtol=1e-10, atol=1e-12)
