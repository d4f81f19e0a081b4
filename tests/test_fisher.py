"""hessop.model_fisher: the empirical Fisher against an explicit loop over samples."""

from __future__ import annotations

import numpy as np
import pytest

import hessop

torch = pytest.importorskip("torch")
nn = torch.nn

from model_utils import small_spec, torch_per_sample_grads  # noqa: E402


def setup(name: str, batch: int = 5, seed: int = 1):
    spec = small_spec(name)
    model = spec.torch_model(seed=0, dtype=torch.float64)
    x, y = spec.make_batch(batch, seed=seed, framework="torch", dtype="float64")
    return spec, model, x, y


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_fisher_matches_a_loop_over_samples(name):
    spec, model, x, y = setup(name)
    Gs = torch_per_sample_grads(model, spec.torch_loss, x, y)
    ref = Gs.T @ Gs / len(y)
    F = hessop.model_fisher(model, spec.torch_loss, (x, y))
    assert isinstance(F, hessop.FisherOperator) and F.shape == ref.shape
    torch.testing.assert_close(F.per_sample_gradients(x, y), Gs, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-13)
    v = torch.linspace(-1, 1, F.shape[0], dtype=torch.float64)
    torch.testing.assert_close(F @ v, ref @ v, rtol=1e-10, atol=1e-13)
    # the mean of the per-sample gradients is the gradient of the batch loss
    torch.testing.assert_close(Gs.mean(0), F.gradient(), rtol=1e-10, atol=1e-13)


def test_fisher_normalization_streaming_and_options():
    spec, model, x, y = setup("mlp", batch=10, seed=2)
    Gs = torch_per_sample_grads(model, spec.torch_loss, x, y)
    ref = Gs.T @ Gs / 10
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # uneven: 4, 4, 2
    F = hessop.model_fisher(model, spec.torch_loss, batches)
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-13)
    Fs = hessop.model_fisher(model, nn.CrossEntropyLoss(reduction="sum"), batches, reduction="sum")
    torch.testing.assert_close(Fs.to_dense(), 10 * ref, rtol=1e-10, atol=1e-13)
    for kw in ({"cache": False}, {"chunk_size": 3}):
        Fk = hessop.model_fisher(model, spec.torch_loss, (x, y), **kw)
        torch.testing.assert_close(Fk.to_dense(), ref, rtol=1e-10, atol=1e-13)
    sub = hessop.model_fisher(model, spec.torch_loss, (x, y), params=["layers.1.bias"])
    torch.testing.assert_close(sub.to_dense(), ref[40:, 40:], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(
        F.to_scipy() @ np.ones(43),
        (ref @ torch.ones(43, dtype=torch.float64)).numpy(),
        rtol=1e-10,
        atol=1e-13,
    )


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, inputs):
        return torch.tanh(self.a(inputs["a"])) * self.b(inputs["b"]) + inputs["shift"]


def test_dict_inputs_with_a_shared_entry():
    torch.manual_seed(0)
    model = DictNet().double()
    gen = torch.Generator().manual_seed(1)
    x = {
        "a": torch.randn(5, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(5, 4, generator=gen, dtype=torch.float64),
        "shift": torch.randn(2, generator=gen, dtype=torch.float64),
    }  # not per sample
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    loss = nn.MSELoss()
    rows = []
    for i in range(5):
        model.zero_grad()
        loss(
            model({"a": x["a"][i : i + 1], "b": x["b"][i : i + 1], "shift": x["shift"]}),
            y[i : i + 1],
        ).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    Gs = torch.stack(rows)
    F = hessop.model_fisher(model, loss, (x, y))
    torch.testing.assert_close(F.to_dense(), Gs.T @ Gs / 5, rtol=1e-10, atol=1e-13)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*model.eval\(\)"):
        hessop.model_fisher(model, nn.CrossEntropyLoss(), (x, y))
    hessop.model_fisher(model.eval(), nn.CrossEntropyLoss(), (x, y))


def test_jax_fisher_matches_torch_and_a_jax_loop():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    spec, model, x, y = setup("mlp", batch=6)
    Gs = torch_per_sample_grads(model, spec.torch_loss, x, y).numpy()
    with jax.enable_x64(True):
        params = spec.jax_params_from_torch(model)
        xj, yj = spec.make_batch(6, seed=1, framework="jax", dtype="float64")
        rows = []
        for i in range(6):
            g = jax.grad(spec.jax_objective)(params, xj[i : i + 1], yj[i : i + 1])
            rows.append(np.concatenate([np.asarray(g[n]).reshape(-1) for n in params]))
        loop = np.stack(rows)
        np.testing.assert_allclose(loop, Gs, rtol=1e-9, atol=1e-13)
        for data, kw in (
            ((xj, yj), {}),
            ([(xj[:4], yj[:4]), (xj[4:], yj[4:])], {}),
            ((xj, yj), {"chunk_size": 3}),
        ):
            F = hessop.model_fisher(spec.jax_apply, spec.jax_loss, data, params=params, **kw)
            assert F.backend == "jax"
            np.testing.assert_allclose(
                np.asarray(F.to_dense()), loop.T @ loop / 6, rtol=1e-10, atol=1e-13
            )
        G = F.per_sample_gradients(xj, yj)
        np.testing.assert_allclose(np.asarray(G), loop, rtol=1e-10, atol=1e-13)
        assert isinstance(G, jnp.ndarray)
