"""hessop.model_hessian / model_hvp: every mode on the reference models, torch vs JAX."""

from __future__ import annotations

import numpy as np
import pytest

import hessop

torch = pytest.importorskip("torch")
nn = torch.nn

from model_utils import (  # noqa: E402
    probes,
    small_spec,
    torch_hessian,
    torch_hvps,
)

MODES = ["auto", "forward-over-reverse", "reverse-over-forward", "reverse-over-reverse", "dense"]
MODELS = ["mlp", "cnn", "transformer"]
# XLA compiles each mode's functions in seconds for the CNN and the transformer on a CPU:
# the JAX checks of those two run with -m slow; the MLP's run by default.
JAX_MODELS = [
    "mlp",
    pytest.param("cnn", marks=pytest.mark.slow),
    pytest.param("transformer", marks=pytest.mark.slow),
]


def torch_setup(name: str, batch: int = 5, seed: int = 0):
    spec = small_spec(name)
    model = spec.torch_model(seed=seed, dtype=torch.float64)
    x, y = spec.make_batch(batch, seed=seed + 1, framework="torch", dtype="float64")
    return spec, model, x, y


@pytest.fixture(scope="module")
def references():
    """Per tiny reference model: probes V and H V by plain double backward, float64.

    Three random directions check every entry of the matrix with probability one, for
    far less than a dense reference.
    """
    out = {}
    for name in MODELS:
        spec, model, x, y = torch_setup(name)
        V = probes(spec.num_params)
        out[name] = (spec, model, x, y, V, torch_hvps(model, spec.torch_loss, x, y, V))
    return out


# --- torch: every mode against double backward ---------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_torch_modes_match_double_backward(references, name, mode):
    spec, model, x, y, V, HV = references[name]
    H = hessop.model_hessian(model, spec.torch_loss, (x, y), mode=mode)
    assert H.shape == (spec.num_params, spec.num_params) and H.dtype == torch.float64
    torch.testing.assert_close(H @ V, HV, rtol=1e-10, atol=1e-12)  # matmat
    torch.testing.assert_close(H @ V[:, 1], HV[:, 1], rtol=1e-10, atol=1e-12)  # matvec


@pytest.fixture(scope="module")
def mlp():
    """The tiny MLP (43 parameters) with its dense double-backward Hessian."""
    spec, model, x, y = torch_setup("mlp")
    return spec, model, x, y, torch_hessian(model, spec.torch_loss, x, y)


def test_dense_hessian_of_the_mlp(mlp):
    spec, model, x, y, ref = mlp
    H = hessop.model_hessian(model, spec.torch_loss, (x, y))
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)
    Hfd = hessop.model_hessian(model, spec.torch_loss, (x, y), mode="fd")
    torch.testing.assert_close(Hfd.to_dense(), ref, rtol=1e-5, atol=1e-6)


def test_float32_matches_float64(references):
    spec, model, x, y, V, HV = references["cnn"]
    m32 = spec.torch_model(seed=0, dtype=torch.float32)
    for mode in ("auto", "forward-over-reverse"):
        H = hessop.model_hessian(m32, spec.torch_loss, (x.float(), y), mode=mode)
        assert H.dtype == torch.float32
        torch.testing.assert_close((H @ V.float()).double(), HV, rtol=1e-4, atol=1e-4)


def test_dtype_override_converts_model_and_inputs(references):
    spec, _, x, y, V, _ = references["mlp"]
    m32 = spec.torch_model(seed=0, dtype=torch.float32)
    # A float32 model and batch, computed in float64: compare with the float64 model at the
    # float32-rounded weights and inputs.
    H = hessop.model_hessian(m32, spec.torch_loss, (x.float(), y), dtype="float64")
    assert H.dtype == torch.float64
    m64 = spec.torch_model(
        dtype=torch.float64, params={k: v.double() for k, v in m32.state_dict().items()}
    )
    expected = torch_hvps(m64, spec.torch_loss, x.float().double(), y, V)
    torch.testing.assert_close(H @ V, expected, rtol=1e-10, atol=1e-12)
    assert next(m32.parameters()).dtype == torch.float32


# --- JAX: every mode, and torch vs JAX with the same weights -----------------------------------
@pytest.mark.parametrize("name", JAX_MODELS)
def test_jax_modes_match_torch_double_backward(references, name):
    jax = pytest.importorskip("jax")
    spec, model, _, _, V, HV = references[name]
    with jax.enable_x64(True):
        params = spec.jax_params_from_torch(model)
        x, y = spec.make_batch(5, seed=1, framework="jax", dtype="float64")
        Vj = jax.numpy.asarray(V.numpy())
        for mode in MODES:
            H = hessop.model_hessian(
                spec.jax_apply, spec.jax_loss, (x, y), params=params, mode=mode
            )
            assert H.backend == "jax" and H.shape == (spec.num_params,) * 2
            np.testing.assert_allclose(np.asarray(H @ Vj), HV.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", JAX_MODELS)
def test_torch_and_jax_agree(references, name):
    jax = pytest.importorskip("jax")
    import scipy.sparse.linalg as spla

    spec, model, x, y, _, _ = references[name]
    Ht = hessop.model_hessian(model, spec.torch_loss, (x, y))
    with jax.enable_x64(True):
        params = spec.jax_params_from_torch(model)
        xj, yj = spec.make_batch(5, seed=1, framework="jax", dtype="float64")
        Hj = hessop.model_hessian(spec.jax_apply, spec.jax_loss, (xj, yj), params=params)
        lt, gt = Ht.loss_and_gradient()
        lj, gj = Hj.loss_and_gradient()
        np.testing.assert_allclose(float(lj), float(lt), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(gj), gt.numpy(), rtol=1e-9, atol=1e-13)
        v = np.random.default_rng(0).standard_normal(spec.num_params)
        hvp_t = (Ht @ torch.from_numpy(v)).numpy()
        hvp_j = np.asarray(Hj @ jax.numpy.asarray(v))
        np.testing.assert_allclose(hvp_j, hvp_t, rtol=1e-9, atol=1e-12)
        v0 = np.ones(spec.num_params)
        top_t = spla.eigsh(Ht.to_scipy(), k=1, which="LA", v0=v0, tol=1e-14)[0][0]
        top_j = spla.eigsh(Hj.to_scipy(), k=1, which="LA", v0=v0, tol=1e-14)[0][0]
    np.testing.assert_allclose(top_j, top_t, rtol=1e-9)
    assert top_t > 0


# --- normalization layers: torch 2.13's fused-kernel rules are wrong in some modes ---------
class NormNet(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(5, 6)
        self.norm = {
            "layer": nn.LayerNorm(6),
            "batch": nn.BatchNorm1d(6),
            "instance": nn.InstanceNorm1d(6, affine=True),
            "group": nn.GroupNorm(2, 6),
        }[kind]
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)  # (n, length, 6)
        if self.kind == "layer":
            h = self.norm(h)
        else:
            h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("kind", ["layer", "batch", "instance", "group"])
def test_normalization_layers_every_mode(kind):
    gen = torch.Generator().manual_seed(3)
    model = NormNet(kind).double()
    with torch.no_grad():
        for p in model.norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    loss = nn.CrossEntropyLoss()
    V = probes(sum(p.numel() for p in model.parameters()))
    HV = torch_hvps(model, loss, x, y, V)
    for mode in MODES:
        H = hessop.model_hessian(model, loss, (x, y), mode=mode)
        torch.testing.assert_close(H @ V, HV, rtol=1e-10, atol=1e-12, msg=mode)
        torch.testing.assert_close(H @ V[:, 0], HV[:, 0], rtol=1e-10, atol=1e-12, msg=mode)


# --- parameter selection ----------------------------------------------------------------------
def test_params_subset_is_a_block_of_the_full_hessian(mlp):
    spec, model, x, y, ref = mlp
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets = dict(zip(names, np.cumsum([0] + [sizes[n] for n in names])[:-1]))
    # The list order does not matter: the layout follows named_parameters().
    chosen = ["layers.1.bias", "layers.0.weight"]
    idx = np.concatenate(
        [np.arange(offsets[n], offsets[n] + sizes[n]) for n in ["layers.0.weight", "layers.1.bias"]]
    )
    block = ref[np.ix_(idx, idx)]
    for params in (
        chosen,
        lambda n, p: n in chosen,
        [model.layers[1].bias, model.layers[0].weight],
    ):
        H = hessop.model_hessian(model, spec.torch_loss, (x, y), params=params)
        assert list(H.params) == ["layers.0.weight", "layers.1.bias"]
        torch.testing.assert_close(H.to_dense(), block, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_are_left_out_by_default(mlp):
    spec, _, x, y, ref = mlp
    model = spec.torch_model(seed=0, dtype=torch.float64)
    model.layers[0].weight.requires_grad_(False)
    H = hessop.model_hessian(model, spec.torch_loss, (x, y))
    assert list(H.params) == ["layers.0.bias", "layers.1.weight", "layers.1.bias"]
    torch.testing.assert_close(H.to_dense(), ref[20:, 20:], rtol=1e-10, atol=1e-12)


def test_bad_params_are_explained(mlp):
    spec, model, x, y, _ = mlp
    with pytest.raises(ValueError, match="unknown parameters 'nope'.*layers.0.weight"):
        hessop.model_hessian(model, spec.torch_loss, (x, y), params=["nope"])
    with pytest.raises(ValueError, match="selected no parameter"):
        hessop.model_hessian(model, spec.torch_loss, (x, y), params=lambda n, p: False)


# --- data: one batch or many ---------------------------------------------------------------
def test_uneven_batches_equal_the_full_batch(references):
    spec, model, _, _, V, _ = references["mlp"]
    x, y = spec.make_batch(10, seed=2, framework="torch", dtype="float64")
    HV = torch_hvps(model, spec.torch_loss, x, y, V)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), [x[8:], y[8:]]]  # lists too, as DataLoader
    for mode in ("auto", "forward-over-reverse"):
        H = hessop.model_hessian(model, spec.torch_loss, batches, mode=mode)
        torch.testing.assert_close(H @ V, HV, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            H.gradient(),
            hessop.model_hessian(model, spec.torch_loss, (x, y)).gradient(),
            rtol=1e-10,
            atol=1e-13,
        )
    # an unweighted average of the batch Hessians would be wrong
    per_batch = [torch_hvps(model, spec.torch_loss, a, b, V) for a, b in batches]
    assert not torch.allclose(sum(per_batch) / 3, HV, rtol=1e-6)


def test_dataloader_and_sum_reduction(mlp):
    spec, model, _, _, _ = mlp
    x, y = spec.make_batch(10, seed=2, framework="torch", dtype="float64")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    sum_loss = nn.CrossEntropyLoss(reduction="sum")
    H = hessop.model_hessian(model, sum_loss, loader, reduction="sum")
    ref = torch_hessian(model, sum_loss, x, y)
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, inputs):
        return torch.tanh(self.a(inputs["a"])) * self.b(inputs["b"]) + inputs["scale"]


def test_dict_inputs_and_batch_size():
    gen = torch.Generator().manual_seed(0)
    model = DictNet().double()
    x = {
        "a": torch.randn(7, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(7, 4, generator=gen, dtype=torch.float64),
        "scale": torch.tensor(0.5, dtype=torch.float64),
    }
    y = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    loss = nn.MSELoss()
    ref = torch_hessian(model, loss, x, y)
    H = hessop.model_hessian(model, loss, (x, y))  # a dict input is still one batch
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)

    def part(i, j):
        return {k: (v[i:j] if v.ndim else v) for k, v in x.items()}, y[i:j]

    Hd = hessop.model_hessian(model, loss, [part(0, 5), part(5, 7)])  # sizes 5 and 2
    torch.testing.assert_close(Hd.to_dense(), ref, rtol=1e-10, atol=1e-12)
    # batch_size= overrides the size: weights 1 and 1 give the plain average of batches
    Hu = hessop.model_hessian(model, loss, [part(0, 5), part(5, 7)], batch_size=lambda x, y: 1)
    avg = (torch_hessian(model, loss, *part(0, 5)) + torch_hessian(model, loss, *part(5, 7))) / 2
    torch.testing.assert_close(Hu.to_dense(), avg, rtol=1e-10, atol=1e-12)


def test_data_errors(mlp):
    spec, model, x, y, _ = mlp
    with pytest.raises(TypeError, match="re-iterable"):
        hessop.model_hessian(model, spec.torch_loss, ((x, y) for _ in range(2)))
    with pytest.raises(hessop.EmptyDataError):
        hessop.model_hessian(model, spec.torch_loss, [])
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        hessop.model_hessian(model, spec.torch_loss, [(x, y, y)])


# --- functional models and model_hvp -----------------------------------------------------------
def test_functional_torch_model(mlp):
    spec, model, x, y, ref = mlp
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def apply(p, x):
        h = torch.tanh(x @ p["layers.0.weight"].T + p["layers.0.bias"])
        return h @ p["layers.1.weight"].T + p["layers.1.bias"]

    H = hessop.model_hessian(apply, spec.torch_loss, (x, y), params=params)
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_model_hvp_returns_what_it_is_given(mlp):
    spec, model, x, y, ref = mlp
    v = torch.linspace(-1, 1, spec.num_params, dtype=torch.float64)
    expected = ref @ v
    flat = hessop.model_hvp(model, spec.torch_loss, x, y, v)
    torch.testing.assert_close(flat, expected, rtol=1e-10, atol=1e-12)
    H = hessop.model_hessian(model, spec.torch_loss, (x, y))
    tree = hessop.model_hvp(model, spec.torch_loss, x, y, H.unravel(v))
    assert list(tree) == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(H.ravel(tree), expected, rtol=1e-10, atol=1e-12)
    as_list = hessop.model_hvp(model, spec.torch_loss, x, y, list(H.unravel(v).values()))
    assert isinstance(as_list, list) and len(as_list) == 4
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in as_list]), expected, rtol=1e-10, atol=1e-12
    )
    with pytest.raises(ValueError, match="flat vector of length 43"):
        hessop.model_hvp(model, spec.torch_loss, x, y, v[:5])


def test_model_hvp_jax(mlp):
    jax = pytest.importorskip("jax")
    spec, model, _, _, ref = mlp
    with jax.enable_x64(True):
        params = spec.jax_params_from_torch(model)
        x, y = spec.make_batch(5, seed=1, framework="jax", dtype="float64")
        v = {k: jax.numpy.ones_like(p) for k, p in params.items()}
        out = hessop.model_hvp(spec.jax_apply, spec.jax_loss, x, y, v, params=params)
        assert list(out) == list(params)
        flat = np.concatenate([np.asarray(o).reshape(-1) for o in out.values()])
    np.testing.assert_allclose(flat, ref.numpy() @ np.ones(spec.num_params), rtol=1e-10, atol=1e-12)


def test_framework_errors(mlp):
    spec, model, x, y, _ = mlp
    with pytest.raises(ValueError, match="the model is a torch module, but backend="):
        hessop.model_hessian(model, spec.torch_loss, (x, y), backend="jax")
    with pytest.raises(TypeError, match="pass params="):
        hessop.model_hessian(lambda p, x: x, spec.torch_loss, (x, y))
